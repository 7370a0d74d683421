"""Named cost terms in ``surrogate_loss``: each term credited to the sites upstream of it.

A program may return ``{name: term}``; a score-function site (annotated or left to Pyro) is
credited, per plate slice, only with the terms whose provenance holds it. Exact tests compare a
fixed draw with the hand-computed surrogate, and the expectation over every configuration
(replayed one by one) with the closed form. Statistical tests fix their seeds; family-wise
false-alarm rate 1e-4 each (Bonferroni over coordinates and cases).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

from stochgrad.estimators import get
from stochgrad.estimators.surrogate import Surrogate, surrogate_loss

F64 = torch.float64
A1, A2, B = 0.3, -0.4, 1.2  # logits of z1, z2 (chain: a2 + B z1)


def f1(z):
    return (z - 0.2) ** 2 + 1.0


def f2(z):
    return 3.0 * z - 0.5


def g(z):
    return (2.0 * z - 0.3) ** 2


def branches(params, infer, named=True):
    """Two independent branches: ``z1 -> c1``, ``z2 -> c2`` (``named=False``: their sum)."""
    a1, a2 = params

    def program():
        z1 = pyro.sample("z1", dist.Bernoulli(logits=a1), infer=dict(infer))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=a2), infer=dict(infer))
        if named:
            return {"c1": f1(z1), "c2": f2(z2)}
        return f1(z1) + f2(z2)

    return program


def chain(params, infer, named=True):
    """A chain ``z1 -> z2 -> c`` plus a term ``d`` of ``z1`` alone."""
    a1, a2 = params

    def program():
        z1 = pyro.sample("z1", dist.Bernoulli(logits=a1), infer=dict(infer))
        z2 = pyro.sample("z2", dist.Bernoulli(logits=a2 + B * z1), infer=dict(infer))
        if named:
            return {"c": g(z2), "d": f1(z1)}
        return g(z2) + f1(z1)

    return program


def _params():
    return [
        torch.tensor(A1, dtype=F64, requires_grad=True),
        torch.tensor(A2, dtype=F64, requires_grad=True),
    ]


def _grads(program, params, particles=1):
    for p in params:
        p.grad = None
    result = Surrogate(num_particles=particles).run(program)
    result.loss.backward()
    return result, torch.stack([p.grad.detach().clone() for p in params])


def _closed_form(build):
    """``d E[cost] / d(a1, a2)``: the sum over the four joint values, weighted by ``q``."""
    a1, a2 = (
        torch.tensor(A1, dtype=F64, requires_grad=True),
        torch.tensor(A2, dtype=F64, requires_grad=True),
    )
    total = torch.zeros((), dtype=F64)
    for v1, v2 in itertools.product((0.0, 1.0), repeat=2):
        z1, z2 = torch.tensor(v1, dtype=F64), torch.tensor(v2, dtype=F64)
        if build is branches:
            logit2, cost = a2, f1(z1) + f2(z2)
        else:
            logit2, cost = a2 + B * z1, g(z2) + f1(z1)
        logq = dist.Bernoulli(logits=a1).log_prob(z1) + dist.Bernoulli(logits=logit2).log_prob(z2)
        total = total + logq.exp() * cost
    return torch.stack(torch.autograd.grad(total, [a1, a2]))


def _replayed(program, values):
    """``program`` with its two sites replayed at ``values`` (the sites stay latent)."""

    def holder():
        for name in values:
            pyro.sample(name, dist.Bernoulli(0.5))

    tr = poutine.trace(holder).get_trace()
    for name, v in values.items():
        tr.nodes[name]["value"] = torch.tensor(v, dtype=F64)
    return poutine.replay(program, trace=tr)


# ---------------------------------------------------------------------------------------------
# Exact: hand-computed surrogates, expectation over all configurations
# ---------------------------------------------------------------------------------------------

SF = {"estimator": "score_function"}


@pytest.mark.parametrize("infer", [SF, {}], ids=["annotated", "unannotated"])
@pytest.mark.parametrize("seed", range(4))
def test_branches_single_draw_is_each_term_times_its_site_score(infer, seed):
    params = _params()
    pyro.set_rng_seed(seed)
    result, grad = _grads(branches(params, infer), params)
    z1, z2 = (result.trace.nodes[n]["value"].detach() for n in ("z1", "z2"))
    p1, p2 = torch.sigmoid(torch.tensor([A1, A2], dtype=F64))
    expected = torch.stack([(z1 - p1) * f1(z1), (z2 - p2) * f2(z2)])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.cost, f1(z1) + f2(z2))
    torch.testing.assert_close(result.loss.detach(), f1(z1) + f2(z2))


@pytest.mark.parametrize("infer", [SF, {}], ids=["annotated", "unannotated"])
@pytest.mark.parametrize("seed", range(4))
def test_chain_single_draw_credits_upstream_sites_only(infer, seed):
    """``z1`` is credited with ``c`` (through ``z2``'s logits) and ``d``; ``z2`` with ``c`` only."""
    params = _params()
    pyro.set_rng_seed(seed)
    result, grad = _grads(chain(params, infer), params)
    z1, z2 = (result.trace.nodes[n]["value"].detach() for n in ("z1", "z2"))
    p1 = torch.sigmoid(torch.tensor(A1, dtype=F64))
    p2 = torch.sigmoid(A2 + B * z1)
    expected = torch.stack([(z1 - p1) * (g(z2) + f1(z1)), (z2 - p2) * g(z2)])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("build", [branches, chain])
def test_exact_at_every_site_equals_the_closed_form(build):
    params = _params()
    _, grad = _grads(build(params, {"estimator": "exact"}), params)
    torch.testing.assert_close(grad, _closed_form(build), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("infer", [SF, {}], ids=["annotated", "unannotated"])
@pytest.mark.parametrize("build", [branches, chain])
def test_score_function_expectation_over_all_configurations_is_exact(build, infer):
    """``sum_z q(z) g(z)`` over the four replayed configurations equals the closed form: the
    crediting removes terms of mean zero only."""
    params = _params()
    total = torch.zeros(2, dtype=F64)
    for v1, v2 in itertools.product((0.0, 1.0), repeat=2):
        program = _replayed(build(params, infer), {"z1": v1, "z2": v2})
        result, grad = _grads(program, params)
        logq = sum(
            result.trace.nodes[n]["fn"].log_prob(result.trace.nodes[n]["value"]).detach()
            for n in ("z1", "z2")
        )
        total = total + logq.exp() * grad
    torch.testing.assert_close(total, _closed_form(build), rtol=1e-12, atol=1e-14)


def test_a_single_tensor_credits_the_whole_cost_as_before():
    params = _params()
    pyro.set_rng_seed(2)
    result, grad = _grads(branches(params, SF, named=False), params)
    z1, z2 = (result.trace.nodes[n]["value"].detach() for n in ("z1", "z2"))
    p = torch.sigmoid(torch.tensor([A1, A2], dtype=F64))
    whole = f1(z1) + f2(z2)
    torch.testing.assert_close(grad, (torch.stack([z1, z2]) - p) * whole, rtol=1e-12, atol=0)


def test_named_and_single_programs_see_the_same_draws():
    """A named program is tracked (and, the first time, run again): the same random numbers,
    and the generator left where an untracked run leaves it."""
    seen = set()
    for named in (False, True, True, False):
        params = _params()
        pyro.set_rng_seed(7)
        result, _ = _grads(branches(params, SF, named=named), params)
        values = tuple(float(result.trace.nodes[n]["value"]) for n in ("z1", "z2"))
        seen.add((values, float(torch.rand(()))))
    assert len(seen) == 1


def test_a_term_downstream_of_an_exact_site_is_credited_to_the_site_above_it():
    """``z1`` (score function) sets the logits of ``z2`` (``exact``); the term ``c`` depends on
    ``z2`` alone. The mean over ``z1``'s two replayed values is the closed form."""
    params = _params()
    a1, a2 = params

    def program():
        z1 = pyro.sample("z1", dist.Bernoulli(logits=a1), infer=SF)
        z2 = pyro.sample("z2", dist.Bernoulli(logits=a2 + B * z1), infer={"estimator": "exact"})
        return {"c": g(z2), "d": f1(z1)}

    total = torch.zeros(2, dtype=F64)
    p1 = torch.sigmoid(torch.tensor(A1, dtype=F64))
    for v1 in (0.0, 1.0):
        _, grad = _grads(_replayed(program, {"z1": v1}), params)
        total = total + (p1 if v1 else 1 - p1) * grad
    torch.testing.assert_close(total, _closed_form(chain), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Plates: a term with a plate's dim credits each slice; subsample scaling per term
# ---------------------------------------------------------------------------------------------

PHI = torch.tensor([-1.2, -0.5, 0.1, 0.3, 0.8, -0.2, 1.4, 0.6], dtype=F64)
TGT = torch.tensor([0.1, 0.9, 0.4, 0.2, 0.7, 0.5, 0.3, 0.8], dtype=F64)


def plated(phi, a, infer, subsample=None):
    """Per example ``each_i = (h_i - t_i)^2``, a term ``shared`` of the whole plate, and a
    term ``other`` of a site outside the plate."""

    def program():
        y = pyro.sample("y", dist.Bernoulli(logits=a), infer=dict(infer))
        with pyro.plate("data", 8, subsample=subsample) as i:
            h = pyro.sample("h", dist.Bernoulli(logits=phi[i]), infer=dict(infer))
            each = (h - TGT[i]) ** 2
        return {"each": each, "shared": (h.sum() - 1.5) ** 2, "other": f2(y)}

    return program


@pytest.mark.parametrize("infer", [SF, {}], ids=["annotated", "unannotated"])
@pytest.mark.parametrize("subsample", [None, torch.tensor([1, 2, 5, 7])], ids=["full", "subset"])
def test_plate_slices_and_subsampling_per_term(infer, subsample):
    """Slice ``i`` of ``h`` gets ``(N/n) each_i + shared``; ``y`` gets ``other`` only."""
    phi = PHI.clone().requires_grad_(True)
    a = torch.tensor(0.4, dtype=F64, requires_grad=True)
    pyro.set_rng_seed(11)
    result = Surrogate().run(plated(phi, a, infer, subsample))
    result.loss.backward()
    h, y = (result.trace.nodes[n]["value"].detach() for n in ("h", "y"))
    idx = torch.arange(8) if subsample is None else subsample
    scale = 8 / len(idx)
    each, shared = (h - TGT[idx]) ** 2, (h.sum() - 1.5) ** 2
    expected = torch.zeros(8, dtype=F64)
    expected[idx] = (h - torch.sigmoid(PHI[idx])) * (scale * each + shared)
    torch.testing.assert_close(phi.grad, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.grad, (y - torch.sigmoid(a.detach())) * f2(y))
    torch.testing.assert_close(result.cost, scale * each.sum() + shared + f2(y))


def test_subsampled_named_terms_are_unbiased_over_all_subsets_exactly():
    """With ``exact`` at the site, the mean over all C(8, 4) subsets of the value and of the
    gradient equals the full-data value and gradient (``shared`` here has the plate's dim)."""

    def program(phi, subsample):
        def prog():
            with pyro.plate("data", 8, subsample=subsample) as i:
                h = pyro.sample("h", dist.Bernoulli(logits=phi[i]), infer={"estimator": "exact"})
                return {"each": (h - TGT[i]) ** 2, "lin": 0.5 * h * TGT[i]}

        return prog

    def value_and_grad(subsample):
        phi = PHI.clone().requires_grad_(True)
        loss = surrogate_loss(program(phi, subsample))
        loss.backward()
        return loss.detach(), phi.grad

    full = value_and_grad(None)
    subsets = list(itertools.combinations(range(8), 4))
    runs = [value_and_grad(torch.tensor(s)) for s in subsets]
    torch.testing.assert_close(sum(r[0] for r in runs) / 70, full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(r[1] for r in runs) / 70, full[1], rtol=1e-12, atol=1e-12)


def test_moving_average_tracks_each_sites_credited_cost():
    """The baseline state of ``z1`` follows ``c1`` (not ``c1 + c2``)."""
    est = get("score_function", baseline="moving_average", decay=0.5)
    params = _params()
    pyro.set_rng_seed(0)
    result, _ = _grads(branches(params, {"estimator": est}), params)
    z1, z2 = (result.trace.nodes[n]["value"].detach() for n in ("z1", "z2"))
    torch.testing.assert_close(est.state_dict()["__sites__"]["z1"]["mean"], f1(z1))
    torch.testing.assert_close(est.state_dict()["__sites__"]["z2"]["mean"], f2(z2))
    # second step: the baseline is the first step's credited cost
    pyro.set_rng_seed(1)
    result, grad = _grads(branches(params, {"estimator": est}), params)
    w1, w2 = (result.trace.nodes[n]["value"].detach() for n in ("z1", "z2"))
    p = torch.sigmoid(torch.tensor([A1, A2], dtype=F64))
    expected = torch.stack([(w1 - p[0]) * (f1(w1) - f1(z1)), (w2 - p[1]) * (f2(w2) - f2(z2))])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_bad_named_terms_are_refused():
    def empty():
        pyro.sample("z", dist.Bernoulli(0.5), infer=SF)
        return {}

    def integer():
        z = pyro.sample("z", dist.Bernoulli(0.5), infer=SF)
        return {"ok": z, "bad": torch.tensor(1)}

    def not_tensor():
        z = pyro.sample("z", dist.Bernoulli(0.5), infer=SF)
        return {"ok": z, "bad": 1.0}

    with pytest.raises(ValueError, match="empty dict of cost terms"):
        surrogate_loss(empty)
    with pytest.raises(TypeError, match="cost term 'bad' must be a floating tensor"):
        surrogate_loss(integer)
    with pytest.raises(TypeError, match="cost term 'bad' is a float"):
        surrogate_loss(not_tensor)


# ---------------------------------------------------------------------------------------------
# Statistics: many independent draws at once, one per element of a plate of draws
# ---------------------------------------------------------------------------------------------


def plated_draws(build, n, infer, named=True):
    """``build``'s program with ``n`` independent draws in a plate, each with its own
    parameters: per-slice crediting makes row ``j`` of the gradient draw ``j``'s estimate."""
    a1 = torch.full((n,), A1, dtype=F64, requires_grad=True)
    a2 = torch.full((n,), A2, dtype=F64, requires_grad=True)

    def program():
        with pyro.plate("draws", n):
            return build((a1, a2), infer, named)()

    return program, (a1, a2)


def draws_of(build, n, infer, seed, calls=1, particles=1, named=True):
    """``(n, 2)`` estimates of ``d E / d(a1, a2)`` (the last of ``calls`` steps)."""
    program, params = plated_draws(build, n, infer, named)
    objective = Surrogate(num_particles=particles)
    pyro.set_rng_seed(seed)
    for _ in range(calls):
        for p in params:
            p.grad = None
        objective.loss(program).backward()
    return torch.stack([p.grad.detach() for p in params], 1)


SF_BASELINES = {  # options, particles, calls
    "none": ({}, 1, 1),
    "moving_average": ({"baseline": "moving_average"}, 1, 3),
    "leave_one_out": ({"baseline": "leave_one_out"}, 2, 1),
    "learned": ({"baseline": "learned"}, 1, 3),
}
UNBIASED_DRAWS = 250_000  # power 0.99 against a 10% bias of the largest gradient, sd <= 1


@pytest.mark.statistical
@pytest.mark.parametrize("build", [branches, chain])
@pytest.mark.parametrize("baseline", list(SF_BASELINES))
def test_score_function_with_named_terms_is_unbiased(build, baseline, stat):
    """Bonferroni z-tests over both coordinates and the eight cases (family-wise 1e-4)."""
    options, particles, calls = SF_BASELINES[baseline]
    infer = {"estimator": get("score_function", **options)}
    seed = 300 + list(SF_BASELINES).index(baseline) + 10 * (build is chain)
    g = draws_of(build, UNBIASED_DRAWS, infer, seed, calls, particles)
    exact = _closed_form(build)
    stat.assert_unbiased(g, exact, stat.FALSE_ALARM / 8)
    if baseline == "none":  # power: a target 10% off in the largest coordinate is rejected
        off = exact.clone()
        off[exact.abs().argmax()] *= 1.1
        assert stat.z_test(g, off, stat.FALSE_ALARM / 8).rejects


# ---------------------------------------------------------------------------------------------
# Variance: against the whole cost, and against TraceGraph_ELBO on the same objective
# ---------------------------------------------------------------------------------------------

X1, X2 = torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64)  # x2 far: c2 large


def _branch_cost(z, prior, loc, x, q):
    """``-log p(z) - log p(x | z) + log q(z)`` (``q`` detached: no pathwise part)."""
    return -(
        dist.Bernoulli(torch.tensor(prior, dtype=F64)).log_prob(z)
        + dist.Normal(loc * z, 1.0).log_prob(x)
    ) + dist.Bernoulli(logits=q.detach()).log_prob(z)


def elbo_program(n, named, seed_values=None):
    """``-ELBO`` of two independent branches (``x2`` far from both means), ``n`` draws
    in a plate; named: one term per branch."""
    a1 = torch.full((n,), A1, dtype=F64, requires_grad=True)
    a2 = torch.full((n,), A2, dtype=F64, requires_grad=True)

    def program():
        with pyro.plate("draws", n):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=a1), infer=SF)
            z2 = pyro.sample("z2", dist.Bernoulli(logits=a2), infer=SF)
            c1 = _branch_cost(z1, 0.4, 3.0, X1, a1)
            c2 = _branch_cost(z2, 0.6, -2.0, X2, a2)
            return {"b1": c1, "b2": c2} if named else c1 + c2

    return program, (a1, a2)


