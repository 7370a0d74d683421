"""Gradient variance at an annotated ``score_function`` site, credited with its downstream cost.

For each model, draws ``--draws`` single-particle gradients of one guide parameter under
``EstimatorELBO`` (the site annotated ``score_function``, no baseline and with a
``moving_average`` baseline), ``TraceGraph_ELBO`` (the site unannotated) and ``Trace_ELBO`` (the
whole cost), and prints the variances and their ratios to TraceGraph's.

    OMP_NUM_THREADS=1 python scripts/rb_variance.py --draws 1000

Then the same for ``surrogate_loss`` on ``branches`` and ``chain`` written as cost-returning
programs (the sites annotated ``score_function``, cost ``-log p(x, z) + log q(z)`` with ``log q``
held fixed): the variance of ``a``'s gradient with named cost terms (one per observation and
latent site) and with their sum returned as one tensor, as ratios to TraceGraph's above.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from stochgrad.estimators import get
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.surrogate import surrogate_loss

DATA = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.0, 1.0])


def branches(infer):
    def model():
        z1 = pyro.sample("z1", dist.Bernoulli(0.4))
        z2 = pyro.sample("z2", dist.Bernoulli(0.6))
        pyro.sample("x1", dist.Normal(3.0 * z1, 1.0), obs=torch.tensor(2.0))
        pyro.sample("x2", dist.Normal(-2.0 * z2, 1.0), obs=torch.tensor(-1.0))

    def guide():
        pyro.sample("z1", dist.Bernoulli(logits=pyro.param("a", torch.tensor(0.3))), infer=infer)
        pyro.sample("z2", dist.Bernoulli(logits=pyro.param("b", torch.tensor(-0.2))), infer=infer)

    return model, guide


def chain(infer):
    def model():
        z1 = pyro.sample("z1", dist.Bernoulli(0.4))
        z2 = pyro.sample("z2", dist.Bernoulli(0.2 + 0.6 * z1))
        pyro.sample("x", dist.Normal(2.0 * z2 - z1, 1.0), obs=torch.tensor(1.0))

    def guide():
        a = pyro.param("a", torch.tensor(0.3))
        z1 = pyro.sample("z1", dist.Bernoulli(logits=a), infer=infer)
        pyro.sample(
            "z2", dist.Bernoulli(logits=pyro.param("b", torch.tensor(-0.2)) + z1), infer=infer
        )

    return model, guide


def hierarchical(infer):
    """Bernoulli switch over a Normal mean, six observations in a plate."""

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        mu = pyro.sample("mu", dist.Normal(2.0 * z - 1.0, 1.0))
        with pyro.plate("data", 6):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=DATA)

    def guide():
        z = pyro.sample("z", dist.Bernoulli(logits=pyro.param("a", torch.tensor(0.1))), infer=infer)
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.3)) + z, 0.7))

    return model, guide


def nested(infer):
    """Per-group and per-member Bernoulli latents in nested plates."""
    x = DATA.reshape(2, 3)

    def model():
        with pyro.plate("groups", 2, dim=-2):
            g = pyro.sample("g", dist.Bernoulli(0.5))
            with pyro.plate("members", 3, dim=-1):
                h = pyro.sample("h", dist.Bernoulli(0.3 + 0.4 * g))
                pyro.sample("x", dist.Normal(2.0 * h - g, 1.0), obs=x)

    def guide():
        a = pyro.param("a", torch.zeros(2, 1))
        with pyro.plate("groups", 2, dim=-2):
            g = pyro.sample("g", dist.Bernoulli(logits=a), infer=infer)
            with pyro.plate("members", 3, dim=-1):
                b = pyro.param("b", torch.zeros(2, 3))
                pyro.sample("h", dist.Bernoulli(logits=b + g), infer=infer)

    return model, guide


MODELS = {"branches": branches, "chain": chain, "hierarchical": hierarchical, "nested": nested}


def grads(build, infer, elbo, draws, seed):
    pyro.clear_param_store()
    model, guide = build(infer)
    pyro.set_rng_seed(seed)
    out = []
    for _ in range(draws):
        for p in pyro.get_param_store().values():
            p.grad = None
        elbo.loss_and_grads(model, guide)
        a = dict(pyro.get_param_store().named_parameters())["a"]
        out.append(a.grad.detach().reshape(-1).clone())
    return torch.stack(out)


def _lp(d, value):
    return d.log_prob(value)


def surrogate_branches(n, named):
    """``branches`` as a program: ``n`` independent draws in a plate, ``-ELBO`` per draw."""
    a = torch.full((n,), 0.3, requires_grad=True)
    b = torch.full((n,), -0.2, requires_grad=True)
    sf = {"estimator": "score_function"}

    def program():
        with pyro.plate("draws", n):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=a), infer=sf)
            z2 = pyro.sample("z2", dist.Bernoulli(logits=b), infer=sf)
            terms = {
                "z1": _lp(dist.Bernoulli(logits=a.detach()), z1) - _lp(dist.Bernoulli(0.4), z1),
                "z2": _lp(dist.Bernoulli(logits=b.detach()), z2) - _lp(dist.Bernoulli(0.6), z2),
                "x1": -_lp(dist.Normal(3.0 * z1, 1.0), torch.tensor(2.0)),
                "x2": -_lp(dist.Normal(-2.0 * z2, 1.0), torch.tensor(-1.0)),
            }
            return terms if named else sum(terms.values())

    return program, a


def surrogate_chain(n, named):
    a = torch.full((n,), 0.3, requires_grad=True)
    b = torch.full((n,), -0.2, requires_grad=True)
    sf = {"estimator": "score_function"}

    def program():
        with pyro.plate("draws", n):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=a), infer=sf)
            z2 = pyro.sample("z2", dist.Bernoulli(logits=b + z1), infer=sf)
            terms = {
                "z1": _lp(dist.Bernoulli(logits=a.detach()), z1) - _lp(dist.Bernoulli(0.4), z1),
                "z2": _lp(dist.Bernoulli(logits=(b + z1).detach()), z2)
                - _lp(dist.Bernoulli(0.2 + 0.6 * z1), z2),
                "x": -_lp(dist.Normal(2.0 * z2 - z1, 1.0), torch.tensor(1.0)),
            }
            return terms if named else sum(terms.values())

    return program, a


SURROGATES = {"branches": surrogate_branches, "chain": surrogate_chain}


def surrogate_grads(name, named, draws, seed):
    program, a = SURROGATES[name](draws, named)
    pyro.set_rng_seed(seed)
    surrogate_loss(program).backward()
    assert a.grad is not None
    return a.grad.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    sf = {"estimator": "score_function"}
    print(f"{'model':<13}{'var TG':>10}{'ann/TG':>9}{'ann+MA/TG':>11}{'whole/TG':>10}  (param a)")
    tg_var: dict[str, float] = {}
    for name in args.models:
        build = MODELS[name]
        mp = {"nested": 2, "hierarchical": 1}.get(name, 0)
        tg = grads(build, {}, TraceGraph_ELBO(max_plate_nesting=mp), args.draws, args.seed)
        an = grads(build, sf, EstimatorELBO(max_plate_nesting=mp), args.draws, args.seed + 1)
        ma = {"estimator": get("score_function", baseline="moving_average")}
        bm = grads(build, ma, EstimatorELBO(max_plate_nesting=mp), args.draws, args.seed + 2)
        wh = grads(build, {}, Trace_ELBO(max_plate_nesting=mp), args.draws, args.seed + 3)
        v = tg.var(0).sum().item()
        ra, rb, rw = (g.var(0).sum().item() / v for g in (an, bm, wh))
        print(f"{name:<13}{v:>10.4f}{ra:>9.3f}{rb:>11.3f}{rw:>10.2f}")
        tg_var[name] = v
    if not set(SURROGATES) & set(args.models):
        return
    print(f"\nsurrogate_loss{'named/TG':>12}{'one/TG':>9}{'named/one':>11}  (param a)")
    for name in SURROGATES:
        if name not in tg_var:
            continue
        named = surrogate_grads(name, True, args.draws, args.seed + 4).var().item()
        one = surrogate_grads(name, False, args.draws, args.seed + 5).var().item()
        v = tg_var[name]
        print(f"{name:<14}{named / v:>12.3f}{one / v:>9.2f}{named / one:>11.4f}")


if __name__ == "__main__":
    main()
