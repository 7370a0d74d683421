"""Gumbel-softmax / binary concrete relaxation (Jang, Gu & Poole 2017, ICLR, Eq. 1; Maddison,
Mnih & Teh 2017, ICLR, Sec. 3.3 and Eq. 20 for the binary case).

Over a last "category" dim with logits ``theta`` and Gumbel noise ``g``, the relaxed sample is
``softmax((theta + g) / tau)``. For a Bernoulli unit (categories ``[1, 0]`` with logits
``[phi, 0]``) the difference of two Gumbels is logistic, ``l = log(1 - u) - log(u)``, and

    relaxed:  z = sigmoid((phi + l) / tau),     hard:  b = 1[phi + l > 0] = 1[u < sigmoid(phi)],

so the hard sample is the package's usual ``1[u < sigmoid(phi)]`` for the same ``u``.

``variant="relaxed"``: the model is evaluated at the continuous ``z`` (pathwise gradient).
``variant="straight_through"``: the forward value is ``b`` in ``{0, 1}``, the backward is that
of ``z``.
Cost: one evaluation, one backward pass per draw.
Bias: biased for any ``tau > 0`` (the relaxed objective differs from ``E[f(b)]``); the bias of
the relaxed variant vanishes as ``tau -> 0`` while its variance grows.
Requires: a cost differentiable in the unit values (and, for ``relaxed``, defined on [0, 1]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rule, SurrogateEstimator, Uniforms, check_choice, check_positive_float
from .registry import register

VARIANTS = ("relaxed", "straight_through")


def logistic_noise(u: Tensor) -> Tensor:
    """``log(1 - u) - log(u)``: logistic noise with ``phi + l > 0  <=>  u < sigmoid(phi)``."""
    return torch.log1p(-u) - torch.log(u)


def relaxed_softmax(logits: Tensor, gumbel: Tensor, temperature: float) -> Tensor:
    """The concrete sample over the last (category) dim: ``softmax((logits + g) / tau)``."""
    return torch.softmax((logits + gumbel) / temperature, dim=-1)


def binary_concrete(logits: Tensor, u: Tensor, temperature: float) -> Tensor:
    """``sigmoid((phi + l) / tau)``, the two-category ``relaxed_softmax`` in closed form."""
    return torch.sigmoid((logits + logistic_noise(u)) / temperature)


def clamp_open(u: Tensor) -> Tensor:
    """Uniforms moved off {0, 1} so the logistic noise stays finite."""
    tiny = torch.finfo(u.dtype).tiny
    return u.clamp(tiny, 1 - torch.finfo(u.dtype).eps / 2)


@register
class GumbelSoftmax(SurrogateEstimator):
    """Binary concrete relaxation; relaxed or straight-through."""

    name = "gumbel_softmax"
    unbiased = "no"
    description = "Gumbel-softmax / binary concrete (Jang et al. 2017; Maddison et al. 2017)"

    site_distributions = ("Bernoulli",)
    site_validates = False

    def __init__(self, temperature: float = 0.5, variant: str = "straight_through"):
        self.temperature = check_positive_float("temperature", temperature)
        self.variant = check_choice("variant", variant, VARIANTS)

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            z = binary_concrete(logits, clamp_open(u), self.temperature)
            if self.variant == "relaxed":
                return z, {"u": u}
            b = (u < torch.sigmoid(logits.detach())).to(logits.dtype)
            return b + (z - z.detach()), {"u": u}

        return rule
