"""Tests for the gated network: hand-written replays, sparse == dense, the sparsity controller."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stochgrad import estimators
from stochgrad.estimators.handlers import estimator_config
from stochgrad.estimators.surrogate import Surrogate
from stochgrad.models.conditional import (
    GATE_TYPES,
    ConditionalConfig,
    ConditionalNet,
    PackedExperts,
    SparsityController,
    TrainConfig,
    beta_noise_alpha,
    count_macs,
    dense_expert_output,
    evaluate_top_k,
    expected_noisy_relu,
    gate_type,
    make_optimizer,
    max_norm_,
    sparse_expert_output,
    top_k_mask,
    train,
    tune_threshold,
)
from stochgrad.models.data import Digits, Split

B, D, HID, G, C = 5, 6, 4, 7, 3
CFG = ConditionalConfig(inputs=D, gater_hidden=HID, gates=G, classes=C)


def _net(name: str, seed: int = 0) -> ConditionalNet:
    torch.manual_seed(seed)
    return ConditionalNet(name, CFG)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.rand(B, D, generator=torch.Generator().manual_seed(seed))


def _hand_gates(net: ConditionalNet, a: torch.Tensor, u: torch.Tensor) -> tuple:
    """Gate values and d gate / d logits, written out from the paper's definitions."""
    name = net.gate.name
    p = torch.sigmoid(a)
    if name in ("straight_through", "straight_through_sigmoid", "sbn"):
        h = (u < p).float()
        slope = {
            "straight_through": torch.ones_like(a),
            "straight_through_sigmoid": p * (1 - p),
            "sbn": torch.zeros_like(a),
        }[name]
        return h, slope
    if name == "sts":  # b ~ Bern(sqrt p), h = b sqrt(p); dh/da = b * sqrt(p) (1 - p) / 2
        b = (u < p.sqrt()).float()
        return b * p.sqrt(), b * p.sqrt() * (1 - p) / 2
    if name == "noisy_rectifier":
        z = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
        return torch.relu(a + z), (a + z > 0).float()
    if name == "baseline_rectifier":
        return torch.relu(a), (a > 0).float()
    if name in ("baseline_sigmoid", "baseline_sigmoid_noise"):
        return p, p * (1 - p)
    raise AssertionError(name)


def _replay_noise_and_uniforms(net: ConditionalNet, a: torch.Tensor, seed: int) -> tuple:
    """The random numbers of one pass, drawn by hand in the program's order from ``seed``.

    Order (torch's global generator): the surrogate's per-particle seed (one ``randint``),
    the pre-gate noise (if any), then one uniform per gate at the gate site.
    """
    torch.manual_seed(seed)
    torch.randint(0, 2**62, ())
    gate = net.gate
    if gate.noise == "gaussian":
        a = a + torch.distributions.Normal(torch.zeros(B, G), gate.noise_scale).sample()
    elif gate.noise == "beta":
        alpha = beta_noise_alpha(gate.beta, 0.1)
        n = torch.distributions.Beta(torch.full((B, G), alpha), torch.full((B, G), gate.beta))
        a = a + torch.logit(n.sample())
    return a, torch.rand(B, G)


