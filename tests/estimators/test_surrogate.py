"""The surrogate loss of cost-returning Pyro programs (``stochgrad.estimators.surrogate``).

Exact tests replay a fixed seed and recompute the estimate by hand. Statistical tests run many
independent draws in one call: a plate of ``N`` draws, each with its own copy of the
parameters, and a cost per draw, so per-plate crediting makes row ``n`` of the gradient draw
``n``'s estimate. Family-wise false-alarm rate 1e-4 per test (Bonferroni over coordinates);
the number of draws comes from a pilot run's variance (power 0.99 against a bias of 10% of the
RMS exact gradient in any coordinate).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from stochgrad import estimators
from stochgrad.estimators.handlers import estimator_config
from stochgrad.estimators.score_function import BASELINES
from stochgrad.estimators.surrogate import Surrogate, forward_gradient, surrogate_loss

T = 0.2
LOGITS = torch.tensor([-1.0, -0.3, 0.4, 1.1], dtype=torch.float64)


def toy_exact() -> torch.Tensor:
    p = torch.sigmoid(LOGITS)
    return p * (1 - p) * (1 - 2 * T)


def toy_program(phi: torch.Tensor, estimator=None):
    """``sum_i (b_i - t)^2`` per draw; ``phi`` is ``(draws, units)``."""

    def program():
        with pyro.plate("draws", phi.shape[0]):
            infer = {} if estimator is None else {"estimator": estimator}
            b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1), infer=infer)
            return ((b - T) ** 2).sum(-1)  # (draws,)

    return program


def per_draw_grads(estimator, draws: int, seed: int, calls: int = 1, particles: int = 1):
    """``(draws, units)`` independent estimates (the last of ``calls`` steps)."""
    pyro.set_rng_seed(seed)
    phi = LOGITS.expand(draws, -1).clone().requires_grad_(True)
    objective = Surrogate(num_particles=particles)
    for _ in range(calls):
        phi.grad = None
        objective.loss(toy_program(phi, estimator)).backward()
    return phi.grad.detach().clone()


# ---------------------------------------------------------------------------------------------
# Exact replays
# ---------------------------------------------------------------------------------------------


def test_score_function_matches_hand_computation():
    pyro.set_rng_seed(3)
    phi = LOGITS.expand(5, -1).clone().requires_grad_(True)
    result = Surrogate().run(toy_program(phi, "score_function"))
    result.loss.backward()
    b = result.trace.nodes["b"]["value"].detach()
    cost = ((b - T) ** 2).sum(-1, keepdim=True)  # each draw's own cost only
    expected = (b - torch.sigmoid(phi.detach())) * cost
    torch.testing.assert_close(phi.grad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.cost, cost.sum())
    assert set(b.unique().tolist()) <= {0.0, 1.0}


def test_straight_through_matches_hand_computation():
    pyro.set_rng_seed(4)
    phi = LOGITS.expand(3, -1).clone().requires_grad_(True)
    result = Surrogate().run(toy_program(phi, "straight_through"))
    result.loss.backward()
    h = result.trace.nodes["b"]["value"].detach()
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(phi.grad, 2 * (h - T))


def test_exact_equals_closed_form():
    phi = LOGITS.unsqueeze(0).clone().requires_grad_(True)
    loss = surrogate_loss(toy_program(phi, "exact"))
    loss.backward()
    torch.testing.assert_close(phi.grad[0], toy_exact())
    p = torch.sigmoid(LOGITS)
    torch.testing.assert_close(loss.detach(), (p * (1 - T) ** 2 + (1 - p) * T**2).sum())


def test_unannotated_site_is_plain_score_function():
    pyro.set_rng_seed(5)
    phi = LOGITS.expand(4, -1).clone().requires_grad_(True)
    result = Surrogate().run(toy_program(phi))
    result.loss.backward()
    b = result.trace.nodes["b"]["value"].detach()
    expected = (b - torch.sigmoid(phi.detach())) * ((b - T) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(phi.grad, expected)


def test_reparameterised_site_is_pathwise():
    loc = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def program():
        x = pyro.sample("x", dist.Normal(loc, 1.0))
        return x**2

    pyro.set_rng_seed(0)
    result = Surrogate().run(program)
    result.loss.backward()
    x = result.trace.nodes["x"]["value"].detach()
    torch.testing.assert_close(loc.grad, 2 * x)


def test_value_and_tuple_return():
    phi = LOGITS.unsqueeze(0).clone().requires_grad_(True)

    def program():
        b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1))
        return ((b - T) ** 2).sum(), {"b": b}

    result = Surrogate().run(estimator_config(program, {"b": "straight_through"}))
    assert isinstance(result.value, tuple) and "b" in result.value[1]
    torch.testing.assert_close(result.loss.detach(), result.cost)


def test_node_perturbation_reuses_the_random_numbers():
    """The cost does not depend on the perturbed unit: the re-run must give exactly 0."""
    phi = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def program():
        b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1))
        noise = pyro.sample("noise", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        return 0.0 * b.sum() + noise.sum() ** 2

    for name in ["node_perturbation", "spsa", "finite_difference"]:
        phi.grad = None
        pyro.set_rng_seed(1)
        surrogate_loss(estimator_config(program, {"b": name})).backward()
        torch.testing.assert_close(phi.grad, torch.zeros(3, dtype=torch.float64))


def test_node_perturbation_matches_hand_computation():
    sigma = 0.5
    est = estimators.get("node_perturbation", sigma=sigma)
    phi = LOGITS.unsqueeze(0).clone().requires_grad_(True)
    pyro.set_rng_seed(2)
    result = Surrogate().run(toy_program(phi, est))
    result.loss.backward()
    # Recompute: the particle's seed for the offsets first, then the unit's uniforms.
    pyro.set_rng_seed(2)
    seed = int(torch.randint(0, 2**62, ()).item())
    u = torch.rand(1, 4, dtype=torch.float64)
    xi = sigma * torch.randn(
        (1, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    h0 = (u < torch.sigmoid(LOGITS)).double()
    h1 = (u < torch.sigmoid(LOGITS + xi)).double()
    dl = ((h1 - T) ** 2).sum() - ((h0 - T) ** 2).sum()
    torch.testing.assert_close(phi.grad, dl * xi / sigma**2)


def test_plate_crediting_uses_each_element_cost():
    """A unit in plate slice ``n`` is credited with cost ``n`` only."""
    pyro.set_rng_seed(6)
    phi = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 10.0], dtype=torch.float64)

    def program():
        with pyro.plate("data", 2):
            b = pyro.sample(
                "b", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": "score_function"}
            )
        return w * b.sum(-1)  # (2,)

    result = Surrogate().run(program)
    result.loss.backward()
    b = result.trace.nodes["b"]["value"].detach()
    expected = (b - 0.5) * (w * b.sum(-1)).unsqueeze(-1)
    torch.testing.assert_close(phi.grad, expected)


def test_state_is_kept_per_site_and_round_trips():
    est = estimators.get("score_function", baseline="moving_average")
    pyro.set_rng_seed(0)
    phi = LOGITS.expand(8, -1).clone().requires_grad_(True)
    for _ in range(3):
        surrogate_loss(toy_program(phi, est)).backward()
    state = est.state_dict()
    assert "b" in state["__sites__"] and state["__sites__"]["b"]["mean"].shape == (8, 1)
    assert not any("baseline" in k for k in pyro.get_param_store().keys())
    other = estimators.get("score_function", baseline="moving_average")
    other.load_state_dict(state)
    torch.testing.assert_close(
        other.state_dict()["__sites__"]["b"]["mean"], state["__sites__"]["b"]["mean"]
    )
    # evaluation mode leaves the state alone
    before = est.state_dict()["__sites__"]["b"]["mean"].clone()
    Surrogate(update=False).loss(toy_program(phi, est))
    torch.testing.assert_close(est.state_dict()["__sites__"]["b"]["mean"], before)


@pytest.mark.parametrize("network", [False, True], ids=["linear", "network"])
def test_learned_baseline_uses_site_input(network):
    torch.manual_seed(0)
    net = None
    if network:
        net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        net = net.double()
    est = estimators.get("score_function", baseline="learned", lr=0.05, network=net)
    x = torch.randn(16, 3, dtype=torch.float64)
    phi = torch.zeros(16, 2, dtype=torch.float64, requires_grad=True)

    def program():
        with pyro.plate("data", 16):
            b = pyro.sample(
                "b",
                dist.Bernoulli(logits=phi).to_event(1),
                infer={"estimator": est, "baseline_input": x},
            )
        return b.sum(-1) + 3 * x[:, 0]

    losses = []
    for _ in range(300):
        phi.grad = None
        surrogate_loss(program)
        learned = est._learned["b"]
        losses.append(float(((3 * x[:, 0] + 1 - learned.predict(x, 0)) ** 2).mean()))
    assert losses[-1] < 0.2 * losses[0]
    kind = est.state_dict()["__learned__"]["b"]["kind"]
    assert kind == ("network" if network else "linear:3")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_program_must_return_a_tensor():
    with pytest.raises(TypeError, match="cost as a Tensor"):
        surrogate_loss(lambda: 3.0)


def test_cost_dims_must_be_plate_dims():
    phi = torch.zeros(3, requires_grad=True)

    def program():
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(logits=phi), infer={"estimator": "score_function"})
        return torch.ones(5) * b.sum()  # (5,) at the plate's dim -1

    with pytest.raises(ValueError, match="plate 'data' has size 3"):
        surrogate_loss(program)


def test_leave_one_out_needs_particles():
    est = estimators.get("score_function", baseline="leave_one_out")
    phi = LOGITS.unsqueeze(0).clone().requires_grad_(True)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        surrogate_loss(toy_program(phi, est))


def test_too_many_exact_units():
    phi = torch.zeros(30, requires_grad=True)

    def program():
        return pyro.sample(
            "b", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": "exact"}
        ).sum()

    with pytest.raises(ValueError, match="max_sites=20"):
        surrogate_loss(program)


# ---------------------------------------------------------------------------------------------
# Statistics: unbiased and biased estimators
# ---------------------------------------------------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("baseline", BASELINES)
def test_score_function_unbiased(baseline, sf_case, stat):
    options, particles = sf_case

    def draw(n, seed):
        # stateful baselines: 20 warm-up steps, then the measured step
        est = estimators.get("score_function", **options)
        calls = 21 if est.stateful else 1
        return per_draw_grads(est, n, seed, calls=calls, particles=particles)

    exact = toy_exact()
    pilot = draw(2000, seed=10)
    n = stat.draws_for_power(pilot.std(0), 0.1 * exact.pow(2).mean().sqrt(), 4)
    assert n <= 400_000, f"variance far above expectation: {n} draws needed"
    n = max(n, 2000)
    stat.assert_unbiased(draw(n, seed=11), exact)


@pytest.mark.statistical
def test_exact_through_plate_is_exact():
    g = per_draw_grads("exact", 1, seed=0)
    torch.testing.assert_close(g[0], toy_exact())


@pytest.mark.statistical
@pytest.mark.parametrize("name", ["straight_through", "sts", "noisy_rectifier"])
def test_surrogate_units_are_biased(name, stat):
    """Against the Bernoulli objective these are biased, and the test must see it."""
    stat.assert_biased(per_draw_grads(name, 20_000, seed=12), toy_exact())


@pytest.mark.statistical
def test_straight_through_mean_is_known(stat):
    """Identity ST on the toy has mean ``2 (p - t)`` per unit."""
    p = torch.sigmoid(LOGITS)
    stat.assert_unbiased(per_draw_grads("straight_through", 20_000, seed=13), 2 * (p - T))


@pytest.mark.statistical
def test_finite_difference_small_step_consistent(stat):
    """Central differences at the pre-activation with shared noise: ``E[g] = (1-2t) p'`` as
    ``eps -> 0``; at ``eps = 0.05`` the smoothing bias is far below the test's resolution."""
    est = estimators.get("finite_difference", eps=0.05)
    g = per_draw_grads(est, 200_000, seed=14)
    eps = 0.05
    target = (1 - 2 * T) * (torch.sigmoid(LOGITS + eps) - torch.sigmoid(LOGITS - eps)) / (2 * eps)
    stat.assert_unbiased(g, target)