def elbo_model_guide(n):
    a1 = torch.full((n,), A1, dtype=F64, requires_grad=True)
    a2 = torch.full((n,), A2, dtype=F64, requires_grad=True)

    def model():
        with pyro.plate("draws", n):
            z1 = pyro.sample("z1", dist.Bernoulli(torch.tensor(0.4, dtype=F64)))
            z2 = pyro.sample("z2", dist.Bernoulli(torch.tensor(0.6, dtype=F64)))
            pyro.sample("x1", dist.Normal(3.0 * z1, 1.0), obs=X1.expand(n))
            pyro.sample("x2", dist.Normal(-2.0 * z2, 1.0), obs=X2.expand(n))

    def guide():
        with pyro.plate("draws", n):
            pyro.sample("z1", dist.Bernoulli(logits=a1))
            pyro.sample("z2", dist.Bernoulli(logits=a2))

    return model, guide, (a1, a2)


def _surrogate_draws(n, named, seed):
    program, params = elbo_program(n, named)
    pyro.set_rng_seed(seed)
    result = Surrogate().run(program)
    result.loss.backward()
    values = {k: result.trace.nodes[k]["value"].detach() for k in ("z1", "z2")}
    return torch.stack([p.grad.detach() for p in params], 1), values


def _tracegraph_draws(n, seed, values=None):
    model, guide, params = elbo_model_guide(n)
    if values is not None:
        tr = poutine.trace(guide).get_trace()
        for k, v in values.items():
            tr.nodes[k]["value"] = v
        guide = poutine.replay(guide, trace=tr)
    pyro.set_rng_seed(seed)
    TraceGraph_ELBO(max_plate_nesting=1).loss_and_grads(model, guide)
    return torch.stack([p.grad.detach() for p in params], 1)


