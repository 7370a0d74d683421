"""Statistics on synthetic draws: exact formulas, streaming invariance, interval coverage.

Randomized tests use fixed seeds and state their false-alarm rate (about 1e-4 each).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from stochgrad.analysis.stats import GradientStats, mean_and_se, summarize

FALSE_ALARM = 1e-4


def _hand(x: np.ndarray, g: np.ndarray, r: np.ndarray | None = None) -> dict[str, float]:
    """Every SPEC statistic computed directly, in float64 numpy."""
    n, d = x.shape
    mean = x.mean(0)
    s2 = x.var(0, ddof=1)
    b = mean - g
    norms = np.linalg.norm(x, axis=1)
    cos = np.where(norms > 0, x @ g / np.where(norms > 0, norms, 1) / np.linalg.norm(g), 0.0)
    se2 = s2 / n + (0 if r is None else r**2)
    z = b / np.sqrt(se2)
    m3 = ((x - mean) ** 3).mean(0)
    c = m3 / n**2 / se2**1.5
    w = z + c * z**2 / 3 + c**2 * z**3 / 27 + c / 6
    zmax = np.abs(w).max()  # the corrected statistic, the one p_unbiased comes from
    floor2 = se2.sum()
    bias = math.sqrt(max(0.0, (b * b).sum() - floor2))
    return {
        "bias_l2": bias,
        "bias_noise_floor": math.sqrt(floor2),
        "rel_bias": bias / np.linalg.norm(g),
        "variance": s2.mean(),
        "mse": ((x - g) ** 2).sum(1).mean() / d,
        "cosine": cos.mean(),
        "snr": np.linalg.norm(g) / np.sqrt(d * s2.mean()),
        "z_max": zmax,
        "p_unbiased": min(1.0, d * 2 * sps.norm.sf(np.abs(w).max())),
    }


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_exact_formulas_and_chunk_invariance(chunk):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4)) * [1.0, 2.0, 0.5, 3.0] + [0.3, -1.0, 2.0, 0.0]
    x[5] = 0.0  # a zero draw: its cosine counts 0
    g = np.array([0.2, -0.8, 2.1, 0.4])
    s = summarize(torch.tensor(x), torch.tensor(g), chunk_draws=chunk, evals_per_draw=3.0)
    want = _hand(x, g)
    for k, v in want.items():
        assert getattr(s, k) == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert s.work_variance == pytest.approx(3.0 * want["variance"], rel=1e-10)
    assert s.draws == 50 and s.dim == 4 and s.reference == "exact"
    pc = s.per_coordinate
    np.testing.assert_allclose(pc["mean"].numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pc["variance"].numpy(), x.var(0, ddof=1), rtol=1e-10)


def test_parameter_shapes_are_flattened():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2, 3))
    g = rng.normal(size=(2, 3))
    s = summarize(torch.tensor(x), torch.tensor(g))
    want = _hand(x.reshape(30, 6), g.reshape(6))
    assert s.dim == 6
    assert s.variance == pytest.approx(want["variance"], rel=1e-10)


def test_estimated_reference_enters_z():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    g = np.array([0.1, 0.0, -0.1])
    r = np.array([0.05, 0.2, 0.0])
    s = summarize(torch.tensor(x), torch.tensor(g), torch.tensor(r))
    assert s.reference == "estimated"
    assert s.z_max == pytest.approx(_hand(x, g, r)["z_max"], rel=1e-10)
    assert s.reference_se_l2 == pytest.approx(np.linalg.norm(r))


def test_large_offset_is_stable():
    # Shifted sums: a mean of 1e8 with unit spread keeps its variance in float64.
    x = 1e8 + torch.randn(
        10_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    s = summarize(x, torch.full((3,), 1e8, dtype=torch.float64), chunk_draws=333)
    assert s.variance == pytest.approx(float(x.var(0).mean()), rel=1e-9)


def test_zero_variance_exact_estimator():
    g = torch.tensor([0.5, -0.25, 1.0])
    s = summarize(g.expand(20, 3).clone(), g)
    assert s.variance == 0.0 and s.variance_lo == 0.0 and s.variance_hi == 0.0
    assert s.bias_l2 == 0.0 and s.z_max == 0.0 and s.p_unbiased == 1.0
    assert s.snr == math.inf and s.mse == 0.0
    assert s.cosine == pytest.approx(1.0)
    # Float32 round-off of an exact estimator is not a bias.
    s = summarize((g * (1 + 1e-7)).expand(5, 3).clone(), g.double())
    assert s.z_max == 0.0 and s.p_unbiased == 1.0
    # A constant but wrong estimate is biased with certainty.
    s = summarize((g + 0.1).expand(5, 3).clone(), g)
    assert s.z_max == math.inf and s.p_unbiased == 0.0
    assert s.bias_l2_lo == s.bias_l2_hi == pytest.approx(s.bias_l2)


def test_zero_reference_gives_nan_cosine_not_crash():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    s = summarize(x, torch.zeros(3))
    assert math.isnan(s.cosine) and s.snr == 0.0
    # the debiased bias of noise around 0 is 0 here, and 0 / 0 counts as no relative bias
    assert s.rel_bias == (0.0 if s.bias_l2 == 0 else math.inf)


def test_no_reference_gives_moments_only():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = summarize(x, None)
    assert s.reference == "none" and math.isnan(s.bias_l2)
    assert s.variance == pytest.approx(float(x.var(0).mean()))
    mean, se, n = mean_and_se([x[:60], x[60:]])
    assert n == 100
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(se, x.std(0) / 10)


def test_bad_input():
    with pytest.raises(ValueError, match="coordinates"):
        GradientStats(torch.zeros(3)).update(torch.zeros(5, 4))
    acc = GradientStats(torch.zeros(3)).update(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="earlier chunks"):
        acc.update(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="at least 2 draws"):
        GradientStats(torch.zeros(3)).update(torch.zeros(1, 3)).result()
    with pytest.raises(ValueError, match="groups"):
        GradientStats(torch.zeros(3), groups=1)
    with pytest.raises(ValueError, match="tail_k"):
        GradientStats(torch.zeros(3), tail_k=1)
    with pytest.raises(ValueError, match="non-finite"):
        GradientStats(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="level"):
        acc.result(level=1.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        acc.update(np.zeros((2, 3)))


def _coverage_p(misses: int, trials: int, level: float) -> float:
    """Two-sided binomial p-value of ``misses`` when the miss rate is ``1 - level``."""
    return sps.binomtest(misses, trials, 1 - level).pvalue


@pytest.mark.statistical
def test_intervals_cover_at_stated_rate():
    """Variance, MSE, cosine and bias intervals cover the truth ~95% of the time.

    Skewed, correlated draws: g = mu + A e, e_j ~ Exp(1) - 1. Truth: mean mu, covariance A A^T.
    Over R = 300 seeds the miss count is Binomial(R, 0.05) under a correct interval; the test
    fails when its two-sided binomial p-value is below 1e-4 (false-alarm rate 1e-4 per
    statistic). Cosine's truth is taken from one huge independent sample.
    """
    d, n, R, level = 4, 1024, 300, 0.95
    gen = torch.Generator().manual_seed(12345)
    A = torch.tensor(
        [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.2]],
        dtype=torch.float64,
    )
    mu = torch.tensor([0.5, -0.2, 0.3, 1.0], dtype=torch.float64)
    g_star = mu + torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64)  # bias 0.3
    true_var = float((A * A).sum(1).mean())
    bias = 0.3
    true_mse = (float((A * A).sum()) + bias**2) / d

    def draws(m: int) -> torch.Tensor:
        e = torch.empty(m, d, dtype=torch.float64).exponential_(1.0, generator=gen) - 1.0
        return mu + e @ A.T

    big = draws(2_000_000)
    cos_true = float(((big @ g_star) / big.norm(dim=1) / g_star.norm()).mean())
    miss = {"variance": 0, "mse": 0, "bias": 0, "cosine": 0}
    for _ in range(R):
        s = summarize(draws(n), g_star, level=level, chunk_draws=300)
        miss["variance"] += not s.variance_lo <= true_var <= s.variance_hi
        miss["mse"] += not s.mse_lo <= true_mse <= s.mse_hi
        miss["bias"] += not s.bias_l2_lo <= bias <= s.bias_l2_hi
        miss["cosine"] += not s.cosine_lo <= cos_true <= s.cosine_hi
    for k, m in miss.items():
        assert _coverage_p(m, R, level) > FALSE_ALARM, (k, m, R)


@pytest.mark.statistical
def test_unbiasedness_test_false_alarm_rate():
    """Unbiased draws: p_unbiased < 0.05 in at most ~5% of seeds (Bonferroni is conservative).

    One-sided binomial test of the rejection count against rate 0.05, false-alarm rate 1e-4.
    Biased draws (bias 5 standard errors on one coordinate) are rejected in most seeds.
    """
    d, n, R = 10, 400, 300
    gen = torch.Generator().manual_seed(7)
    rej = 0
    for _ in range(R):
        x = torch.rand(n, d, generator=gen, dtype=torch.float64) < 0.3  # Bernoulli(0.3)
        s = summarize(x.double(), torch.full((d,), 0.3, dtype=torch.float64))
        rej += s.p_unbiased < 0.05
    assert sps.binomtest(rej, R, 0.05, alternative="greater").pvalue > FALSE_ALARM
    shift = torch.zeros(d, dtype=torch.float64)
    shift[3] = 5 * math.sqrt(0.21 / n)
    power = 0
    for _ in range(50):
        x = (torch.rand(n, d, generator=gen, dtype=torch.float64) < 0.3).double()
        power += summarize(x, 0.3 - shift).p_unbiased < 0.05
    assert power >= 35


def _toy_score_function_variance(d: int, p: float, t: float) -> float:
    """Closed-form variance of one unit of (h_i - p) L, L = sum_j (h_j - t)^2, h ~ Bern(p)^d.

    E[g^2] = E[(h-p)^2 c^2] + 2 E[(h-p)^2 c] E[R] + E[(h-p)^2] E[R^2] with c = (h_i - t)^2,
    R = sum_{j != i} c_j; the mean is p (1 - p) (1 - 2 t).
    """

    def e(f):  # expectation over one Bernoulli(p) unit
        return p * f(1.0) + (1 - p) * f(0.0)

    mc = e(lambda h: (h - t) ** 2)
    vc = e(lambda h: (h - t) ** 4) - mc**2
    er = (d - 1) * mc
    er2 = (d - 1) * vc + er**2
    eg2 = (
        e(lambda h: (h - p) ** 2 * (h - t) ** 4)
        + 2 * e(lambda h: (h - p) ** 2 * (h - t) ** 2) * er
        + e(lambda h: (h - p) ** 2) * er2
    )
    return eg2 - (p * (1 - p) * (1 - 2 * t)) ** 2


@pytest.mark.statistical
@pytest.mark.parametrize("logit", [0.0, -1.5])
def test_toy_score_function_variance_matches_closed_form(logit):
    """Heavy-tailed, coordinate-correlated draws: the 1 - 1e-4 interval holds the exact variance.

    The score-function draws are simulated here in plain torch, so this checks the statistics
    alone (false-alarm rate 1e-4); the registry's estimator is checked in test_compare.
    """
    d, t, n = 20, 0.45, 200_000
    p = 1 / (1 + math.exp(-logit))
    gen = torch.Generator().manual_seed(2024)
    acc = GradientStats(torch.full((d,), p * (1 - p) * (1 - 2 * t), dtype=torch.float64))
    for _ in range(n // 20_000):
        h = (torch.rand(20_000, d, generator=gen, dtype=torch.float64) < p).double()
        L = ((h - t) ** 2).sum(1, keepdim=True)
        acc.update((h - p) * L)
    s = acc.result(level=1 - FALSE_ALARM)
    want = _toy_score_function_variance(d, p, t)
    assert s.variance_lo <= want <= s.variance_hi, (s.variance_lo, want, s.variance_hi)
    assert s.p_unbiased > FALSE_ALARM


@pytest.mark.slow
def test_million_by_200_streams_in_bounded_memory():
    """10^6 draws x 200 coordinates in chunks: state is O(G d), result matches N(0, 1)."""
    d = 200
    acc = GradientStats(torch.zeros(d), groups=32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        acc.update(torch.randn(50_000, d, generator=gen))
    assert acc._s1.shape == (32, d) and acc._s2.shape == (32, d)
    s = acc.result(level=1 - FALSE_ALARM)
    assert s.draws == 1_000_000
    assert s.variance_lo <= 1.0 <= s.variance_hi
    assert s.p_unbiased > FALSE_ALARM


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_on_cuda_match_cpu():
    """The accumulator runs where the draws live; CUDA and CPU agree to float64 round-off."""
    x = torch.randn(5000, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.linspace(-1, 1, 30, dtype=torch.float64)
    cpu = summarize(x, g, chunk_draws=999)
    acc = GradientStats(g)
    for part in x.cuda().split(999):
        acc.update(part)
    assert acc._s1.device.type == "cuda"
    gpu = acc.result()
    for k in ("variance", "variance_lo", "bias_l2", "mse", "cosine", "z_max", "p_unbiased"):
        assert getattr(gpu, k) == pytest.approx(getattr(cpu, k), rel=1e-9), k


def test_nan_draws_never_give_p_unbiased_one():
    """min(1, nan) is 1 in Python: a NaN in the draws must give a NaN p-value instead."""
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[7, 1] = math.nan
    s = summarize(x, torch.zeros(3, dtype=torch.float64))
    assert math.isnan(s.p_unbiased)


def test_p_unbiased_is_computed_from_z_max():
    """z_max is the skewness-corrected statistic: p_unbiased = min(1, d erfc(z_max / sqrt 2))."""
    x = torch.empty(300, 5, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(4)
    )
    s = summarize(x, torch.full((5,), 1.05, dtype=torch.float64))
    assert s.p_unbiased == pytest.approx(min(1.0, 5 * math.erfc(s.z_max / math.sqrt(2))), rel=1e-12)
    assert s.z_max == pytest.approx(float(s.per_coordinate["z_corrected"].abs().max()), rel=1e-15)
    assert s.z_max != pytest.approx(float(s.per_coordinate["z"].abs().max()), rel=1e-3)


def _hand_tail(x: np.ndarray, c: np.ndarray, k: int = 64) -> float:
    e = ((x - c) ** 2).sum(1)
    top = np.sort(e)[::-1][: k + 1]
    keep = top[top >= 4 * e.mean()]
    return 0.0 if keep.size < 2 else float(np.log(keep[:-1] / keep[-1]).mean())


@pytest.mark.parametrize("chunk", [None, 1, 333])
def test_tail_index_formula_and_chunk_invariance(chunk):
    """Pareto(alpha = 2) draws: the squared distance has tail exponent 1; the Hill estimate
    from 64 values has sd about 1/8, so it lies in [0.5, 1.5] (4 sd) and is flagged."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(5000, 2, generator=gen, dtype=torch.float64) ** -0.5
    g = torch.full((2,), 2.0, dtype=torch.float64)
    s = summarize(x, g, chunk_draws=chunk)
    assert s.tail_index == pytest.approx(_hand_tail(x.numpy(), g.numpy()), rel=1e-12)
    assert 0.5 <= s.tail_index <= 1.5 and s.heavy_tails
    # Without a reference the distances are taken to the first draw.
    s0 = summarize(x, None, chunk_draws=chunk)
    assert s0.tail_index == pytest.approx(_hand_tail(x.numpy(), x[0].numpy()), rel=1e-12)
    assert s0.heavy_tails


