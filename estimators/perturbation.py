"""Shared pieces of the perturbation estimators (SPSA, finite differences, node perturbation).

At a Pyro site they all act the same way (:class:`PerturbationSites`): the value is the hard
sample ``1[u < sigmoid(a + delta)]`` (``delta = 0`` in the base run, an offset in a re-run),
the re-runs use the same random numbers, and the site adds ``a * g_a`` to the loss (``g_a``
held fixed) with ``g_a = sum_j coef_j (L_j - L_0) w_j``; each estimator's
:meth:`~stochgrad.estimators.base.Estimator.site_reruns` says which offsets ``delta_j`` to
run, with coefficients ``coef_j`` and directions ``w_j``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Rng, SiteCosts, SiteInput, SiteValue, Uniforms, hard_rule, hard_sample, run_model


def evaluate(
    objective: Any, params: dict[str, Tensor], uniforms: Uniforms, estimator: str
) -> Tensor:
    """Costs of a batch of parameter settings with hard Bernoulli samples, no gradient."""
    with torch.no_grad():
        cost, _ = run_model(objective, params, hard_rule(uniforms), estimator)
    return cost


def flat_params(objective: Any) -> tuple[Tensor, list[tuple[str, torch.Size, int]]]:
    """All parameters as one flat vector, and the layout to split it back."""
    layout, parts = [], []
    for k, v in objective.params.items():
        layout.append((k, v.shape, v.numel()))
        parts.append(v.detach().reshape(-1))
    return torch.cat(parts), layout


def unflatten(flat: Tensor, layout: list[tuple[str, torch.Size, int]]) -> dict[str, Tensor]:
    """Split ``(..., P)`` back into ``{name: (..., *shape)}``."""
    out, start = {}, 0
    lead = flat.shape[:-1]
    for k, shape, n in layout:
        out[k] = flat[..., start : start + n].reshape(*lead, *shape)
        start += n
    return out


def uniforms_for(rng: Rng, crn: bool, outer: int, inner: int) -> Uniforms:
    return Uniforms(rng, outer=outer, inner=inner, shared=crn)


class PerturbationSites:
    """The site hooks shared by the perturbation estimators (see the module docstring).

    ``site_reruns`` returns ``Reruns(offsets, data=(coefs, directions))`` with
    ``directions[j][site]`` the direction ``w_j`` of re-run ``j`` at the site.
    """

    site_distributions: ClassVar[tuple[str, ...]] = ("Bernoulli",)
    site_perturbs: ClassVar[bool] = True

    def site_value(self, site: SiteInput) -> SiteValue:
        u = site.uniforms(site.name, site.logits.shape, site.logits.dtype)
        shifted = site.logits.detach()
        if site.offset is not None:
            shifted = shifted + site.offset
        return SiteValue(hard_sample(shifted, u), extra={"u": u})

    def site_term(self, record: Any, costs: SiteCosts) -> Tensor | float:
        assert costs.reruns is not None
        coefs, dirs = costs.reruns.data
        g: Tensor | float = 0.0
        for j, change in enumerate(costs.changes):
            if change is not None:
                g = g + coefs[j] * change * dirs[j][record.name]
        if not isinstance(g, Tensor):
            return 0.0
        return (record.logits * (g * record.unit_mask()).detach()).sum()


def randn_like(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normals shaped as ``like`` from a CPU ``generator``, moved to its device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
