"""Score-function (REINFORCE) estimator with the paper's baselines.

Identity (the paper's Theorem 1, Williams 1992): for a unit ``h ~ Bern(p)``, ``p = sigmoid(a)``,

    d/da E[L] = E[(h - p) (L - b)]

for any baseline ``b`` that does not depend on the current draw; in general the estimate is
``(L - b) * d log q(h) / d theta + dL/dtheta|_h`` (the last term for parameters that reach
the cost other than through the samples).

Baselines (``baseline=``):

- ``none``: ``b = 0``.
- ``moving_average``: an exponential moving average of ``L`` over earlier draws, updated
  *after* it has been used, so a draw never enters its own baseline.
- ``optimal``: the paper's Eq. 10 (Weaver & Tao 2001), per unit
  ``b_i = E[(h_i - p_i)^2 L] / E[(h_i - p_i)^2]``; at a categorical unit the same with the
  squared norm of its score, ``b_i = E[||e_k - p_i||^2 L] / E[||e_k - p_i||^2]`` (the scalar
  baseline that minimises the unit's summed gradient variance; for two categories it is
  Eq. 10); ``mode="online"`` estimates it as the
  ratio of two moving averages over earlier draws (as the paper does), ``mode="oracle"`` uses
  the exact expectation (enumeration or the model's closed form) -- for analysis.
- ``leave_one_out``: ``K >= 2`` samples per draw; sample ``k`` uses the mean cost of the
  other ``K - 1`` (Kool et al. 2019, "Buy 4 REINFORCE samples").
- ``learned``: ``b = f_psi(x)``, a small network of a user-given input ``x`` (in a Pyro
  program: the site's ``infer={"baseline_input": x}``; by default a linear map, or a learned
  constant when there is no input), trained by squared error ``(L - f_psi(x))^2`` with its own
  Adam optimiser *after* the draw has used it (Mnih & Gregor 2014, NVIL). ``network=`` gives
  your own module (shared by every site this estimator serves).

``init`` (``moving_average`` only): ``"first"`` starts the average at the first batch's mean;
``"zero"`` starts it at 0 so the first update gives ``(1 - decay) L``, as Pyro's
``use_decaying_avg_baseline`` does (``decay`` is Pyro's ``baseline_beta``).

With ``num_samples = K`` every draw averages ``K`` single-sample estimates.

Requires: Bernoulli, Categorical or OneHotCategorical sample sites (``Categorical``:
``log q(k) = log softmax(a)_k``, ``k`` sampled by inverse CDF from one uniform per unit, in
``estimate()`` and at Pyro sites; ``OneHotCategorical``: the same ``k`` as a one-hot vector,
``log q(h) = <h, log softmax(a)>``), with every baseline.
Bias: none for every baseline (the stateful ones are built from earlier draws only).
Warm-up: every ``estimate`` call starts the stateful baselines (``moving_average``, ``optimal``
online, ``learned``) from fresh state and updates them over ``warmup_draws`` draws, in chunks of
``warmup_chunk``, on the objective it is given, before it measures: the same seed gives the same
numbers on any objective, in any order, and objectives of different sizes can share one object.
(The per-site state of Pyro programs, below, is separate and is not reset.) The default
``warmup_draws=None`` runs ``max(2000, warmup_chunk * n)`` draws, ``n`` the fewest updates after
which the weight the average still puts on its start, ``decay ** n``, is at most
``WARMUP_RESIDUAL = 1e-3`` (66 updates for ``decay = 0.9``): the criterion for "warmed up",
for ``init="zero"`` (whose start is 0) as for ``init="first"``.

In a Pyro program (:mod:`stochgrad.estimators.elbo`, :mod:`stochgrad.estimators.surrogate`)
the state is kept per site name in this object (:meth:`site_baseline`, :meth:`site_update`),
never in Pyro's parameter store: ``moving_average`` keeps the shape of the site's cost (its
plate dims, as Pyro's decaying-average baseline does); ``optimal`` keeps one value per unit
(the site's event dims), averaged over plates and particles as in Eq. 10.
``state_dict()`` holds it under ``"__sites__"`` and ``"__learned__"``.

References: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 3, Eq. 10;
Williams (1992); Weaver & Tao (2001); Mnih & Gregor (2014), arXiv:1402.0030, Sec. 3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import softplus

from .base import (
    Rule,
    Site,
    SiteCosts,
    SiteInput,
    SiteValue,
    SurrogateEstimator,
    Uniforms,
    below,
    check_choice,
    check_positive_float,
    check_positive_int,
    hard_sample,
    repeat_draws,
    run_model,
)
from .distributions import BERNOULLI, ONE_HOT_CATEGORICAL, Kind
from .registry import register

BASELINES = ("none", "moving_average", "optimal", "leave_one_out", "learned")
MODES = ("online", "oracle")
INITS = ("first", "zero")
SITES_KEY = "__sites__"
WARMUP_RESIDUAL = 1e-3  # default warm-up: the start's weight decay**n left in the average
LEARNED_KEY = "__learned__"


def bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    """Elementwise ``log q(h) = h a - softplus(a)`` of ``Bern(sigmoid(a))`` (differentiable)."""
    return value * logits - softplus(logits)


def value_log_prob(kind: Kind, logits: Tensor, value: Tensor) -> Tensor:
    """``log q(value)`` per unit, shaped to broadcast against the value.

    For Bernoulli and Categorical units the value has the units' shape; a OneHotCategorical
    value has the categories as a last dim, which the log-density keeps as a singleton.
    """
    log_prob = kind.log_prob(logits, value)
    return log_prob.unsqueeze(-1) if log_prob.dim() < value.dim() else log_prob


def squared_score(kind: Kind, logits: Tensor, value: Tensor) -> Tensor:
    """``||d log q(value) / d logits||^2`` per unit, shaped like :func:`value_log_prob`.

    Bernoulli: ``(h - p)^2``. Categorical: ``||e_k - softmax(a)||^2`` over the categories
    (OneHotCategorical: the same, with the category dim kept as a singleton).
    """
    if kind is BERNOULLI:
        return (value - torch.sigmoid(logits)) ** 2
    p = torch.softmax(logits, -1)
    if kind is ONE_HOT_CATEGORICAL:
        return ((value - p) ** 2).sum(-1, keepdim=True)
    p_k = p.gather(-1, value.long().unsqueeze(-1)).squeeze(-1)
    return 1 - 2 * p_k + (p * p).sum(-1)


@register
class ScoreFunction(SurrogateEstimator):
    """REINFORCE with a baseline: ``g = (L - b) d log q(h)/d theta + dL/d theta|_h``."""

    name = "score_function"
    unbiased = "yes"
    description = "REINFORCE / likelihood ratio (paper Thm 1) with optional baselines"

    def __init__(
        self,
        baseline: str = "none",
        num_samples: int | None = None,
        decay: float = 0.9,
        mode: str = "online",
        warmup_draws: int | None = None,
        warmup_chunk: int = 100,
        init: str = "first",
        network: torch.nn.Module | None = None,
        lr: float = 1e-2,
    ):
        self.baseline = check_choice("baseline", baseline, BASELINES)
        if num_samples is None:
            num_samples = 2 if baseline == "leave_one_out" else 1
        minimum = 2 if baseline == "leave_one_out" else 1
        if baseline == "leave_one_out" and isinstance(num_samples, int) and num_samples < 2:
            raise ValueError(
                f"baseline='leave_one_out' needs num_samples K >= 2 (each sample's baseline is "
                f"the mean of the other K-1); got num_samples={num_samples}"
            )
        self.num_samples = check_positive_int("num_samples", num_samples, minimum)
        self.decay = check_positive_float("decay", decay)
        if not self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.mode = check_choice("mode", mode, MODES)
        if mode == "oracle" and baseline != "optimal":
            raise ValueError("mode='oracle' applies only to baseline='optimal'")
        if warmup_draws is not None:
            check_positive_int("warmup_draws", warmup_draws, 0)
        self.warmup_draws = warmup_draws
        self.warmup_chunk = check_positive_int("warmup_chunk", warmup_chunk)
        self.init = check_choice("init", init, INITS)
        if network is not None and not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if network is not None and baseline != "learned":
            raise ValueError("network= applies only to baseline='learned'")
        self.network = network
        self.lr = check_positive_float("lr", lr)
        # state: moving average -> {"mean": scalar}; optimal -> {site: {"num", "den"}}
        self._state: dict[str, Any] = {}
        self._oracle: dict[str, Tensor] | None = None
        # Pyro programs: per-site state {site: {"mean"} | {"num", "den"}}
        self._sites: dict[str, dict[str, Tensor]] = {}
        # learned baselines: per-site module and optimiser
        self._learned: dict[str, _Learned] = {}
        # estimate(): learned baselines of the batched core, rebuilt at every warm-up
        self._core_learned: dict[str, _Learned] = {}

    # -- at a Pyro site: value h, term (L - b) log q(h) per unit, state per site ------------

    site_distributions = ("Bernoulli", "Categorical", "OneHotCategorical")
    site_owns_log_q = True
    site_needs_peers = True

    def site_value(self, site: SiteInput) -> SiteValue:
        if type(self).rule is not ScoreFunction.rule or site.probs is None:
            return super().site_value(site)
        # the rule with ``probs`` (sigmoid of the detached logits) reused: the same numbers
        u = site.uniforms(site.name, site.logits.shape, site.logits.dtype)
        h = below(u, site.probs, site.logits.dtype)
        return SiteValue(h, hard=h, extra={"log_prob": bernoulli_log_prob(site.logits, h)})

    def site_term(self, record: Any, costs: SiteCosts) -> Tensor:
        b = self.site_baseline(
            record.name,
            costs.cost,
            record.event_dim,
            others=costs.others,
            baseline_input=record.baseline_input,
        )
        if record.kind is BERNOULLI:
            probs = (
                record.probs if record.probs is not None else torch.sigmoid(record.logits.detach())
            )
            sq = (record.hard - probs) ** 2
        else:
            sq = squared_score(record.kind, record.logits.detach(), record.hard)
        costs.state.append((costs.weight, costs.cost, sq, record.baseline_input))
        return (record.log_q() * record.unit_mask() * (costs.cost - b).detach()).sum()

    def site_commit(self, record: Any, samples: list[Any], sample_dim: int | None) -> None:
        self.site_update(record.name, samples, record.event_dim, sample_dim)

    @property
    def stateful(self) -> bool:
        return self.baseline in ("moving_average", "learned") or (
            self.baseline == "optimal" and self.mode == "online"
        )

    # -- the site rule and the surrogate ---------------------------------------------------------

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(
            name: str, logits: Tensor, kind: Kind = BERNOULLI
        ) -> tuple[Tensor, dict[str, Tensor]]:
            if kind is BERNOULLI:
                u = uniforms(name, logits.shape, logits.dtype)
                h = hard_sample(logits.detach(), u)
                return h, {"log_prob": bernoulli_log_prob(logits, h)}
            u = uniforms(name, kind.unit_shape(logits), logits.dtype)
            h = kind.sample(logits.detach(), u)
            return h, {"log_prob": value_log_prob(kind, logits, h)}

        return rule

    def surrogate(self, cost: Tensor, sites: dict[str, Site]) -> Tensor:
        draws, k = cost.shape
        flat_cost = cost.reshape(-1)  # (draws * K,)
        total = flat_cost.sum()  # pathwise part: dL/dtheta with the samples held fixed
        for name, site in sites.items():
            b = self.baseline_for(name, site, cost)  # broadcastable to (draws * K, *units)
            units = site.value.dim() - 1
            weight = (flat_cost.view(-1, *([1] * units)) - b).detach()
            total = total + (site.extra["log_prob"] * weight).sum()
        self.update(cost, sites)
        return total / k

    def baseline_for(self, name: str, site: Site, cost: Tensor) -> Tensor | float:
        """The baseline for each sample at ``site``, from state or the other samples only."""
        units = site.value.dim() - 1
        if self.baseline == "none":
            return 0.0
        if self.baseline == "leave_one_out":
            draws, k = cost.shape
            others = (cost.sum(1, keepdim=True) - cost) / (k - 1)  # (draws, K)
            return others.reshape(-1, *([1] * units))
        if self.baseline == "moving_average":
            return self._state["mean"] if "mean" in self._state else 0.0
        if self.baseline == "learned":
            return self._core_learned_for(name, site.logits).predict(None, units).detach()
        # optimal, per unit
        if self.mode == "oracle":
            if self._oracle is None or name not in self._oracle:
                raise ValueError(f"oracle baseline missing for site {name!r}; call warmup first")
            return self._oracle[name]
        s = self._state.get(name)
        if s is None:
            return 0.0
        return s["num"] / s["den"].clamp_min(torch.finfo(s["den"].dtype).tiny)

    def update(self, cost: Tensor, sites: dict[str, Site]) -> None:
        """Fold this batch into the moving averages -- after the batch has used them."""
        if not self.stateful:
            return
        beta = self.decay
        with torch.no_grad():
            if self.baseline == "moving_average":
                m = cost.mean()
                first = m if self.init == "first" else (1 - beta) * m
                self._state["mean"] = (
                    first
                    if "mean" not in self._state
                    else (beta * self._state["mean"] + (1 - beta) * m)
                )
                return
            if self.baseline == "learned":
                flat = cost.reshape(-1)
                for name, site in sites.items():
                    units = site.value.dim() - 1
                    target = flat.view(-1, *([1] * units))
                    self._core_learned_for(name, target).fit([(1.0, target, None)], units)
                return
            flat = cost.reshape(-1)
            for name, site in sites.items():
                sq = squared_score(site.kind, site.logits.detach(), site.value)  # (batch, *units)
                num = (sq * flat.view(-1, *([1] * (sq.dim() - 1)))).mean(0)
                den = sq.mean(0)
                s = self._state.get(name)
                if s is None:
                    self._state[name] = {"num": num, "den": den}
                else:
                    s["num"] = beta * s["num"] + (1 - beta) * num
                    s["den"] = beta * s["den"] + (1 - beta) * den

    # -- warm-up and state -------------------------------------------------------------------

    def warmup(self, objective: Any, rng: Any) -> None:
        if self.baseline == "optimal" and self.mode == "oracle":
            self._oracle = oracle_optimal_baseline(objective)
            return
        if not self.stateful:
            return
        self._state, self._core_learned = {}, {}  # fresh state for this objective
        left = self.resolved_warmup_draws()
        while left > 0:
            n = min(self.warmup_chunk, left)
            self._warmup_step(objective, n, rng)
            left -= n

    def _warmup_step(self, objective: Any, draws: int, rng: Any) -> None:
        """One warm-up chunk: the draws' costs folded into the state, without gradients.

        The same uniforms are drawn, and the same state results, as from ``_draw`` (whose
        gradients a warm-up throws away), so the measured draws are unchanged; only the model's
        backward pass (and the per-draw parameter copies) are saved.
        """
        params = {
            k: v.detach().unsqueeze(0).expand(draws, *v.shape) for k, v in objective.params.items()
        }
        with torch.no_grad():
            batched = repeat_draws(params, self.num_samples)
            rule = self.rule(Uniforms(rng))
            cost, sites = run_model(objective, batched, rule, self.name, self.core_distributions())
        self.update(cost.view(draws, self.num_samples), sites)

    def resolved_warmup_draws(self) -> int:
        """Draws of the warm-up: ``warmup_draws``, or by default enough for the criterion."""
        if self.warmup_draws is not None:
            return self.warmup_draws
        updates = math.ceil(math.log(WARMUP_RESIDUAL) / math.log(self.decay) - 1e-9)
        return max(2000, self.warmup_chunk * updates)

    def state_dict(self) -> dict[str, Any]:
        def copy(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.detach().clone()
            if isinstance(x, dict):
                return {k: copy(v) for k, v in x.items()}
            return x

        out = copy(self._state)
        if self._sites:
            out[SITES_KEY] = copy(self._sites)
        learned = {**self._core_learned, **self._learned}  # the core's, then the sites'
        if learned:
            out[LEARNED_KEY] = {k: v.state_dict() for k, v in learned.items()}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.stateful and state:
            raise ValueError(f"baseline={self.baseline!r} has no state; got keys {sorted(state)}")
        state = dict(state)
        sites = state.pop(SITES_KEY, {})
        learned = state.pop(LEARNED_KEY, {})
        self._state = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in state.items()}
        self._sites = {k: dict(v) for k, v in sites.items()}
        self._learned = {}
        self._core_learned = {}
        for name, s in learned.items():
            self._learned[name] = _Learned.from_state_dict(s, self.network, self.lr)

    def reset(self) -> None:
        """Forget the baseline state (the next ``estimate`` warms up again)."""
        self._state = {}
        self._oracle = None
        self._sites = {}
        self._learned = {}
        self._core_learned = {}

    # -- per-site baselines in Pyro programs ------------------------------------------------

    def site_baseline(
        self,
        name: str,
        cost: Tensor,
        event_dim: int,
        *,
        others: Tensor | None = None,
        baseline_input: Tensor | None = None,
    ) -> Tensor | float:
        """The baseline for the units of site ``name``, from state built on earlier steps.

        ``cost``: the site's cost per element with singleton event dims appended (what each
        unit is credited with). ``others``: for ``leave_one_out``, the mean cost of the other
        samples, same shape. Returns something broadcastable to the site's units.
        """
        if self.baseline == "none":
            return 0.0
        if self.baseline == "leave_one_out":
            if others is None:
                raise ValueError(
                    f"site {name!r}: baseline='leave_one_out' needs several samples; use "
                    "num_particles >= 2 (vectorize_particles=True in an ELBO)"
                )
            return others
        if self.baseline == "learned":
            return self._learned_for(name, baseline_input, cost).predict(baseline_input, event_dim)
        if self.mode == "oracle":
            raise ValueError(
                f"site {name!r}: mode='oracle' needs an enumerable objective (estimate()); "
                "in a Pyro program use mode='online'"
            )
        s = self._sites.get(name)
        if s is None:
            return 0.0
        if self.baseline == "moving_average":
            return _fitted(s["mean"], cost.shape)
        ratio = s["num"] / s["den"].clamp_min(torch.finfo(s["den"].dtype).tiny)
        return ratio  # (1, ..., 1, *units): one value per unit, broadcast over plates

    def site_update(
        self,
        name: str,
        samples: list[tuple[float | Tensor, Tensor, Tensor, Tensor | None]],
        event_dim: int,
        sample_dim: int | None = None,
    ) -> None:
        """Fold this step's samples into the site's state -- after they have used it.

        ``samples``: ``(weight, cost, squared_score, baseline_input)`` per sample, weights
        summing to 1 (particles and enumerated configurations); ``cost`` as in
        :meth:`site_baseline`, ``squared_score`` the units' ``||d log q / d logits||^2``
        (:func:`squared_score`). ``sample_dim``: a dim of
        these tensors that holds vectorised particles, averaged out of the state.
        """
        if not self.stateful:
            return
        if self.baseline == "learned":
            fit = [(w, c, x) for w, c, _, x in samples]
            self._learned_for(name, samples[0][3], samples[0][1]).fit(fit, event_dim)
            return

        def avg(x: Tensor) -> Tensor:
            return x.mean(sample_dim, keepdim=True) if sample_dim is not None else x

        beta = self.decay
        with torch.no_grad():
            new: dict[str, Tensor]
            if self.baseline == "moving_average":
                new = {"mean": _weighted_sum([(w, avg(c)) for w, c, _, _ in samples])}
            else:
                # Eq. 10 per unit: average over every batch dim (particles, plates), keep
                # the units, so the state does not depend on the batch size.
                def per_unit(x: Tensor) -> Tensor:
                    dims = tuple(range(x.dim() - event_dim))
                    return x.mean(dims, keepdim=True) if dims else x

                sq = [(w, c, q) for w, c, q, _ in samples]
                new = {
                    "num": _weighted_sum([(w, per_unit(q * c)) for w, c, q in sq]),
                    "den": _weighted_sum([(w, per_unit(q)) for w, _, q in sq]),
                }
            old = self._sites.get(name)
            if old is None:
                if self.baseline == "moving_average" and self.init == "zero":
                    new = {k: (1 - beta) * v for k, v in new.items()}
                self._sites[name] = new
                return
            self._sites[name] = {
                k: beta * (old[k] if old[k].shape == v.shape else _fitted(old[k], v.shape))
                + (1 - beta) * v
                for k, v in new.items()
            }

    def _core_learned_for(self, name: str, like: Tensor) -> _Learned:
        """The batched core's learned constant for site ``name`` (built on first use)."""
        if name not in self._core_learned:
            self._core_learned[name] = _Learned.build(name, None, None, self.lr, like)
        return self._core_learned[name]

    def _learned_for(self, name: str, baseline_input: Tensor | None, like: Tensor) -> _Learned:
        """The site's baseline module, built on first use with ``like``'s dtype and device."""
        if name not in self._learned:
            self._learned[name] = _Learned.build(name, self.network, baseline_input, self.lr, like)
        return self._learned[name]


