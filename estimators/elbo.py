"""An ELBO that honours per-site estimator annotations, for ``pyro.infer.SVI``.

    elbo = EstimatorELBO(num_particles=1, vectorize_particles=False, max_plate_nesting=inf)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)

A latent Bernoulli site annotated ``infer={"estimator": ...}`` (in the guide, or in the model
for a site the guide does not sample; or through
:func:`~stochgrad.estimators.handlers.estimator_config`) gets its gradient from that estimator;
every other site behaves exactly as under Pyro's ``TraceGraph_ELBO`` (pathwise for
reparameterised sites, score function with downstream costs and Pyro's ``infer["baseline"]``
options for the rest).

Objective: ``ELBO = E_q[log p(x, z) - log q(z)]``, per particle. Crediting rule: a unit of
an annotated site ``s`` is credited with ``L_s = -(sum of log p_t - sum of log q_t)`` over the
model and guide sites ``t`` whose log-density's provenance contains ``s`` (``s`` itself
included: the terms ``s`` can influence, found by Pyro's provenance tracking as in
``TraceGraph_ELBO``), each term with its subsampling scale and mask, reduced to the unit's
plates. The terms left out do not depend on ``h_s``, so dropping them removes variance and no
mean. Exceptions: sites whose estimator re-runs the program (``site_perturbs``) or enumerates it
(``site_enumerates``) are not tracked and keep the whole cost ``L`` over every site. Stateful
baselines track the credited cost. Per kind (see :mod:`stochgrad.estimators.sites`):

- ``score_function``: ``(L_s - b) d log q(h)`` per unit plus ``d log p`` with ``h`` held fixed
  -- with no baseline this is ``TraceGraph_ELBO``'s surrogate term for the site, exactly;
- ``straight_through``, ``sts``, ``noisy_rectifier``: the value carries the rule's gradient
  into ``log p(x, h) - log q(h)`` (``sts``/``noisy_rectifier`` values lie outside {0, 1}: the
  densities are evaluated at them without support validation; biased, by design);
- ``node_perturbation``, ``spsa``, ``finite_difference``: the guide and model are re-run with
  the same random numbers at perturbed pre-activations; ``g_a`` is chain-ruled through ``a``;
- ``exact``: ``sum_c q(c) [log p - log q](c)`` over every joint configuration ``c`` of the
  exact units (one guide+model run each) -- equal to ``TraceEnum_ELBO`` with the same sites
  enumerated in the guide.

Model-only annotated sites (latent in the model, absent from the guide) are treated as if the
guide sampled them from the prior: ``log p(h | ...) - log q(h | ...)`` cancels and is left out
of the ELBO, and the estimator carries the gradient of the prior's parameters.

Requires: annotated sites of a distribution their estimator declares (Bernoulli; also
Categorical / OneHotCategorical for ``score_function``, ``exact``, and OneHotCategorical for
``straight_through``); for ``exact`` and the perturbation estimators, sites and
shapes that do not depend on the sampled values. ``leave_one_out`` baselines need
``num_particles >= 2``. Bias: that of each site's estimator.

References: Ranganath, Gerrish & Blei (2014), "Black box variational inference"; Schulman et
al. (2015), "Gradient estimation using stochastic computation graphs"; Mnih & Gregor (2014);
Bengio, Leonard & Courville (2013), arXiv:1308.3432.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.elbo import ELBO
from pyro.infer.tracegraph_elbo import _construct_baseline
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, torch_backward
from pyro.ops.provenance import detach_provenance as _detach_provenance
from pyro.ops.provenance import get_provenance as _get_provenance
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch import Tensor

from .base import Estimator, SiteCosts
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

PARTICLE_PLATE = "num_particles_vectorized"


class _Execution:
    """The guide, then the model replayed against it, under the site rules."""

    def __init__(
        self,
        elbo: EstimatorELBO,
        model: Callable,
        guide: Callable,
        args,
        kwargs,
        run,
        graph_type: Literal["flat", "dense"] = "flat",
    ):
        grun, mrun = run
        with TrackUnannotated(grun, mrun):
            # the guide trace's edges are not used here; ``_get_trace`` asks for "dense"
            guide_trace = poutine.trace(
                SiteRuleMessenger(grun)(guide), graph_type=graph_type
            ).get_trace(*args, **kwargs)
            mrun.skip = dict(grun.records)
            mrun.guide_sites = set(guide_trace.nodes)
            # inside replay: the rules see the model's own annotations before replay copies
            # the guide's infer dicts over them
            model_trace = poutine.trace(
                poutine.replay(SiteRuleMessenger(mrun)(model), trace=guide_trace)
            ).get_trace(*args, **kwargs)
        self.guide_records: dict[str, SiteRecord] = dict(grun.records)
        self.model_records: dict[str, SiteRecord] = dict(mrun.records)
        if is_validation_enabled():
            checked = model_trace
            if self.model_records:
                checked = model_trace.copy()
                for name in self.model_records:
                    checked.remove_node(name)
            check_model_guide_match(checked, guide_trace, elbo.max_plate_nesting)
        guide_trace = _without_subsample_sites(guide_trace)
        model_trace = _without_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for tr in (model_trace, guide_trace):
                for site in tr.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, elbo.max_plate_nesting)
        self.model_trace, self.guide_trace = model_trace, guide_trace
        self.tables = grun.table
        self.records = {**self.guide_records, **self.model_records}
        self.log_weight = log_weight(self.records.values())
        # log r = log p - log q per plate frame set (detached), and the ELBO value
        self.log_r: MultiFrameTensor = _LogR()
        elbo_value: Tensor | float = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and name not in self.model_records:
                self.log_r.add((site["cond_indep_stack"], _unprovenanced(site["log_prob"])))
                elbo_value = elbo_value + _unprovenanced(site["log_prob_sum"])
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                self.log_r.add((site["cond_indep_stack"], -_unprovenanced(site["log_prob"])))
                elbo_value = elbo_value - _unprovenanced(site["log_prob_sum"])
        self.elbo = torch.as_tensor(elbo_value)
        # per downstream-crediting record: the terms of log r whose provenance holds the site
        self.downstream: dict[str, MultiFrameTensor] = {}
        tracked = {n for n, r in self.records.items() if credits_downstream(r.estimator)}
        if tracked:
            self.downstream = {n: _LogR() for n in tracked}
            for name, site in model_trace.nodes.items():
                if site["type"] == "sample" and name not in self.model_records:
                    for key in _provenance(site["log_prob"]) & tracked:
                        term = _unprovenanced(site["log_prob"])
                        self.downstream[key].add((site["cond_indep_stack"], term))
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    for key in _provenance(site["log_prob"]) & tracked:
                        term = -_unprovenanced(site["log_prob"])
                        self.downstream[key].add((site["cond_indep_stack"], term))
        # re-runs: (estimator, Reruns, [log r of each re-run])
        self.perturbed: list[tuple[Any, Any, list[MultiFrameTensor]]] = []
        self._site_costs: dict[str, Tensor] = {}

    def site_cost(self, record: SiteRecord, log_r: MultiFrameTensor | None = None) -> Tensor:
        """The cost credited to the site's units, summed to its plates, event dims appended.

        ``-log r`` over the terms downstream of the site where its estimator credits downstream
        costs (:func:`~stochgrad.estimators.sites.credits_downstream`), else over every term;
        ``log_r`` given: over that (a re-run's) ``log r``. Detached.
        """
        if log_r is None:
            if record.name not in self._site_costs:
                own = self.downstream.get(record.name, self.log_r)
                self._site_costs[record.name] = self.site_cost(record, own)
            return self._site_costs[record.name]
        cost = -log_r.sum_to(record.frames)
        if not isinstance(cost, Tensor):
            cost = torch.as_tensor(cost, dtype=record.logits.dtype, device=record.logits.device)
        return record.units(_unprovenanced(cost).detach())

    def surrogate_elbo(self) -> tuple[Tensor | float, Tensor | float]:
        """Pathwise terms and Pyro's own treatment of unannotated sites (``TraceGraph_ELBO``).

        Returns ``(surrogate ELBO, baseline loss)``.
        """
        surrogate: Tensor | float = 0.0
        baseline_loss: Tensor | float = 0.0
        downstream: dict[str, MultiFrameTensor] = defaultdict(MultiFrameTensor)
        for name, site in self.model_trace.nodes.items():
            if site["type"] != "sample" or name in self.model_records:
                continue
            surrogate = surrogate + site["log_prob_sum"]
            for key in _provenance(site["log_prob_sum"]):
                downstream[key].add((site["cond_indep_stack"], site["log_prob"]))
        for name, site in self.guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            record = self.guide_records.get(name)
            if record is None:
                entropy = site["score_parts"].entropy_term
                if not is_identically_zero(entropy):
                    surrogate = surrogate - entropy.sum()
            elif not record.estimator.site_owns_log_q:
                surrogate = surrogate - site["log_prob_sum"]
            for key in _provenance(site["log_prob_sum"]):
                downstream[key].add((site["cond_indep_stack"], -site["log_prob"]))
        for node, cost in downstream.items():
            if node not in self.guide_trace.nodes or node in self.records:
                continue
            guide_site = self.guide_trace.nodes[node]
            cost = cost.sum_to(guide_site["cond_indep_stack"])
            use_baseline, loss_term, baseline = _construct_baseline(node, guide_site, cost)
            if use_baseline:
                cost = cost - baseline
                baseline_loss = baseline_loss + loss_term
            surrogate = surrogate + (guide_site["score_parts"].score_function * cost.detach()).sum()
        return _plain(surrogate), _plain(baseline_loss)


class EstimatorELBO(ELBO):
    """``pyro.infer.ELBO`` whose gradient honours ``infer={"estimator": ...}`` per site.

    Arguments as :class:`pyro.infer.ELBO` (``num_particles``, ``max_plate_nesting``,
    ``vectorize_particles``, ...), plus ``update``: fold each ``loss_and_grads`` /
    ``differentiable_loss`` call into the stateful baselines of the annotated estimators.
    """

    def __init__(self, *args: Any, update: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.update = bool(update)

    # -- the ELBO interface -------------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """An estimate of ``-ELBO`` (exact over ``exact`` sites); no gradient, no state change."""
        with torch.no_grad():
            loss, _ = self._loss_and_surrogate(model, guide, args, kwargs, grads=False)
        value = float(loss)
        _warn_if_nan(value)
        return value

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """``-ELBO`` estimate; backpropagates the surrogate into the parameters' ``.grad``."""
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs, grads=True)
        torch_backward(surrogate, retain_graph=self.retain_graph)
        value = float(loss)
        _warn_if_nan(value)
        return value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """A tensor with the value of ``-ELBO`` and the gradient of the chosen estimators."""
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs, grads=True)
        loss = torch.as_tensor(loss)
        if not isinstance(surrogate, Tensor):
            return loss
        return loss + (surrogate - surrogate.detach())

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict):
        """One ``(model_trace, guide_trace)`` pair under the site rules."""
        e = _Execution(self, model, guide, args, kwargs, (Run(), Run()), graph_type="dense")
        return e.model_trace, e.guide_trace

    # -- the computation --------------------------------------------------------------------

    def _loss_and_surrogate(self, model, guide, args, kwargs, grads: bool):
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            count = 1
        else:
            count = self.num_particles
        particles = [self._particle(model, guide, args, kwargs, grads) for _ in range(count)]
        warn_observed_annotations(
            site
            for runs in particles
            for tr in (runs[0].model_trace, runs[0].guide_trace)
            for site in tr.nodes.values()
        )
        weights = [
            [torch.exp(e.log_weight) if isinstance(e.log_weight, Tensor) else 1.0 for e in runs]
            for runs in particles
        ]
        loss: Tensor | float = 0.0
        for runs, ws in zip(particles, weights):
            for e, w in zip(runs, ws):
                loss = loss - _times(_detach(w), e.elbo.detach())
        if self.num_particles != 1:
            loss = loss / self.num_particles
        if not grads:
            return loss, None

        site_costs = self._weighted_site_costs(particles, weights) if count > 1 else []
        surrogate: Tensor | float = 0.0
        updates: dict[tuple[int, str], tuple[Estimator, SiteRecord, list, int | None]] = {}
        for i, (runs, ws) in enumerate(zip(particles, weights)):
            for e, w in zip(runs, ws):
                surrogate_elbo, baseline_loss = e.surrogate_elbo()
                s = _plus(-surrogate_elbo, baseline_loss)
                for r in e.records.values():
                    if type(r.estimator).site_term is not Estimator.site_term:
                        s = _plus(s, self._site_term(i, e, r, w, site_costs, count, updates))
                surrogate = surrogate + _times(_detach(w), s) - _times(w, e.elbo.detach())
        if self.num_particles != 1:
            surrogate = surrogate / self.num_particles
        if self.update:
            for est, r, samples, sample_dim in updates.values():
                est.site_commit(r, samples, sample_dim)
        return loss, surrogate

    def _site_term(self, i, e, r, w, site_costs, count, updates) -> Tensor | float:
        """The site's own term (its estimator's ``site_term``), loss sign."""
        est = r.estimator
        cost = e.site_cost(r)
        sample_dim = _particle_dim(r)
        others = None
        if est.site_needs_peers:
            if sample_dim is not None and cost.shape[sample_dim] > 1:
                n = cost.shape[sample_dim]
                others = (cost.sum(sample_dim, keepdim=True) - cost) / (n - 1)
            elif count > 1:
                others = sum(site_costs[j][r.name] for j in range(count) if j != i) / (count - 1)
        reruns, changes = None, []
        for owner, plan, done in e.perturbed:
            if owner is est:
                reruns = plan
                changes = [
                    e.site_cost(r, log_r) - cost if r.name in offsets else None
                    for offsets, log_r in zip(plan.offsets, done)
                ]
        state = updates.setdefault((id(est), r.name), (est, r, [], sample_dim))[2]
        costs = SiteCosts(cost, others, reruns, changes, _detach(w) / count, sample_dim, state)
        return est.site_term(r, costs)

    @staticmethod
    def _weighted_site_costs(particles, weights) -> list[dict[str, Tensor]]:
        out = []
        for runs, ws in zip(particles, weights):
            acc: dict[str, Tensor] = {}
            for e, w in zip(runs, ws):
                for name, r in e.records.items():
                    if r.estimator.site_needs_peers:
                        c = _detach(w) * e.site_cost(r)
                        acc[name] = acc[name] + c if name in acc else c
            out.append(acc)
        return out

    def _particle(self, model, guide, args, kwargs, grads: bool) -> list[_Execution]:
        start = rng_state()
        base = _Execution(self, model, guide, args, kwargs, (Run(), Run()))
        runs = [base]
        records = base.records.values()
        if not any(r.estimator.site_enumerates or r.estimator.site_perturbs for r in records):
            return runs  # no re-runs: the generator is where the base run left it
        after = rng_state()
        if enumerated(records):
            tables = enumeration_tables(records)
            for table in tables[1:]:
                set_rng_state(start)
                runs.append(
                    _Execution(
                        self, model, guide, args, kwargs, (Run(table=table), Run(table=table))
                    )
                )
            base.tables = tables[0]
        set_rng_state(after)
        if grads and any(r.estimator.site_perturbs for e in runs for r in e.records.values()):
            # directions come from their own generator, seeded from the stream after the run
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            after = rng_state()
            for e in runs:

                def log_r(offsets: dict[str, Tensor], tables: Any = e.tables) -> Any:
                    runs_ = (Run(table=tables, perturb=offsets), Run(table=tables, perturb=offsets))
                    return _Execution(self, model, guide, args, kwargs, runs_).log_r

                e.perturbed.extend(perturbed_reruns(e.records.values(), generator, start, log_r))
        set_rng_state(after)
        return runs


