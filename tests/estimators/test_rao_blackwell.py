"""Downstream cost crediting at annotated sites: exact agreement with ``TraceGraph_ELBO``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
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


# ---------------------------------------------------------------------------------------------
# Statistics: variance against TraceGraph_ELBO and Trace_ELBO, unbiasedness per baseline
# ---------------------------------------------------------------------------------------------

PARAMS = ("a1", "a2")


def _configured(build, infer):
    """``build``'s model and guide with both guide sites annotated ``infer`` (``{}``: none)."""
    model, _ = build(False)

    def guide():
        if build is branches:
            pyro.sample("z1", dist.Bernoulli(logits=_p("a1", 0.3)), infer=infer)
            pyro.sample("z2", dist.Bernoulli(logits=_p("a2", -0.2)), infer=infer)
        else:
            z1 = pyro.sample("z1", dist.Bernoulli(logits=_p("a1", 0.3)), infer=infer)
            pyro.sample("z2", dist.Bernoulli(logits=_p("a2", -0.2) + z1), infer=infer)

    return model, guide


def _draws(build, infer, elbo, n, seed):
    """``n`` successive gradients of ``(a1, a2)`` (stateful baselines carry over), ``(n, 2)``."""
    pyro.clear_param_store()
    model, guide = _configured(build, infer)
    pyro.set_rng_seed(seed)
    out = []
    for _ in range(n):
        for p in pyro.get_param_store().values():
            p.grad = None
        elbo.loss_and_grads(model, guide)
        store = dict(pyro.get_param_store().named_parameters())
        out.append(torch.stack([store[k].grad.detach().clone() for k in PARAMS]))
    return torch.stack(out).double()


def _exact_grad(build):
    """``d(-ELBO)/d(a1, a2)`` in closed form: the sum over the four joint values of the guide."""
    pyro.clear_param_store()
    model, guide = _configured(build, {})
    total = torch.zeros((), dtype=torch.float64)
    for v1 in (0.0, 1.0):
        for v2 in (0.0, 1.0):
            values = {"z1": torch.tensor(v1), "z2": torch.tensor(v2)}
            gt = poutine.trace(poutine.condition(guide, values)).get_trace()
            mt = poutine.trace(poutine.condition(model, values)).get_trace()
            log_q, log_p = gt.log_prob_sum(), mt.log_prob_sum()
            total = total - log_q.exp().double() * (log_p - log_q).double()
    store = dict(pyro.get_param_store().named_parameters())
    return torch.stack(torch.autograd.grad(total, [store[k] for k in PARAMS]))


def _variance_below(small, large, factor, alpha):
    """One-sided test of ``var(small) * factor < var(large)`` per column, rejection at ``alpha``.

    The statistic is ``log(var(large) / (factor var(small)))`` over its standard error
    ``sqrt((k_s - 1)/n_s + (k_l - 1)/n_l)``, ``k`` the sample kurtosis: the large-sample
    distribution of a log variance ratio (Box 1953; Layard 1973). For normal draws ``k = 3`` and
    it is the normal limit of the F-test on ``var(large) / var(small)``; the kurtosis term keeps
    the false-alarm rate for the skewed two-point mixtures a Bernoulli score gives.
    Returns ``(z, critical, ratio var(small)/var(large))``.
    """
    from scipy import stats

    def log_var_and_k(x):
        c = x - x.mean(0)
        m2, m4 = c.pow(2).mean(0), c.pow(4).mean(0)
        return x.var(0).log(), m4 / m2.pow(2), x.shape[0]

    ls, ks, ns = log_var_and_k(small)
    ll, kl, nl = log_var_and_k(large)
    z = (ll - ls - math.log(factor)) / ((ks - 1) / ns + (kl - 1) / nl).sqrt()
    return z, float(stats.norm.isf(alpha)), (ls - ll).exp()


VAR_DRAWS = 2000
# stated factors by which the whole cost's variance exceeds the optimal baseline's, at least
WHOLE = {"branches": 100.0, "chain": 2.0}
# 2 models x (2 baselines against TraceGraph + 1 against Trace_ELBO), one column (a1) each
VAR_TESTS = 6


@pytest.mark.slow
@pytest.mark.statistical
@pytest.mark.parametrize("build", [branches, chain])
def test_baseline_variance_below_tracegraph_and_whole_cost(build, stat):
    """``a1``'s gradient (site ``z1``) annotated ``score_function`` with a ``moving_average``
    or ``optimal`` baseline has a lower variance than ``TraceGraph_ELBO`` without baseline, and
    at least ``WHOLE`` times lower than ``Trace_ELBO``'s (the whole cost). Family-wise
    false-alarm rate ``FALSE_ALARM`` (Bonferroni over the six tests of both models)."""
    from stochgrad.estimators import get

    alpha = stat.FALSE_ALARM / VAR_TESTS
    tg = _draws(build, {}, TraceGraph_ELBO(), VAR_DRAWS, 101)[:, 0]
    whole = _draws(build, {}, Trace_ELBO(), VAR_DRAWS, 102)[:, 0]
    for seed, baseline in ((103, "moving_average"), (104, "optimal")):
        infer = {"estimator": get("score_function", baseline=baseline)}
        ann = _draws(build, infer, EstimatorELBO(), VAR_DRAWS, seed)[:, 0]
        z, crit, ratio = _variance_below(ann, tg, 1.0, alpha)
        assert z > crit, f"{baseline}: var/var_TG = {ratio:.3f}, z = {z:.2f} <= {crit:.2f}"
        if baseline == "optimal":
            factor = WHOLE[build.__name__]
            z, crit, ratio = _variance_below(ann, whole, factor, alpha)
            assert z > crit, f"var/var_whole = {ratio:.3f}, need < 1/{factor}, z = {z:.2f}"


@pytest.mark.slow
@pytest.mark.statistical
@pytest.mark.parametrize("build", [branches, chain])
@pytest.mark.parametrize("baseline", ["none", "moving_average", "optimal", "leave_one_out"])
def test_annotated_gradient_unbiased(build, baseline, stat):
    """The mean of ``(a1, a2)``'s gradients equals the closed-form gradient, per baseline
    (``leave_one_out`` with two particles): Bonferroni z-tests over both coordinates and the
    eight cases, family-wise false-alarm rate ``FALSE_ALARM``."""
    from stochgrad.estimators import get

    infer = {"estimator": get("score_function", baseline=baseline)}
    particles = 2 if baseline == "leave_one_out" else 1
    seed = 200 + 10 * ["none", "moving_average", "optimal", "leave_one_out"].index(baseline)
    g = _draws(build, infer, EstimatorELBO(num_particles=particles), 3000, seed)
    stat.assert_unbiased(g, _exact_grad(build), stat.FALSE_ALARM / 8)
