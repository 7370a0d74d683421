"""Exact gradients by enumerating every configuration of the binary units.

    d/dtheta E[L] = d/dtheta sum_h q_theta(h) L_theta(h)

summed over all ``2^n`` joint configurations of the ``n`` binary units (all sites, all
units), evaluated as one batch of ``2^n`` model runs; the gradient comes from one backward
pass. Sites are visited in program order, so later layers see the enumerated values of
earlier ones and ``q(h)`` is the product of each site's conditional probabilities.

Requires: Bernoulli sample sites whose shapes do not depend on the sampled values; at most
``max_sites`` binary units in all (``2^max_sites`` configurations).
Bias: none, and no variance: every draw returns the same (exact) gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (
    Cost,
    Estimator,
    Rng,
    Site,
    SiteInput,
    SiteValue,
    grads_or_zeros,
    run_model,
    site_units,
)
from .registry import register
from .score_function import bernoulli_log_prob

DEFAULT_MAX_SITES = 20


def count_units(objective: Any) -> int:
    return sum(math.prod(s) for s in site_units(objective).values())


def enumerate_model(
    objective: Any, max_sites: int = DEFAULT_MAX_SITES, grad: bool = True
) -> tuple[Tensor, Tensor, dict[str, Site]]:
    """Run the model once per configuration.

    Returns ``(weights, cost, sites)``: ``q(h)`` per configuration ``(2^n,)``, the cost per
    configuration ``(2^n,)``, and the recorded sites (values ``(2^n, *units)``). With
    ``grad=True`` both depend differentiably on ``objective.params``.
    """
    units = site_units(objective)
    n = sum(math.prod(s) for s in units.values())
    if n > max_sites:
        raise ValueError(
            f"{type(objective).__name__} has {n} binary units; exact enumeration is limited to "
            f"max_sites={max_sites} units (2^{max_sites} configurations). Use a smaller model, "
            "raise max_sites if memory allows, or the model's closed-form exact_grad()"
        )
    configs = 2**n
    first = next(iter(objective.params.values()))
    idx = torch.arange(configs, device=first.device)
    bits = ((idx.unsqueeze(1) >> torch.arange(n, device=first.device)) & 1).to(first.dtype)
    table, start = {}, 0
    for name, shape in units.items():
        k = math.prod(shape)
        table[name] = bits[:, start : start + k].reshape(configs, *shape)  # (configs, *units)
        start += k
    params = {
        k: (v if grad else v.detach()).unsqueeze(0).expand(configs, *v.shape)
        for k, v in objective.params.items()
    }

    def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if name not in table:
            raise ValueError(f"site {name!r} did not appear when the model was probed")
        value = table[name]
        return value, {"log_prob": bernoulli_log_prob(logits, value)}

    cost, sites = run_model(objective, params, rule, "exact")
    if list(sites) != list(units):
        raise ValueError(
            f"the model's sites changed between runs ({list(units)} then {list(sites)}); "
            "exact enumeration needs a fixed set of sites"
        )
    log_w = sum(s.extra["log_prob"].reshape(configs, -1).sum(1) for s in sites.values())
    assert isinstance(log_w, Tensor)
    return log_w.exp(), cost, sites


def enumerate_grad(objective: Any, max_sites: int = DEFAULT_MAX_SITES) -> dict[str, Tensor]:
    """Exact ``d E[L] / d params`` by enumeration."""
    weights, cost, _ = enumerate_model(objective, max_sites)
    expected = (weights * cost).sum()
    return {k: g.detach() for k, g in grads_or_zeros(expected, objective.params).items()}


def enumerate_expectation(objective: Any, max_sites: int = DEFAULT_MAX_SITES) -> Tensor:
    """Exact ``E[L]`` by enumeration."""
    with torch.no_grad():
        weights, cost, _ = enumerate_model(objective, max_sites, grad=False)
    return (weights * cost).sum()


@register
class Exact(Estimator):
    """The exact gradient by enumeration, repeated for every draw (zero variance)."""

    name = "exact"
    unbiased = "yes"
    description = "exact gradient by enumerating all 2^n unit configurations (small models)"

    def __init__(self, max_sites: int = DEFAULT_MAX_SITES):
        if isinstance(max_sites, bool) or not isinstance(max_sites, int) or max_sites < 1:
            raise ValueError(f"max_sites must be a positive int, got {max_sites!r}")
        self.max_sites = max_sites

    def cost(self, objective: Any) -> Cost:
        n = count_units(objective)
        if n > self.max_sites:
            enumerate_model(objective, self.max_sites)  # raises the explanatory ValueError
        return Cost(evals=float(2**n), backwards=1.0)

    # -- at a Pyro site: one run per joint configuration of all exact units, weighted by q --

    site_distributions = ("Bernoulli",)
    site_enumerates = True

    def site_value(self, site: SiteInput) -> SiteValue:
        assert site.assigned is not None
        value = site.assigned.to(site.logits.dtype).expand_as(site.logits)
        return SiteValue(value, hard=value)

    def site_log_weight(self, record: Any) -> Tensor:
        return record.log_q().sum()

    def site_configurations(self, records: Sequence[Any]) -> list[dict[str, Tensor]]:
        """Every joint configuration of the given sites' binary units, as value tables."""
        max_sites = min(r.estimator.max_sites for r in records)
        shapes = {r.name: r.logits.shape for r in records}
        n = sum(math.prod(s) for s in shapes.values())
        if n > max_sites:
            raise ValueError(
                f"sites {sorted(shapes)} (estimator 'exact') hold {n} binary units; "
                f"enumeration is limited to max_sites={max_sites} (2^{max_sites} runs). Use "
                "another estimator for some of them or raise max_sites on the Exact object"
            )
        first = records[0].logits
        idx = torch.arange(2**n, device=first.device)
        bits = ((idx.unsqueeze(1) >> torch.arange(n, device=first.device)) & 1).to(first.dtype)
        tables: list[dict[str, Tensor]] = [{} for _ in range(2**n)]
        start = 0
        for name, shape in shapes.items():
            k = math.prod(shape)
            block = bits[:, start : start + k].reshape(2**n, *shape)
            for c in range(2**n):
                tables[c][name] = block[c]
            start += k
        return tables

    def default_chunk_size(self, objective: Any) -> int:
        return 2**62  # one chunk: the gradient is computed once

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        g = enumerate_grad(objective, self.max_sites)
        return {k: v.unsqueeze(0).expand(draws, *v.shape).clone() for k, v in g.items()}
