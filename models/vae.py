"""Sigmoid-belief-net / Bernoulli VAE on binarised MNIST, as a Pyro model and guide.

    p(z)     = prod_j Bern(z_j; sigmoid(c_j))                          200 binary latents
    p(x | z) = prod_i Bern(x_i; sigmoid(decoder(z)_i))                 784 binary pixels
    q(z | x) = prod_j Bern(z_j; sigmoid(encoder(x)_j))

``linear``: encoder and decoder are single affine maps (the one-layer SBN of Mnih & Gregor
2014 and REBAR). ``nonlinear``: two deterministic layers of ``hidden`` units in each, with
``activation`` ``tanh`` (the default here) or ``leaky_relu`` (slope 0.3, the DisARM paper's
784-200-200 networks). ``input_mean``: when given, the encoder sees ``x - input_mean`` (inputs
centred by the training mean). Training maximises

    ELBO(x) = E_q[log p(x | z) + log p(z) - log q(z | x)]

with :class:`~stochgrad.estimators.elbo.EstimatorELBO`; the guide annotates ``z`` with the
chosen estimator (``infer={"estimator": ..., "baseline_input": x}``, the input used by a
``learned`` baseline). Evaluation uses the importance-weighted bound
``log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]`` (Burda et al. 2016), which tightens
with ``K``.

:meth:`BernoulliVAE.reinforce_loss` is the same estimator written by hand in torch (score
function with an optional baseline), the reference for tests and benchmarks.

References: Mnih & Gregor (2014), arXiv:1402.0030; Tucker et al. (2017), REBAR,
arXiv:1703.07370, Sec. 6; Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

ARCHITECTURES = ("linear", "nonlinear")
ACTIVATIONS = ("tanh", "leaky_relu")
#: Negative slope of the ``leaky_relu`` activation (DisARM paper, Sec. 6).
LEAKY_SLOPE = 0.3


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.LeakyReLU(LEAKY_SLOPE)


def _net(
    inputs: int, outputs: int, hidden: int, architecture: str, activation: str = "tanh"
) -> nn.Module:
    if architecture == "linear":
        return nn.Linear(inputs, outputs)
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        _activation(activation),
        nn.Linear(hidden, hidden),
        _activation(activation),
        nn.Linear(hidden, outputs),
    )


class BernoulliVAE(nn.Module):
    """Binary latents ``z`` (``latents``), binary data ``x`` (``pixels``).

    ``estimator``: what the guide puts in ``infer["estimator"]`` (a registry name, an estimator
    object, or ``None`` for Pyro's default); ``pyro_baseline``: alternatively, Pyro's own
    ``infer["baseline"]`` options (for ``TraceGraph_ELBO``). ``data_mean``: pixel means used to
    initialise the decoder's output bias to ``logit(mean)`` (speeds up early training).
    ``activation``: ``tanh`` or ``leaky_relu`` (nonlinear only). ``input_mean``: subtracted
    from the encoder's input (a buffer, saved in the state dict).
    """

    def __init__(
        self,
        pixels: int = 784,
        latents: int = 200,
        architecture: str = "linear",
        hidden: int = 200,
        estimator: Any = None,
        pyro_baseline: dict | None = None,
        data_mean: Tensor | None = None,
        activation: str = "tanh",
        input_mean: Tensor | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}; "
                f"got {architecture!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}"
            )
        for label, v in [("pixels", pixels), ("latents", latents), ("hidden", hidden)]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if estimator is not None and pyro_baseline is not None:
            raise ValueError("give either estimator= or pyro_baseline=, not both")
        self.pixels, self.latents, self.architecture = pixels, latents, architecture
        self.hidden, self.activation = hidden, activation
        self.estimator = estimator
        self.pyro_baseline = pyro_baseline
        self.encoder = _net(pixels, latents, hidden, architecture, activation)
        self.decoder = _net(latents, pixels, hidden, architecture, activation)
        if input_mean is not None and tuple(input_mean.shape) != (pixels,):
            raise ValueError(
                f"input_mean must have shape ({pixels},), got {tuple(input_mean.shape)}"
            )
        self.register_buffer(
            "input_mean", None if input_mean is None else input_mean.detach().clone()
        )
        self.prior_logits = nn.Parameter(torch.zeros(latents))
        if data_mean is not None:
            out = self.decoder if architecture == "linear" else self.decoder[-1]
            with torch.no_grad():
                m = data_mean.clamp(1e-3, 1 - 1e-3)
                out.bias.copy_(torch.log(m) - torch.log1p(-m))  # type: ignore[union-attr]

    def encode(self, x: Tensor) -> Tensor:
        """The logits of ``q(z | x)``: the encoder network applied to the (centred) input."""
        mean = self.input_mean
        if isinstance(mean, Tensor):
            x = x - mean
        return self.encoder(x)

    # -- the Pyro program ------------------------------------------------------------------

    def model(self, x: Tensor) -> None:
        pyro.module("vae", self)
        batch = x.shape[0]
        with pyro.plate("data", batch):
            prior = self.prior_logits.expand(batch, self.latents)
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))  # (batch, latents)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("vae", self)
        infer: dict[str, Any] = {}
        if self.estimator is not None:
            infer = {"estimator": self.estimator, "baseline_input": x}
        elif self.pyro_baseline is not None:
            infer = {"baseline": dict(self.pyro_baseline)}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.encode(x)).to_event(1), infer=infer)

    # -- plain torch: densities, bounds, the hand-written estimator --------------------------

    def log_weights(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(x, z), log q(z | x))`` for ``z`` of shape ``(..., batch, latents)``."""
        log_q = dist.Bernoulli(logits=self.encode(x)).log_prob(z).sum(-1)
        log_prior = dist.Bernoulli(logits=self.prior_logits).log_prob(z).sum(-1)
        log_lik = dist.Bernoulli(logits=self.decoder(z)).log_prob(x).sum(-1)
        return log_prior + log_lik, log_q

    @torch.no_grad()
    def bound(self, x: Tensor, samples: int = 1, chunk: int = 1000) -> Tensor:
        """Per-example importance-weighted bound with ``samples`` draws (``1``: the ELBO)."""
        out = []
        for xs in x.split(chunk):
            probs = torch.sigmoid(self.encode(xs))  # (batch, latents)
            z = torch.bernoulli(probs.expand(samples, *probs.shape))  # (K, batch, latents)
            log_p, log_q = self.log_weights(xs, z)  # (K, batch)
            out.append(torch.logsumexp(log_p - log_q, 0) - math.log(samples))
        return torch.cat(out)

    def reinforce_loss(
        self, x: Tensor, baseline: Tensor | float = 0.0, z: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Hand-written score-function surrogate of ``-ELBO`` summed over the batch.

        ``g = d/dtheta [L] + (L - b) d log q(z|x)/dphi`` with ``L = -(log p(x,z) - log q(z|x))``
        per example (``Trace_ELBO``'s estimator). ``z``: use these latents instead of sampling.
        Returns ``(surrogate, L)``; ``L`` is detached.
        """
        logits = self.encode(x)
        if z is None:
            z = torch.bernoulli(torch.sigmoid(logits.detach()))
        log_q = dist.Bernoulli(logits=logits).log_prob(z).sum(-1)  # (batch,)
        log_prior = dist.Bernoulli(logits=self.prior_logits).log_prob(z).sum(-1)
        log_lik = dist.Bernoulli(logits=self.decoder(z)).log_prob(x).sum(-1)
        cost = -(log_prior + log_lik - log_q.detach())  # (batch,)
        surrogate = cost.sum() + (log_q * (cost - baseline).detach()).sum()
        return surrogate, cost.detach()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Options of :func:`train` (all JSON-serialisable)."""

    epochs: int = 10
    batch_size: int = 50
    lr: float = 3e-4
    test_samples: int = 100
    eval_every: int = 1  # epochs
    eval_every_steps: int | None = None  # also evaluate every this many steps
    eval_size: int = 1000  # test examples used for the multi-sample bound
    seed: int = 0
    dynamic_binarization: bool = True
    max_steps: int | None = None  # stop early (smoke tests)


def batches(x: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(x.shape[0], generator=generator)
    for i in range(0, x.shape[0] - batch_size + 1, batch_size):
        yield x[order[i : i + batch_size]]


def train(
    vae: BernoulliVAE,
    train_x: Tensor,
    test_x: Tensor,
    config: TrainConfig,
    elbo: Any = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``vae`` with ``pyro.infer.SVI`` and Adam; return one row per evaluation.

    ``train_x``/``test_x`` hold grey levels in [0, 1] (binarised per batch, a fresh Bernoulli
    draw each time, when ``dynamic_binarization``; otherwise used as given). ``elbo``: the
    ELBO object (default :class:`~stochgrad.estimators.elbo.EstimatorELBO`). Rows hold
    ``epoch, step, seconds, train_elbo`` (mean per example since the last row; rows come
    every ``eval_every`` epochs and, if set, every ``eval_every_steps`` steps),
    ``test_elbo`` and ``test_bound`` (``test_samples``-sample bound) on ``eval_size`` test
    examples. ``progress(step, loss)`` is called after every step.
    """
    from pyro.infer import SVI

    from stochgrad.estimators.elbo import EstimatorELBO

    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(config.seed)
    elbo = EstimatorELBO() if elbo is None else elbo
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": config.lr}), loss=elbo)
    rows: list[dict[str, Any]] = []
    step, seconds, running, count = 0, 0.0, 0.0, 0
    eval_x = test_x[: config.eval_size]
    eval_bin = (
        torch.bernoulli(eval_x, generator=generator) if config.dynamic_binarization else eval_x
    )

    def evaluate(epoch: int) -> None:
        nonlocal running, count
        rows.append(
            {
                "epoch": epoch,
                "step": step,
                "seconds": seconds,
                "train_elbo": -running / max(count, 1),
                "test_elbo": float(vae.bound(eval_bin, 1).mean()),
                "test_bound": float(vae.bound(eval_bin, config.test_samples).mean()),
            }
        )
        running, count = 0.0, 0

    for epoch in range(1, config.epochs + 1):
        for xb in batches(train_x, config.batch_size, generator):
            if config.dynamic_binarization:
                xb = torch.bernoulli(xb, generator=generator)
            start = time.perf_counter()
            loss = svi.step(xb) / xb.shape[0]
            seconds += time.perf_counter() - start
            step += 1
            running += loss
            count += 1
            if progress is not None:
                progress(step, loss)
            if config.max_steps is not None and step >= config.max_steps:
                break
            if config.eval_every_steps is not None and step % config.eval_every_steps == 0:
                evaluate(epoch)
        last = epoch == config.epochs or (config.max_steps is not None and step >= config.max_steps)
        if count and (epoch % config.eval_every == 0 or last):
            evaluate(epoch)
        if last:
            break
    return rows


# ---------------------------------------------------------------------------------------------
# Step timing (scripts/bench_svi.py)
# ---------------------------------------------------------------------------------------------


def step_functions(
    x: Tensor, latents: int = 200, architecture: str = "linear", decay: float = 0.9, seed: int = 0
) -> dict[str, Callable[[], None]]:
    """One training step per method, each on its own freshly built VAE (same initial weights).

    All use the score function with the same kind of baseline -- an exponential moving average
    of each example position's cost, started at 0 (Pyro's ``use_decaying_avg_baseline``) -- and
    Adam with the same learning rate:

    - ``stochgrad EstimatorELBO``: SVI with ``score_function(baseline="moving_average",
      init="zero")`` on the guide's site;
    - ``pyro TraceGraph_ELBO``: SVI with ``infer={"baseline": {"use_decaying_avg_baseline":
      True}}``;
    - ``hand-written torch``: :meth:`BernoulliVAE.reinforce_loss` and ``torch.optim.Adam``;
    - ``stochgrad EstimatorELBO (straight_through)``: for reference, a pathwise estimator;
    - ``pyro Trace_ELBO (no baseline)``: for reference, Pyro's leanest ELBO.

    Each function uses its own parameter store contents: call them only through
    :func:`time_steps`, which swaps stores between methods.
    """
    from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

    from stochgrad.estimators import get
    from stochgrad.estimators.elbo import EstimatorELBO

    pixels = x.shape[1]

    def vae(**kw: Any) -> BernoulliVAE:
        torch.manual_seed(seed)
        return BernoulliVAE(pixels, latents, architecture, data_mean=x.mean(0), **kw)

    ours = vae(estimator=get("score_function", baseline="moving_average", decay=decay, init="zero"))
    pyros = vae(pyro_baseline={"use_decaying_avg_baseline": True, "baseline_beta": decay})
    hand = vae()
    st = vae(estimator=get("straight_through"))
    lean = vae()
    lr = 1e-3
    svi_ours = SVI(ours.model, ours.guide, pyro.optim.Adam({"lr": lr}), loss=EstimatorELBO())
    svi_pyro = SVI(pyros.model, pyros.guide, pyro.optim.Adam({"lr": lr}), loss=TraceGraph_ELBO())
    svi_st = SVI(st.model, st.guide, pyro.optim.Adam({"lr": lr}), loss=EstimatorELBO())
    svi_lean = SVI(lean.model, lean.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    opt = torch.optim.Adam(hand.parameters(), lr=lr)
    avg = torch.zeros(x.shape[0])

    def hand_step() -> None:
        nonlocal avg
        opt.zero_grad()
        surrogate, cost = hand.reinforce_loss(x, baseline=avg)
        surrogate.backward()
        opt.step()
        avg = decay * avg + (1 - decay) * cost

    return {
        "stochgrad EstimatorELBO": lambda: svi_ours.step(x),
        "pyro TraceGraph_ELBO": lambda: svi_pyro.step(x),
        "hand-written torch": hand_step,
        "stochgrad EstimatorELBO (straight_through)": lambda: svi_st.step(x),
        "pyro Trace_ELBO (no baseline)": lambda: svi_lean.step(x),
    }


def time_steps(
    steps: dict[str, Callable[[], None]], repeats: int = 7, per_repeat: int = 20, warmup: int = 5
) -> list[dict[str, Any]]:
    """Median and best milliseconds per step of each method, measured interleaved.

    Each method keeps its own Pyro parameter store (swapped in before its steps), so methods
    do not share parameters. Rows: ``method, median_ms, best_ms``.
    """
    stores: dict[str, Any] = {}
    store = pyro.get_param_store()

    def run(name: str, n: int) -> float:
        store.set_state(stores[name]) if name in stores else store.clear()
        start = time.perf_counter()
        for _ in range(n):
            steps[name]()
        elapsed = time.perf_counter() - start
        stores[name] = store.get_state()
        return elapsed / n

    for name in steps:
        run(name, warmup)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name in steps:
            times[name].append(run(name, per_repeat))
    rows = []
    for name, ts in times.items():
        ts = sorted(ts)
        rows.append({"method": name, "median_ms": 1e3 * ts[len(ts) // 2], "best_ms": 1e3 * ts[0]})
    return rows


__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "LEAKY_SLOPE",
    "BernoulliVAE",
    "TrainConfig",
    "batches",
    "step_functions",
    "time_steps",
    "train",
]
