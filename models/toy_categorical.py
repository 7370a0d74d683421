"""A categorical toy: ``E_{k_i ~ Cat(softmax(theta_i))}[sum_i c_{i, k_i}]``, closed form.

Units are independent, each with its own categories and a fixed cost table ``c`` (shape
``(units, categories)``). The expected cost is ``sum_i <p_i, c_i>`` with
``p_i = softmax(theta_i)``, and its exact gradient is

    d/dtheta_i E[c_{i, k}] = p_i * (c_i - <p_i, c_i>)

(the softmax Jacobian ``diag(p) - p p^T`` applied to ``c_i``). The default table is
``c_{i, k} = (k / (K - 1) - t)^2``: with ``K = 2`` categories it is the Bernoulli toy's cost
``(b - t)^2`` per unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .base import StochasticObjective


class ToyCategorical(StochasticObjective):
    """``sum_i c_{i, k_i}`` with ``k_i ~ Cat(softmax(theta_i))``: ``units`` x ``categories``."""

    name = "toy_categorical"
    description = "E[sum_i c_{i,k_i}], k_i ~ Cat(softmax(theta_i)); closed form"

    def __init__(
        self,
        units: int = 10,
        categories: int = 4,
        target: float = 0.45,
        logits: float | Sequence[Any] | Tensor = 0.0,
        costs: Sequence[Any] | Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for label, v, low in (("units", units, 1), ("categories", categories, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{label} must be an int >= {low}, got {v!r}")
        if not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ValueError(f"target must be a finite number, got {target!r}")
        shape = (units, categories)
        theta = torch.as_tensor(logits, dtype=dtype, device=device)
        if theta.dim() == 0:
            theta = theta.expand(shape).clone()
        if theta.shape != shape:
            raise ValueError(
                f"logits must be a scalar or have shape {shape}, got {tuple(theta.shape)}"
            )
        if not torch.isfinite(theta).all():
            raise ValueError("logits must be finite")
        if costs is None:
            k = torch.arange(categories, dtype=dtype, device=device)
            c = ((k / (categories - 1) - target) ** 2).expand(shape).clone()
        else:
            c = torch.as_tensor(costs, dtype=dtype, device=device)
            if c.shape != shape:
                raise ValueError(f"costs must have shape {shape}, got {tuple(c.shape)}")
            if not torch.isfinite(c).all():
                raise ValueError("costs must be finite")
        self.units, self.categories, self.target = units, categories, float(target)
        self._custom_costs = costs is not None
        self.costs = c
        self.params = {"logits": theta.clone().requires_grad_(True)}

    def options(self) -> dict[str, Any]:
        theta = self.params["logits"].detach()
        same = bool((theta == theta.reshape(-1)[0]).all())
        out: dict[str, Any] = {
            "units": self.units,
            "categories": self.categories,
            "target": self.target,
            "logits": float(theta.reshape(-1)[0]) if same else theta.tolist(),
        }
        if self._custom_costs:
            out["costs"] = self.costs.tolist()
        return out

    def model(self, params: Mapping[str, Tensor]) -> Tensor:
        theta = params["logits"]  # (draws, units, categories)
        k = pyro.sample("k", dist.Categorical(logits=theta).to_event(1))  # (draws, units)
        c = self.costs.expand(theta.shape[0], *self.costs.shape)
        return c.gather(-1, k.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    # -- exact references ----------------------------------------------------------------------

    def probs(self) -> Tensor:
        return torch.softmax(self.params["logits"].detach(), dim=-1)

    def exact_grad(self) -> dict[str, Tensor]:
        p, c = self.probs(), self.costs
        return {"logits": p * (c - (p * c).sum(-1, keepdim=True))}

    def expected_cost(self) -> Tensor:
        return (self.probs() * self.costs).sum()
