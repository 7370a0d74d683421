"""Estimator comparisons, sweeps and training curves as tidy tables.

* :func:`compare` runs estimators on one objective and returns one row per
  (model, estimator, parameter) with the SPEC ``summary.csv`` columns
  (:data:`SUMMARY_COLUMNS`); the statistics are those of :mod:`stochgrad.analysis.stats`.
* :func:`run_compare`, :func:`run_sweep`, :func:`run_train` do the same for several models /
  grid points / seeds, cell by cell, writing a resumable results directory
  (:mod:`stochgrad.analysis.results`) -- the CLI's ``compare``, ``sweep`` and ``train``.

Specs. On the command line and in configs, a model or an estimator is a *spec*: a registry
name with options, ``name:key=value,key=value`` (values are parsed as int, float, bool,
``a|b`` lists or text), e.g. ``score_function:baseline=optimal`` or ``toy:target=0.499,dim=50``.
Library code may pass objects instead.

Draws. A cell's ``num_draws`` draws are requested in chunks of at most ``chunk_elements``
numbers (draws x coordinates), so memory stays bounded for any ``num_draws``; chunk ``k``
uses seed ``seed`` for ``k = 0`` and a seed derived from ``(seed, k)`` after, so a cell whose
draws fit in one chunk gives exactly ``est.estimate(objective, num_draws, seed=seed)``.
All estimators in a run share the seed (common random numbers across estimators).

Reference. When the objective has an exact gradient (``objective.exact_grad()``) it is the
reference (``reference = "exact"``); otherwise a reference is estimated with
``reference_draws`` draws of an unbiased estimator (default the leave-one-out score function,
K = 4) under an independent seed, and its standard error enters the z-test
(``reference = "estimated"``).
"""

from __future__ import annotations

import inspect
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from stochgrad import estimators as _estimators
from stochgrad import models as _models

from ._callable import callable_module
from .defaults import (  # noqa: F401  (re-exported)
    DEFAULT_ESTIMATORS,
    DEFAULT_MAX_EVALS,
    DEFAULT_MODELS,
    MIN_CAPPED_DRAWS,
    PAPER_ESTIMATORS,
    TRAIN_ESTIMATORS,
)
from .stats import SUMMARY_FIELDS, GradientStats, Summary

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_ESTIMATORS",
    "PAPER_ESTIMATORS",
    "SUMMARY_COLUMNS",
    "COORD_COLUMNS",
    "CellResult",
    "cell_result",
    "compare",
    "evaluate",
    "format_spec",
    "make_estimator",
    "make_objective",
    "parse_grid",
    "parse_spec",
    "reference_gradient",
    "run_compare",
    "run_sweep",
    "run_train",
    "sweep",
    "train",
]

#: Columns of summary.csv, in order (the SPEC's columns first).
SUMMARY_COLUMNS = [
    "model",
    "estimator",
    "param",
    "draws",
    "bias_l2",
    "rel_bias",
    "variance",
    "mse",
    "cosine",
    "snr",
    "z_max",
    "p_unbiased",
    "evals_per_draw",
    "seconds_per_draw",
    "work_variance",
    # intervals and extras
    "dim",
    "unbiased",
    "backwards_per_draw",
    "bias_l2_lo",
    "bias_l2_hi",
    "bias_noise_floor",
    "variance_lo",
    "variance_hi",
    "mse_lo",
    "mse_hi",
    "cosine_lo",
    "cosine_hi",
    "snr_lo",
    "snr_hi",
    "work_variance_lo",
    "work_variance_hi",
    "work_variance_seconds",
    "grad_norm",
    "reference",
    "reference_se_l2",
    "tail_index",
    "heavy_tails",
    "level",
    "groups",
    "seed",
]

COORD_COLUMNS = [
    "model",
    "estimator",
    "param",
    "index",
    "reference",
    "reference_se",
    "mean",
    "bias",
    "se",
    "z",
    "z_corrected",
    "variance",
]

CHUNK_ELEMENTS = 1 << 22

#: How the confidence intervals are made (recorded in run.json).
INTERVALS = (
    "batch means: draws dealt round-robin into `groups` groups, statistic per group, "
    "estimate +- t_{level, groups-1} * sd/sqrt(groups); bias_l2 is the debiased "
    "sqrt(max(0, ||mean - g*||^2 - tr(Sigma)/N - ||r||^2)) with a leave-one-group-out "
    "jackknife interval on the squared bias; see stochgrad.analysis.stats"
)