@pytest.mark.parametrize("name", list(GATE_TYPES))
def test_forward_and_gate_gradient_match_hand_computation(name):
    net = _net(name)
    x, y = _x(), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(7)
    result = net(x, y)
    cost_weights = torch.arange(1.0, C + 1)  # L = sum_n sum_c w_c logits[n, c]
    (result.logits * cost_weights).sum().backward()

    with torch.no_grad():
        a = net.gater_out(torch.tanh(net.gater_hidden(x)))
        a, u = _replay_noise_and_uniforms(net, a, 7)
        h, slope = _hand_gates(net, a, u)
        experts = x @ net.experts.weight.T + net.experts.bias
        logits = (h * experts) @ net.output.weight.T + net.output.bias
        nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        d_gate = (cost_weights @ net.output.weight) * experts  # dL/dh, (batch, gates)
        grad_bias = (d_gate * slope).sum(0)  # dL/d(gater output bias)
    torch.testing.assert_close(result.gate_logits.detach(), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.gates.detach(), h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.logits.detach(), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.nll.detach(), nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.objective.detach(), nll.mean(), atol=1e-5, rtol=1e-5)
    grad = net.gater_out.bias.grad  # None for the score-function gate: no pathwise gradient
    grad = torch.zeros(G) if grad is None else grad
    torch.testing.assert_close(grad, grad_bias, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("protocol", ["spec", "original"])
def test_score_function_gate_gradient_matches_hand_computation(protocol):
    """Theorem 1 with the optimal baseline built from earlier minibatches only.

    The toolkit keeps the online baseline per gate, averaged over the minibatch (Eq. 10):
    ``b = EMA[mean_batch (h-p)^2 L] / EMA[mean_batch (h-p)^2]``, decay 0.9, first value as is.
    The gradient is ``(h - p)(L_n - b)`` averaged over the minibatch (``spec``) or, as the
    authors' code trains the SBN, summed over it (``original``); the baseline is the same.
    """
    from stochgrad.models.conditional import original_gate

    torch.manual_seed(0)
    net = ConditionalNet(original_gate("sbn") if protocol == "original" else "sbn", CFG)
    assert isinstance(net.estimator, estimators.ScoreFunction)
    reduce = (lambda t: t.sum(0)) if protocol == "original" else (lambda t: t.mean(0))
    x, y = _x(), torch.tensor([0, 1, 2, 0, 1])
    baseline = torch.zeros(B, G)
    num = den = None
    for step in range(3):
        net.zero_grad()
        torch.manual_seed(100 + step)
        result = net(x, y)
        result.objective.backward()
        with torch.no_grad():
            p = torch.sigmoid(result.gate_logits)
            h = result.gates
            nll = result.nll
            expected = reduce((h - p) * (nll[:, None] - baseline))
            torch.testing.assert_close(net.gater_out.bias.grad, expected, atol=1e-5, rtol=1e-4)
            sq = (h - p) ** 2
            new_num = (sq * nll[:, None]).mean(0, keepdim=True)  # (1, gates)
            new_den = sq.mean(0, keepdim=True)
            decay = net.estimator.decay
            num = new_num if num is None else decay * num + (1 - decay) * new_num
            den = new_den if den is None else decay * den + (1 - decay) * new_den
            baseline = num / den.clamp_min(torch.finfo(den.dtype).tiny)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(["straight_through", "straight_through_sigmoid", "sbn"]),
)
def test_binary_gates_are_exactly_zero_or_one(seed, name):
    net = _net(name, seed % 1000)
    torch.manual_seed(seed)
    result = net(_x(seed % 997) * 10 - 5, torch.zeros(B, dtype=torch.long))
    values = result.gates.detach()
    assert torch.all((values == 0) | (values == 1))


def test_gates_are_pyro_sample_sites_with_the_estimator_annotation():
    net = _net("straight_through")
    x, y = _x(), torch.zeros(B, dtype=torch.long)
    run = Surrogate().run(net.program, x, y)
    site = run.trace.nodes["gates"]
    assert site["type"] == "sample" and not site["is_observed"]
    assert site["infer"]["estimator"] is net.estimator
    assert isinstance(site["fn"].base_dist, torch.distributions.Bernoulli)
    assert site["value"].shape == (B, G)
    pyro.clear_param_store()
    trace = pyro.poutine.trace(net.model).get_trace(x, y)  # the generative model, stock Pyro
    assert trace.nodes["y"]["is_observed"] and trace.nodes["gates"]["value"].shape == (B, G)
    assert trace.nodes["gates"]["infer"]["estimator"] is net.estimator
    pyro.clear_param_store()


def test_handler_overrides_the_gate_annotation():
    net = _net("sts")
    with estimator_config(config={"gates": "straight_through"}):
        values = net(_x(), torch.zeros(B, dtype=torch.long)).gates.detach()
    assert torch.all((values == 0) | (values == 1))  # STS values would be sqrt(p) < 1


def test_estimator_annotation_accepts_registry_name():
    net = _net("straight_through")
    net.estimator = "straight_through"
    values = net(_x(), torch.zeros(B, dtype=torch.long)).gates.detach()
    assert torch.all((values == 0) | (values == 1))


def test_gate_type_errors_and_sizes():
    with pytest.raises(ValueError, match="unknown gate type 'nope'; valid: noisy_rectifier"):
        gate_type("nope")
    assert ConditionalNet("baseline_sigmoid").units == 200
    full = ConditionalNet("straight_through")
    assert (full.experts.weight.shape, full.gater_out.weight.shape) == ((2000, 784), (2000, 400))
    assert full.gater_hidden.weight.shape == (400, 784) and full.output.weight.shape == (10, 2000)