# ---------------------------------------------------------------------------------------------
# Training with a torch optimiser: a gated network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gate",
    ["straight_through", "sts", "noisy_rectifier", "score_function[optimal]"],
)
def test_gated_network_trains_with_torch_optimiser(gate):
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    est = (
        estimators.get("score_function", baseline="optimal")
        if gate.startswith("score_function")
        else estimators.get(gate)
    )
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).float()
    gater = torch.nn.Linear(5, 8)
    expert = torch.nn.Linear(5, 8)
    head = torch.nn.Linear(8, 1)
    params = [*gater.parameters(), *expert.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=0.03)

    def program():
        with pyro.plate("data", 64):
            g = pyro.sample("gates", dist.Bernoulli(logits=gater(x)).to_event(1))
            out = head(g * torch.tanh(expert(x))).squeeze(-1)
            return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")

    program = estimator_config(program, {"gates": est})
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = surrogate_loss(program)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / 64)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    assert math.isfinite(last)


def test_condition_makes_site_observed():
    phi = torch.zeros(3, requires_grad=True)

    def program():
        b = pyro.sample(
            "b", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": "score_function"}
        )
        return b.sum()

    with pytest.warns(UserWarning, match="observed site.*'b'"):
        result = Surrogate().run(poutine.condition(program, {"b": torch.ones(3)}))
    assert result.trace.nodes["b"]["is_observed"]
    assert not result.loss.requires_grad  # an observed site has no estimator term
    torch.testing.assert_close(result.cost, torch.tensor(3.0))


