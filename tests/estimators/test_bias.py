"""Biased estimators must come out biased, and by exactly the amount their maths says.

On the toy ``sum_i (h_i - t)^2`` each surrogate's mean per unit has a closed form
(``p = sigmoid(a)``, ``s = sqrt(p)``, exact gradient ``p (1 - p)(1 - 2t)``):

- straight-through, identity: ``g = dL/dh = 2 (h - t)``, mean ``2 (p - t)``;
  sigmoid: ``2 (p - t) p (1 - p)``;
- STS, ``h = b s``: ``g = 2 (b s - t) b s (1 - p) / 2``, mean ``(1 - p)(p s - t p)`` with
  ``b ~ Bern(s)`` (paper) or ``p (1 - p)(p - t s)`` with ``b ~ Bern(p)`` (code);
- noisy rectifier ``h = max(0, a + c z)``: ``g = 2 (h - t) 1[a + c z > 0]``, mean
  ``2 [a Phi(a/c) + c phi(a/c) - t Phi(a/c)]`` (Gaussian) or
  ``2 [c softplus(a/c) - t sigmoid(a/c)]`` (logistic).

Each test checks the measured mean against that closed form (false-alarm rate 1e-4,
Bonferroni over coordinates, draws planned for power 0.99 against a bias of 5% of the RMS
mean or 0.01, whichever is larger) and rejects the exact gradient at family-wise level 1e-9
("overwhelming evidence"). On the stochastic binary network the same estimators must reject
the enumerated gradient at level 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from scipy import special, stats

from stochgrad import estimators, models

pytestmark = pytest.mark.statistical

FALSE_ALARM = 1e-4  # agreement with the closed-form mean
OVERWHELMING = 1e-9  # rejection of the exact gradient
DETECT = 0.05  # detectable bias: 5% of the RMS closed-form mean ...
DETECT_FLOOR = 0.01  # ... or 0.01, whichever is larger


def surrogate_mean(name: str, opts: dict, obj) -> torch.Tensor:
    a = obj.params["logits"].detach().double()
    p, t = torch.sigmoid(a), obj.target
    s = p.sqrt()
    if name == "straight_through":
        slope = p * (1 - p) if opts.get("variant") == "sigmoid" else 1.0
        return 2 * (p - t) * slope
    if name == "sts":
        if opts.get("variant", "paper") == "paper":
            return (1 - p) * (p * s - t * p)
        return p * (1 - p) * (p - t * s)
    c = opts.get("scale", 1.0)
    x = (a / c).numpy()
    if opts.get("noise", "gaussian") == "gaussian":
        cdf, pdf = stats.norm.cdf(x), stats.norm.pdf(x)
        return 2 * (
            a * torch.from_numpy(cdf) + c * torch.from_numpy(pdf) - t * torch.from_numpy(cdf)
        )
    return 2 * (c * torch.nn.functional.softplus(a / c) - t * torch.from_numpy(special.expit(x)))


SURROGATES = [
    ("straight_through", {}),
    ("straight_through", {"variant": "sigmoid"}),
    ("sts", {}),
    ("sts", {"variant": "code"}),
    ("noisy_rectifier", {}),
    ("noisy_rectifier", {"scale": 2.0}),
    ("noisy_rectifier", {"noise": "logistic"}),
]
IDS = [n + "".join(f"[{k}={v}]" for k, v in o.items()) for n, o in SURROGATES]


def toy(logits):
    return models.get("toy", dim=6, target=0.45, logits=logits, dtype=torch.float64)


@pytest.mark.parametrize("logits", [-2.0, 0.0, [-2.0, -1.0, 0.0, 0.5, 1.5, 3.0]], ids=str)
@pytest.mark.parametrize(("name", "opts"), SURROGATES, ids=IDS)
def test_surrogate_mean_is_its_closed_form_not_the_gradient(stat, name, opts, logits):
    obj = toy(logits)
    mean = surrogate_mean(name, opts, obj)
    detectable = max(DETECT * float(mean.pow(2).mean().sqrt()), DETECT_FLOOR)
    n = stat.planned_draws(lambda: estimators.get(name, **opts), obj, detectable, seed=41)
    g = stat.flatten_draws(estimators.get(name, **opts).estimate(obj, n, seed=42))
    stat.assert_unbiased(g, mean, FALSE_ALARM)
    exact = obj.exact_grad()["logits"]
    if torch.allclose(mean, exact, rtol=0, atol=1e-12):
        # Sigmoid-variant ST at p = 1/2: 2 (p - t) p (1 - p) = p (1 - p)(1 - 2t) by accident.
        assert name == "straight_through" and opts.get("variant") == "sigmoid" and logits == 0
        return
    stat.assert_biased(g, exact, OVERWHELMING)


def test_straight_through_at_logits_minus_two(stat):
    """The SPEC's headline case: identity ST mean 2(p - t) against p(1-p)(1-2t)."""
    obj = models.get("toy", dim=200, target=0.45, logits=-2.0)
    g = stat.flatten_draws(estimators.get("straight_through").estimate(obj, 20_000, seed=43))
    p = torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64))
    stat.assert_unbiased(g, (2 * (p - 0.45)).expand(200), FALSE_ALARM)
    t = stat.assert_biased(g, obj.exact_grad()["logits"], OVERWHELMING)
    assert float(t.bias.mean()) == pytest.approx(float(2 * (p - 0.45) - p * (1 - p) * 0.1), 1e-2)


SBN_BIASED = [
    ("straight_through", {}),
    ("straight_through", {"variant": "sigmoid"}),
    ("sts", {}),
    ("sts", {"variant": "code"}),
    ("noisy_rectifier", {}),
]


@pytest.mark.parametrize(
    ("name", "opts"),
    SBN_BIASED,
    ids=[n + "".join(f"[{k}={v}]" for k, v in o.items()) for n, o in SBN_BIASED],
)
def test_biased_on_sbn(stat, name, opts):
    """Rejects the enumerated gradient at family-wise level 1e-9 (20k draws)."""
    obj = models.get("sbn", dtype=torch.float64)
    g = stat.flatten_draws(estimators.get(name, **opts).estimate(obj, 20_000, seed=44))
    stat.assert_biased(g, stat.flatten_params(obj.exact_grad()), OVERWHELMING)


@pytest.mark.parametrize("name", estimators.available())
def test_declared_bias_matches_the_registry(name):
    """What each estimator declares (SPEC): score function and exact unbiased, surrogate units
    biased, perturbation estimators unbiased only as the step goes to 0."""
    declared = {
        "score_function": "yes",
        "exact": "yes",
        "straight_through": "no",
        "sts": "no",
        "noisy_rectifier": "no",
        "spsa": "asymptotic",
        "finite_difference": "asymptotic",
        "node_perturbation": "asymptotic",
    }
    cls = estimators.lookup(name)
    assert cls.unbiased in ("yes", "no", "asymptotic")
    if name in declared:
        assert cls.unbiased == declared[name]