class _LogR(MultiFrameTensor):
    """A ``MultiFrameTensor`` whose ``add`` compares plate frames by their keys once.

    Same keys, same additions in the same order; only the repeated comparisons of
    ``CondIndepStackFrame``s (each computing its key) in the dict lookups are avoided.
    """

    def __init__(self, *items: Any):
        self._by_key: dict[frozenset, frozenset] = {}
        super().__init__(*items)

    def add(self, *items: Any) -> None:
        for cond_indep_stack, value in items:
            vectorized = [f for f in cond_indep_stack if f.vectorized]
            assert all(f.dim < 0 and -value.dim() <= f.dim for f in vectorized)
            key = frozenset(f._key() for f in vectorized)
            frames = self._by_key.get(key)
            if frames is None:
                frames = self._by_key[key] = frozenset(vectorized)
                self[frames] = value
            else:
                self[frames] = self[frames] + value


def _without_subsample_sites(trace: Any) -> Any:
    """``prune_subsample_sites``, copying the trace only when there is something to prune."""
    if any(site_is_subsample(site) for site in trace.nodes.values()):
        return prune_subsample_sites(trace)
    return trace


def _particle_dim(record: SiteRecord) -> int | None:
    """The dim of the site's unit tensors holding vectorised particles, if any."""
    for f in record.frames:
        if f.name == PARTICLE_PLATE and f.vectorized:
            return f.dim - record.event_dim
    return None


