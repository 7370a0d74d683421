"""The Bernoulli VAE: shapes, the ELBO against a hand-written estimator, bounds, training."""

from __future__ import annotations

import copy
import itertools
import math
import shutil

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


# ---------------------------------------------------------------------------------------------
# The registered objective ``vae`` (batched core) and its seeded trainer
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def digits_only(monkeypatch):
    """Pretend MNIST is absent: the objective falls back to the shipped 8x8 digits."""
    import stochgrad.models.data as data_module

    monkeypatch.setattr(data_module, "default_mnist_path", lambda cwd=None: None)


def tiny_objective(pixels=4, latents=3, batch=2, architecture="linear", seed=3):
    from stochgrad.models.vae_objective import VAE

    torch.manual_seed(seed)
    x = data(n=batch, pixels=pixels, seed=seed)
    vae = BernoulliVAE(
        pixels=pixels, latents=latents, architecture=architecture, hidden=5,
        activation="leaky_relu", data_mean=torch.full((pixels,), 0.3),
        input_mean=torch.full((pixels,), 0.4),
    )  # fmt: skip
    with torch.no_grad():  # a point away from the symmetric initial one
        for p in vae.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return vae, x, VAE.from_module(vae, x)


@pytest.mark.parametrize("architecture", ["linear", "nonlinear"])
def test_objective_cost_equals_pyro_trace_elbo_loss(architecture):
    """Per draw, the cost is -(log p(x|z) + log p(z) - log q(z|x)) summed over the batch:
    exactly Pyro's ``Trace_ELBO`` loss of the BernoulliVAE's model and guide at the same z."""
    from pyro.infer import Trace_ELBO

    vae, x, obj = tiny_objective(pixels=12, latents=4, batch=5, architecture=architecture)
    zs, losses = [], []
    for d in range(3):  # Trace_ELBO's loss, and the z its guide sampled under the same seed
        pyro.set_rng_seed(10 + d)
        zs.append(poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"])
        pyro.set_rng_seed(10 + d)
        losses.append(Trace_ELBO().loss(vae.model, vae.guide, x))
    z = torch.stack(zs)  # (3, batch, latents)
    assert len({tuple(zi.flatten().tolist()) for zi in z}) == 3
    params = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in obj.params.items()}
    costs = poutine.condition(obj.model, data={"z": z})(params)
    assert costs.shape == (3,)
    for d in range(3):
        assert costs[d].item() == pytest.approx(losses[d], rel=1e-5, abs=1e-4)


def test_objective_parameters_are_the_modules():
    vae, _, obj = tiny_objective(architecture="nonlinear")
    assert list(obj.params) == [k for k, _ in vae.named_parameters()]
    for k, p in vae.named_parameters():
        assert torch.equal(obj.params[k], p.detach())
    assert "encoder.2.weight" in obj.params and "prior_logits" in obj.params


def hand_exact_grad(vae, x):
    """Autograd through the enumerated expectation: sum_z q(z|x) (log q - log p(x, z)),
    summed over the batch (each example's 2^latents configurations)."""
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=vae.latents)))
    vae.zero_grad()
    total = 0.0
    for n in range(x.shape[0]):
        xn = x[n : n + 1].expand(configs.shape[0], -1)
        log_p, log_q = vae.log_weights(xn, configs)
        total = total + (log_q.exp() * (log_q - log_p)).sum()
    total.backward()
    return {k: p.grad.clone() for k, p in vae.named_parameters()}


