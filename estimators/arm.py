"""ARM and DisARM: antithetic two-evaluation estimators for Bernoulli units.

ARM (Yin & Zhou 2019, ICLR, "ARM: Augment-REINFORCE-Merge gradient for stochastic binary
networks", Theorem 1, Eq. 5). With one uniform vector ``u`` per draw shared by all units,
``b = 1[u < sigmoid(phi)]`` and its antithetic partner ``b~ = 1[u > sigmoid(-phi)] =
1[1 - u < sigmoid(phi)]``, the estimate of ``d E[f(b)] / d phi`` is, per unit,

    g_phi = (f(b~) - f(b)) (u - 1/2).

DisARM (Dong, Mnih & Tucker 2020, NeurIPS, "DisARM: an antithetic gradient estimator for
binary latent variables", Eq. 6) is ARM averaged over ``u`` given the pair ``(b, b~)``:

    g_phi = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|).

Both are chain-ruled into the parameters through ``d phi / d theta``; parameters that reach
the cost other than through the units get the pathwise gradient of the pair's mean cost with
the samples held fixed. ``num_samples`` independent pairs are averaged.

Several stochastic sites (layers): site ``i``'s pair is the base run and a run with ``1 - u``
at site ``i`` only (earlier units as in the base run, later ones with common uniforms), which
keeps the estimate unbiased when logits depend on earlier units.
Cost: ``(1 + L) * num_samples`` model evaluations (``L`` sites; 2 per sample for one layer)
and one backward pass per draw.
Bias: unbiased (both).
Requires: Bernoulli sample sites; any cost (no differentiability in the samples needed).
At a Pyro site: one antithetic re-run per site and particle (``site_reruns``), same random
numbers; the re-run's instruction (``offset = 1``: evaluate at ``1 - u``) reaches
``site_value``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import (
    Cost,
    Estimator,
    Reruns,
    Rng,
    SiteCosts,
    SiteInput,
    SiteValue,
    check_positive_int,
    grads_or_zeros,
    hard_sample,
    per_draw_params,
    repeat_draws,
    run_model,
    site_units,
)
from .registry import register


def arm_weight(logits: Tensor, u: Tensor, diff: Tensor) -> Tensor:
    """ARM per unit: ``(f(b~) - f(b)) (u - 1/2)`` with ``diff = f(b~) - f(b)``."""
    return diff * (u - 0.5)


def disarm_weight(logits: Tensor, u: Tensor, diff: Tensor) -> Tensor:
    """DisARM per unit: ``1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|)``."""
    p = torch.sigmoid(logits)
    b = (u < p).to(logits.dtype)
    bt = (1 - u < p).to(logits.dtype)
    sign = 1 - 2 * bt
    return -0.5 * diff * sign * (b != bt).to(logits.dtype) * torch.sigmoid(logits.abs())


class _Antithetic(Estimator):
    unbiased = "yes"
    weight: ClassVar[Any] = staticmethod(arm_weight)

    site_distributions: ClassVar[tuple[str, ...]] = ("Bernoulli",)
    site_perturbs: ClassVar[bool] = True

    def __init__(self, num_samples: int = 1):
        self.num_samples = check_positive_int("num_samples", num_samples)

    def cost(self, objective: Any) -> Cost:
        layers = len(site_units(objective))
        return Cost(evals=(1.0 + max(1, layers)) * self.num_samples, backwards=1.0)

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        # runs: 0 is the base run (u at every site); run 1 + i uses 1 - u at site i only, so
        # its pair with the base run is site i's antithetic pair, the units before i as in the
        # base run and those after it with the same (common) uniforms
        s_n = self.num_samples
        names = list(site_units(objective))
        runs = 1 + len(names)
        leaves = per_draw_params(objective.params, draws)
        batched = repeat_draws(leaves, runs * s_n)  # row = draw * runs * S + run * S + sample
        drawn: dict[str, Tensor] = {}

        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            unit = tuple(logits.shape[1:])
            u = rng.uniform((draws, 1, s_n, *unit), logits.dtype)
            drawn[name] = u[:, 0]
            flip = torch.zeros(runs, dtype=torch.bool, device=u.device)
            flip[1 + names.index(name)] = True
            flip = flip.view(1, runs, 1, *[1] * len(unit))
            both = torch.where(flip, 1 - u, u).reshape(logits.shape)
            return hard_sample(logits.detach(), both), {}

        cost, sites = run_model(objective, batched, rule, self.name)
        by_run = cost.view(draws, runs, s_n)
        surrogate = by_run[:, 0].sum() / s_n  # pathwise part, samples held fixed
        for i, (name, s) in enumerate(sites.items()):
            lg = s.logits.view(draws, runs, s_n, *s.logits.shape[1:])[:, 0]
            u = drawn[name]
            diff = (by_run[:, 1 + i] - by_run[:, 0]).detach()  # f(b~) - f(b) at site i
            d = diff.view(draws, s_n, *[1] * (u.dim() - 2))
            g = self.weight(lg.detach(), u, d)
            surrogate = surrogate + (lg * g).sum() / s_n
        return grads_or_zeros(surrogate, leaves)

    # -- at a Pyro site: the base run at u, one re-run at 1 - u --------------------------------

    def site_value(self, site: SiteInput) -> SiteValue:
        if self.num_samples != 1:
            raise ValueError(
                f"site {site.name!r}: {self.name} at a Pyro site uses one antithetic pair per "
                f"particle; got num_samples={self.num_samples} (use num_particles instead)"
            )
        u = site.uniforms(site.name, site.logits.shape, site.logits.dtype)
        logits = site.logits.detach()
        if site.offset is not None:  # the antithetic re-run: offset 1 means "use 1 - u"
            u_run = torch.where(site.offset > 0, 1 - u, u)
            return SiteValue(hard_sample(logits, u_run), extra={"u": u})
        return SiteValue(hard_sample(logits, u), extra={"u": u})

    def site_reruns(self, records: Any, generator: torch.Generator) -> Reruns:
        # one re-run per site, antithetic at that site only (see _draw)
        return Reruns([{r.name: torch.ones_like(r.logits.detach())} for r in records])

    def site_term(self, record: Any, costs: SiteCosts) -> Tensor | float:
        moved = [c for c in costs.changes if c is not None]
        if not moved:
            return 0.0
        change = moved[0]
        logits = record.logits
        g = self.weight(logits.detach(), record.extra["u"], change)
        return (logits * (g * record.unit_mask()).detach()).sum()


@register
class ARM(_Antithetic):
    """Augment-REINFORCE-merge: ``(f(b~) - f(b)) (u - 1/2)`` per unit."""

    name = "arm"
    description = "ARM (Yin & Zhou 2019): antithetic pair, (f(b~) - f(b)) (u - 1/2) per unit"
    weight = staticmethod(arm_weight)
