"""A surrogate loss for a Pyro program that returns a cost: ``.backward()`` leaves the estimate.

API::

    surrogate_loss(fn, *args, **kwargs) -> Tensor
    Surrogate(num_particles=1, update=True).loss(fn, *args, **kwargs) -> Tensor
    Surrogate(...).run(fn, *args, **kwargs) -> SurrogateResult(loss, cost, value, trace)
    forward_gradient(fn, params, "spsa" | "finite_difference" | obj, *args, **kwargs) -> Tensor

``fn(*args, **kwargs)`` is a Pyro program whose stochastic neurons are ``pyro.sample``
Bernoulli (or, for estimators that declare them, Categorical and OneHotCategorical) sites and
which returns its cost ``L`` (or named cost terms, below; or a tuple whose first element is
the cost; the whole return value is kept in ``SurrogateResult.value``). The returned scalar has
the *value* of the cost (summed over its elements, averaged over particles) and the
*gradient* of the chosen estimators::

    import pyro, pyro.distributions as dist, torch
    from stochgrad.estimators.surrogate import surrogate_loss

    def program(x, y):
        a = gater(x)                                            # (batch, units) pre-activations
        with pyro.plate("data", x.shape[0]):
            g = pyro.sample("gates", dist.Bernoulli(logits=a).to_event(1),
                            infer={"estimator": "straight_through"})
            return torch.nn.functional.cross_entropy(head(g * experts(x)), y,
                                                     reduction="none")      # (batch,)

    optimizer.zero_grad()
    loss = surrogate_loss(program, x, y)
    loss.backward()          # .grad of every parameter now holds the estimate of dE[L]/dtheta
    optimizer.step()

The cost may be a scalar or have plate dims (above: one cost per example inside
``pyro.plate("data")``); a unit is then credited only with the costs of the plate slices it
belongs to -- the per-plate Rao-Blackwellisation of Pyro's ``Trace_ELBO``. In a subsampled
plate (``pyro.plate("data", N, subsample_size=n)``) a cost with the plate's dim is scaled by
``N / n``, as Pyro scales log-densities there, so that the value and the gradient are unbiased
for the full-data cost; a cost already reduced over that dim is taken as it is.

Named cost terms: the program may return a ``dict[str, Tensor]`` instead (or as the first
element of its tuple), e.g. ``{"fit": nll, "compute": penalty}``. The cost is the sum of the
terms (each term summed over its elements, each scaled for subsampling as above). A unit of a
score-function site -- annotated with an estimator that credits downstream costs
(:func:`~stochgrad.estimators.sites.credits_downstream`: not the re-running or enumerating
ones) or left to Pyro -- is credited only with the terms that depend on the site: those whose
provenance (Pyro's tracking of the sample values through every operation, as in
``TraceGraph_ELBO``; the sites upstream of a site's parameters count as upstream of its value)
holds it, each reduced to the unit's plates as above. The terms left out cannot move with the
unit's value, so leaving them out removes variance and no mean. Stateful baselines act on
each site's credited cost. Re-running and enumerating estimators keep the whole cost. A
program returning one tensor is credited as one term upstream of every site, exactly as
without names. The run is tracked only for a program that names its terms (decided on the
program's code; the first call of a new one runs it twice on the same random numbers).

Per site, with ``a`` the unit's pre-activation and ``L`` its cost (identities in
:mod:`stochgrad.estimators.sites`):

- unannotated: Pyro's default -- pathwise through ``rsample`` where the distribution has one,
  otherwise the plain score function ``L * d log q(h)`` (as ``Trace_ELBO``, or with named
  terms as ``TraceGraph_ELBO``; no baseline);
- ``score_function``: ``(L - b) * d log q(h)`` with the estimator's baseline (state kept per
  site in the estimator object, updated after use; ``leave_one_out`` needs
  ``num_particles >= 2``; ``learned`` reads ``infer={"baseline_input": x}``);
- ``straight_through`` / ``sts`` / ``noisy_rectifier``: the unit's value with its gradient;
- ``node_perturbation`` / ``spsa`` / ``finite_difference``: re-runs of the program with the same
  random numbers and perturbed pre-activations, ``g_a`` chain-ruled into the parameters;
- ``exact``: one run per joint configuration of all exact units, weighted by ``q(config)``.

Randomness: per particle, one integer is drawn from torch's generator (the seed of any
perturbation directions), then the program runs on the generator as usual; re-runs restore
the generator so that they see the same random numbers.

Requires: the program's sites and shapes do not depend on the sampled values when it is re-run
(perturbation and exact estimators re-run it), and it draws its randomness from torch's
generator. Bias: that of each site's estimator (none for ``score_function`` and ``exact``).

References: Bengio, Leonard & Courville (2013), arXiv:1308.3432; Schulman et al. (2015),
"Gradient estimation using stochastic computation graphs" (surrogate losses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero
from pyro.ops.provenance import detach_provenance as _detach_provenance
from pyro.ops.provenance import get_provenance as _get_provenance
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from .base import Estimator, SiteCosts, check_positive_int
from .handlers import warn_observed_annotations
from .sites import (
    Run,
    SiteRecord,
    SiteRuleMessenger,
    TrackUnannotated,
    credits_downstream,
    enumerated,
    enumeration_tables,
    log_weight,
    perturbed_reruns,
    rng_state,
    set_rng_state,
)


@dataclass
class SurrogateResult:
    """``loss``: backpropagate it; ``cost``: its value (detached); ``value``, ``trace``: the
    program's return value and Pyro trace of the first run."""

    loss: Tensor
    cost: Tensor
    value: Any
    trace: Trace


