"""Stochastic times smooth (STS) unit (Bengio et al. 2013, Sec. 3.2, Eq. 2).

The unit substituted at a Bernoulli site:

    paper:  b ~ Bern(sqrt(p)),  h = b * sqrt(p)     so E[h] = p,  P(h > 0) = sqrt(p)
    code:   b ~ Bern(p),        h = b * sqrt(p)     (what the authors' code sampled)

with ``p = sigmoid(a)``; backpropagation goes through ``sqrt(p)`` with ``b`` held fixed.

Requires: Bernoulli sample sites; a cost differentiable in the unit's value.
Bias: a *surrogate unit*: it changes the forward value as well as the gradient, so against
an objective defined by Bernoulli samples it is biased (and its forward values are not in
{0, 1}). In the conditional-computation network it is one of the paper's gate types.

Reference: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 3.2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_choice
from .registry import register

VARIANTS = ("paper", "code")


def sts_value(logits: Tensor, u: Tensor, variant: str = "paper") -> Tensor:
    """``h = b * sqrt(sigmoid(a))`` with ``b`` a fixed Bernoulli sample."""
    smooth = torch.sigmoid(logits).sqrt()
    on = smooth.detach() if variant == "paper" else torch.sigmoid(logits.detach())
    b = (u < on).to(logits.dtype)
    return b * smooth


@register
class STS(SurrogateEstimator):
    """Stochastic times smooth: ``h = b sqrt(p)``, gradient through ``sqrt(p)``."""

    name = "sts"
    unbiased = "no"
    description = "stochastic-times-smooth unit h = b*sqrt(p) (paper Eq. 2); surrogate unit"

    site_distributions = ("Bernoulli",)
    site_validates = False  # values outside {0, 1}: densities evaluated unvalidated

    def __init__(self, variant: str = "paper"):
        self.variant = check_choice("variant", variant, VARIANTS)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            return sts_value(logits, u, self.variant), {"u": u}

        return rule
