"""The stochastic binary network: exact enumeration against Pyro's TraceEnum_ELBO.

The reference is an independent Pyro program mirroring the network with one *scalar*
``pyro.sample`` site per unit (Pyro cannot enumerate inside ``Independent`` event dims). The
guide samples every unit from the network's own conditionals and is enumerated in parallel;
the model replays the same sites with the same distributions and adds
``pyro.factor(-cost)``. Then ``log p - log q = -cost`` on every configuration, so
``-ELBO = E_q[cost]`` and its gradient with respect to the shared parameters is the exact
``d E[L] / d theta``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from stochgrad import estimators, models
from stochgrad.estimators.exact import enumerate_expectation

F64 = torch.float64


def mirror(obj, params):
    """(model, guide) over scalar sites ``h1_{b}_{j}``, ``h2_{b}_{k}``; parameters shared."""
    x, y = obj.x, obj.y
    batch, (n1, n2), n_out = x.shape[0], obj.hidden, y.shape[1]

    def units(observe_cost: bool):
        W1, b1, W2, b2, W3, b3 = (params[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
        cost = 0.0
        for b in range(batch):
            h1 = []
            for j in range(n1):
                a = b1[j] + sum(x[b, i] * W1[i, j] for i in range(x.shape[1]))
                h1.append(pyro.sample(f"h1_{b}_{j}", dist.Bernoulli(logits=a)))
            h2 = []
            for k in range(n2):
                a = b2[k] + sum(h1[j] * W2[j, k] for j in range(n1))
                h2.append(pyro.sample(f"h2_{b}_{k}", dist.Bernoulli(logits=a)))
            for o in range(n_out):
                y_hat = b3[o] + sum(h2[k] * W3[k, o] for k in range(n2))
                cost = cost + (y_hat - y[b, o]) ** 2
        if observe_cost:
            pyro.factor("cost", -cost)

    def model():
        units(True)

    @config_enumerate(default="parallel")
    def guide():
        units(False)

    return model, guide


def pyro_reference(obj):
    """(E[L], dE[L]/dtheta) from TraceEnum_ELBO on the mirror program."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in obj.params.items()}
    model, guide = mirror(obj, params)
    pyro.clear_param_store()
    loss = TraceEnum_ELBO(max_plate_nesting=0).differentiable_loss(model, guide)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"seed": 3},
        {"input_dim": 3, "hidden": (2, 3), "output_dim": 1, "batch": 2, "seed": 7},
    ],
    ids=["default", "seed3", "small"],
)
def test_exact_grad_matches_pyro_trace_enum(options):
    obj = models.get("sbn", dtype=F64, **options)
    expected_cost, want = pyro_reference(obj)
    got = obj.exact_grad()
    assert list(got) == list(obj.params)
    for k in obj.params:
        assert got[k].shape == obj.params[k].shape
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(obj.expected_cost(), expected_cost, rtol=1e-10, atol=0)
    # every parameter gets a gradient, in every layer
    for k in ("W1", "b1", "W2", "b2", "W3", "b3"):
        assert float(got[k].abs().max()) > 0, k


def test_exact_grad_is_the_derivative_of_the_expected_cost():
    obj = models.get("sbn", dtype=F64, seed=1)
    got = obj.exact_grad()
    eps = 1e-6
    for k, v in obj.params.items():
        for idx in [(0,) * v.dim(), tuple(s - 1 for s in v.shape)]:
            with torch.no_grad():
                v[idx] += eps
                plus = enumerate_expectation(obj)
                v[idx] -= 2 * eps
                minus = enumerate_expectation(obj)
                v[idx] += eps
            fd = (plus - minus) / (2 * eps)
            assert float(got[k][idx]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9), (k, idx)


def test_exact_estimator_repeats_the_exact_gradient():
    obj = models.get("sbn", dtype=F64)
    g = estimators.get("exact").estimate(obj, 3, seed=0)
    for k, v in obj.exact_grad().items():
        torch.testing.assert_close(g[k], v.expand(3, *v.shape), rtol=1e-12, atol=1e-15)


def test_program_structure_and_costs():
    obj = models.get("sbn", dtype=F64)
    with pyro.poutine.trace() as tr:
        cost = obj(num_draws=5)
    assert cost.shape == (5,)
    sites = {n: s for n, s in tr.trace.nodes.items() if s["type"] == "sample"}
    assert list(sites) == ["h1", "h2"]
    assert sites["h1"]["value"].shape == (5, 2, 3) and sites["h2"]["value"].shape == (5, 2, 2)
    for s in sites.values():
        assert set(s["value"].unique().tolist()) <= {0.0, 1.0}
        assert s["fn"].event_shape == s["value"].shape[1:]
    # cost from the sampled units by hand
    p = obj.params
    h2 = sites["h2"]["value"]
    y_hat = h2 @ p["W3"] + p["b3"]
    torch.testing.assert_close(cost, ((y_hat - obj.y) ** 2).sum((-1, -2)))


@pytest.mark.statistical
def test_program_mean_cost_is_the_expected_cost(stat):
    """z-test of the sampled mean cost against enumeration (false-alarm rate 1e-4)."""
    torch.manual_seed(0)
    obj = models.get("sbn", dtype=F64)
    with torch.no_grad():
        costs = obj(num_draws=100_000)
    stat.assert_unbiased(costs[:, None], obj.expected_cost().reshape(1), 1e-4)


def test_options_roundtrip_and_defaults():
    obj = models.get("sbn")
    assert obj.options() == {
        "input_dim": 4,
        "hidden": [3, 2],
        "output_dim": 2,
        "batch": 2,
        "seed": 0,
    }
    again = models.get("sbn", **obj.options())
    for k in obj.params:
        torch.testing.assert_close(again.params[k], obj.params[k])
        assert obj.params[k].requires_grad
    other = models.get("sbn", seed=1)
    assert not torch.equal(other.params["W1"], obj.params["W1"])