def reduce_cost(cost: Tensor, record: SiteRecord) -> Tensor:
    """The part of ``cost`` a site's elements can influence: sum over the other plates' dims.

    Returns a detached tensor with the site's batch dims (sizes 1 where the cost has none),
    event dims appended as singletons.
    """
    batch = record.hard.shape[: record.hard.dim() - record.event_dim]
    out = _sum_to_frames(cost, record.frames)
    for d in range(-out.dim(), 0):
        if out.shape[d] != 1 and (-d > len(batch) or batch[d] not in (1, out.shape[d])):
            frame = next(f for f in record.frames if f.dim == d)
            raise ValueError(
                f"site {record.name!r}: the cost has size {out.shape[d]} at dim {d}, where plate "
                f"{frame.name!r} has size {frame.size}; the cost's dims must be plate dims"
            )
    return record.units(out)


def subsample_scale(cost: Tensor, trace: Trace) -> float:
    """The factor making ``cost`` unbiased for the full data in subsampled plates.

    Pyro scales a log-density inside ``pyro.plate(name, N, subsample_size=n)`` by ``N / n``;
    a cost is scaled likewise at the dims it shares with such a plate (the plate's dim, there
    of the subsample's size). A cost without the plate's dim (already summed or averaged over
    it) is taken as it is.
    """
    frames: dict[tuple[str, int], Any] = {}
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for f in site["cond_indep_stack"]:
            if f.dim is not None and f.full_size is not None and f.full_size != f.size:
                frames[(f.name, f.dim)] = f
    scale = 1.0
    for f in frames.values():
        if cost.dim() >= -f.dim and cost.shape[f.dim] == f.size:
            scale = scale * (f.full_size / f.size)
    return scale


def _sum_to_frames(cost: Tensor, frames: tuple) -> Tensor:
    """Sum ``cost`` (detached) over every dim that is not one of ``frames``' plate dims."""
    keep = {f.dim for f in frames if f.vectorized}
    out = cost.detach()
    for d in range(-out.dim(), 0):
        if d not in keep and out.shape[d] != 1:
            out = out.sum(d, keepdim=True)
    while out.dim() > 0 and out.shape[0] == 1:
        out = out.squeeze(0)
    return out