def _weighted_sum(terms: list[tuple[float | Tensor, Tensor]]) -> Tensor:
    total = terms[0][0] * terms[0][1]
    for w, x in terms[1:]:
        total = total + w * x
    return total


def _fitted(state: Tensor, shape: torch.Size) -> Tensor:
    """``state`` if it broadcasts to ``shape``, else its mean (a plate changed size)."""
    if state.shape == shape:
        return state
    try:
        if torch.broadcast_shapes(state.shape, shape) == tuple(shape):
            return state
    except RuntimeError:
        pass
    return state.mean()


class _Constant(torch.nn.Module):
    """A learned scalar: the baseline when there is no input."""

    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor | None = None) -> Tensor:
        return self.value


class _Learned:
    """A baseline network of a site, and the optimiser that fits it by squared error."""

    def __init__(self, module: torch.nn.Module, lr: float, kind: str):
        self.module, self.kind, self.lr = module, kind, lr
        self.optim = torch.optim.Adam(module.parameters(), lr=lr)
        self.fitted = False

    @classmethod
    def build(
        cls,
        name: str,
        network: torch.nn.Module | None,
        x: Tensor | None,
        lr: float,
        like: Tensor,
    ) -> _Learned:
        if network is not None:
            if x is None:
                raise ValueError(
                    f"site {name!r}: baseline='learned' with a network needs an input; give "
                    "the site infer={'baseline_input': x} (or use network=None for a learned "
                    "constant)"
                )
            return cls(network, lr, "network")
        if x is None:
            return cls(_Constant().to(device=like.device, dtype=like.dtype), lr, "constant")
        linear = torch.nn.Linear(x.shape[-1], 1).to(device=x.device, dtype=x.dtype)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        return cls(linear, lr, f"linear:{x.shape[-1]}")

    def predict(self, x: Tensor | None, event_dim: int) -> Tensor:
        """``f(x)`` detached, with the input's feature dim replaced by ``event_dim`` ones."""
        with torch.no_grad():
            return self._forward(x, event_dim)

    def _forward(self, x: Tensor | None, event_dim: int) -> Tensor:
        if self.kind == "constant":
            return self.module()
        if x is None:
            raise ValueError("this learned baseline was built with an input; the site gave none")
        out = self.module(x.detach())
        if out.dim() >= 1 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        return out.reshape(out.shape + (1,) * event_dim)

    def fit(self, samples: list[tuple[float | Tensor, Tensor, Tensor | None]], event_dim: int):
        """One optimiser step on ``sum_s w_s mean (cost_s - f(x_s))^2``.

        The built-in modules start from the first batch's mean cost (their bias), so the
        baseline is useful from the second step on.
        """
        if not self.fitted and self.kind != "network":
            with torch.no_grad():
                mean = sum(w * c.detach().mean() for w, c, _ in samples)
                bias = self.module.value if self.kind == "constant" else self.module.bias
                bias.fill_(float(mean))  # type: ignore[operator, union-attr]
        self.fitted = True
        with torch.enable_grad():
            loss = sum(
                w * ((c.detach() - self._forward(x, event_dim)) ** 2).mean() for w, c, x in samples
            )
            self.optim.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            self.optim.step()

    def state_dict(self) -> dict[str, Any]:
        """A copy (later steps do not change it)."""
        return copy.deepcopy(
            {
                "kind": self.kind,
                "module": self.module.state_dict(),
                "optim": self.optim.state_dict(),
            }
        )

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], network: torch.nn.Module | None, lr: float
    ) -> _Learned:
        kind = state["kind"]
        if kind == "network":
            if network is None:
                raise ValueError("state holds a learned network but this estimator has none")
            module: torch.nn.Module = network
        elif kind == "constant":
            module = _Constant()
        else:
            module = torch.nn.Linear(int(kind.split(":")[1]), 1)
        if kind != "network":  # built-in modules take the saved tensors' dtype and device
            first = next(iter(state["module"].values()))
            module = module.to(device=first.device, dtype=first.dtype)
        module.load_state_dict(state["module"])
        out = cls(module, lr, kind)
        out.optim.load_state_dict(state["optim"])
        out.fitted = True
        return out


def oracle_optimal_baseline(objective: Any) -> dict[str, Tensor]:
    """Exact per-unit ``E[s^2 L] / E[s^2]`` per site, ``s^2`` the unit's :func:`squared_score`
    (closed form or enumeration)."""
    closed = getattr(objective, "optimal_baseline", None)
    if callable(closed):
        return closed()
    from .exact import enumerate_model

    with torch.no_grad():
        weights, cost, sites = enumerate_model(objective, grad=False)
    out = {}
    for name, site in sites.items():
        sq = squared_score(site.kind, site.logits, site.value)  # (configs, *units)
        w = weights.view(-1, *([1] * (sq.dim() - 1)))
        c = cost.view_as(w)
        out[name] = (w * sq * c).sum(0) / (w * sq).sum(0)
    return out
