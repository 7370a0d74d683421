"""REBAR (batched core): unbiasedness, the eta = 0 limit, variance, the conditional draw.

Statistical tests use fixed seeds; each states its false-alarm rate (two-sided z-tests,
Bonferroni over every coordinate and configuration of the test, 1e-4 per test in total).
"""

from __future__ import annotations

import math

import pytest
import torch

from stochgrad import estimators
from stochgrad.estimators.rebar import conditional_pre_activation, logistic_pre_activation
from stochgrad.models.sbn import SBN
from stochgrad.models.toy import Toy

FALSE_ALARM = 1e-4
LOGITS = [-1.5, -0.3, 0.0, 0.8, 2.0]


def z_critical(alpha: float) -> float:
    """Two-sided normal critical value at level ``alpha``."""
    return math.sqrt(2) * torch.special.erfinv(torch.tensor(1 - alpha, dtype=torch.float64)).item()


def toy(dim_logits=LOGITS, target=0.45):
    return Toy(dim=len(dim_logits), target=target, logits=dim_logits, dtype=torch.float64)


CONFIGS = [
    dict(adapt=False, temperature=0.5, eta=1.0),
    dict(adapt=False, temperature=0.1, eta=0.5),
    dict(adapt=False, temperature=2.0, eta=2.0),
    dict(adapt=True),
]


@pytest.mark.slow
def test_rebar_unbiased_on_toy():
    obj = toy()
    exact = obj.exact_grad()["logits"]
    n = 20000
    crit = z_critical(FALSE_ALARM / (len(CONFIGS) * len(LOGITS)))
    for i, opts in enumerate(CONFIGS):
        g = estimators.get("rebar", **opts).estimate(obj, n, seed=100 + i)["logits"]
        z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(n))
        assert z.abs().max().item() < crit, (opts, z)


def test_rebar_eta_zero_is_score_function():
    obj = toy()
    g = estimators.get("rebar", adapt=False, eta=0.0).estimate(obj, 500, seed=3)["logits"]
    sf = estimators.get("score_function", baseline="none").estimate(obj, 500, seed=3)["logits"]
    assert torch.equal(g, sf)


@pytest.mark.slow
def test_rebar_adapted_variance_below_score_function():
    """One-sided z-test on the mean squared error per draw, false alarm 1e-4."""
    obj = toy()
    exact = obj.exact_grad()["logits"]
    n = 5000
    g = estimators.get("rebar").estimate(obj, n, seed=7)["logits"]
    sf = estimators.get("score_function", baseline="none").estimate(obj, n, seed=8)["logits"]
    d_r = ((g - exact) ** 2).sum(1)
    d_s = ((sf - exact) ** 2).sum(1)
    se = math.sqrt(d_r.var().item() / n + d_s.var().item() / n)
    z = (d_s.mean() - d_r.mean()).item() / se
    assert z > z_critical(2 * FALSE_ALARM), z


def test_conditional_draw_marginal_is_logistic_and_consistent():
    """KS test of z~'s marginal against Logistic(a) at rate 1e-4 per logit (3 logits)."""
    gen = torch.Generator().manual_seed(11)
    n = 20000
    for a0 in (-1.0, 0.0, 2.5):
        a = torch.full((n,), a0, dtype=torch.float64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        v = torch.rand(n, generator=gen, dtype=torch.float64)
        z = logistic_pre_activation(a, u)
        b = (z > 0).to(a.dtype)
        zt = conditional_pre_activation(a, b, v)
        assert torch.equal((zt > 0).to(a.dtype), b)
        cdf = torch.sigmoid(zt.sort().values - a0)
        k = torch.arange(1, n + 1, dtype=torch.float64)
        d = torch.maximum(k / n - cdf, cdf - (k - 1) / n).max().item()
        alpha = FALSE_ALARM / 3
        assert d < math.sqrt(-math.log(alpha / 2) / (2 * n)), (a0, d)


def test_conditional_draw_exact_at_extreme_uniforms():
    a = torch.tensor([-30.0, -1.0, 0.0, 1.0, 30.0], dtype=torch.float64)
    for b_val in (0.0, 1.0):
        b = torch.full_like(a, b_val)
        for v_val in (0.0, 1.0 - 2**-53):
            zt = conditional_pre_activation(a, b, torch.full_like(a, v_val))
            assert torch.isfinite(zt).all()
            assert torch.equal((zt > 0).to(a.dtype), b)


def test_rebar_deterministic_and_order_free():
    est = estimators.get("rebar")
    a = est.estimate(toy(), 64, seed=5)["logits"]
    b = est.estimate(toy(), 64, seed=5)["logits"]
    assert torch.equal(a, b)
    small, big = toy(LOGITS), toy(LOGITS + [0.3, -0.7, 1.1])
    one = estimators.get("rebar")
    g5, g8 = one.estimate(small, 32, seed=9), one.estimate(big, 32, seed=9)
    assert torch.equal(g5["logits"], estimators.get("rebar").estimate(small, 32, seed=9)["logits"])
    assert torch.equal(g8["logits"], estimators.get("rebar").estimate(big, 32, seed=9)["logits"])


def test_rebar_state_round_trips_and_cost():
    est = estimators.get("rebar")
    est.estimate(toy(), 8, seed=0)
    other = estimators.get("rebar")
    other.load_state_dict(est.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in est.state_dict().items())
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"eta": 1.0})
    assert est.cost(toy()).evals == 3.0


def test_rebar_bad_options_and_layered_model():
    with pytest.raises(ValueError, match="temperature"):
        estimators.get("rebar", temperature=0.0)
    with pytest.raises(TypeError, match="adapt"):
        estimators.get("rebar", adapt="yes")
    with pytest.raises(ValueError, match="one stochastic layer"):
        estimators.get("rebar", adapt=False).estimate(SBN(), 4, seed=0)


def test_rebar_exact_replay_on_toy():
    """Fixed temperature and eta: the draws recomputed by hand (closed-form f, f', dz~/da)
    from the same stream (per chunk: the uniforms u, then v), to 1e-10."""
    lam, eta, n, chunk, seed = 0.3, 0.7, 50, 20, 20240501
    obj = toy()
    got = estimators.get("rebar", adapt=False, temperature=lam, eta=eta).estimate(
        obj, n, seed=seed, chunk_size=chunk
    )["logits"]
    phi, t = obj.params["logits"].detach(), 0.45
    p = torch.sigmoid(phi)
    gen = torch.Generator().manual_seed(seed)
    parts, done = [], 0
    while done < n:
        m = min(chunk, n - done)
        u = torch.rand(m, phi.numel(), generator=gen, dtype=torch.float64)
        v = torch.rand(m, phi.numel(), generator=gen, dtype=torch.float64)
        b = (u < p).to(torch.float64)
        ut = torch.where(b > 0, v * p, p + v * (1 - p))
        z, zt = phi - torch.logit(u), phi - torch.logit(ut)
        dzt = torch.where(b > 0, 1 - (1 - p) / (1 - ut), 1 - p / ut)
        s, st = torch.sigmoid(z / lam), torch.sigmoid(zt / lam)
        signal = ((b - t) ** 2).sum(1) - eta * ((st - t) ** 2).sum(1)
        ds = 2 * (s - t) * s * (1 - s) / lam
        dst = 2 * (st - t) * st * (1 - st) / lam * dzt
        parts.append(signal.unsqueeze(1) * (b - p) + eta * (ds - dst))
        done += m
    torch.testing.assert_close(got, torch.cat(parts), rtol=1e-10, atol=1e-10)
