"""The engine shared by the ELBO and the surrogate: estimators' hooks inside a Pyro program.

A *run* is one execution of a program (a guide and its model, or a cost-returning program)
under :class:`SiteRuleMessenger`. At every latent site whose annotation names an estimator
(see :mod:`stochgrad.estimators.handlers`), the messenger checks that the estimator supports
the site's distribution (``site_distributions``; otherwise a ``TypeError`` naming the site,
its distribution and the estimators that apply), asks the estimator for the site's value
(``site_value``) and records a :class:`SiteRecord`; sites without an annotation are left to
Pyro. The engine names no estimator: everything an estimator does at a site goes through the
hooks documented in :mod:`stochgrad.estimators.base`:

- ``site_value``: the value the program sees (hard sample, relaxed or surrogate unit, ...);
- ``site_enumerates`` / ``site_configurations`` / ``site_log_weight``: extra runs, one per
  configuration, weighted by ``q(config)`` (the weights carry their own gradient);
- ``site_perturbs`` / ``site_reruns``: extra runs with the same random numbers (torch's
  generator state is restored) at offsets of the sites' logits, without gradient;
- ``site_term``: the term the site adds to the loss, given the cost its units are credited
  with (reduced to the unit's plates: the cost terms downstream of the site, by provenance,
  for sites :func:`credits_downstream` accepts and :class:`TrackUnannotated` tracks; the whole
  cost for re-running and enumerating estimators), the other particles' costs and the re-runs'
  changes in cost; ``site_commit``: training state updated after the step;
- ``site_validates = False``: the densities are evaluated at the value without support
  validation; ``site_owns_log_q = True``: the ELBO leaves the site's ``log q`` out of its
  pathwise part (the estimator's term supplies that gradient).

Randomness: uniforms come from torch's global generator (``pyro.set_rng_seed`` controls
them). A site whose value is already given (``poutine.replay``) keeps it: its uniform is drawn
from the part of (0, 1) consistent with ``h = 1[u < p]``.

Requires: distributions an estimator declares in ``site_distributions`` (Bernoulli; also
Categorical and OneHotCategorical for some, whose replayed values ``k`` get a uniform in
``[cdf_{k-1}, cdf_k)``; ``Independent``/masked/expanded wrappers allowed); for re-runs, a
program whose sites and shapes do not depend on the sampled values. Bias: that of each
estimator.

References: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Secs. 3-4; Spall (1992);
Fiete & Seung (2006); Schulman et al. (2015) (surrogate losses).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.ops.provenance import get_provenance, track_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from torch import Tensor
from torch.distributions import Distribution

from .base import Estimator, Reruns, SiteInput, site_logits
from .distributions import BERNOULLI, Kind, unwrap
from .handlers import ESTIMATOR_KEY, annotatable, effective_annotation, resolve_estimator
from .registry import available, lookup
from .score_function import bernoulli_log_prob

BASELINE_INPUT_KEY = "baseline_input"


def base_distribution(fn: Distribution) -> Distribution:
    """``fn`` with ``Independent`` and Pyro's masked/expanded wrappers looked through."""
    return unwrap(fn)


def check_supported(est: Estimator, site: str, fn: Distribution) -> None:
    """``TypeError`` naming the site, its distribution and the estimators that apply to it."""
    base = base_distribution(fn)
    kind = type(base).__name__
    if kind in est.site_distributions:
        return
    shown = type(fn).__name__ + (f" (of {kind})" if base is not fn else "")
    usable = [n for n in available() if kind in lookup(n).site_distributions]
    if not est.site_distributions:
        raise TypeError(
            f"site {site!r}: estimator {est.name!r} cannot act at a Pyro sample site (it "
            f"declares no site_distributions); estimators usable at a site with distribution "
            f"{shown}: {', '.join(usable) or '(none)'}"
        )
    raise TypeError(
        f"estimator {est.name!r} supports {', '.join(est.site_distributions)} sample sites, but "
        f"site {site!r} has distribution {shown}; estimators that apply to it: "
        f"{', '.join(usable) or '(none: leave the site to Pyro)'}"
    )


