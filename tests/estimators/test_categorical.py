"""Categorical units in the batched core: the inverse-CDF sampler, errors, and score_function.

Statistical tests fix their seeds; family-wise false-alarm rate ``FALSE_ALARM`` = 1e-4 per
test (two-sided per-coordinate z-tests, Bonferroni over coordinates and baselines).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from scipy.stats import norm

from stochgrad import models
from stochgrad.estimators import registry
from stochgrad.estimators.base import hard_sample, site_units
from stochgrad.estimators.distributions import BERNOULLI, CATEGORICAL, ONE_HOT_CATEGORICAL
from stochgrad.estimators.elbo import EstimatorELBO

F64 = torch.float64
FALSE_ALARM = 1e-4
THETA = [[0.3, -1.2, 0.8, 0.0], [1.5, 0.2, -0.4, -2.0], [-0.7, 0.9, 0.1, 0.5]]


def toy(**kw):
    return models.get("toy_categorical", units=3, categories=4, logits=THETA, dtype=F64, **kw)


def test_categorical_sample_is_the_inverse_cdf():
    logits = torch.tensor(THETA, dtype=F64)  # (3, 4)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    n = 10_000
    u = ((torch.arange(n, dtype=F64) + 0.5) / n).unsqueeze(1).expand(n, 3)
    k = CATEGORICAL.sample(logits.expand(n, 3, 4), u)  # (n, 3)
    for i in range(3):
        want = torch.searchsorted(cdf[i].contiguous(), u[:, i].contiguous(), right=True)
        assert torch.equal(k[:, i].long(), want.clamp_max(3))
        # a grid of n uniforms gives each category its probability to within 1/n
        freq = torch.bincount(k[:, i].long(), minlength=4).to(F64) / n
        assert (freq - torch.softmax(logits[i], -1)).abs().max() <= 1.0 / n
    # u just below 1 gives the last category, u = 0 the first
    edge = CATEGORICAL.sample(logits, torch.tensor([0.0, 1 - 1e-16, 0.5], dtype=F64))
    assert edge[0] == 0 and edge[1] == 3


def test_categorical_log_prob_matches_torch():
    logits = torch.tensor(THETA, dtype=F64)
    value = torch.tensor([2.0, 0.0, 3.0], dtype=F64)
    want = torch.distributions.Categorical(logits=logits).log_prob(value.long())
    torch.testing.assert_close(CATEGORICAL.log_prob(logits, value), want, rtol=0, atol=1e-15)


def test_bernoulli_kind_is_bit_identical_to_hard_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 7, generator=g)
    u = torch.rand(100, 7, generator=g)
    assert torch.equal(BERNOULLI.sample(logits, u), hard_sample(logits, u))
    want = torch.distributions.Bernoulli(logits=logits).log_prob(BERNOULLI.sample(logits, u))
    torch.testing.assert_close(BERNOULLI.log_prob(logits, BERNOULLI.sample(logits, u)), want)


def test_site_units_of_a_categorical_site():
    assert site_units(toy()) == {"k": torch.Size([3])}


def test_estimator_without_categorical_support_names_site_distribution_and_alternatives():
    with pytest.raises(TypeError) as e:
        registry.get("straight_through").estimate(toy(), 10, seed=0)
    msg = str(e.value)
    for part in ("'k'", "Categorical", "'straight_through'", "score_function"):
        assert part in msg
    assert "probe" not in msg


def test_optimal_oracle_baseline_at_categorical_units_by_enumeration():
    """``b_i = E[||e_k - p_i||^2 L] / E[||e_k - p_i||^2]``: the units are independent, so per
    unit ``sum_k p_ik s_ik^2 (c_ik + rest_i) / sum_k p_ik s_ik^2`` with ``rest_i`` the other
    units' expected cost."""
    from stochgrad.estimators.score_function import oracle_optimal_baseline

    obj = toy()
    c = obj.costs  # (units, categories)
    p = torch.softmax(torch.tensor(THETA, dtype=F64), -1)  # (3, 4)
    mean = (p * c).sum(-1)  # (3,)
    sq = 1 - 2 * p + (p * p).sum(-1, keepdim=True)  # ||e_k - p||^2, (3, 4)
    rest = mean.sum() - mean
    want = (p * sq * (c + rest.unsqueeze(-1))).sum(-1) / (p * sq).sum(-1)
    got = oracle_optimal_baseline(obj)["k"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_optimal_baseline_with_two_categories_is_eq10():
    """With K = 2, ``||e_k - p||^2 = 2 (h - p_1)^2``: the same baseline as Eq. 10 on the
    Bernoulli toy with logits a_1 - a_0, so the same numbers for the logit difference."""
    from stochgrad.estimators.score_function import oracle_optimal_baseline

    theta = [[0.0, 0.4], [0.0, -1.1], [0.0, 2.0]]
    cat = models.get("toy_categorical", units=3, categories=2, logits=theta, dtype=F64)
    c = cat.costs
    b_cat = oracle_optimal_baseline(cat)["k"]
    # the Bernoulli toy's cost (b - t)^2 is affine in b: c_0 + b (c_1 - c_0) per unit
    p1 = torch.sigmoid(torch.tensor([0.4, -1.1, 2.0], dtype=F64))
    sq = (1 - p1) ** 2 * p1 + p1**2 * (1 - p1)  # E[(h - p)^2]
    e_c = (1 - p1) * c[:, 0] + p1 * c[:, 1]
    rest = e_c.sum() - e_c
    num = (1 - p1) * p1**2 * (c[:, 0] + rest) + p1 * (1 - p1) ** 2 * (c[:, 1] + rest)
    torch.testing.assert_close(b_cat, num / sq, rtol=1e-12, atol=1e-14)


def test_nonfinite_categorical_logits_are_refused():
    logits = torch.tensor(THETA, dtype=F64)
    logits[1, 2] = float("inf")
    fn = torch.distributions.Categorical(logits=logits, validate_args=False)
    with pytest.raises(ValueError, match="site 'k'.*not finite"):
        CATEGORICAL.logits("k", fn, fn)


SF_BASELINES = ["none", "moving_average", "leave_one_out", "learned", "optimal"]


@pytest.mark.statistical
def test_score_function_is_unbiased_on_toy_categorical():
    obj = toy()
    exact = obj.exact_grad()["logits"]
    draws = 40_000
    crit = norm.isf(FALSE_ALARM / (2 * exact.numel() * len(SF_BASELINES)))
    for i, baseline in enumerate(SF_BASELINES):
        g = registry.get("score_function", baseline=baseline).estimate(obj, draws, seed=10 + i)
        g = g["logits"]
        z = (g.mean(0) - exact) / (g.std(0) / draws**0.5)
        assert z.abs().max() < crit, (baseline, z)
        if baseline == "none":
            # power: the same z-test rejects a target off by 10% in the largest coordinate
            off = exact.clone()
            j = exact.abs().argmax()
            off.view(-1)[j] *= 1.1
            z_off = (g.mean(0) - off) / (g.std(0) / draws**0.5)
            assert z_off.abs().max() > crit


# ---------------------------------------------------------------------------------------------
# At a Pyro site: EstimatorELBO against TraceEnum_ELBO
# ---------------------------------------------------------------------------------------------

PRIOR_C = torch.tensor([0.4, -0.7, 0.1, 0.9], dtype=F64)
Q_C = torch.tensor([-0.5, 0.3, 0.8, -1.1], dtype=F64)
W_C = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=F64)
X_C, LOC_C = 1.3, 0.9
PYRO_NAMES = ["prior", "loc", "q"]