def test_beta_noise_mode():
    alpha = beta_noise_alpha(40.0, 0.1)
    assert (alpha - 1) / (alpha + 40 - 2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="beta > 1"):
        beta_noise_alpha(1.0)


# ------------------------------------------------------------------------- sparse inference


def _gates_at_density(batch: int, experts: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, experts, generator=gen)
    values = 0.5 + torch.rand(batch, experts, generator=gen)  # non-binary gate values
    thr = tune_threshold(scores, density)
    return values * (scores > thr).float()


@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("method", ["gather", "csr", "auto"])
def test_sparse_equals_dense(density, batch, method):
    layers = PackedExperts.random(
        inputs=40, experts=120, classes=10, generator=torch.Generator().manual_seed(0)
    )
    x = torch.rand(batch, 40, generator=torch.Generator().manual_seed(1))
    gates = _gates_at_density(batch, 120, density, seed=2)
    assert abs(float((gates != 0).float().mean()) - density) <= 1 / (batch * 120)
    dense = dense_expert_output(x, gates, layers)
    sparse = sparse_expert_output(x, gates, layers, method=method)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    if density == 0.0:
        torch.testing.assert_close(sparse, layers.b_o.expand(batch, -1))


@pytest.mark.parametrize("name", ["straight_through", "sts", "noisy_rectifier", "baseline_sigmoid"])
def test_sparse_path_of_trained_shape_network(name):
    net = _net(name)
    x = torch.rand(12, D, generator=torch.Generator().manual_seed(3))
    thr = tune_threshold(net.gate_scores(x), 0.3) if net.gate.thresholded else None
    logits, g = net.predict_logits(x, thr)
    sparse = sparse_expert_output(x, g, net.packed())
    torch.testing.assert_close(sparse, logits, atol=1e-5, rtol=1e-5)


def test_sparse_errors():
    layers = PackedExperts.random(inputs=4, experts=5, classes=2)
    with pytest.raises(ValueError, match="method must be one of"):
        sparse_expert_output(torch.zeros(1, 4), torch.zeros(1, 5), layers, method="magic")
    with pytest.raises(ValueError, match=r"expected x \(batch, 4\) and gates \(batch, 5\)"):
        sparse_expert_output(torch.zeros(1, 4), torch.zeros(2, 5), layers)


def test_count_macs():
    gates = torch.zeros(3, 2000)
    gates[0, :200] = 1.0
    gates[2, :20] = 0.3
    per = 784 + 1 + 10
    assert count_macs(gates, 784, 10, "dense") == 3 * 2000 * per
    assert count_macs(gates, 784, 10, "sparse") == 220 * per
    with pytest.raises(ValueError, match="path must be"):
        count_macs(gates, 784, 10, "fast")


def test_tune_threshold_and_test_time_density():
    scores = torch.rand(100, 50, generator=torch.Generator().manual_seed(0))
    for density in (0.0, 0.1, 0.37, 1.0):
        thr = tune_threshold(scores, density)
        assert int((scores > thr).sum()) == round(density * scores.numel())
    with pytest.raises(ValueError, match="density must be in"):
        tune_threshold(scores, 1.5)


def test_max_norm():
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])
    max_norm_(w, 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.6], [0.6, 0.8], [0.0, 0.0]]))


# ------------------------------------------------------------------------- sparsity control


def test_controller_moves_lambda_in_the_right_direction():
    c = SparsityController("kl", start=1e-5)
    assert c.update(0.5) == pytest.approx(1.1e-5)
    assert c.update(0.105) == pytest.approx(1.1e-5)  # inside the band: unchanged
    assert c.update(0.02) == pytest.approx(0.99e-5)
    high = SparsityController(start=1.0)
    assert high.update(0.9) == 1.0  # clipped at 1
    low = SparsityController(start=1e-13)
    assert low.update(0.0) == 1e-13  # clipped at 1e-13
    with pytest.raises(ValueError, match="kind must be"):
        SparsityController("l2")