def test_named_terms_equal_tracegraph_elbo_on_the_same_draws():
    """On the same values, the per-draw gradients equal ``TraceGraph_ELBO``'s (which credits
    each site with the log-densities downstream of it), exactly."""
    g, values = _surrogate_draws(64, True, 5)
    torch.testing.assert_close(g, _tracegraph_draws(64, 0, values), rtol=1e-12, atol=1e-13)
    whole, _ = _surrogate_draws(64, False, 5)
    assert not torch.allclose(whole, g)


def _log_variance_z(small, large, factor):
    """``z`` of ``log(var(large) / (factor var(small)))`` over its large-sample standard error
    ``sqrt((k_s - 1)/n_s + (k_l - 1)/n_l)``, ``k`` the sample kurtosis (a log variance ratio is
    asymptotically normal with that spread, also for the two-point draws of a score)."""

    def parts(x):
        c = x - x.mean()
        m2 = c.pow(2).mean()
        return x.var().log(), c.pow(4).mean() / m2.pow(2), x.numel()

    ls, ks, ns = parts(small)
    ll, kl, nl = parts(large)
    return float((ll - ls - math.log(factor)) / ((ks - 1) / ns + (kl - 1) / nl).sqrt())


VAR_DRAWS = 20_000
WHOLE_FACTOR = 10.0  # stated: the whole cost's variance is at least 10x the named terms'


