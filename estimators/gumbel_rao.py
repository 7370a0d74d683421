"""Gumbel-Rao (Paulus, Maddison & Krause 2021, ICLR, "Rao-Blackwellizing the straight-through
Gumbel-softmax gradient estimator", Eq. 7-8).

The forward value is the hard sample ``b = 1[u < sigmoid(phi)]``; the backward is that of the
relaxed sample averaged over ``K`` logistic noises drawn from their law *given* ``b``:

    value = b + mean_k z_k - sg(mean_k z_k),   z_k = sigmoid((phi + l_k) / tau),
    l_k = log(1 - u_k) - log(u_k),  u_k ~ U(0, p) if b = 1, U(p, 1) if b = 0  (p held fixed),

the conditional expectation of straight-through Gumbel-softmax's gradient given ``b``
(estimated with K samples): the same mean, no larger variance.
Cost: one model evaluation and one backward pass per draw (the K noises only touch the unit).
Bias: that of straight-through Gumbel-softmax at the same temperature.
Requires: a cost differentiable in the unit values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    Rule,
    SiteInput,
    SiteValue,
    SurrogateEstimator,
    Uniforms,
    check_positive_float,
    check_positive_int,
    hard_sample,
)
from .gumbel_softmax import binary_concrete, clamp_open
from .registry import register


def rao_value(logits: Tensor, b: Tensor, raw: Tensor, temperature: float) -> Tensor:
    """``b`` forward; backward of the mean relaxed sample over ``raw.shape[0]`` conditional
    noises (``raw``: plain uniforms, ``(K, *logits.shape)``)."""
    p = torch.sigmoid(logits.detach())
    u_k = torch.where(b > 0, raw * p, p + raw * (1 - p))
    z = binary_concrete(logits, clamp_open(u_k), temperature).mean(0)
    return b + (z - z.detach())


@register
class GumbelRao(SurrogateEstimator):
    """Straight-through Gumbel-softmax, backward averaged over K conditional noises."""

    name = "gumbel_rao"
    unbiased = "no"
    description = "Gumbel-Rao (Paulus et al. 2021): ST Gumbel-softmax Rao-Blackwellised over K"

    site_distributions = ("Bernoulli",)

    def __init__(self, temperature: float = 0.5, num_samples: int = 10):
        self.temperature = check_positive_float("temperature", temperature)
        self.k = check_positive_int("num_samples", num_samples)

    def options(self) -> dict[str, object]:
        return {"temperature": self.temperature, "num_samples": self.k}

    def rule(self, uniforms: Uniforms) -> Rule:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            b = hard_sample(logits.detach(), u)
            raw = uniforms(name + "/rao", torch.Size((self.k, *logits.shape)), logits.dtype)
            return rao_value(logits, b, raw, self.temperature), {"u": u}

        return rule

    def site_value(self, site: SiteInput) -> SiteValue:
        # the site's uniforms may be conditioned on a given value; the K extra noises are
        # plain uniforms from torch's generator, conditioned on b by rao_value itself
        u = site.uniforms(site.name, site.logits.shape, site.logits.dtype)
        b = hard_sample(site.logits.detach(), u)
        shape = (self.k, *site.logits.shape)
        raw = torch.rand(shape, dtype=site.logits.dtype).to(site.logits.device)
        return SiteValue(rao_value(site.logits, b, raw, self.temperature), hard=b)
