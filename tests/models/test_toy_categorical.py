"""The categorical toy: closed form against brute-force enumeration, and its Pyro program."""

from __future__ import annotations

import itertools

import pytest
import torch

from stochgrad import models

F64 = torch.float64


def brute(obj):
    """``E[L]`` as an explicit sum over all ``K^n`` joint configurations (float64, autograd)."""
    theta = obj.params["logits"].detach().double().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)  # (n, K)
    n, k = theta.shape
    ks = torch.tensor(list(itertools.product(range(k), repeat=n)))  # (K^n, n)
    rows = torch.arange(n)
    log_q = logp[rows, ks].sum(-1)  # (K^n,)
    cost = obj.costs.double()[rows, ks].sum(-1)  # (K^n,)
    expectation = (log_q.exp() * cost).sum()
    (grad,) = torch.autograd.grad(expectation, theta)
    return expectation.detach(), grad


@pytest.mark.parametrize("categories", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_matches_enumeration(categories, seed):
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.randn(3, categories, generator=g, dtype=F64)
    costs = torch.rand(3, categories, generator=g, dtype=F64)
    obj = models.get(
        "toy_categorical", units=3, categories=categories, logits=theta, costs=costs, dtype=F64
    )
    expectation, grad = brute(obj)
    torch.testing.assert_close(obj.expected_cost(), expectation, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(obj.exact_grad()["logits"], grad, rtol=1e-12, atol=1e-15)


def test_default_table_with_two_categories_is_the_bernoulli_toy():
    cat = models.get("toy_categorical", units=4, categories=2, dtype=F64)
    toy = models.get("toy", dim=4, dtype=F64)
    torch.testing.assert_close(cat.expected_cost(), toy.expected_cost(), rtol=1e-14, atol=0)
    # d/dtheta_1 with softmax over (theta_0, theta_1) equals d/dphi at phi = theta_1 - theta_0
    torch.testing.assert_close(
        cat.exact_grad()["logits"][:, 1], toy.exact_grad()["logits"], rtol=1e-14, atol=0
    )


def test_program_samples_categories_and_returns_their_costs():
    torch.manual_seed(0)
    obj = models.get("toy_categorical", units=5, categories=3)
    import pyro.poutine as poutine

    tr = poutine.trace(obj).get_trace(7)
    k = tr.nodes["k"]["value"]
    assert k.shape == (7, 5)
    assert int(k.min()) >= 0 and int(k.max()) < 3
    want = obj.costs[torch.arange(5), k.long()].sum(-1)
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], want)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"units": 0}, "units must be an int >= 1"),
        ({"categories": 1}, "categories must be an int >= 2"),
        ({"logits": [0.0, 1.0]}, r"logits must be a scalar or have shape \(10, 4\)"),
        ({"costs": [[1.0]]}, r"costs must have shape \(10, 4\)"),
        ({"logits": float("nan")}, "logits must be finite"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        models.get("toy_categorical", **options)


def test_compare_skips_estimators_without_categorical_support_with_a_note():
    from stochgrad.analysis.compare import run_compare

    table = run_compare(
        ["toy_categorical:units=2,categories=3"],
        ["score_function", "straight_through", "exact"],
        50,
        0,
        progress=False,
        echo=lambda s: None,
    )
    skipped = table.attrs["skipped"]
    assert {s["estimator"] for s in skipped} == {"straight_through"}
    assert {"score_function", "exact"} <= set(table["estimator"])
    for s in skipped:
        assert "'k'" in s["reason"] and "Categorical" in s["reason"]
