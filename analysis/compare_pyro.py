"""Estimator comparisons on a Pyro model and guide: the table of :func:`compare`, for programs.

    table = analysis.compare_pyro(model, guide, ["score_function:baseline=optimal",
                                                 "straight_through"], 10_000, 0, data)

One row per (estimator, parameter), with the columns of
:data:`~stochgrad.analysis.compare.SUMMARY_COLUMNS` (the same statistics, from the same
accumulators and row-building code as :func:`~stochgrad.analysis.compare.compare`). The
parameters are the Pyro params the guide and the model read (guide's first, in the order they
are first read); gradients are those of the loss ``-ELBO`` with respect to the *unconstrained*
values in Pyro's parameter store (what ``pyro.infer.SVI`` steps on).

Draws. A draw is the gradient one ``loss_and_grads`` call of the ELBO leaves at the current
parameters: :class:`~stochgrad.estimators.elbo.EstimatorELBO` with the estimator at every
*discrete* guide site (``Bernoulli``, ``Categorical``, ``OneHotCategorical``; continuous sites
keep Pyro's pathwise gradient), or with a dict ``{site: estimator}`` entry at the sites it names
(the others left to Pyro); ``num_particles`` is the estimator's ``num_samples`` (``K`` for the
leave-one-out baseline), else 1. The rows ``pyro:tracegraph`` and ``pyro:tracegraph+avg`` are
Pyro's own ``TraceGraph_ELBO``, the second with ``infer={"baseline":
{"use_decaying_avg_baseline": True}}`` set on the discrete guide sites. Stateful baselines keep
updating over the draws, as in training, after ``warmup`` calls of the ELBO (chunks when
vectorised) made first; ``warmup=None`` (default) makes ``n`` calls for a row with a stateful
baseline, the fewest after which ``decay ** n <= 1e-3`` (66 for Pyro's ``baseline_beta = 0.9``),
and none otherwise. ``exact`` at a site enumerates every unit of the sites it serves jointly
(``2 ** units`` runs a draw): it is not among the defaults.

Vectorised draws. When the program allows it, ``chunk_draws`` draws are one ELBO call: the
model and guide run inside an extra outermost plate of draws (dim ``-(max_plate_nesting + 1)``)
in which every Pyro param is read as a per-draw copy (its unconstrained value expanded to the
left, then constrained), so draw ``n``'s gradient is the gradient of the summed loss with
respect to copy ``n``. A program "allows it" when a pilot of such a call runs, validates, gives
gradients of the per-draw shapes, and draw 0's gradient is unchanged when the other draws'
parameter copies are moved (draws do not interact). Otherwise (or with ``vectorize=False``) the
draws are sequential calls of the ELBO on the program as written, with a progress bar: under
seed ``seed`` that is exactly ``pyro.set_rng_seed(seed)`` followed by ``num_draws`` calls of
``elbo.loss_and_grads(model, guide, *args)``. Vectorised chunk ``k`` runs under ``seed``
(``k = 0``) or a seed derived from ``(seed, k)``; every chunk has ``chunk_draws`` draws (a
stateful baseline keeps one shape), those past ``num_draws`` are dropped.

Reference. Exact (``reference = "exact"``) when every latent guide site is discrete, each has
no event dims (``TraceEnum_ELBO`` enumerates only batch elements) and the product over sites of
their numbers of values is at most ``max_enum`` (default 65,536): the gradient of
``TraceEnum_ELBO(...).differentiable_loss(model, config_enumerate(guide))`` by autograd.
Otherwise (or when enumeration fails) it is estimated (``reference = "estimated"``) from
``reference_draws`` draws of the score function with the leave-one-out baseline (``K = 4``
particles per draw) at every discrete site, under a seed derived from ``seed``; its standard
error enters the z-test and the bias interval, as in :func:`compare`.

Checks (before any draw, and before a results directory is created): the guide must have a
discrete latent site; a dict entry may name only discrete guide sites; every latent guide site
must be a latent site of the model with the same shape; the estimators must accept the sites.
Each failure is a ``ValueError`` or ``TypeError`` naming the problem.

Costs: ``evals_per_draw`` is the number of guide executions one (sequential) draw makes
(particles times the estimator's extra runs: configurations for ``exact``, perturbed re-runs
for the perturbation estimators), counted on a pilot; ``backwards_per_draw`` is 1;
``seconds_per_draw`` is measured.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import transform_to

from stochgrad.estimators.distributions import KINDS, unwrap
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.handlers import estimator_config
from stochgrad.estimators.score_function import WARMUP_RESIDUAL

from ._callable import callable_module
from .compare import (
    COLUMN_MEANINGS,
    INTERVALS,
    SUMMARY_COLUMNS,
    CellResult,
    _cell_key,
    _derived_seed,
    _estimator_label,
    _open_results,
    _progress_bar,
    _unique,
    cell_result,
    check_run_options,
    make_estimator,
)
from .stats import GradientStats

__all__ = [
    "DEFAULT_PYRO_ESTIMATORS",
    "MAX_ENUM",
    "PYRO_ROWS",
    "compare_pyro",
    "load_program",
    "run_compare_pyro",
]

#: Pyro's own ELBO as rows of the table.
PYRO_ROWS = ("pyro:tracegraph", "pyro:tracegraph+avg")

DEFAULT_PYRO_ESTIMATORS = (
    "score_function:baseline=none",
    "score_function:baseline=moving_average",
    "score_function:baseline=optimal",
    "score_function:baseline=leave_one_out",
    "straight_through",
    *PYRO_ROWS,
)

#: Largest product of the guide's per-site numbers of values enumerated for the exact reference.
MAX_ENUM = 1 << 16

#: Pyro's default ``baseline_beta`` of ``use_decaying_avg_baseline``.
PYRO_BASELINE_BETA = 0.90

REFERENCE_ESTIMATOR = "score_function:baseline=leave_one_out,num_samples=4"

DRAWS_PLATE = "__compare_pyro_draws"


# ---------------------------------------------------------------------------------------------
# The program: sites, params, checks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Program:
    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    max_plate_nesting: int
    params: list[str]  # guide's then model's, first read order
    discrete: dict[str, dict[str, Any]]  # name -> {"kind", "event_dim", "values", "shape"}
    continuous: list[str] = field(default_factory=list)


def _message(e: BaseException) -> str:
    """An exception's text on one line, without the trace-shape table Pyro appends."""
    return " ".join(str(e).split("\nTrace Shapes:")[0].split())


