"""Categorical units in the batched core: the inverse-CDF sampler, errors, and score_function.

Statistical tests fix their seeds; family-wise false-alarm rate ``FALSE_ALARM`` = 1e-4 per
test (two-sided per-coordinate z-tests, Bonferroni over coordinates and baselines).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from stochgrad import models
from stochgrad.estimators import registry
from stochgrad.estimators.base import hard_sample, site_units
from stochgrad.estimators.distributions import BERNOULLI, CATEGORICAL

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


def test_optimal_baseline_refuses_categorical_units_clearly():
    with pytest.raises(TypeError, match="baseline='optimal'.*Categorical"):
        registry.get("score_function", baseline="optimal").estimate(toy(), 10, seed=0)


def test_nonfinite_categorical_logits_are_refused():
    logits = torch.tensor(THETA, dtype=F64)
    logits[1, 2] = float("inf")
    fn = torch.distributions.Categorical(logits=logits, validate_args=False)
    with pytest.raises(ValueError, match="site 'k'.*not finite"):
        CATEGORICAL.logits("k", fn, fn)


SF_BASELINES = ["none", "moving_average", "leave_one_out", "learned"]


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
