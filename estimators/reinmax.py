"""ReinMax (Liu, Zhao, Chen, Gao & Han 2023, NeurIPS, "Bridging discrete and backpropagation:
straight-through and beyond", Algorithm 2): a second-order (Heun-method) straight-through.

Over a last "category" dim with logits ``theta``, ``pi0 = softmax(theta)`` and one-hot sample
``D ~ pi0``:

    pi1 = (D + softmax(theta / tau)) / 2,   pi1 <- softmax(sg(log pi1 - theta) + theta),
    pi2 = 2 pi1 - pi0 / 2,                  value = D + pi2 - sg(pi2),

(``sg``: stop gradient), so the forward value is the hard sample and ``d value / d theta =
2 J(pi1) - J(pi0) / 2`` with ``J(pi) = diag(pi) - pi pi^T``. For a Bernoulli unit (categories
``[1, 0]``, logits ``[phi, 0]``, sample ``b``) the unit's slope is

    d value / d phi = 2 q (1 - q) - p (1 - p) / 2,   q = (b + sigmoid(phi / tau)) / 2,
    p = sigmoid(phi).

Cost: one evaluation, one backward pass per draw.
Bias: biased (exact for costs at most quadratic along the sample's direction in the paper's
analysis, in general not).
Requires: a cost differentiable in the unit values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_positive_float, hard_sample
from .registry import register


def reinmax_categorical(logits: Tensor, onehot: Tensor, temperature: float) -> Tensor:
    """Algorithm 2 over the last (category) dim: forward ``onehot``, ReinMax backward."""
    pi0 = torch.softmax(logits, dim=-1)
    pi1 = (onehot + torch.softmax(logits.detach() / temperature, dim=-1)) / 2
    pi1 = torch.softmax((torch.log(pi1) - logits).detach() + logits, dim=-1)
    pi2 = 2 * pi1 - pi0 / 2
    return onehot + (pi2 - pi2.detach())


def reinmax_bernoulli(logits: Tensor, b: Tensor, temperature: float) -> Tensor:
    """The two-category case in closed form: value ``b``, slope ``2 q(1-q) - p(1-p)/2``."""
    q = (b + torch.sigmoid(logits.detach() / temperature)) / 2
    p = torch.sigmoid(logits.detach())
    slope = 2 * q * (1 - q) - p * (1 - p) / 2
    return b + slope * (logits - logits.detach())


@register
class ReinMax(SurrogateEstimator):
    """Second-order straight-through (ReinMax)."""

    name = "reinmax"
    unbiased = "no"
    description = "ReinMax (Liu et al. 2023, Alg. 2): second-order straight-through"

    site_distributions = ("Bernoulli",)

    def __init__(self, temperature: float = 1.0):
        self.temperature = check_positive_float("temperature", temperature)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            b = hard_sample(logits.detach(), u)
            return reinmax_bernoulli(logits, b, self.temperature), {"u": u}

        return rule