@dataclass
class SiteRecord:
    """What the rule did at one site in one run."""

    name: str
    estimator: Estimator
    logits: Tensor  # (*batch, *event), differentiable in the parameters
    hard: Tensor  # (*batch, *event) in {0, 1}, no gradient
    value: Tensor  # what the program saw at the site
    event_dim: int
    frames: tuple
    mask: Tensor | None
    baseline_input: Tensor | None
    extra: dict[str, Tensor] = field(default_factory=dict)
    probs: Tensor | None = None  # sigmoid of the detached logits, where the rule computed it
    kind: Kind = BERNOULLI  # the site's distribution kind

    def unit_shape(self) -> torch.Size:
        """The shape of the units (one per uniform; a OneHotCategorical's category dim out)."""
        return torch.Size(self.kind.unit_shape(self.logits))

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
    ``table``: values of the enumerated sites (``None``: all zeros, shapes recorded).
    ``perturb``: per-site offsets added to the pre-activations (a re-run).
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


def _no_uniforms(name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    raise TypeError(f"site {name!r}: an enumerated site's value is assigned, it draws no uniforms")


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


class _ConditionalCategoricalUniforms:
    """One uniform per Categorical unit; given a value ``k``, drawn in ``[cdf_{k-1}, cdf_k)``."""

    def __init__(self, logits: Tensor, given: Tensor | None):
        self.logits, self.given = logits, given

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        u = torch.rand(shape, dtype=dtype, device=self.logits.device)
        if self.given is None:
            return u
        cdf = torch.softmax(self.logits, -1).cumsum(-1).expand(*shape, self.logits.shape[-1])
        k = self.given.detach().long().expand(shape).unsqueeze(-1)
        hi = cdf.gather(-1, k).squeeze(-1)
        lo = torch.where(k.squeeze(-1) > 0, cdf.gather(-1, (k - 1).clamp_min(0)).squeeze(-1), 0.0)
        return lo + u * (hi - lo)


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
            if not run.skip[name].estimator.site_validates:
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
        fn = msg["fn"]
        check_supported(est, name, fn)
        msg["infer"][ESTIMATOR_KEY] = est
        logits, kind = site_logits(name, fn, est.name, est.site_distributions)
        given = msg["value"]
        probs: Tensor | None = None
        assigned: Tensor | None = None
        uniforms: Callable[[str, torch.Size, torch.dtype], Tensor]
        if est.site_enumerates:
            if run.table is None and kind is BERNOULLI:
                assigned = torch.zeros_like(logits.detach())
            elif run.table is None:
                assigned = logits.new_zeros(kind.unit_shape(logits))
            elif name not in run.table:
                raise ValueError(
                    f"site {name!r} (estimator {est.name!r}) did not appear in the first run; "
                    "enumeration needs the same enumerated sites in every run"
                )
            else:
                assigned = run.table[name]
            uniforms = _no_uniforms
        elif kind is BERNOULLI:
            probs = torch.sigmoid(logits.detach())
            given_hard = None if given is None else _positive(given, logits.dtype)
            uniforms = _ConditionalUniforms(probs, given_hard)
        else:
            given_index = None if given is None else kind.index(given.detach())
            uniforms = _ConditionalCategoricalUniforms(logits.detach(), given_index)
        out = est.site_value(
            SiteInput(name, fn, logits, probs, uniforms, run.perturb.get(name), assigned, kind)
        )
        value = out.value
        hard = out.hard if out.hard is not None else _positive(value, logits.dtype)
        if not est.site_validates:
            msg["fn"] = without_validation(fn)
        msg["value"] = value
        run.records[name] = SiteRecord(
            name=name,
            estimator=est,
            logits=logits,
            hard=hard,
            value=value,
            event_dim=len(fn.event_shape),
            frames=tuple(msg["cond_indep_stack"]),
            mask=msg["mask"] if isinstance(msg["mask"], Tensor) else None,
            baseline_input=msg["infer"].get(BASELINE_INPUT_KEY),
            extra=out.extra,
            probs=probs,
            kind=kind,
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


def credits_downstream(est: Estimator) -> bool:
    """Whether a site of ``est`` is credited with its downstream cost (provenance-tracked).

    Every annotated estimator except those that re-run the program (``site_perturbs``: their
    changes in cost compare whole re-runs) or enumerate it (``site_enumerates``: the weighted
    sum over configurations is exact as it is); those keep the whole cost ``L``.
    """
    return not (est.site_perturbs or est.site_enumerates)


class TrackUnannotated(TrackNonReparam):
    """Pyro's provenance tracking of non-reparameterised sites.

    Annotated sites are tracked too when their estimator credits downstream costs
    (:func:`credits_downstream`); the record then holds the tracked value. Sites replayed from
    the guide already carry their provenance and are left as they are. ``upstream=True``: a
    tracked value also carries the provenance of its distribution's parameters (the sites
    upstream of it, even where its value was given from outside), and the value of an
    annotated site that is not credited itself carries that of its logits.
    """

    def __init__(self, *runs: Run, upstream: bool = False):
        super().__init__()
        self.runs = runs
        self.upstream = upstream

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
            record = run.records.get(name)
            if record is not None:
                if record.value is not msg["value"]:
                    return
                if credits_downstream(record.estimator):
                    self._track(msg)
                elif self.upstream:  # not credited itself, but its value depends on its logits
                    msg["value"] = track_provenance(msg["value"], get_provenance(record.logits))
                record.value = msg["value"]
                return
            if name in run.skip:
                return
        self._track(msg)

    def _track(self, msg: Any) -> None:
        value = msg["value"]
        super()._pyro_post_sample(msg)
        if self.upstream and msg["value"] is not value:
            # the sites upstream of the distribution's parameters, also where the value was
            # given from outside (poutine.replay) and so carries none of them
            msg["value"] = track_provenance(msg["value"], parameter_provenance(msg["fn"]))


def parameter_provenance(fn: Any) -> frozenset:
    """The provenance of a distribution's tensors (its parameters, wrappers looked through)."""
    out: frozenset = frozenset()
    for v in vars(fn).values():
        if isinstance(v, Tensor):
            out = out | get_provenance(v)
        elif isinstance(v, Distribution):
            out = out | parameter_provenance(v)
    return out


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
# Enumerated sites and re-runs: asked of the estimators through their hooks
# ---------------------------------------------------------------------------------------------


def enumerated(records: Iterable[SiteRecord]) -> list[SiteRecord]:
    return [r for r in records if r.estimator.site_enumerates]


def enumeration_tables(records: Iterable[SiteRecord]) -> list[dict[str, Tensor]]:
    """Every joint configuration of the enumerated sites, as value tables (one per run)."""
    recs = enumerated(records)
    return recs[0].estimator.site_configurations(recs)


def log_weight(records: Iterable[SiteRecord]) -> Tensor | float:
    """``log`` of the run's weight (enumerated sites; differentiable), ``0.0`` if none."""
    total: Tensor | float = 0.0
    for r in records:
        w = r.estimator.site_log_weight(r)
        if w is not None:
            total = total + w
    return total


def perturbed_reruns(
    records: Iterable[SiteRecord],
    generator: torch.Generator,
    start: Mapping[str, Any],
    rerun: Any,
) -> list[tuple[Estimator, Reruns, list[Any]]]:
    """Run every re-run the sites' estimators ask for, each from the random state ``start``.

    ``rerun(offsets)`` executes the program once with the pre-activation ``offsets`` and
    returns what the caller needs of it (a cost, a log-ratio); it runs without gradients.
    Returns ``[(estimator, reruns, [rerun(offsets) per re-run])]``, one entry per estimator
    object, in the order its sites first appear.
    """
    groups: dict[int, list[SiteRecord]] = {}
    for r in records:
        if r.estimator.site_perturbs:
            groups.setdefault(id(r.estimator), []).append(r)
    out = []
    for recs in groups.values():
        est = recs[0].estimator
        plan = est.site_reruns(recs, generator)
        done = []
        for offsets in plan.offsets:
            set_rng_state(start)
            with torch.no_grad():
                done.append(rerun(offsets))
        out.append((est, plan, done))
    return out


__all__ = [
    "Run",
    "SiteRecord",
    "SiteRuleMessenger",
    "TrackUnannotated",
    "base_distribution",
    "check_supported",
    "credits_downstream",
    "enumeration_tables",
    "log_weight",
    "parameter_provenance",
    "perturbed_reruns",
    "rng_state",
    "set_rng_state",
    "without_validation",
]