def _fn_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def _run_traced(fn: Callable, args: tuple, kwargs: dict, what: str, trace: Any = None) -> Any:
    program = fn if trace is None else poutine.replay(fn, trace=trace)
    try:
        return poutine.trace(program).get_trace(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AssertionError) as e:
        raise ValueError(f"running the {what} failed: {type(e).__name__}: {_message(e)}") from e


def _plate_depth(trace: Any) -> int:
    depth = 0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for f in site["cond_indep_stack"]:
            if f.vectorized and f.dim is not None:
                depth = max(depth, -f.dim)
    return depth


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _inspect(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int | None,
    seed: int,
) -> _Program:
    """Run guide and model once (forked random state) and check that they fit together."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not callable(guide):
        raise TypeError(f"guide must be callable, got {type(guide).__name__}")
    with _forked_rng(seed), pyro.validation_enabled(True):
        gtr = _run_traced(guide, args, kwargs, f"guide {_fn_name(guide)!r}")
        mtr = _run_traced(model, args, kwargs, f"model {_fn_name(model)!r}", trace=gtr)
    params: list[str] = []
    for tr in (gtr, mtr):
        for name, site in tr.nodes.items():
            if site["type"] == "param" and name not in params:
                params.append(name)
    if not params:
        raise ValueError(
            f"the guide {_fn_name(guide)!r} and model {_fn_name(model)!r} read no pyro.param; "
            "there is no gradient to compare"
        )
    discrete: dict[str, dict[str, Any]] = {}
    continuous: list[str] = []
    mnodes = mtr.nodes
    for name, site in gtr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        msite = mnodes.get(name)
        if msite is None or msite["type"] != "sample":
            raise ValueError(
                f"model/guide mismatch: guide site {name!r} is not a sample site of the model "
                f"{_fn_name(model)!r}"
            )
        if msite["is_observed"]:
            raise ValueError(
                f"model/guide mismatch: guide site {name!r} is observed in the model; only "
                "latent model sites can be sampled by the guide"
            )
        gshape = _shape(site["value"])
        mshape = tuple(msite["fn"].shape())
        if gshape != mshape:
            raise ValueError(
                f"model/guide mismatch: site {name!r} has shape {gshape} in the guide but the "
                f"model's distribution there has shape {mshape}"
            )
        base = unwrap(site["fn"])
        kind = type(base).__name__
        if kind in KINDS:
            event_dim = int(site["fn"].event_dim)
            if kind == "Bernoulli":
                values = 2
            else:
                values = int(base.logits.shape[-1])
            discrete[name] = {
                "kind": kind,
                "event_dim": event_dim - (1 if kind == "OneHotCategorical" else 0),
                "values": values,
                "shape": gshape,
            }
        else:
            continuous.append(name)
    for name, site in mnodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and name not in gtr.nodes
        ):
            raise ValueError(
                f"model/guide mismatch: model latent site {name!r} is not sampled by the guide "
                f"{_fn_name(guide)!r}"
            )
    if not discrete:
        raise ValueError(
            f"the guide {_fn_name(guide)!r} has no discrete latent sample site (Bernoulli, "
            "Categorical, OneHotCategorical); gradient estimators for stochastic units apply "
            "only there"
        )
    depth = max(_plate_depth(gtr), _plate_depth(mtr))
    if max_plate_nesting is None:
        max_plate_nesting = depth
    elif not isinstance(max_plate_nesting, int) or max_plate_nesting < depth:
        raise ValueError(
            f"max_plate_nesting={max_plate_nesting!r} is below the program's plate depth {depth}"
        )
    return _Program(model, guide, args, kwargs, max_plate_nesting, params, discrete, continuous)


# ---------------------------------------------------------------------------------------------
# Random state and the parameter store
# ---------------------------------------------------------------------------------------------


def _seed(seed: int) -> None:
    """``pyro.set_rng_seed(seed)``, for any seed in ``[0, 2^63)`` (NumPy takes 32 bits)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (the global state, as Pyro seeds it)


