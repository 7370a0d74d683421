"""Shared pieces of the forward-only perturbation estimators (SPSA, finite differences)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Rng, Uniforms, hard_rule, run_model


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
