"""``EstimatorELBO``: equivalences with Pyro's ELBOs, unbiasedness, training, errors.

Equivalences are exact replays: the same guide trace is replayed under Pyro's ELBO and ours
and the gradients compared to 1e-10 (float64). Statistical tests run ``N`` independent draws
in one call (a plate of draws, each with its own parameter copies: row ``n`` of a parameter's
gradient is draw ``n``'s estimate) and z-test the mean against the enumerated gradient with a
Bonferroni threshold at family-wise false-alarm rate 1e-4; ``N`` comes from a pilot run's
variance (power 0.99 against a bias of 10% of the RMS exact gradient in any coordinate).
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, TraceGraph_ELBO

from stochgrad import estimators
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.handlers import estimator_config
from stochgrad.estimators.score_function import BASELINES


@pytest.fixture(autouse=True)
def clean_store():
    """float64 and an empty parameter store for every test, restored afterwards."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)


def store_grads(names):
    ps = pyro.get_param_store()
    return {k: ps[k].grad.detach().clone() for k in names}


def zero_grads():
    for v in pyro.get_param_store().values():
        v.grad = None


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-10, msg=k)


# ---------------------------------------------------------------------------------------------
# A model with nested and subsampled plates and two latent Bernoulli layers
# ---------------------------------------------------------------------------------------------

F64 = torch.float64
DATA = torch.tensor(
    [[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.3, 0.9], [-0.4, 1.1, 0.5, -2.0], [0.0, 0.7, 1.3, 0.4]],
    dtype=F64,
)
NAMES = ["prior", "loc", "q", "r"]


def plated_model():
    prior = pyro.param("prior", torch.tensor(0.3))
    loc = pyro.param("loc", torch.tensor(1.2))
    with pyro.plate("rows", 4, subsample_size=2, dim=-2) as i:
        z = pyro.sample("z", dist.Bernoulli(logits=prior))  # (2, 1)
        with pyro.plate("cols", 4, dim=-1):
            w = pyro.sample("w", dist.Bernoulli(logits=loc * z - 0.5))  # (2, 4)
            pyro.sample("x", dist.Normal(loc * (z + w), 1.0), obs=DATA[i])


def plated_guide():
    q = pyro.param("q", torch.tensor([[0.2], [-0.4], [0.9], [0.0]]))
    r = pyro.param("r", torch.zeros(4, 4))
    with pyro.plate("rows", 4, subsample_size=2, dim=-2) as i:
        z = pyro.sample("z", dist.Bernoulli(logits=q[i]))
        with pyro.plate("cols", 4, dim=-1):
            pyro.sample("w", dist.Bernoulli(logits=r[i] + z))


def grads_of(elbo, model, guide):
    zero_grads()
    loss = elbo.loss_and_grads(model, guide)
    return loss, store_grads(NAMES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_function_equals_tracegraph_elbo(seed):
    pyro.set_rng_seed(seed)
    tr = poutine.trace(plated_guide).get_trace()
    replayed = poutine.replay(plated_guide, trace=tr)
    loss_p, g_pyro = grads_of(TraceGraph_ELBO(), plated_model, replayed)
    ours = estimator_config(replayed, {"z": "score_function", "w": "score_function"})
    loss_o, g_ours = grads_of(EstimatorELBO(), plated_model, ours)
    assert loss_o == pytest.approx(loss_p, rel=1e-12)
    assert_same(g_pyro, g_ours)


def test_particle_plate_equals_tracegraph_elbo():
    """Vectorised particles as an outer plate (as ``vectorize_particles`` builds it)."""

    def particles(fn):
        return pyro.plate("particles", 3, dim=-3)(fn)

    pyro.set_rng_seed(0)
    tr = poutine.trace(particles(plated_guide)).get_trace()
    replayed = poutine.replay(particles(plated_guide), trace=tr)
    _, g_pyro = grads_of(TraceGraph_ELBO(max_plate_nesting=3), particles(plated_model), replayed)
    ours = estimator_config(replayed, {"z": "score_function", "w": "score_function"})
    _, g_ours = grads_of(EstimatorELBO(max_plate_nesting=3), particles(plated_model), ours)
    assert_same(g_pyro, g_ours)


def enum_model():
    prior = pyro.param("prior", torch.tensor(0.3))
    loc = pyro.param("loc", torch.tensor(1.2))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("rows", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=prior))
        pyro.sample("x", dist.Normal(loc * z, scale), obs=DATA[0, :3])


