"""Downstream cost crediting at annotated sites: exact agreement with ``TraceGraph_ELBO``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceGraph_ELBO
from torch.distributions import constraints

from stochgrad.estimators.elbo import EstimatorELBO

ANN = {"estimator": "score_function"}


def _p(name, init):
    return pyro.param(name, torch.tensor(init))


def branches(annotate):
    infer = ANN if annotate else {}

    def model():
        z1 = pyro.sample("z1", dist.Bernoulli(0.4))
        z2 = pyro.sample("z2", dist.Bernoulli(0.6))
        pyro.sample("x1", dist.Normal(3.0 * z1, 1.0), obs=torch.tensor(2.0))
        pyro.sample("x2", dist.Normal(-2.0 * z2, 1.0), obs=torch.tensor(-1.0))

    def guide():
        pyro.sample("z1", dist.Bernoulli(logits=_p("a1", 0.3)), infer=infer)
        pyro.sample("z2", dist.Bernoulli(logits=_p("a2", -0.2)), infer=infer)

    return model, guide


def chain(annotate):
    infer = ANN if annotate else {}

    def model():
        z1 = pyro.sample("z1", dist.Bernoulli(0.4))
        z2 = pyro.sample("z2", dist.Bernoulli(0.2 + 0.6 * z1))
        pyro.sample("x", dist.Normal(2.0 * z2 - z1, 1.0), obs=torch.tensor(1.0))

    def guide():
        z1 = pyro.sample("z1", dist.Bernoulli(logits=_p("a1", 0.3)), infer=infer)
        pyro.sample("z2", dist.Bernoulli(logits=_p("a2", -0.2) + z1), infer=infer)

    return model, guide


DATA = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.0])


def plated(annotate):
    infer = ANN if annotate else {}

    def model():
        with pyro.plate("data", 5):
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(5)))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=DATA)

    def guide():
        a = _p("a", [0.1, -0.3, 0.5, 0.2, -0.1])
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Bernoulli(logits=a), infer=infer)

    return model, guide


def then_normal(annotate):
    infer = ANN if annotate else {}

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        y = pyro.sample("y", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(y, 0.5), obs=torch.tensor(0.7))

    def guide():
        z = pyro.sample("z", dist.Bernoulli(logits=_p("a", 0.2)), infer=infer)
        s = pyro.param("s", torch.tensor(0.8), constraint=constraints.positive)
        pyro.sample("y", dist.Normal(_p("m", 0.1) + z, s))

    return model, guide


def _grads(build, annotate, seed, elbo):
    """Loss and gradients on the guide replayed against a trace drawn with ``seed``."""
    pyro.clear_param_store()
    model, guide = build(annotate)
    pyro.set_rng_seed(seed)
    fixed = poutine.trace(build(False)[1]).get_trace()
    guide = poutine.replay(guide, trace=fixed)
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide)
    params = dict(pyro.get_param_store().named_parameters())
    return loss, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("build", [branches, chain, plated, then_normal])
@pytest.mark.parametrize("seed", range(6))
def test_annotated_score_function_equals_tracegraph(build, seed):
    loss_a, ga = _grads(build, True, seed, EstimatorELBO())
    loss_t, gt = _grads(build, False, seed, TraceGraph_ELBO())
    assert loss_a == pytest.approx(loss_t, rel=1e-6)
    assert ga.keys() == gt.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gt[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("build", [branches, chain])
def test_particles_equal_tracegraph(build):
    for kw in ({"num_particles": 3},):
        loss_a, ga = _grads(build, True, 5, EstimatorELBO(**kw))
        loss_t, gt = _grads(build, False, 5, TraceGraph_ELBO(**kw))
        assert loss_a == pytest.approx(loss_t, rel=1e-6)
        for n in ga:
            torch.testing.assert_close(ga[n], gt[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_particles": 4}, {"num_particles": 4, "vectorize_particles": True}],
)
def test_other_branch_cost_not_credited(kw):
    """In two independent branches, changing one branch's observation leaves the other site's
    gradient unchanged (its credited cost holds no term of the other branch)."""

    def run(obs2):
        pyro.clear_param_store()
        _, guide = branches(True)

        def model():
            z1 = pyro.sample("z1", dist.Bernoulli(0.4))
            z2 = pyro.sample("z2", dist.Bernoulli(0.6))
            pyro.sample("x1", dist.Normal(3.0 * z1, 1.0), obs=torch.tensor(2.0))
            pyro.sample("x2", dist.Normal(-2.0 * z2, 1.0), obs=torch.tensor(obs2))

        pyro.set_rng_seed(1)
        EstimatorELBO(max_plate_nesting=0, **kw).loss_and_grads(model, guide)
        return dict(pyro.get_param_store().named_parameters())["a1"].grad.clone()

    g1, g2 = run(-1.0), run(5.0)
    assert g1.abs().sum() > 0
    assert torch.equal(g1, g2)