@contextmanager
def _forked_rng(seed: int | None = None) -> Any:
    """Restore torch's, NumPy's and Python's global random states afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            _seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


@contextmanager
def _kept_store() -> Any:
    """Leave the parameter store as found: values, constraints, ``.grad`` and names."""
    ps = pyro.get_param_store()
    state = ps.get_state()
    params = dict(ps.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    grads = {k: v.grad for k, v in params.items()}
    try:
        yield
    finally:
        for name in list(ps.keys()):
            if name not in state["params"]:
                del ps[name]
        now = dict(ps.named_parameters())
        with torch.no_grad():
            for k, v in now.items():
                if k in values:
                    v.copy_(values[k])
                    v.grad = grads[k]


def _unconstrained(name: str) -> tuple[torch.Tensor, Any]:
    ps = pyro.get_param_store()
    return dict(ps.named_parameters())[name], ps._constraints[name]


# ---------------------------------------------------------------------------------------------
# What one row runs
# ---------------------------------------------------------------------------------------------


@dataclass
class _Row:
    label: str
    kind: str  # "estimator" or "pyro"
    config: dict[str, Any]  # site -> estimator (kind "estimator"), site -> None ("pyro")
    avg_baseline: bool = False
    particles: int = 1
    unbiased: str = "yes"
    decay: float | None = None  # a stateful baseline's decay (None: no state)

    def warmup(self, warmup: int | None) -> int:
        """Calls before the measured draws: ``warmup``, or (``None``) enough for the state."""
        if warmup is not None:
            return warmup
        if self.decay is None:
            return 0
        return math.ceil(math.log(WARMUP_RESIDUAL) / math.log(self.decay) - 1e-9)

    def fresh(self) -> _Row:
        """A copy with fresh estimator objects (for a pilot that must not touch the state)."""
        return _Row(
            self.label, self.kind, copy.deepcopy(self.config), self.avg_baseline,
            self.particles, self.unbiased, self.decay,
        )  # fmt: skip

    def elbo(self, max_plate_nesting: int, vectorized: bool) -> Any:
        k = self.particles
        kw: dict[str, Any] = dict(num_particles=k, max_plate_nesting=max_plate_nesting)
        if vectorized and k > 1:
            kw["vectorize_particles"] = True
        if self.kind == "pyro":
            return TraceGraph_ELBO(**kw)
        return EstimatorELBO(**kw)

    def guide(self, guide: Callable) -> Callable:
        if self.kind == "pyro":
            if not self.avg_baseline:
                return guide
            sites = set(self.config)

            def avg(msg: Any) -> dict[str, Any]:
                if msg["name"] in sites:
                    return {"baseline": {"use_decaying_avg_baseline": True}}
                return {}

            return poutine.infer_config(guide, cast(Any, avg))
        return estimator_config(guide, dict(self.config))


def _particles(est: Any) -> int:
    k = getattr(est, "num_samples", 1)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 1


def _combined_unbiased(values: Iterable[str]) -> str:
    vals = set(values)
    if vals == {"yes"}:
        return "yes"
    if "no" in vals:
        return "no"
    return vals.pop() if len(vals) == 1 else "unknown"


def _make_rows(entries: Sequence[Any], program: _Program) -> list[_Row]:
    sites = list(program.discrete)
    specs = list(entries)
    if not specs:
        raise ValueError("no estimators given; pass names such as 'score_function'")
    labels: list[str] = []
    rows: list[_Row] = []
    for entry in specs:
        if isinstance(entry, str) and entry.strip() in PYRO_ROWS:
            name = entry.strip()
            avg = name.endswith("+avg")
            rows.append(
                _Row(name, "pyro", {s: None for s in sites}, avg_baseline=avg,
                     decay=PYRO_BASELINE_BETA if avg else None)
            )  # fmt: skip
            labels.append(name)
            continue
        if isinstance(entry, Mapping):
            if not entry:
                raise ValueError("an estimator entry is an empty dict; name at least one site")
            unknown = [k for k in entry if k not in program.discrete]
            if unknown:
                raise ValueError(
                    f"estimator config names site(s) {', '.join(repr(k) for k in unknown)}, not "
                    f"discrete sample sites of the guide {_fn_name(program.guide)!r} (its "
                    f"discrete sites: {', '.join(sites)})"
                )
            config = {k: make_estimator(v) for k, v in entry.items()}
            label = "; ".join(f"{k}={_estimator_label(v)}" for k, v in entry.items())
        else:
            est = make_estimator(entry)
            config = {s: est for s in sites}
            label = _estimator_label(entry)
        ks = {_particles(e) for e in config.values()}
        decays = [float(getattr(e, "decay", PYRO_BASELINE_BETA)) for e in config.values()
                  if getattr(e, "stateful", False)]  # fmt: skip
        rows.append(
            _Row(
                label, "estimator", config, particles=max(ks),
                unbiased=_combined_unbiased(getattr(e, "unbiased", "unknown")
                                            for e in config.values()),
                decay=max(decays) if decays else None,
            )
        )  # fmt: skip
        labels.append(label)
    for row, label in zip(rows, _unique(labels)):
        row.label = label
    return rows


# ---------------------------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------------------------


class _NotVectorizable(Exception):
    pass


class _DrawParams(Messenger):
    """Every ``pyro.param`` read as per-draw copies, expanded to the left of the plates."""

    def __init__(self, n: int, depth: int, leaves: dict[str, Any], offset: float = 0.0):
        super().__init__()
        self.n, self.depth, self.leaves, self.offset = n, depth, leaves, offset

    def _pyro_post_param(self, msg: Any) -> None:
        name = msg["name"]
        if name not in self.leaves:
            u, constraint = _unconstrained(name)
            event_dim = msg["kwargs"].get("event_dim")
            batch = u.dim() - (event_dim or 0)
            pad = self.depth - batch
            if pad < 0:
                raise _NotVectorizable(
                    f"param {name!r} has {batch} batch dims, more than max_plate_nesting "
                    f"{self.depth} (give pyro.param an event_dim)"
                )
            leaf = u.detach().expand((self.n,) + (1,) * pad + tuple(u.shape)).clone()
            if self.offset:
                with torch.no_grad():
                    leaf[1:] += self.offset
            leaf.requires_grad_(True)
            self.leaves[name] = (leaf, constraint)
        leaf, constraint = self.leaves[name]
        msg["value"] = transform_to(constraint)(leaf)


def _vectorized(fn: Callable, n: int, depth: int, leaves: dict, offset: float) -> Callable:
    plate = pyro.plate(DRAWS_PLATE, n, dim=-(depth + 1))
    return _DrawParams(n, depth, leaves, offset)(plate(fn))


class _Counter:
    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


class _Drawer:
    """Per-draw gradients of one row on one program."""

    def __init__(self, program: _Program, row: _Row):
        self.p, self.row = program, row

    def sequential(self, elbo: Any, guide: Callable) -> dict[str, torch.Tensor]:
        ps = pyro.get_param_store()
        params = dict(ps.named_parameters())
        for k in self.p.params:
            params[k].grad = None
        elbo.loss_and_grads(self.p.model, guide, *self.p.args, **self.p.kwargs)
        out = {}
        for k in self.p.params:
            g = params[k].grad
            out[k] = torch.zeros_like(params[k]) if g is None else g.detach().clone()
            params[k].grad = None
        return out

    def vectorized_call(self, elbo: Any, guide: Callable, n: int, offset: float = 0.0) -> Any:
        depth = self.p.max_plate_nesting
        leaves: dict[str, Any] = {}
        model_v = _vectorized(self.p.model, n, depth, leaves, offset)
        guide_v = _vectorized(guide, n, depth, leaves, offset)
        elbo.loss_and_grads(model_v, guide_v, *self.p.args, **self.p.kwargs)
        out = {}
        for k in self.p.params:
            u, _ = _unconstrained(k)
            if k not in leaves:
                out[k] = torch.zeros((n,) + tuple(u.shape), dtype=u.dtype, device=u.device)
                continue
            leaf = leaves[k][0]
            g = leaf.grad
            if g is None:
                g = torch.zeros_like(leaf)
            out[k] = g.detach().reshape((n,) + tuple(u.shape))
        return out

    def pilot(self, vectorize: bool | None, n: int) -> tuple[float, bool, str]:
        """``(evals_per_draw, vectorised, why not)`` from trial calls on a fresh row copy.

        The vectorised trial calls have ``n`` draws (the chunk size, >= 2).
        """
        row = self.row.fresh()
        counter = _Counter(row.guide(self.p.guide))
        with _forked_rng(0), _kept_store():
            try:
                g = self.sequential(row.elbo(self.p.max_plate_nesting, False), counter)
            except (ValueError, RuntimeError, IndexError, NotImplementedError) as e:
                raise ValueError(
                    f"{self.row.label}: the ELBO failed on the program: {type(e).__name__}: "
                    f"{_message(e)}"
                ) from e
        evals = float(counter.calls)
        for k, v in g.items():
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"{self.row.label}: a gradient draw of param {k!r} is not finite (nan/inf)"
                )
        if vectorize is False:
            return evals, False, "vectorize=False"
        try:
            grads = []
            for offset in (0.0, 1.0):
                r = self.row.fresh()
                with _forked_rng(1), _kept_store(), pyro.validation_enabled(True):
                    elbo = r.elbo(self.p.max_plate_nesting + 1, True)
                    grads.append(self.vectorized_call(elbo, r.guide(self.p.guide), n, offset))
            for k in self.p.params:
                a, b = grads[0][k], grads[1][k]
                if not torch.isfinite(a[0]).all():
                    raise _NotVectorizable(f"param {k!r}: non-finite vectorised gradient")
                if not torch.allclose(a[0], b[0], rtol=1e-6, atol=1e-9):
                    raise _NotVectorizable(
                        f"param {k!r}: draws interact (a draw's gradient depends on the other "
                        "draws' parameters)"
                    )
        except Exception as e:  # any failure of the trial means: run the draws one by one
            if vectorize is True:
                raise ValueError(
                    f"{self.row.label}: the program cannot be vectorised over draws "
                    f"({type(e).__name__}: {' '.join(str(e).split())}); use vectorize=False"
                ) from e
            return evals, False, f"{type(e).__name__}: {' '.join(str(e).split())}"
        return evals, True, ""

    def draws(
        self,
        num_draws: int,
        seed: int,
        vectorized: bool,
        chunk_draws: int,
        warmup: int,
        progress: Callable[[int], None] | None,
        timer: list[float],
    ) -> Iterable[dict[str, torch.Tensor]]:
        row = self.row
        guide = row.guide(self.p.guide)
        if not vectorized:
            elbo = row.elbo(self.p.max_plate_nesting, False)
            if warmup:
                _seed(_derived_seed(seed, "warmup"))
                for _ in range(warmup):
                    self.sequential(elbo, guide)
            _seed(seed)
            for _ in range(num_draws):
                t0 = time.perf_counter()
                g = self.sequential(elbo, guide)
                timer[0] += time.perf_counter() - t0
                yield {k: v.unsqueeze(0) for k, v in g.items()}
                if progress is not None:
                    progress(1)
            return
        n = min(chunk_draws, num_draws)
        elbo = row.elbo(self.p.max_plate_nesting + 1, True)
        if warmup:
            _seed(_derived_seed(seed, "warmup"))
            for _ in range(warmup):
                self.vectorized_call(elbo, guide, n)
        done, k = 0, 0
        while done < num_draws:
            _seed(seed if k == 0 else _derived_seed(seed, "chunk", k))
            t0 = time.perf_counter()
            g = self.vectorized_call(elbo, guide, n)
            timer[0] += time.perf_counter() - t0
            take = min(n, num_draws - done)
            yield {name: v[:take] for name, v in g.items()}
            done += take
            k += 1
            if progress is not None:
                progress(take)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def _enumeration_blocker(program: _Program, max_enum: int) -> str | None:
    if program.continuous:
        return f"continuous latent guide sites ({', '.join(program.continuous)})"
    with_events = [n for n, s in program.discrete.items() if s["event_dim"] > 0]
    if with_events:
        return (
            f"sites with event dims ({', '.join(with_events)}), which TraceEnum_ELBO does not "
            "enumerate"
        )
    total = math.prod(s["values"] for s in program.discrete.values())
    if total > max_enum:
        return f"{total} joint values of the discrete sites, over max_enum={max_enum}"
    return None


def _exact_reference(program: _Program) -> dict[str, torch.Tensor]:
    ps = pyro.get_param_store()
    params = dict(ps.named_parameters())
    leaves = [params[k] for k in program.params]
    elbo = TraceEnum_ELBO(max_plate_nesting=program.max_plate_nesting)
    guide = config_enumerate(program.guide, "parallel")
    with _forked_rng(0):
        loss = elbo.differentiable_loss(program.model, guide, *program.args, **program.kwargs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {
        k: (torch.zeros_like(p) if g is None else g.detach())
        for k, p, g in zip(program.params, leaves, grads)
    }


def _reference(
    program: _Program,
    seed: int,
    reference_draws: int,
    max_enum: int,
    chunk_draws: int,
    vectorize: bool | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, str]:
    """``(g*, se or None, how)``."""
    why = _enumeration_blocker(program, max_enum)
    if why is None:
        try:
            return _exact_reference(program), None, "exact: TraceEnum_ELBO, enumerated guide"
        except (ValueError, NotImplementedError, RuntimeError) as e:
            why = f"enumeration failed ({type(e).__name__}: {' '.join(str(e).split())})"
    est = make_estimator(REFERENCE_ESTIMATOR)
    row = _Row(REFERENCE_ESTIMATOR, "estimator", {s: est for s in program.discrete},
               particles=_particles(est))  # fmt: skip
    drawer = _Drawer(program, row)
    _, vec, _ = drawer.pilot(vectorize, max(2, min(chunk_draws, reference_draws)))
    accs: dict[str, GradientStats] = {k: GradientStats(None) for k in program.params}
    ref_seed = _derived_seed(seed, "reference")
    with _forked_rng(), _kept_store():
        for chunk in drawer.draws(reference_draws, ref_seed, vec, chunk_draws, 0, None, [0.0]):
            for k, acc in accs.items():
                acc.update(chunk[k])
    means, ses = {}, {}
    for k, acc in accs.items():
        shape = _unconstrained(k)[0].shape
        s = acc.result()
        means[k] = s.per_coordinate["mean"].reshape(shape)
        ses[k] = s.per_coordinate["se"].reshape(shape)
    return means, ses, f"estimated ({why}): {reference_draws} draws of {REFERENCE_ESTIMATOR}"


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def _as_args(args: Any, kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    return tuple(args), dict(kwargs or {})


def run_compare_pyro(
    model: Callable,
    guide: Callable,
    estimators: Sequence[Any] | None = None,
    num_draws: int = 10_000,
    seed: int = 0,
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    out: Any = None,
    model_label: str | None = None,
    level: float = 0.95,
    groups: int = 32,
    reference_draws: int = 20_000,
    max_enum: int = MAX_ENUM,
    max_plate_nesting: int | None = None,
    vectorize: bool | None = None,
    chunk_draws: int = 1024,
    warmup: int | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """:func:`compare_pyro` writing a results directory ``out`` (``None``: none), as the CLI.

    Every check runs before ``out`` is created. ``run_info`` is recorded in ``run.json``'s
    configuration (the CLI's program file and data).
    """
    check_run_options(num_draws=num_draws, level=level, seed=seed)
    for name, v, low in (
        ("reference_draws", reference_draws, 2),
        ("chunk_draws", chunk_draws, 2),
        ("max_enum", max_enum, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if warmup is not None and (
        isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0
    ):
        raise ValueError(f"warmup must be None (auto) or an int >= 0, got {warmup!r}")
    if vectorize not in (None, True, False):
        raise ValueError(f"vectorize must be None (auto), True or False, got {vectorize!r}")
    call_args, call_kwargs = _as_args(args, kwargs)
    program = _inspect(model, guide, call_args, call_kwargs, max_plate_nesting, seed)
    rows = _make_rows(DEFAULT_PYRO_ESTIMATORS if estimators is None else estimators, program)
    m_label = model_label or f"pyro:{_fn_name(model)},{_fn_name(guide)}"
    frames: dict[str, pd.DataFrame] = {}
    with _forked_rng(), _kept_store():
        # Pilots: every row must run on the program before anything is written.
        pilots = {}
        for row in rows:
            pilots[row.label] = _Drawer(program, row).pilot(
                vectorize, max(2, min(chunk_draws, num_draws))
            )
        for row in rows:
            evals, vec, why = pilots[row.label]
            if not vec and vectorize is None:
                _say(echo, f"{row.label}: draws run one by one (not vectorised: {why})")
        ref, ref_se, how = _reference(
            program, seed, reference_draws, max_enum, chunk_draws, vectorize
        )
        _say(echo, f"reference gradient: {how}")
        config = {
            "pyro": m_label,
            **dict(run_info or {}),
            "estimators": [r.label for r in rows],
            "draws": num_draws,
            "seed": seed,
            "level": level,
            "groups": groups,
            "reference_draws": reference_draws,
            "max_enum": max_enum,
            "chunk_draws": chunk_draws,
            "warmup": warmup,
            "max_plate_nesting": program.max_plate_nesting,
            "vectorize": vectorize,
        }
        results = _open_results(out, "compare", config, "cpu")
        plan = [_cell_key(m_label, r.label) for r in rows]
        done = results.done() if results is not None else set()
        t_start = time.perf_counter()
        todo = [r for r in rows if _cell_key(m_label, r.label) not in done]
        with _progress_bar(len(todo) * num_draws, "compare --pyro", progress) as bar:
            for row in todo:
                key = _cell_key(m_label, row.label)
                evals, vec, _ = pilots[row.label]
                cell = _evaluate_row(
                    program, row, ref, ref_se, num_draws, seed, vec, chunk_draws,
                    row.warmup(warmup),
                    m_label, level, groups, evals, bar.update,
                )  # fmt: skip
                frames[key] = cell.summary.assign(vectorized=vec, reference_how=how)
                if results is not None:
                    results.append(key, frames[key], cell.coords)
        wall = time.perf_counter() - t_start
    if results is not None:
        table = results.rebuild(plan)
        results.finish(
            skipped=[], wall_seconds=round(wall, 3), intervals=INTERVALS, columns={
                **COLUMN_MEANINGS,
                "vectorized": "whether the draws ran vectorised (one ELBO call per chunk)",
                "reference_how": "how the reference gradient was computed",
            }, reference=how,
        )  # fmt: skip
    else:
        table = pd.concat([frames[k] for k in plan], ignore_index=True)
    table.attrs["skipped"] = []
    table.attrs["reference"] = how
    return table


def _evaluate_row(
    program: _Program,
    row: _Row,
    ref: dict[str, torch.Tensor],
    ref_se: dict[str, torch.Tensor] | None,
    num_draws: int,
    seed: int,
    vectorized: bool,
    chunk_draws: int,
    warmup: int,
    model_label: str,
    level: float,
    groups: int,
    evals: float,
    progress: Callable[[int], None] | None,
) -> CellResult:
    accs = {
        k: GradientStats(ref[k], None if ref_se is None else ref_se[k], groups=groups)
        for k in program.params
    }
    timer = [0.0]
    drawer = _Drawer(program, row)
    with _kept_store():
        for chunk in drawer.draws(
            num_draws, seed, vectorized, chunk_draws, warmup, progress, timer
        ):
            for k, acc in accs.items():
                acc.update(chunk[k])
    return cell_result(
        accs,
        model_label=model_label,
        estimator_label=row.label,
        evals_per_draw=evals,
        backwards_per_draw=1.0,
        seconds=timer[0],
        level=level,
        unbiased=row.unbiased,
        seed=seed,
    )


def compare_pyro(
    model: Callable,
    guide: Callable,
    estimators: Sequence[Any] | None = None,
    num_draws: int = 10_000,
    seed: int = 0,
    *args: Any,
    **options: Any,
) -> pd.DataFrame:
    """One row per (estimator, Pyro param) with :data:`SUMMARY_COLUMNS` (module docstring).

    Args:
        model, guide: the Pyro program; called as ``model(*args, **kwargs)``.
        estimators: entries, each a registry name / spec string / estimator object (applied at
            every discrete guide site), a dict ``{site: estimator}`` (those sites only), or
            ``"pyro:tracegraph"`` / ``"pyro:tracegraph+avg"``; default
            :data:`DEFAULT_PYRO_ESTIMATORS`.
        num_draws: gradient draws per entry; seed: shared by every entry.
        *args: the program's positional arguments (``kwargs=`` its keyword arguments).
        **options: ``kwargs``, ``level``, ``groups``, ``reference_draws``, ``max_enum``,
            ``max_plate_nesting``, ``vectorize`` (``None`` auto, ``True``, ``False``),
            ``chunk_draws``, ``warmup``, ``model_label``, ``progress`` (default off).

    Returns:
        ``pandas.DataFrame``: :data:`SUMMARY_COLUMNS` plus ``vectorized`` and
        ``reference_how``; ``table.attrs["reference"]`` says how ``g*`` was obtained.
        The parameter store (values, ``.grad``) and the global random states are left as found.
    """
    if "out" in options:
        raise TypeError("compare_pyro writes no results directory; use run_compare_pyro(out=...)")
    options.setdefault("progress", False)
    table = run_compare_pyro(model, guide, estimators, num_draws, seed, *args, **options)
    extra = [c for c in table.columns if c not in SUMMARY_COLUMNS]
    return table[SUMMARY_COLUMNS + extra]


def _say(echo: Callable[[str], None] | None, msg: str) -> None:
    if echo is not None:
        echo(msg)


# ---------------------------------------------------------------------------------------------
# Programs from files (the CLI)
# ---------------------------------------------------------------------------------------------


def load_program(
    spec: str, data: str | None = None
) -> tuple[Callable, Callable, tuple, dict, dict[str, Any]]:
    """``FILE.py:model,guide`` -> ``(model, guide, args, kwargs, info)``.

    The file is loaded by path (``importlib``). Arguments of the program:

    - ``data`` given and the file defines ``data(value)``: ``data(VALUE)`` with the text given;
    - ``data`` given, no ``data`` function: a ``.npz`` file (its arrays as keyword arguments,
      named as in the file, floating arrays in torch's default dtype) or a ``.pt``/``.pth``
      file (``torch.load``: a dict -> keyword arguments, a tuple/list -> positional, anything
      else -> one positional argument);
    - no ``data``: ``data()`` if the file defines it, else no arguments.

    ``data()``'s return value is read the same way as a ``.pt`` file's content.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--pyro expects FILE.py:model,guide, got {spec!r}")
    path_text, _, names = spec.rpartition(":")
    parts = [p.strip() for p in names.split(",")]
    if len(parts) != 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(
            f"--pyro {spec!r}: after the file name give two names, the model's and the guide's "
            "(FILE.py:model,guide)"
        )
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"--pyro: no such file {str(path)!r}")
    mod_name = f"_stochgrad_program_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--pyro: cannot load {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # as an import would (dataclasses, pickling look it up)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        msg = " ".join(str(e).split())
        raise ValueError(f"--pyro: loading {str(path)!r} failed: {type(e).__name__}: {msg}") from e
    fns = []
    for what, name in zip(("model", "guide"), parts):
        fn = getattr(module, name, None)
        if fn is None:
            defined = sorted(
                k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                and getattr(v, "__module__", None) == mod_name
            )  # fmt: skip
            raise ValueError(
                f"--pyro: {str(path)!r} has no {what} {name!r} (it defines: "
                f"{', '.join(defined) or 'no functions'})"
            )
        if not callable(fn):
            raise ValueError(f"--pyro: {name!r} in {str(path)!r} is not callable")
        fns.append(fn)
    provider = getattr(module, "data", None)
    info: dict[str, Any] = {"program": str(path), "data": data}
    if data is not None and callable(provider):
        value = _call_data(provider, path, data)
    elif data is not None:
        value = _read_data_file(data)
    elif callable(provider):
        value = _call_data(provider, path)
    else:
        value = ()
    args, kwargs = _arguments(value)
    return fns[0], fns[1], args, kwargs, info


def _call_data(provider: Callable, path: Path, *value: str) -> Any:
    try:
        return provider(*value)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise ValueError(
            f"--data: data() in {str(path)!r} failed: {type(e).__name__}: {msg}"
        ) from e


def _arguments(value: Any) -> tuple[tuple, dict]:
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    return (value,), {}


def _read_data_file(text: str) -> Any:
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"--data: no such file {text!r} (a .npz or .pt file; or define data(value) in the "
            "program file to read other values)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {}
                for k in z.files:
                    a = torch.from_numpy(np.array(z[k]))
                    out[k] = a.to(torch.get_default_dtype()) if a.is_floating_point() else a
                return out
        except (ValueError, OSError) as e:
            raise ValueError(f"--data: cannot read {text!r} as .npz ({e})") from e
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"--data: cannot read {text!r} with torch.load ({e})") from e
    raise ValueError(f"--data: {text!r} is neither .npz nor .pt/.pth")


callable_module(__name__, compare_pyro)
