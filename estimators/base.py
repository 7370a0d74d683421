"""Shared machinery of every estimator: the contract, per-draw parameters, the site handler.

The contract (optax ``monte_carlo`` style): ``est.estimate(objective, num_draws, seed=...)``
returns ``dict[param name -> Tensor(num_draws, *param.shape)]``, one independent gradient
estimate per draw, computed as one batched program. The mean over draws is the estimate; the
spread is its variance. Analysis code consumes only that shape.

An *objective* (see :mod:`stochgrad.models`) exposes ``params`` (leaf tensors) and
``model(params)``, a Pyro program whose parameters carry a leading batch dimension of draws,
whose stochastic neurons are ``pyro.sample`` sites with ``Bernoulli`` distributions (possibly
wrapped in ``Independent``), or ``Categorical`` ones for estimators that list it in
``site_distributions`` (:mod:`~stochgrad.estimators.distributions`; their rules are called
with ``kind=``), and which returns the cost of each draw, shape ``(draws,)``.

How a draw is made: each estimator gives every draw its own copy of the parameters (a leaf of
shape ``(draws, *param.shape)``), so one backward pass through the summed surrogate yields all
per-draw gradients at once. Randomness comes only from a ``torch.Generator`` seeded by
``seed``: one uniform ``u`` per unit (``h = 1[u < sigmoid(a)]``, SPEC notation) and, where an
estimator needs them, Gaussian or Rademacher perturbations. Same seed, same numbers.

The protocol. An estimator is one module: a subclass of :class:`Estimator` (or of
:class:`SurrogateEstimator`, which runs the model once and backpropagates a surrogate),
registered with ``@register``. It implements

- the batched core: ``cost(objective)`` and ``_draw(objective, draws, rng)`` (for a
  ``SurrogateEstimator``: ``rule(uniforms)`` giving each unit's value, and optionally
  ``surrogate(cost, sites)``); ``estimate()`` calls them;
- its behaviour at a Pyro site, through hooks the engine (:mod:`~stochgrad.estimators.sites`,
  used by ``EstimatorELBO`` and ``surrogate_loss``) calls, which never names an estimator:

  ===========================  =============================================================
  ``site_distributions``       base distribution names it supports (``("Bernoulli",)``);
                               empty: it cannot act at a site
  ``site_value(SiteInput)``    the value the site takes in this run, a :class:`SiteValue`
                               (default for a ``SurrogateEstimator``: its ``rule``)
  ``site_term(record, costs)`` the term it adds to the loss being minimised, given the cost
                               ``costs.cost`` its units are credited with (a
                               :class:`SiteCosts`); default ``0.0`` (the value's own gradient)
  ``site_commit``              fold what ``site_term`` put in ``costs.state`` into training
                               state, after the step
  ``site_perturbs`` +          extra evaluations: re-runs with the same random numbers at
  ``site_reruns``              offsets of the logits (:class:`Reruns`); their changes in cost
                               arrive as ``costs.changes`` (antithetic or several samples too)
  ``site_enumerates`` + ...    one run per configuration from ``site_configurations``,
                               weighted by ``exp(site_log_weight)``
  ``site_validates``,          flags: densities evaluated unvalidated at the value; the
  ``site_owns_log_q``,         ELBO leaves ``log q`` of the site to the term; the other
  ``site_needs_peers``         particles' costs are passed as ``costs.others``
  ===========================  =============================================================

A worked example, a score function scaled by ``c`` (unbiased for ``c = 1`` only), complete::

    import torch
    from stochgrad.estimators.base import SiteValue, SurrogateEstimator, hard_sample
    from stochgrad.estimators.registry import register
    from stochgrad.estimators.score_function import bernoulli_log_prob

    @register
    class ScaledScore(SurrogateEstimator):
        name, unbiased = "scaled_score", "no"
        site_distributions, site_owns_log_q = ("Bernoulli",), True

        def __init__(self, c: float = 2.0):
            self.c = c

        def rule(self, uniforms):  # the batched core: one hard sample per unit
            def rule(name, logits):
                h = hard_sample(logits.detach(), uniforms(name, logits.shape, logits.dtype))
                return h, {"log_prob": bernoulli_log_prob(logits, h)}
            return rule

        def surrogate(self, cost, sites):  # cost: (draws, 1)
            flat = cost.reshape(-1)
            total = flat.sum()
            for s in sites.values():
                w = flat.view(-1, *[1] * (s.value.dim() - 1)).detach()
                total = total + self.c * (s.extra["log_prob"] * w).sum()
            return total

        def site_term(self, record, costs):  # at a Pyro site: c * L * d log q(h)
            return self.c * (record.log_q() * record.unit_mask() * costs.cost).sum()

``site_value`` comes from :class:`SurrogateEstimator` (it feeds ``rule`` the site's uniforms).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Distribution

from . import checks
from .distributions import BERNOULLI, KINDS, Kind, kind_of

UNBIASED = ("yes", "no", "asymptotic")

# Elements (draws x evaluations x units) processed at once when no chunk size is given.
DEFAULT_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Cost:
    """Work per draw: model evaluations (forward passes) and backward passes."""

    evals: float
    backwards: float


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


class Rng:
    """A seeded source of uniforms, normals and signs on one device."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu"):
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=dtype)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=dtype)

    def rademacher(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        u = torch.randint(0, 2, shape, generator=self.generator, device=self.device)
        return (2 * u - 1).to(dtype)


class Uniforms:
    """One uniform per unit per evaluation, optionally shared between evaluations.

    The batch of ``outer * draws * inner`` evaluations is laid out as ``(outer, draws, inner)``;
    with ``shared=True`` the evaluations of one draw (all ``outer`` and ``inner`` positions)
    see the same uniforms: common random numbers for the neurons' own noise.
    """

    def __init__(self, rng: Rng, outer: int = 1, inner: int = 1, shared: bool = True):
        self.rng, self.outer, self.inner, self.shared = rng, outer, inner, shared
        self.drawn: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        batch, unit = shape[0], tuple(shape[1:])
        if not self.shared or (self.outer == 1 and self.inner == 1):
            u = self.rng.uniform(tuple(shape), dtype)
        else:
            draws = batch // (self.outer * self.inner)
            base = self.rng.uniform((draws, *unit), dtype)  # (draws, *units)
            u = (
                base.unsqueeze(0)
                .unsqueeze(2)
                .expand(self.outer, draws, self.inner, *unit)
                .reshape(batch, *unit)
            )
        self.drawn[name] = u
        return u


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------


@dataclass
class Site:
    """What a rule saw and did at one ``pyro.sample`` site (batch-first tensors)."""

    name: str
    logits: Tensor  # (batch, *units), Categorical: (batch, *units, categories)
    value: Tensor  # (batch, *units)
    extra: dict[str, Tensor]
    kind: Kind = BERNOULLI


def bernoulli_logits(name: str, fn: Distribution, estimator: str) -> Tensor:
    """The logits of a Bernoulli site, broadcast to the site's full shape.

    Raises ``TypeError`` naming the site and its distribution when it is not Bernoulli
    (``Independent`` and Pyro's masked/expanded wrappers are looked through), and
    ``ValueError`` when the logits are not finite.
    """
    return site_logits(name, fn, estimator, ("Bernoulli",))[0]


def site_logits(
    name: str, fn: Distribution, estimator: str, distributions: Sequence[str]
) -> tuple[Tensor, Kind]:
    """The logits of a site and its :class:`~stochgrad.estimators.distributions.Kind`.

    ``distributions``: the base distribution names ``estimator`` accepts. Raises
    ``TypeError`` naming the site, its distribution, the estimator and the registered
    estimators that do accept it when the site's distribution is not among them, and
    ``ValueError`` when the logits are not finite.
    """
    kind, base = kind_of(fn)
    if kind is None or kind.name not in distributions:
        got = type(base).__name__
        needs = " or ".join(distributions)
        raise TypeError(
            f"estimator {estimator!r} needs {needs} sample sites, but site {name!r} has "
            f"distribution {type(fn).__name__}"
            + (f" (of {got})" if base is not fn else "")
            + "; "
            + _which_apply(got)
            + f"choose a different estimator for this site or make it {needs}"
        )
    return kind.logits(name, base, fn), kind


def _which_apply(distribution: str) -> str:
    """'estimators that accept X: a, b; ' from the registry ('' when none or unavailable)."""
    try:
        from .registry import _REGISTRY as REGISTRY
    except ImportError:  # pragma: no cover - the registry imports this module
        return ""
    names = sorted(
        n for n, cls in REGISTRY.items() if distribution in getattr(cls, "site_distributions", ())
    )
    return f"estimators that accept {distribution} sites: {', '.join(names)}; " if names else ""


Rule = Callable[[str, Tensor], "tuple[Tensor, dict[str, Tensor]]"]


class SiteMessenger(Messenger):
    """Replaces the value of each unobserved Bernoulli ``pyro.sample`` site by ``rule``.

    ``rule(name, logits) -> (value, extra)`` computes the unit's output (hard sample, or a
    surrogate unit) and anything the estimator needs later; each call is recorded in
    ``self.sites`` in program order.
    """

    def __init__(self, rule: Rule, estimator: str, distributions: Sequence[str] = ("Bernoulli",)):
        super().__init__()
        self.rule = rule
        self.estimator = estimator
        self.distributions = tuple(distributions)
        self.sites: dict[str, Site] = {}

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        logits, kind = site_logits(name, msg["fn"], self.estimator, self.distributions)
        try:
            if kind is BERNOULLI:
                value, extra = self.rule(name, logits)
            else:  # rules of estimators that accept other kinds take ``kind=``
                value, extra = self.rule(name, logits, kind=kind)  # type: ignore[call-arg]
        except (ValueError, TypeError) as e:
            raise type(e)(f"at site {name!r}: {e}") from e
        msg["value"] = value
        self.sites[name] = Site(name, logits, value, extra, kind)


def run_model(
    objective: Any,
    params: Mapping[str, Tensor],
    rule: Rule,
    estimator: str,
    distributions: Sequence[str] = ("Bernoulli",),
) -> tuple[Tensor, dict[str, Site]]:
    """Run ``objective.model(params)`` with ``rule`` at every unobserved sample site.

    ``distributions``: the base distributions the sites may have (``"Bernoulli"``,
    ``"Categorical"``); a site with any other raises ``TypeError``. At a non-Bernoulli site
    ``rule`` is called as ``rule(name, logits, kind=kind)``.
    Returns the per-evaluation cost, shape ``(batch,)``, and the recorded sites.
    """
    batch = next(iter(params.values())).shape[0]
    with SiteMessenger(rule, estimator, distributions) as handler:
        cost = objective.model(params)
    if not isinstance(cost, Tensor) or cost.shape != (batch,):
        got = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(
            f"{type(objective).__name__}.model must return one cost per draw, shape ({batch},); "
            f"got {got}"
        )
    return cost, handler.sites


def hard_sample(logits: Tensor, u: Tensor) -> Tensor:
    """``h = 1[u < sigmoid(a)]`` as a float tensor (P(h=1) = sigmoid(a))."""
    return below(u, torch.sigmoid(logits), logits.dtype)


def below(u: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """``(u < p).to(dtype)``, the comparison written straight into a ``dtype`` tensor."""
    shape = u.shape if u.shape == p.shape else torch.broadcast_shapes(u.shape, p.shape)
    return torch.lt(u, p, out=torch.empty(shape, dtype=dtype, device=p.device))


def hard_rule(uniforms: Uniforms) -> Rule:
    """The plain stochastic neuron (any kind), no gradient through the sample."""

    def rule(name: str, logits: Tensor, kind: Kind = BERNOULLI) -> tuple[Tensor, dict[str, Tensor]]:
        u = uniforms(name, kind.unit_shape(logits), logits.dtype)
        return kind.sample(logits.detach(), u), {"u": u}

    return rule


def site_units(objective: Any, estimator: Estimator | None = None) -> dict[str, torch.Size]:
    """Site name -> unit shape (the value's shape without the draws dimension), in order.

    With ``estimator``, a site it does not accept raises its ``TypeError``; without, every
    supported kind is accepted.
    """
    params = {k: v.detach().unsqueeze(0) for k, v in objective.params.items()}
    rng = Rng(0, _device_of(objective))
    name = "probe" if estimator is None else estimator.name
    kinds = tuple(KINDS) if estimator is None else estimator.core_distributions()
    with torch.no_grad():
        _, sites = run_model(objective, params, hard_rule(Uniforms(rng)), name, kinds)
    return {name: s.value.shape[1:] for name, s in sites.items()}


def _device_of(objective: Any) -> torch.device:
    return next(iter(objective.params.values())).device


def per_draw_params(params: Mapping[str, Tensor], draws: int) -> dict[str, Tensor]:
    """A leaf copy of every parameter for each draw: ``(draws, *param.shape)``."""
    return {
        k: v.detach().unsqueeze(0).expand(draws, *v.shape).requires_grad_(True)
        for k, v in params.items()
    }


def repeat_draws(params: Mapping[str, Tensor], times: int) -> dict[str, Tensor]:
    """Repeat each draw's parameters ``times`` times in a row: ``(draws * times, ...)``."""
    if times == 1:
        return dict(params)
    return {
        k: v.unsqueeze(1).expand(v.shape[0], times, *v.shape[1:]).reshape(-1, *v.shape[1:])
        for k, v in params.items()
    }


def grads_or_zeros(out: Tensor, leaves: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``d out / d leaf`` for each leaf, zeros where ``out`` does not depend on it."""
    names = list(leaves)
    if not out.requires_grad:
        return {k: torch.zeros_like(leaves[k]) for k in names}
    grads = torch.autograd.grad(out, [leaves[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}


# ---------------------------------------------------------------------------------------------
# What the Pyro engine and an estimator exchange at a site
# ---------------------------------------------------------------------------------------------


@dataclass
class SiteInput:
    """What the engine gives :meth:`Estimator.site_value` at one site in one run.

    ``logits``: the site's logits at its full shape, differentiable in the parameters.
    ``probs``: ``sigmoid(logits.detach())`` (``None`` at enumerated sites). ``uniforms(name,
    shape, dtype)``: the site's uniforms, from torch's generator; where the value is already
    given (``poutine.replay``) they are drawn so that ``1[u < p]`` reproduces it. ``offset``:
    this run's offset of the logits (a re-run from :meth:`Estimator.site_reruns`), else
    ``None``. ``assigned``: this run's value (a configuration from
    :meth:`Estimator.site_configurations`; zeros in the first, shape-probing run), else
    ``None``. ``kind``: the site's :class:`~stochgrad.estimators.distributions.Kind`; for a
    ``Categorical`` site ``logits`` has the categories as a last dim, ``probs`` is ``None`` and
    the uniforms (one per unit) reproduce a given value ``k`` as ``cdf_{k-1} <= u < cdf_k``.
    """

    name: str
    fn: Distribution
    logits: Tensor
    probs: Tensor | None
    uniforms: Callable[[str, torch.Size, torch.dtype], Tensor]
    offset: Tensor | None = None
    assigned: Tensor | None = None
    kind: Kind = BERNOULLI


@dataclass
class SiteValue:
    """What :meth:`Estimator.site_value` returns: the value the program sees, its hard sample
    (default ``value > 0``), and anything later hooks read from the record's ``extra``
    (``"log_prob"``: ``log q(hard)`` per unit, differentiable in the logits)."""

    value: Tensor
    hard: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Reruns:
    """Extra evaluations asked for by one estimator's sites: the program is re-run, once per
    entry of ``offsets`` (``{site: offset of its logits}``), with the same random numbers and
    no gradient. ``data`` is the estimator's own (coefficients, directions) for its terms."""

    offsets: list[dict[str, Tensor]]
    data: Any = None


@dataclass
class SiteCosts:
    """What the engine gives :meth:`Estimator.site_term` for one site in one run.

    ``cost``: the cost the site's units are credited with (detached; the site's batch dims,
    event dims as singletons). ``others``: the same for the other particles, averaged
    (``site_needs_peers``; ``None`` with one particle). ``changes[j]``: re-run ``j``'s cost
    minus ``cost``, reduced the same way (``None`` where re-run ``j`` did not move this site).
    ``weight``: the detached weight of this run in the averaged loss. ``sample_dim``: a dim
    holding vectorised particles, if any. ``state``: a list the term may append samples to;
    the engine hands it to :meth:`Estimator.site_commit` after the step.
    """

    cost: Tensor
    others: Tensor | None = None
    reruns: Reruns | None = None
    changes: list[Tensor | None] = field(default_factory=list)
    weight: float | Tensor = 1.0
    sample_dim: int | None = None
    state: list[Any] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The estimator base class
# ---------------------------------------------------------------------------------------------


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_objective(objective: Any) -> None:
    """An objective has a non-empty ``params`` dict of finite tensors; say what is wrong."""
    params = getattr(objective, "params", None)
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            f"expected a stochastic objective with a non-empty `params` dict (see "
            f"stochgrad.models), got {type(objective).__name__}"
        )
    for k, v in params.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"parameter {k!r} must be a torch.Tensor, got {type(v).__name__}")
        bad = int((~torch.isfinite(v.detach())).sum())
        if bad:
            raise ValueError(
                f"parameter {k!r} of {type(objective).__name__} has {bad} non-finite "
                "value(s) (nan or inf); parameters must be finite"
            )


