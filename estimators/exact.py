"""Exact gradients by enumerating every configuration of the binary and categorical units.

    d/dtheta E[L] = d/dtheta sum_h q_theta(h) L_theta(h)

summed over all joint configurations of the units (all sites, all units): ``2^n`` for ``n``
binary units, ``prod_u K_u`` when some are Categorical with ``K_u`` categories (mixed-radix
digits, the first unit fastest), evaluated as one batch of model runs; the gradient comes
from one backward pass. Sites are visited in program order, so later layers see the
enumerated values of earlier ones and ``q(h)`` is the product of each site's conditional
probabilities.

When the objective declares independent examples (``examples`` and ``example_costs``, see
:func:`example_count`; the ``sbn`` does), one example's units are enumerated, for all examples
at once: ``B * 2^(n/B)`` terms instead of ``2^n``. Configurations are evaluated in chunks of
bounded memory, each with its own copy of the parameters, and the terms are summed in float64.

Accuracy: in float32 the result is within ~1e-6 of a float64 computation, relative to the
largest gradient component (tested against a float64 brute force up to 20 units).

Requires: Bernoulli, Categorical or OneHotCategorical sample sites (in ``estimate()`` and at
Pyro sites; a OneHotCategorical unit takes each one-hot value in turn) whose shapes do not
depend on the sampled values; at most ``2^max_sites`` configurations
(``max_sites`` binary units) enumerated jointly: per example when examples are declared.
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
    SiteMessenger,
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


def digits(
    configs: int, radices: Sequence[int], device: Any, dtype: torch.dtype, start: int = 0
) -> Tensor:
    """Row ``c - start``: the mixed-radix digits of ``c`` (first unit fastest), for
    ``c = start .. configs - 1``: ``(configs - start, units)``."""
    idx = torch.arange(start, configs, device=device)
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


def table_rule(table: dict[str, Tensor]) -> Any:
    """The site rule that sets each site to its enumerated values (``table[name]``, category
    indices for categorical units) and records their log-density."""

    def rule(name: str, logits: Tensor, kind: Kind = BERNOULLI) -> tuple[Tensor, dict[str, Tensor]]:
        if name not in table:
            raise ValueError(f"site {name!r} did not appear when the model was probed")
        value = table[name]
        if kind is BERNOULLI:
            return value, {"log_prob": bernoulli_log_prob(logits, value)}
        value = category_value(kind, logits, value)
        return value, {"log_prob": value_log_prob(kind, logits, value)}

    return rule


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

    rule = table_rule(table)

    cost, sites = run_model(objective, params, rule, "exact", KINDS_EXACT)
    if list(sites) != list(units):
        raise ValueError(
            f"the model's sites changed between runs ({list(units)} then {list(sites)}); "
            "exact enumeration needs a fixed set of sites"
        )
    log_w = sum(s.extra["log_prob"].reshape(configs, -1).sum(1) for s in sites.values())
    assert isinstance(log_w, Tensor)
    return log_w.exp(), cost, sites


# Configurations evaluated together: about this many elements per chunk (parameters expanded per
# configuration, plus the units), so that enumeration runs in bounded memory however many
# configurations there are.
ENUM_CHUNK_ELEMENTS = 2**21


def example_count(objective: Any) -> int | None:
    """The objective's number of independent examples, when it declares them (else None).

    An objective declares ``examples = B`` and ``example_costs(params) -> (draws, B)`` when
    every site's unit shape starts with an example axis of size ``B``, example ``b``'s units
    depend only on example ``b`` (its inputs and its earlier units), and the cost is the sum of
    the per-example costs. Enumeration then runs over one example's units, for all examples at
    once: ``B * 2^(n/B)`` terms instead of ``2^n``.
    """
    b = getattr(objective, "examples", None)
    if b is None:
        return None
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"{type(objective).__name__}.examples must be a positive int, got {b!r}")
    return b


def enumeration_plan(objective: Any, max_sites: int = DEFAULT_MAX_SITES) -> dict[str, Any]:
    """What :func:`enumerate_grad` enumerates: ``radices`` (one per enumerated unit),
    ``units`` (site -> the enumerated unit shape), ``examples`` (``None``: the joint)."""
    sites_r = site_radices(objective)
    examples = example_count(objective)
    units = {name: shape for name, (shape, _) in sites_r.items()}
    if examples is not None:
        bad = [n for n, shape in units.items() if len(shape) < 1 or shape[0] != examples]
        if bad:
            raise ValueError(
                f"{type(objective).__name__} declares {examples} independent examples, but the "
                f"unit shapes of {bad} do not start with an example axis of that size"
            )
        units = {name: shape[1:] for name, shape in units.items()}
    radices = [r for name, (_, r) in sites_r.items() for _ in range(math.prod(units[name]))]
    what = f"{type(objective).__name__} has" + (" per example" if examples else "")
    msg = _too_many(what, radices, max_sites)
    if msg is not None:
        raise ValueError(
            msg + " Use a smaller model, raise max_sites if memory allows, or the model's "
            "closed-form exact_grad()"
        )
    return {"radices": radices, "units": units, "examples": examples}


def _enumerate_chunk(
    objective: Any, plan: dict[str, Any], leaves: dict[str, Tensor], lo: int, hi: int
) -> tuple[Tensor, Tensor]:
    """``q`` and the cost of configurations ``lo..hi-1``: ``(n,)`` each for the joint, or
    ``(n, B)`` per example."""
    n, radices, examples = hi - lo, plan["radices"], plan["examples"]
    first = next(iter(leaves.values()))
    bits = digits(hi, radices, first.device, first.dtype, start=lo)
    table, start = {}, 0
    for name, shape in plan["units"].items():
        k = math.prod(shape)
        block = bits[:, start : start + k].reshape(n, *shape)
        if examples is not None:  # the same configuration for every example
            block = block.unsqueeze(1).expand(n, examples, *shape)
        table[name] = block
        start += k

    rule = table_rule(table)

    with SiteMessenger(rule, "exact", KINDS_EXACT) as handler:
        if examples is None:
            cost = objective.model(leaves)
            want: tuple[int, ...] = (n,)
        else:
            cost = objective.example_costs(leaves)
            want = (n, examples)
    if not isinstance(cost, Tensor) or tuple(cost.shape) != want:
        got = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        fn = "model" if examples is None else "example_costs"
        raise ValueError(f"{type(objective).__name__}.{fn} must return shape {want}; got {got}")
    sites = handler.sites
    if list(sites) != list(plan["units"]):
        raise ValueError(
            f"the model's sites changed between runs ({list(plan['units'])} then {list(sites)}); "
            "exact enumeration needs a fixed set of sites"
        )
    log_w = sum(s.extra["log_prob"].reshape(*want, -1).sum(-1) for s in sites.values())
    assert isinstance(log_w, Tensor)
    return log_w.exp(), cost


def _enumerate(
    objective: Any, max_sites: int, grad: bool
) -> tuple[dict[str, Tensor] | None, Tensor]:
    """Exact ``(d E[L] / d params, E[L])``, accumulated in float64 over chunks of configurations.

    Each chunk of configurations has its own parameter leaves: within a chunk the gradient
    terms are summed by autograd (torch's pairwise sums, in the parameters' dtype), and the
    chunks' sums are accumulated in float64, so the error does not grow with the number of
    configurations, and the memory is one chunk's.
    """
    plan = enumeration_plan(objective, max_sites)
    configs = math.prod(plan["radices"])
    params = objective.params
    per_config = sum(v.numel() for v in params.values()) + len(plan["radices"]) * (
        plan["examples"] or 1
    )
    chunk = max(1, ENUM_CHUNK_ELEMENTS // max(1, per_config))
    grads = {
        k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()
    }
    total = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)
    for lo in range(0, configs, chunk):
        hi = min(configs, lo + chunk)
        with torch.set_grad_enabled(grad):
            chunk_leaves = {k: v.detach().requires_grad_(grad) for k, v in params.items()}
            leaves = {k: v.unsqueeze(0).expand(hi - lo, *v.shape) for k, v in chunk_leaves.items()}
            w, cost = _enumerate_chunk(objective, plan, leaves, lo, hi)
            terms = w * cost
            total += terms.double().sum()
            if grad:
                for k, g in grads_or_zeros(terms.sum(), chunk_leaves).items():
                    grads[k] += g.double()
    if not grad:
        return None, total
    return {k: g.to(params[k].dtype) for k, g in grads.items()}, total


def category_value(kind: Kind, logits: Tensor, index: Tensor) -> Tensor:
    """The value of categorical units with category ``index`` (one-hot for
    OneHotCategorical units, the index itself for Categorical ones)."""
    if kind is ONE_HOT_CATEGORICAL:
        k = index.long()
        return torch.nn.functional.one_hot(k, logits.shape[-1]).to(logits.dtype)
    return index


def enumerate_grad(objective: Any, max_sites: int = DEFAULT_MAX_SITES) -> dict[str, Tensor]:
    """Exact ``d E[L] / d params`` by enumeration (per example when the objective declares
    independent examples; see :func:`example_count`)."""
    g, _ = _enumerate(objective, max_sites, grad=True)
    assert g is not None
    return g


def enumerate_expectation(objective: Any, max_sites: int = DEFAULT_MAX_SITES) -> Tensor:
    """Exact ``E[L]`` by enumeration, in the parameters' dtype."""
    _, total = _enumerate(objective, max_sites, grad=False)
    return total.to(next(iter(objective.params.values())).dtype)


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
        plan = enumeration_plan(objective, self.max_sites)  # raises the explanatory ValueError
        return Cost(evals=float(math.prod(plan["radices"])), backwards=1.0)

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
