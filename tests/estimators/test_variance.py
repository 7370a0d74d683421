"""Measured variance against the toy's closed-form variance, with a CLT confidence interval.

For an estimator with known mean ``mu`` (the exact gradient; ``2 (p - t)`` for
straight-through) the per-draw statistic ``Q_n = (1/d) sum_i (g_ni - mu_i)^2`` is i.i.d. over
draws with ``E[Q_n]`` equal to the average per-coordinate variance -- whatever the correlation
between coordinates. The test builds the two-sided CLT interval ``mean(Q) +- z sd(Q)/sqrt(N)``
at level ``1 - FALSE_ALARM`` (``z = 3.89``) and requires the closed form
(:meth:`Toy.closed_form_variance`) to lie inside. The number of draws comes from a pilot
estimate of ``sd(Q)/mean(Q)`` so that the interval's half-width is at most ``REL_WIDTH`` of the
variance: a 2% error in the formula or the estimator is visible.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from stochgrad import estimators, models

pytestmark = pytest.mark.statistical

FALSE_ALARM = 1e-4  # per comparison (two-sided)
REL_WIDTH = 0.02
MIN_DRAWS = 20_000

# (estimator name, options, closed_form_variance arguments)
CASES = [
    ("score_function", {}, ("score_function", {"baseline": "none"})),
    (
        "score_function",
        {"baseline": "leave_one_out"},
        ("score_function", {"baseline": "leave_one_out"}),
    ),
    (
        "score_function",
        {"baseline": "optimal", "mode": "oracle"},
        ("score_function", {"baseline": "oracle"}),
    ),
    ("straight_through", {}, ("straight_through", {})),
]
IDS = ["sf_none", "sf_loo_k2", "sf_optimal_oracle", "st_identity"]
TOYS = {
    "rebar": dict(dim=200, target=0.45, logits=0.0),
    "relax_shifted": dict(dim=50, target=0.499, logits=-1.0),
}


def known_mean(name: str, obj) -> torch.Tensor:
    if name == "straight_through":
        return 2 * (obj.probs().double() - obj.target)
    return obj.exact_grad()["logits"].double()


def q_statistic(g: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(1/d) sum_i (g_ni - mu_i)^2`` per draw, in float64."""
    return ((g.double() - mean) ** 2).mean(1)


def measure(name, opts, obj, seed):
    """Draws planned from a pilot; returns (mean Q, half-width, draws, SPEC variance)."""
    mu = known_mean(name, obj)
    z = float(stats.norm.isf(FALSE_ALARM / 2))
    pilot = q_statistic(estimators.get(name, **opts).estimate(obj, 4000, seed=seed)["logits"], mu)
    cv = float(pilot.std() / pilot.mean())
    n = max(MIN_DRAWS, math.ceil((1.2 * z * cv / REL_WIDTH) ** 2))
    g = estimators.get(name, **opts).estimate(obj, n, seed=seed + 1)["logits"]
    q = q_statistic(g, mu)
    half = z * float(q.std()) / math.sqrt(n)
    return float(q.mean()), half, n, float(g.double().var(0).mean())


@pytest.mark.parametrize("setting", sorted(TOYS))
@pytest.mark.parametrize(("name", "opts", "closed"), CASES, ids=IDS)
def test_variance_matches_closed_form(name, opts, closed, setting):
    obj = models.get("toy", **TOYS[setting])
    want = obj.closed_form_variance(closed[0], **closed[1])
    got, half, n, spec_var = measure(name, opts, obj, seed=51)
    # float32 arithmetic floor for an exactly constant Q (straight-through at p = 1/2)
    slack = half + 1e-5 * want
    assert abs(got - want) <= slack, (
        f"measured variance {got:.6g} +- {half:.3g} (N={n}, level {1 - FALSE_ALARM}) does not "
        f"cover the closed form {want:.6g}"
    )
    assert half <= REL_WIDTH * want + 1e-12
    # The SPEC's variance (per-coordinate sample variance, averaged) agrees to O(1/N).
    assert spec_var == pytest.approx(got, rel=5 * REL_WIDTH)


def test_closed_forms_order_as_expected():
    """Variance reduction the baselines must achieve on the REBAR toy (deterministic)."""
    obj = models.get("toy", **TOYS["rebar"])
    none = obj.closed_form_variance("score_function", baseline="none")
    loo = obj.closed_form_variance("score_function", baseline="leave_one_out")
    oracle = obj.closed_form_variance("score_function", baseline="oracle")
    assert oracle < loo < none / 1000


def test_learned_baseline_reduces_variance_after_warmup():
    """A warmed-up learned baseline must do about as well as a moving average.

    Both fit the same quantity (E[L], by squared error / by averaging); after the warm-up
    that ``estimate`` performs, the learned one's variance should be within a factor 2 of
    the moving average's on the REBAR toy (``E[L] = 50.5``). Deterministic margin: the
    ratio is ~1 when the baseline has converged and ~5000 when it has not.
    """
    obj = models.get("toy", **TOYS["rebar"])
    ma = estimators.get("score_function", baseline="moving_average")
    learned = estimators.get("score_function", baseline="learned")
    v_ma = float(ma.estimate(obj, 5000, seed=61)["logits"].var(0).mean())
    v_learned = float(learned.estimate(obj, 5000, seed=61)["logits"].var(0).mean())
    assert v_learned <= 2 * v_ma, (
        f"learned baseline variance {v_learned:.4g} vs moving average {v_ma:.4g}: the learned "
        f"baseline is not warmed up (state {learned.state_dict()})"
    )
