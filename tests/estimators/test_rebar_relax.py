"""REBAR and RELAX (batched core): unbiasedness on the toy and on the two-layer ``sbn``, the
eta = 0 and untrained-network limits, variance against the score function, the conditional
draw, exact replays (closed form on the toy, a per-draw plain-torch computation on ``sbn``),
state, determinism and the errors.

Statistical tests use fixed seeds; each states its false-alarm rate (two-sided z-tests,
Bonferroni over every coordinate and configuration of the test, 1e-4 per test in total).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators.base import Rng
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.rebar import (
    WARMUP_DRAWS,
    Rebar,
    conditional_pre_activation,
    logistic_pre_activation,
)
from stochgrad.estimators.surrogate import surrogate_loss
from stochgrad.models.sbn import SBN
from stochgrad.models.toy import Toy

F64 = torch.float64
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


def test_rebar_bad_options():
    with pytest.raises(ValueError, match="temperature"):
        estimators.get("rebar", temperature=0.0)
    with pytest.raises(TypeError, match="adapt"):
        estimators.get("rebar", adapt="yes")


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


# ---------------------------------------------------------------------------------------------
# Several stochastic sites (sbn) and RELAX
# ---------------------------------------------------------------------------------------------


def sbn():
    return SBN(dtype=F64)


def z_max(g, exact):
    n = next(iter(g.values())).shape[0]
    return max(
        ((g[k].mean(0) - exact[k]) / (g[k].std(0) / math.sqrt(n))).abs().max().item() for k in g
    )


SBN_CONFIGS = [
    ("rebar", dict(adapt=False, temperature=0.3, eta=0.5)),
    ("rebar", {}),
    ("relax", {}),
    ("relax", dict(hidden=(8, 4), temperature=1.5, eta=0.0, lr=0.1, warmup_steps=50)),
]


@pytest.mark.slow
def test_layered_rebar_and_relax_unbiased_on_sbn():
    """29 coordinates x 4 configurations, 20000 draws each, against enumeration."""
    obj = sbn()
    exact = obj.exact_grad()
    coords = sum(v.numel() for v in exact.values())
    crit = z_critical(FALSE_ALARM / (len(SBN_CONFIGS) * coords))
    for i, (name, opts) in enumerate(SBN_CONFIGS):
        g = estimators.get(name, **opts).estimate(obj, 20000, seed=300 + i)
        assert z_max(g, exact) < crit, (name, opts)


RELAX_TOY_CONFIGS = [
    {},
    dict(hidden=(8, 4), temperature=0.2, eta=0.3, lr=0.1, warmup_steps=60),
    dict(hidden=(), eta=0.0, warmup_steps=60),  # a linear r alone, no REBAR part
]


@pytest.mark.slow
def test_relax_unbiased_on_toy():
    obj = toy()
    exact = obj.exact_grad()["logits"]
    n = 20000
    crit = z_critical(FALSE_ALARM / (len(RELAX_TOY_CONFIGS) * len(LOGITS)))
    for i, opts in enumerate(RELAX_TOY_CONFIGS):
        g = estimators.get("relax", **opts).estimate(obj, n, seed=200 + i)["logits"]
        z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(n))
        assert z.abs().max().item() < crit, (opts, z)


class _Misused(Rebar):
    """A control variate credited at z but not subtracted at z~: biased (the z-test's power)."""

    name = "misused_for_test"

    def _draw(self, objective, draws, rng):
        def free_form(sites, draws_, runs):
            x = next(iter(sites.values())).extra["value"].reshape(draws_, runs, -1)
            return [(x[:, 1].sum(1), torch.zeros_like(x[:, 1].sum(1)))]

        lt, eta = self.log_temperature.to(F64), self.eta_value.to(F64)
        return self._estimates(objective, draws, rng, lt, eta, False, free_form=free_form)


def test_z_test_rejects_a_mismatched_control_variate():
    """The unbiasedness test has power: the same test at the same level rejects an estimator
    whose control variate differs between its z and z~ terms."""
    obj = toy()
    n = 4000
    g = _Misused(adapt=False).estimate(obj, n, seed=1)["logits"]
    z = (g.mean(0) - obj.exact_grad()["logits"]) / (g.std(0) / math.sqrt(n))
    assert z.abs().max().item() > z_critical(FALSE_ALARM / len(LOGITS))


@pytest.mark.parametrize("make", [toy, sbn], ids=["toy", "sbn"])
def test_untrained_relax_is_rebar_exactly(make):
    """The network's output layer starts at zero and its initialisation does not touch the
    draws' stream: relax without training gives rebar's numbers at the same lambda, eta."""
    obj = make()
    opts = dict(temperature=0.4, eta=0.8)
    a = estimators.get("relax", warmup_steps=0, **opts).estimate(obj, 40, seed=2, chunk_size=16)
    b = estimators.get("rebar", adapt=False, **opts).estimate(obj, 40, seed=2, chunk_size=16)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_relax_trains_its_state_and_is_deterministic_and_order_free():
    small, big = toy(), sbn()
    est = estimators.get("relax", warmup_steps=20)
    a = est.estimate(small, 32, seed=5)["logits"]
    state = est.state_dict()
    assert set(state) == {"log_temperature", "eta", "net"}
    assert [tuple(w.shape) for w in state["net"]] == [(5, 32), (32,), (32, 1), (1,)]
    assert float(state["net"][2].abs().max()) > 0  # the output layer moved off zero
    assert float(state["eta"]) != 1.0 and float(state["log_temperature"]) != math.log(0.5)
    est.estimate(big, 8, seed=1)  # another objective in between: state is per estimate()
    assert [tuple(w.shape) for w in est.state_dict()["net"]][0] == (10, 32)
    b = est.estimate(small, 32, seed=5)["logits"]
    assert torch.equal(a, b)
    assert all(torch.equal(v, w) for v, w in zip(state["net"], est.state_dict()["net"]))
    c = estimators.get("relax", warmup_steps=20).estimate(small, 32, seed=6)["logits"]
    assert not torch.equal(a, c)


def test_relax_state_round_trips_and_checks_shapes():
    est = estimators.get("relax", hidden=4, warmup_steps=3)
    assert est.hidden == (4,)
    est.estimate(toy(), 8, seed=0)
    other = estimators.get("relax", hidden=4)
    other.load_state_dict(est.state_dict())
    got = other.state_dict()
    assert torch.equal(got["eta"], est.state_dict()["eta"])
    assert all(torch.equal(v, w) for v, w in zip(got["net"], est.state_dict()["net"]))
    # the loaded state drives the draws: the same numbers as the trained estimator's own
    g1 = est._draw(toy(), 6, Rng(3))["logits"]
    g2 = other._draw(toy(), 6, Rng(3))["logits"]
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"eta": 1.0})
    with pytest.raises(ValueError, match=r"hidden=\(8,\)"):
        estimators.get("relax", hidden=8).load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="takes 5 inputs.*10 stochastic units"):
        other._draw(sbn(), 2, Rng(0))


