"""Noisy rectifier unit (Bengio et al. 2013, Sec. 3.1).

The unit substituted at a Bernoulli site: ``h = max(0, a + s z)`` with zero-mean noise ``z``,

    gaussian:  z ~ N(0, 1)           (the paper's choice)
    logistic:  z ~ Logistic(0, 1)    then P(h > 0) = sigmoid(a / s); with s = 1,
                                     P(h > 0) = p and E[h] = softplus(a)

Both are generated from the unit's uniform ``u`` (``z = sqrt(2) erfinv(2u - 1)`` or
``z = log u - log(1 - u)``), so a unit's noise is tied to its draw. Gradient: ordinary
backpropagation, ``dh/da = 1[a + s z > 0]``.

Requires: Bernoulli sample sites; a cost differentiable in the unit's value.
Bias: a *surrogate unit*; against a Bernoulli objective it is biased.

Reference: Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 3.1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_choice, check_positive_float
from .registry import register

NOISES = ("gaussian", "logistic")


def noise_from_uniform(u: Tensor, noise: str) -> Tensor:
    """Standard Gaussian or logistic noise by inverting the CDF at ``u``."""
    tiny = torch.finfo(u.dtype).tiny
    u = u.clamp(tiny, 1 - torch.finfo(u.dtype).eps)
    if noise == "gaussian":
        return math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    return torch.log(u) - torch.log1p(-u)


def noisy_rectifier_value(logits: Tensor, u: Tensor, noise: str = "gaussian", scale: float = 1.0):
    """``max(0, a + scale * z)``."""
    return torch.relu(logits + scale * noise_from_uniform(u, noise))


@register
class NoisyRectifier(SurrogateEstimator):
    """Noisy rectifier ``h = max(0, a + s z)``, pathwise gradient."""

    name = "noisy_rectifier"
    unbiased = "no"
    description = "noisy rectifier unit max(0, a + s z) (paper Sec. 3.1); surrogate unit"

    site_distributions = ("Bernoulli",)
    site_validates = False  # values outside {0, 1}: densities evaluated unvalidated

    def __init__(self, noise: str = "gaussian", scale: float = 1.0):
        self.noise = check_choice("noise", noise, NOISES)
        self.scale = check_positive_float("scale", scale)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            return noisy_rectifier_value(logits, u, self.noise, self.scale), {"u": u}

        return rule
