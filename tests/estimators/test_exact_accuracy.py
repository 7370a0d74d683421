"""Exact enumeration: per-example enumeration, float64 accumulation, accuracy in float32."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators import exact


def _upcast(obj):
    """The same objective in float64, with its float32 data and parameters cast up exactly."""
    out = copy.copy(obj)
    for k, v in list(vars(obj).items()):
        if isinstance(v, torch.Tensor):
            setattr(out, k, v.detach().double())
    out.params = {k: v.detach().double().requires_grad_(True) for k, v in obj.params.items()}
    return out


def _brute_force_sbn(obj) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``E[L]`` and its gradient in float64, by a plain loop over each example's configurations."""
    p = {k: v.detach().double().requires_grad_(True) for k, v in obj.params.items()}
    x, y = obj.x.double(), obj.y.double()
    h1n, h2n = obj.hidden
    total = torch.zeros((), dtype=torch.float64)
    for b in range(obj.batch):
        for bits in itertools.product([0.0, 1.0], repeat=h1n + h2n):
            h1 = torch.tensor(bits[:h1n], dtype=torch.float64)
            h2 = torch.tensor(bits[h1n:], dtype=torch.float64)
            p1 = torch.sigmoid(x[b] @ p["W1"] + p["b1"])
            p2 = torch.sigmoid(h1 @ p["W2"] + p["b2"])
            q = torch.prod(h1 * p1 + (1 - h1) * (1 - p1)) * torch.prod(
                h2 * p2 + (1 - h2) * (1 - p2)
            )
            cost = ((h2 @ p["W3"] + p["b3"] - y[b]) ** 2).sum()
            total = total + q * cost
    grads = torch.autograd.grad(total, list(p.values()))
    return dict(zip(p, grads)), total.detach()


class _Joint(models.lookup("sbn")):  # type: ignore[misc]
    """The sbn without its declaration of independent examples: enumerated jointly."""

    examples = None


@pytest.mark.parametrize("batch, hidden", [(2, (3, 2)), (3, (2, 2)), (1, (4, 3))])
def test_per_example_and_joint_enumeration_equal_a_float64_brute_force(batch, hidden):
    obj64 = _upcast(models.get("sbn", batch=batch, hidden=hidden))
    want_g, want_e = _brute_force_sbn(obj64)
    joint = _upcast(_Joint(batch=batch, hidden=hidden))
    for o in (obj64, joint):
        g = exact.enumerate_grad(o)
        for k in want_g:
            torch.testing.assert_close(g[k], want_g[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(exact.enumerate_expectation(o), want_e, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "batch, hidden, joint",
    [(2, (5, 4), False), (4, (5, 5), False), (1, (8, 8), True), (2, (4, 4), True)],
)
def test_float32_enumeration_within_1e6_of_float64(batch, hidden, joint):
    """Error relative to the gradient's largest component (all parameters together)."""
    cls = _Joint if joint else models.lookup("sbn")
    obj = cls(batch=batch, hidden=hidden)
    g32 = exact.enumerate_grad(obj)
    g64 = exact.enumerate_grad(_upcast(obj))
    scale = max(float(v.abs().max()) for v in g64.values())
    err = max(float((g32[k].double() - g64[k]).abs().max()) for k in g64) / scale
    assert err <= 1e-6, err
    e32, e64 = exact.enumerate_expectation(obj), exact.enumerate_expectation(_upcast(obj))
    assert abs(float(e32) - float(e64)) <= 1e-6 * abs(float(e64))


def test_chunked_enumeration_equals_one_chunk(monkeypatch):
    obj = _Joint(batch=1, hidden=(4, 3), dtype=torch.float64)
    whole = exact.enumerate_grad(obj)
    monkeypatch.setattr(exact, "ENUM_CHUNK_ELEMENTS", 100)  # many small chunks (< 3 configs)
    chunked = exact.enumerate_grad(obj)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-13, atol=1e-15)


def test_per_example_enumeration_lifts_the_joint_limit():
    # 2 x (8 + 8) = 32 units jointly, 16 per example: enumerable per example only.
    obj = models.get("sbn", batch=2, hidden=(8, 8))
    est = estimators.get("exact")
    assert est.cost(obj).evals == 2**16
    g = est.estimate(obj, 2, seed=0)
    assert set(g) == set(obj.params)
    with pytest.raises(ValueError, match=r"32 binary units.*max_sites=20"):
        exact.enumerate_grad(_Joint(batch=2, hidden=(8, 8)))


def test_a_wrong_example_declaration_is_refused():
    class Bad(models.lookup("sbn")):  # type: ignore[misc]
        examples = 3  # the batch is 2

    with pytest.raises(ValueError, match=r"declares 3 independent examples"):
        exact.enumerate_grad(Bad())