class Estimator:
    """Base class: a gradient estimator for objectives with Bernoulli stochastic neurons.

    Subclasses set ``name`` (registry name), ``unbiased`` (``"yes"``, ``"no"`` or
    ``"asymptotic"`` -- unbiased only as a step size goes to 0), ``description``, and implement
    :meth:`cost` and :meth:`_draw`. Stateful estimators also override :meth:`warmup`,
    :meth:`state_dict` and :meth:`load_state_dict`.
    """

    name: ClassVar[str] = ""
    unbiased: ClassVar[str] = "no"
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.unbiased not in UNBIASED:
            raise ValueError(f"{cls.__name__}.unbiased must be one of {UNBIASED}")

    # -- options ------------------------------------------------------------------------------

    @classmethod
    def option_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def options(self) -> dict[str, Any]:
        """The options this estimator was built with (for tables and ``run.json``)."""
        return {k: getattr(self, k) for k in self.option_names()}

    def label(self) -> str:
        """A short readable label in the CLI's spec syntax: ``name:key=value,...``.

        Only options that differ from what the estimator would resolve them to by default
        (given its other options) are shown, e.g. ``score_function:baseline=optimal``.
        """
        opts = self.options()
        parts = []
        for k, v in opts.items():
            try:
                default = type(self)(**{j: w for j, w in opts.items() if j != k}).options()[k]
            except (TypeError, ValueError):
                default = inspect.Parameter.empty
            if default is inspect.Parameter.empty or v != default:
                parts.append(f"{k}={v}")
        return self.name + (f":{','.join(parts)}" if parts else "")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    # -- what subclasses provide ---------------------------------------------------------------

    def cost(self, objective: Any) -> Cost:
        """Model evaluations and backward passes per draw on ``objective``."""
        raise NotImplementedError

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        """``draws`` independent per-draw estimates, ``(draws, *param.shape)`` per param."""
        raise NotImplementedError

    def warmup(self, objective: Any, rng: Rng) -> None:
        """Bring any internal state (baselines) to its working value; stateless: no-op."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state; got keys {sorted(state)}")

    # -- behaviour at a Pyro sample site (the engine's hooks; module docstring) ---------------

    site_distributions: ClassVar[tuple[str, ...]] = ()

    def core_distributions(self) -> tuple[str, ...]:
        """The base distributions the batched core accepts: ``site_distributions``'s, or
        ``("Bernoulli",)`` for an estimator that cannot act at a Pyro site."""
        return tuple(d for d in self.site_distributions if d in KINDS) or ("Bernoulli",)

    site_validates: ClassVar[bool] = True
    site_owns_log_q: ClassVar[bool] = False
    site_enumerates: ClassVar[bool] = False
    site_perturbs: ClassVar[bool] = False
    site_needs_peers: ClassVar[bool] = False

    def site_value(self, site: SiteInput) -> SiteValue:
        """The value the site takes in this run (and what :meth:`site_term` needs later)."""
        raise TypeError(
            f"site {site.name!r}: estimator {self.name!r} cannot act at a Pyro sample site "
            "(it defines no site_value hook); see stochgrad.estimators.base for the protocol"
        )

    def site_reruns(self, records: Sequence[Any], generator: torch.Generator) -> Reruns:
        """Extra evaluations for this estimator's sites (``site_perturbs = True``)."""
        raise NotImplementedError

    def site_configurations(self, records: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The values of every run to enumerate (``site_enumerates = True``)."""
        raise NotImplementedError

    def site_log_weight(self, record: Any) -> Tensor | None:
        """``log`` of the weight of this run's value at the site (enumeration), or ``None``."""
        return None

    def site_term(self, record: Any, costs: SiteCosts) -> Tensor | float:
        """The term this site adds to the loss being minimised (``0.0``: none)."""
        return 0.0

    def site_commit(self, record: Any, samples: list[Any], sample_dim: int | None) -> None:
        """Fold what :meth:`site_term` put in ``costs.state`` into training state."""

    # -- the public entry point ----------------------------------------------------------------

    def estimate(
        self,
        objective: Any,
        num_draws: int,
        seed: int | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Tensor]:
        """Independent per-draw gradient estimates of ``E[cost]`` w.r.t. ``objective.params``.

        Returns ``{name: Tensor(num_draws, *param.shape)}`` on the parameters' device and
        dtype. Draws are computed in batched chunks (``chunk_size`` draws at a time; by default
        sized to the model); the numbers depend only on ``seed`` and ``chunk_size``.
        ``progress`` (optional) is called with the number of draws finished after each chunk.
        """
        check_positive_int("num_draws", num_draws)
        check_objective(objective)
        checks.check_draw_budget(self, objective, num_draws)
        rng = Rng(seed, _device_of(objective))
        if chunk_size is None:
            chunk_size = self.default_chunk_size(objective)
        check_positive_int("chunk_size", chunk_size)
        self.warmup(objective, rng)
        # The output is allocated once and each chunk is copied into it, so that the peak
        # memory is the output plus one chunk's working set (never a list of chunks plus their
        # concatenation).
        out: dict[str, Tensor] = {}
        finite = checks.FiniteDraws()
        done = 0
        while done < num_draws:
            n = min(chunk_size, num_draws - done)
            g = self._draw(objective, n, rng)
            finite.add(g)
            if n == num_draws:  # one chunk: its tensors are the output
                out = {k: g[k].detach() for k in objective.params}
            else:
                for k in objective.params:
                    if k not in out:
                        v = g[k]
                        out[k] = torch.empty(
                            (num_draws, *v.shape[1:]), dtype=v.dtype, device=v.device
                        )
                    out[k][done : done + n].copy_(g[k].detach())
            del g
            done += n
            if progress is not None:
                progress(n)
        finite.check(self, objective)
        return out

    def default_chunk_size(self, objective: Any) -> int:
        units = sum(math.prod(s) for s in site_units(objective, self).values())
        numel = sum(v.numel() for v in objective.params.values())
        per_draw = max(1.0, self.cost(objective).evals) * (units + numel)
        return max(1, int(DEFAULT_CHUNK_ELEMENTS // per_draw))


class SurrogateEstimator(Estimator):
    """Estimators that run the model once per sample and backpropagate through a surrogate.

    A subclass gives the site rule (what a unit outputs, what gradient it lets through) and,
    if needed, the surrogate built from the costs and the recorded sites; the per-draw
    gradient is ``d surrogate / d (per-draw params)``.
    """

    num_samples: int = 1

    def cost(self, objective: Any) -> Cost:
        return Cost(evals=float(self.num_samples), backwards=1.0)

    def rule(self, uniforms: Uniforms) -> Rule:
        raise NotImplementedError

    def surrogate(self, cost: Tensor, sites: dict[str, Site]) -> Tensor:
        """Scalar whose gradient w.r.t. each draw's parameters is that draw's estimate.

        ``cost`` has shape ``(draws, K)``; the default is the pathwise mean over the K samples.
        """
        return cost.mean(1).sum()

    def site_value(self, site: SiteInput) -> SiteValue:
        """By default the core's rule, fed the site's (conditional) uniforms."""
        uniforms: Any = site.uniforms  # any callable (name, shape, dtype) -> uniforms
        rule: Any = self.rule(uniforms)
        if site.kind is BERNOULLI:
            value, extra = rule(site.name, site.logits)
            return SiteValue(value, extra=extra)
        value, extra = rule(site.name, site.logits, kind=site.kind)
        return SiteValue(value, hard=value.detach(), extra=extra)

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        leaves = per_draw_params(objective.params, draws)
        batched = repeat_draws(leaves, self.num_samples)
        rule = self.rule(Uniforms(rng))
        cost, sites = run_model(objective, batched, rule, self.name, self.core_distributions())
        surrogate = self.surrogate(cost.view(draws, self.num_samples), sites)
        return grads_or_zeros(surrogate, leaves)
