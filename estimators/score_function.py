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
  ``b_i = E[(h_i - p_i)^2 L] / E[(h_i - p_i)^2]``; ``mode="online"`` estimates it as the
  ratio of two moving averages over earlier draws (as the paper does), ``mode="oracle"`` uses
  the exact expectation (enumeration or the model's closed form) -- for analysis.
- ``leave_one_out``: ``K >= 2`` samples per draw; sample ``k`` uses the mean cost of the
  other ``K - 1`` (Kool et al. 2019, "Buy 4 REINFORCE samples").

With ``num_samples = K`` every draw averages ``K`` single-sample estimates.

Requires: Bernoulli sample sites.
Bias: none for every baseline (the stateful ones are built from earlier draws only).
Warm-up: stateful baselines (``moving_average``, ``optimal`` online) are updated over
``warmup_draws`` draws in chunks of ``warmup_chunk`` before ``estimate`` measures, when the
estimator has no state yet; after that their state carries over between calls.

References: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 3, Eq. 10;
Williams (1992); Weaver & Tao (2001).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

from .base import (
    Rule,
    Site,
    SurrogateEstimator,
    Uniforms,
    check_choice,
    check_positive_float,
    check_positive_int,
    hard_sample,
)
from .registry import register

BASELINES = ("none", "moving_average", "optimal", "leave_one_out")
MODES = ("online", "oracle")


def bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    """Elementwise ``log q(h)`` of ``Bern(sigmoid(a))`` (differentiable in ``a``)."""
    return value * logsigmoid(logits) + (1 - value) * logsigmoid(-logits)


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
        warmup_draws: int = 2000,
        warmup_chunk: int = 100,
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
        self.warmup_draws = check_positive_int("warmup_draws", warmup_draws, 0)
        self.warmup_chunk = check_positive_int("warmup_chunk", warmup_chunk)
        # state: moving average -> {"mean": scalar}; optimal -> {site: {"num", "den"}}
        self._state: dict[str, Any] = {}
        self._oracle: dict[str, Tensor] | None = None

    @property
    def stateful(self) -> bool:
        return self.baseline == "moving_average" or (
            self.baseline == "optimal" and self.mode == "online"
        )

    # -- the site rule and the surrogate ---------------------------------------------------------

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            h = hard_sample(logits.detach(), u)
            return h, {"log_prob": bernoulli_log_prob(logits, h)}

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
                self._state["mean"] = (
                    m
                    if "mean" not in self._state
                    else (beta * self._state["mean"] + (1 - beta) * m)
                )
                return
            flat = cost.reshape(-1)
            for name, site in sites.items():
                p = torch.sigmoid(site.logits.detach())
                sq = (site.value - p) ** 2  # (batch, *units)
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
        if not self.stateful or self._state:
            return
        left = self.warmup_draws
        while left > 0:
            n = min(self.warmup_chunk, left)
            self._draw(objective, n, rng)
            left -= n

    def state_dict(self) -> dict[str, Any]:
        def copy(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.detach().clone()
            if isinstance(x, dict):
                return {k: copy(v) for k, v in x.items()}
            return x

        return copy(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.stateful and state:
            raise ValueError(f"baseline={self.baseline!r} has no state; got keys {sorted(state)}")
        self._state = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in state.items()}

    def reset(self) -> None:
        """Forget the baseline state (the next ``estimate`` warms up again)."""
        self._state = {}
        self._oracle = None


def oracle_optimal_baseline(objective: Any) -> dict[str, Tensor]:
    """Exact per-unit ``E[(h-p)^2 L] / E[(h-p)^2]`` per site (closed form or enumeration)."""
    closed = getattr(objective, "optimal_baseline", None)
    if callable(closed):
        return closed()
    from .exact import enumerate_model

    with torch.no_grad():
        weights, cost, sites = enumerate_model(objective, grad=False)
    out = {}
    for name, site in sites.items():
        p = torch.sigmoid(site.logits)
        sq = (site.value - p) ** 2  # (configs, *units)
        w = weights.view(-1, *([1] * (sq.dim() - 1)))
        c = cost.view_as(w)
        out[name] = (w * sq * c).sum(0) / (w * sq).sum(0)
    return out
