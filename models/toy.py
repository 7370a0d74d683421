"""The toy objective of REBAR / RELAX: ``E_{b ~ Bern(sigmoid(phi))}[sum_i (b_i - t)^2]``.

Exact gradient per unit: ``p (1 - p) (1 - 2t)`` with ``p = sigmoid(phi_i)``. Standard
settings: ``t = 0.45`` (Tucker et al. 2017, REBAR), ``t = 0.499`` (Grathwohl et al. 2018,
RELAX), ``phi = 0``.

Because units are independent, any expectation of a function of one unit ``h_i`` and the sum
of the others ``R = sum_{j != i} (b_j - t)^2`` is an exact finite sum over ``h_i`` and the
number of other units that are on (binomial) -- which gives the closed-form variances of the
single-draw estimators used to test them (:meth:`Toy.closed_form_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .base import StochasticObjective


class Toy(StochasticObjective):
    """``sum_i (b_i - t)^2`` with ``b_i ~ Bern(sigmoid(phi_i))``, ``d = dim`` units."""

    name = "toy"
    description = "E[sum_i (b_i - t)^2], b ~ Bern(sigmoid(phi)) (REBAR/RELAX toy); closed form"

    def __init__(
        self,
        dim: int = 200,
        target: float = 0.45,
        logits: float | Sequence[float] | Tensor = 0.0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ValueError(f"target must be a finite number, got {target!r}")
        phi = torch.as_tensor(logits, dtype=dtype, device=device)
        if phi.dim() == 0:
            phi = phi.expand(dim).clone()
        if phi.shape != (dim,):
            raise ValueError(
                f"logits must be a scalar or have shape ({dim},), got {tuple(phi.shape)}"
            )
        if not torch.isfinite(phi).all():
            raise ValueError("logits must be finite")
        self.dim = dim
        self.target = float(target)
        self.params = {"logits": phi.clone().requires_grad_(True)}

    def options(self) -> dict[str, Any]:
        phi = self.params["logits"].detach()
        same = bool((phi == phi[0]).all())
        return {
            "dim": self.dim,
            "target": self.target,
            "logits": float(phi[0]) if same else phi.tolist(),
        }

    def model(self, params: Mapping[str, Tensor]) -> Tensor:
        phi = params["logits"]  # (draws, dim)
        b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1))  # (draws, dim)
        return ((b - self.target) ** 2).sum(-1)

    # -- exact references ----------------------------------------------------------------------

    def probs(self) -> Tensor:
        return torch.sigmoid(self.params["logits"].detach())

    def exact_grad(self) -> dict[str, Tensor]:
        p, t = self.probs(), self.target
        return {"logits": p * (1 - p) * (1 - 2 * t)}

    def expected_cost(self) -> Tensor:
        p, t = self.probs(), self.target
        return (p * (1 - t) ** 2 + (1 - p) * t**2).sum()

    def unit_expectation(self, f: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``E[f(h_i, R_i)]`` for every unit ``i``, exactly, when all units share ``p``.

        ``f`` receives ``h`` (``(2, 1)`` holding 0 and 1) and ``R`` (``(1, d)``, the possible
        values of ``sum_{j != i} (b_j - t)^2``) and returns their joint function (broadcast).
        Computed in float64.
        """
        p = self.probs().double()
        if not bool((p == p[0]).all()):
            raise ValueError("unit_expectation needs all units to share one logit")
        p0, t, d = p[0], self.target, self.dim
        k = torch.arange(d, dtype=torch.float64)  # number of other units that are on
        log_binom = (
            torch.lgamma(torch.tensor(d, dtype=torch.float64))
            - torch.lgamma(k + 1)
            - torch.lgamma(d - k)
        )
        pk = torch.exp(log_binom + k * torch.log(p0) + (d - 1 - k) * torch.log1p(-p0))  # (d,)
        r = k * (1 - t) ** 2 + (d - 1 - k) * t**2
        h = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        ph = torch.stack([1 - p0, p0]).view(2, 1)
        vals = f(h, r.view(1, -1))
        return (ph * pk.view(1, -1) * vals).sum()

    def optimal_baseline(self) -> dict[str, Tensor]:
        """Per-unit ``E[(h_i - p_i)^2 L] / E[(h_i - p_i)^2]`` (paper Eq. 10), exactly."""
        p, t = self.probs().double(), self.target
        c1, c0 = (1 - t) ** 2, t**2
        ec = p * c1 + (1 - p) * c0  # E[(h_j - t)^2] per unit
        w1, w0 = (1 - p) ** 2 * p, p**2 * (1 - p)  # P(h)(h - p)^2 for h = 1, 0
        own = (w1 * c1 + w0 * c0) / (w1 + w0)
        b = own + (ec.sum() - ec)
        return {"b": b.to(self.params["logits"].dtype)}

    def closed_form_variance(self, estimator: str, **options: Any) -> float:
        """Exact per-coordinate variance of one draw's estimate, at a shared logit.

        ``estimator="score_function"`` with ``baseline`` ``"none"`` or ``"oracle"`` (the
        optimal baseline of Eq. 10 computed exactly) and any ``num_samples`` K (variance / K),
        or ``"leave_one_out"`` with ``num_samples=2``; ``estimator="straight_through"`` with
        ``variant`` ``"identity"`` or ``"sigmoid"``. Anything else raises ``ValueError``.
        """
        p = float(self.probs()[0])
        t = self.target
        g = p * (1 - p) * (1 - 2 * t)

        def L(h: Tensor, r: Tensor) -> Tensor:
            return (h - t) ** 2 + r

        def check(allowed: dict[str, tuple[Any, ...]]) -> None:
            for k, v in options.items():
                if k not in allowed:
                    raise ValueError(
                        f"closed_form_variance({estimator!r}): unknown option {k!r}; "
                        f"allowed: {', '.join(allowed)}"
                    )
                if allowed[k] and v not in allowed[k]:
                    raise ValueError(
                        f"no closed form for {estimator} with {k}={v!r}; "
                        f"available: {', '.join(map(repr, allowed[k]))}"
                    )

        if estimator == "straight_through":
            # g_i = 2 (h_i - t) * slope, slope 1 (identity) or p (1 - p) (sigmoid)
            check({"variant": ("identity", "sigmoid")})
            slope = 1.0 if options.get("variant", "identity") == "identity" else p * (1 - p)
            return 4 * p * (1 - p) * slope**2
        if estimator != "score_function":
            raise ValueError(
                f"no closed form for {estimator!r}; available: score_function, straight_through"
            )
        baseline = options.get("baseline", "none")
        if baseline == "leave_one_out":
            check({"baseline": (), "num_samples": (2,)})
            # g_i = (h1_i - h2_i)(L1 - L2) / 2 for K = 2; nonzero only when h1_i != h2_i,
            # then L1 - L2 = +-(1 - 2t) + (R1 - R2) with R1, R2 iid.
            var_r = float(
                self.unit_expectation(lambda h, r: r**2 + 0 * h)
                - self.unit_expectation(lambda h, r: r + 0 * h) ** 2
            )
            loo_second = 0.25 * 2 * p * (1 - p) * ((1 - 2 * t) ** 2 + 2 * var_r)
            return loo_second - g**2
        check({"baseline": ("none", "oracle"), "num_samples": ()})
        k = options.get("num_samples", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_samples must be a positive int, got {k!r}")
        b = 0.0 if baseline == "none" else float(self.optimal_baseline()["b"][0])
        second = self.unit_expectation(lambda h, r: (h - p) ** 2 * (L(h, r) - b) ** 2)
        return (float(second) - g**2) / k
