"""Simultaneous perturbation stochastic approximation (Spall 1992).

With a Rademacher direction ``Delta`` (each coordinate +-1) and step ``c``,

    g_i = [L(theta + c Delta) - L(theta - c Delta)] / (2 c Delta_i),

two evaluations whatever the dimension; ``num_pairs`` directions are averaged per draw.
``common_random_numbers=True`` gives both evaluations of a pair the same neuron noise ``u``
(each pair its own), which removes the neurons' own noise from the difference.

For optimisation Spall's gain sequences are ``a_k = a / (k + 1 + A)^alpha`` and
``c_k = c / (k + 1)^gamma`` with ``alpha = 0.602``, ``gamma = 0.101`` (:meth:`SPSA.gains`).

Requires: nothing of the model but forward evaluations (no backward pass).
Bias: O(c^2) for smooth expected costs; unbiased only as ``c -> 0`` (``asymptotic``).

Reference: Spall (1992), IEEE TAC 37(3); Spall (1998), "Implementation of the simultaneous
perturbation algorithm for stochastic optimization".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Cost, Estimator, Reruns, Rng, check_positive_float, check_positive_int
from .perturbation import (
    PerturbationSites,
    evaluate,
    flat_params,
    randn_like,
    unflatten,
    uniforms_for,
)
from .registry import register


@register
class SPSA(PerturbationSites, Estimator):
    """Two-evaluation simultaneous-perturbation gradient estimate."""

    name = "spsa"
    unbiased = "asymptotic"
    description = "simultaneous perturbation (Spall): 2 evaluations per direction, any dimension"

    def __init__(
        self,
        c: float = 0.1,
        num_pairs: int = 1,
        common_random_numbers: bool = True,
        a: float = 0.1,
        A: float = 10.0,
        alpha: float = 0.602,
        gamma: float = 0.101,
    ):
        self.c = check_positive_float("c", c)
        self.num_pairs = check_positive_int("num_pairs", num_pairs)
        if not isinstance(common_random_numbers, bool):
            raise TypeError("common_random_numbers must be a bool")
        self.common_random_numbers = common_random_numbers
        self.a = check_positive_float("a", a)
        self.A = float(A)
        self.alpha = check_positive_float("alpha", alpha)
        self.gamma = check_positive_float("gamma", gamma)

    def cost(self, objective: Any) -> Cost:
        return Cost(evals=2.0 * self.num_pairs, backwards=0.0)

    def site_reruns(self, records: Any, generator: torch.Generator) -> Reruns:
        # g_a = mean_j [L(a + c D_j) - L(a - c D_j)] D_j / (2 c)   (1 / D = D for +-1)
        offsets, coefs, dirs = [], [], []
        coef = 1.0 / (2 * self.c * self.num_pairs)
        for _ in range(self.num_pairs):
            delta = {
                r.name: (2 * (randn_like(r.logits, generator) > 0).to(r.logits.dtype) - 1)
                for r in records
            }
            for sign in (1.0, -1.0):
                offsets.append({k: sign * self.c * d for k, d in delta.items()})
                coefs.append(sign * coef)
                dirs.append(delta)
        return Reruns(offsets, data=(coefs, dirs))

    def gains(self, k: int) -> tuple[float, float]:
        """Spall's step sizes at iteration ``k``: ``(a_k, c_k)``."""
        return (
            self.a / (k + 1 + self.A) ** self.alpha,
            self.c / (k + 1) ** self.gamma,
        )

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        theta, layout = flat_params(objective)  # (P,)
        pairs = draws * self.num_pairs
        delta = rng.rademacher((pairs, theta.numel()), theta.dtype)  # (draws * J, P)
        points = theta + self.c * delta.unsqueeze(0) * theta.new_tensor([[1.0], [-1.0]]).unsqueeze(
            -1
        )  # (2, draws * J, P)
        uniforms = uniforms_for(rng, self.common_random_numbers, outer=2, inner=1)
        cost = evaluate(
            objective, unflatten(points.reshape(2 * pairs, -1), layout), uniforms, self.name
        )
        diff = (cost[:pairs] - cost[pairs:]).unsqueeze(-1)  # (draws * J, 1)
        g = (diff * delta / (2 * self.c)).view(draws, self.num_pairs, -1).mean(1)  # 1/D = D
        return unflatten(g, layout)