# ---------------------------------------------------------------------------------------------
# Forward-only gradients in parameter space
# ---------------------------------------------------------------------------------------------


def test_forward_gradient_finite_difference_is_exact_on_a_quadratic():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)

    def program():
        noise = pyro.sample("noise", dist.Bernoulli(0.5 * torch.ones(2, 2)).to_event(2))
        return (a * w**2).sum() + noise.sum()  # the noise is shared by every run

    mean = forward_gradient(program, [w], estimators.get("finite_difference", eps=0.1))
    torch.testing.assert_close(w.grad, 2 * a * w.detach())
    assert torch.isfinite(mean)


def test_forward_gradient_spsa_in_one_dimension_is_a_central_difference():
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)

    def program():
        u = pyro.sample("u", dist.Normal(0.0, 1.0))  # common random numbers: cancels
        return torch.sin(theta).sum() + u

    c = 0.05
    forward_gradient(program, [theta], estimators.get("spsa", c=c, num_pairs=3))
    expected = (torch.sin(theta + c) - torch.sin(theta - c)) / (2 * c)
    torch.testing.assert_close(theta.grad, expected.detach())


def test_forward_gradient_rejects_site_estimators():
    theta = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="'spsa' or 'finite_difference'"):
        forward_gradient(lambda: theta.sum(), [theta], "straight_through")