def test_controller_penalties():
    c = SparsityController("kl", target=0.1, start=0.5)
    p = torch.tensor([0.1, 0.5])
    expected = -0.5 * (0.1 * torch.log(p) + 0.9 * torch.log(1 - p)).sum()
    torch.testing.assert_close(c.penalty(p), expected)
    l1 = SparsityController("l1", start=0.5)
    torch.testing.assert_close(l1.penalty(torch.tensor([1.0, -2.0])), torch.tensor(1.5))


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_controller_converges_to_target_density(kind):
    """Gates pulled open by a task loss; the adaptive penalty brings the density to 0.1 +- 0.01.

    KL: straight-through gates and a task rewarding every open gate (weight 1e-3, so that the
    equilibrium ``p = s + w / λ`` is reachable with λ <= 1). L1: noisy rectifier gates and a
    task pulling each gate's mean value to 0.5 (equilibrium ``h̄ = 0.5 - λ / 2``).
    """
    gen = torch.Generator().manual_seed(0)
    units, batch = 200, 32
    theta = torch.zeros(units, requires_grad=True)  # logits / pre-activations
    opt = torch.optim.SGD([theta], lr=0.5)
    controller = SparsityController(kind)
    densities, lams = [], []
    for _ in range(600):
        a = theta.expand(batch, units)
        if kind == "kl":
            u = torch.rand(batch, units, generator=gen)
            p = torch.sigmoid(a)
            h = (u < p).float() + a - a.detach()  # straight-through gates
            task = -1e-3 * h.mean(0).sum()
            stat = p.mean(0)
        else:
            z = torch.randn(batch, units, generator=gen)
            h = torch.relu(a + z)  # noisy rectifier gates
            task = ((h.mean(0) - 0.5) ** 2).sum()
            stat = h.mean(0)
        loss = task + controller.penalty(stat)
        opt.zero_grad()
        loss.backward()
        opt.step()
        density = float((h.detach() != 0).float().mean())
        lams.append(controller.lam)
        controller.update(density)
        densities.append(density)
    assert lams[50] > lams[0]  # started at density 0.5: λ went up
    late = torch.tensor(densities[-200:]).mean().item()
    assert abs(late - 0.1) <= 0.01, (late, controller.lam)


# ------------------------------------------------------------------------- training


def _tiny_digits(n_train=64, n_valid=32, n_test=29, seed=0) -> Digits:
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, C, (n,), generator=gen)
        x = torch.rand(n, D, generator=gen) * 0.2
        x[torch.arange(n), y] += 1.0  # a learnable signal
        return Split(x.clamp(0, 1), y)

    return Digits(split(n_train), split(n_valid), split(n_test), "synthetic", None, (2, 3), None)


@pytest.mark.parametrize("name", list(GATE_TYPES))
def test_train_runs_and_selects_the_best_epoch(name):
    net = _net(name)
    rows = []
    result = train(
        net,
        _tiny_digits(),
        TrainConfig(epochs=3, batch_size=8, progress=False),
        on_epoch=rows.append,
    )
    assert len(result.history) == 3 and rows == result.history
    best = min(range(3), key=lambda i: result.history[i]["valid_error"])
    assert result.best_epoch == best + 1
    assert result.valid_error == result.history[best]["valid_error"]
    assert 0 <= result.test_error <= 1 and math.isfinite(result.train_criterion)
    assert 0 <= result.test_error_stochastic <= 1 and 0 < result.test_density_stochastic <= 1
    test = _tiny_digits().test
    top_k = evaluate_top_k(net, test.x, test.y)
    if net.gate.thresholded:
        assert result.test_error_top_k == top_k
    else:
        assert result.test_error_top_k == result.test_error
    if net.gate.thresholded:
        assert result.threshold is not None and 0 < result.test_density < 0.6
    else:
        assert result.threshold is None and result.test_density == 1.0
    for layer in (net.gater_hidden, net.gater_out, net.experts, net.output):
        assert float(layer.weight.detach().norm(dim=1).max()) <= 2.0 + 1e-5