#: What each summary column means (recorded in run.json as "columns").
COLUMN_MEANINGS = {
    "draws": "number N of gradient draws in the cell",
    "dim": "number d of coordinates of the parameter",
    "bias_l2": "debiased bias sqrt(max(0, ||mean - g*||^2 - tr(Sigma_hat)/N - ||r||^2)); "
    "about 0 for an unbiased estimator",
    "bias_l2_lo/hi": "level interval for bias_l2 (jackknife over groups on the squared bias; "
    "contains 0 for an unbiased estimator at the stated level)",
    "bias_noise_floor": "sqrt(tr(Sigma_hat)/N + ||r||^2): the typical ||mean - g*|| of an "
    "unbiased estimator from Monte Carlo noise alone",
    "rel_bias": "bias_l2 / ||g*||",
    "variance": "per-coordinate sample variance averaged over coordinates",
    "mse": "(1/(N d)) sum_n ||g_n - g*||^2",
    "cosine": "mean cosine between a draw and g*",
    "snr": "||g*|| / sqrt(d * variance)",
    "z_max": "max over coordinates of the skewness-corrected statistic |w_i| (Hall's "
    "transformation of z_i = (mean_i - g*_i) / se_i); p_unbiased = min(1, d erfc(z_max/sqrt 2))",
    "tail_index": "Hill estimate of the tail exponent of ||g_n - g*||^2 from its (up to) 65 "
    "largest values above 4x its mean; above 0.5 the draws look like a tail with index < 4",
    "heavy_tails": "tail_index > 0.5 (or NaN): the variance/mse intervals, and the snr and "
    "work_variance ones mapped from them, are not reliable (they under-cover)",
    "p_unbiased": "p-value of 'no coordinate is biased': skewness-corrected per-coordinate "
    "statistic, two-sided normal p-values, Bonferroni-Holm over coordinates",
    "evals_per_draw": "model evaluations per draw",
    "seconds_per_draw": "wall seconds per draw",
    "work_variance": "variance * evals_per_draw",
    "reference": "exact or estimated g*; reference_se_l2 = ||r||, its standard error",
    "level": "confidence level of every interval",
    "groups": "batch-means groups used by the intervals",
}

#: Model evaluations per cell in ``run_compare`` / ``run_sweep`` (the CLI) unless told.

# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "|" in text:  # tuples, e.g. hidden=3|2
        return [_parse_value(t) for t in text.split("|")]
    return text.strip()


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:[:\[](.*?)\]?)?\s*$")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` (or ``"name[k=v,...]"``) -> ``(name, {k: v, ...})``.

    Values: ``true``/``false``, int, float, ``a|b`` lists, else text (``none`` stays text).
    """
    if not isinstance(spec, str):
        raise TypeError(f"expected a spec string like 'name:key=value', got {type(spec).__name__}")
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(
            f"cannot parse {spec!r}; expected 'name' or 'name:key=value,key=value' "
            "(e.g. 'score_function:baseline=optimal')"
        )
    name, rest = m.group(1), m.group(2)
    options: dict[str, Any] = {}
    for part in (rest or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"option {part!r} in {spec!r} is not key=value")
        k, v = part.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise ValueError(f"option name {k!r} in {spec!r} is not a valid identifier")
        if k in options:
            raise ValueError(f"option {k!r} given twice in {spec!r}")
        options[k] = _parse_value(v)
    return name, options


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "|".join(_format_value(x) for x in v)
    return str(v)


def format_spec(name: str, options: Mapping[str, Any]) -> str:
    """Inverse of :func:`parse_spec`: ``name`` or ``name:k=v,...`` (options in given order)."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in options.items())


def make_objective(spec: Any, device: str | torch.device | None = None, **extra: Any) -> Any:
    """An objective from a spec string (or an objective passed through), on ``device``."""
    if not isinstance(spec, str):
        if extra:
            raise ValueError(f"options {sorted(extra)} given with an objective object")
        return spec if device is None else spec.to(device)
    name, options = parse_spec(spec)
    options.update(extra)
    if device is not None:
        accepts = inspect.signature(_models.lookup(name).__init__).parameters
        if "device" in accepts:
            options.setdefault("device", device)
            return _models.get(name, **options)
        return _models.get(name, **options).to(device)
    return _models.get(name, **options)


def make_estimator(spec: Any, **extra: Any) -> Any:
    """An estimator from a spec string (or an estimator object passed through)."""
    if not isinstance(spec, str):
        return _estimators.get(spec, **extra)
    name, options = parse_spec(spec)
    options.update(extra)
    return _estimators.get(name, **options)


def _estimator_label(spec: Any) -> str:
    if isinstance(spec, str):
        name, options = parse_spec(spec)
        return format_spec(name, options)
    label = getattr(spec, "label", None)
    return label() if callable(label) else str(getattr(spec, "name", type(spec).__name__))


def _model_label(spec: Any) -> str:
    if isinstance(spec, str):
        name, options = parse_spec(spec)
        return format_spec(name, options)
    return str(getattr(spec, "name", type(spec).__name__))


def parse_grid(text: str | Sequence[Any]) -> list[Any]:
    """A sweep grid: ``"a,b,c"``, ``"start:stop:num"`` (inclusive linspace) or a sequence.

    Raises ``ValueError`` for an empty grid.
    """
    values: list[Any]
    if isinstance(text, str):
        s = text.strip()
        if not s:
            raise ValueError("empty grid; give values 'a,b,c' or a range 'start:stop:num'")
        if ":" in s and "," not in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError(f"range grid {s!r} must be 'start:stop:num'")
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise ValueError(f"range grid {s!r} has num={num}; need at least 1 point")
            values = [float(v) for v in np.linspace(start, stop, num)]
            integral = not any(c in parts[0] + parts[1] for c in ".eE")
            if integral and all(v.is_integer() for v in values):
                values = [int(v) for v in values]  # e.g. num_samples over 2:8:4
        else:
            values = [_parse_value(v) for v in s.split(",") if v.strip()]
    else:
        values = list(text)
    if not values:
        raise ValueError("empty grid; give at least one value")
    return values