def test_relax_bad_options():
    with pytest.raises(ValueError, match="hidden layer width"):
        estimators.get("relax", hidden=(8, 0))
    with pytest.raises(TypeError, match="hidden"):
        estimators.get("relax", hidden="wide")
    with pytest.raises(ValueError, match="lr"):
        estimators.get("relax", lr=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        estimators.get("relax", warmup_steps=-1)
    with pytest.raises(ValueError, match="eta"):
        estimators.get("relax", eta=float("nan"))


def test_costs_count_two_relaxed_runs_per_site():
    for name in ("rebar", "relax"):
        assert estimators.get(name).cost(toy()).evals == 3.0
        assert estimators.get(name).cost(sbn()).evals == 5.0


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_categorical_sites_and_pyro_sites_are_refused_clearly(name):
    cat = models.get("toy_categorical", units=3, categories=4)
    with pytest.raises(TypeError, match=f"{name}.*Bernoulli.*'k'|'k'.*{name}"):
        estimators.get(name).estimate(cat, 4, seed=0)

    def program():
        with pyro.plate("data", 2):
            h = pyro.sample(
                "h",
                dist.Bernoulli(logits=torch.zeros(2, 3)).to_event(1),
                infer={"estimator": name},
            )
        return ((h - 0.4) ** 2).sum(-1)

    def guide():
        program()

    with pytest.raises(TypeError, match=f"site 'h'.*{name}.*cannot act at a Pyro sample site"):
        surrogate_loss(program)
    with pytest.raises(TypeError, match=f"site 'h'.*{name}.*cannot act at a Pyro sample site"):
        EstimatorELBO().differentiable_loss(lambda: None, guide)


@pytest.mark.slow
def test_relax_variance_after_warmup_below_score_function_and_rebar():
    """One-sided z-tests on the squared error per draw (toy, dim 200, t = 0.45), each at false
    alarm 1e-4 / 2. Measured (5000 draws): per-coordinate variance 637 (score function),
    0.766 (rebar), 0.67 (relax, defaults: 100 steps) and 0.25 (relax, 1000 steps)."""
    obj = Toy(dim=200, target=0.45, logits=0.0, dtype=F64)
    exact = obj.exact_grad()["logits"]
    n = 5000

    def sq_err(name, seed, **opts):
        g = estimators.get(name, **opts).estimate(obj, n, seed=seed)["logits"]
        return ((g - exact) ** 2).sum(1)

    def z_lower(a, b):  # evidence that E[a] < E[b]
        se = math.sqrt(a.var().item() / n + b.var().item() / n)
        return (b.mean() - a.mean()).item() / se

    relax, sf = sq_err("relax", 7), sq_err("score_function", 8, baseline="none")
    assert z_lower(relax, sf) > z_critical(FALSE_ALARM)  # one-sided at 1e-4 / 2
    assert sf.mean() / relax.mean() > 100  # measured ~950
    trained, rebar = sq_err("relax", 9, warmup_steps=1000), sq_err("rebar", 10)
    assert z_lower(trained, rebar) > z_critical(FALSE_ALARM)


# ---------------------------------------------------------------------------------------------
# Exact replays
# ---------------------------------------------------------------------------------------------


def mlp_and_input_grad(net, x):
    """``r(x)`` and ``dr/dx`` of a one-hidden-layer tanh network, by hand."""
    w1, c1, w2, c2 = net
    h = torch.tanh(x @ w1 + c1)
    return h @ w2[:, 0] + c2[0], ((1 - h**2) * w2[:, 0]) @ w1.T


def test_relax_exact_replay_on_toy():
    """The measured draws of a trained relax recomputed by hand (closed-form f, f', dz~/da and
    the network's input gradient) from the same stream: the warm-up's chunks (u then v,
    WARMUP_DRAWS each) skipped, then per chunk u then v; to 1e-10."""
    steps, n, chunk, seed, t = 7, 50, 20, 20240502, 0.45
    obj = toy()
    est = estimators.get("relax", hidden=6, warmup_steps=steps, lr=0.2)
    got = est.estimate(obj, n, seed=seed, chunk_size=chunk)["logits"]
    state = est.state_dict()
    lam, eta, net = float(state["log_temperature"].exp()), float(state["eta"]), state["net"]
    assert float(net[2].abs().max()) > 0.01
    phi = obj.params["logits"].detach()
    d = phi.numel()
    p = torch.sigmoid(phi)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2 * steps):
        torch.rand(WARMUP_DRAWS, d, generator=gen, dtype=F64)
    parts, done = [], 0
    while done < n:
        m = min(chunk, n - done)
        u = torch.rand(m, d, generator=gen, dtype=F64)
        v = torch.rand(m, d, generator=gen, dtype=F64)
        b = (u < p).to(F64)
        ut = torch.where(b > 0, v * p, p + v * (1 - p))
        z, zt = phi - torch.logit(u), phi - torch.logit(ut)
        dzt = torch.where(b > 0, 1 - (1 - p) / (1 - ut), 1 - p / ut)
        s, st = torch.sigmoid(z / lam), torch.sigmoid(zt / lam)
        r_s, dr_s = mlp_and_input_grad(net, s)
        r_st, dr_st = mlp_and_input_grad(net, st)
        signal = ((b - t) ** 2).sum(1) - eta * ((st - t) ** 2).sum(1) - r_st
        ds = s * (1 - s) / lam
        dst = st * (1 - st) / lam * dzt
        parts.append(
            signal.unsqueeze(1) * (b - p)
            + eta * (2 * (s - t) * ds - 2 * (st - t) * dst)
            + dr_s * ds
            - dr_st * dst
        )
        done += m
    torch.testing.assert_close(got, torch.cat(parts), rtol=1e-10, atol=1e-10)