@pytest.mark.parametrize("name", ["straight_through", "sts", "sbn", "noisy_rectifier"])
def test_interrupted_training_resumes_to_the_same_numbers(name, tmp_path):
    """Two epochs, stop, then two more from the checkpoint == four epochs in one go."""
    data, ckpt = _tiny_digits(), tmp_path / "run.ckpt"
    config = TrainConfig(epochs=4, batch_size=8, progress=False)
    whole = train(_net(name), data, config)
    train(_net(name), data, TrainConfig(epochs=2, batch_size=8, progress=False), checkpoint=ckpt)
    rows: list = []
    resumed_net = _net(name, seed=123)  # its own initialisation is overwritten by the checkpoint
    torch.manual_seed(999)  # as is the global generator
    resumed = train(resumed_net, data, config, on_epoch=rows.append, checkpoint=ckpt)
    assert [r["epoch"] for r in rows] == [3, 4]  # only the new epochs are reported
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in whole.history]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == strip
    assert (resumed.best_epoch, resumed.test_error) == (whole.best_epoch, whole.test_error)
    for k, v in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k
    # A finished checkpoint asked for no more epochs trains nothing and gives the same result.
    again = train(_net(name), data, config, on_epoch=rows.append, checkpoint=ckpt)
    assert len(rows) == 2 and again.test_error == whole.test_error


def test_train_uses_a_given_sparsity_controller():
    controller = SparsityController("kl", start=0.5, high=0.5, low=0.5)  # λ pinned at 0.5
    result = train(
        _net("straight_through"),
        _tiny_digits(),
        TrainConfig(epochs=1, batch_size=8, progress=False),
        controller=controller,
    )
    assert result.history[0]["lambda"] == 0.5  # the default controller starts at 1e-5


def test_optimizer_settings_follow_the_gate_type():
    sbn = make_optimizer(_net("sbn"), TrainConfig())
    assert [g["lr"] for g in sbn.param_groups] == [0.001, 0.1]
    sts = make_optimizer(_net("sts"), TrainConfig())
    assert sts.defaults["momentum"] == 0.5
    st_ = make_optimizer(_net("straight_through"), TrainConfig())
    assert [g["lr"] for g in st_.param_groups] == [0.1, 0.1] and st_.defaults["momentum"] == 0


def test_expected_noisy_relu_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([-2.0, 0.0, 1.5])
    z = torch.randn(200_000, 3, generator=gen)
    mc = torch.relu(a + 0.7 * z).mean(0)  # sd of each mean < 0.002: a 5e-3 window is > 2.5 sd
    torch.testing.assert_close(expected_noisy_relu(a, "gaussian", 0.7), mc, atol=5e-3, rtol=0)
    torch.testing.assert_close(
        expected_noisy_relu(a, "logistic", 1.0), torch.nn.functional.softplus(a)
    )


def test_top_k_mask_and_evaluation():
    scores = torch.rand(6, 40, generator=torch.Generator().manual_seed(0))
    mask = top_k_mask(scores, 0.1)
    assert mask.sum(1).tolist() == [4.0] * 6
    assert torch.all(
        scores[mask.bool()].view(6, 4).min(1).values >= scores.topk(4, 1).values[:, -1]
    )
    assert top_k_mask(scores, 0.0).sum() == 0
    net = _net("straight_through")
    data = _tiny_digits()
    err = evaluate_top_k(net, data.test.x, data.test.y, 0.3)
    assert 0 <= err <= 1


# -- the original protocol ----------------------------------------------------------------------


def test_original_initialisation_ranges():
    from stochgrad.models.conditional import init_original_

    torch.manual_seed(0)
    cfg = ConditionalConfig(inputs=30, gater_hidden=20, gates=40, classes=10)
    for name, softmax, gater_gain in [
        ("straight_through", 0.05, 4.0),
        ("sbn", 0.05, 4.0),
        ("sts", 0.005, 4.0),
        ("baseline_rectifier", 0.005, 1.0),
    ]:
        net = init_original_(ConditionalNet(name, cfg))
        for layer, gain in [
            (net.experts, 1.0),
            (net.gater_hidden, 1.0),
            (net.gater_out, gater_gain),
        ]:
            bound = gain * math.sqrt(6.0 / sum(layer.weight.shape))
            w = layer.weight
            assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound, (name, layer)
        assert net.output.weight.abs().max() <= softmax
        assert net.output.weight.abs().max() > 0.8 * softmax
        for layer in (net.experts, net.gater_hidden, net.gater_out, net.output):
            assert torch.count_nonzero(layer.bias) == 0
    net = init_original_(ConditionalNet("noisy_rectifier", cfg))
    nonzero = (net.gater_out.weight != 0).sum(1)  # per gate unit
    assert torch.equal(nonzero, torch.full((40,), 15))