def enum_guide(enumerate_z=False):
    q = pyro.param("q", torch.tensor([0.2, -0.4, 0.9]))
    r = pyro.param("r", torch.tensor(0.1))
    pyro.sample("scale", dist.LogNormal(r, 0.5))
    with pyro.plate("rows", 3):
        infer = {"enumerate": "parallel"} if enumerate_z else {"estimator": "exact"}
        pyro.sample("z", dist.Bernoulli(logits=q), infer=infer)


def test_exact_equals_trace_enum_elbo():
    pyro.set_rng_seed(0)
    zero_grads()
    loss_p = TraceEnum_ELBO(max_plate_nesting=1).loss_and_grads(
        enum_model, lambda: enum_guide(True)
    )
    g_pyro = store_grads(NAMES)
    pyro.set_rng_seed(0)
    zero_grads()
    loss_o = EstimatorELBO().loss_and_grads(enum_model, enum_guide)
    assert loss_o == pytest.approx(loss_p, rel=1e-10)
    assert_same(g_pyro, store_grads(NAMES))
    pyro.set_rng_seed(0)
    assert EstimatorELBO().loss(enum_model, enum_guide) == pytest.approx(loss_p, rel=1e-10)


def avg_guide(estimator=None):
    q = pyro.param("q", torch.tensor([0.2, -0.4, 0.9]))
    with pyro.plate("rows", 3):
        infer = (
            {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}}
            if estimator is None
            else {"estimator": estimator}
        )
        pyro.sample("z", dist.Bernoulli(logits=q), infer=infer)


def avg_model():
    prior = pyro.param("prior", torch.tensor(0.3))
    loc = pyro.param("loc", torch.tensor(1.2))
    with pyro.plate("rows", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=prior))
        pyro.sample("x", dist.Normal(loc * z, 1.0), obs=DATA[0, :3])


def test_moving_average_equals_trace_graph_decaying_average():
    """``init='zero'`` and ``decay`` = Pyro's ``baseline_beta``: the same baseline, step by step."""
    est = estimators.get("score_function", baseline="moving_average", decay=0.8, init="zero")
    pyro.param("q", torch.tensor([0.2, -0.4, 0.9]))
    for step in range(5):
        pyro.set_rng_seed(step)
        tr = poutine.trace(avg_guide).get_trace()
        replayed = poutine.replay(avg_guide, trace=tr)
        zero_grads()
        TraceGraph_ELBO().loss_and_grads(avg_model, replayed)
        g_pyro = store_grads(["prior", "loc", "q"])
        zero_grads()
        EstimatorELBO().loss_and_grads(avg_model, estimator_config(replayed, {"z": est}))
        assert_same(g_pyro, store_grads(["prior", "loc", "q"]))
    pyro_avg = pyro.get_param_store()["__baseline_avg_downstream_cost_z"].detach()
    torch.testing.assert_close(-est.state_dict()["__sites__"]["z"]["mean"], pyro_avg)


# ---------------------------------------------------------------------------------------------
# Unannotated sites: exactly stock Pyro (TraceGraph_ELBO), same seed, no replay
# ---------------------------------------------------------------------------------------------


def test_no_annotation_is_trace_graph_elbo():
    results = []
    for elbo in [TraceGraph_ELBO(), EstimatorELBO()]:
        pyro.clear_param_store()
        steps = []
        for step in range(3):
            pyro.set_rng_seed(step)
            zero_grads()
            loss = elbo.loss_and_grads(avg_model, avg_guide)
            steps.append((loss, store_grads(["prior", "loc", "q"])))
        results.append(steps)
    for (lp, gp), (lo, go) in zip(*results):
        assert lo == pytest.approx(lp, rel=1e-12)
        assert_same(gp, go)


# ---------------------------------------------------------------------------------------------
# Per-draw estimates for statistical tests
# ---------------------------------------------------------------------------------------------