def hand_sbn(obj, lam, eta, net, noise):
    """One draw of the layered estimator on ``sbn``, written out in plain torch (no Pyro, no
    batching over runs): the hard run, then for each layer its relaxed runs at z and z~
    (earlier layer hard, later layer relaxed with the same u), differentiated by autograd."""
    u1, v1, u2, v2 = noise
    p = {k: v.detach().clone().requires_grad_(True) for k, v in obj.params.items()}
    x, y = obj.x, obj.y

    def cost(h1, h2):
        return ((h2 @ p["W3"] + p["b3"] - y) ** 2).sum()

    def r(h1, h2):
        if net is None:
            return 0.0
        inp = torch.cat([h1.reshape(-1), h2.reshape(-1)])
        w1, c1, w2, c2 = net
        return (torch.tanh(inp @ w1 + c1) @ w2 + c2)[0]

    def relax(a, u):
        return torch.sigmoid((a - torch.logit(u)) / lam)

    def relax_given(a, b, v):
        q = torch.sigmoid(a)
        return relax(a, torch.where(b > 0, v * q, q + v * (1 - q)))

    def log_prob(a, b):
        return (
            b * torch.nn.functional.logsigmoid(a) + (1 - b) * torch.nn.functional.logsigmoid(-a)
        ).sum()

    a1 = x @ p["W1"] + p["b1"]
    b1 = (u1 < torch.sigmoid(a1.detach())).to(F64)
    a2 = b1 @ p["W2"] + p["b2"]
    b2 = (u2 < torch.sigmoid(a2.detach())).to(F64)
    f_b = cost(b1, b2)
    s1, st1 = relax(a1, u1), relax_given(a1, b1, v1)
    s12, st12 = relax(s1 @ p["W2"] + p["b2"], u2), relax(st1 @ p["W2"] + p["b2"], u2)
    c1_z, c1_zt = eta * cost(s1, s12) + r(s1, s12), eta * cost(st1, st12) + r(st1, st12)
    s2, st2 = relax(a2, u2), relax_given(a2, b2, v2)
    c2_z, c2_zt = eta * cost(b1, s2) + r(b1, s2), eta * cost(b1, st2) + r(b1, st2)
    surrogate = (
        f_b
        + (c1_z - c1_zt)
        + (c2_z - c2_zt)
        + (f_b - c1_zt).detach() * log_prob(a1, b1)
        + (f_b - c2_zt).detach() * log_prob(a2, b2)
    )
    grads = torch.autograd.grad(surrogate, list(p.values()))
    return dict(zip(p, grads))


