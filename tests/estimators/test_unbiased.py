"""Unbiasedness against exact gradients: Bonferroni z-tests with a stated false-alarm rate.

Each test fixes its seed. Family-wise false-alarm rate: ``FALSE_ALARM`` = 1e-4 per test
(two-sided per-coordinate z-tests, Bonferroni over the coordinates and, where a test makes
several comparisons, over those too). The number of draws comes from a pilot run: enough for
power 0.99 to detect a bias of ``DETECT`` x RMS(exact gradient) in any single coordinate.

Score function: every baseline, on the toy and on the stochastic binary network, against the
exact gradient (closed form / enumeration).

Perturbation estimators (SPSA, finite differences, node perturbation) estimate the gradient
of a *smoothed* expected cost. On the toy, with ``F(theta) = sum_i f(theta_i)`` and
``f(a) = t^2 + sigmoid(a) (1 - 2t)``, that target is known in closed form:

- SPSA and central differences: ``E[g_i] = (1 - 2t) [sigmoid(a_i + c) - sigmoid(a_i - c)] / (2c)``
  (cross terms vanish because ``E[Delta_j / Delta_i] = 0`` for ``j != i``);
- node perturbation: ``E[g_i] = (1 - 2t) E[sigmoid'(a_i + xi)]``, ``xi ~ N(0, sigma^2)``
  (Stein's lemma), computed by Gauss-Hermite quadrature.

The tests check the measured mean against that target at every step, that the bias against
the exact gradient is detectable at the largest step and shrinks as the step shrinks, and
that at a small step the estimate is consistent with the exact gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators.score_function import BASELINES, ScoreFunction

pytestmark = pytest.mark.statistical

FALSE_ALARM = 1e-4  # family-wise, per test
DETECT = 0.1  # detectable bias: 10% of the RMS exact gradient, in any one coordinate (power 0.99)

# Options per baseline (``optimal`` in both modes); a new baseline must be added here.
SF_OPTIONS = {
    "none": [{}],
    "moving_average": [{"baseline": "moving_average"}],
    "optimal": [{"baseline": "optimal"}, {"baseline": "optimal", "mode": "oracle"}],
    "leave_one_out": [
        {"baseline": "leave_one_out"},
        {"baseline": "leave_one_out", "num_samples": 4},
    ],
    "learned": [{"baseline": "learned"}],
}
SF_CASES = [opts for b in BASELINES for opts in SF_OPTIONS.get(b, [None])]


def sf_id(opts):
    return ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "baseline=none"


def make(kind):
    if kind == "toy":
        return models.get(
            "toy", dim=6, target=0.2, logits=[-1.0, -0.6, -0.2, 0.2, 0.6, 1.0], dtype=torch.float64
        )
    return models.get("sbn", dtype=torch.float64)


def test_every_baseline_is_tested():
    assert None not in SF_CASES, (
        f"baselines without options here: {set(BASELINES) - set(SF_OPTIONS)}"
    )


@pytest.mark.parametrize("kind", ["toy", "sbn"])
@pytest.mark.parametrize("opts", SF_CASES, ids=[sf_id(o) for o in SF_CASES])
def test_score_function_is_unbiased(stat, kind, opts):
    """Family-wise false-alarm rate 1e-4; power 0.99 against a 10%-of-RMS bias."""
    obj = make(kind)
    exact = stat.flatten_params(obj.exact_grad())
    detectable = DETECT * float(exact.pow(2).mean().sqrt())
    n = stat.planned_draws(lambda: estimators.get("score_function", **opts), obj, detectable, 11)
    g = stat.flatten_draws(estimators.get("score_function", **opts).estimate(obj, n, seed=12))
    stat.assert_unbiased(g, exact)


class LeakyLeaveOneOut(ScoreFunction):
    """A deliberately wrong baseline: the mean of *all* K samples, the current one included."""

    def baseline_for(self, name, site, cost):
        units = site.value.dim() - 1
        return cost.mean(1, keepdim=True).expand_as(cost).reshape(-1, *([1] * units))


@pytest.mark.parametrize("kind", ["toy", "sbn"])
def test_the_unbiasedness_test_catches_a_leaky_baseline(stat, kind):
    """Power check of the procedure above: including the current draw biases by -g/K.

    With K = 2 that bias is half the gradient, well above the detectable size; the test must
    reject. (Fails to reject with probability below 1 - 0.99 when the bias is detectable.)
    """
    obj = make(kind)
    exact = stat.flatten_params(obj.exact_grad())

    def leaky():
        return LeakyLeaveOneOut(baseline="leave_one_out", num_samples=2)

    n = stat.planned_draws(leaky, obj, DETECT * float(exact.pow(2).mean().sqrt()), 11)
    g = stat.flatten_draws(leaky().estimate(obj, n, seed=12))
    stat.assert_biased(g, exact)


def test_exact_is_exactly_the_closed_form():
    obj = make("toy")
    g = estimators.get("exact").estimate(obj, 3, seed=0)["logits"]
    torch.testing.assert_close(g, obj.exact_grad()["logits"].expand(3, -1), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# Perturbation estimators: bias that shrinks with the step
# ---------------------------------------------------------------------------------------------

STEPS = (1.0, 0.5, 0.25)
PERTURBATION = {"spsa": "c", "finite_difference": "eps", "node_perturbation": "sigma"}
TOY_DRAWS = 400_000


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def smoothed_toy_grad(name: str, step: float, obj) -> torch.Tensor:
    """The exact expectation of the estimator on the toy (see the module docstring)."""
    a = obj.params["logits"].detach().double().numpy()
    scale = 1 - 2 * obj.target
    if name in ("spsa", "finite_difference"):
        g = scale * (_sigmoid(a + step) - _sigmoid(a - step)) / (2 * step)
    else:
        x, w = np.polynomial.hermite_e.hermegauss(120)  # weight exp(-x^2 / 2)
        s = _sigmoid(a[:, None] + step * x[None, :])
        g = scale * (s * (1 - s) * w).sum(1) / w.sum()
    return torch.from_numpy(g)


@pytest.mark.parametrize("name", sorted(PERTURBATION))
def test_perturbation_mean_matches_smoothed_gradient_on_toy(stat, name):
    """At every step the mean is the smoothed gradient; the bias shrinks with the step.

    False-alarm rate: 1e-4 in all (Bonferroni over steps and coordinates) for the agreement
    with the smoothed gradient; the bias at the largest step is detected at the same level.
    """
    obj = make("toy")
    exact = stat.flatten_params(obj.exact_grad())
    alpha = FALSE_ALARM / len(STEPS)
    measured = []
    for step in STEPS:
        est = estimators.get(name, **{PERTURBATION[name]: step})
        g = stat.flatten_draws(est.estimate(obj, TOY_DRAWS, seed=21))  # same seed: CRN across steps
        target = smoothed_toy_grad(name, step, obj)
        stat.assert_unbiased(g, target, alpha)
        measured.append(stat.z_test(g, exact, alpha))
    # the smoothing bias itself shrinks with the step ...
    closed = [float((smoothed_toy_grad(name, s, obj) - exact).norm()) for s in STEPS]
    assert closed == sorted(closed, reverse=True)
    # ... and the measured one is significant at the largest step, and falls with the step
    assert measured[0].rejects, measured[0].describe()
    norms = [float(t.bias.norm()) for t in measured]
    assert norms[-1] < norms[0] / 3, norms


@pytest.mark.parametrize(
    ("name", "large", "small", "draws"),
    [("spsa", 1.0, 0.05, 400_000), ("node_perturbation", 1.0, 0.1, 400_000)],
)
def test_perturbation_bias_shrinks_on_sbn(stat, name, large, small, draws):
    """On the network: biased at a large step, consistent with the exact gradient at a small.

    Rejection at the large step and acceptance at the small step, each at level 1e-4/2
    (Bonferroni over coordinates); at the small step the remaining O(step) bias is far below
    the standard error, so the stated rate holds to first order.
    """
    obj = make("sbn")
    exact = stat.flatten_params(obj.exact_grad())
    key = PERTURBATION[name]
    g_large = stat.flatten_draws(estimators.get(name, **{key: large}).estimate(obj, draws, seed=31))
    g_small = stat.flatten_draws(estimators.get(name, **{key: small}).estimate(obj, draws, seed=32))
    t_large = stat.assert_biased(g_large, exact, FALSE_ALARM / 2)
    t_small = stat.assert_unbiased(g_small, exact, FALSE_ALARM / 2)
    assert float(t_small.bias.norm()) < float(t_large.bias.norm())


def test_z_test_helper_is_calibrated(stat):
    """The helper's family-wise rate and power on Gaussian data with a known mean.

    1000 repetitions of a 10-coordinate test at family-wise level 0.05: the number of false
    alarms is Binomial(1000, <= 0.05); the check fails with probability < 1e-4 when calibrated.
    A planned sample size detects its stated bias in >= 99% of repetitions (same bound).
    """
    from scipy import stats as sps

    g = torch.Generator().manual_seed(71)
    reps, d, n = 1000, 10, 200
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    alarms = sum(stat.z_test(x[r], torch.zeros(d), 0.05).rejects for r in range(reps))
    assert alarms <= sps.binom.isf(1e-4, reps, 0.05)
    assert alarms >= sps.binom.ppf(1e-4, reps, 0.05 * 0.9)  # Bonferroni is nearly exact here
    n_planned = stat.draws_for_power(torch.ones(d), 0.2, d, 0.05, 0.99, inflate=1.0)
    shifted = torch.zeros(d, dtype=torch.float64)
    shifted[3] = 0.2
    hits = 0
    for _ in range(200):
        y = torch.randn(n_planned, d, generator=g, dtype=torch.float64) + shifted
        hits += stat.z_test(y, torch.zeros(d), 0.05).rejects
    assert hits >= sps.binom.ppf(1e-4, 200, 0.99)
