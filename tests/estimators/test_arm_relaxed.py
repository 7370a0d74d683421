"""ARM, DisARM, Gumbel-softmax, ReinMax and Gumbel-Rao: exact moments, bias, Pyro sites.

Statistical tests use fixed seeds; each z-test is two-sided (or one-sided where stated) at a
per-test level making the family-wise false-alarm rate of this file at most 1e-4 (Bonferroni
over the at most 40 comparisons below: |z| > 4.6 per comparison, 2 * P(Z > 4.6) = 4.2e-6).

The 1-D toy ``f(b) = (b - t)^2`` with ``c = f(1) - f(0) = 1 - 2t``, ``p = sigmoid(phi)``,
``m = min(p, 1 - p)``; exact gradient ``c p (1 - p)``.

ARM: ``b = 1[u < p]``, ``b~ = 1[u > 1 - p]``, ``g = (f(b~) - f(b)) (u - 1/2)``. Take
``p >= 1/2`` (the other case is the mirror image u -> 1 - u). For ``u < 1 - p``: b = 1,
b~ = 0, ``g = -c (u - 1/2)``; for ``1 - p < u < p``: b = b~ = 1, ``g = 0``; for ``u > p``:
b = 0, b~ = 1, ``g = c (u - 1/2)``. So

    E[g]   = c [int_p^1 (u - 1/2) du - int_0^{1-p} (u - 1/2) du] = c p (1 - p),
    E[g^2] = 2 c^2 int_p^1 (u - 1/2)^2 du = (2 c^2 / 3) (1/8 - |p - 1/2|^3),
    Var[g] = (2 c^2 / 3) (1/8 - |p - 1/2|^3) - c^2 p^2 (1 - p)^2,

which at ``phi = 0`` is ``c^2 / 12 - c^2 / 16 = c^2 / 48``.

DisARM: ``g = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|)``. With p >= 1/2 the
pair differs exactly when ``u < 1 - p`` or ``u > p`` (probability ``2 m``) and then
``g = c sigmoid(|phi|) / 2``; otherwise ``g = 0``. A two-point law: ``c s / 2`` with
probability ``2 m`` (``s = sigmoid(|phi|) = max(p, 1 - p)``), else 0; mean ``c s m = c p (1-p)``;
variance ``(c s / 2)^2 2 m (1 - 2 m)``, zero at ``phi = 0``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from stochgrad import estimators
from stochgrad.estimators.base import Rng, Uniforms
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.reinmax import reinmax_bernoulli, reinmax_categorical
from stochgrad.estimators.surrogate import Surrogate
from stochgrad.models.toy import Toy

Z = 4.6  # per-comparison threshold (see the module docstring)
N = 200_000
T = 0.45
C = 1 - 2 * T
F64 = torch.float64
PHIS = [-1.5, 0.0, 0.8]


def draws(name, phi, n=N, seed=0, dim=1, **opts):
    toy = Toy(dim=dim, target=T, logits=phi, dtype=F64)
    return estimators.get(name, **opts).estimate(toy, n, seed=seed)["logits"]


def zmean(g, mu):
    return (g.mean(0) - mu) / (g.std(0) / math.sqrt(g.shape[0]))


def var_se(g):
    """Sample variance and its standard error (from the fourth central moment)."""
    d = g - g.mean(0)
    v = (d**2).mean(0)
    return v, ((d**4).mean(0) - v**2).sqrt() / math.sqrt(g.shape[0])


def exact_grad(phi):
    p = 1 / (1 + math.exp(-phi))
    return C * p * (1 - p)


@pytest.mark.slow
@pytest.mark.parametrize("phi", PHIS)
def test_arm_exact_mean_and_variance(phi):
    p = 1 / (1 + math.exp(-phi))
    g = draws("arm", phi, seed=1)[:, 0]
    assert abs(float(zmean(g, exact_grad(phi)))) < Z
    var = (2 * C**2 / 3) * (1 / 8 - abs(p - 0.5) ** 3) - C**2 * p**2 * (1 - p) ** 2
    v, se = var_se(g)
    assert abs(float((v - var) / se)) < Z
    if phi == 0.0:
        assert var == pytest.approx(C**2 / 48, rel=1e-12)


def test_disarm_zero_variance_at_zero_logit():
    g = draws("disarm", 0.0, n=5000)
    assert torch.unique(g).numel() == 1
    assert float(g[0, 0]) == pytest.approx(exact_grad(0.0), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("phi", [-1.5, 0.8])
def test_disarm_two_point_law(phi):
    p = 1 / (1 + math.exp(-phi))
    m, s = min(p, 1 - p), max(p, 1 - p)
    g = draws("disarm", phi, seed=2)[:, 0]
    top = C * s / 2
    on = torch.isclose(g, torch.tensor(top, dtype=F64), rtol=1e-12, atol=0)
    assert bool((on | (g == 0)).all())
    freq = float(on.double().mean())
    assert abs(freq - 2 * m) / math.sqrt(2 * m * (1 - 2 * m) / g.shape[0]) < Z
    assert abs(float(zmean(g, exact_grad(phi)))) < Z


@pytest.mark.slow
def test_disarm_variance_below_arm_every_coordinate():
    """One-sided per coordinate: reject if DisARM's variance exceeds ARM's by > Z se."""
    phi = torch.tensor([-2.0, -0.7, 0.0, 0.3, 1.2, 2.5], dtype=F64)
    ga = draws("arm", phi, n=N, seed=3, dim=6)
    gd = draws("disarm", phi, n=N, seed=4, dim=6)
    va, sa = var_se(ga)
    vd, sd = var_se(gd)
    assert bool(((vd - va) / (sa**2 + sd**2).sqrt() < Z).all())
    # and the inequality is visible, not only not contradicted, in every coordinate
    assert bool(((va - vd) / (sa**2 + sd**2).sqrt() > Z).all())


def test_arm_multi_dim_unbiased_and_num_samples():
    phi = torch.tensor([-1.0, 0.0, 0.5, 1.5, -0.2], dtype=F64)
    p = torch.sigmoid(phi)
    exact = C * p * (1 - p)
    for name in ["arm", "disarm"]:
        g = draws(name, phi, n=40_000, seed=5, dim=5, num_samples=3)
        assert bool((zmean(g, exact).abs() < Z).all()), name
        assert estimators.get(name, num_samples=3).cost(Toy(dim=5)).evals == 6.0


def test_arm_disarm_unbiased_on_sbn():
    """Two dependent layers: z-test against enumeration (``exact``), Bonferroni over the
    coordinates of both estimators at family-wise 1e-4."""
    from statistics import NormalDist

    from stochgrad.models.sbn import SBN

    obj = SBN(dtype=F64)
    exact = estimators.get("exact").estimate(obj, 1, seed=0)
    ncoord = 2 * sum(v.numel() for v in obj.params.values())
    zt = NormalDist().inv_cdf(1 - 1e-4 / (2 * ncoord))
    for name in ["arm", "disarm"]:
        g = estimators.get(name).estimate(obj, 20_000, seed=9)
        for k in g:
            assert bool((zmean(g[k], exact[k][0]).abs() < zt).all()), (name, k)


@pytest.mark.slow
def test_gumbel_softmax_relaxed_is_biased_and_bias_shrinks_with_temperature():
    # At phi = 2 the bias falls monotonically over tau = 1, 0.5, 0.1 (about 0.043, 0.035,
    # 0.009). It need not everywhere: at phi = 1 it is about 0.025 at tau = 1 and 0.028 at
    # tau = 0.5 (measured with these seeds), before it falls to about 0.009 at tau = 0.1.
    phi = 2.0
    ex = exact_grad(phi)
    intervals = []
    for tau in [1.0, 0.5, 0.1]:
        g = draws("gumbel_softmax", phi, seed=6, temperature=tau, variant="relaxed")[:, 0]
        bias = float(g.mean()) - ex
        half = Z * float(g.std()) / math.sqrt(g.shape[0])
        intervals.append((abs(bias) - half, abs(bias) + half))
    assert intervals[0][0] > 0  # biased at tau = 1 (z-test)
    for hi_tau, lo_tau in zip(intervals, intervals[1:]):
        assert lo_tau[1] < hi_tau[0]  # |bias| falls, the intervals separate


def test_gumbel_softmax_straight_through_forward_is_hard():
    est = estimators.get("gumbel_softmax", variant="straight_through", temperature=0.3)
    logits = torch.linspace(-3, 3, 101, dtype=F64).expand(50, -1).requires_grad_(True)
    value, _ = est.rule(Uniforms(Rng(0)))("b", logits)
    assert bool(((value == 0) | (value == 1)).all())
    value.sum().backward()
    assert bool((logits.grad > 0).all())


@pytest.mark.slow
def test_gumbel_rao_same_mean_as_st_gumbel_lower_variance():
    phi, tau = 0.7, 0.5
    gs = draws("gumbel_softmax", phi, seed=7, temperature=tau)[:, 0]
    gr = draws("gumbel_rao", phi, seed=8, temperature=tau, num_samples=10)[:, 0]
    se = math.sqrt(float(gs.var()) / len(gs) + float(gr.var()) / len(gr))
    assert abs(float(gs.mean() - gr.mean())) / se < Z
    vs, ss = var_se(gs)
    vr, sr = var_se(gr)
    assert float((vs - vr) / (ss**2 + sr**2).sqrt()) > Z


def test_reinmax_hand_computed_case():
    """phi = 0, tau = 1: q = (b + 1/2)/2, slope 2 q (1 - q) - 1/8 = 3/8 - 1/8 = 1/4 for both
    b; on the toy d f / d b = 2 (b - t): estimate 0.275 for b = 1, -0.225 for b = 0."""
    g = draws("reinmax", 0.0, n=1000, temperature=1.0)[:, 0]
    assert set(g.tolist()) <= {0.5 * (1 - T), 0.5 * (0 - T)}
    assert len(set(g.tolist())) == 2
    # phi = log 3 (p = 3/4), tau = 2, b = 1: sigmoid(phi/2) = sqrt3/(1+sqrt3), slope by hand
    phi = torch.tensor([math.log(3.0)], dtype=F64, requires_grad=True)
    reinmax_bernoulli(phi, torch.ones(1, dtype=F64), 2.0).sum().backward()
    s = math.sqrt(3) / (1 + math.sqrt(3))
    q = (1 + s) / 2
    assert float(phi.grad) == pytest.approx(2 * q * (1 - q) - 0.75 * 0.25 / 2, rel=1e-12)
    # the categorical form over [phi, 0] gives the same slope for category 1
    theta = torch.stack([phi.detach()[0], torch.zeros((), dtype=F64)]).requires_grad_(True)
    reinmax_categorical(theta, torch.tensor([1.0, 0.0], dtype=F64), 2.0)[0].backward()
    assert float(theta.grad[0]) == pytest.approx(float(phi.grad), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Pyro sites
# ---------------------------------------------------------------------------------------------

LOGITS = torch.tensor([-1.0, -0.3, 0.4, 1.1], dtype=F64)
ALL = ["arm", "disarm", "gumbel_softmax", "reinmax", "gumbel_rao"]


def toy_program(phi, estimator):
    def program():
        with pyro.plate("draws", phi.shape[0]):
            b = pyro.sample(
                "b", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": estimator}
            )
            return ((b - T) ** 2).sum(-1)

    return program


def surrogate_grads(name, n, seed):
    pyro.set_rng_seed(seed)
    phi = LOGITS.expand(n, -1).clone().requires_grad_(True)
    Surrogate().loss(toy_program(phi, name)).backward()
    return phi.grad.detach().clone()


@pytest.mark.parametrize("name", ALL)
def test_surrogate_loss_with_plate_finite_and_replayed(name):
    a = surrogate_grads(name, 64, seed=3)
    b = surrogate_grads(name, 64, seed=3)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_surrogate_loss_unbiased(name):
    g = surrogate_grads(name, 40_000, seed=11)
    p = torch.sigmoid(LOGITS)
    assert bool((zmean(g, C * p * (1 - p)).abs() < Z).all())


def elbo_grads(name, n, seed):
    """A plate of ``n`` data points; guide q(z_i) = Bern(sigmoid(phi)); model p(x|z)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.linspace(-1, 1, n, dtype=F64)
    phi = torch.full((n,), 0.3, dtype=F64, requires_grad=True)

    def model():
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Bernoulli(torch.full((n,), 0.5, dtype=F64)))
            pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=x)

    def guide():
        with pyro.plate("data", n):
            pyro.sample("z", dist.Bernoulli(logits=phi), infer={"estimator": name})

    EstimatorELBO().loss_and_grads(model, guide)
    return phi, x


@pytest.mark.parametrize("name", ALL)
def test_elbo_with_plate(name):
    phi, x = elbo_grads(name, 2000, seed=4)
    g = phi.grad.detach().clone()
    assert bool(torch.isfinite(g).all())
    phi2, _ = elbo_grads(name, 2000, seed=4)
    assert torch.equal(g, phi2.grad)
    if name in ("arm", "disarm"):
        # exact d ELBO-loss / d phi_i per data point: loss_i = E_q[log q(z) - log p(x, z)];
        # f(z) = log q(z) - log p(x|z) - log 1/2 and d/dphi E f = p(1-p)(f(1) - f(0)) + E[d log q]
        # (the last is 0); f(1) - f(0) = logit(p) - (-(x-1)^2 + (x+1)^2)/2 = phi - 2x
        p = torch.sigmoid(torch.tensor(0.3, dtype=F64))
        exact = p * (1 - p) * (0.3 - 2 * x)
        resid = g - exact
        # each data point is one independent draw; the statistic is the mean residual
        assert abs(float(resid.mean() / (resid.std() / math.sqrt(len(resid))))) < Z