@pytest.mark.parametrize(
    ("name", "opts", "steps"),
    [
        ("rebar", dict(adapt=False, temperature=0.7, eta=1.3), 0),
        ("relax", dict(hidden=5, warmup_steps=4, lr=0.2), 4),
    ],
)
def test_layered_exact_replay_on_sbn(name, opts, steps):
    """Per chunk and site (h1 then h2), u then v; the warm-up's chunks skipped; to 1e-10."""
    obj = sbn()
    n, chunk, seed = 9, 4, 77
    est = estimators.get(name, **opts)
    got = est.estimate(obj, n, seed=seed, chunk_size=chunk)
    state = est.state_dict()
    lam, eta = float(state["log_temperature"].exp()), float(state["eta"])
    net = state.get("net") or None  # [W_1, c_1, W_out, c_out]
    if net is not None:
        assert float(net[2].abs().max()) > 0.01
    batch, (h1, h2) = obj.batch, obj.hidden
    gen = torch.Generator().manual_seed(seed)

    def chunk_noise(m):
        return [torch.rand(m, batch, h, generator=gen, dtype=F64) for h in (h1, h1, h2, h2)]

    for _ in range(steps):
        chunk_noise(WARMUP_DRAWS)
    want = {k: [] for k in obj.params}
    done = 0
    while done < n:
        m = min(chunk, n - done)
        noise = chunk_noise(m)
        for i in range(m):
            g = hand_sbn(obj, lam, eta, net, [e[i] for e in noise])
            for k in g:
                want[k].append(g[k])
        done += m
    for k in obj.params:
        torch.testing.assert_close(got[k], torch.stack(want[k]), rtol=1e-10, atol=1e-10)
        assert float(got[k].abs().max()) > 0
