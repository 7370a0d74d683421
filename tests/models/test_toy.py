"""The toy objective: closed forms against brute-force enumeration, and its Pyro program."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators.exact import enumerate_expectation, enumerate_grad

F64 = torch.float64


def configs(d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=F64)  # (2^d, d)


def probabilities(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (p**h * (1 - p) ** (1 - h)).prod(-1)


def brute(obj):
    """(configurations, their probabilities, their costs) by hand, float64."""
    p = torch.sigmoid(obj.params["logits"].detach().double())
    h = configs(obj.dim)
    return h, probabilities(h, p), ((h - obj.target) ** 2).sum(-1), p


@pytest.mark.parametrize("logits", [0.0, -2.0, [-1.5, -0.3, 0.0, 0.8, 2.5]])
@pytest.mark.parametrize("target", [0.45, 0.499, 0.1])
def test_exact_grad_closed_form_matches_enumeration(logits, target):
    obj = models.get("toy", dim=5, target=target, logits=logits, dtype=F64)
    closed = obj.exact_grad()["logits"]
    # p (1 - p)(1 - 2t) per unit
    p = torch.sigmoid(obj.params["logits"].detach())
    torch.testing.assert_close(closed, p * (1 - p) * (1 - 2 * target), rtol=1e-14, atol=0)
    # the library's enumeration and a hand one: sum_h q(h) L(h) (h - p)
    torch.testing.assert_close(enumerate_grad(obj)["logits"], closed, rtol=1e-12, atol=1e-15)
    h, q, cost, p = brute(obj)
    hand = (q[:, None] * cost[:, None] * (h - p)).sum(0)
    torch.testing.assert_close(hand, closed, rtol=1e-12, atol=1e-15)
    # and the exact estimator
    g = estimators.get("exact").estimate(obj, 2, seed=0)["logits"]
    torch.testing.assert_close(g, closed.expand(2, -1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("logits", [0.0, [-1.5, -0.3, 0.0, 0.8, 2.5]])
def test_expected_cost_matches_enumeration(logits):
    obj = models.get("toy", dim=5, target=0.3, logits=logits, dtype=F64)
    _, q, cost, _ = brute(obj)
    torch.testing.assert_close(obj.expected_cost(), (q * cost).sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(enumerate_expectation(obj), (q * cost).sum(), rtol=1e-13, atol=0)


def test_exact_grad_is_the_derivative_of_the_expected_cost():
    obj = models.get("toy", dim=4, target=0.2, logits=[-1.0, 0.0, 0.5, 2.0], dtype=F64)
    eps = 1e-5
    fd = []
    for i in range(4):
        plus = models.get(
            "toy",
            dim=4,
            target=0.2,
            dtype=F64,
            logits=(obj.params["logits"].detach() + eps * torch.eye(4, dtype=F64)[i]),
        )
        minus = models.get(
            "toy",
            dim=4,
            target=0.2,
            dtype=F64,
            logits=(obj.params["logits"].detach() - eps * torch.eye(4, dtype=F64)[i]),
        )
        fd.append((plus.expected_cost() - minus.expected_cost()) / (2 * eps))
    torch.testing.assert_close(torch.stack(fd), obj.exact_grad()["logits"], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("logits", [0.0, -1.0, [-2.0, -0.5, 0.0, 1.0]])
def test_optimal_baseline_matches_enumeration(logits):
    obj = models.get("toy", dim=4, target=0.45, logits=logits, dtype=F64)
    h, q, cost, p = brute(obj)
    sq = (h - p) ** 2
    want = (q[:, None] * sq * cost[:, None]).sum(0) / (q[:, None] * sq).sum(0)
    torch.testing.assert_close(obj.optimal_baseline()["b"], want, rtol=1e-12, atol=0)


def single_draw_variance(obj, kind: str) -> float:
    """Exact per-coordinate variance of one draw by brute force over (pairs of) configurations."""
    h, q, cost, p = brute(obj)
    g_star = p * (1 - p) * (1 - 2 * obj.target)
    if kind == "none":
        g = (h - p) * cost[:, None]
        w = q
    elif kind == "oracle":
        sq = (h - p) ** 2
        b = (q[:, None] * sq * cost[:, None]).sum(0) / (q[:, None] * sq).sum(0)
        g = (h - p) * (cost[:, None] - b)
        w = q
    elif kind == "leave_one_out":
        # two independent samples; each uses the other's cost as its baseline
        h1, h2 = h[:, None, :], h[None, :, :]
        c1, c2 = cost[:, None, None], cost[None, :, None]
        g = ((h1 - p) * (c1 - c2) + (h2 - p) * (c2 - c1)) / 2
        g = g.reshape(-1, obj.dim)
        w = (q[:, None] * q[None, :]).reshape(-1)
    else:  # straight-through identity: 2 (h - t), mean 2 (p - t)
        g = 2 * (h - obj.target)
        g_star = 2 * (p - obj.target)
        w = q
    return float((w[:, None] * (g - g_star) ** 2).sum(0).mean())


@pytest.mark.parametrize(
    ("estimator", "baseline", "kind"),
    [
        ("score_function", "none", "none"),
        ("score_function", "oracle", "oracle"),
        ("score_function", "leave_one_out", "leave_one_out"),
        ("straight_through", None, "straight_through"),
    ],
)
@pytest.mark.parametrize(("logits", "target"), [(0.0, 0.45), (-1.3, 0.499), (0.7, 0.1)])
def test_closed_form_variance_matches_brute_force(estimator, baseline, kind, logits, target):
    obj = models.get("toy", dim=5, target=target, logits=logits, dtype=F64)
    opts = {} if baseline is None else {"baseline": baseline}
    got = obj.closed_form_variance(estimator, **opts)
    assert got == pytest.approx(single_draw_variance(obj, kind), rel=1e-9, abs=1e-15)


def test_closed_form_variance_needs_a_shared_logit_and_a_known_case():
    obj = models.get("toy", dim=3, logits=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="share one logit"):
        obj.closed_form_variance("score_function", baseline="none")
    obj = models.get("toy", dim=3)
    with pytest.raises(ValueError, match="no closed form"):
        obj.closed_form_variance("spsa")
    with pytest.raises(ValueError, match="no closed form"):
        obj.closed_form_variance("score_function", baseline="moving_average")


def test_unit_expectation_against_enumeration():
    obj = models.get("toy", dim=4, target=0.3, logits=-0.4, dtype=F64)
    h, q, cost, p = brute(obj)

    def f(hi, r):
        return (hi + 1) * r**2 + hi

    # unit 0: h_0 and R_0 = sum of the other units' (h_j - t)^2
    r0 = ((h[:, 1:] - obj.target) ** 2).sum(-1)
    want = (q * ((h[:, 0] + 1) * r0**2 + h[:, 0])).sum()
    assert float(obj.unit_expectation(f)) == pytest.approx(float(want), rel=1e-12)


def test_program_samples_bernoulli_costs():
    obj = models.get("toy", dim=3, target=0.25, logits=[-1.0, 0.0, 1.0], dtype=F64)
    costs = obj(num_draws=1000)
    assert costs.shape == (1000,)
    # each cost is sum_i (h_i - t)^2 for some h in {0,1}^3
    possible = ((configs(3) - 0.25) ** 2).sum(-1)
    assert torch.isclose(costs[:, None], possible[None, :]).any(1).all()


@pytest.mark.statistical
def test_program_mean_cost_is_the_expected_cost(stat):
    """z-test of the sampled mean cost (false-alarm rate 1e-4)."""
    torch.manual_seed(0)
    obj = models.get("toy", dim=10, target=0.45, logits=-0.7, dtype=F64)
    with torch.no_grad():
        costs = obj(num_draws=50_000)
    stat.assert_unbiased(costs[:, None], obj.expected_cost().reshape(1), 1e-4)


def test_options_and_params():
    obj = models.get("toy", dim=7, target=0.45, logits=0.5)
    assert obj.options() == {"dim": 7, "target": 0.45, "logits": 0.5}
    assert list(obj.params) == ["logits"] and obj.params["logits"].requires_grad
    assert obj.params["logits"].dtype == torch.float32
    mixed = models.get("toy", dim=2, logits=[0.0, 1.0])
    assert mixed.options()["logits"] == [0.0, 1.0]
    # the options rebuild the same objective
    again = models.get("toy", **mixed.options())
    torch.testing.assert_close(again.params["logits"], mixed.params["logits"])


def test_standard_settings():
    rebar = models.get("toy", target=0.45)
    assert rebar.dim == 200
    g = rebar.exact_grad()["logits"]
    torch.testing.assert_close(g, torch.full((200,), 0.25 * 0.1))
    assert float(rebar.expected_cost()) == pytest.approx(200 * (0.5 * 0.55**2 + 0.5 * 0.45**2))
    assert math.isclose(rebar.closed_form_variance("straight_through"), 1.0)


def brute_multi_sample_variance(obj, baseline: str, k: int) -> float:
    """Per-coordinate variance of the K-sample score-function estimate, by brute force."""
    h, q, cost, p = brute(obj)
    g_star = p * (1 - p) * (1 - 2 * obj.target)
    n = len(q)
    idx = torch.cartesian_prod(*[torch.arange(n)] * k).reshape(-1, k)  # (n^K, K)
    hk, ck = h[idx], cost[idx]  # (n^K, K, d), (n^K, K)
    w = q[idx].prod(1)
    if baseline == "leave_one_out":
        b = (ck.sum(1, keepdim=True) - ck) / (k - 1)
    else:
        b = torch.zeros_like(ck)
    g = ((hk - p) * (ck - b)[..., None]).mean(1)  # (n^K, d)
    return float((w[:, None] * (g - g_star) ** 2).sum(0).mean())


@pytest.mark.parametrize(
    ("estimator", "options"),
    [
        ("score_function", {"baseline": "none", "num_samples": 3}),
        ("score_function", {"baseline": "leave_one_out", "num_samples": 3}),
        ("straight_through", {"variant": "sigmoid"}),
        ("score_function", {"baseline": "none", "no_such_option": 1}),
    ],
)
def test_closed_form_variance_does_not_ignore_options(estimator, options):
    """Options a closed form does not model must be refused, or be modelled correctly.

    (A silently ignored ``num_samples`` gives a K-sample estimator the variance of one sample.)
    """
    obj = models.get("toy", dim=3, target=0.3, logits=-0.5, dtype=F64)
    try:
        got = obj.closed_form_variance(estimator, **options)
    except ValueError as err:
        assert any(k in str(err) for k in options), str(err)
        return
    if "no_such_option" in options:
        pytest.fail(f"unknown option accepted, returned {got}")
    if estimator == "straight_through":
        p = float(torch.sigmoid(torch.tensor(-0.5, dtype=F64)))
        want = 4 * p * (1 - p) * (p * (1 - p)) ** 2
    else:
        want = brute_multi_sample_variance(obj, options["baseline"], options["num_samples"])
    assert got == pytest.approx(want, rel=1e-9)


def test_brute_multi_sample_variance_reduces_to_the_single_draw_one():
    obj = models.get("toy", dim=3, target=0.3, logits=-0.5, dtype=F64)
    assert brute_multi_sample_variance(obj, "none", 1) == pytest.approx(
        single_draw_variance(obj, "none"), rel=1e-12
    )
    assert brute_multi_sample_variance(obj, "leave_one_out", 2) == pytest.approx(
        single_draw_variance(obj, "leave_one_out"), rel=1e-12
    )
    assert brute_multi_sample_variance(obj, "none", 3) == pytest.approx(
        single_draw_variance(obj, "none") / 3, rel=1e-12
    )
