"""Correctness of the benchmark's hand-written references (never their speed).

Statistical checks: fixed seeds, two-sided z-tests per unit, each test at a false-alarm rate of
1e-4 split over its units (Bonferroni), 20k draws on a 5-unit toy with unequal logits.
Unbiased references are compared with the toy's closed-form gradient; biased ones with the
estimator's own ``estimate()`` (a two-sample test), since they share its bias.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from scipy.stats import norm

from stochgrad import estimators, models
from stochgrad.analysis import benchmark
from stochgrad.estimators.base import Rng

DIM, DRAWS, TARGET = 5, 20_000, 0.2
LOGITS = torch.tensor([-1.5, -0.5, 0.0, 0.7, 2.0])
ALPHA = 1e-4
Z_CRIT = float(norm.isf(ALPHA / (2 * DIM)))  # two-sided, Bonferroni over the units

ROUNDING = {"gumbel_softmax", "gumbel_rao", "rebar[fixed]", "exact", "relax"}
CASES = {c.label: c for c in benchmark.all_cases()}
UNBIASED = [
    "score_function",
    "score_function[moving_average]",
    "score_function[optimal]",
    "score_function[leave_one_out,K=2]",
    "rebar[fixed]",
    "exact",
    "arm",
    "disarm",
]
BIASED = [
    "straight_through",
    "straight_through[sigmoid]",
    "sts",
    "noisy_rectifier",
    "spsa",
    "node_perturbation",
    "finite_difference",
    "gumbel_softmax",
    "reinmax",
    "gumbel_rao",
]


def _toy():
    return models.get("toy", dim=DIM, target=TARGET, logits=LOGITS)


def _reference(label, obj):
    case = CASES[label]
    est = case.make()
    est.warmup(obj, Rng(1))  # the state estimate(seed=1) would use
    return est, case.reference(est)


def _draws(label, seed=0, chunk_bytes=None, dtype=torch.float32):
    obj = _toy()
    _, ref = _reference(label, obj)
    phi = obj.params["logits"].detach().to(dtype)
    g = torch.Generator().manual_seed(seed)
    return ref(phi, TARGET, DRAWS, g, chunk_bytes=chunk_bytes)


def _z_one(x, mean):
    se = x.double().std(0) / DRAWS**0.5
    return (x.double().mean(0) - mean.double()) / se


def _z_two(x, y):
    se = (x.double().var(0) / len(x) + y.double().var(0) / len(y)).sqrt()
    return (x.double().mean(0) - y.double().mean(0)) / se


def test_every_estimator_has_a_reference():
    labels = {c.label for c in benchmark.all_cases()}
    assert {label.split("[")[0] for label in labels} == set(estimators.available())
    assert set(UNBIASED) | set(BIASED) | {"relax"} == labels


@pytest.mark.parametrize("label", UNBIASED)
def test_unbiased_reference_matches_exact_gradient(label):
    x = _draws(label)
    exact = _toy().exact_grad()["logits"]
    if label == "exact":
        torch.testing.assert_close(x, exact.expand(DRAWS, DIM), rtol=1e-5, atol=1e-7)
        return
    z = _z_one(x, exact)
    assert z.abs().max() < Z_CRIT, (label, z)


@pytest.mark.parametrize("label", BIASED)
def test_biased_reference_matches_estimate(label):
    obj = _toy()
    est = CASES[label].make()
    n = DRAWS if label != "finite_difference" else DRAWS // 4
    ours = est.estimate(obj, n, seed=1)["logits"].detach()
    x = _draws(label)
    z = _z_two(x, ours)
    assert z.abs().max() < Z_CRIT, (label, z)


@pytest.mark.parametrize("label", sorted(set(CASES) - {"exact"}))
def test_second_moment_matches_estimate(label):
    """Same distribution, not only the same mean: the per-unit second moments agree with
    ``estimate()``'s (two-sample z-test on the squares). This is what sees a wrong step size in
    SPSA or node perturbation, whose means barely depend on it on this toy."""
    obj = _toy()
    est = CASES[label].make()
    n = DRAWS if label != "finite_difference" else DRAWS // 4
    ours = est.estimate(obj, n, seed=1)["logits"].detach()
    x = _draws(label)
    z = _z_two(x.double().square(), ours.double().square())
    assert z.abs().max() < Z_CRIT, (label, z)


def test_biased_reference_is_biased():
    """The z-test has the power to see straight-through's bias: it must reject the exact
    gradient for the straight-through reference (so the tests above can fail)."""
    x = _draws("straight_through")
    z = _z_one(x, _toy().exact_grad()["logits"])
    assert z.abs().max() > Z_CRIT


def test_relax_reference_matches_exact_gradient_at_trained_state():
    obj = _toy()
    est, ref = _reference("relax", obj)
    x = ref(obj.params["logits"].detach(), TARGET, DRAWS, torch.Generator().manual_seed(0))
    z = _z_one(x, obj.exact_grad()["logits"])
    assert z.abs().max() < Z_CRIT, z


@pytest.mark.parametrize("label", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_chunking(label, dtype):
    """Output ``(draws, d)`` in the parameters' dtype; chunked (a few rows at a time) equals
    one chunk with the same generator: a draw's uniforms are one contiguous block of the
    stream. Bit for bit where the arithmetic is exact or elementwise-identical; where a
    reference uses ``log``/``sigmoid`` (whose vectorised kernels and scalar tails round
    differently, and the tail falls elsewhere with other chunk sizes), a reduction over
    configurations (exact) or matrix products (RELAX's network), to rounding."""
    obj = _toy()
    _, ref = _reference(label, obj)
    phi = obj.params["logits"].detach().to(dtype)
    n = 257
    small = ref(phi, TARGET, n, torch.Generator().manual_seed(3), chunk_bytes=7 * 4 * DIM * 8)
    whole = ref(phi, TARGET, n, torch.Generator().manual_seed(3), chunk_bytes=1 << 30)
    assert small.shape == (n, DIM) and small.dtype == dtype
    assert torch.isfinite(small).all()
    if label in ROUNDING:
        torch.testing.assert_close(small, whole)
    else:
        assert torch.equal(small, whole)


def test_chunk_rows_cover_the_draws():
    spans = list(benchmark._chunks(1000, 7, 3, chunk_bytes=4 * 3 * 7 * 64))
    assert spans[0] == (0, 64) and sum(m for _, m in spans) == 1000
    assert all(s == i * 64 for i, (s, _) in enumerate(spans))


def test_run_reports_ratio_memory_and_skips_over_budget():
    cases = benchmark.select(benchmark.all_cases(), ["straight_through", "score_function"])
    cases = [c for c in cases if c.label in ("straight_through", "score_function")]
    rows = benchmark.run(cases, dims=[4], draws=[500, 10**9], repeats=1, memory_budget=1 << 20)
    done = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    assert len(done) == 2 and len(skipped) == 2
    for r in done:
        assert r["ratio"] > 0 and r["stochgrad_draws_per_s"] > 0
        assert r["output_bytes"] == 4 * 4 * 500
    table = benchmark.format_table(rows)
    assert "skipped: output" in table and "peak/out" in table


def test_select_rejects_unknown_label():
    with pytest.raises(ValueError, match="no estimator label starts with nope"):
        benchmark.select(benchmark.all_cases(), ["nope"])


def test_peak_rss_increase_counts_the_result():
    secs, peak = benchmark.peak_rss_increase(partial(torch.ones, 64 * 2**20 // 4))
    assert secs >= 0
    if peak is not None:  # /proc/self/clear_refs available (Linux)
        assert peak >= 60 * 2**20


def test_cli_bench_prints_machine_and_table(capsys):
    from stochgrad.analysis import cli

    argv = ["bench", "--only", "straight_through", "--dims", "4", "--draws", "300", "1000000000"]
    assert cli.main([*argv, "--repeats", "1", "--memory-budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "threads" in out and "cores" in out
    assert "straight_through[sigmoid]" in out and "skipped: output" in out


def test_cli_bench_rejects_bad_input(capsys):
    from stochgrad.analysis import cli

    assert cli.main(["bench", "--only", "nope", "--dims", "4", "--draws", "10"]) == 2
    assert "no estimator label starts with nope" in capsys.readouterr().err
    assert cli.main(["bench", "--dims", "0", "--draws", "10"]) == 2
    assert "--dims must be positive" in capsys.readouterr().err