# ---------------------------------------------------------------------------------------------
# Subsampled plates: scaled by N / n like Pyro's log-densities
# ---------------------------------------------------------------------------------------------

SUB_PHI = torch.tensor([-1.2, -0.5, 0.1, 0.3, 0.8, -0.2, 1.4, 0.6], dtype=torch.float64)
SUB_T = torch.tensor([0.1, 0.9, 0.4, 0.2, 0.7, 0.5, 0.3, 0.8], dtype=torch.float64)


def subsampled_program(phi, w, estimator, subsample=None, reduce=False):
    """A cost per example, ``w_i (h_i - t_i)^2 + w_i^2``, in a plate of 8 (or a subset)."""

    def program():
        with pyro.plate("data", 8, subsample=subsample) as i:
            h = pyro.sample("h", dist.Bernoulli(logits=phi[i]), infer={"estimator": estimator})
            cost = w[i] * (h - SUB_T[i]) ** 2 + w[i] ** 2
            return cost.sum() if reduce else cost

    return program


def _value_and_grads(program, phi, w):
    phi.grad = w.grad = None
    loss = surrogate_loss(program)
    loss.backward()
    return loss.detach(), phi.grad.clone(), w.grad.clone()


def test_subsampled_plate_is_unbiased_over_all_subsets_exactly():
    """With ``exact`` at the site (no sampling noise), the mean over all C(8, 4) = 70 subsets
    of the value and of the gradients equals the full-data value and gradients."""
    import itertools

    phi = SUB_PHI.clone().requires_grad_(True)
    w = torch.linspace(0.5, 2.0, 8, dtype=torch.float64).requires_grad_(True)
    full = _value_and_grads(subsampled_program(phi, w, "exact"), phi, w)
    subsets = list(itertools.combinations(range(8), 4))
    assert len(subsets) == 70
    sums = [
        torch.zeros_like(full[0]),
        torch.zeros(8, dtype=torch.float64),
        torch.zeros(8, dtype=torch.float64),
    ]
    for idx in subsets:
        program = subsampled_program(phi, w, "exact", subsample=torch.tensor(idx))
        for acc, x in zip(sums, _value_and_grads(program, phi, w)):
            acc += x
    for acc, x in zip(sums, full):
        torch.testing.assert_close(acc / len(subsets), x, rtol=1e-12, atol=1e-12)


def test_subsampled_score_function_term_is_scaled():
    """One subset, fixed seed: each term is ``(N / n) (h_i - p_i) L_i`` (and the value scaled)."""
    phi = SUB_PHI.clone().requires_grad_(True)
    w = torch.ones(8, dtype=torch.float64)
    idx = torch.tensor([1, 2, 5, 7])
    pyro.set_rng_seed(11)
    result = Surrogate().run(subsampled_program(phi, w, "score_function", subsample=idx))
    result.loss.backward()
    h = result.trace.nodes["h"]["value"].detach()
    cost = (h - SUB_T[idx]) ** 2 + 1.0
    expected = torch.zeros(8, dtype=torch.float64)
    expected[idx] = 2.0 * (h - torch.sigmoid(SUB_PHI[idx])) * cost
    torch.testing.assert_close(phi.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.cost, 2.0 * cost.sum())


def test_cost_reduced_over_a_subsampled_plate_is_not_rescaled():
    phi = SUB_PHI.clone().requires_grad_(True)
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 3, 4, 6])
    per_example = _value_and_grads(subsampled_program(phi, w, "exact", subsample=idx), phi, w)
    summed = _value_and_grads(
        subsampled_program(phi, w, "exact", subsample=idx, reduce=True), phi, w
    )
    torch.testing.assert_close(summed[0] * 2.0, per_example[0])
    torch.testing.assert_close(summed[1] * 2.0, per_example[1])
    torch.testing.assert_close(summed[2] * 2.0, per_example[2])
