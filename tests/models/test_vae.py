"""The Bernoulli VAE: shapes, the ELBO against a hand-written estimator, bounds, training."""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

from stochgrad import estimators
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.handlers import estimator_config
from stochgrad.models.vae import BernoulliVAE, TrainConfig, train


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def small(architecture="linear", **kw):
    torch.manual_seed(0)
    return BernoulliVAE(pixels=12, latents=3, architecture=architecture, hidden=5, **kw)


def data(n=6, pixels=12, seed=1):
    return torch.bernoulli(
        torch.full((n, pixels), 0.4), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("architecture", ["linear", "nonlinear"])
def test_trace_shapes(architecture):
    vae = small(architecture)
    x = data()
    tr = poutine.trace(vae.guide).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (6, 3)
    mtr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
    assert mtr.nodes["x"]["fn"].event_shape == (12,)


def grads(vae):
    return {k: p.grad.clone() for k, p in vae.named_parameters() if p.grad is not None}


def test_elbo_gradient_equals_hand_written_reinforce():
    vae = small("nonlinear", estimator="score_function")
    x = data()
    pyro.set_rng_seed(0)
    tr = poutine.trace(vae.guide).get_trace(x)
    guide = estimator_config(poutine.replay(vae.guide, trace=tr), {"z": "score_function"})
    vae.zero_grad()
    EstimatorELBO().loss_and_grads(vae.model, guide, x)
    ours = grads(vae)
    vae.zero_grad()
    surrogate, _ = vae.reinforce_loss(x, z=tr.nodes["z"]["value"])
    surrogate.backward()
    hand = grads(vae)
    assert ours.keys() == hand.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], hand[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pyro_baseline_runs_under_trace_graph():
    vae = small(pyro_baseline={"use_decaying_avg_baseline": True})
    loss = TraceGraph_ELBO().loss_and_grads(vae.model, vae.guide, data())
    assert math.isfinite(loss)


def test_bound_approaches_exact_log_likelihood():
    """``K = 5000`` samples: within 0.02 nats of the enumerated ``log p(x)`` (the bound's
    deficit is O(1/K), its spread here below 0.005)."""
    vae = small("nonlinear")
    x = data(n=4)
    with torch.no_grad():
        log_joint = [
            vae.log_weights(x, torch.tensor(bits).expand(4, 3))[0]
            for bits in itertools.product([0.0, 1.0], repeat=3)
        ]
    exact = torch.logsumexp(torch.stack(log_joint), 0)  # (4,)
    torch.manual_seed(0)
    many = vae.bound(x, 5000, chunk=2)
    torch.testing.assert_close(many, exact, atol=0.02, rtol=0)


def test_bad_architecture():
    with pytest.raises(ValueError, match="architecture must be one of 'linear', 'nonlinear'"):
        BernoulliVAE(architecture="deep")


@pytest.mark.parametrize(
    "estimator",
    ["score_function", ("score_function", {"baseline": "learned"}), "straight_through"],
    ids=["sf", "learned", "st"],
)
def test_training_improves_the_bound(estimator):
    est = estimator if isinstance(estimator, str) else estimators.get(estimator[0], **estimator[1])
    g = torch.Generator().manual_seed(0)
    proto = (torch.rand(4, 16, generator=g) < 0.5).float()
    x = proto[torch.randint(0, 4, (400,), generator=g)]  # four prototypes
    torch.manual_seed(0)
    vae = BernoulliVAE(pixels=16, latents=4, estimator=est, data_mean=x.mean(0))
    before = float(vae.bound(x[:200], 10).mean())
    rows = train(
        vae,
        x,
        x[:200],
        TrainConfig(epochs=6, batch_size=20, lr=0.03, test_samples=10, eval_size=200),
    )
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert {"train_elbo", "test_elbo", "test_bound", "seconds", "step"} <= set(rows[-1])
    assert rows[-1]["test_bound"] > before + 1.0, (before, rows[-1])
