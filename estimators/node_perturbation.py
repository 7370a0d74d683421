"""Node perturbation (Fiete & Seung 2006).

Perturb every unit's pre-activation with ``xi ~ N(0, sigma^2)`` and compare the cost with
the unperturbed run (same neuron noise ``u``):

    g_a = (L(a + xi) - L(a)) xi / sigma^2,

then chain-rule ``g_a`` into the parameters through ``da/dtheta`` (one backward pass of the
unperturbed run). Parameters that reach the cost other than through the units get the
pathwise gradient ``dL/dtheta`` with the samples held fixed.

Requires: Bernoulli sample sites.
Bias: estimates the gradient of the Gaussian-smoothed expected cost; unbiased only as
``sigma -> 0`` (``asymptotic``), with variance growing as ``sigma`` shrinks.

Reference: Fiete & Seung (2006), PRL 97, 048104; Williams (1992) for the REINFORCE link.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (
    Cost,
    Estimator,
    Reruns,
    Rng,
    Rule,
    Uniforms,
    check_positive_float,
    grads_or_zeros,
    hard_sample,
    per_draw_params,
    run_model,
)
from .perturbation import PerturbationSites, randn_like
from .registry import register


@register
class NodePerturbation(PerturbationSites, Estimator):
    """Gaussian pre-activation perturbation, correlated with the change in cost."""

    name = "node_perturbation"
    unbiased = "asymptotic"
    description = "node perturbation (Fiete & Seung): perturb pre-activations, correlate with dL"

    def __init__(self, sigma: float = 0.1):
        self.sigma = check_positive_float("sigma", sigma)

    def cost(self, objective: Any) -> Cost:
        return Cost(evals=2.0, backwards=1.0)

    def site_reruns(self, records: Any, generator: torch.Generator) -> Reruns:
        # g_a = (L(a + xi) - L(a)) xi / sigma^2
        offsets = {r.name: self.sigma * randn_like(r.logits, generator) for r in records}
        return Reruns([offsets], data=([1.0 / self.sigma**2], [offsets]))

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        leaves = per_draw_params(objective.params, draws)
        uniforms = Uniforms(rng)

        def clean(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            u = uniforms(name, logits.shape, logits.dtype)
            xi = self.sigma * rng.normal(tuple(logits.shape), logits.dtype)
            return hard_sample(logits.detach(), u), {"u": u, "xi": xi}

        cost0, sites = run_model(objective, leaves, clean, self.name)

        def perturbed(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            s = sites[name]
            return hard_sample(logits + s.extra["xi"], s.extra["u"]), {}

        perturbed_rule: Rule = perturbed
        with torch.no_grad():
            cost1, _ = run_model(
                objective, {k: v.detach() for k, v in leaves.items()}, perturbed_rule, self.name
            )
        delta = (cost1 - cost0.detach()) / self.sigma**2  # (draws,)
        surrogate = cost0.sum()
        for s in sites.values():
            g_a = delta.view(-1, *([1] * (s.logits.dim() - 1))) * s.extra["xi"]
            surrogate = surrogate + (s.logits * g_a).sum()
        return grads_or_zeros(surrogate, leaves)