class _Execution:
    """A run of the program: its cost terms, return value, trace and site records.

    ``terms``: the cost terms, subsample-scaled, detached from provenance (one, ``cost``, for a
    program returning a tensor). ``sources``: per term, the latent sites upstream of it (its
    provenance), or ``None`` where the program returned one tensor (every site is credited
    with the whole cost, as before named terms existed) or the run was not tracked.
    """

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, run: Run, track: bool = False):
        self.run = run
        traced = poutine.trace(SiteRuleMessenger(run)(fn))
        if track:
            with TrackUnannotated(run, upstream=True):
                self.trace = traced.get_trace(*args, **kwargs)
        else:
            self.trace = traced.get_trace(*args, **kwargs)
        returned: Any = self.trace.nodes["_RETURN"]["value"]
        cost: Any = returned[0] if isinstance(returned, tuple) else returned
        self.value = _detach_provenance(returned) if track else returned
        self.named = isinstance(cost, Mapping)
        self.sources: list[frozenset] | None = None
        if self.named:
            if not cost:
                raise ValueError("the program returned an empty dict of cost terms")
            terms = []
            for key, term in cost.items():
                _check_cost(term, f"cost term {key!r}")
                terms.append(term * subsample_scale(term, self.trace))
            if track:
                self.sources = [_get_provenance(t) for t in terms]
            self.terms = [_plain(t) for t in terms]
            total: Tensor | float = 0.0
            for t in self.terms:
                total = total + t.sum()
            assert isinstance(total, Tensor)
            self.total = total
        else:
            _check_cost(cost, "cost")
            scaled = _plain(cost * subsample_scale(cost, self.trace))
            self.terms = [scaled]
            self.total = scaled.sum()
        self.records = run.records
        self.log_weight: Tensor | float = log_weight(self.records.values())
        # re-runs: (estimator, Reruns, [cost terms of each re-run])
        self.perturbed: list[tuple[Any, Any, list[list[Tensor]]]] = []

    @property
    def cost(self) -> Tensor:
        """The cost of a program that returns one tensor."""
        assert not self.named
        return self.terms[0]

    def credited(self, record: SiteRecord) -> Tensor:
        """The cost the site's units are credited with, reduced to its plates (detached).

        The terms downstream of the site (by provenance) where its estimator credits downstream
        costs and the program names its terms; otherwise every term (the whole cost).
        """
        if self.sources is None or not credits_downstream(record.estimator):
            return self.whole(record)
        picked = [t for t, src in zip(self.terms, self.sources) if record.name in src]
        return _sum_reduced(picked, record, lambda t: reduce_cost(t, record))

    def whole(self, record: SiteRecord) -> Tensor:
        """Every term, reduced to the site's plates (detached)."""
        if not self.named:
            return reduce_cost(self.cost, record)
        return _sum_reduced(self.terms, record, lambda t: reduce_cost(t, record))

    def change(self, terms: list[Tensor], record: SiteRecord) -> Tensor:
        """A re-run's cost (its ``terms``) minus this run's, reduced to the site's plates."""
        if not self.named:
            return reduce_cost(terms[0] - self.cost.detach(), record)
        pairs = [c - t.detach() for c, t in zip(terms, self.terms)]
        return _sum_reduced(pairs, record, lambda t: reduce_cost(t, record))

    def stock_cost(self, name: str, frames: tuple) -> Tensor:
        """The cost credited to an unannotated latent site, summed to its plates (detached)."""
        if self.sources is None:
            if not self.named:
                return _sum_to_frames(self.cost, frames)
            terms = self.terms
        else:
            terms = [t for t, src in zip(self.terms, self.sources) if name in src]
        total: Tensor = torch.zeros((), dtype=self.total.dtype, device=self.total.device)
        for t in terms:
            total = total + _sum_to_frames(t, frames)
        return total


def _check_cost(cost: Any, what: str) -> None:
    if not isinstance(cost, Tensor):
        raise TypeError(
            f"the program must return its cost as a Tensor, a dict of named Tensor terms, or a "
            f"tuple starting with either; its {what} is a {type(cost).__name__}"
        )
    if not cost.is_floating_point():
        raise TypeError(f"the program's {what} must be a floating tensor, got {cost.dtype}")


def _sum_reduced(terms: list[Tensor], record: SiteRecord, reduce: Callable) -> Tensor:
    """``sum_t reduce(t)`` (broadcast); zero with the site's shape when no term is given."""
    if not terms:
        dtype, device = record.logits.dtype, record.logits.device
        return record.units(torch.zeros((), dtype=dtype, device=device))
    out = reduce(terms[0])
    for t in terms[1:]:
        out = out + reduce(t)
    return out


def _plain(x: Any) -> Any:
    """``x`` without provenance (a plain tensor, the common case, as it is)."""
    return x if type(x) is Tensor else _detach_provenance(x)


