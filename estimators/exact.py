"""Exact gradients by enumerating every configuration of the binary and categorical units.

    d/dtheta E[L] = d/dtheta sum_h q_theta(h) L_theta(h)

summed over all joint configurations of the units (all sites, all units): ``2^n`` for ``n``
binary units, ``prod_u K_u`` when some are Categorical with ``K_u`` categories (mixed-radix
digits, the first unit fastest), evaluated as one batch of model runs; the gradient comes
from one backward pass. Sites are visited in program order, so later layers see the
enumerated values of earlier ones and ``q(h)`` is the product of each site's conditional
probabilities.

Requires: Bernoulli, Categorical or OneHotCategorical sample sites (in ``estimate()`` and at
Pyro sites; a OneHotCategorical unit takes each one-hot value in turn) whose shapes do not
depend on the sampled values; at most ``2^max_sites`` joint configurations
(``max_sites`` binary units).
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
    Uniforms,
    grads_or_zeros,
    hard_rule,
    run_model,
    site_units,
)
from .distributions import BERNOULLI, ONE_HOT_CATEGORICAL, Kind
from .registry import register
from .score_function import bernoulli_log_prob, value_log_prob

DEFAULT_MAX_SITES = 20
KINDS_EXACT = ("Bernoulli", "Categorical", "OneHotCategorical")


def count_units(objective: Any) -> int:
    return sum(math.prod(s) for s in site_units(objective).values())


def site_radices(objective: Any) -> dict[str, tuple[torch.Size, int]]:
    """Site name -> (unit shape, values per unit: 2, or a Categorical site's categories)."""
    params = {k: v.detach().unsqueeze(0) for k, v in objective.params.items()}
    rng = Rng(0, next(iter(objective.params.values())).device)
    with torch.no_grad():
        _, sites = run_model(objective, params, hard_rule(Uniforms(rng)), "exact", KINDS_EXACT)
    return {
        name: (
            s.kind.unit_shape(s.logits)[1:],
            2 if s.kind is BERNOULLI else int(s.logits.shape[-1]),
        )
        for name, s in sites.items()
    }


def digits(configs: int, radices: Sequence[int], device: Any, dtype: torch.dtype) -> Tensor:
    """Row ``c``: the mixed-radix digits of ``c`` (first unit fastest), ``(configs, units)``."""
    idx = torch.arange(configs, device=device)
    place = torch.tensor([math.prod(radices[:j]) for j in range(len(radices))], device=device)
    radix = torch.tensor(list(radices), device=device)
    return ((idx.unsqueeze(1) // place) % radix).to(dtype)


def _too_many(what: str, radices: Sequence[int], max_sites: int) -> str | None:
    """The explanatory message when ``prod(radices) > 2^max_sites`` (else ``None``)."""
    n = len(radices)
    if all(r == 2 for r in radices):
        if n <= max_sites:
            return None
        return (
            f"{what} {n} binary units; exact enumeration is limited to "
            f"max_sites={max_sites} units (2^{max_sites} configurations)."
        )
    if sum(math.log2(r) for r in radices) <= max_sites + 1e-9:
        return None
    return (
        f"{what} {n} units with {math.prod(radices)} joint configurations; exact enumeration "
        f"is limited to 2^max_sites = 2^{max_sites} configurations."
    )


def enumerate_model(
    objective: Any, max_sites: int = DEFAULT_MAX_SITES, grad: bool = True
) -> tuple[Tensor, Tensor, dict[str, Site]]:
    """Run the model once per configuration.

    Returns ``(weights, cost, sites)``: ``q(h)`` per configuration ``(2^n,)``, the cost per
    configuration ``(2^n,)``, and the recorded sites (values ``(2^n, *units)``). With
    ``grad=True`` both depend differentiably on ``objective.params``.
    """
    sites_r = site_radices(objective)
    units = {name: shape for name, (shape, _) in sites_r.items()}
    radices = [r for shape, r in sites_r.values() for _ in range(math.prod(shape))]
    msg = _too_many(f"{type(objective).__name__} has", radices, max_sites)
    if msg is not None:
        raise ValueError(
            msg + " Use a smaller model, raise max_sites if memory allows, or the model's "
            "closed-form exact_grad()"
        )
    configs = math.prod(radices)
    first = next(iter(objective.params.values()))
    bits = digits(configs, radices, first.device, first.dtype)
    table, start = {}, 0
    for name, shape in units.items():
        k = math.prod(shape)
        table[name] = bits[:, start : start + k].reshape(configs, *shape)  # (configs, *units)
        start += k
    params = {
        k: (v if grad else v.detach()).unsqueeze(0).expand(configs, *v.shape)
        for k, v in objective.params.items()
    }

    def rule(name: str, logits: Tensor, kind: Kind = BERNOULLI) -> tuple[Tensor, dict[str, Tensor]]:
        if name not in table:
            raise ValueError(f"site {name!r} did not appear when the model was probed")
        value = table[name]
        if kind is BERNOULLI:
            return value, {"log_prob": bernoulli_log_prob(logits, value)}
        value = category_value(kind, logits, value)
        return value, {"log_prob": value_log_prob(kind, logits, value)}

    cost, sites = run_model(objective, params, rule, "exact", KINDS_EXACT)
    if list(sites) != list(units):
        raise ValueError(
            f"the model's sites changed between runs ({list(units)} then {list(sites)}); "
            "exact enumeration needs a fixed set of sites"
        )
    log_w = sum(s.extra["log_prob"].reshape(configs, -1).sum(1) for s in sites.values())
    assert isinstance(log_w, Tensor)
    return log_w.exp(), cost, sites


def category_value(kind: Kind, logits: Tensor, index: Tensor) -> Tensor:
    """The value of categorical units with category ``index`` (one-hot for
    OneHotCategorical units, the index itself for Categorical ones)."""
    if kind is ONE_HOT_CATEGORICAL:
        k = index.long()
        return torch.nn.functional.one_hot(k, logits.shape[-1]).to(logits.dtype)
    return index


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
        radices = [r for shape, r in site_radices(objective).values() for _ in range(shape.numel())]
        if _too_many("", radices, self.max_sites) is not None:
            enumerate_model(objective, self.max_sites)  # raises the explanatory ValueError
        return Cost(evals=float(math.prod(radices)), backwards=1.0)

    # -- at a Pyro site: one run per joint configuration of all exact units, weighted by q --

    site_distributions = KINDS_EXACT
    site_enumerates = True

    def site_value(self, site: SiteInput) -> SiteValue:
        assert site.assigned is not None
        if site.kind is BERNOULLI:
            value = site.assigned.to(site.logits.dtype).expand_as(site.logits)
            return SiteValue(value, hard=value)
        shape = site.kind.unit_shape(site.logits)
        index = site.assigned.to(site.logits.dtype).expand(shape)
        value = category_value(site.kind, site.logits, index)
        log_prob = value_log_prob(site.kind, site.logits, value)
        return SiteValue(value, hard=value, extra={"log_prob": log_prob})

    def site_log_weight(self, record: Any) -> Tensor:
        return record.log_q().sum()

    def site_configurations(self, records: Sequence[Any]) -> list[dict[str, Tensor]]:
        """Every joint configuration of the given sites' units (binary or categorical), as
        value tables."""
        max_sites = min(r.estimator.max_sites for r in records)
        shapes = {r.name: r.unit_shape() for r in records}
        radices = [
            2 if r.kind is BERNOULLI else int(r.logits.shape[-1])
            for r in records
            for _ in range(shapes[r.name].numel())
        ]
        n = len(radices)
        if all(x == 2 for x in radices) and n > max_sites:
            raise ValueError(
                f"sites {sorted(shapes)} (estimator 'exact') hold {n} binary units; "
                f"enumeration is limited to max_sites={max_sites} (2^{max_sites} runs). Use "
                "another estimator for some of them or raise max_sites on the Exact object"
            )
        if _too_many("", radices, max_sites) is not None:
            raise ValueError(
                f"sites {sorted(shapes)} (estimator 'exact') have {math.prod(radices)} joint "
                f"configurations; enumeration is limited to 2^max_sites = 2^{max_sites} runs. "
                "Use another estimator for some of them or raise max_sites on the Exact object"
            )
        configs = math.prod(radices)
        first = records[0].logits
        bits = digits(configs, radices, first.device, first.dtype)
        tables: list[dict[str, Tensor]] = [{} for _ in range(configs)]
        start = 0
        for name, shape in shapes.items():
            k = math.prod(shape)
            block = bits[:, start : start + k].reshape(configs, *shape)
            for c in range(configs):
                tables[c][name] = block[c]
            start += k
        return tables

    def default_chunk_size(self, objective: Any) -> int:
        return 2**62  # one chunk: the gradient is computed once

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        g = enumerate_grad(objective, self.max_sites)
        return {k: v.unsqueeze(0).expand(draws, *v.shape).clone() for k, v in g.items()}
