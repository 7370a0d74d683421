"""Exact properties, checked over many inputs with hypothesis (seeds drawn as a strategy).

- straight-through: forward values in {0, 1} and equal to ``1[u < sigmoid(a)]``; backward the
  identity (or the sigmoid slope ``p (1 - p)``);
- a baseline equal to the loss gives a zero estimate (moving average loaded with a
  deterministic loss, leave-one-out and the optimal baseline on a constant cost);
- shapes, dtypes and finiteness of every registered estimator for any size, draws and chunk
  size; same seed, same numbers; ``estimate`` leaves the objective's parameters alone.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stochgrad import estimators, models
from stochgrad.estimators import rebar as rebar_module
from stochgrad.estimators.straight_through import straight_through_value

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])
NAMES = estimators.available()


# The control-variate estimators' warm-up training is tested in test_rebar_relax.py; here a few
# steps keep the properties (which call estimate() dozens of times) fast, and still exercised.
FAST_WARMUP = {"relax": {"warmup_steps": 3}}


def make(name: str) -> estimators.Estimator:
    return estimators.get(name, **FAST_WARMUP.get(name, {}))


def short_warmup():
    """``rebar``'s warm-up (a module constant) cut to 3 steps, within the block."""
    return mock.patch.object(rebar_module, "WARMUP_STEPS", 3)


def single_layer_only(name: str) -> bool:
    """Estimators that refuse models whose site logits depend on other sites (``sbn``)."""
    return bool(getattr(estimators.lookup(name), "single_layer", False))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_toy(seed: int, dim: int, dtype, target: float = 0.45):
    logits = 2 * torch.randn(dim, generator=gen(seed), dtype=torch.float64)
    return models.get("toy", dim=dim, target=target, logits=logits.tolist(), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Straight-through
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    scale=st.floats(0.01, 20.0),
    variant=st.sampled_from(["identity", "sigmoid"]),
    dtype=dtypes,
)
def test_straight_through_value_forward_hard_backward_identity(seed, shape, scale, variant, dtype):
    g = gen(seed)
    logits = (scale * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_(True)
    u = torch.rand(shape, generator=g, dtype=dtype)
    w = torch.randn(shape, generator=g, dtype=dtype)
    v = straight_through_value(logits, u, variant)
    p = torch.sigmoid(logits.detach())
    assert set(v.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(v.detach(), (u < p).to(dtype))
    (grad,) = torch.autograd.grad((v * w).sum(), logits)
    want = w if variant == "identity" else w * p * (1 - p)
    torch.testing.assert_close(grad, want)


@SETTINGS
@given(
    seed=seeds,
    dim=st.integers(1, 12),
    draws=st.integers(1, 30),
    target=st.floats(-1.0, 2.0),
    variant=st.sampled_from(["identity", "sigmoid"]),
)
def test_straight_through_on_toy_is_the_slope_times_dl_dh(seed, dim, draws, target, variant):
    """On the toy ``g = 2 (h - t) * slope`` with ``h`` in {0, 1}: recover ``h`` and check."""
    obj = random_toy(seed, dim, torch.float64, target)
    g = estimators.get("straight_through", variant=variant).estimate(obj, draws, seed=seed)
    p = obj.probs()
    slope = 1.0 if variant == "identity" else p * (1 - p)
    h = g["logits"] / (2 * slope) + target
    assume(bool((slope > 1e-6).all() if variant == "sigmoid" else True))
    torch.testing.assert_close(h, h.round(), rtol=0, atol=1e-6)
    assert set(h.round().unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------
# A baseline equal to the loss gives a zero estimate
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 40), draws=st.integers(1, 40), dtype=dtypes)
def test_moving_average_equal_to_a_deterministic_loss_gives_zero(seed, dim, draws, dtype):
    """With ``t = 1/2`` every ``(h - t)^2 = 1/4``: ``L = d/4`` whatever is sampled.

    ``estimate`` warms the average up from fresh state; with ``decay = 1/2`` every update
    ``m / 2 + L / 2`` of ``m = L`` is exact in floating point, so the baseline is ``L`` exactly.
    """
    obj = random_toy(seed, dim, dtype, target=0.5)
    est = estimators.get("score_function", baseline="moving_average", decay=0.5)
    g = est.estimate(obj, draws, seed=seed)["logits"]
    assert torch.equal(g, torch.zeros_like(g))
    # and the state stays at the loss (up to the rounding of the average's update)
    assert float(est.state_dict()["mean"]) == pytest.approx(dim / 4, rel=1e-6)


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 40), draws=st.integers(1, 40), k=st.integers(2, 5))
def test_leave_one_out_on_a_constant_cost_gives_zero(seed, dim, draws, k):
    obj = random_toy(seed, dim, torch.float64, target=0.5)
    est = estimators.get("score_function", baseline="leave_one_out", num_samples=k)
    g = est.estimate(obj, draws, seed=seed)["logits"]
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 40), draws=st.integers(1, 40))
def test_optimal_baseline_on_a_constant_cost_gives_zero(seed, dim, draws):
    obj = random_toy(seed, dim, torch.float64, target=0.5)
    for mode in ("oracle", "online"):
        est = estimators.get("score_function", baseline="optimal", mode=mode, warmup_draws=100)
        g = est.estimate(obj, draws, seed=seed)["logits"]
        # online: the ratio of two averages of (h-p)^2 L = (h-p)^2 d/4 is d/4 up to rounding
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-10 * dim)


