"""The site protocol is open: an estimator defined here, outside the package, runs through
``estimate()``, ``EstimatorELBO`` and ``surrogate_loss`` without any change to the package.

``ScaledScore(c)`` is the worked example of :mod:`stochgrad.estimators.base`: the score
function with no baseline, its score term scaled by ``c``. With ``c = 1`` it must reproduce
``score_function`` exactly (same seed, same numbers); with ``c = 2`` the score part doubles.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators.base import SurrogateEstimator, hard_sample
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.score_function import bernoulli_log_prob
from stochgrad.estimators.surrogate import surrogate_loss

F64 = torch.float64


class ScaledScore(SurrogateEstimator):  # not registered: the registry stays the package's
    name, unbiased = "scaled_score", "no"
    site_distributions, site_owns_log_q = ("Bernoulli",), True

    def __init__(self, c: float = 2.0):
        self.c = c

    def rule(self, uniforms):
        def rule(name, logits):
            h = hard_sample(logits.detach(), uniforms(name, logits.shape, logits.dtype))
            return h, {"log_prob": bernoulli_log_prob(logits, h)}

        return rule

    def surrogate(self, cost, sites):
        flat = cost.reshape(-1)
        total = flat.sum()
        for s in sites.values():
            w = flat.view(-1, *[1] * (s.value.dim() - 1)).detach()
            total = total + self.c * (s.extra["log_prob"] * w).sum()
        return total

    def site_term(self, record, costs):
        return self.c * (record.log_q() * record.unit_mask() * costs.cost).sum()


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_estimate_matches_score_function_at_c_one_and_scales():
    obj = models.Toy(dim=6, logits=torch.linspace(-1, 1, 6, dtype=F64), dtype=F64)
    ref = estimators.get("score_function").estimate(obj, 40, seed=3)["logits"]
    one = ScaledScore(1.0).estimate(obj, 40, seed=3)["logits"]
    two = ScaledScore(2.0).estimate(obj, 40, seed=3)["logits"]
    torch.testing.assert_close(one, ref, rtol=0, atol=0)
    torch.testing.assert_close(two, 2 * ref, rtol=1e-12, atol=1e-12)  # toy: no pathwise part


PHI = torch.tensor([0.3, -0.7, 1.1], dtype=F64)


def program(phi, est):
    with pyro.plate("data", 2):
        h = pyro.sample(
            "h", dist.Bernoulli(logits=phi.expand(2, 3)).to_event(1), infer={"estimator": est}
        )
    return ((h - 0.4) ** 2).sum(-1) + phi.sum()  # a pathwise part too


def surrogate_grad(est, seed):
    phi = PHI.clone().requires_grad_(True)
    pyro.set_rng_seed(seed)
    surrogate_loss(program, phi, est).backward()
    return phi.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surrogate_loss_matches_score_function_and_scales(seed):
    ref = surrogate_grad("score_function", seed)
    one = surrogate_grad(ScaledScore(1.0), seed)
    torch.testing.assert_close(one, ref, rtol=1e-12, atol=1e-12)
    pathwise = torch.ones(3, dtype=F64) * 2  # d(phi.sum())/dphi summed over two slices
    two = surrogate_grad(ScaledScore(2.0), seed)
    torch.testing.assert_close(two - pathwise, 2 * (ref - pathwise), rtol=1e-12, atol=1e-12)


def model(data):
    z = pyro.sample("z", dist.Bernoulli(torch.tensor([0.4, 0.6], dtype=F64)).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=data)


def guide(data, est):
    phi = pyro.param("phi", torch.tensor([0.2, -0.3], dtype=F64))
    pyro.sample("z", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": est})


def elbo_grad(est, seed):
    pyro.clear_param_store()
    data = torch.tensor(1.3, dtype=F64)
    pyro.set_rng_seed(seed)
    EstimatorELBO().loss_and_grads(model, lambda d: guide(d, est), data)
    return pyro.get_param_store()["phi"].grad.detach().clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elbo_matches_score_function_and_scales(seed):
    ref = elbo_grad("score_function", seed)
    torch.testing.assert_close(elbo_grad(ScaledScore(1.0), seed), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(elbo_grad(ScaledScore(2.0), seed), 2 * ref, rtol=1e-12, atol=1e-12)


def test_distribution_it_does_not_declare_is_refused_with_the_applicable_estimators():
    def prog():
        return pyro.sample("s", dist.Normal(0.0, 1.0), infer={"estimator": ScaledScore()})

    with pytest.raises(TypeError, match=r"site 's' has distribution Normal; estimators that"):
        surrogate_loss(prog)