PRIOR = torch.tensor([0.4, -0.7, 0.1], dtype=F64)
Q0 = torch.tensor([-0.5, 0.3, 0.8], dtype=F64)
W = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
X = 1.3
LOC = 0.9


def draws_model(n):
    def model():
        prior = pyro.param("prior", PRIOR.expand(n, 3).clone())
        loc = pyro.param("loc", torch.full((n,), LOC))
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
            pyro.sample("x", dist.Normal(loc * (z * W).sum(-1), 1.0), obs=torch.full((n,), X))

    return model


def draws_guide(n, estimator):
    def guide():
        q = pyro.param("q", Q0.expand(n, 3).clone())
        with pyro.plate("draws", n):
            pyro.sample("z", dist.Bernoulli(logits=q).to_event(1), infer={"estimator": estimator})

    return guide


def exact_elbo_grad() -> torch.Tensor:
    """Enumerated ``d ELBO / d (prior, loc, q)`` of one draw, flattened ``(7,)``."""
    prior = PRIOR.clone().requires_grad_(True)
    loc = torch.tensor(LOC, requires_grad=True)
    q = Q0.clone().requires_grad_(True)
    elbo = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(bits)
        log_q = dist.Bernoulli(logits=q).log_prob(z).sum()
        log_p = dist.Bernoulli(logits=prior).log_prob(z).sum() + dist.Normal(
            loc * (z * W).sum(), 1.0
        ).log_prob(torch.tensor(X))
        elbo = elbo + log_q.exp() * (log_p - log_q)
    grads = torch.autograd.grad(-elbo, [prior, loc, q])  # the loss is -ELBO
    return torch.cat([g.reshape(-1) for g in grads])