class Surrogate:
    """Surrogate losses for cost-returning Pyro programs (see the module docstring).

    ``num_particles``: independent runs averaged (``leave_one_out`` baselines use the others).
    ``update``: fold each call into stateful baselines (turn off for evaluation).
    """

    def __init__(self, num_particles: int = 1, update: bool = True):
        self.num_particles = check_positive_int("num_particles", num_particles)
        self.update = bool(update)

    def loss(self, fn: Callable, *args: Any, **kwargs: Any) -> Tensor:
        return self.run(fn, *args, **kwargs).loss

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> SurrogateResult:
        particles = [self._particle(fn, args, kwargs) for _ in range(self.num_particles)]
        warn_observed_annotations(
            site for runs in particles for site in runs[0].trace.nodes.values()
        )
        k = self.num_particles
        weights = [
            [_plain(e.log_weight).exp() if isinstance(e.log_weight, Tensor) else 1.0 for e in runs]
            for runs in particles
        ]
        # per particle and site: the q-weighted cost, for leave-one-out baselines
        site_costs: list[dict[str, Tensor]] = []
        for runs, ws in zip(particles, weights):
            acc: dict[str, Tensor] = {}
            for e, w in zip(runs, ws):
                for name, r in e.records.items():
                    if r.estimator.site_needs_peers:
                        c = _detach(w) * e.credited(r)
                        acc[name] = acc[name] + c if name in acc else c
            site_costs.append(acc)

        value: Tensor | float = 0.0
        surrogate: Tensor | float = 0.0
        updates: dict[tuple[int, str], tuple[Estimator, SiteRecord, list]] = {}
        for i, (runs, ws) in enumerate(zip(particles, weights)):
            for e, w in zip(runs, ws):
                total = e.total
                s = total + _stock_score_terms(e)
                for name, r in e.records.items():
                    est = r.estimator
                    if type(est).site_term is Estimator.site_term:
                        continue
                    cost_u = e.credited(r)
                    others: Tensor | None = None
                    if est.site_needs_peers and k > 1:
                        rest = [site_costs[j][name] for j in range(k) if j != i]
                        others = torch.stack(rest).sum(0) / (k - 1)
                    reruns, changes = None, []
                    for owner, plan, done in e.perturbed:
                        if owner is est:
                            reruns = plan
                            changes = [
                                e.change(c, r) if name in offsets else None
                                for offsets, c in zip(plan.offsets, done)
                            ]
                    state = updates.setdefault((id(est), name), (est, r, []))[2]
                    costs = SiteCosts(cost_u, others, reruns, changes, _detach(w) / k, None, state)
                    term = est.site_term(r, costs)
                    if isinstance(term, Tensor) or term != 0.0:
                        s = s + term
                value = value + _detach(w) * total.detach()
                surrogate = surrogate + _detach(w) * s + w * total.detach()
        value = value / k
        surrogate = surrogate / k
        if self.update:
            for est, r, samples in updates.values():
                est.site_commit(r, samples, None)
        assert isinstance(value, Tensor) and isinstance(surrogate, Tensor)
        plain_value: Tensor = _plain(value)
        plain_surrogate: Tensor = _plain(surrogate)
        loss = plain_value + (plain_surrogate - plain_surrogate.detach())
        first = particles[0][0]
        return SurrogateResult(
            loss=loss, cost=plain_value.detach(), value=first.value, trace=first.trace
        )

    def _particle(self, fn: Callable, args: tuple, kwargs: dict) -> list[_Execution]:
        # The stream, per particle: one integer (the seed of the perturbation directions,
        # drawn whether or not they are needed), then the program's own draws.
        seed = int(torch.randint(0, 2**62, ()).item())
        start = rng_state()
        key = _program_key(fn)
        track = _NAMES_TERMS.get(key, False)
        base = _Execution(fn, args, kwargs, Run(), track)
        if base.named and not track:
            # named cost terms need provenance: run again, tracked, on the same random numbers
            track = True
            set_rng_state(start)
            base = _Execution(fn, args, kwargs, Run(), track)
        _NAMES_TERMS[key] = base.named
        after = rng_state()
        runs = [base]
        if enumerated(base.records.values()):
            tables = enumeration_tables(base.records.values())
            for table in tables[1:]:
                set_rng_state(start)
                runs.append(_Execution(fn, args, kwargs, Run(table=table), track))
            base.run.table = tables[0]
        generator = torch.Generator().manual_seed(seed)
        for e in runs:

            def cost(offsets: dict[str, Tensor], table: Any = e.run.table) -> list[Tensor]:
                rerun = _Execution(fn, args, kwargs, Run(table=table, perturb=offsets))
                return [t.detach() for t in rerun.terms]

            e.perturbed.extend(perturbed_reruns(e.records.values(), generator, start, cost))
        set_rng_state(after)
        return runs


# Whether a program (by its code) last returned named cost terms: such a program is run with
# provenance tracking from the start (a wrong guess costs one untracked run, never a result).
_NAMES_TERMS: dict[Any, bool] = {}


def _program_key(fn: Callable) -> Any:
    return getattr(fn, "__code__", None) or type(fn)


def _detach(w: Tensor | float) -> Tensor | float:
    return w.detach() if isinstance(w, Tensor) else w