def _unprovenanced(x: Any) -> Any:
    """``detach_provenance``; a plain tensor (the common case) carries none, as is."""
    return x if type(x) is Tensor else _detach_provenance(x)


def _provenance(x: Any) -> frozenset:
    """``get_provenance``; a plain tensor (the common case) carries none."""
    return frozenset() if type(x) is Tensor else _get_provenance(x)


def _plain(x: Tensor | float) -> Tensor | float:
    return _unprovenanced(x) if isinstance(x, Tensor) else x


def _warn_if_nan(value: float) -> None:
    if math.isnan(value):
        warnings.warn("Encountered NaN: loss", stacklevel=3)


def _detach(w: Tensor | float) -> Tensor | float:
    return w.detach() if isinstance(w, Tensor) else w


def _times(w: Tensor | float, x: Any) -> Any:
    """``w * x``, skipping the multiplication by a plain ``1.0`` (same numbers)."""
    if not isinstance(w, Tensor) and w == 1.0:
        return x
    return w * x


def _plus(x: Tensor | float, y: Tensor | float) -> Tensor | float:
    """``x + y``, skipping the addition of a plain ``0.0`` (same gradient)."""
    if not isinstance(y, Tensor) and y == 0.0:
        return x
    return x + y


__all__ = ["EstimatorELBO"]
