"""Categorical units through ``surrogate_loss`` and ``EstimatorELBO``: OneHotCategorical sites
(``score_function``, ``exact``, ``straight_through``), masks and subsampling.

Exact properties are tested exactly (enumeration by hand, ``TraceEnum_ELBO``); statistical
tests fix their seeds and hold a family-wise false-alarm rate of 1e-4 each (Bonferroni over
coordinates and cases); the straight-through estimator is shown biased at a stated z.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from stochgrad.estimators import get
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.surrogate import Surrogate, surrogate_loss

F64 = torch.float64
THETA = torch.tensor([[0.3, -0.5, 0.9], [-0.2, 0.4, 0.1]], dtype=F64)  # 2 units, 3 categories
V = torch.tensor([[1.0, -0.5, 2.0], [0.3, 1.5, -1.0]], dtype=F64)
W = torch.tensor([0.4, -1.2, 0.7], dtype=F64)


def cost_of(h):
    """A cost not linear in ``h`` (``(..., 2, 3)`` one-hot): ``(sum_u <h_u, v_u>)^2 + <h_0, w>``."""
    return (h * V).sum((-1, -2)) ** 2 + (h[..., 0, :] * W).sum(-1)


def closed_form():
    """``d E[cost] / d theta`` by summing over the 9 joint values."""
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    total = torch.zeros((), dtype=F64)
    eye = torch.eye(3, dtype=F64)
    for k0, k1 in itertools.product(range(3), repeat=2):
        h = torch.stack([eye[k0], eye[k1]])
        total = total + (logp[0, k0] + logp[1, k1]).exp() * cost_of(h)
    return torch.autograd.grad(total, theta)[0]


def one_hot_program(theta, estimator, plate=False):
    """One draw: two OneHotCategorical units, as ``.to_event(1)`` or in a plate."""

    def program():
        if plate:
            with pyro.plate("units", 2):
                h = pyro.sample(
                    "h", dist.OneHotCategorical(logits=theta), infer={"estimator": estimator}
                )
        else:
            h = pyro.sample(
                "h",
                dist.OneHotCategorical(logits=theta).to_event(1),
                infer={"estimator": estimator},
            )
        return cost_of(h)

    return program


# ---------------------------------------------------------------------------------------------
# exact: enumeration over the categories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plate", [False, True], ids=["to_event", "plate"])
def test_exact_at_one_hot_sites_equals_enumeration(plate):
    theta = THETA.clone().requires_grad_(True)
    loss = surrogate_loss(one_hot_program(theta, "exact", plate))
    loss.backward()
    torch.testing.assert_close(theta.grad, closed_form(), rtol=1e-12, atol=1e-13)


class OneHotObjective:
    """The same cost as an objective of the batched core (``estimate()``)."""

    def __init__(self):
        self.params = {"logits": THETA.clone().requires_grad_(True)}

    def model(self, params):
        h = pyro.sample("h", dist.OneHotCategorical(logits=params["logits"]).to_event(1))
        return cost_of(h)


def test_exact_at_one_hot_sites_in_the_batched_core_equals_enumeration():
    g = get("exact").estimate(OneHotObjective(), 3, seed=0)["logits"]
    for row in g:
        torch.testing.assert_close(row, closed_form(), rtol=1e-12, atol=1e-13)


@pytest.mark.statistical
def test_score_function_at_one_hot_sites_in_the_batched_core_is_unbiased(stat):
    g = get("score_function").estimate(OneHotObjective(), 200_000, seed=1)["logits"]
    stat.assert_unbiased(g.reshape(g.shape[0], -1), closed_form().reshape(-1))


# ---------------------------------------------------------------------------------------------
# score_function: per-draw estimates, many draws at once in a plate of draws
# ---------------------------------------------------------------------------------------------


def draws_program(n, estimator):
    theta = THETA.expand(n, 2, 3).clone().requires_grad_(True)

    def program():
        with pyro.plate("draws", n):
            h = pyro.sample(
                "h",
                dist.OneHotCategorical(logits=theta).to_event(1),
                infer={"estimator": estimator},
            )
            return cost_of(h)  # (n,)

    return program, theta


def draws(estimator, n, seed, calls=1, particles=1):
    program, theta = draws_program(n, estimator)
    objective = Surrogate(num_particles=particles)
    pyro.set_rng_seed(seed)
    for _ in range(calls):
        theta.grad = None
        objective.loss(program).backward()
    return theta.grad.reshape(n, -1)


SF_CASES = {
    "none": ({}, 1, 1),
    "moving_average": ({"baseline": "moving_average"}, 1, 3),
    "leave_one_out": ({"baseline": "leave_one_out"}, 2, 1),
    "learned": ({"baseline": "learned"}, 1, 3),
    "optimal": ({"baseline": "optimal"}, 1, 3),
}


@pytest.mark.statistical
@pytest.mark.parametrize("baseline", list(SF_CASES))
def test_score_function_at_one_hot_sites_is_unbiased(baseline, stat):
    """Through ``surrogate_loss``, against enumeration: Bonferroni over the 6 coordinates and
    the 5 baselines (family-wise 1e-4)."""
    options, particles, calls = SF_CASES[baseline]
    est = get("score_function", **options)
    g = draws(est, 200_000, 40 + list(SF_CASES).index(baseline), calls, particles)
    exact = closed_form().reshape(-1)
    stat.assert_unbiased(g, exact, stat.FALSE_ALARM / len(SF_CASES))
    if baseline == "none":  # power: a target 10% off in the largest coordinate is rejected
        off = exact.clone()
        off[exact.abs().argmax()] *= 1.1
        assert stat.z_test(g, off, stat.FALSE_ALARM / len(SF_CASES)).rejects


def test_score_function_single_draw_is_the_hand_computed_surrogate():
    theta = THETA.clone().requires_grad_(True)
    pyro.set_rng_seed(3)
    result = Surrogate().run(one_hot_program(theta, "score_function"))
    result.loss.backward()
    h = result.trace.nodes["h"]["value"].detach()
    assert torch.equal(h.sum(-1), torch.ones(2, dtype=F64))
    expected = (h - torch.softmax(THETA, -1)) * cost_of(h)
    torch.testing.assert_close(theta.grad, expected, rtol=1e-12, atol=1e-14)


def test_optimal_baseline_at_one_hot_sites_is_the_hand_computed_surrogate():
    """Step 1 has no state (b = 0); step 2 uses b = s1^2 L1 / s1^2 per unit, with
    s^2 = ||h - softmax(theta)||^2 summed over the categories."""
    est = get("score_function", baseline="optimal")
    p = torch.softmax(THETA, -1)
    pyro.set_rng_seed(5)
    seen = []
    for _ in range(2):
        theta = THETA.clone().requires_grad_(True)
        result = Surrogate().run(one_hot_program(theta, est))
        result.loss.backward()
        h = result.trace.nodes["h"]["value"].detach()
        seen.append((h, cost_of(h), theta.grad))
    (h1, c1, g1), (h2, c2, g2) = seen
    torch.testing.assert_close(g1, (h1 - p) * c1, rtol=1e-12, atol=1e-14)
    sq1 = ((h1 - p) ** 2).sum(-1, keepdim=True)  # (2, 1): one value per unit
    b = sq1 * c1 / sq1
    torch.testing.assert_close(g2, (h2 - p) * (c2 - b), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# straight_through at OneHotCategorical units: biased on a cost not linear in h
# ---------------------------------------------------------------------------------------------

ST_DRAWS = 100_000
# Measured at seed 50: |z|max = 1279 at theta[1, 0] (mean -0.0870 against the exact -0.3637,
# se 0.0002): a bias of about 76% of that coordinate.


@pytest.mark.statistical
def test_straight_through_at_one_hot_sites_is_biased(stat):
    """Its mean differs from the exact gradient far beyond noise: the largest |z| over the six
    coordinates exceeds the Bonferroni critical value at family-wise rate 1e-4 (4.31)."""
    g = draws("straight_through", ST_DRAWS, 50)
    t = stat.assert_biased(g, closed_form().reshape(-1))
    assert t.critical == pytest.approx(4.31, abs=0.01)
    assert t.z_max > 100 * t.critical, t.describe()


# ---------------------------------------------------------------------------------------------
# Masks and subsampling at OneHotCategorical sites through surrogate_loss
# ---------------------------------------------------------------------------------------------

DATA_THETA = torch.tensor(
    [[0.3, -0.5, 0.9], [-0.2, 0.4, 0.1], [1.1, -0.7, 0.0], [0.5, 0.5, -1.0]], dtype=F64
)
DATA_V = torch.tensor(
    [[1.0, -0.5, 2.0], [0.3, 1.5, -1.0], [-0.8, 0.2, 0.6], [1.2, 0.0, -0.4]], dtype=F64
)
MASK = torch.tensor([True, False, True, True])


def data_program(theta, estimator, mask=None, how="poutine", subsample=None):
    """Per example ``(<h_i, v_i> - 0.3)^2`` (masked out where ``mask`` is False)."""

    def program():
        with pyro.plate("data", 4, subsample=subsample) as i:
            d = dist.OneHotCategorical(logits=theta[i])
            infer = {"estimator": estimator}
            if mask is None:
                h = pyro.sample("h", d, infer=infer)
            elif how == "poutine":
                with poutine.mask(mask=mask[i]):
                    h = pyro.sample("h", d, infer=infer)
            else:
                h = pyro.sample("h", d.mask(mask[i]), infer=infer)
            cost = ((h * DATA_V[i]).sum(-1) - 0.3) ** 2
            return cost if mask is None else cost * mask[i]

    return program


def data_closed_form(keep):
    """Value and gradient of ``E[sum_{i in keep} cost_i]`` by per-example enumeration."""
    theta = DATA_THETA.clone().requires_grad_(True)
    p = torch.softmax(theta, -1)
    value = sum((p[i] * (DATA_V[i] - 0.3) ** 2).sum() for i in keep)
    return value.detach(), torch.autograd.grad(value, theta)[0]


@pytest.mark.parametrize("how", ["poutine", "dist"])
@pytest.mark.parametrize("estimator", ["exact", "score_function", "straight_through"])
def test_masked_slice_gets_no_gradient_and_no_cost(estimator, how):
    theta = DATA_THETA.clone().requires_grad_(True)
    pyro.set_rng_seed(4)
    result = Surrogate().run(data_program(theta, estimator, MASK, how))
    result.loss.backward()
    if estimator == "exact":  # sum_k dq_k times a cost that does not depend on k: zero
        torch.testing.assert_close(theta.grad[1], torch.zeros(3, dtype=F64), rtol=0, atol=1e-14)
    else:
        assert torch.equal(theta.grad[1], torch.zeros(3, dtype=F64))
    h = result.trace.nodes["h"]["value"].detach()
    keep = [0, 2, 3]
    if estimator == "exact":
        value, grad = data_closed_form(keep)
        torch.testing.assert_close(result.cost, value, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(theta.grad[keep], grad[keep], rtol=1e-12, atol=1e-13)
        return
    cost = ((h * DATA_V).sum(-1) - 0.3) ** 2
    torch.testing.assert_close(result.cost, cost[keep].sum())
    if estimator == "score_function":
        expected = (h - torch.softmax(DATA_THETA, -1)) * cost.unsqueeze(-1)
    else:  # softmax backward of 2 (<h, v> - 0.3) v
        p = torch.softmax(DATA_THETA, -1)
        dh = 2 * ((h * DATA_V).sum(-1, keepdim=True) - 0.3) * DATA_V
        expected = p * (dh - (p * dh).sum(-1, keepdim=True))
    torch.testing.assert_close(theta.grad[keep], expected[keep], rtol=1e-12, atol=1e-14)


def test_subsampled_one_hot_sites_are_unbiased_over_all_subsets_exactly():
    """``exact``: the mean over all C(4, 2) subsets of the value and the gradient equals the
    full-data value and gradient."""
    full = data_closed_form(range(4))
    subsets = list(itertools.combinations(range(4), 2))
    values, grads = [], []
    for idx in subsets:
        theta = DATA_THETA.clone().requires_grad_(True)
        loss = surrogate_loss(data_program(theta, "exact", subsample=torch.tensor(idx)))
        loss.backward()
        values.append(loss.detach())
        grads.append(theta.grad)
    torch.testing.assert_close(sum(values) / len(subsets), full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(grads) / len(subsets), full[1], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# score_function at OneHotCategorical sites through EstimatorELBO, against TraceEnum_ELBO
# ---------------------------------------------------------------------------------------------

PRIOR = torch.tensor([0.2, -0.4, 0.6, 0.0], dtype=F64)
Q = torch.tensor([-0.3, 0.5, 0.1, 0.8], dtype=F64)
LOC_W = torch.tensor([-1.0, 0.5, 1.5, 3.0], dtype=F64)
PARAMS = ["prior", "loc", "q"]


def one_hot_model(n):
    def model():
        prior = pyro.param("prior", PRIOR.expand(n, 4).clone())
        loc = pyro.param("loc", torch.full((n,), 0.9, dtype=F64))
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.OneHotCategorical(logits=prior))
            pyro.sample(
                "x",
                dist.Normal(loc * (z * LOC_W).sum(-1), 1.0),
                obs=torch.full((n,), 1.3, dtype=F64),
            )

    return model


def one_hot_guide(n, infer):
    def guide():
        q = pyro.param("q", Q.expand(n, 4).clone())
        with pyro.plate("draws", n):
            pyro.sample("z", dist.OneHotCategorical(logits=q), infer=dict(infer))

    return guide


def elbo_grads(elbo, n, infer, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo.loss_and_grads(one_hot_model(n), one_hot_guide(n, infer))
    store = pyro.get_param_store()
    g = torch.cat([store[k].grad.detach().reshape(n, -1) for k in PARAMS], -1)
    pyro.clear_param_store()
    return g


def test_exact_at_a_one_hot_pyro_site_equals_trace_enum_elbo():
    want = elbo_grads(TraceEnum_ELBO(max_plate_nesting=1), 3, {"enumerate": "parallel"})
    got = elbo_grads(EstimatorELBO(), 3, {"estimator": "exact"})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.statistical
def test_score_function_at_a_one_hot_pyro_site_is_unbiased(stat):
    exact = elbo_grads(TraceEnum_ELBO(max_plate_nesting=1), 1, {"enumerate": "parallel"})[0]
    g = elbo_grads(EstimatorELBO(), 100_000, {"estimator": "score_function"}, seed=3)
    stat.assert_unbiased(g, exact)
    off = exact.clone()  # power: a target 10% off in the largest coordinate is rejected
    off[exact.abs().argmax()] *= 1.1
    assert stat.z_test(g, off).rejects


# ---------------------------------------------------------------------------------------------
# Masks and subsampling at Categorical sites in EstimatorELBO
# ---------------------------------------------------------------------------------------------

CAT_Q = torch.tensor(
    [[0.1, -0.4, 0.3], [0.6, 0.0, -0.2], [-0.5, 0.2, 0.4], [0.3, 0.3, -0.6], [0.0, 0.8, -0.1]],
    dtype=F64,
)
CAT_X = torch.tensor([0.4, -1.1, 2.0, 0.7, -0.3], dtype=F64)
CAT_LOC = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
CAT_MASK = torch.tensor([True, False, True, False, True])
N_CAT = 5


def cat_model_guide(mask=None, subsample=None, infer=None):
    """Five data points, each with a Categorical latent of three values; ``mask`` masks the
    whole slice (model and guide), ``subsample`` picks a subset."""

    def masked(fn, i):
        return fn if mask is None else poutine.mask(fn, mask=mask[i])

    def model():
        with pyro.plate("data", N_CAT, subsample=subsample) as i:

            def body():
                z = pyro.sample("z", dist.Categorical(logits=torch.zeros(len(i), 3, dtype=F64)))
                pyro.sample("x", dist.Normal(CAT_LOC[z.long()], 1.0), obs=CAT_X[i])

            masked(body, i)()

    def guide():
        q = pyro.param("q", CAT_Q.clone())
        with pyro.plate("data", N_CAT, subsample=subsample) as i:

            def body():
                pyro.sample("z", dist.Categorical(logits=q[i]), infer=dict(infer or {}))

            masked(body, i)()

    return model, guide


def cat_loss_and_grad(estimator, seed=0, **kw):
    pyro.clear_param_store()
    model, guide = cat_model_guide(infer={"estimator": estimator}, **kw)
    pyro.set_rng_seed(seed)
    loss = EstimatorELBO(max_plate_nesting=1).loss_and_grads(model, guide)
    g = pyro.get_param_store()["q"].grad.detach().clone()
    pyro.clear_param_store()
    return loss, g


@pytest.mark.parametrize("estimator", ["exact", "score_function"])
def test_masked_categorical_slice_gets_no_gradient_and_adds_nothing_to_the_loss(estimator):
    loss, g = cat_loss_and_grad(estimator, seed=2, mask=CAT_MASK)
    out = ~CAT_MASK
    if estimator == "exact":
        torch.testing.assert_close(g[out], torch.zeros_like(g[out]), rtol=0, atol=1e-14)
    else:
        assert torch.equal(g[out], torch.zeros_like(g[out]))
    assert (g[CAT_MASK] != 0).all()
    # the loss: that of the kept slices alone (exact: -ELBO of the subset, exactly)
    keep = torch.nonzero(CAT_MASK).squeeze(-1)
    sub_loss, sub_g = cat_loss_and_grad("exact", subsample=keep)
    scale = N_CAT / len(keep)  # the subset's terms are scaled by N / n
    if estimator == "exact":
        assert loss == pytest.approx(sub_loss / scale, rel=1e-12)
        torch.testing.assert_close(g, sub_g / scale, rtol=1e-12, atol=1e-14)


def test_subsampled_categorical_sites_are_unbiased_over_all_subsets_exactly():
    """``exact`` at the site: the mean over all C(5, 2) subsets of the loss and the gradient
    equals the full-data loss and gradient."""
    full_loss, full_g = cat_loss_and_grad("exact")
    subsets = list(itertools.combinations(range(N_CAT), 2))
    losses, grads = [], []
    for idx in subsets:
        loss, g = cat_loss_and_grad("exact", subsample=torch.tensor(idx))
        losses.append(loss)
        grads.append(g)
    assert sum(losses) / len(subsets) == pytest.approx(full_loss, rel=1e-12)
    torch.testing.assert_close(sum(grads) / len(subsets), full_g, rtol=1e-12, atol=1e-13)


def test_subsampled_categorical_score_function_equals_tracegraph_elbo():
    """One subset, the same (replayed) values: the gradient equals ``TraceGraph_ELBO``'s, each
    slice's score scaled by ``N / n``; the slices left out get none."""
    from pyro.infer import TraceGraph_ELBO

    idx = torch.tensor([0, 3, 4])
    grads = []
    for elbo, infer in (
        (EstimatorELBO(), {"estimator": "score_function"}),
        (TraceGraph_ELBO(), {}),
    ):
        pyro.clear_param_store()
        model, guide = cat_model_guide(subsample=idx, infer=infer)
        pyro.set_rng_seed(9)
        fixed = poutine.trace(cat_model_guide(subsample=idx)[1]).get_trace()
        elbo.loss_and_grads(model, poutine.replay(guide, trace=fixed))
        grads.append(pyro.get_param_store()["q"].grad.detach().clone())
    pyro.clear_param_store()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    assert (grads[0][idx] != 0).all() and (grads[0][[1, 2]] == 0).all()
