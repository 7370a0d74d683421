"""Straight-through estimator (Hinton 2012 lectures; Bengio et al. 2013, Sec. 4).

Forward: the hard stochastic binary sample ``h = 1[u < sigmoid(a)]``.
Backward: the threshold is treated as if it were the identity,

    identity:  dL/da := dL/dh                (the paper's preferred variant)
    sigmoid:   dL/da := dL/dh * p (1 - p)    (backprop through sigmoid only; worse in the paper)

Requires: Bernoulli sample sites; a cost differentiable in the sampled values.
Bias: biased in general. On the toy ``sum_i (h_i - t)^2`` the identity variant has mean
``2 (p - t)`` per unit against the exact ``p (1 - p)(1 - 2t)``; the two agree only by accident.

Reference: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_choice, hard_sample
from .registry import register

VARIANTS = ("identity", "sigmoid")


def straight_through_value(logits: Tensor, u: Tensor, variant: str = "identity") -> Tensor:
    """Hard sample in the forward pass, identity (or sigmoid-slope) gradient in the backward."""
    h = hard_sample(logits.detach(), u)
    smooth = logits if variant == "identity" else torch.sigmoid(logits)
    return h + (smooth - smooth.detach())


@register
class StraightThrough(SurrogateEstimator):
    """Hard forward sample, identity (or sigmoid-slope) backward."""

    name = "straight_through"
    unbiased = "no"
    description = "hard sample forward, identity (or sigmoid-slope) backward (paper Sec. 4)"

    site_distributions = ("Bernoulli",)

    def __init__(self, variant: str = "identity"):
        self.variant = check_choice("variant", variant, VARIANTS)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            return straight_through_value(logits, u, self.variant), {"u": u}

        return rule