def test_original_max_norm_leaves_the_softmax_alone():
    torch.manual_seed(0)
    net = ConditionalNet("straight_through", CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(50.0)
    before = net.output.weight.clone()
    net.max_norm_(2.1, output=False)
    for layer in (net.gater_hidden, net.gater_out, net.experts):
        norms = layer.weight.norm(dim=1)
        assert norms.max() <= 2.1 + 1e-5 and norms.max() > 2.0
    assert torch.equal(net.output.weight, before)
    net.max_norm_(2.1)
    assert net.output.weight.norm(dim=1).max() <= 2.1 + 1e-5


def test_original_controllers():
    from stochgrad.models.conditional import make_controller

    cfg = TrainConfig(protocol="original")
    for name, lam in [("straight_through", 0.1), ("sts", 0.001), ("sbn", 1.0)]:
        c = make_controller(ConditionalNet(name, CFG), cfg)
        assert c is not None and c.lam == lam
        for density in (0.9, 0.0, 0.5, 0.1):
            assert c.update(density) == lam  # fixed λ does not move
    c = make_controller(ConditionalNet("baseline_rectifier", CFG), cfg)
    assert c is not None and c.kind == "l1" and c.lam == 1e-5
    h = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 0.0]])  # (batch, gates)
    penalty = c.penalty(c.reduce_batch(h))
    assert float(penalty) == pytest.approx(1e-5 * (1 + 2 + 3 + 0.5))  # summed over batch, gates
    assert c.update(0.5) == pytest.approx(1.1e-5) and c.update(0.0) == pytest.approx(0.99e-5)
    for _ in range(200):
        c.update(1.0)
    assert c.lam == 1e-4
    for _ in range(500):
        c.update(0.0)
    assert c.lam == 1e-9
    assert make_controller(ConditionalNet("baseline_sigmoid", CFG), cfg) is None
    spec = make_controller(ConditionalNet("straight_through", CFG), TrainConfig())
    assert spec is not None and spec.update(0.9) > 1e-5  # the spec protocol adapts


def test_original_sts_unit():
    from stochgrad.models.conditional import STS_NOISE_SCALE, original_gate

    g = original_gate("sts")
    assert g.on_probability == "p" and dict(g.options) == {"variant": "code"}
    torch.manual_seed(0)
    z = g.noise_distribution().sample((200_000,))
    assert z.min() >= -0.5 * STS_NOISE_SCALE and z.max() <= 0.5 * STS_NOISE_SCALE
    assert float(z.mean()) == pytest.approx(g.noise_mean(), abs=0.01)
    assert original_gate("straight_through") == gate_type("straight_through")
    assert original_gate("sbn").score_scale == "sum" and gate_type("sbn").score_scale == "mean"


@pytest.mark.parametrize(
    "curve, patience, stop",
    [
        ([5, 4, 3, 3.5, 3.2, 3.1, 3.0, 2.0], 3, 6),  # best at epoch 3, three worse: stop at 6
        ([5, 4, 3, 2, 1], 1, None),  # always improving: never stops
        ([1, 2, 3], None, None),  # no patience: never stops
        ([3, 2, 2, 2], 2, 4),  # a tie is no improvement
    ],
)
def test_early_stopping_on_a_scripted_curve(curve, patience, stop):
    from stochgrad.models.conditional import early_stop

    stopped = next((e for e in range(1, len(curve) + 1) if early_stop(curve[:e], patience)), None)
    assert stopped == stop


def test_original_train_stops_early_and_logs_the_sampled_costs():
    from stochgrad.models.conditional import for_protocol

    torch.manual_seed(0)
    data = _tiny_digits()
    net = ConditionalNet("straight_through", ConditionalConfig(inputs=data.num_features))
    config = for_protocol("original", epochs=30, patience=2, progress=False, batch_size=16)
    assert config.max_norm == 2.1
    result = train(net, data, config)
    costs = [h["valid_cost"] for h in result.history]
    best = min(range(len(costs)), key=lambda i: (costs[i], i))
    assert result.best_epoch == best + 1
    assert result.stop_epoch == len(result.history)
    assert result.stop_epoch == 30 or result.stop_epoch - result.best_epoch == 2
    for h in result.history:
        assert {
            "valid_cost",
            "valid_error_sampled",
            "test_error",
            "train_running_criterion",
        } <= set(h)
        assert h["lambda"] == 0.1
    assert net.output.weight.norm(dim=1).max() > 0  # not clipped, just present