@pytest.mark.statistical
def test_named_terms_cut_the_variance_to_tracegraphs():
    """``a1``'s gradient: variance with named terms at least ``WHOLE_FACTOR`` times below the
    whole cost's (one-sided), and not above ``TraceGraph_ELBO``'s beyond noise (one-sided).
    Two tests, family-wise false-alarm rate 1e-4 (Bonferroni)."""
    from scipy import stats

    crit = float(stats.norm.isf(1e-4 / 2))
    named, _ = _surrogate_draws(VAR_DRAWS, True, 21)
    whole, _ = _surrogate_draws(VAR_DRAWS, False, 22)
    tracegraph = _tracegraph_draws(VAR_DRAWS, 23)
    ratio = float(named[:, 0].var() / whole[:, 0].var())
    z = _log_variance_z(named[:, 0], whole[:, 0], WHOLE_FACTOR)
    assert z > crit, f"var(named)/var(whole) = {ratio:.4f}, z = {z:.2f} <= {crit:.2f}"
    z_tg = _log_variance_z(tracegraph[:, 0], named[:, 0], 1.0)
    assert z_tg < crit, f"var(named) above TraceGraph's: z = {z_tg:.2f} >= {crit:.2f}"


def test_named_terms_as_the_first_element_of_a_tuple():
    """The value is kept without provenance; the terms are credited as when returned alone."""
    params = _params()

    def program():
        out = branches(params, SF)()
        return out, {"z": out["c1"] * 0.0}

    pyro.set_rng_seed(3)
    result, grad = _grads(program, params)
    pyro.set_rng_seed(3)
    _, alone = _grads(branches(params, SF), params)
    torch.testing.assert_close(grad, alone, rtol=0, atol=0)
    assert type(result.value[0]["c1"]) is torch.Tensor
    assert type(result.value[1]["z"]) is torch.Tensor
    assert type(result.loss) is torch.Tensor