def _derived_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (stable across processes and platforms)."""
    ints = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for k in keys:
        ints.append(zlib.crc32(str(k).encode("utf-8")))
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


@dataclass
class CellResult:
    """The rows of one (model, estimator) cell: summary (per param) and per-coordinate."""

    summary: pd.DataFrame
    coords: pd.DataFrame
    seconds: float


def reference_gradient(
    objective: Any,
    *,
    reference: Any = None,
    reference_draws: int = 100_000,
    reference_estimator: Any = "score_function:baseline=leave_one_out,num_samples=4",
    seed: int = 0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(g*, se)`` per parameter: exact (``se = None``) when possible, else estimated.

    ``reference`` may be given: a dict ``{param: Tensor}`` (exact) or a pair ``(mean, se)``.
    Otherwise ``objective.exact_grad()`` is used, and if it fails (no enumeration possible)
    the mean of ``reference_draws`` draws of ``reference_estimator`` (which must be unbiased)
    with their standard error. An objective whose draws are costly may cap that number with
    a ``reference_draws`` attribute (the ``vae`` model's option of that name).
    """
    if reference is not None:
        if isinstance(reference, tuple):
            mean, se = reference
            return dict(mean), dict(se)
        return dict(reference), None
    try:
        exact = objective.exact_grad()
    except (ValueError, NotImplementedError, AttributeError, RuntimeError):
        exact = None
    if exact is not None:
        return {k: v.detach() for k, v in exact.items()}, None
    est = make_estimator(reference_estimator)
    if getattr(est, "unbiased", "yes") != "yes":
        raise ValueError(
            f"reference estimator {_estimator_label(reference_estimator)} is not unbiased "
            f"(unbiased={est.unbiased!r}); choose an unbiased one"
        )
    cap = getattr(objective, "reference_draws", None)
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 2:
        reference_draws = min(reference_draws, cap)
    ref_seed = _derived_seed(seed, "reference")
    means: dict[str, torch.Tensor] = {}
    ses: dict[str, torch.Tensor] = {}
    draws = _draw_chunks(objective, est, reference_draws, ref_seed, chunk_elements)
    # Stream all parameters through one pass of draws.
    accs: dict[str, GradientStats] = {}
    for chunk in draws:
        for k, v in chunk.items():
            accs.setdefault(k, GradientStats(None)).update(v)
    for k, acc in accs.items():
        shape = objective.params[k].shape
        s = acc.result()
        means[k] = s.per_coordinate["mean"].reshape(shape)
        ses[k] = s.per_coordinate["se"].reshape(shape)
    return means, ses


