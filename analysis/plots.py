"""Figures of estimator comparisons (seaborn styling, rendered off-screen).

Every function takes a tidy table (``summary.csv`` of a results directory, see
:mod:`stochgrad.analysis.results`) and returns a ``matplotlib.figure.Figure``; ``save`` writes
it as PNG and PDF. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI
backend), so plotting works headless and never touches the user's global state.

One estimator keeps one colour and one marker in every figure (:func:`estimator_style`):
the paper's estimators have fixed slots in the colour-blind-safe ``colorblind`` palette, any
other label gets a slot derived from its name. Axes holding quantities that span decades
(variance, MSE, cost) are logarithmic; a symmetric-log axis is used when exact zeros occur
(the ``exact`` estimator), so that they stay visible.

Figures:

* (a) :func:`plot_variance_sweep` -- variance (log) against the swept parameter, against
  ``sigmoid(logits)`` when the logits are swept; band = the variance confidence interval.
* (b) :func:`plot_bias_vs_std` -- debiased ``bias_l2`` against ``sqrt(variance)``, with both
  intervals and each estimator's noise floor ``bias_noise_floor``.
* (c) :func:`plot_mse_vs_cost` -- MSE against model evaluations per draw, with its interval and
  the efficiency frontier (lowest MSE at or below each cost).
* (d) :func:`plot_training` -- expected loss against SGD step, one panel per estimator (the
  others in grey), mean over seeds with a band of +- one standard error of that mean.
* :func:`plot_variance` -- variance per estimator with its interval (compare runs).
"""

from __future__ import annotations

import hashlib
import math
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .defaults import DEFAULT_ESTIMATORS

__all__ = [
    "estimator_style",
    "plot_bias_vs_std",
    "plot_mse_vs_cost",
    "plot_results",
    "plot_training",
    "plot_variance",
    "plot_variance_sweep",
    "save",
]

# the colour-blind-safe palette plus black and a dark teal: one colour per paper estimator
_PALETTE = list(sns.color_palette("colorblind", 10)) + [(0.0, 0.0, 0.0), (0.0, 0.36, 0.36)]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
_FIXED = list(DEFAULT_ESTIMATORS)


def estimator_style(label: str) -> dict[str, Any]:
    """``{"color", "marker", ...}`` for an estimator label, the same in every figure.

    The palette has 12 colours: the paper's estimators get one each; the field's estimators
    (and any other label) reuse a colour with another, hollow marker.
    """
    if label in _FIXED:
        i = _FIXED.index(label)
    else:
        i = len(_FIXED) + zlib.crc32(label.encode("utf-8")) % (2 * len(_MARKERS))
    color = _PALETTE[i % len(_PALETTE)]
    rounds = i // len(_PALETTE)  # later rounds shift the marker and hollow it
    style = {"color": color, "marker": _MARKERS[(i + 5 * rounds) % len(_MARKERS)]}
    if rounds % 2 == 1:
        style.update(markerfacecolor="white", markeredgecolor=color, markeredgewidth=1.5)
    return style


def _ordered(labels: Sequence[str]) -> list[str]:
    """Unique labels, the paper's estimators first in their fixed order."""
    uniq = list(dict.fromkeys(labels))
    return [x for x in _FIXED if x in uniq] + [x for x in uniq if x not in _FIXED]


