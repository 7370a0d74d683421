"""A small stochastic binary network, small enough to enumerate.

    x (batch, in) -> h1 ~ Bern(sigmoid(x W1 + b1))         (batch, H1) binary units
                  -> h2 ~ Bern(sigmoid(h1 W2 + b2))        (batch, H2) binary units
                  -> y_hat = h2 W3 + b3                    (batch, out) continuous
    L = sum over the batch of ||y_hat - y||^2

Parameters in every layer; the inputs ``x`` and targets ``y`` are fixed, drawn from a seeded
generator. With the defaults (batch 2, hidden (3, 2)) there are 10 binary units, so the exact
gradient is a sum over 1024 configurations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .base import StochasticObjective


class SBN(StochasticObjective):
    """Two binary layers and a linear read-out with squared error."""

    name = "sbn"
    description = "2-layer stochastic binary network with a squared-error read-out; enumerable"

    def __init__(
        self,
        input_dim: int = 4,
        hidden: Sequence[int] = (3, 2),
        output_dim: int = 2,
        batch: int = 2,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        hidden = tuple(hidden)
        for label, v in [("input_dim", input_dim), ("output_dim", output_dim), ("batch", batch)]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if len(hidden) != 2 or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be two positive ints (H1, H2), got {hidden!r}")
        self.input_dim, self.hidden, self.output_dim = input_dim, hidden, output_dim
        self.batch, self.seed = batch, seed
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            return (
                (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
            )

        h1, h2 = hidden
        self.x = randn(batch, input_dim)
        self.y = randn(batch, output_dim)
        self.params = {
            "W1": randn(input_dim, h1, scale=input_dim**-0.5),
            "b1": randn(h1, scale=0.5),
            "W2": randn(h1, h2),
            "b2": randn(h2, scale=0.5),
            "W3": randn(h2, output_dim),
            "b3": randn(output_dim, scale=0.5),
        }
        for param in self.params.values():
            param.requires_grad_(True)

    def options(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "output_dim": self.output_dim,
            "batch": self.batch,
            "seed": self.seed,
        }

    @property
    def examples(self) -> int:
        """The batch's examples are independent (exact enumeration runs per example)."""
        return self.batch

    def model(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.example_costs(params).sum(-1)

    def example_costs(self, params: Mapping[str, Tensor]) -> Tensor:
        """Per-example squared error, ``(draws, batch)``; example ``b``'s units depend only on
        its own input, so the cost is a sum of independent per-example terms."""
        # Every parameter arrives as (draws, *shape); matmul broadcasts over the leading dims.
        a1 = self.x @ params["W1"] + params["b1"].unsqueeze(-2)  # (draws, batch, H1)
        h1 = pyro.sample("h1", dist.Bernoulli(logits=a1).to_event(2))
        a2 = h1 @ params["W2"] + params["b2"].unsqueeze(-2)  # (draws, batch, H2)
        h2 = pyro.sample("h2", dist.Bernoulli(logits=a2).to_event(2))
        y_hat = h2 @ params["W3"] + params["b3"].unsqueeze(-2)  # (draws, batch, out)
        return ((y_hat - self.y) ** 2).sum(-1)