def test_tail_index_of_draws_with_few_values():
    """Bernoulli draws: the far values are ties (index exactly 0); Gaussian draws stay below
    the 1/2 cut; NaN draws give a NaN index and the flag."""
    gen = torch.Generator().manual_seed(6)
    b = (torch.rand(2000, 1, generator=gen, dtype=torch.float64) < 0.01).double()
    s = summarize(b, torch.full((1,), 0.01, dtype=torch.float64))
    assert s.tail_index == 0.0 and not s.heavy_tails
    s = summarize(torch.full((10, 3), 2.0, dtype=torch.float64), torch.full((3,), 2.0))
    assert s.tail_index == 0.0 and not s.heavy_tails
    x = torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    s = summarize(x, torch.zeros(1, dtype=torch.float64))
    assert 0.0 < s.tail_index < 0.5 and not s.heavy_tails
    x[3, 0] = math.nan
    s = summarize(x, torch.zeros(1, dtype=torch.float64))
    assert math.isnan(s.tail_index) and s.heavy_tails


def test_printed_table_marks_heavy_tails():
    """compare's printed table puts ``!`` after variance, mse and snr of flagged rows only."""
    import pandas as pd

    from stochgrad.analysis.cli import format_table

    gen = torch.Generator().manual_seed(7)
    rows = []
    light = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    heavy = torch.rand(4000, 2, generator=gen, dtype=torch.float64) ** -0.5
    for name, x in [("light", light), ("heavy", heavy)]:
        s = summarize(x, torch.zeros(2, dtype=torch.float64))
        rows.append({"model": "m", "estimator": name, "param": "p", **s.as_dict()})
    text = format_table(pd.DataFrame(rows))
    line = {r.split()[0]: r for r in text.splitlines() if r.startswith(("light", "heavy"))}
    assert "!" not in line["light"] and line["heavy"].count("!") == 3
    assert "heavy-tailed draws" in text