def per_draw_elbo_grads(estimator, n, seed, steps=1, particles=1):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kw = {}
    if particles > 1:
        kw = dict(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    elbo = EstimatorELBO(**kw)
    model, guide = draws_model(n), draws_guide(n, estimator)
    for _ in range(steps):
        zero_grads()
        elbo.loss_and_grads(model, guide)
    g = store_grads(["prior", "loc", "q"])
    return torch.cat([g["prior"], g["loc"].unsqueeze(-1), g["q"]], dim=-1)  # (n, 7)


@pytest.mark.statistical
@pytest.mark.parametrize("baseline", BASELINES)
def test_score_function_unbiased_through_elbo(baseline, sf_case, stat):
    options, particles = sf_case

    def draw(n, seed):
        est = estimators.get("score_function", **options)
        steps = 21 if est.stateful else 1  # 20 warm-up steps, then the measured one
        return per_draw_elbo_grads(est, n, seed, steps=steps, particles=particles)

    exact = exact_elbo_grad()
    pilot = draw(2000, seed=20)
    n = stat.draws_for_power(pilot.std(0), 0.1 * exact.pow(2).mean().sqrt(), exact.numel())
    assert n <= 400_000, f"variance far above expectation: {n} draws needed"
    stat.assert_unbiased(draw(max(n, 2000), seed=21), exact)


@pytest.mark.statistical
def test_straight_through_biased_through_elbo(stat):
    stat.assert_biased(per_draw_elbo_grads("straight_through", 20_000, seed=22), exact_elbo_grad())


@pytest.mark.statistical
def test_exact_through_elbo_is_exact():
    g = per_draw_elbo_grads("exact", 1, seed=0)
    torch.testing.assert_close(g[0], exact_elbo_grad())


@pytest.mark.statistical
@pytest.mark.slow
def test_finite_difference_through_elbo_small_step(stat):
    """Central differences of the pre-activations, same random numbers: bias O(eps^2)."""
    est = estimators.get("finite_difference", eps=0.02)
    stat.assert_unbiased(per_draw_elbo_grads(est, 200_000, seed=23), exact_elbo_grad())


# ---------------------------------------------------------------------------------------------
# Other kinds of site in the ELBO
# ---------------------------------------------------------------------------------------------


def test_model_only_site_exact_is_prior_expectation():
    """A model-only annotated site is sampled from its prior; with ``exact`` the gradient is
    that of ``E_{h ~ p}[log p(x | h)]`` (its own log-density cancels)."""
    y = torch.tensor(0.7)

    def model():
        prior = pyro.param("prior", torch.tensor(-0.3))
        loc = pyro.param("loc", torch.tensor(1.5))
        h = pyro.sample("h", dist.Bernoulli(logits=prior), infer={"estimator": "exact"})
        pyro.sample("y", dist.Normal(loc * h, 1.0), obs=y)

    def guide():
        pass

    loss = EstimatorELBO().loss_and_grads(model, guide)
    got = store_grads(["prior", "loc"])
    prior = torch.tensor(-0.3, requires_grad=True)
    loc = torch.tensor(1.5, requires_grad=True)
    p = torch.sigmoid(prior)
    expected = -(
        p * dist.Normal(loc, 1.0).log_prob(y) + (1 - p) * dist.Normal(0.0, 1.0).log_prob(y)
    )
    assert loss == pytest.approx(float(expected.detach()), rel=1e-10)
    gp, gl = torch.autograd.grad(expected, [prior, loc])
    torch.testing.assert_close(got["prior"], gp)
    torch.testing.assert_close(got["loc"], gl)


@pytest.mark.parametrize(
    "name", ["straight_through", "sts", "noisy_rectifier", "node_perturbation", "spsa"]
)
def test_other_estimators_run_in_guide_and_model(name):
    """Values outside {0, 1} (sts, noisy rectifier) pass Pyro's validation; gradients are
    finite and reach every parameter."""

    def model():
        prior = pyro.param("prior", torch.zeros(4))
        loc = pyro.param("loc", torch.tensor(1.0))
        z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
        h = pyro.sample("h", dist.Bernoulli(logits=loc * z).to_event(1), infer={"estimator": name})
        pyro.sample("x", dist.Normal((z + h).sum(), 1.0), obs=torch.tensor(2.0))

    def guide():
        q = pyro.param("q", torch.zeros(4))
        pyro.sample("z", dist.Bernoulli(logits=q).to_event(1), infer={"estimator": name})

    pyro.set_rng_seed(0)
    loss = EstimatorELBO().loss_and_grads(model, guide)
    assert torch.isfinite(torch.tensor(loss))
    for k, g in store_grads(["prior", "loc", "q"]).items():
        assert torch.isfinite(g).all(), k


def test_differentiable_loss_with_torch_optimiser():
    pyro.set_rng_seed(0)
    elbo = EstimatorELBO()
    guide = estimator_config(avg_guide, {"z": "score_function"})
    loss = elbo.differentiable_loss(avg_model, guide)
    params = [pyro.param("q").unconstrained(), pyro.param("prior").unconstrained()]
    opt = torch.optim.SGD(params, lr=0.01)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    pyro.set_rng_seed(0)
    pyro.get_param_store()["q"] = torch.tensor([0.2, -0.4, 0.9])  # undo the step
    pyro.get_param_store()["prior"] = torch.tensor(0.3)
    assert float(loss.detach()) == pytest.approx(elbo.loss(avg_model, guide), rel=1e-12)


def test_state_lives_in_the_estimator_not_the_param_store():
    est = estimators.get("score_function", baseline="optimal")
    for step in range(3):
        pyro.set_rng_seed(step)
        EstimatorELBO().loss_and_grads(avg_model, lambda: avg_guide(est))
    assert not any("baseline" in k for k in pyro.get_param_store().keys())
    state = est.state_dict()["__sites__"]["z"]
    # Eq. 10 per unit: averaged over the plate (this site has no event dims), so one value
    assert state["num"].shape == state["den"].shape == (1,)
    fresh = estimators.get("score_function", baseline="optimal")
    fresh.load_state_dict(est.state_dict())
    torch.testing.assert_close(fresh.state_dict()["__sites__"]["z"]["num"], state["num"])


# ---------------------------------------------------------------------------------------------
# SVI trains toward the enumerated optimum
# ---------------------------------------------------------------------------------------------

Y = torch.tensor([1.8, -0.6, 0.9], dtype=F64)


def svi_model():
    with pyro.plate("rows", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)))
        pyro.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=Y)