def _draw_chunks(
    objective: Any,
    est: Any,
    num_draws: int,
    seed: int,
    chunk_elements: int,
    progress: Callable[[int], None] | None = None,
    timer: list[float] | None = None,
) -> Iterable[dict[str, torch.Tensor]]:
    """Yield ``est.estimate`` outputs in chunks of draws (see the module docstring)."""
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2, got {num_draws!r}")
    d = sum(int(v.numel()) for v in objective.params.values())
    per_chunk = max(2, chunk_elements // max(1, d))
    device = next(iter(objective.params.values())).device
    done, k = 0, 0
    while done < num_draws:
        n = min(per_chunk, num_draws - done)
        s = seed if k == 0 else _derived_seed(seed, "chunk", k)
        _sync(device)
        t0 = time.perf_counter()
        out = est.estimate(objective, n, seed=s)
        _sync(device)
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        for name, v in out.items():
            if v.shape[0] != n:
                raise ValueError(
                    f"{_estimator_label(est)} returned {v.shape[0]} draws for {name!r}, "
                    f"expected {n}"
                )
        yield out
        done += n
        k += 1
        if progress is not None:
            progress(n)


MAX_SEED = 2**63 - 1


def check_run_options(
    *,
    num_draws: Any = None,
    level: Any = None,
    seed: Any = None,
    max_evals: Any = None,
    ints: Mapping[str, Any] | None = None,
) -> None:
    """Refuse bad run-level values before any cell runs or any directory is written.

    ``num_draws`` must be an int >= 2, ``level`` in (0, 1), ``seed`` an int in
    ``[0, 2^63 - 1]``, ``max_evals`` ``None`` or a positive finite number, and every entry of
    ``ints`` (name -> value, e.g. training steps) a positive int.
    """

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if num_draws is not None and not (is_int(num_draws) and num_draws >= 2):
        raise ValueError(f"draws must be an int >= 2 (a variance needs 2 draws), got {num_draws!r}")
    if level is not None and not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")
    if seed is not None and not (is_int(seed) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2^63 - 1], got {seed!r}")
    if max_evals is not None and not (
        isinstance(max_evals, (int, float)) and math.isfinite(max_evals) and max_evals > 0
    ):
        raise ValueError(
            f"max_evals must be a positive number (or 0/None: no cap), got {max_evals!r}"
        )
    for name, v in (ints or {}).items():
        if not (is_int(v) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _capped(table: pd.DataFrame, num_draws: int, max_evals: Any, echo: Any) -> dict[str, int]:
    """Cells that got fewer draws than ``num_draws`` (the ``max_evals`` cap); said once."""
    if table.empty or "draws" not in table:
        return {}
    cols = [c for c in ("model", "estimator", "sweep_value") if c in table]
    low = table[table["draws"] < num_draws].drop_duplicates(cols)
    caps = {" / ".join(str(r[c]) for c in cols): int(r["draws"]) for _, r in low.iterrows()}
    if caps:
        _log(
            echo,
            f"note: --draws {num_draws} is over the --max-evals {max_evals:g} budget of "
            f"{len(caps)} cell(s), which got fewer draws (fewest: {min(caps.values())}); see "
            "the draws column and run.json 'capped'; --max-evals 0 lifts the cap",
        )
    return caps



def cell_draws(num_draws: int, evals_per_draw: float, max_evals: float | None) -> int:
    """Draws for a cell under an evaluation budget.

    ``min(num_draws, max(MIN_CAPPED_DRAWS, floor(max_evals / evals_per_draw)))``: expensive
    estimators (finite differences: 2 evaluations per coordinate) get fewer draws, never fewer
    than ``MIN_CAPPED_DRAWS`` (nor more than ``num_draws``); ``max_evals=None``: no cap.
    """
    if max_evals is None or not math.isfinite(evals_per_draw) or evals_per_draw <= 0:
        return num_draws
    return min(num_draws, max(MIN_CAPPED_DRAWS, int(max_evals // evals_per_draw)))


def _cost(est: Any, objective: Any) -> tuple[float, float]:
    c = est.cost(objective)
    if hasattr(c, "evals"):
        return float(c.evals), float(c.backwards)
    evals, backwards = c
    return float(evals), float(backwards)


def evaluate(
    objective: Any,
    estimator: Any,
    num_draws: int = 10_000,
    seed: int = 0,
    *,
    reference: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
    model_label: str | None = None,
    estimator_label: str | None = None,
    level: float = 0.95,
    groups: int = 32,
    chunk_elements: int = CHUNK_ELEMENTS,
    max_evals: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> CellResult:
    """Statistics of one estimator on one objective (one cell), per parameter.

    ``reference`` is ``(g*, se)`` from :func:`reference_gradient` (computed when ``None``).
    ``max_evals`` caps the model evaluations of the cell (:func:`cell_draws`); the ``draws``
    column records the draws actually made.
    """
    est = make_estimator(estimator)
    model_label = model_label or _model_label(objective)
    estimator_label = estimator_label or _estimator_label(estimator)
    evals, backwards = _cost(est, objective)
    num_draws = cell_draws(num_draws, evals, max_evals)
    if reference is None:
        reference = reference_gradient(objective, seed=seed, chunk_elements=chunk_elements)
    ref, ref_se = reference
    accs = {
        k: GradientStats(ref[k], None if ref_se is None else ref_se[k], groups=groups)
        for k in objective.params
    }
    timer = [0.0]
    for chunk in _draw_chunks(objective, est, num_draws, seed, chunk_elements, progress, timer):
        for k, acc in accs.items():
            acc.update(chunk[k])
    return cell_result(
        accs,
        model_label=model_label,
        estimator_label=estimator_label,
        evals_per_draw=evals,
        backwards_per_draw=backwards,
        seconds=timer[0],
        level=level,
        unbiased=getattr(est, "unbiased", "unknown"),
        seed=seed,
    )


def cell_result(
    accs: Mapping[str, GradientStats],
    *,
    model_label: str,
    estimator_label: str,
    evals_per_draw: float,
    backwards_per_draw: float,
    seconds: float,
    level: float,
    unbiased: str,
    seed: int,
) -> CellResult:
    """The rows of one cell from its filled accumulators (one per parameter, in row order).

    ``seconds``: time spent drawing, divided by the draws for ``seconds_per_draw``. Shared by
    :func:`evaluate` and :func:`stochgrad.analysis.compare_pyro.compare_pyro`.
    """
    draws = next(iter(accs.values())).count
    sec = seconds / draws
    rows, coord_frames = [], []
    for k, acc in accs.items():
        s: Summary = acc.result(evals_per_draw=evals_per_draw, seconds_per_draw=sec, level=level)
        row: dict[str, Any] = {"model": model_label, "estimator": estimator_label, "param": k}
        row.update(s.as_dict())
        row.update(unbiased=unbiased, backwards_per_draw=backwards_per_draw, seed=seed)
        rows.append(row)
        pc = s.per_coordinate
        n = len(pc["mean"])
        frame = pd.DataFrame(
            {
                "model": model_label,
                "estimator": estimator_label,
                "param": k,
                "index": np.arange(n),
                **{c: pc[c].numpy() for c in COORD_COLUMNS[4:] if c in pc},
            }
        )
        coord_frames.append(frame)
    summary = pd.DataFrame(rows)[SUMMARY_COLUMNS]
    assert set(SUMMARY_FIELDS) <= set(summary.columns)
    coords = pd.concat(coord_frames, ignore_index=True)
    return CellResult(summary=summary, coords=coords, seconds=seconds)


def compare(
    objective: Any,
    estimators: Sequence[Any] | None = None,
    num_draws: int = 10_000,
    seed: int = 0,
    *,
    reference: Any = None,
    level: float = 0.95,
    groups: int = 32,
    chunk_elements: int = CHUNK_ELEMENTS,
    skip_inapplicable: bool = False,
) -> pd.DataFrame:
    """One row per (model, estimator, parameter) with the SPEC summary columns.

    Args:
        objective: a model object (``stochgrad.models.get(...)``) or a model spec string.
        estimators: names, spec strings or estimator objects (default: the paper's set,
            :data:`PAPER_ESTIMATORS`).
        num_draws: draws per estimator (each draw is one independent gradient estimate).
        seed: all estimators use this seed (common random numbers).
        reference: optional ``{param: g*}`` or ``(g*, se)``; default exact or estimated (see
            :func:`reference_gradient`); column ``reference`` says which.
        skip_inapplicable: skip, instead of raising, estimators that refuse the model with a
            ``ValueError``/``TypeError`` while estimating (e.g. ``exact`` on a model too large
            to enumerate); they are listed in ``table.attrs["skipped"]``.

    Returns:
        ``pandas.DataFrame`` with :data:`SUMMARY_COLUMNS`.
    """
    objective = make_objective(objective)
    specs = list(PAPER_ESTIMATORS if estimators is None else estimators)
    if not specs:
        raise ValueError("no estimators given; pass names such as 'score_function'")
    ests = [make_estimator(s) for s in specs]  # validate every name/option up front
    labels = _unique([_estimator_label(s) for s in specs])
    ref = reference_gradient(
        objective, reference=reference, seed=seed, chunk_elements=chunk_elements
    )
    frames, skipped = [], []
    for est, label in zip(ests, labels):
        try:
            cell = evaluate(
                objective, est, num_draws, seed, reference=ref, estimator_label=label,
                level=level, groups=groups, chunk_elements=chunk_elements,
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            if not skip_inapplicable:
                raise
            skipped.append({"estimator": label, "reason": str(e)})
            continue
        frames.append(cell.summary)
    table = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    )
    table.attrs["skipped"] = skipped
    return table


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


# ---------------------------------------------------------------------------------------------
# Runs over many cells, with a results directory
# ---------------------------------------------------------------------------------------------


def _progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    # enabled=None: show on an interactive terminal only.
    return tqdm(total=total, desc=desc, unit="draw", unit_scale=True, disable=_disable(enabled))


def _disable(enabled: bool | None) -> bool | None:
    return None if enabled is None else not enabled


def _cell_key(*parts: Any) -> str:
    return " | ".join(str(p) for p in parts)


def _open_results(out: Any, kind: str, config: dict[str, Any], device: Any) -> Any:
    from .results import ResultsDir, environment

    if out is None:
        return None
    return ResultsDir(out, kind, config).open(environment(str(device) if device else "cpu"))


def _log(echo: Callable[[str], None] | None, msg: str) -> None:
    if echo is not None:
        echo(msg)


def _executor(executor: Any) -> Any:
    from .executor import LocalExecutor

    return LocalExecutor() if executor is None else executor


def run_compare(
    models: Sequence[str] = DEFAULT_MODELS,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    num_draws: int = 10_000,
    seed: int = 0,
    *,
    out: Any = None,
    device: str = "cpu",
    level: float = 0.95,
    groups: int = 32,
    reference_draws: int = 100_000,
    chunk_elements: int = CHUNK_ELEMENTS,
    max_evals: float | None = DEFAULT_MAX_EVALS,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    executor: Any = None,
) -> pd.DataFrame:
    """Every estimator spec on every model spec; one results cell per pair.

    ``max_evals`` caps the model evaluations per cell (see :func:`cell_draws`).
    ``executor``: where the cells run (:mod:`stochgrad.analysis.executor`; default here).

    Names and options are all checked before any work or any write. With ``out``, each
    finished cell is appended to the results directory and finished cells found there are
    not recomputed (see :mod:`stochgrad.analysis.results`). Estimators that refuse a model
    (``ValueError``/``TypeError`` while estimating, e.g. ``exact`` beyond its enumeration
    limit) are skipped with the reason recorded in ``run.json`` and ``table.attrs``.
    """
    check_run_options(num_draws=num_draws, level=level, seed=seed, max_evals=max_evals)
    models, estimators = list(models), list(estimators)
    if not models:
        raise ValueError("no models given; e.g. --models toy:target=0.45 sbn")
    if not estimators:
        raise ValueError("no estimators given; e.g. --estimators score_function straight_through")
    objectives = [make_objective(m, device) for m in models]
    m_labels = _unique([_model_label(m) for m in models])
    for e in estimators:
        make_estimator(e)
    e_labels = _unique([_estimator_label(e) for e in estimators])
    config = {
        "models": m_labels,
        "model_options": [o.options() if hasattr(o, "options") else None for o in objectives],
        "estimators": e_labels,
        "draws": num_draws,
        "seed": seed,
        "device": str(device),
        "level": level,
        "groups": groups,
        "reference_draws": reference_draws,
        "chunk_elements": chunk_elements,
        "max_evals": max_evals,
    }
    results = _open_results(out, "compare", config, device)
    plan = [_cell_key(m, e) for m in m_labels for e in e_labels]
    done = results.done() if results is not None else set()
    todo = [k for k in plan if k not in done]
    if results is not None and done & set(plan):
        _log(echo, f"resuming {out}: {len(done & set(plan))} of {len(plan)} cells already done")
    t_start = time.perf_counter()
    frames: dict[str, pd.DataFrame] = {}
    skipped: list[dict[str, str]] = []
    ex = _executor(executor)
    labels: dict[str, tuple[str, str]] = {}

    def cells() -> Iterable[Any]:  # lazily: the reference is made just before a model's cells
        from .executor import Cell

        for obj, m_label in zip(objectives, m_labels):
            ref = None
            for spec, e_label in zip(estimators, e_labels):
                key = _cell_key(m_label, e_label)
                if key not in todo:
                    continue
                if ref is None:
                    ref = reference_gradient(
                        obj, seed=seed, reference_draws=reference_draws,
                        chunk_elements=chunk_elements,
                    )  # fmt: skip
                labels[key] = (m_label, e_label)
                kwargs = dict(
                    reference=ref, model_label=m_label, estimator_label=e_label, level=level,
                    groups=groups, chunk_elements=chunk_elements, max_evals=max_evals,
                )  # fmt: skip
                yield Cell(key, evaluate, (obj, make_estimator(spec), num_draws, seed), kwargs,
                           f"{m_label} / {e_label}", "progress")  # fmt: skip

    enabled = progress if ex.in_process else False  # a Ray run shows a bar over cells
    with _progress_bar(len(todo) * num_draws, "compare", enabled) as bar:
        for c, cell in ex.run(cells(), bar):
            key = c.key
            m_label, e_label = labels[key]
            if isinstance(cell, Exception):  # refused the model: in table.attrs and run.json
                skipped.append({"model": m_label, "estimator": e_label, "reason": str(cell)})
                bar.update(num_draws)
                continue
            bar.update(num_draws - int(cell.summary["draws"].iloc[0]))
            frames[key] = cell.summary
            if results is not None:
                results.append(key, cell.summary, cell.coords)
    wall = time.perf_counter() - t_start
    if results is not None:
        table = results.rebuild(plan)
        capped = _capped(table, num_draws, max_evals, echo)
        results.finish(
            skipped=skipped, wall_seconds=round(wall, 3), intervals=INTERVALS, capped=capped,
            columns=COLUMN_MEANINGS,
        )
    else:
        ordered = [frames[k] for k in plan if k in frames]
        table = pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame()
        _capped(table, num_draws, max_evals, echo)
    table.attrs["skipped"] = skipped
    return table


SWEEP_ESTIMATORS = tuple(e for e in PAPER_ESTIMATORS if e not in ("finite_difference", "exact"))


def _resolve_sweep_target(model: str, param: str) -> tuple[str, str]:
    """``(target, option)``: whether ``param`` is a model option or an estimator option."""
    if param.startswith("model."):
        return "model", param[len("model.") :]
    if param.startswith("estimator."):
        return "estimator", param[len("estimator.") :]
    name, _ = parse_spec(model)
    model_opts = [p for p in inspect.signature(_models.lookup(name).__init__).parameters]
    if param in model_opts:
        return "model", param
    est_opts = sorted(
        {o for n in _estimators.available() for o in _estimators.lookup(n).option_names()}
    )
    if param in est_opts:
        return "estimator", param
    mo = ", ".join(p for p in model_opts if p not in ("self", "device", "dtype"))
    raise ValueError(
        f"unknown sweep parameter {param!r}: not an option of model {name!r} ({mo}) nor of any "
        f"estimator ({', '.join(est_opts)})"
    )


def _sweep_default_estimators(target: str, option: str) -> list[str]:
    if target == "model":
        return list(SWEEP_ESTIMATORS)
    out = []
    for spec in PAPER_ESTIMATORS:
        name, _ = parse_spec(spec)
        if option in _estimators.lookup(name).option_names():
            out.append(spec)
    return out


def run_sweep(
    model: str = "toy:target=0.45",
    param: str = "logits",
    grid: str | Sequence[Any] = "-3:3:7",
    estimators: Sequence[str] | None = None,
    num_draws: int = 5_000,
    seed: int = 0,
    *,
    out: Any = None,
    device: str = "cpu",
    level: float = 0.95,
    groups: int = 32,
    reference_draws: int = 100_000,
    chunk_elements: int = CHUNK_ELEMENTS,
    max_evals: float | None = DEFAULT_MAX_EVALS,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    cell_hook: Callable[[str], None] | None = None,
    executor: Any = None,
) -> pd.DataFrame:
    """Statistics of each estimator at every value of a model or estimator option.

    ``param`` is an option of the model (``logits``, ``target``, ``dim``, ...) or of the
    estimators (``num_samples``, ``c``, ``sigma``, ``eps``, ...); prefix ``model.`` or
    ``estimator.`` to disambiguate. ``grid``: see :func:`parse_grid`. The table has the
    summary columns plus ``sweep_param`` and ``sweep_value``; ``estimator`` keeps the label
    given (without the swept option) so that one estimator is one series.
    ``cell_hook(key)`` is called after each finished cell (used by tests to interrupt).
    ``executor``: where the cells run (:mod:`stochgrad.analysis.executor`; default here).
    """
    check_run_options(num_draws=num_draws, level=level, seed=seed, max_evals=max_evals)
    values = parse_grid(grid)
    target, option = _resolve_sweep_target(model, param)
    m_name, m_opts = parse_spec(model)
    if target == "model" and option in m_opts:
        raise ValueError(f"{option!r} is both fixed in the model spec {model!r} and swept")
    specs = list(estimators) if estimators else _sweep_default_estimators(target, option)
    if not specs:
        raise ValueError(f"no estimator has the option {option!r}; nothing to sweep")
    e_labels = _unique([_estimator_label(e) for e in specs])
    m_label = _model_label(model)
    # Validate every (value, estimator) before any work or write.
    for v in values:
        if target == "model":
            make_objective(model, device, **{option: v})
        for spec in specs:
            if target == "estimator":
                name, opts = parse_spec(spec) if isinstance(spec, str) else (None, {})
                if option in opts:
                    raise ValueError(f"{option!r} is both fixed in {spec!r} and swept")
                make_estimator(spec, **{option: v})
            else:
                make_estimator(spec)
    config = {
        "model": m_label,
        "sweep_param": param,
        "grid": values,
        "estimators": e_labels,
        "draws": num_draws,
        "seed": seed,
        "device": str(device),
        "level": level,
        "groups": groups,
        "reference_draws": reference_draws,
        "chunk_elements": chunk_elements,
        "max_evals": max_evals,
    }
    results = _open_results(out, "sweep", config, device)
    plan = [_cell_key(m_label, e, f"{option}={v}") for v in values for e in e_labels]
    done = results.done() if results is not None else set()
    todo = set(plan) - done
    if results is not None and done & set(plan):
        _log(echo, f"resuming {out}: {len(done & set(plan))} of {len(plan)} cells already done")
    frames: dict[str, pd.DataFrame] = {}
    skipped: list[dict[str, str]] = []
    t_start = time.perf_counter()
    ex = _executor(executor)
    swept: dict[str, Any] = {}

    def cells() -> Iterable[Any]:  # lazily: each reference just before its cells
        from .executor import Cell

        shared_obj = make_objective(model, device) if target == "estimator" else None
        shared_ref = None
        for v in values:
            keys = {e: _cell_key(m_label, e, f"{option}={v}") for e in e_labels}
            if not any(k in todo for k in keys.values()):
                continue
            if target == "model":
                obj = make_objective(model, device, **{option: v})
                ref = reference_gradient(
                    obj, seed=seed, reference_draws=reference_draws, chunk_elements=chunk_elements
                )
            else:
                obj = shared_obj
                if shared_ref is None:
                    shared_ref = reference_gradient(
                        obj, seed=seed, reference_draws=reference_draws,
                        chunk_elements=chunk_elements,
                    )  # fmt: skip
                ref = shared_ref
            for spec, e_label in zip(specs, e_labels):
                key = keys[e_label]
                if key not in todo:
                    continue
                extra = {option: v} if target == "estimator" else {}
                swept[key] = v
                kwargs = dict(
                    reference=ref, model_label=m_label, estimator_label=e_label, level=level,
                    groups=groups, chunk_elements=chunk_elements, max_evals=max_evals,
                )  # fmt: skip
                yield Cell(key, evaluate, (obj, make_estimator(spec, **extra), num_draws, seed),
                           kwargs, f"{e_label} {option}={v}", "progress")  # fmt: skip

    enabled = progress if ex.in_process else False  # a Ray run shows a bar over cells
    with _progress_bar(len(todo) * num_draws, "sweep", enabled) as bar:
        for c, cell in ex.run(cells(), bar):
            key, v = c.key, swept[c.key]
            if isinstance(cell, Exception):
                skipped.append({"cell": key, "reason": str(cell)})
                _log(echo, f"skipped {key}: {str(cell).splitlines()[0]}")
                bar.update(num_draws)
                continue
            bar.update(num_draws - int(cell.summary["draws"].iloc[0]))
            summary = cell.summary.assign(sweep_param=param, sweep_value=v)
            coords = cell.coords.assign(sweep_param=param, sweep_value=v)
            frames[key] = summary
            if results is not None:
                results.append(key, summary, coords)
            if cell_hook is not None:
                cell_hook(key)
    wall = time.perf_counter() - t_start
    if results is not None:
        table = results.rebuild(plan)
        capped = _capped(table, num_draws, max_evals, echo)
        results.finish(
            skipped=skipped, wall_seconds=round(wall, 3), intervals=INTERVALS, capped=capped,
            columns=COLUMN_MEANINGS,
        )
    else:
        ordered = [frames[k] for k in plan if k in frames]
        table = pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame()
        _capped(table, num_draws, max_evals, echo)
    table.attrs["skipped"] = skipped
    return table


def sweep(
    model: str,
    param: str,
    grid: str | Sequence[Any],
    estimators: Sequence[str] | None = None,
    num_draws: int = 5_000,
    seed: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`run_sweep` without a results directory: the table only."""
    kwargs.setdefault("progress", False)
    return run_sweep(model, param, grid, estimators, num_draws, seed, out=None, **kwargs)


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------

TRAIN_COLUMNS = ["model", "estimator", "seed", "step", "loss", "seconds"]


def _expected_cost(obj: Any, seed: int, mc_draws: int = 4096) -> float:
    """Exact ``E[L]`` where the model provides it, else a Monte Carlo mean (fixed seed)."""
    try:
        return float(obj.expected_cost())
    except (ValueError, NotImplementedError, AttributeError, RuntimeError):
        pass
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return float(obj(mc_draws).mean())


def train(
    model: str,
    estimator: Any,
    *,
    steps: int = 200,
    lr: float = 0.05,
    batch: int = 1,
    seed: int = 0,
    eval_every: int = 10,
    device: str = "cpu",
    model_label: str | None = None,
    estimator_label: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Plain SGD driven by one estimator: ``theta <- theta - lr * mean_b g_b``.

    Each step draws ``batch`` estimates with ``est.estimate(obj, batch, seed=...)`` (seeds
    derived from ``seed`` and the step) and moves the parameters by their mean. The loss
    recorded every ``eval_every`` steps is the exact expected cost where the model has one
    (enumeration / closed form), else a fixed-seed Monte Carlo mean.
    Returns rows ``model, estimator, seed, step, loss, seconds`` (seconds spent estimating).
    """
    for label, v in [("steps", steps), ("batch", batch), ("eval_every", eval_every)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    obj = make_objective(model, device)
    est = make_estimator(estimator)
    model_label = model_label or _model_label(model)
    estimator_label = estimator_label or _estimator_label(estimator)
    rows = []
    spent = 0.0
    dev = next(iter(obj.params.values())).device
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            loss = _expected_cost(obj, seed)
            rows.append((model_label, estimator_label, seed, step, loss, spent))
            if not math.isfinite(loss):
                break
        if step == steps:
            break
        _sync(dev)
        t0 = time.perf_counter()
        g = est.estimate(obj, batch, seed=_derived_seed(seed, "train", step))
        _sync(dev)
        spent += time.perf_counter() - t0
        with torch.no_grad():
            for k, p in obj.params.items():
                p.sub_(lr * g[k].mean(0))
        if progress is not None:
            progress(1)
    return pd.DataFrame(rows, columns=TRAIN_COLUMNS)



def run_train(
    model: str = "sbn",
    estimators: Sequence[str] = TRAIN_ESTIMATORS,
    *,
    seeds: int = 3,
    steps: int = 200,
    lr: float = 0.05,
    batch: int = 1,
    eval_every: int = 10,
    seed: int = 0,
    out: Any = None,
    device: str = "cpu",
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    executor: Any = None,
) -> pd.DataFrame:
    """Training curves of every estimator over ``seeds`` seeds (``seed, seed+1, ...``).

    One results cell per (estimator, seed); ``summary.csv`` holds the curves
    (:data:`TRAIN_COLUMNS`). Estimators that refuse the model are skipped (run.json says why).
    """
    check_run_options(seed=seed, ints={"steps": steps, "batch": batch, "eval_every": eval_every})
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    estimators = list(estimators)
    if not estimators:
        raise ValueError("no estimators given")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    make_objective(model, device)
    for e in estimators:
        make_estimator(e)
    e_labels = _unique([_estimator_label(e) for e in estimators])
    m_label = _model_label(model)
    config = {
        "model": m_label,
        "estimators": e_labels,
        "seed": seed,
        "seeds": seeds,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "eval_every": eval_every,
        "device": str(device),
    }
    results = _open_results(out, "train", config, device)
    run_seeds = [seed + i for i in range(seeds)]
    plan = [_cell_key(m_label, e, f"seed={s}") for e in e_labels for s in run_seeds]
    done = results.done() if results is not None else set()
    todo = set(plan) - done
    frames: dict[str, pd.DataFrame] = {}
    skipped: list[dict[str, str]] = []
    from tqdm.auto import tqdm

    ex = _executor(executor)

    def cells() -> Iterable[Any]:
        from .executor import Cell

        for spec, e_label in zip(estimators, e_labels):
            for s in run_seeds:
                key = _cell_key(m_label, e_label, f"seed={s}")
                if key not in todo:
                    continue
                kwargs = dict(
                    steps=steps, lr=lr, batch=batch, seed=s, eval_every=eval_every, device=device,
                    model_label=m_label, estimator_label=e_label,
                )  # fmt: skip
                yield Cell(key, train, (model, spec), kwargs, f"{e_label} seed={s}", "progress")

    enabled = progress if ex.in_process else False  # a Ray run shows a bar over cells
    with tqdm(
        total=len(todo) * steps, desc="train", unit="step", disable=_disable(enabled)
    ) as bar:
        for c, curve in ex.run(cells(), bar):
            key = c.key
            if isinstance(curve, Exception):
                skipped.append({"cell": key, "reason": str(curve)})
                _log(echo, f"skipped {key}: {str(curve).splitlines()[0]}")
                continue
            frames[key] = curve
            if results is not None:
                results.append(key, curve, None)
    if results is not None:
        table = results.rebuild(plan)
        results.finish(skipped=skipped)
    else:
        ordered = [frames[k] for k in plan if k in frames]
        table = pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame()
    table.attrs["skipped"] = skipped
    return table


callable_module(__name__, compare)
