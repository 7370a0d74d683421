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


# ---------------------------------------------------------------------------------------------
# Exact agreement with TraceGraph_ELBO: subsampled plate, masked site, model-only site
# ---------------------------------------------------------------------------------------------

FULL = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.0, 1.0, -0.5, 0.8])


def subsampled(annotate):
    """Eight data points, a plate subsampling three: every term is scaled by 8 / 3."""
    infer = ANN if annotate else {}

    def model():
        with pyro.plate("data", 8, subsample_size=3) as i:
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(3)))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=FULL[i])

    def guide():
        a = _p("a", [0.1, -0.3, 0.5, 0.2, -0.1, 0.4, -0.6, 0.0])
        with pyro.plate("data", 8, subsample_size=3) as i:
            pyro.sample("z", dist.Bernoulli(logits=a[i]), infer=infer)

    return model, guide


MASK = torch.tensor([True, False, True, True, False])


def masked(annotate):
    """Two of five units masked: their own log-density terms leave the ELBO, but their values
    still reach ``x``, whose terms are credited to them (as by ``TraceGraph_ELBO``)."""
    infer = ANN if annotate else {}

    def model():
        with pyro.plate("data", 5):
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(5)).mask(MASK))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=DATA)

    def guide():
        a = _p("a", [0.1, -0.3, 0.5, 0.2, -0.1])
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Bernoulli(logits=a).mask(MASK), infer=infer)

    return model, guide


@pytest.mark.parametrize("build", [subsampled, masked])
@pytest.mark.parametrize("seed", range(4))
def test_subsampled_and_masked_equal_tracegraph(build, seed):
    loss_a, ga = _grads(build, True, seed, EstimatorELBO())
    loss_t, gt = _grads(build, False, seed, TraceGraph_ELBO())
    assert loss_a == pytest.approx(loss_t, rel=1e-6)
    assert ga.keys() == gt.keys() == {"a"}
    torch.testing.assert_close(ga["a"], gt["a"], rtol=1e-6, atol=1e-7)


def prior_switch(where, drawn):
    """A switch ``z ~ Bernoulli(sigmoid(c))`` and an observation depending on it.

    ``where="model"``: ``z`` is a model-only site annotated in the model (the guide is empty);
    ``where="guide"``: the guide samples ``z`` from the same prior, unannotated. Each value
    the model sees is appended to ``drawn``.
    """

    def model():
        c = _p("c", 0.4)
        z = pyro.sample("z", dist.Bernoulli(logits=c), infer=ANN if where == "model" else {})
        drawn.append(z.detach().clone())
        pyro.sample("x", dist.Normal(3.0 * z - 1.0, 1.0), obs=torch.tensor(1.2))

    def guide():
        if where == "guide":
            pyro.sample("z", dist.Bernoulli(logits=_p("c", 0.4)))

    return model, guide


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
@pytest.mark.parametrize("seed", range(4))
def test_model_only_site_equals_tracegraph_with_prior_guide(seed):
    """``TraceGraph_ELBO`` itself has no score term for a model-only site (its gradient of
    ``c`` is ``d log p(z)/dc`` alone, biased), so it is compared on the equivalent program in
    which the guide samples ``z`` from the prior, replayed at the value the annotated run drew.
    There the two differ by one exact, zero-mean term: ``TraceGraph_ELBO`` differentiates the
    model's ``log p_c(z)`` pathwise but not the guide's ``log q_c(z)`` (Pyro's entropy term of
    a non-reparameterised site is zero), so its loss gradient holds the extra
    ``-d log p_c(z)/dc = -(z - sigmoid(c))``; the model-only site cancels the pair exactly.
    (Replaying the model-only site itself would replace its value from outside, and the
    annotation would rightly no longer apply.)"""
    drawn: list = []
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss_a = EstimatorELBO().loss_and_grads(*prior_switch("model", drawn))
    ga = dict(pyro.get_param_store().named_parameters())["c"].grad.clone()

    pyro.clear_param_store()
    model, guide = prior_switch("guide", [])
    guide = poutine.replay(guide, trace=_value_trace({"z": drawn[0]}))
    loss_t = TraceGraph_ELBO().loss_and_grads(model, guide)
    gt = dict(pyro.get_param_store().named_parameters())["c"].grad.clone()
    assert len(drawn) == 1
    assert loss_a == pytest.approx(loss_t, rel=1e-6)
    assert ga.abs() > 0
    extra = -(drawn[0] - torch.sigmoid(torch.tensor(0.4)))
    torch.testing.assert_close(ga, gt - extra, rtol=1e-6, atol=1e-7)


def _value_trace(values):
    """A trace holding the given latent values (for ``poutine.replay``)."""

    def program():
        for name in values:
            pyro.sample(name, dist.Bernoulli(0.5))

    tr = poutine.trace(program).get_trace()
    for name, v in values.items():
        tr.nodes[name]["value"] = v
    return tr
