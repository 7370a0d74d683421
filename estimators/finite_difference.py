"""Central finite differences, one coordinate at a time -- the cost reference.

    g_i = [L(theta + eps e_i) - L(theta - eps e_i)] / (2 eps)

for every coordinate ``i`` of every parameter: ``2 P`` evaluations per draw. All ``2 P``
evaluations of one draw share the neurons' noise ``u`` (common random numbers), so each
difference sees only the effect of moving coordinate ``i``.

Requires: forward evaluations only.
Bias: O(eps^2) for smooth expected costs; unbiased only as ``eps -> 0`` (``asymptotic``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import Cost, Estimator, Reruns, Rng, check_positive_float
from .perturbation import PerturbationSites, evaluate, flat_params, unflatten, uniforms_for
from .registry import register


@register
class FiniteDifference(PerturbationSites, Estimator):
    """Central differences per coordinate with common random numbers."""

    name = "finite_difference"
    unbiased = "asymptotic"
    description = "central differences per coordinate, 2 evaluations per coordinate (reference)"

    def __init__(self, eps: float = 0.1):
        self.eps = check_positive_float("eps", eps)

    def cost(self, objective: Any) -> Cost:
        numel = sum(v.numel() for v in objective.params.values())
        return Cost(evals=2.0 * numel, backwards=0.0)

    def site_reruns(self, records: Any, generator: torch.Generator) -> Reruns:
        # g_{a_i} = [L(a + eps e_i) - L(a - eps e_i)] / (2 eps), one coordinate at a time;
        # plate slices are independent and credited with their own cost, so coordinate i
        # moves in every slice of the site's plates at once.
        offsets, coefs, dirs = [], [], []
        for r in records:
            for e in _coordinates(r):
                for sign in (1.0, -1.0):
                    offsets.append({r.name: sign * self.eps * e})
                    coefs.append(sign / (2 * self.eps))
                    dirs.append({r.name: e})
        return Reruns(offsets, data=(coefs, dirs))

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        theta, layout = flat_params(objective)  # (P,)
        p = theta.numel()
        steps = self.eps * torch.eye(p, dtype=theta.dtype, device=theta.device)  # (P, P)
        signs = theta.new_tensor([1.0, -1.0]).view(2, 1, 1, 1)
        points = (theta + signs * steps.unsqueeze(0)).expand(2, draws, p, p)  # (2, draws, P, P)
        uniforms = uniforms_for(rng, True, outer=2, inner=p)
        cost = evaluate(objective, unflatten(points.reshape(-1, p), layout), uniforms, self.name)
        cost = cost.view(2, draws, p)
        return unflatten((cost[0] - cost[1]) / (2 * self.eps), layout)


def _coordinates(record: Any) -> Iterable[Tensor]:
    """One-hot directions over the site's non-plate dims, spanning all its plate slices."""
    logits = record.logits
    batch_ndim = logits.dim() - record.event_dim
    plate = {batch_ndim + f.dim for f in record.frames if f.vectorized and -f.dim <= batch_ndim}
    free = [d for d in range(logits.dim()) if d not in plate]
    sizes = [logits.shape[d] for d in free]
    for index in itertools.product(*(range(n) for n in sizes)):
        e = torch.zeros_like(logits.detach())
        where: list[Any] = [slice(None)] * logits.dim()
        for d, i in zip(free, index):
            where[d] = i
        e[tuple(where)] = 1.0
        yield e