def save(fig: Figure, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` to ``path`` with each suffix in ``formats``; returns the files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    engine = fig.get_layout_engine()
    try:
        for fmt in formats:
            f = path.with_suffix("." + fmt)
            fig.savefig(f, dpi=150)
            out.append(f)
            # The layout depends on sizes in points only, so the first format's layout holds
            # for the others: freeze it instead of solving it again for every file.
            fig.set_layout_engine("none")
    finally:
        fig.set_layout_engine(engine)
    return out


def _facets(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One panel per (model, param), in table order."""
    keys = list(dict.fromkeys(zip(df["model"], df["param"])))
    single_param = df.groupby("model")["param"].nunique().max() == 1
    out = []
    for m, p in keys:
        title = str(m) if single_param else f"{m} / {p}"
        out.append((title, df[(df["model"] == m) & (df["param"] == p)]))
    return out


def _grid(n: int, width: float = 3.6, height: float = 3.0) -> tuple[Figure, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    extra = 3.8 if n <= 2 else 0.0  # room for a legend at the right of narrow figures
    fig = Figure(figsize=(width * cols + extra, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _scale(ax: Any, axis: str, values: np.ndarray) -> None:
    """Log scale for positive data spanning > 1 decade; symlog when zeros occur."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0 or (v < 0).any():
        return
    pos = v[v > 0]
    if pos.size == 0:
        return
    if (v == 0).any():
        # linear below the smallest positive decade; the zero gap grows with the range so
        # that the "0" tick never runs into the first decade's label
        lo = 10.0 ** math.floor(math.log10(float(pos.min())))
        decades = max(1.0, math.log10(float(pos.max()) / lo))
        setter = ax.set_xscale if axis == "x" else ax.set_yscale
        setter("symlog", linthresh=lo, linscale=max(1.0, decades / 4))
        lim = ax.set_xlim if axis == "x" else ax.set_ylim
        lim(0, float(pos.max()) * 3)
    elif pos.max() / pos.min() > 10:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    else:
        return
    # The style draws no tick marks and grid lines at major ticks only, and an axis spanning
    # more than a decade labels no minor tick: minor ticks would only cost drawing time.
    from matplotlib.ticker import NullLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_minor_locator(NullLocator())


def _legend(fig: Figure, labels: Sequence[str], *extra: Any) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="-", **estimator_style(lab), label=lab) for lab in labels]
    handles += [h for h in extra if h is not None]
    if len([a for a in fig.axes if a.get_visible()]) <= 2:  # narrow figure: legend at the right
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    else:
        fig.legend(
            handles=handles, loc="outside lower center", ncol=min(3, len(labels)), frameon=False
        )


def _styled(fn):
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
            return fn(*args, **kwargs)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def _by_estimator(sub: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of ``sub`` per estimator label (one pass instead of a mask per label)."""
    return {str(k): v for k, v in sub.groupby("estimator", sort=False)}


def _errs(center: pd.Series, lo: pd.Series, hi: pd.Series) -> np.ndarray | None:
    """Asymmetric error bars (nan-safe); ``None`` when no interval is known."""
    c, lo_, hi_ = (np.asarray(s, dtype=float) for s in (center, lo, hi))
    if not (np.isfinite(lo_) & np.isfinite(hi_)).any():
        return None
    low = np.where(np.isfinite(lo_), np.clip(c - lo_, 0, None), 0.0)
    high = np.where(np.isfinite(hi_), np.clip(hi_ - c, 0, None), 0.0)
    return np.vstack([low, high])


@_styled
def plot_bias_vs_std(df: pd.DataFrame) -> Figure:
    """(b) Debiased ``bias_l2`` against ``sqrt(variance)``, intervals on both.

    The Monte Carlo noise floor ``bias_noise_floor = sqrt(tr(Sigma)/N)`` of each estimator
    is drawn as a short bar in its colour: a bias below it is not resolved by the draws.
    """
    facets = _facets(df)
    fig, axes = _grid(len(facets))
    labels = _ordered(df["estimator"])
    has_floor = "bias_noise_floor" in df
    for ax, (title, sub) in zip(axes, facets):
        # Scales first: setting them after the artists re-invalidates every artist's transform.
        _scale(ax, "x", np.sqrt(sub["variance"].clip(lower=0)))
        ys = [sub["bias_l2"], sub["bias_l2_hi"]] + ([sub["bias_noise_floor"]] if has_floor else [])
        _scale(ax, "y", pd.concat(ys).to_numpy())
        rows = _by_estimator(sub)
        for lab in labels:
            r = rows.get(lab)
            if r is None:
                continue
            std = np.sqrt(r["variance"].clip(lower=0))
            xerr = _errs(std, np.sqrt(r["variance_lo"].clip(lower=0)), np.sqrt(r["variance_hi"]))
            yerr = _errs(r["bias_l2"], r["bias_l2_lo"], r["bias_l2_hi"])
            st = estimator_style(lab)
            ax.errorbar(
                std, r["bias_l2"], xerr=xerr, yerr=yerr, linestyle="none", capsize=2,
                markersize=6, clip_on=False, **st,
            )  # fmt: skip
            if has_floor:
                ax.plot(
                    std, r["bias_noise_floor"], linestyle="none", marker="_", markersize=14,
                    markeredgewidth=1.5, color=st["color"], alpha=0.8, gid="noise_floor",
                )  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("standard deviation  sqrt(variance)")
        ax.set_ylabel("debiased bias  (bar: noise floor)")
    _legend(fig, labels, _floor_handle() if has_floor else None)
    _caption(fig, df)
    return fig


def _floor_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D(
        [], [], linestyle="none", marker="_", markersize=14, markeredgewidth=1.5, color="0.3",
        label="noise floor sqrt(tr Sigma / N)",
    )  # fmt: skip


def _caption(fig: Figure, df: pd.DataFrame) -> None:
    """Draws and seed of the table, at the top of the figure."""
    parts = []
    if "draws" in df and df["draws"].notna().any():
        lo, hi = int(df["draws"].min()), int(df["draws"].max())
        parts.append(f"draws {lo:,}" if lo == hi else f"draws {lo:,}-{hi:,}")
    if "seed" in df and df["seed"].notna().any():
        seeds = sorted({int(v) for v in df["seed"].dropna()})
        parts.append("seed " + ",".join(map(str, seeds[:4])) + ("..." if len(seeds) > 4 else ""))
    if "level" in df and df["level"].notna().any():
        parts.append(f"intervals {100 * float(df['level'].iloc[0]):g}%")
    if parts:
        fig.suptitle("; ".join(parts), fontsize=8)


@_styled
def plot_mse_vs_cost(df: pd.DataFrame) -> Figure:
    """(c) MSE against model evaluations per draw, with the efficiency frontier."""
    facets = _facets(df)
    fig, axes = _grid(len(facets))
    labels = _ordered(df["estimator"])
    for ax, (title, sub) in zip(axes, facets):
        _scale(ax, "x", sub["evals_per_draw"])
        _scale(ax, "y", sub["mse"])
        rows = _by_estimator(sub)
        for lab in labels:
            r = rows.get(lab)
            if r is None:
                continue
            ax.errorbar(
                r["evals_per_draw"], r["mse"], yerr=_errs(r["mse"], r["mse_lo"], r["mse_hi"]),
                linestyle="none", capsize=2, markersize=6, clip_on=False, **estimator_style(lab),
            )  # fmt: skip
        pts = sub[["evals_per_draw", "mse"]].astype(float).dropna().sort_values("evals_per_draw")
        if not pts.empty:
            front = pts.groupby("evals_per_draw")["mse"].min().cummin()
            ax.step(
                front.index, front.values, where="post", color="0.5", lw=1, zorder=0,
                linestyle="--",
            )  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("cost per draw (model evaluations)")
        ax.set_ylabel("MSE per coordinate")
    from matplotlib.lines import Line2D

    front_handle = Line2D(
        [], [], color="0.5", lw=1, linestyle="--", label="frontier: lowest MSE at <= cost"
    )
    _legend(fig, labels, front_handle)
    _caption(fig, df)
    return fig


def _tick_label(spec: str) -> str:
    """``score_function:baseline=none`` -> ``score_function none``: one line per tick."""
    name, _, opts = spec.partition(":")
    for key in ("baseline=", "variant="):
        opts = opts.replace(key, "")
    return f"{name} {opts}".strip()


@_styled
def plot_variance(df: pd.DataFrame) -> Figure:
    """Variance per estimator with its confidence interval, one panel per (model, param)."""
    facets = _facets(df)
    labels = _ordered(df["estimator"])
    # one tick row per estimator: the panel grows with their number, so labels never overlap
    fig, axes = _grid(len(facets), width=4.2, height=max(3.4, 1.3 + 0.16 * len(labels)))
    for ax, (title, sub) in zip(axes, facets):
        _scale(ax, "x", sub["variance"])
        rows = _by_estimator(sub)
        shown = [lab for lab in labels if lab in rows]
        for i, lab in enumerate(shown):
            r = rows[lab]
            ax.errorbar(
                r["variance"], [i] * len(r),
                xerr=_errs(r["variance"], r["variance_lo"], r["variance_hi"]),
                linestyle="none", capsize=2, markersize=6, clip_on=False, **estimator_style(lab),
            )  # fmt: skip
        ax.set_yticks(range(len(shown)), [_tick_label(s) for s in shown], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel("variance (average over coordinates)")
    _caption(fig, df)
    return fig


@_styled
def plot_variance_sweep(df: pd.DataFrame, y: str = "variance") -> Figure:
    """(a) ``y`` (default the variance, log axis) against the swept parameter, with bands.

    When the swept parameter is ``logits`` the x axis is ``sigmoid(logits)``.
    """
    if "sweep_value" not in df:
        raise ValueError(
            "plot_variance_sweep needs a sweep table (columns sweep_param, sweep_value)"
        )
    param = str(df["sweep_param"].iloc[0])
    xs = pd.to_numeric(df["sweep_value"], errors="coerce")
    xlabel = param
    if param.split(".")[-1] == "logits":
        xs = 1 / (1 + np.exp(-xs))
        xlabel = "sigmoid(logits)"
    df = df.assign(_x=xs)
    facets = _facets(df)
    fig, axes = _grid(len(facets), width=4.4, height=3.4)
    labels = _ordered(df["estimator"])
    for ax, (title, sub) in zip(axes, facets):
        for lab in labels:
            r = sub[sub["estimator"] == lab].sort_values("_x")
            if r.empty:
                continue
            st = estimator_style(lab)
            ax.plot(r["_x"], r[y], **st, markersize=5, label=lab)
            lo, hi = f"{y}_lo", f"{y}_hi"
            if lo in r and hi in r:
                ax.fill_between(r["_x"], r[lo], r[hi], color=st["color"], alpha=0.2, lw=0)
        _scale(ax, "y", sub[y])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y.replace("_", " "))
    _legend(fig, labels)
    _caption(fig, df)
    return fig


@_styled
def plot_training(df: pd.DataFrame) -> Figure:
    """(d) Expected loss against step: mean over seeds, band +- one standard error.

    Small multiples: one panel per estimator, its curve in colour over every other
    estimator's curve in light grey, so that curves lying on top of each other stay readable.
    """
    labels = _ordered(df["estimator"])
    curves = {}
    for lab in labels:
        g = df[df["estimator"] == lab].groupby("step")["loss"]
        mean, n = g.mean(), g.count()
        curves[lab] = (mean, (g.std(ddof=1) / np.sqrt(n)).fillna(0.0))
    cols = min(len(labels), 4)
    rows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(2.9 * cols + 0.4, 2.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel().tolist()
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    for ax, lab in zip(axes, labels):
        for other, (mean, _) in curves.items():
            if other != lab:
                ax.plot(mean.index, mean.values, color="0.8", lw=0.8, zorder=1)
        mean, se = curves[lab]
        st = estimator_style(lab)
        ax.plot(
            mean.index, mean.values, **st, markersize=3, markevery=max(1, len(mean) // 8),
            lw=1.4, zorder=3,
        )  # fmt: skip
        ax.fill_between(
            mean.index, (mean - se).values, (mean + se).values, color=st["color"], alpha=0.25,
            lw=0, zorder=2,
        )  # fmt: skip
        ax.set_title(lab.replace(":", "\n", 1), fontsize=7)
        _scale(ax, "y", df["loss"])
    for ax in axes[: len(labels)]:
        if ax.get_subplotspec().is_last_row() or ax not in axes[: len(labels) - cols]:
            ax.set_xlabel("SGD step")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("expected loss E[L]")
    model = ", ".join(map(str, dict.fromkeys(df["model"])))
    seeds = df.groupby("estimator")["seed"].nunique().max()
    seed_list = sorted({int(v) for v in df["seed"]})
    fig.suptitle(
        f"SGD on {model} ({seeds} seeds: {', '.join(map(str, seed_list[:6]))}; band: +-1 s.e.; "
        "grey: the other estimators)",
        fontsize=9,
    )
    return fig


def plot_results(
    path: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """(Re)draw every figure of a results directory into ``DIR/figures``; returns the files.

    ``echo``, when given, receives one progress line per figure (name and seconds taken).
    """
    from .results import FIGURES_DIR, ResultsDir, read_summary

    path = Path(path)
    run = ResultsDir.read_run(path)
    df = read_summary(path)
    if df.empty:
        raise ValueError(f"{path}/summary.csv has no rows yet; nothing to plot")
    figdir = path / FIGURES_DIR
    kind = run.get("kind")
    figs: dict[str, Any] = {}
    if kind == "compare":
        figs = {
            "bias_vs_std": plot_bias_vs_std,
            "mse_vs_cost": plot_mse_vs_cost,
            "variance": plot_variance,
        }
    elif kind == "sweep":
        figs = {
            "variance_sweep": plot_variance_sweep,
            "bias_sweep": lambda d: plot_variance_sweep(d, y="bias_l2"),
        }
    elif kind == "train":
        figs = {"training": plot_training}
    else:
        raise ValueError(f"{path}: unknown run kind {kind!r} in run.json")
    # Figures already drawn from this very summary.csv by this very plotting code are kept:
    # a finished run re-run into the same directory does not redraw them.
    stamp_file = figdir / ".stamp"
    digest = hashlib.sha1((path / "summary.csv").read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(repr((sorted(figs), list(formats))).encode())
    stamp = digest.hexdigest()
    wanted = [figdir / f"{name}.{fmt}" for name in figs for fmt in formats]
    if (
        stamp_file.is_file()
        and stamp_file.read_text(encoding="utf-8").strip() == stamp
        and all(f.is_file() for f in wanted)
    ):
        return wanted
    files: list[Path] = []
    for i, (name, fn) in enumerate(figs.items(), 1):
        t0 = time.perf_counter()
        fig = fn(df)
        files += save(fig, figdir / name, formats)
        if echo is not None:
            echo(
                f"figure {i}/{len(figs)}: {name} ({', '.join(formats)}) "
                f"in {time.perf_counter() - t0:.1f} s"
            )
    from .results import atomic_write_text

    atomic_write_text(stamp_file, stamp + "\n")
    return files
