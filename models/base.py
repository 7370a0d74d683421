"""Stochastic objectives: Pyro programs whose stochastic neurons are Bernoulli sample sites.

An objective holds its parameters (``params``: leaf tensors) and a Pyro program
``model(params)``. The program receives every parameter with a leading batch dimension of
draws, ``(draws, *param.shape)``, samples its units with
``pyro.sample(name, dist.Bernoulli(logits=a).to_event(k))`` (batch shape ``(draws,)``) and
returns one cost per draw, shape ``(draws,)``. Giving each draw its own parameters is what
lets an estimator produce all per-draw gradients in one backward pass.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor


class StochasticObjective(abc.ABC):
    """``E_{h ~ q_theta}[L_theta(h)]`` as a Pyro program with exact references."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    params: dict[str, Tensor]

    @abc.abstractmethod
    def model(self, params: Mapping[str, Tensor]) -> Tensor:
        """The Pyro program: batched parameters in, cost per draw ``(draws,)`` out."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """The options the objective was built with (JSON-serialisable)."""

    def __call__(self, num_draws: int = 1) -> Tensor:
        """Run the program at the current parameters: ``num_draws`` sampled costs."""
        return self.model(
            {k: v.unsqueeze(0).expand(num_draws, *v.shape) for k, v in self.params.items()}
        )

    def exact_grad(self) -> dict[str, Tensor]:
        """Exact ``d E[L] / d params`` (enumeration unless a subclass has a closed form)."""
        from stochgrad.estimators.exact import enumerate_grad

        return enumerate_grad(self)

    def expected_cost(self) -> Tensor:
        """Exact ``E[L]`` (enumeration unless a subclass has a closed form)."""
        from stochgrad.estimators.exact import enumerate_expectation

        return enumerate_expectation(self)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def to(self, device: torch.device | str) -> StochasticObjective:
        """Move parameters and data to ``device`` (in place); returns ``self``."""
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device))
        self.params = {
            k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in self.params.items()
        }
        return self

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
