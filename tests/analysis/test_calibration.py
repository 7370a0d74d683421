"""Calibration of the bias interval and of the unbiasedness test, over many replications.

Each test uses a fixed seed and R >= 300 replications; a count is accepted when its one-sided
binomial p-value against the stated rate is above 1e-4 (false-alarm rate 1e-4 per test).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as sps

from stochgrad.analysis.stats import summarize

FALSE_ALARM = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.statistical]


def _too_many(count: int, trials: int, rate: float) -> bool:
    return sps.binomtest(count, trials, rate, alternative="greater").pvalue <= FALSE_ALARM


def test_bias_interval_contains_zero_for_unbiased_draws():
    """Unbiased skewed draws, d = 200: bias_l2_lo > 0 in at most 5% of R = 300 replications.

    ``||mean - g*||`` alone is about sqrt(tr(Sigma)/N) here, so an interval around it would
    exclude 0 every time; the debiased estimate stays below the noise floor.
    """
    d, n, R = 200, 1000, 300
    gen = torch.Generator().manual_seed(11)
    excl = 0
    below_floor = 0
    for _ in range(R):
        x = torch.empty(n, d, dtype=torch.float64).exponential_(1.0, generator=gen)
        s = summarize(x, torch.ones(d, dtype=torch.float64))
        excl += s.bias_l2_lo > 0
        below_floor += s.bias_l2 < s.bias_noise_floor
    assert not _too_many(excl, R, 0.05), excl
    assert below_floor == R


def test_bias_interval_covers_a_known_bias():
    """Bias 0.05 on every coordinate (||bias|| = 0.05 sqrt(200)), Gaussian draws: the interval
    misses the truth in at most 5% of R = 300 replications."""
    d, n, R = 200, 2000, 300
    gen = torch.Generator().manual_seed(12)
    truth = 0.05 * math.sqrt(d)
    miss = 0
    for _ in range(R):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.05
        s = summarize(x, torch.zeros(d, dtype=torch.float64))
        miss += not s.bias_l2_lo <= truth <= s.bias_l2_hi
    assert not _too_many(miss, R, 0.05), miss


def test_p_unbiased_valid_for_skewed_bernoulli_draws():
    """Bernoulli(0.05) draws, N = 400, d = 10: P(p_unbiased <= 0.001) at most 0.001 and
    P(p_unbiased <= 0.05) at most 0.05 over R = 600 replications (the plain z-test gives
    about 0.016 and 0.09)."""
    d, n, R = 10, 400, 600
    gen = torch.Generator().manual_seed(13)
    rej_001 = rej_05 = 0
    for _ in range(R):
        x = (torch.rand(n, d, generator=gen, dtype=torch.float64) < 0.05).double()
        p = summarize(x, torch.full((d,), 0.05, dtype=torch.float64)).p_unbiased
        rej_001 += p <= 0.001
        rej_05 += p <= 0.05
    assert not _too_many(rej_001, R, 0.001), rej_001
    assert not _too_many(rej_05, R, 0.05), rej_05


def test_p_unbiased_keeps_power_on_skewed_draws():
    """A bias of 6 standard errors on one of 10 Bernoulli(0.05) coordinates (N = 2000) is
    found (p_unbiased <= 0.05) in at least 80% of R = 300 replications, in either direction."""
    d, n, R = 10, 2000, 300
    gen = torch.Generator().manual_seed(14)
    se = math.sqrt(0.05 * 0.95 / n)
    found = 0
    for i in range(R):
        x = (torch.rand(n, d, generator=gen, dtype=torch.float64) < 0.05).double()
        ref = torch.full((d,), 0.05, dtype=torch.float64)
        ref[2] += (6 if i % 2 else -6) * se
        found += summarize(x, ref).p_unbiased <= 0.05
    assert found >= 0.8 * R, found


def test_score_function_at_an_extreme_logit_is_not_called_biased():
    """Unbiased score function (no baseline) on toy logits -4, dim 200, 5000 draws: over
    R = 300 seeds, P(p_unbiased <= 0.05) at most 0.05 and P(p_unbiased <= 0.01) at most 0.01
    (the plain Bonferroni z-test gives about 0.15 and 0.05), and the bias interval excludes 0
    in at most 5% of seeds."""
    from stochgrad.analysis.compare import make_estimator, make_objective

    obj = make_objective("toy:logits=-4,dim=200")
    est = make_estimator("score_function:baseline=none")
    g = obj.exact_grad()["logits"]
    R = 300
    rej_05 = rej_01 = excl = 0
    for r in range(R):
        s = summarize(est.estimate(obj, 5000, seed=1000 + r)["logits"], g)
        rej_05 += s.p_unbiased <= 0.05
        rej_01 += s.p_unbiased <= 0.01
        excl += s.bias_l2_lo > 0
    assert not _too_many(rej_05, R, 0.05), rej_05
    assert not _too_many(rej_01, R, 0.01), rej_01
    assert not _too_many(excl, R, 0.05), excl


# Heavy-tail check: draws per case, with their true mean and per-coordinate variance.
def _draws(kind: str, n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, float, float]:
    f64 = torch.float64
    if kind == "gauss":
        return torch.randn(n, d, generator=gen, dtype=f64), 0.0, 1.0
    if kind.startswith("bernoulli"):
        p = float(kind.removeprefix("bernoulli"))
        return (torch.rand(n, d, generator=gen, dtype=f64) < p).double(), p, p * (1 - p)
    if kind == "lognormal":
        x = torch.randn(n, d, generator=gen, dtype=f64).exp()
        return x, math.exp(0.5), (math.e - 1) * math.e
    if kind == "t3":  # Student-t, 3 degrees of freedom: N(0,1) / sqrt(chi2_3 / 3)
        z = torch.randn(n, d, generator=gen, dtype=f64)
        chi2 = (torch.randn(n, d, 3, generator=gen, dtype=f64) ** 2).sum(-1)
        return z / (chi2 / 3).sqrt(), 0.0, 3.0
    raise ValueError(kind)


LIGHT = [
    ("gauss", 2000, 1),
    ("gauss", 20000, 1),
    ("bernoulli0.01", 2000, 1),
    ("bernoulli0.01", 20000, 1),
    ("bernoulli0.01", 2000, 10),
    ("bernoulli0.5", 2000, 1),
]
# The last entry says whether R = 300 runs show the raw under-coverage at rate 1e-4: with
# these seeds lognormal misses 8% at N = 20000 (d = 1) and 10% at d = 10, real but too close
# to 5% for 300 runs; 13% at N = 2000 (d = 1) and about 21% for Student-t(3).
HEAVY = [("lognormal", 2000, 1, True), ("lognormal", 20000, 1, False),
         ("lognormal", 2000, 10, False), ("t3", 2000, 1, True), ("t3", 20000, 1, True)]  # fmt: skip


def _replicate(kind: str, n: int, d: int, seed: int, R: int = 300) -> tuple[int, int, int]:
    """(flagged, raw misses, unflagged misses) of the variance and mse intervals over R runs;
    a run misses when either interval misses the true per-coordinate variance."""
    gen = torch.Generator().manual_seed(seed)
    flagged = raw = unflagged = 0
    for _ in range(R):
        x, mu, var = _draws(kind, n, d, gen)
        s = summarize(x, torch.full((d,), mu, dtype=torch.float64))
        miss = not (s.variance_lo <= var <= s.variance_hi and s.mse_lo <= var <= s.mse_hi)
        flagged += s.heavy_tails
        raw += miss
        unflagged += miss and not s.heavy_tails
    return flagged, raw, unflagged


@pytest.mark.parametrize("kind,n,d", LIGHT)
def test_heavy_tail_flag_is_rare_on_light_tails_and_intervals_cover(kind, n, d):
    """Light-tailed draws, R = 300: heavy_tails at most 1% of runs, and the variance and mse
    intervals (level 0.95) miss the true variance in at most 5%."""
    flagged, raw, _ = _replicate(kind, n, d, seed=21 + n + d)
    assert not _too_many(flagged, 300, 0.01), flagged
    assert not _too_many(raw, 300, 0.05), raw


def test_heavy_tail_flag_is_rare_for_the_score_function_at_an_extreme_logit():
    """Score function (no baseline) on toy logits -4, dim 200, 5000 draws: heavy_tails in at
    most 1% of R = 300 seeds (its draws take few values per coordinate)."""
    from stochgrad.analysis.compare import make_estimator, make_objective

    obj = make_objective("toy:logits=-4,dim=200")
    est = make_estimator("score_function:baseline=none")
    g = obj.exact_grad()["logits"]
    flagged = sum(
        summarize(est.estimate(obj, 5000, seed=3000 + r)["logits"], g).heavy_tails
        for r in range(300)
    )
    assert not _too_many(flagged, 300, 0.01), flagged


@pytest.mark.parametrize("kind,n,d,undercovers", HEAVY)
def test_heavy_tails_are_flagged_where_intervals_under_cover(kind, n, d, undercovers):
    """Lognormal(0, 1) and Student-t(3) draws, R = 300: the raw intervals miss the true
    variance in more than 5% of runs (the reason for the flag), heavy_tails is set in at least
    90% of runs, and a miss *without* the flag happens in at most 5%."""
    flagged, raw, unflagged = _replicate(kind, n, d, seed=41 + n + d)
    if undercovers:
        assert sps.binomtest(raw, 300, 0.05, alternative="greater").pvalue <= FALSE_ALARM, raw
    assert sps.binomtest(flagged, 300, 0.9, alternative="less").pvalue > FALSE_ALARM, flagged
    assert not _too_many(unflagged, 300, 0.05), unflagged
