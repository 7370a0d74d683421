"""Plot smoke tests: every figure renders from a small saved result, with the expected axes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stochgrad.analysis import plots
from stochgrad.analysis.compare import PAPER_ESTIMATORS, SUMMARY_COLUMNS
from stochgrad.analysis.results import ResultsDir

PNG_MAGIC = b"\x89PNG"


def _summary(estimators=("score_function:baseline=none", "straight_through", "exact")):
    rng = np.random.default_rng(0)
    rows = []
    for model, params in [("toy:target=0.45", ["logits"]), ("sbn", ["W1", "b1"])]:
        for i, e in enumerate(estimators):
            for p in params:
                var = 0.0 if e == "exact" else float(10.0 ** rng.uniform(-3, 2))
                bias = 0.0 if e == "exact" else float(10.0 ** rng.uniform(-3, 0))
                mse = var + bias**2
                row = dict.fromkeys(SUMMARY_COLUMNS, 1.0)
                row.update(seed=0, bias_noise_floor=0.01)
                row.update(
                    model=model, estimator=e, param=p, draws=100, variance=var,
                    variance_lo=0.9 * var, variance_hi=1.1 * var, bias_l2=bias,
                    bias_l2_lo=0.8 * bias, bias_l2_hi=1.2 * bias, mse=mse, mse_lo=0.9 * mse,
                    mse_hi=1.1 * mse, evals_per_draw=[1.0, 2.0, 1024.0][i], reference="exact",
                )  # fmt: skip
                rows.append(row)
    return pd.DataFrame(rows)


def _sweep():
    frames = []
    for e in ("spsa", "score_function:baseline=none"):
        for j, v in enumerate([-2.0, 0.0, 2.0]):
            var = 10.0 ** (j - (e == "spsa"))
            frames.append(
                dict(model="toy", param="logits", estimator=e, sweep_param="logits",
                     sweep_value=v, variance=var, variance_lo=0.8 * var, variance_hi=1.2 * var,
                     bias_l2=0.1, bias_l2_lo=0.05, bias_l2_hi=0.15)
            )  # fmt: skip
    return pd.DataFrame(frames)


def _curves():
    rows = []
    for e in ("exact", "straight_through"):
        for seed in (0, 1, 2):
            for step in range(0, 50, 10):
                rows.append(("sbn", e, seed, step, 3.0 / (1 + step) + 0.1 * seed, 0.0))
    return pd.DataFrame(rows, columns=["model", "estimator", "seed", "step", "loss", "seconds"])


def _labels(fig):
    axes = [ax for ax in fig.axes if ax.get_visible()]
    return {ax.get_xlabel() for ax in axes}, {ax.get_ylabel() for ax in axes}


def _check_files(files):
    assert {f.suffix for f in files} == {".png", ".pdf"}
    for f in files:
        assert f.stat().st_size > 1000, f
        if f.suffix == ".png":
            assert f.read_bytes()[:4] == PNG_MAGIC


def test_bias_vs_std(tmp_path):
    fig = plots.plot_bias_vs_std(_summary())
    xs, ys = _labels(fig)
    assert xs == {"standard deviation  sqrt(variance)"}
    assert ys == {"debiased bias  (bar: noise floor)"}
    assert len([a for a in fig.axes if a.get_visible()]) == 3  # toy, sbn/W1, sbn/b1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "noise floor sqrt(tr Sigma / N)" in legend
    floors = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "noise_floor"]
    assert len(floors) == 3  # one noise-floor bar per estimator on the toy panel
    assert "draws 100" in fig._suptitle.get_text() and "seed" in fig._suptitle.get_text()
    _check_files(plots.save(fig, tmp_path / "b"))


def test_mse_vs_cost(tmp_path):
    fig = plots.plot_mse_vs_cost(_summary())
    xs, ys = _labels(fig)
    assert xs == {"cost per draw (model evaluations)"} and ys == {"MSE per coordinate"}
    assert fig.axes[0].get_xscale() == "log"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("frontier") for t in legend)
    _check_files(plots.save(fig, tmp_path / "c"))


def test_every_paper_estimator_has_its_own_colour():
    colours = {tuple(plots.estimator_style(e)["color"]) for e in PAPER_ESTIMATORS}
    assert len(colours) == len(PAPER_ESTIMATORS) == 12


def test_variance_sweep(tmp_path):
    fig = plots.plot_variance_sweep(_sweep())
    xs, ys = _labels(fig)
    assert xs == {"sigmoid(logits)"} and ys == {"variance"}
    assert fig.axes[0].get_yscale() == "log"  # variances span three decades
    _check_files(plots.save(fig, tmp_path / "a"))
    with pytest.raises(ValueError, match="sweep table"):
        plots.plot_variance_sweep(_summary())


def test_training(tmp_path):
    fig = plots.plot_training(_curves())
    xs, ys = _labels(fig)
    assert xs == {"SGD step"} and ys - {""} == {"expected loss E[L]"}
    assert "3 seeds" in fig._suptitle.get_text()
    assert len([a for a in fig.axes if a.get_visible()]) == 2  # one panel per estimator
    _check_files(plots.save(fig, tmp_path / "d"))


def test_variance_panel(tmp_path):
    fig = plots.plot_variance(_summary())
    assert _labels(fig)[0] == {"variance (average over coordinates)"}
    _check_files(plots.save(fig, tmp_path / "v"))


def test_styles_fixed_and_distinct():
    styles = [plots.estimator_style(e) for e in PAPER_ESTIMATORS]
    keys = {(tuple(s["color"]), s["marker"], s.get("markerfacecolor")) for s in styles}
    assert len(keys) == len(PAPER_ESTIMATORS)
    assert plots.estimator_style("rloo") == plots.estimator_style("rloo")
    assert plots.estimator_style("sts") == styles[PAPER_ESTIMATORS.index("sts")]


@pytest.mark.parametrize(
    "kind, table, names",
    [
        ("compare", _summary, {"bias_vs_std", "mse_vs_cost", "variance"}),
        ("sweep", _sweep, {"variance_sweep", "bias_sweep"}),
        ("train", _curves, {"training"}),
    ],
)
def test_plot_results_from_saved_directory(tmp_path, kind, table, names):
    rd = ResultsDir(tmp_path, kind, {"seed": 0}).open()
    rd.append("k", table())
    rd.rebuild()
    rd.finish()
    files = plots.plot_results(tmp_path)
    assert {f.stem for f in files} == names
    _check_files(files)


def test_plot_results_errors(tmp_path):
    with pytest.raises(ValueError, match="not a stochgrad results directory"):
        plots.plot_results(tmp_path)


def test_unchanged_results_are_not_redrawn(tmp_path):
    """plot_results keeps figures drawn from the same summary.csv; new rows redraw them."""
    out = tmp_path / "run"
    ResultsDir(out, "compare", {"seed": 0}).open({})
    df = _summary()
    df.to_csv(out / "summary.csv", index=False)
    files = plots.plot_results(out)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert plots.plot_results(out) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    df.assign(variance=df["variance"] * 2).to_csv(out / "summary.csv", index=False)
    import os

    for f in files:  # make any redraw visible whatever the clock resolution
        os.utime(f, ns=(0, 0))
    plots.plot_results(out)
    assert all(f.stat().st_mtime_ns > 0 for f in files)


def test_save_writes_every_format_and_keeps_the_layout_engine(tmp_path):
    """PNG and PDF come from one layout; the figure keeps its own layout engine afterwards."""
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    df = pd.DataFrame(
        {
            "model": ["toy"] * 2, "estimator": ["sts", "spsa"], "param": ["logits"] * 2,
            "variance": [1e-3, 2.0], "variance_lo": [9e-4, 1.9], "variance_hi": [1.1e-3, 2.1],
            "draws": [100, 100], "seed": [0, 0], "level": [0.95, 0.95],
        }
    )  # fmt: skip
    fig = plots.plot_variance(df)
    files = plots.save(fig, tmp_path / "v")
    assert [f.name for f in files] == ["v.png", "v.pdf"]
    assert all(f.stat().st_size > 1000 for f in files)
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and not ax.xaxis.get_minorticklocs().size