def _stock_score_terms(e: _Execution) -> Tensor | float:
    """``L * score`` for unannotated non-reparameterised latent sites (as ``Trace_ELBO``; with
    named cost terms, ``L`` holds the terms downstream of the site, as ``TraceGraph_ELBO``)."""
    total: Tensor | float = 0.0
    for name, site in e.trace.nodes.items():
        if (
            site["type"] != "sample"
            or site["is_observed"]
            or name in e.records
            or type(site["fn"]).__name__ == "_Subsample"
        ):
            continue
        if getattr(site["fn"], "has_rsample", False):
            continue  # reparameterised: pathwise through rsample, no score term
        fn: Any = site["fn"]
        parts = fn.score_parts(site["value"], *site["args"], **site["kwargs"])
        if is_identically_zero(parts.score_function):
            continue
        cost = e.stock_cost(name, tuple(site["cond_indep_stack"]))
        total = total + (parts.score_function * cost).sum()
    return total


def forward_gradient(
    fn: Callable, params: Iterable[Tensor], estimator: Any, *args: Any, **kwargs: Any
) -> Tensor:
    """Forward-only gradient estimate of the program's cost, accumulated into ``p.grad``.

    Re-runs ``fn(*args, **kwargs)`` at perturbed values of ``params`` (the network weights,
    not the units' pre-activations), every run with the same random numbers (the torch
    generator is restored), and no backward pass:

    - ``spsa``: ``g = mean_j [L(theta + c D_j) - L(theta - c D_j)] D_j / (2c)``, ``D_j`` with
      independent +-1 entries, ``2 * num_pairs`` runs (Spall 1992);
    - ``finite_difference``: ``g_i = [L(theta + eps e_i) - L(theta - eps e_i)] / (2 eps)``,
      ``2 P`` runs for ``P`` coordinates.

    ``L`` is the program's cost summed. Sample sites are drawn as Pyro's defaults (annotations
    play no part: no gradient flows through anything). Returns the mean cost over the runs.

    Requires: a program whose randomness comes from torch's generator. Bias: O(c^2) (O(eps^2))
    for smooth expected costs; unbiased only as the step goes to 0.
    """
    from .finite_difference import FiniteDifference
    from .registry import get
    from .spsa import SPSA

    est = get(estimator)
    params = list(params)
    if not isinstance(est, (SPSA, FiniteDifference)):
        raise ValueError(
            f"forward_gradient needs 'spsa' or 'finite_difference', got {est.name!r}; other "
            "estimators act at the sample sites (annotate them and use surrogate_loss)"
        )
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise TypeError("params must be a non-empty iterable of tensors (e.g. model.parameters())")

    start = rng_state()

    def cost() -> Tensor:
        set_rng_state(start)
        value = fn(*args, **kwargs)
        value = value[0] if isinstance(value, tuple) else value
        if not isinstance(value, Tensor):
            raise TypeError(f"the program must return its cost as a Tensor, got {type(value)}")
        return value.detach().sum()

    total: Tensor | float = 0.0
    runs = 0
    with torch.no_grad():
        after: dict[str, Any] | None = None
        if isinstance(est, SPSA):
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            start = rng_state()
            grads = [torch.zeros_like(p) for p in params]
            for _ in range(est.num_pairs):
                deltas = [
                    (2 * torch.randint(0, 2, p.shape, generator=generator) - 1).to(p)
                    for p in params
                ]
                for p, d in zip(params, deltas):
                    p.add_(est.c * d)
                plus = cost()
                after = after or rng_state()
                for p, d in zip(params, deltas):
                    p.sub_(2 * est.c * d)
                minus = cost()
                for p, d in zip(params, deltas):
                    p.add_(est.c * d)
                for g, d in zip(grads, deltas):
                    g.add_((plus - minus) * d / (2 * est.c * est.num_pairs))
                total, runs = total + plus + minus, runs + 2
        else:
            grads = []
            for p in params:
                g = torch.zeros_like(p)
                flat_p, flat_g = p.view(-1), g.view(-1)
                for i in range(flat_p.numel()):
                    flat_p[i] += est.eps
                    plus = cost()
                    after = after or rng_state()
                    flat_p[i] -= 2 * est.eps
                    minus = cost()
                    flat_p[i] += est.eps
                    flat_g[i] = (plus - minus) / (2 * est.eps)
                    total, runs = total + plus + minus, runs + 2
                grads.append(g)
        if after is not None:
            set_rng_state(after)
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad + g
    assert isinstance(total, Tensor)
    return total / runs


def surrogate_loss(fn: Callable, *args: Any, **kwargs: Any) -> Tensor:
    """One-particle surrogate of the cost ``fn(*args, **kwargs)`` (see the module docstring)."""
    return Surrogate().loss(fn, *args, **kwargs)


__all__ = ["Surrogate", "SurrogateResult", "forward_gradient", "reduce_cost", "surrogate_loss"]
