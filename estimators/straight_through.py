"""Straight-through estimator (Hinton 2012 lectures; Bengio et al. 2013, Sec. 4).

Forward: the hard stochastic binary sample ``h = 1[u < sigmoid(a)]``.
Backward: the threshold is treated as if it were the identity,

    identity:  dL/da := dL/dh                (the paper's preferred variant)
    sigmoid:   dL/da := dL/dh * p (1 - p)    (backprop through sigmoid only; worse in the paper)

At ``OneHotCategorical`` units (both variants): forward the one-hot sample of ``k``
(``cdf_{k-1} <= u < cdf_k``), backward through ``softmax(a)``, ``dL/da := J_softmax^T dL/dh``
(Bengio et al. 2013's straight-through with the softmax slope; Jang et al. 2017, Sec. 2.2).

Requires: Bernoulli or OneHotCategorical sample sites (in ``estimate()`` and at Pyro sites);
a cost differentiable in the sampled values.
Bias: biased in general. On the toy ``sum_i (h_i - t)^2`` the identity variant has mean
``2 (p - t)`` per unit against the exact ``p (1 - p)(1 - 2t)``; the two agree only by accident.

Reference: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_choice, hard_sample
from .distributions import BERNOULLI, Kind
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

    site_distributions = ("Bernoulli", "OneHotCategorical")

    def __init__(self, variant: str = "identity"):
        self.variant = check_choice("variant", variant, VARIANTS)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(
            name: str, logits: Tensor, kind: Kind = BERNOULLI
        ) -> tuple[Tensor, dict[str, Tensor]]:
            if kind is BERNOULLI:
                u = uniforms(name, logits.shape, logits.dtype)
                return straight_through_value(logits, u, self.variant), {"u": u}
            u = uniforms(name, kind.unit_shape(logits), logits.dtype)
            h = kind.sample(logits.detach(), u)
            smooth = torch.softmax(logits, dim=-1)
            return h + (smooth - smooth.detach()), {"u": u}

        return rule