def cat_model(n):
    def model():
        prior = pyro.param("prior", PRIOR_C.expand(n, 4).clone())
        loc = pyro.param("loc", torch.full((n,), LOC_C, dtype=F64))
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.Categorical(logits=prior))
            mean = loc * W_C[z.long()]
            pyro.sample("x", dist.Normal(mean, 1.0), obs=torch.full((n,), X_C, dtype=F64))

    return model


def cat_guide(n, infer):
    def guide():
        q = pyro.param("q", Q_C.expand(n, 4).clone())
        with pyro.plate("draws", n):
            pyro.sample("z", dist.Categorical(logits=q), infer=dict(infer))

    return guide


def cat_grads(elbo, n, infer, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo.loss_and_grads(cat_model(n), cat_guide(n, infer))
    ps = pyro.get_param_store()
    g = [ps[k].grad.detach().reshape(n, -1) for k in PYRO_NAMES]
    pyro.clear_param_store()
    return torch.cat(g, dim=-1)  # (n, 9): one draw per plate element


def cat_grads_after(elbo, n, infer, seed, calls):
    """The per-draw gradients of the last of ``calls`` ELBO steps (stateful baselines carry
    their state from the earlier ones; nothing is updated in between)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    for _ in range(calls):
        for v in pyro.get_param_store().values():
            v.grad = None
        elbo.loss_and_grads(cat_model(n), cat_guide(n, infer))
    ps = pyro.get_param_store()
    g = [ps[k].grad.detach().reshape(n, -1) for k in PYRO_NAMES]
    pyro.clear_param_store()
    return torch.cat(g, dim=-1)


STATEFUL = ["moving_average", "optimal", "learned"]


@pytest.mark.statistical
@pytest.mark.parametrize("baseline", STATEFUL)
def test_stateful_baselines_at_a_categorical_pyro_site_are_unbiased(baseline, stat):
    """The third step of each stateful baseline (its state built on the first two) against
    TraceEnum_ELBO; Bonferroni over the 9 coordinates and the 3 baselines."""
    exact = trace_enum_grad()
    est = registry.get("score_function", baseline=baseline)
    g = cat_grads_after(
        EstimatorELBO(), 40_000, {"estimator": est}, 20 + STATEFUL.index(baseline), 3
    )
    stat.assert_unbiased(g, exact, stat.FALSE_ALARM / len(STATEFUL))


def trace_enum_grad() -> torch.Tensor:
    return cat_grads(TraceEnum_ELBO(max_plate_nesting=1), 1, {"enumerate": "parallel"})[0]


@pytest.mark.statistical
def test_score_function_at_a_categorical_pyro_site_is_unbiased(stat):
    exact = trace_enum_grad()
    est = registry.get("score_function")
    g = cat_grads(EstimatorELBO(), 40_000, {"estimator": est}, seed=3)
    stat.assert_unbiased(g, exact)
    # power: the same test rejects a target 10% off in the largest coordinate
    off = exact.clone()
    off[exact.abs().argmax()] *= 1.1
    assert stat.z_test(g, off).rejects


def test_a_categorical_pyro_site_refuses_a_bernoulli_only_estimator():
    with pytest.raises(TypeError, match="'z'.*Categorical.*score_function"):
        cat_grads(EstimatorELBO(), 2, {"estimator": "straight_through"})


# ---------------------------------------------------------------------------------------------
# exact: enumeration over categories
# ---------------------------------------------------------------------------------------------


def test_exact_enumerates_categories_in_the_batched_core():
    obj = toy()
    g = registry.get("exact").estimate(obj, 3, seed=0)["logits"]
    for row in g:
        torch.testing.assert_close(row, obj.exact_grad()["logits"], rtol=1e-12, atol=1e-14)


def test_exact_mixed_radix_digits_cover_every_configuration_once():
    from stochgrad.estimators.exact import digits

    d = digits(2 * 3 * 4, [2, 3, 4], "cpu", F64)
    assert len({tuple(r.tolist()) for r in d}) == 24
    assert d[:, 0].max() == 1 and d[:, 1].max() == 2 and d[:, 2].max() == 3


def test_exact_refuses_too_many_categorical_configurations():
    obj = models.get("toy_categorical", units=11, categories=4)  # 4^11 = 2^22 > 2^20
    with pytest.raises(ValueError, match="4194304 joint configurations.*2\\^20"):
        registry.get("exact").estimate(obj, 1, seed=0)


def test_exact_at_a_categorical_pyro_site_equals_trace_enum_elbo():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss_p = TraceEnum_ELBO(max_plate_nesting=1).loss(
        cat_model(3), cat_guide(3, {"enumerate": "parallel"})
    )
    want = cat_grads(TraceEnum_ELBO(max_plate_nesting=1), 3, {"enumerate": "parallel"})
    got = cat_grads(EstimatorELBO(), 3, {"estimator": "exact"})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    pyro.set_rng_seed(0)
    loss_o = EstimatorELBO().loss(cat_model(3), cat_guide(3, {"estimator": "exact"}))
    assert loss_o == pytest.approx(loss_p, rel=1e-10)
    pyro.clear_param_store()


# ---------------------------------------------------------------------------------------------
# straight_through at OneHotCategorical units: one-hot forward, softmax backward
# ---------------------------------------------------------------------------------------------


class OneHotLinear:
    """``sum_i <h_i, c_i>``, ``h_i ~ OneHot(softmax(theta_i))``: a cost linear in ``h``."""

    def __init__(self):
        self.params = {"logits": torch.tensor(THETA, dtype=F64, requires_grad=True)}
        self.costs = torch.tensor(
            [[0.1, 0.7, -0.3, 0.2], [1.0, 0.0, 0.4, -0.6], [0.3] * 4], dtype=F64
        )
        self.seen: list[torch.Tensor] = []

    def model(self, params):
        theta = params["logits"]
        h = pyro.sample("h", dist.OneHotCategorical(logits=theta).to_event(1))  # (draws, 3, 4)
        self.seen.append(h.detach())
        return (h * self.costs).sum((-1, -2))

    def exact_grad(self):
        p = torch.softmax(self.params["logits"].detach(), -1)
        return p * (self.costs - (p * self.costs).sum(-1, keepdim=True))


def test_one_hot_kind_samples_the_categorical_index():
    logits = torch.tensor(THETA, dtype=F64)
    u = torch.tensor([0.05, 0.5, 0.95], dtype=F64)
    k = CATEGORICAL.sample(logits, u)
    h = ONE_HOT_CATEGORICAL.sample(logits, u)
    assert torch.equal(h.argmax(-1).to(F64), k) and torch.equal(h.sum(-1), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        ONE_HOT_CATEGORICAL.log_prob(logits, h), CATEGORICAL.log_prob(logits, k)
    )


@pytest.mark.parametrize("variant", ["identity", "sigmoid"])
def test_straight_through_one_hot_is_one_hot_forward_softmax_backward(variant):
    obj = OneHotLinear()
    g = registry.get("straight_through", variant=variant).estimate(obj, 500, seed=0)["logits"]
    h = obj.seen[-1]
    assert set(h.unique().tolist()) == {0.0, 1.0} and torch.equal(
        h.sum(-1), torch.ones(500, 3, dtype=F64)
    )
    # linear cost: softmax backward gives J_softmax^T c = the exact gradient, in every draw
    torch.testing.assert_close(g, obj.exact_grad().expand_as(g), rtol=1e-12, atol=1e-14)


def test_straight_through_at_a_one_hot_pyro_site_is_softmax_backward():
    from stochgrad.estimators.surrogate import surrogate_loss

    obj = OneHotLinear()
    theta = obj.params["logits"]
    seen = []

    def program():
        with pyro.plate("units", 3):
            h = pyro.sample(
                "h", dist.OneHotCategorical(logits=theta), infer={"estimator": "straight_through"}
            )
        seen.append(h.detach())
        return (h * obj.costs).sum()

    pyro.set_rng_seed(0)
    (g,) = torch.autograd.grad(surrogate_loss(program), theta)
    h = seen[-1]
    assert set(h.unique().tolist()) == {0.0, 1.0} and torch.equal(
        h.sum(-1), torch.ones(3, dtype=F64)
    )
    torch.testing.assert_close(g, obj.exact_grad(), rtol=1e-12, atol=1e-14)
