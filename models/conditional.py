"""The paper's conditional-computation network: stochastic gates switch linear experts on and off.

Architecture (Bengio, Léonard & Courville 2013, Sec. 6; SPEC "The paper's experiment"):

    gater:    a = W_g2 tanh(W_g1 x + c_1) + c_2                 (batch, gates)   400 tanh units
    experts:  H = W_e x + b_e                                   (batch, experts) linear units
    output:   y = softmax(W_o (g ⊙ H) + b_o)                    (batch, 10)

with one gate per expert. The gate unit ``g`` is produced at a Pyro sample site,

    g = pyro.sample("gates", Bernoulli(logits=a).to_event(1), infer={"estimator": est})

and the estimator object in the annotation decides what the unit outputs and which gradient
flows through it (straight-through, STS, noisy rectifier, or a plain Bernoulli sample for the
score function). Training runs the cost-returning program :meth:`ConditionalNet.program`
through the toolkit's :class:`~stochgrad.estimators.surrogate.Surrogate`, which honours the
annotation; the two baseline units (:class:`Rectifier`, :class:`Sigmoid`) plug into the same
machinery. Two rows add noise to the gate's pre-activation, drawn inside the unit: STS skewed
logit-Beta noise, the "sigmoid + noise" baseline Gaussian noise. The rows of the paper's
table are :data:`GATE_TYPES`.

Sparsity (Sec. 6): sigmoid-type gates pay ``-λ Σ_i [s log p̄_i + (1-s) log(1-p̄_i)]`` on the
minibatch mean of each gate's probability of being on, rectifier gates ``λ Σ_i |h̄_i|``; λ
adapts multiplicatively (:class:`SparsityController`).

Test time is deterministic: the gate noise is replaced by its mean, each gate gets a score
(its probability of being on, or its pre-activation for rectifiers), and gates whose score
exceeds a threshold tuned on validation data (about 10% on) are computed. The same output can
be computed from the active experts only (:func:`sparse_expert_output`); it equals the dense
masked computation (:func:`dense_expert_output`) to float tolerance, and
:func:`count_macs` counts the multiply-adds of each path.

Reference: Bengio, Léonard & Courville (2013), arXiv:1308.3432, Sec. 3-6.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions.transforms import AffineTransform, SigmoidTransform

from stochgrad import estimators
from stochgrad.estimators.base import Estimator, SiteInput, SiteValue
from stochgrad.estimators.surrogate import Surrogate

__all__ = [
    "ConditionalConfig",
    "ConditionalNet",
    "ForwardResult",
    "GATE_TYPES",
    "GateType",
    "PackedExperts",
    "Rectifier",
    "Sigmoid",
    "SparsityController",
    "TrainConfig",
    "TrainResult",
    "beta_noise_alpha",
    "count_macs",
    "dense_expert_output",
    "evaluate",
    "evaluate_top_k",
    "evaluate_stochastic",
    "expected_noisy_relu",
    "early_stop",
    "for_protocol",
    "gate_type",
    "gater_macs",
    "init_original_",
    "make_controller",
    "original_gate",
    "sampled_cost",
    "make_optimizer",
    "max_norm_",
    "save_atomic",
    "sparse_expert_output",
    "train",
    "tune_on",
    "top_k_mask",
    "tune_threshold",
]


# ---------------------------------------------------------------------------------------------
# Gate units that exist only as the paper's baselines (not estimators of a Bernoulli gradient)
# ---------------------------------------------------------------------------------------------


class _BaselineUnit(Estimator):
    """A deterministic unit substituted at a Bernoulli site (a value outside {0, 1}).

    It plugs into the toolkit's site machinery like the ``sts`` and ``noisy_rectifier`` units,
    so the paper's baselines run through the same annotation, but it is not a gradient
    estimator for Bernoulli units (nothing is sampled) and is not registered.
    """

    unbiased = "no"
    site_distributions = ("Bernoulli",)
    site_validates = False  # the densities are evaluated, unvalidated, at the unit's value

    def site_value(self, site: SiteInput) -> SiteValue:
        return SiteValue(self.value(site.logits))

    def rule(self, uniforms: Any) -> Callable[[str, Tensor], tuple[Tensor, dict[str, Tensor]]]:
        def rule(name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            return self.value(logits), {}

        return rule

    def value(self, logits: Tensor) -> Tensor:
        raise NotImplementedError


class Rectifier(_BaselineUnit):
    """The baseline rectifier gate ``h = max(0, a)``: no noise, ordinary backpropagation."""

    name = "rectifier"
    description = "rectifier gate max(0, a), no noise (the paper's baseline rectifier)"

    def value(self, logits: Tensor) -> Tensor:
        return torch.relu(logits)


class Sigmoid(_BaselineUnit):
    """The baseline sigmoid gate ``h = sigmoid(a)`` (the unit's mean; nothing sampled)."""

    name = "sigmoid"
    description = "sigmoid gate sigmoid(a), nothing sampled (the paper's baseline sigmoid)"

    def value(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


# ---------------------------------------------------------------------------------------------
# Rows of the paper's table
# ---------------------------------------------------------------------------------------------


# The original STS noise: (Beta(α, β) - 1/2) · |logit(0.01)| added to the gate pre-activation.
STS_NOISE_SCALE = abs(math.log(0.01 / 0.99))


def beta_noise_alpha(beta: float, mode: float = 0.1) -> float:
    """``α`` such that ``Beta(α, β)`` has its mode at ``mode``: ``(α-1)/(α+β-2) = mode``."""
    if not 0 < mode < 1 or beta <= 1:
        raise ValueError(f"need 0 < mode < 1 and beta > 1; got mode={mode}, beta={beta}")
    return (1 + mode * (beta - 2)) / (1 - mode)


@dataclass(frozen=True)
class GateType:
    """One row of the paper's table: the gate unit, its noise, penalty and training settings.

    ``estimator``: registry name (or ``"rectifier"`` / ``"sigmoid"`` for the local baselines)
    and ``options``; ``noise``: ``None``, ``"beta"`` (logit of ``Beta(α, β)``, mode 0.1, at the
    sigmoid input) or ``"gaussian"`` (``N(0, noise_scale²)`` at the sigmoid input);
    ``sparsity``: ``"kl"``, ``"l1"`` or ``None``; ``on_probability``: ``"p"`` (P(on) = sigmoid
    of the gate logits) or ``"sqrt_p"`` (STS, paper variant); ``units``: gates (= experts);
    ``lr_gater``: learning rate of the gater (None: the global one); ``momentum``.
    ``score_scale``: ``"mean"``, the gate site's gradient is that of the batch-mean cost, like
    the NLL's; ``"sum"``, it is not divided by the batch size: the score-function gate then
    follows the per-example rule ``(h - p)(L_n - b)`` summed over the minibatch, as the authors'
    code trains the SBN row (the rest of the objective stays a batch mean).
    """

    name: str
    label: str
    estimator: str
    options: Mapping[str, Any] = field(default_factory=dict)
    noise: str | None = None
    noise_scale: float = 1.0
    beta: float = 40.0
    sparsity: str | None = "kl"
    on_probability: str = "p"
    units: int = 2000
    lr_gater: float | None = None
    momentum: float = 0.0
    binary: bool = False
    score_scale: str = "mean"

    def make_estimator(self) -> Any:
        """A fresh estimator object for the gate site (stateful ones must not be shared)."""
        if self.estimator == "rectifier":
            return Rectifier()
        if self.estimator == "sigmoid":
            return Sigmoid()
        return estimators.get(self.estimator, **dict(self.options))

    @property
    def alpha(self) -> float:
        return beta_noise_alpha(self.beta)

    def noise_distribution(self) -> dist.Distribution | None:
        """The pre-gate noise ``z`` (added to the gate logits), or ``None``."""
        if self.noise is None:
            return None
        if self.noise == "gaussian":
            return dist.Normal(0.0, self.noise_scale)
        if self.noise == "beta":
            return dist.TransformedDistribution(
                dist.Beta(self.alpha, self.beta), [SigmoidTransform().inv]
            )
        if self.noise == "beta_shift":
            c = STS_NOISE_SCALE
            return dist.TransformedDistribution(
                dist.Beta(self.alpha, self.beta), [AffineTransform(-0.5 * c, c)]
            )
        raise ValueError(
            f"noise must be None, 'beta', 'beta_shift' or 'gaussian'; got {self.noise!r}"
        )

    def noise_mean(self) -> float:
        """``E[z]``: 0 for Gaussian; ``ψ(α) - ψ(β)`` for the logit of ``Beta(α, β)``."""
        if self.noise == "beta":
            a, b = torch.tensor(self.alpha), torch.tensor(self.beta)
            return float(torch.digamma(a) - torch.digamma(b))
        if self.noise == "beta_shift":
            return (self.alpha / (self.alpha + self.beta) - 0.5) * STS_NOISE_SCALE
        return 0.0

    @property
    def thresholded(self) -> bool:
        """Whether test-time gates are thresholded to ~10% (False: every gate stays on)."""
        return self.sparsity is not None


GATE_TYPES: dict[str, GateType] = {
    g.name: g
    for g in [
        GateType(
            "noisy_rectifier",
            "Noisy rectifier",
            "noisy_rectifier",
            {"noise": "gaussian", "scale": 1.0},
            sparsity="l1",
        ),
        GateType(
            "straight_through",
            "Straight-through",
            "straight_through",
            {"variant": "identity"},
            binary=True,
        ),
        GateType(
            "straight_through_sigmoid",
            "Straight-through (sigmoid variant)",
            "straight_through",
            {"variant": "sigmoid"},
            binary=True,
        ),
        GateType(
            "sts",
            "Stochastic times smooth",
            "sts",
            {"variant": "paper"},
            noise="beta",
            on_probability="sqrt_p",
            momentum=0.5,
        ),
        GateType(
            "sbn",
            "Stochastic binary neuron",
            "score_function",
            {"baseline": "optimal"},
            lr_gater=0.001,
            binary=True,
        ),
        GateType("baseline_rectifier", "Baseline rectifier", "rectifier", sparsity="l1"),
        GateType(
            "baseline_sigmoid_noise",
            "Baseline sigmoid + noise",
            "sigmoid",
            noise="gaussian",
            sparsity=None,
            units=200,
        ),
        GateType("baseline_sigmoid", "Baseline sigmoid", "sigmoid", sparsity=None, units=200),
    ]
}


def gate_type(name: str | GateType) -> GateType:
    """The :class:`GateType` for a row name (``ValueError`` listing the valid names)."""
    if isinstance(name, GateType):
        return name
    if name not in GATE_TYPES:
        raise ValueError(f"unknown gate type {name!r}; valid: {', '.join(GATE_TYPES)}")
    return GATE_TYPES[name]


# ---------------------------------------------------------------------------------------------
# The two training protocols
# ---------------------------------------------------------------------------------------------

PROTOCOLS = ("spec", "original")

# ``original``: the settings of the authors' experiment code (nicholas-leonard/delicious,
# commit 73357e8; see docs/conditional_computation.md for the file of each one).
ORIGINAL_LAMBDA: dict[str, float] = {  # fixed KL weight of the sigmoid-type gates
    "straight_through": 0.1,
    "straight_through_sigmoid": 0.1,
    "sts": 0.001,
    "sbn": 1.0,
}
ORIGINAL_L1 = {"start": 1e-5, "low": 1e-9, "high": 1e-4}  # rectifier λ: adaptive, clipped
ORIGINAL_MAX_NORM = 2.1  # column norm of the three conditional-layer matrices; none on softmax
ORIGINAL_SPARSE_INIT = 15  # non-zero N(0, 1) weights per noisy-rectifier gater output unit


def original_gate(name: str | GateType) -> GateType:
    """The row as the original code ran it (STS and the SBN differ; the others do not).

    STS samples ``Bernoulli(p)`` (``variant="code"``; the paper's text says ``sqrt(p)``) and its
    pre-gate noise is ``(Beta(α, β) - 1/2) · |logit(0.01)|`` (``noise="beta_shift"``). The SBN's
    score-function gradient is the per-example ``(h - p)(L_n - b)`` summed over the minibatch,
    not divided by its size (``score_scale="sum"``).
    """
    g = gate_type(name)
    if g.estimator == "sts":
        return replace(g, options={"variant": "code"}, noise="beta_shift", on_probability="p")
    if g.estimator == "score_function":
        return replace(g, score_scale="sum")
    return g


def glorot_(weight: Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
    """``U(±gain · sqrt(6 / (fan_in + fan_out)))`` in place (``weight (out, in)``)."""
    bound = gain * math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)


def sparse_init_(weight: Tensor, nonzero: int, generator: torch.Generator | None = None) -> None:
    """Each unit (row of ``weight (out, in)``) gets ``nonzero`` N(0, 1) weights, the rest 0."""
    out, fan_in = weight.shape
    if not 0 < nonzero <= fan_in:
        raise ValueError(f"need 0 < nonzero <= fan_in={fan_in}; got {nonzero}")
    with torch.no_grad():
        weight.zero_()
        for i in range(out):
            idx = torch.randperm(fan_in, generator=generator)[:nonzero]
            weight[i, idx] = torch.randn(nonzero, generator=generator, dtype=weight.dtype).to(
                weight.device
            )


def init_original_(net: ConditionalNet) -> ConditionalNet:
    """The original initialisation (in place; randomness from torch's global generator).

    Glorot-uniform for the experts and the gater's hidden layer; the gater's output layer
    4 × Glorot for sigmoid-type gates, 15 sparse N(0, 1) weights per unit for the noisy
    rectifier, Glorot for the baseline rectifier; the softmax ``U(±0.05)`` for straight-through
    and SBN, ``U(±0.005)`` otherwise; every bias 0.
    """
    g = net.gate
    glorot_(net.experts.weight)
    glorot_(net.gater_hidden.weight)
    if g.estimator == "noisy_rectifier":
        sparse_init_(net.gater_out.weight, min(ORIGINAL_SPARSE_INIT, net.gater_out.in_features))
    elif g.sparsity == "l1":
        glorot_(net.gater_out.weight)
    else:
        glorot_(net.gater_out.weight, gain=4.0)
    bound = 0.05 if g.estimator in ("straight_through", "score_function") else 0.005
    with torch.no_grad():
        net.output.weight.uniform_(-bound, bound)
        for layer in (net.experts, net.gater_hidden, net.gater_out, net.output):
            layer.bias.zero_()
    return net


def make_controller(net: ConditionalNet, config: TrainConfig) -> SparsityController | None:
    """The sparsity controller of the protocol (``None`` for unpenalised rows).

    ``spec``: adaptive λ from 1e-5, batch-mean statistics, clip [1e-13, 1] for every row.
    ``original``: a fixed λ (:data:`ORIGINAL_LAMBDA`) for sigmoid-type gates; for rectifiers
    the adaptive rule on the L1 norm summed over the minibatch and the gates, ×1.1 / ×0.9 per
    minibatch, clipped to [1e-9, 1e-4].
    """
    g = net.gate
    if not g.sparsity:
        return None
    if config.protocol == "spec":
        return SparsityController(g.sparsity, target=config.density)
    if g.sparsity == "kl":
        lam = ORIGINAL_LAMBDA.get(g.name, 0.1)
        return SparsityController("kl", config.density, start=lam, low=lam, high=lam)
    return SparsityController("l1", config.density, reduce="sum", **ORIGINAL_L1)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionalConfig:
    """Sizes of the gated network; ``gates=None`` takes the gate type's (2000 or 200)."""

    inputs: int = 784
    gater_hidden: int = 400
    gates: int | None = None
    classes: int = 10


class ForwardResult(NamedTuple):
    """What one stochastic forward pass produced (batch-first tensors).

    ``objective``: scalar to backpropagate (see :meth:`ConditionalNet.forward`); ``nll``
    (batch,); ``logits (batch, classes)``; ``gate_logits (batch, gates)`` the logits at the
    gate site (noise included); ``gates (batch, gates)`` the gate values.
    """

    objective: Tensor
    nll: Tensor
    logits: Tensor
    gate_logits: Tensor
    gates: Tensor


class ConditionalNet(nn.Module):
    """The gated network of Bengio et al. (2013, Sec. 6) with one gate per linear expert.

    ``gate``: a row name of :data:`GATE_TYPES` or a :class:`GateType`. Initialisation is
    PyTorch's default for ``nn.Linear`` (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and
    biases); the paper does not give one.
    """

    def __init__(
        self, gate: str | GateType = "straight_through", config: ConditionalConfig | None = None
    ):
        super().__init__()
        self.gate = gate_type(gate)
        self.config = config or ConditionalConfig()
        c = self.config
        units = c.gates if c.gates is not None else self.gate.units
        self.units = units
        self.gater_hidden = nn.Linear(c.inputs, c.gater_hidden)
        self.gater_out = nn.Linear(c.gater_hidden, units)
        self.experts = nn.Linear(c.inputs, units)
        self.output = nn.Linear(units, c.classes)
        self.estimator = self.gate.make_estimator()
        self._noise = self.gate.noise_distribution()
        self._surrogate = Surrogate()

    # -- the stochastic (training) pass ---------------------------------------------------------

    def gater(self, x: Tensor) -> Tensor:
        """Gate pre-activations ``a``, shape (batch, gates), before any noise."""
        return self.gater_out(torch.tanh(self.gater_hidden(x)))

    def _body(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inside the data plate: ``(class logits, gate logits, gates)``."""
        a = self.gater(x)  # (batch, gates)
        h = self.experts(x)  # (batch, experts)
        if self._noise is not None:
            # A reparameterised draw that is part of the unit, not an inference target: drawn
            # as plain torch (a sample site would make the surrogate evaluate its log-density,
            # a Beta lgamma per gate, for a score term that is identically zero).
            a = a + self._noise.expand(a.shape).sample()  # (batch, gates)
        site_logits = a
        if self.gate.score_scale == "sum":  # same value, gradient times the batch size
            site_logits = a + (a.shape[0] - 1) * (a - a.detach())
        g = pyro.sample(
            "gates",
            dist.Bernoulli(logits=site_logits).to_event(1),
            infer={"estimator": self.estimator},
        )  # (batch, gates)
        return self.output(g * h), a, g

    def program(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cost-returning Pyro program: ``(per-example NLL, class logits, gate logits, gates)``.

        The NLL, shape (batch,), lives in the ``"data"`` plate, so each example's gates are
        credited with that example's cost only (what the score-function gate needs).
        """
        with pyro.plate("data", x.shape[0], dim=-1):
            logits, a, g = self._body(x)
            nll = nn.functional.cross_entropy(logits, y, reduction="none")  # (batch,)
        return nll, logits, a, g

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The generative Pyro model: ``pyro.module`` registration, gates, the label site."""
        pyro.module("conditional", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            logits, _, _ = self._body(x)
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits

    def forward(self, x: Tensor, y: Tensor) -> ForwardResult:
        """One stochastic pass and its training objective (no sparsity penalty).

        Runs :meth:`program` through the toolkit's :class:`~stochgrad.estimators.surrogate.
        Surrogate`, which gives the gate site the value and gradient of the estimator in its
        ``infer`` annotation; ``objective`` is the surrogate divided by the batch size (its
        value is the mean NLL, its gradient the estimate of the mean NLL's gradient).
        Randomness comes from torch's global generator (seed it with ``torch.manual_seed``).
        """
        run = self._surrogate.run(self.program, x, y)
        nll, logits, a, g = run.value
        return ForwardResult(run.loss / x.shape[0], nll, logits, a, g)

    def on_probability(self, gate_logits: Tensor) -> Tensor:
        """Each gate's probability of being on given its logits (sigmoid-type gates)."""
        p = torch.sigmoid(gate_logits)
        return p.sqrt() if self.gate.on_probability == "sqrt_p" else p

    # -- the deterministic (test) pass ----------------------------------------------------------

    def gate_scores(self, x: Tensor) -> Tensor:
        """Deterministic gate scores (batch, gates): P(on) with the noise at its mean for
        sigmoid-type gates, the pre-activation for rectifiers. Gates are on where score > τ."""
        a = self.gater(x) + self.gate.noise_mean()
        if self.gate.sparsity == "l1":
            return a
        return self.on_probability(a)

    def gate_values(self, scores: Tensor, threshold: float | None) -> Tensor:
        """Test-time gate values from scores: ``f(score) · 1[score > τ]``.

        ``f`` is 1 for binary gates (ST, SBN), ``sqrt(p)`` for STS (its training value when on),
        the unit's expected output ``E_z[max(0, a + s z)]`` for the noisy rectifier (noise
        integrated out rather than dropped: with the noise at its mean, far fewer than 10% of
        the pre-activations are positive), ``max(0, a)`` for the plain rectifier, and
        ``sigmoid(a)`` for the sigmoid baselines (``threshold=None``: every gate on).
        """
        if self.gate.binary:
            values = torch.ones_like(scores)
        elif self.gate.estimator == "noisy_rectifier":
            values = expected_noisy_relu(
                scores, self.gate.options.get("noise", "gaussian"), self.gate.options["scale"]
            )
        elif self.gate.sparsity == "l1":
            values = torch.relu(scores)
        else:
            values = scores
        if threshold is None:
            return values
        return values * (scores > threshold).to(values.dtype)

    @torch.no_grad()
    def predict_logits(self, x: Tensor, threshold: float | None) -> tuple[Tensor, Tensor]:
        """Deterministic class logits and gate values, dense masked computation."""
        g = self.gate_values(self.gate_scores(x), threshold)
        return dense_expert_output(x, g, self.packed()), g

    def packed(self) -> PackedExperts:
        """The expert and output layers in the layout the sparse path reads."""
        return PackedExperts.from_net(self)

    def max_norm_(self, max_norm: float = 2.0, output: bool = True) -> None:
        """Clip every unit's incoming weight vector to L2 norm ``max_norm`` (in place);
        ``output=False`` leaves the softmax layer alone (the original protocol)."""
        layers = [self.gater_hidden, self.gater_out, self.experts]
        for layer in layers + ([self.output] if output else []):
            max_norm_(layer.weight, max_norm)


def expected_noisy_relu(a: Tensor, noise: str = "gaussian", scale: float = 1.0) -> Tensor:
    """``E[max(0, a + s z)]``: ``a Φ(a/s) + s φ(a/s)`` (Gaussian ``z``), ``s softplus(a/s)``
    (logistic ``z``)."""
    if noise == "logistic":
        return scale * torch.nn.functional.softplus(a / scale)
    t = a / scale
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return a * cdf + scale * pdf


def max_norm_(weight: Tensor, max_norm: float = 2.0) -> Tensor:
    """Rescale rows of ``weight (out, in)`` whose L2 norm exceeds ``max_norm`` (in place).

    Reference: Srebro & Shraibman (2005); Hinton et al. (2012), as used in Sec. 6 of the paper.
    """
    with torch.no_grad():
        norms = weight.norm(dim=1, keepdim=True)  # (out, 1)
        weight.mul_(torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0))
    return weight


def tune_threshold(scores: Tensor, density: float = 0.1) -> float:
    """The threshold τ with about ``density`` of ``scores`` strictly above it.

    τ is the ``(1 - density)`` quantile of all scores (lower order statistic), so exactly
    ``round(density · n)`` scores exceed it when they are distinct.
    """
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    keep = int(round(density * n))
    if keep >= n:
        return float(flat.min()) - 1.0
    return float(torch.kthvalue(flat.cpu(), n - keep).values)


# ---------------------------------------------------------------------------------------------
# Sparsity control
# ---------------------------------------------------------------------------------------------


class SparsityController:
    """The paper's adaptive sparsity penalty (Sec. 6).

    ``kind="kl"``: ``-λ Σ_i [s log p̄_i + (1-s) log(1-p̄_i)]`` with ``p̄_i`` the minibatch mean
    probability of gate ``i`` being on; ``kind="l1"``: ``λ Σ_i |h̄_i|`` with ``h̄_i`` the
    minibatch mean gate value (``reduce="sum"``: summed over the minibatch, as the original
    rectifier penalty; see :meth:`reduce_batch`). After each minibatch, :meth:`update`
    multiplies λ by ``up`` (1.1) when the measured density exceeds ``s + tolerance``, by
    ``down`` (0.9) when it is below ``s - tolerance``, and clips λ to ``[low, high]``.
    """

    def __init__(
        self,
        kind: str = "kl",
        target: float = 0.1,
        tolerance: float = 0.01,
        start: float = 1e-5,
        up: float = 1.1,
        down: float = 0.9,
        low: float = 1e-13,
        high: float = 1.0,
        reduce: str = "mean",
    ):
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
        if kind not in ("kl", "l1"):
            raise ValueError(f"kind must be 'kl' or 'l1'; got {kind!r}")
        if not 0 < target < 1:
            raise ValueError(f"target density must be in (0, 1); got {target}")
        if not (up > 1 and 0 < down < 1 and 0 < low <= start <= high):
            raise ValueError(
                f"need up > 1, 0 < down < 1 and 0 < low <= start <= high; got up={up}, "
                f"down={down}, low={low}, start={start}, high={high}"
            )
        self.kind, self.target, self.tolerance = kind, target, tolerance
        self.up, self.down, self.low, self.high = up, down, low, high
        self.lam = start
        self.reduce = reduce

    def reduce_batch(self, stat: Tensor) -> Tensor:
        """Per-gate statistic (gates,) of a minibatch ``stat (batch, gates)``: mean or sum."""
        if self.kind == "l1":
            stat = stat.abs()  # Σ_n |h_ni| (rectifier gates are >= 0: the same values)
        return stat.sum(0) if self.reduce == "sum" else stat.mean(0)

    def penalty(self, stat: Tensor) -> Tensor:
        """The penalty on per-gate minibatch means ``stat`` (gates,) at the current λ."""
        if self.kind == "l1":
            return self.lam * stat.abs().sum()
        eps = 1e-7
        p = stat.clamp(eps, 1 - eps)
        s = self.target
        return -self.lam * (s * torch.log(p) + (1 - s) * torch.log1p(-p)).sum()

    def update(self, density: float) -> float:
        """Adapt λ to the measured fraction of gates on; returns the new λ."""
        if density > self.target + self.tolerance:
            self.lam *= self.up
        elif density < self.target - self.tolerance:
            self.lam *= self.down
        self.lam = min(max(self.lam, self.low), self.high)
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.lam = float(state["lam"])


# ---------------------------------------------------------------------------------------------
# Dense and sparse inference through the expert and output layers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedExperts:
    """Expert layer ``W_e (experts, inputs)``, ``b_e (experts,)`` and the output layer stored
    transposed, ``W_o^T (experts, classes)``, so that one expert is one contiguous row of each."""

    w_e: Tensor
    b_e: Tensor
    w_o_t: Tensor
    b_o: Tensor

    @classmethod
    def from_net(cls, net: ConditionalNet) -> PackedExperts:
        return cls(
            net.experts.weight.detach().contiguous(),
            net.experts.bias.detach().contiguous(),
            net.output.weight.detach().t().contiguous(),
            net.output.bias.detach().contiguous(),
        )

    @classmethod
    def random(
        cls,
        inputs: int = 784,
        experts: int = 2000,
        classes: int = 10,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PackedExperts:
        """Random layers of the given sizes (benchmarks and tests)."""

        def r(*shape: int) -> Tensor:
            return (torch.rand(shape, generator=generator, dtype=dtype) - 0.5).to(device)

        scale_e, scale_o = 1 / math.sqrt(inputs), 1 / math.sqrt(experts)
        return cls(
            r(experts, inputs) * scale_e,
            r(experts) * scale_e,
            r(experts, classes) * scale_o,
            r(classes) * scale_o,
        )

    def to(self, device: str | torch.device) -> PackedExperts:
        return PackedExperts(*(t.to(device) for t in (self.w_e, self.b_e, self.w_o_t, self.b_o)))


def dense_expert_output(x: Tensor, gates: Tensor, layers: PackedExperts) -> Tensor:
    """``W_o (g ⊙ (W_e x + b_e)) + b_o`` computing every expert, shape (batch, classes)."""
    h = torch.addmm(layers.b_e, x, layers.w_e.t())  # (batch, experts)
    return torch.addmm(layers.b_o, gates * h, layers.w_o_t)


SPARSE_METHODS = ("auto", "gather", "csr")


def sparse_expert_output(
    x: Tensor, gates: Tensor, layers: PackedExperts, method: str = "auto"
) -> Tensor:
    """The same output as :func:`dense_expert_output` computing only the active experts.

    An expert is active for an example where its gate value is non-zero.

    * ``"gather"``: per example, gather the active rows of ``W_e`` and ``W_o^T`` and do two
      small matrix-vector products (cost ``k (inputs + classes)`` multiply-adds for ``k``
      active experts, plus copying those rows);
    * ``"csr"``: the whole batch at once as a sampled dense-dense product on the CSR pattern of
      the gates (``torch.sparse.sampled_addmm``), then a sparse-dense product with ``W_o^T``;
    * ``"auto"``: ``gather`` for a single example, ``csr`` for a batch (faster in our
      measurements, ``scripts/bench_conditional.py``).
    """
    if method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}; got {method!r}")
    if x.dim() != 2 or gates.shape != (x.shape[0], layers.w_e.shape[0]):
        raise ValueError(
            f"expected x (batch, {layers.w_e.shape[1]}) and gates (batch, "
            f"{layers.w_e.shape[0]}); got x {tuple(x.shape)}, gates {tuple(gates.shape)}"
        )
    if method == "auto":
        method = "gather" if x.shape[0] == 1 else "csr"
    if method == "gather":
        return _sparse_gather(x, gates, layers)
    return _sparse_csr(x, gates, layers)


def _sparse_gather(x: Tensor, gates: Tensor, layers: PackedExperts) -> Tensor:
    out = layers.b_o.expand(x.shape[0], -1).clone()  # (batch, classes)
    for n in range(x.shape[0]):
        idx = gates[n].nonzero().squeeze(1)  # (k,)
        if idx.numel() == 0:
            continue
        h = torch.addmv(layers.b_e.index_select(0, idx), layers.w_e.index_select(0, idx), x[n])
        out[n] += layers.w_o_t.index_select(0, idx).t().mv(gates[n].index_select(0, idx) * h)
    return out


def _sparse_csr(x: Tensor, gates: Tensor, layers: PackedExperts) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (torch)
        warnings.simplefilter("ignore", UserWarning)
        pattern = gates.to_sparse_csr()  # (batch, experts), nnz = active pairs
        if pattern.values().numel() == 0:
            return layers.b_o.expand(x.shape[0], -1).clone()
        # dots[n, j] = x[n] . W_e[j] on the active pairs only
        dots = torch.sparse.sampled_addmm(pattern, x, layers.w_e.t(), beta=0.0)
        cols = pattern.col_indices()
        values = (dots.values() + layers.b_e.index_select(0, cols)) * pattern.values()
        gated = torch.sparse_csr_tensor(pattern.crow_indices(), cols, values, size=pattern.shape)
        return torch.addmm(layers.b_o.expand(x.shape[0], -1), gated, layers.w_o_t)


def count_macs(gates: Tensor, inputs: int, classes: int, path: str = "sparse") -> int:
    """Multiply-adds of the expert and output layers for a batch of gate values.

    ``dense``: ``batch · experts · (inputs + 1 + classes)`` (every expert's dot product, its
    gating multiply and its output contribution); ``sparse``: ``nnz · (inputs + 1 + classes)``
    over the active (non-zero) gates. The gater's ``inputs · hidden + hidden · gates`` per
    example is the same on both paths and not included.
    """
    if path not in ("sparse", "dense"):
        raise ValueError(f"path must be 'sparse' or 'dense'; got {path!r}")
    per_expert = inputs + 1 + classes
    if path == "dense":
        return int(gates.numel()) * per_expert
    return int(torch.count_nonzero(gates)) * per_expert


def gater_macs(inputs: int, hidden: int, gates: int) -> int:
    """Multiply-adds of the gater per example: ``inputs · hidden + hidden · gates``."""
    return inputs * hidden + hidden * gates


# ---------------------------------------------------------------------------------------------
# Training (SGD as in Sec. 6) and deterministic evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Training settings of Sec. 6; ``momentum=None`` takes the gate type's (0.5 for STS).

    ``lr_gater`` overrides the gate type's gater learning rate (0.001 for the score-function
    gater, the global ``lr`` otherwise). The paper gives no epoch count; ``epochs`` is ours.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    lr_gater: float | None = None
    momentum: float | None = None
    max_norm: float = 2.0
    density: float = 0.1
    seed: int = 0
    eval_chunk: int = 2000
    progress: bool = True
    protocol: str = "spec"
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}; got {self.protocol!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None; got {self.patience}")

    @property
    def original(self) -> bool:
        return self.protocol == "original"


def for_protocol(protocol: str, **kwargs: Any) -> TrainConfig:
    """A :class:`TrainConfig` with the protocol's defaults (``original``: max-norm 2.1)."""
    if protocol == "original":
        kwargs.setdefault("max_norm", ORIGINAL_MAX_NORM)
    return TrainConfig(protocol=protocol, **kwargs)


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the selected epoch and its numbers (errors as fractions).

    ``train_criterion`` is the mean training NLL over the selected epoch's minibatches
    (stochastic gates, as trained); ``threshold`` the test-time gate threshold tuned on the
    validation set for the selected model (``None`` when gates are not thresholded);
    ``test_error_stochastic`` / ``test_density_stochastic`` the test error and gate density with
    the gates sampled as in training (one draw per example), a diagnostic of the deterministic
    test-time rule; ``test_error_top_k`` the test error with each example's own top 10% of
    gates on (:func:`evaluate_top_k`; the same as ``test_error`` for unthresholded gates).
    """

    best_epoch: int
    train_criterion: float
    valid_error: float
    test_error: float
    valid_density: float
    test_density: float
    threshold: float | None
    history: list[dict[str, float]]
    state_dict: dict[str, Tensor]
    test_error_stochastic: float = math.nan
    test_density_stochastic: float = math.nan
    test_error_top_k: float = math.nan
    stop_epoch: int = 0


def early_stop(criteria: Sequence[float], patience: int | None) -> bool:
    """Whether training stops after the last of ``criteria`` (lower is better): the best
    value so far is ``patience`` or more epochs old (``None``: never)."""
    if patience is None or not criteria:
        return False
    best = min(range(len(criteria)), key=lambda i: (criteria[i], i))
    return len(criteria) - 1 - best >= patience


@torch.no_grad()
def sampled_cost(net: ConditionalNet, x: Tensor, y: Tensor, chunk: int) -> tuple[float, float]:
    """``(mean NLL, error rate)`` with the gates sampled as in training (one draw each).

    What the original protocol selects on (validation) and reports as "train" (a full pass
    over the training set at the end of the epoch, NLL only, no penalty). Stateful estimators
    keep their state (``Surrogate(update=False)``); ``chunk`` must then be the minibatch size.
    """
    surrogate = Surrogate(update=False)
    nll_sum, wrong = 0.0, 0
    for i in range(0, x.shape[0], chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        k = xb.shape[0]
        if k < chunk:
            pad = torch.arange(chunk - k, device=x.device) % x.shape[0]
            xb, yb = torch.cat([xb, x[pad]]), torch.cat([yb, y[pad]])
        nll, logits, _, _ = surrogate.run(net.program, xb, yb).value
        nll_sum += float(nll[:k].sum())
        wrong += int((logits[:k].argmax(1) != yb[:k]).sum())
    n = max(x.shape[0], 1)
    return nll_sum / n, wrong / n


@torch.no_grad()
def evaluate(
    net: ConditionalNet, x: Tensor, y: Tensor, threshold: float | None, chunk: int = 2000
) -> tuple[float, float]:
    """``(error rate, fraction of gates on)`` of the deterministic network on ``(x, y)``."""
    wrong, on, total = 0, 0, 0
    for i in range(0, x.shape[0], chunk):
        logits, g = net.predict_logits(x[i : i + chunk], threshold)
        wrong += int((logits.argmax(1) != y[i : i + chunk]).sum())
        on += int(torch.count_nonzero(g))
        total += g.numel()
    return wrong / max(x.shape[0], 1), on / max(total, 1)


def top_k_mask(scores: Tensor, density: float = 0.1) -> Tensor:
    """Per-example rule: 1 for each example's ``round(density · gates)`` highest scores.

    An alternative to the paper's single threshold (:func:`tune_threshold`), which lets the
    number of active gates vary from example to example.
    """
    k = int(round(density * scores.shape[-1]))
    mask = torch.zeros_like(scores)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    return mask


@torch.no_grad()
def evaluate_top_k(
    net: ConditionalNet, x: Tensor, y: Tensor, density: float = 0.1, chunk: int = 2000
) -> float:
    """Error rate of the deterministic network with per-example top-k gates (:func:`top_k_mask`)."""
    wrong = 0
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        scores = net.gate_scores(xb)
        g = net.gate_values(scores, None) * top_k_mask(scores, density)
        logits = dense_expert_output(xb, g, net.packed())
        wrong += int((logits.argmax(1) != y[i : i + chunk]).sum())
    return wrong / max(x.shape[0], 1)


@torch.no_grad()
def evaluate_stochastic(
    net: ConditionalNet, x: Tensor, y: Tensor, chunk: int = 32
) -> tuple[float, float]:
    """``(error rate, fraction of gates on)`` with the gates sampled as in training.

    One draw per example through the same program and estimators (stateful baselines are not
    updated). ``chunk`` should be the training minibatch size: per-site baseline state is
    shaped by the plate it was built on.
    """
    surrogate = Surrogate(update=False)
    wrong, on, total = 0, 0, 0
    for i in range(0, x.shape[0], chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        k = xb.shape[0]
        if k < chunk:  # pad the last chunk to the plate size the baselines were built on
            pad = torch.arange(chunk - k, device=x.device) % x.shape[0]
            xb, yb = torch.cat([xb, x[pad]]), torch.cat([yb, y[pad]])
        _, logits, _, g = surrogate.run(net.program, xb, yb).value
        wrong += int((logits[:k].argmax(1) != yb[:k]).sum())
        on += int(torch.count_nonzero(g[:k]))
        total += g[:k].numel()
    return wrong / max(x.shape[0], 1), on / max(total, 1)


@torch.no_grad()
def tune_on(net: ConditionalNet, x: Tensor, density: float, chunk: int = 2000) -> float | None:
    """Threshold putting ``density`` of the gates on over ``x`` (None if not thresholded)."""
    if not net.gate.thresholded:
        return None
    scores = torch.cat([net.gate_scores(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
    return tune_threshold(scores, density)


def make_optimizer(net: ConditionalNet, config: TrainConfig) -> torch.optim.SGD:
    """SGD with the gater's own learning rate where the gate type asks for one."""
    lr_gater = config.lr_gater if config.lr_gater is not None else net.gate.lr_gater
    momentum = config.momentum if config.momentum is not None else net.gate.momentum
    gater = list(net.gater_hidden.parameters()) + list(net.gater_out.parameters())
    rest = list(net.experts.parameters()) + list(net.output.parameters())
    return torch.optim.SGD(
        [
            {"params": gater, "lr": lr_gater if lr_gater is not None else config.lr},
            {"params": rest, "lr": config.lr},
        ],
        lr=config.lr,
        momentum=momentum,
    )


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (never half written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(
    net: ConditionalNet,
    data: Any,
    config: TrainConfig | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    description: str = "",
    checkpoint: str | Path | None = None,
    controller: SparsityController | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``net`` on ``data`` (a :class:`stochgrad.models.data.Digits`) as in Sec. 6.

    Minibatch SGD, the adaptive sparsity penalty, max-norm on every layer's incoming weights
    after each step; after each epoch the test-time threshold is tuned on the validation set
    and the validation error measured with it; the epoch with the lowest validation error is
    selected and evaluated on the test set. ``on_epoch`` receives each epoch's log row.
    Each epoch visits ``n // batch_size`` full minibatches of a fresh permutation (the few
    left over are skipped that epoch): stateful per-site baselines need a fixed plate size.
    Randomness: minibatch order from a generator seeded by ``config.seed``; gates and pre-gate
    noise from torch's global generator (seed it with ``torch.manual_seed`` for a reproducible
    run).

    ``checkpoint``: a file written (atomically) after every epoch with everything the loop
    needs to go on: the network, optimiser, sparsity controller and estimator state, both
    random generators, the history and the best epoch so far. When the file exists, training
    continues from it, so an interrupted run resumes exactly where it stopped (the same
    numbers as an uninterrupted one) and a finished run can be extended to more epochs;
    ``on_epoch`` is not called again for the epochs already in it. The caller makes sure the
    file belongs to the same network, data and settings. ``controller``: a sparsity controller
    to use instead of the paper's (built from the gate type's penalty and ``config.density``).
    ``on_checkpoint(epoch)`` is called each time the checkpoint has been written.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    device = next(net.parameters()).device
    xs, ys = data.train.x.to(device), data.train.y.to(device)
    xv, yv = data.valid.x.to(device), data.valid.y.to(device)
    n = xs.shape[0]
    if n == 0 or xv.shape[0] == 0:
        raise ValueError(f"need training and validation examples; got {n} and {xv.shape[0]}")
    opt = make_optimizer(net, config)
    if controller is None:
        controller = make_controller(net, config)
    order = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    criterion = "valid_cost" if config.original else "valid_error"
    best: dict[str, Any] = {criterion: math.inf}
    stateful = bool(getattr(net.estimator, "stateful", False))
    pass_chunk = config.batch_size if stateful else config.eval_chunk
    xt, yt = data.test.x.to(device), data.test.y.to(device)
    steps = n // config.batch_size  # full minibatches only (drop_last)
    if steps == 0:
        raise ValueError(f"need at least batch_size={config.batch_size} training examples, got {n}")
    first = 1
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        if controller is not None and saved["controller"] is not None:
            controller.load_state_dict(saved["controller"])
        if saved["estimator"] is not None:
            net.estimator.load_state_dict(saved["estimator"])
        order.set_state(saved["order"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        history, best, first = saved["history"], saved["best"], saved["epoch"] + 1
        if early_stop([h[criterion] for h in history], config.patience):
            first = config.epochs + 1  # stopped early already: nothing to extend
    for epoch in range(first, config.epochs + 1):
        net.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=order).to(device)
        sums = torch.zeros(3, device=device)  # nll, errors, gates on
        seen = steps * config.batch_size
        bar = tqdm(
            range(steps),
            desc=f"{description} epoch {epoch}",
            leave=False,
            disable=not config.progress,
            mininterval=1.0,
        )
        for step in bar:
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = xs.index_select(0, idx), ys.index_select(0, idx)
            result = net(xb, yb)
            objective, nll = result.objective, result.nll
            density = (result.gates.detach() != 0).float().mean()
            if controller is not None:
                stat = (
                    net.on_probability(result.gate_logits)
                    if controller.kind == "kl"
                    else result.gates
                )  # (batch, gates)
                objective = objective + controller.penalty(controller.reduce_batch(stat))
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            net.max_norm_(config.max_norm, output=not config.original)
            with torch.no_grad():
                wrong = (result.logits.argmax(1) != yb).float().sum()
                sums += torch.stack([nll.sum(), wrong, density * yb.shape[0]])
            if controller is not None:
                controller.update(float(density))
        net.eval()
        threshold = tune_on(net, xv, config.density, config.eval_chunk)
        valid_error, valid_density = evaluate(net, xv, yv, threshold, config.eval_chunk)
        totals = sums.tolist()
        row = {
            "epoch": epoch,
            "train_criterion": totals[0] / seen,
            "train_error": totals[1] / seen,
            "train_density": totals[2] / seen,
            "lambda": controller.lam if controller is not None else float("nan"),
            "valid_error": valid_error,
            "valid_density": valid_density,
            "threshold": threshold if threshold is not None else float("nan"),
        }
        if config.original:  # "train": a full sampled-gate pass; selection: sampled valid NLL
            row["train_running_criterion"] = row["train_criterion"]
            row["train_criterion"], _ = sampled_cost(net, xs, ys, pass_chunk)
            row["valid_cost"], row["valid_error_sampled"] = sampled_cost(net, xv, yv, pass_chunk)
            row["test_error"], row["test_density"] = evaluate(
                net, xt, yt, threshold, config.eval_chunk
            )  # logged only, never used for selection (partial runs can be reported)
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if not math.isfinite(row["train_criterion"]):
            break
        if row[criterion] < best[criterion]:
            best = {
                **row,
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "thr": threshold,
            }
        if checkpoint is not None:
            save_atomic(
                {
                    "epoch": epoch,
                    "net": net.state_dict(),
                    "opt": opt.state_dict(),
                    "controller": controller.state_dict() if controller is not None else None,
                    "estimator": getattr(net.estimator, "state_dict", lambda: None)(),
                    "order": order.get_state(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "history": history,
                    "best": best,
                },
                checkpoint,
            )
            if on_checkpoint is not None:
                on_checkpoint(epoch)
        if early_stop([h[criterion] for h in history], config.patience):
            break
    if "state" not in best:
        raise RuntimeError(f"training diverged in the first epoch (history: {history})")
    net.load_state_dict(best["state"])
    net.eval()
    test_error, test_density = evaluate(net, xt, yt, best["thr"], config.eval_chunk)
    stochastic_error, stochastic_density = evaluate_stochastic(net, xt, yt, config.batch_size)
    top_k_error = (
        evaluate_top_k(net, xt, yt, config.density, config.eval_chunk)
        if net.gate.thresholded
        else test_error
    )
    return TrainResult(
        best_epoch=int(best["epoch"]),
        train_criterion=best["train_criterion"],
        valid_error=best["valid_error"],
        test_error=test_error,
        valid_density=best["valid_density"],
        test_density=test_density,
        threshold=best["thr"],
        history=history,
        state_dict=best["state"],
        test_error_stochastic=stochastic_error,
        test_density_stochastic=stochastic_density,
        test_error_top_k=top_k_error,
        stop_epoch=int(history[-1]["epoch"]),
    )
