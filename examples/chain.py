"""A chain of two binary units per data point, z1 -> z2, with a Gaussian observation.

Model, for each of the data points ``x_i`` (a plate)::

    z1_i ~ Bernoulli(logits=a)
    z2_i ~ Bernoulli(logits=b0 + b1 * z1_i)
    x_i  ~ Normal(loc * (z1_i + z2_i), 1)

Guide (amortised per data point, with the same chain structure)::

    z1_i ~ Bernoulli(logits=q1_i)
    z2_i ~ Bernoulli(logits=r_i + s * z1_i)

Seven Pyro params (``q1``, ``r``, ``s`` in the guide; ``a``, ``b0``, ``b1``, ``loc`` in the
model), two discrete sites with 2 x 2 joint values per data point: ``TraceEnum_ELBO`` gives the
exact gradient. The params are written to broadcast against an extra batch dimension on their
left (no indexing into them), so ``stochgrad compare --pyro`` can vectorise the draws::

    stochgrad compare --pyro examples/chain.py:model,guide --draws 10000

``data()`` returns the program's arguments (here the observations); ``--data VALUE`` would be
passed to ``data(VALUE)``.
"""

import pyro
import pyro.distributions as dist
import torch

X = torch.tensor([0.2, 1.4, 2.1, -0.3, 0.9])


def data(value=None):
    """The observations: the built-in ``X``, or ``value`` as comma-separated numbers."""
    if value is None:
        return (X,)
    return (torch.tensor([float(v) for v in value.split(",")]),)


def model(x):
    a = pyro.param("a", torch.tensor(0.3))
    b0 = pyro.param("b0", torch.tensor(-0.5))
    b1 = pyro.param("b1", torch.tensor(1.2))
    loc = pyro.param("loc", torch.tensor(1.1))
    with pyro.plate("data", x.shape[-1]):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=a))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=b0 + b1 * z1))
        pyro.sample("x", dist.Normal(loc * (z1 + z2), 1.0), obs=x)


def guide(x):
    n = x.shape[-1]
    q1 = pyro.param("q1", torch.linspace(-1.0, 1.0, n))
    r = pyro.param("r", torch.linspace(0.5, -0.5, n))
    s = pyro.param("s", torch.tensor(0.8))
    with pyro.plate("data", n):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=q1))
        pyro.sample("z2", dist.Bernoulli(logits=r + s * z1))