def test_moving_average_loaded_state_does_not_change_estimate():
    """``estimate`` warms up from fresh state: a loaded baseline leaves its draws unchanged."""
    obj = models.get("toy", dim=3, target=0.3, dtype=torch.float64)
    est = estimators.get("score_function", baseline="moving_average", warmup_draws=300)
    est.load_state_dict({"mean": torch.tensor(-50.0, dtype=torch.float64)})
    g = est.estimate(obj, 10, seed=0)["logits"]
    fresh = estimators.get("score_function", baseline="moving_average", warmup_draws=300)
    assert torch.equal(g, fresh.estimate(obj, 10, seed=0)["logits"])


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, seeds -- every registered estimator
# ---------------------------------------------------------------------------------------------


def small_objective(kind: str, seed: int, size: int, dtype):
    if kind == "toy":
        return random_toy(seed, size, dtype)
    return models.get(
        "sbn",
        input_dim=size,
        hidden=(2, 1 + size % 2),
        output_dim=1,
        batch=1,
        seed=seed,
        dtype=dtype,
    )


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    seed=seeds,
    kind=st.sampled_from(["toy", "sbn"]),
    size=st.integers(1, 6),
    draws=st.integers(1, 17),
    chunk=st.one_of(st.none(), st.integers(1, 20)),
    dtype=dtypes,
)
def test_shapes_dtypes_and_finiteness(name, seed, kind, size, draws, chunk, dtype):
    assume(not (kind == "sbn" and single_layer_only(name)))
    obj = small_objective(kind, seed, size, dtype)
    before = {k: v.detach().clone() for k, v in obj.params.items()}
    est = make(name)
    with short_warmup():
        g = est.estimate(obj, draws, seed=seed, chunk_size=chunk)
    assert list(g) == list(obj.params)
    for k, v in obj.params.items():
        assert g[k].shape == (draws, *v.shape)
        assert g[k].dtype == dtype
        assert g[k].device == v.device
        assert not g[k].requires_grad
        assert torch.isfinite(g[k]).all()
        # the objective is left as it was
        assert torch.equal(v.detach(), before[k])
        assert v.grad is None


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(seed=seeds, kind=st.sampled_from(["toy", "sbn"]), chunk=st.integers(1, 25))
def test_same_seed_same_numbers(name, seed, kind, chunk):
    assume(not (kind == "sbn" and single_layer_only(name)))
    obj = small_objective(kind, seed, 4, torch.float64)
    with short_warmup():
        a = make(name).estimate(obj, 23, seed=seed, chunk_size=chunk)
        b = make(name).estimate(obj, 23, seed=seed, chunk_size=chunk)
        assert all(torch.equal(a[k], b[k]) for k in a)
        if name != "exact":
            # enough draws that even rare events (a unit flipped by a small perturbation) differ
            c = make(name).estimate(obj, 500, seed=seed)
            d = make(name).estimate(obj, 500, seed=seed + 1)
            assert any(not torch.equal(c[k], d[k]) for k in c)


@pytest.mark.parametrize("name", NAMES)
def test_cost_declaration(name):
    """Every estimator declares its work per draw (SPEC): evaluations > 0, backwards >= 0."""
    obj = models.get("sbn")
    cost = estimators.get(name).cost(obj)
    assert cost.evals > 0 and cost.backwards >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["toy", "sbn"])
def test_runs_on_the_parameters_device(name, kind):
    """Estimates live on the objective's device; same seed, same numbers there too."""
    obj = models.get(kind, device="cuda")
    a = estimators.get(name).estimate(obj, 64, seed=3)
    b = estimators.get(name).estimate(obj, 64, seed=3)
    for k, v in obj.params.items():
        assert a[k].device == v.device and a[k].shape == (64, *v.shape)
        assert torch.equal(a[k], b[k])
        assert torch.isfinite(a[k]).all()


@pytest.mark.parametrize(
    "opts",
    [
        {"baseline": "moving_average"},
        {"baseline": "optimal"},
        {"baseline": "learned"},
    ],
    ids=lambda o: o["baseline"],
)
def test_state_dict_round_trip_continues_identically(opts):
    """Stateful baselines: the state round-trips; ``estimate`` warms up from fresh state."""
    obj = models.get("sbn", dtype=torch.float64)
    a = estimators.get("score_function", warmup_draws=300, **opts)
    a.estimate(obj, 200, seed=1)
    b = estimators.get("score_function", warmup_draws=300, **opts)
    b.load_state_dict(a.state_dict())
    assert str(b.state_dict()) == str(a.state_dict())
    ga = a.estimate(obj, 150, seed=2, chunk_size=40)
    gb = b.estimate(obj, 150, seed=2, chunk_size=40)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    # a fresh estimator gives the same draws: no state carries over between estimate() calls
    c = estimators.get("score_function", warmup_draws=300, **opts)
    gc = c.estimate(obj, 150, seed=2, chunk_size=40)
    assert all(torch.equal(ga[k], gc[k]) for k in ga)


@pytest.mark.parametrize("name", NAMES)
def test_progress_reports_every_draw_once(name):
    seen: list[int] = []
    obj = models.get("toy", dim=3)
    estimators.get(name).estimate(obj, 23, seed=0, chunk_size=5, progress=seen.append)
    expected = [5, 5, 5, 5, 3] if name != "exact" else [5, 5, 5, 5, 3]
    assert seen == expected


def test_learned_constant_baseline_follows_the_objective_dtype():
    """The learned constant lives in the objective's dtype (no silent rounding to float32)."""
    obj = models.get("toy", dim=5, dtype=torch.float64)
    est = estimators.get("score_function", baseline="learned", warmup_draws=200)
    est.estimate(obj, 10, seed=0)
    module = est.state_dict()["__learned__"]["b"]["module"]
    assert module and all(t.dtype == torch.float64 for t in _tensors(module))
    clone = estimators.get("score_function", baseline="learned")
    clone.load_state_dict(est.state_dict())
    module = clone.state_dict()["__learned__"]["b"]["module"]
    assert all(t.dtype == torch.float64 for t in _tensors(module))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