def test_tiny_objective_enumerates_to_the_hand_written_gradient():
    vae, x, obj = tiny_objective()
    exact = obj.exact_grad()
    hand = hand_exact_grad(vae, x)
    for k in hand:
        torch.testing.assert_close(exact[k], hand[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.statistical
@pytest.mark.parametrize(
    "spec", ["score_function", "score_function:baseline=leave_one_out,num_samples=2", "disarm"]
)
def test_unbiased_estimators_match_the_exact_gradient(spec, stat):
    """Bonferroni z-test (family-wise 1e-4, fixed seed) of 20 000 draws against the
    autograd-exact gradient of a tiny enumerable VAE (4 pixels, 3 latents, batch 2)."""
    from stochgrad.analysis.compare import make_estimator

    vae, x, obj = tiny_objective()
    exact = stat.flatten_params(hand_exact_grad(vae, x))
    g = stat.flatten_draws(make_estimator(spec).estimate(obj, 20_000, seed=5))
    stat.assert_unbiased(g, exact)


@pytest.mark.statistical
def test_straight_through_is_biased_on_the_tiny_vae(stat):
    """The same test rejects straight-through (biased): the test can fail."""
    vae, x, obj = tiny_objective()
    exact = stat.flatten_params(hand_exact_grad(vae, x))
    g = stat.flatten_draws(estimators.get("straight_through").estimate(obj, 20_000, seed=5))
    stat.assert_biased(g, exact)


def test_full_size_objective_declares_no_exact_gradient(digits_only, capsys):
    from stochgrad import models

    obj = models.get("vae", batch=50, latents=200)
    assert "8x8 digits" in capsys.readouterr().out
    assert obj.x.shape == (50, 64) and set(obj.x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(NotImplementedError, match="10000 binary latents"):
        obj.exact_grad()
    assert obj(2).shape == (2,)
    assert obj.options()["arch"] == "linear" and obj.reference_draws == 2000


def test_compare_uses_an_estimated_reference_with_capped_draws(digits_only):
    from stochgrad import models
    from stochgrad.analysis.compare import compare, reference_gradient

    obj = models.get("vae", batch=4, latents=8, reference_draws=50)
    mean, se = reference_gradient(obj, seed=0, chunk_elements=10_000)
    assert se is not None and set(mean) == set(obj.params)
    assert all(bool((s > 0).any()) for s in se.values())
    table = compare(obj, ["disarm", "straight_through"], num_draws=20)
    assert set(table["estimator"]) == {"disarm", "straight_through"}
    assert table["draws"].eq(20).all()


def test_objective_checkpoint_is_reproducible_and_cached(digits_only, tmp_path):
    from stochgrad import models

    opts = dict(arch="nonlinear", steps=6, batch=10, latents=5, hidden=7, cache=str(tmp_path))
    a = models.get("vae", **opts)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    b = models.get("vae", **opts)  # loaded from the cache
    shutil.rmtree(tmp_path)
    c = models.get("vae", **opts)  # trained again
    init = models.get("vae", **{**opts, "steps": 0})
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
        assert torch.equal(a.params[k], c.params[k]), k
    assert any(not torch.equal(a.params[k], init.params[k]) for k in a.params)
    assert torch.equal(a.x, init.x)


def test_objective_bad_options(digits_only):
    from stochgrad import models

    with pytest.raises(ValueError, match="arch must be one of linear, nonlinear"):
        models.get("vae", arch="deep")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        models.get("vae", steps=-1)
    with pytest.raises(ValueError, match="unknown estimator|nope"):
        models.get("vae", trainer="nope")


def test_trainer_steps_depend_only_on_seed_and_step(digits_only):
    """Training 4 steps straight, or 2 then 2 more from a saved state, gives equal weights."""
    from stochgrad.models.vae_objective import VAETrainer, load_images, make_vae

    train_x, _, _ = load_images(None, echo=None)

    def trainer():
        vae = make_vae(train_x, "linear", latents=6, seed=1)
        return VAETrainer(vae, train_x, "disarm", batch=10, lr=1e-3, seed=1)

    a = trainer()
    elbos_a = [a.train_step() for _ in range(4)]
    b = trainer()
    elbos_b = [b.train_step() for _ in range(2)]
    state = copy.deepcopy(b.state_dict())
    c = trainer()
    c.load_state_dict(state)
    elbos_b += [c.train_step() for _ in range(2)]
    assert elbos_a == elbos_b
    for (k, p), q in zip(a.vae.named_parameters(), c.vae.parameters()):
        assert torch.equal(p, q), k


def test_objective_loads_a_training_checkpoint(digits_only, tmp_path):
    from stochgrad import models
    from stochgrad.analysis.train_vae import run_train_vae

    run_train_vae(
        ["disarm"], steps=2, eval_every=2, batch=10, latents=5, hidden=7, eval_size=20,
        variance_draws=0, out=tmp_path, plots=False, progress=False, echo=None,
    )  # fmt: skip
    ckpt = tmp_path / "cells" / "disarm" / "seed0.ckpt"
    state = torch.load(ckpt, weights_only=False)["trainer"]["vae"]
    obj = models.get("vae", checkpoint=str(ckpt), batch=10, latents=5, hidden=7)
    for k, v in obj.params.items():
        assert torch.equal(v, state[k]), k
    assert obj.options()["checkpoint"] == str(ckpt)
    with pytest.raises(ValueError, match="not both"):
        models.get("vae", checkpoint=str(ckpt), steps=3)
