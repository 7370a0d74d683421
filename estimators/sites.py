"""The engine shared by the ELBO and the surrogate: site rules inside a Pyro program.

A *run* is one execution of a program (a guide and its model, or a cost-returning program)
under :class:`SiteRuleMessenger`. At every latent Bernoulli site whose annotation names an
estimator (see :mod:`stochgrad.estimators.handlers`), the messenger computes the site's value
with that estimator's rule from the core (the same functions ``estimate()`` uses) and records
a :class:`SiteRecord`; sites without an annotation are left to Pyro.

How each estimator meets a site (its *kind*), with ``a`` the unit's pre-activation (logit),
``p = sigmoid(a)``, ``u ~ U(0, 1)`` its uniform, ``h = 1[u < p]``, and ``L`` the cost the unit
can influence (the program's cost, or ``-(log p - log q)``, reduced to the unit's plates):

- ``score`` (``score_function``): value ``h``; the caller adds the surrogate term
  ``(L - b) log q(h)`` per unit, so ``d/da = (L - b)(h - p)`` (the paper's Theorem 1);
- ``value`` (``straight_through``): value ``h + (a - stopgrad(a))`` (or the sigmoid-slope
  variant): forward ``h``, backward ``dL/da := dL/dh``;
- ``unit`` (``sts``, ``noisy_rectifier``): value ``b sqrt(p)`` / ``max(0, a + s z(u))``; the
  site's distribution is evaluated without support validation at that value;
- ``perturbation`` (``spsa``, ``finite_difference``, ``node_perturbation``): value
  ``1[u < sigmoid(a + delta)]``; the caller re-runs the program with the *same random numbers*
  (torch's generator state is restored) at offsets ``delta_j`` and adds ``a * g_a`` (``g_a``
  held fixed) with ``g_a = sum_j coef_j (L_j - L_0) w_j``: node perturbation
  ``(L(a + xi) - L(a)) xi / sigma^2``; SPSA ``[L(a + c D) - L(a - c D)] D / (2c)``; central
  differences per coordinate (all plate slices move together; each reads its own ``L``);
- ``exact``: value from a table; the caller runs the program once per joint configuration
  ``c`` of all exact units and forms ``sum_c [stopgrad(q(c)) s(c) + q(c) stopgrad(L(c))]``,
  whose gradient is ``d/dtheta sum_c q(c) E[L | c]`` when ``s(c)`` is a surrogate of run ``c``.

Randomness: uniforms come from torch's global generator (``pyro.set_rng_seed`` controls
them). A site whose value is already given (``poutine.replay``) keeps it: its uniform is drawn
from the part of (0, 1) consistent with ``h = 1[u < p]``.

Requires: Bernoulli sites (``Independent``/masked/expanded wrappers allowed); for re-runs, a
program whose sites and shapes do not depend on the sampled values. Bias: that of each
estimator (none for ``score`` and ``exact``; ``O(step^2)`` or ``O(sigma)`` for perturbations;
``value`` and ``unit`` kinds are biased).

References: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Secs. 3-4; Spall (1992);
Fiete & Seung (2006); Schulman et al. (2015) (surrogate losses).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from torch import Tensor

from .base import Estimator, below, bernoulli_logits, hard_sample
from .exact import Exact
from .finite_difference import FiniteDifference
from .handlers import ESTIMATOR_KEY, annotatable, effective_annotation, resolve_estimator
from .node_perturbation import NodePerturbation
from .noisy_rectifier import NoisyRectifier
from .score_function import ScoreFunction, bernoulli_log_prob
from .spsa import SPSA
from .straight_through import StraightThrough
from .sts import STS

KINDS = ("score", "value", "unit", "perturbation", "exact")
BASELINE_INPUT_KEY = "baseline_input"


def site_kind(est: Estimator, site: str) -> str:
    """How ``est`` acts at a Pyro site (see the module docstring)."""
    if isinstance(est, ScoreFunction):
        return "score"
    if isinstance(est, StraightThrough):
        return "value"
    if isinstance(est, (STS, NoisyRectifier)):
        return "unit"
    if isinstance(est, (SPSA, FiniteDifference, NodePerturbation)):
        return "perturbation"
    if isinstance(est, Exact):
        return "exact"
    kind = getattr(est, "site_kind", None)
    if kind in KINDS:
        return kind
    raise TypeError(
        f"site {site!r}: estimator {est.name!r} cannot act at a Pyro sample site yet (no site "
        f"rule); estimators usable at sites: exact, finite_difference, node_perturbation, "
        f"noisy_rectifier, score_function, spsa, straight_through, sts"
    )


@dataclass
class SiteRecord:
    """What the rule did at one site in one run."""

    name: str
    estimator: Estimator
    kind: str
    logits: Tensor  # (*batch, *event), differentiable in the parameters
    hard: Tensor  # (*batch, *event) in {0, 1}, no gradient
    value: Tensor  # what the program saw at the site
    event_dim: int
    frames: tuple
    mask: Tensor | None
    baseline_input: Tensor | None
    extra: dict[str, Tensor] = field(default_factory=dict)
    probs: Tensor | None = None  # sigmoid of the detached logits, where the rule computed it

    def log_q(self) -> Tensor:
        """``log q(h)`` per unit (unscaled, unmasked), differentiable in the logits."""
        if "log_prob" in self.extra:
            return self.extra["log_prob"]
        return bernoulli_log_prob(self.logits, self.hard)

    def units(self, per_element: Tensor) -> Tensor:
        """A per-element tensor (batch dims) viewed against the units (event dims appended)."""
        return per_element.reshape(per_element.shape + (1,) * self.event_dim)

    def unit_mask(self) -> Tensor | float:
        if self.mask is None:
            return 1.0
        return self.units(self.mask.to(self.logits.dtype))


class Run:
    """One execution: the configuration the rules follow and what they recorded.

    ``skip``: latent sites already handled in the guide (the model run replays them).
    ``table``: values of the ``exact`` sites (``None``: all zeros, shapes recorded).
    ``perturb``: per-site offsets added to the pre-activations of ``perturbation`` sites.
    """

    def __init__(
        self,
        skip: Mapping[str, SiteRecord] | None = None,
        table: Mapping[str, Tensor] | None = None,
        perturb: Mapping[str, Tensor] | None = None,
    ):
        self.skip = dict(skip or {})
        self.table = table
        self.perturb = dict(perturb or {})
        self.records: dict[str, SiteRecord] = {}
        # in a model run: every site of the guide trace (replayed into the model)
        self.guide_sites: set[str] = set()

    @property
    def handled(self) -> set[str]:
        return set(self.records) | set(self.skip)

    def handles(self, name: str) -> bool:
        """``name in self.handled``, without building the set."""
        return name in self.records or name in self.skip


class _ConditionalUniforms:
    """Uniforms for one site; given a hard value ``h``, drawn so that ``1[u < p] = h``."""

    def __init__(self, probs: Tensor, hard: Tensor | None):
        self.probs, self.hard = probs, hard

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        u = torch.rand(shape, dtype=dtype, device=self.probs.device)
        if self.hard is None:
            return u
        p = self.probs.expand(shape)
        return torch.where(self.hard.expand(shape) > 0, u * p, p + u * (1 - p))


def _positive(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x.detach() > 0).to(dtype)``, the comparison written straight into a ``dtype`` tensor."""
    x = x.detach()
    return torch.gt(x, 0, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def without_validation(fn: Any) -> Any:
    """A shallow copy of a distribution (and its base distributions) with validation off."""
    fn = copy.copy(fn)
    fn._validate_args = False
    if hasattr(fn, "base_dist"):
        fn.base_dist = without_validation(fn.base_dist)
    return fn


class SiteRuleMessenger(Messenger):
    """Applies the estimators' site rules inside a program and records them in ``run``."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = run

    def _process_message(self, message: Message) -> None:
        msg: Any = message
        if not annotatable(msg):
            return
        name = msg["name"]
        run = self.run
        if name in run.skip:
            self._check_same(msg, run.skip[name])
            if run.skip[name].kind == "unit":
                msg["fn"] = without_validation(msg["fn"])
            return
        spec = effective_annotation(msg, self)
        if name in run.guide_sites:
            if spec is not None:
                raise ValueError(
                    f"site {name!r} is annotated {resolve_estimator(spec, name).label()!r} in "
                    "the model, but the guide samples it without an annotation; annotate the "
                    "site in the guide (the guide decides how a latent site is sampled)"
                )
            return
        if spec is None:
            return
        est = resolve_estimator(spec, name)
        kind = site_kind(est, name)
        msg["infer"][ESTIMATOR_KEY] = est
        fn = msg["fn"]
        logits = bernoulli_logits(name, fn, est.name)
        given = msg["value"]
        extra: dict[str, Tensor] = {}
        probs: Tensor | None = None
        hard: Tensor | None = None
        if kind == "exact":
            if run.table is None:
                value = torch.zeros_like(logits.detach())
            elif name not in run.table:
                raise ValueError(
                    f"site {name!r} (estimator 'exact') did not appear in the first run; "
                    "enumeration needs the same exact sites in every run"
                )
            else:
                value = run.table[name].to(logits.dtype).expand_as(logits)
            hard = value
        else:
            probs = torch.sigmoid(logits.detach())
            given_hard = None if given is None else _positive(given, logits.dtype)
            uniforms = _ConditionalUniforms(probs, given_hard)
            if kind == "perturbation":
                u = uniforms(name, logits.shape, logits.dtype)
                offset = run.perturb.get(name)
                shifted = logits.detach() if offset is None else logits.detach() + offset
                value = hard_sample(shifted, u)
                extra = {"u": u}
            elif kind == "score" and getattr(type(est), "rule", None) is ScoreFunction.rule:
                # ScoreFunction.rule with ``probs`` (= sigmoid of the detached logits) reused:
                # the same numbers; the value is already hard (in {0, 1}, no gradient)
                u = uniforms(name, logits.shape, logits.dtype)
                value = below(u, probs, logits.dtype)
                extra = {"log_prob": bernoulli_log_prob(logits, value)}
                hard = value
            else:
                value, extra = est.rule(uniforms)(name, logits)  # type: ignore[attr-defined]
            if hard is None:
                hard = _positive(value, logits.dtype)
        if kind == "unit":
            msg["fn"] = without_validation(fn)
        msg["value"] = value
        run.records[name] = SiteRecord(
            name=name,
            estimator=est,
            kind=kind,
            logits=logits,
            hard=hard,
            value=value,
            event_dim=len(fn.event_shape),
            frames=tuple(msg["cond_indep_stack"]),
            mask=msg["mask"] if isinstance(msg["mask"], Tensor) else None,
            baseline_input=msg["infer"].get(BASELINE_INPUT_KEY),
            extra=extra,
            probs=probs,
        )

    def _postprocess_message(self, message: Message) -> None:
        msg: Any = message
        record = self.run.records.get(msg["name"]) if msg["type"] == "sample" else None
        if record is not None and (msg["value"] is not record.value or msg["is_observed"]):
            del self.run.records[msg["name"]]  # an outer handler replaced the value

    def _check_same(self, msg: Any, record: SiteRecord) -> None:
        spec = msg["infer"].get(ESTIMATOR_KEY)
        if spec is None:
            return
        est = resolve_estimator(spec, msg["name"])
        if est is not record.estimator and est.label() != record.estimator.label():
            raise ValueError(
                f"site {msg['name']!r} is annotated {est.label()!r} in the model but "
                f"{record.estimator.label()!r} in the guide; the guide samples the site, so "
                "annotate it there (or make the two agree)"
            )


class TrackUnannotated(TrackNonReparam):
    """Pyro's provenance tracking of non-reparameterised sites, minus the annotated ones."""

    def __init__(self, *runs: Run):
        super().__init__()
        self.runs = runs

    # direct dispatch: only sample sites are tracked (nothing happens before a site)
    def _process_message(self, message: Message) -> None:
        pass

    def _postprocess_message(self, message: Message) -> None:
        if message["type"] == "sample":
            self._pyro_post_sample(message)

    def _pyro_post_sample(self, message: Message) -> None:
        msg: Any = message
        name = msg["name"]
        for run in self.runs:
            if run.handles(name):
                return
        super()._pyro_post_sample(msg)


# ---------------------------------------------------------------------------------------------
# Randomness shared between re-runs
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Enumeration of exact sites
# ---------------------------------------------------------------------------------------------


def exact_tables(records: Iterable[SiteRecord], max_sites: int) -> list[dict[str, Tensor]]:
    """Every joint configuration of the ``exact`` sites' units, as value tables."""
    exact = [r for r in records if r.kind == "exact"]
    shapes = {r.name: r.logits.shape for r in exact}
    n = sum(math.prod(s) for s in shapes.values())
    if n > max_sites:
        raise ValueError(
            f"sites {sorted(shapes)} (estimator 'exact') hold {n} binary units; enumeration is "
            f"limited to max_sites={max_sites} (2^{max_sites} runs). Use another estimator for "
            "some of them or raise max_sites on the Exact object"
        )
    first = exact[0].logits
    idx = torch.arange(2**n, device=first.device)
    bits = ((idx.unsqueeze(1) >> torch.arange(n, device=first.device)) & 1).to(first.dtype)
    tables: list[dict[str, Tensor]] = [{} for _ in range(2**n)]
    start = 0
    for name, shape in shapes.items():
        k = math.prod(shape)
        block = bits[:, start : start + k].reshape(2**n, *shape)
        for c in range(2**n):
            tables[c][name] = block[c]
        start += k
    return tables


def exact_log_weight(records: Iterable[SiteRecord]) -> Tensor | float:
    """``log q(config)`` of the exact sites of a run (differentiable)."""
    total: Tensor | float = 0.0
    for r in records:
        if r.kind == "exact":
            total = total + r.log_q().sum()
    return total


def max_exact_sites(records: Iterable[SiteRecord]) -> int:
    limits = [r.estimator.max_sites for r in records if r.kind == "exact"]  # type: ignore
    return min(limits)


# ---------------------------------------------------------------------------------------------
# Perturbation directions
# ---------------------------------------------------------------------------------------------


def perturbed_reruns(
    records: Iterable[SiteRecord],
    generator: torch.Generator,
    start: Mapping[str, Any],
    rerun: Any,
) -> list[tuple[Estimator, list[tuple[float, dict[str, Tensor], Any]], dict[str, Tensor]]]:
    """Run every planned perturbation of these sites, each from the random state ``start``.

    ``rerun(offsets)`` executes the program once with the pre-activation ``offsets`` and
    returns what the caller needs of it (a cost, a log-ratio); it runs without gradients.
    Returns ``[(estimator, [(coef, offsets, rerun(offsets))...], directions)]``.
    """
    out = []
    for est, plan, dirs in perturbation_plans(records, generator):
        done = []
        for coef, offsets in plan:
            set_rng_state(start)
            with torch.no_grad():
                done.append((coef, offsets, rerun(offsets)))
        out.append((est, done, dirs))
    return out


def perturbation_plans(
    records: Iterable[SiteRecord], generator: torch.Generator
) -> list[tuple[Estimator, list[tuple[float, dict[str, Tensor]]], dict[str, Tensor]]]:
    """For each perturbation estimator: its re-runs and how to turn their costs into ``g_a``.

    Returns ``[(estimator, [(coef, {site: offset})...], directions)]``. The estimate of
    ``dE[L]/da`` at a site is ``sum_j coef_j * L_j * w_j`` where ``L_j`` is the cost of re-run
    ``j`` and ``w_j`` its direction at the site (``directions`` holds them keyed by
    ``f"{j}:{site}"``); the base run's cost enters with ``coef`` as described per estimator.
    """
    groups: dict[int, list[SiteRecord]] = {}
    for r in records:
        if r.kind == "perturbation":
            groups.setdefault(id(r.estimator), []).append(r)
    plans = []
    for recs in groups.values():
        est = recs[0].estimator
        runs: list[tuple[float, dict[str, Tensor]]] = []
        dirs: dict[str, Tensor] = {}

        def randn(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

        if isinstance(est, NodePerturbation):
            # g_a = (L(a + xi) - L(a)) xi / sigma^2
            offsets = {r.name: est.sigma * randn(r.logits) for r in recs}
            runs.append((1.0 / est.sigma**2, offsets))
            for r in recs:
                dirs[f"0:{r.name}"] = offsets[r.name]
        elif isinstance(est, SPSA):
            # g_a = mean_j [L(a + c D_j) - L(a - c D_j)] D_j / (2 c)   (1 / D = D for +-1)
            for j in range(est.num_pairs):
                delta = {r.name: (2 * (randn(r.logits) > 0).to(r.logits.dtype) - 1) for r in recs}
                coef = 1.0 / (2 * est.c * est.num_pairs)
                runs.append((coef, {k: est.c * d for k, d in delta.items()}))
                runs.append((-coef, {k: -est.c * d for k, d in delta.items()}))
                for k, d in delta.items():
                    dirs[f"{2 * j}:{k}"] = d
                    dirs[f"{2 * j + 1}:{k}"] = d
        elif isinstance(est, FiniteDifference):
            # g_{a_i} = [L(a + eps e_i) - L(a - eps e_i)] / (2 eps), one coordinate at a time;
            # plate slices are independent and credited with their own cost, so coordinate i
            # moves in every slice of the site's plates at once.
            j = 0
            for r in recs:
                for e in _coordinates(r):
                    for sign in (1.0, -1.0):
                        runs.append((sign / (2 * est.eps), {r.name: sign * est.eps * e}))
                        dirs[f"{j}:{r.name}"] = e
                        j += 1
        plans.append((est, runs, dirs))
    return plans


def _coordinates(record: SiteRecord) -> Iterable[Tensor]:
    """One-hot directions over the site's non-plate dims, spanning all its plate slices."""
    logits = record.logits
    batch_ndim = logits.dim() - record.event_dim
    plate = {batch_ndim + f.dim for f in record.frames if f.vectorized and -f.dim <= batch_ndim}
    free = [d for d in range(logits.dim()) if d not in plate]
    sizes = [logits.shape[d] for d in free]
    for index in itertools.product(*(range(n) for n in sizes)):
        e = torch.zeros_like(logits.detach())
        where: list[Any] = [slice(None)] * logits.dim()
        for d, i in zip(free, index):
            where[d] = i
        e[tuple(where)] = 1.0
        yield e


__all__ = [
    "KINDS",
    "Run",
    "SiteRecord",
    "SiteRuleMessenger",
    "TrackUnannotated",
    "exact_log_weight",
    "exact_tables",
    "perturbation_plans",
    "rng_state",
    "set_rng_state",
    "site_kind",
    "without_validation",
]