def svi_guide(estimator):
    def guide():
        q = pyro.param("q", torch.full((3,), -2.0))
        with pyro.plate("rows", 3):
            pyro.sample("z", dist.Bernoulli(logits=q), infer={"estimator": estimator})

    return guide


def neg_log_evidence() -> float:
    """``-log p(y)``: the optimum of ``-ELBO`` (the factorised guide holds the posterior)."""
    like = [dist.Normal(2.0 * z - 1.0, 1.0).log_prob(Y).exp() for z in (0.0, 1.0)]
    return float(-torch.log(0.5 * like[0] + 0.5 * like[1]).sum())


@pytest.mark.parametrize(
    "estimator,particles",
    [
        ("score_function", 1),
        ("exact", 1),
        (("score_function", {"baseline": "moving_average"}), 1),
        (("score_function", {"baseline": "optimal"}), 1),
        (("score_function", {"baseline": "leave_one_out"}), 2),
        (("score_function", {"baseline": "learned"}), 1),
    ],
    ids=["sf", "exact", "moving_average", "optimal", "leave_one_out", "learned"],
)
def test_svi_trains_toward_the_optimum(estimator, particles):
    est = estimator if isinstance(estimator, str) else estimators.get(estimator[0], **estimator[1])
    pyro.set_rng_seed(0)
    kw = {}
    if particles > 1:
        kw = dict(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    guide = svi_guide(est)
    svi = SVI(svi_model, guide, pyro.optim.Adam({"lr": 0.1}), loss=EstimatorELBO(**kw))
    exact_loss = EstimatorELBO()
    exact_guide = estimator_config(guide, {"z": "exact"})
    start = exact_loss.loss(svi_model, exact_guide)
    for _ in range(300):
        svi.step()
    end = exact_loss.loss(svi_model, exact_guide)
    optimum = neg_log_evidence()
    assert start - optimum > 1.0
    assert end - optimum < 0.05 * (start - optimum), (start, end, optimum)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_estimator_names_site_and_choices():
    with pytest.raises(
        ValueError, match=r"site 'z': unknown estimator 'reinforce'.*score_function"
    ):
        EstimatorELBO().loss(avg_model, lambda: avg_guide("reinforce"))


def test_estimator_on_normal_site_names_site_and_distribution():
    def guide():
        pyro.sample("s", dist.Normal(0.0, 1.0), infer={"estimator": "straight_through"})

    def model():
        pyro.sample("s", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match=r"site 's'.*Normal"):
        EstimatorELBO().loss(model, guide)


def test_conflicting_model_annotation():
    def model():
        pyro.sample("z", dist.Bernoulli(0.5), infer={"estimator": "straight_through"})

    def guide():
        pyro.sample("z", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="annotate the site in the guide"):
        EstimatorELBO().loss(model, guide)


@pytest.mark.parametrize("baseline", ["moving_average", "optimal"])
def test_vectorised_particles_state_averages_the_particles(baseline):
    est = estimators.get("score_function", baseline=baseline)
    elbo = EstimatorELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    for step in range(3):
        pyro.set_rng_seed(step)
        zero_grads()
        elbo.loss_and_grads(avg_model, lambda: avg_guide(est))
    state = est.state_dict()["__sites__"]["z"]
    # moving average: per plate position (as Pyro's baseline); optimal: per unit (Eq. 10)
    shape = (1, 3) if baseline == "moving_average" else (1, 1)
    assert all(v.shape == shape for v in state.values())
    assert torch.isfinite(pyro.param("q").grad).all()


def test_sequential_particles_average_and_leave_one_out():
    est = estimators.get("score_function", baseline="leave_one_out")
    elbo = EstimatorELBO(num_particles=3)
    pyro.set_rng_seed(0)
    loss = elbo.loss_and_grads(avg_model, lambda: avg_guide(est))
    assert torch.isfinite(pyro.param("q").grad).all()
    # the loss is the mean of three single-particle losses drawn from the same stream
    pyro.set_rng_seed(0)
    single = EstimatorELBO(num_particles=1)
    parts = [single.loss(avg_model, lambda: avg_guide("score_function")) for _ in range(3)]
    assert loss == pytest.approx(sum(parts) / 3, rel=1e-12)
