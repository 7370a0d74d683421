"""The Bernoulli VAE as a registered comparison objective (``vae``), and its seeded trainer.

Objective. One fixed minibatch ``x`` of ``batch`` (50) training images, binarised once with a
seeded Bernoulli draw; the stochastic units are the ``batch x latents`` (50 x 200) latents
``z ~ Bern(sigmoid(encoder(x - mean)))``; the cost of a draw is the negative ELBO of the batch,

    L(z) = -(log p(x | z) + log p(z) - log q(z | x))        summed over the batch,

whose expectation under ``q`` is ``-ELBO``. The parameters are those of a
:class:`~stochgrad.models.vae.BernoulliVAE` (encoder, decoder, prior logits), named as in its
``named_parameters()``; the program evaluates the networks with a leading draws dimension.
``arch``: ``linear`` (784 -> 200 affine encoder and decoder) or ``nonlinear`` (784-200-200
with LeakyReLU(0.3) in each direction, the DisARM paper's settings). The encoder sees inputs
centred by the training mean; the decoder's output bias starts at ``logit`` of the mean pixel.

``steps``: ``0`` is the initialisation (seeded by ``seed``); ``N > 0`` is the model after ``N``
steps of :class:`VAETrainer` (Adam, learning rate ``lr``, batch ``batch``, the ``trainer``
estimator, dynamic binarisation), trained at construction and cached under ``cache``
(default ``$STOCHGRAD_CACHE/vae`` or ``~/.cache/stochgrad/vae``), keyed by every option that
shapes the weights; a later construction with the same options loads the cached weights
(training is deterministic, so either way the weights are the same). ``checkpoint=PATH``
instead loads the model of a ``stochgrad train --model vae`` checkpoint.

Data: ``data`` (an ``mnist.npz`` or IDX directory) or the default MNIST location
(:func:`~stochgrad.models.data.default_mnist_path`); without either, scikit-learn's shipped 8x8
digits with a printed note (a smoke-test set, not comparable with published numbers).

Reference. ``10 000`` binary units cannot be enumerated: :meth:`VAE.exact_grad` raises, so
``stochgrad compare`` estimates the reference gradient with an unbiased estimator and uses its
standard error in the z-test; ``reference_draws`` (default 2000) caps the draws it spends on
it. Tiny versions (``batch * latents <= 20`` units) do enumerate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from .base import StochasticObjective
from .vae import ARCHITECTURES, BernoulliVAE

#: The most units :meth:`VAE.exact_grad` enumerates.
MAX_EXACT_UNITS = 20
DEFAULT_TRAINER = "disarm"


def derived_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (stable across processes and platforms)."""
    ints = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    ints += [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_images(data: str | None = None, echo: Any = print) -> tuple[Tensor, Tensor, str]:
    """``(train, test, source)``: grey levels in [0, 1], ``(N, pixels)`` float32.

    ``data``: a path (``mnist.npz`` or an IDX directory); ``None``: the default MNIST location,
    else the shipped 8x8 digits, with a note through ``echo``. The training split is the
    loader's (the first 50 000 MNIST training images), the test split the 10 000 test images.
    """
    from .data import default_mnist_path, load_mnist

    if data is None and default_mnist_path() is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            digits = load_mnist(None)
        if echo is not None:
            echo(
                "note: MNIST not found (pass data=PATH to mnist.npz); using the shipped 8x8 "
                "digits, a smoke-test set whose numbers are not comparable with MNIST's"
            )
    else:
        digits = load_mnist(data)
    return digits.train.x, digits.test.x, str(digits.source)


def _check_int(label: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {v!r}")
    return v


def make_vae(
    train_x: Tensor,
    arch: str = "linear",
    latents: int = 200,
    hidden: int = 200,
    seed: int = 0,
    estimator: Any = None,
) -> BernoulliVAE:
    """The DisARM-paper VAE: LeakyReLU(0.3) nets, centred inputs, output bias at logit(mean).

    Weights are drawn from torch's generator seeded with ``seed`` (the global generator is
    left as it was).
    """
    mean = train_x.mean(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BernoulliVAE(
            pixels=train_x.shape[1],
            latents=latents,
            architecture=arch,
            hidden=hidden,
            estimator=estimator,
            data_mean=mean,
            activation="leaky_relu",
            input_mean=mean,
        )


# ---------------------------------------------------------------------------------------------
# Training: seeded per step, so a run resumed from a checkpoint repeats an uninterrupted one
# ---------------------------------------------------------------------------------------------


def particles_for(estimator: Any) -> int:
    """Particles per ELBO step: ``K`` for a leave-one-out score function, else 1."""
    if getattr(estimator, "baseline", None) == "leave_one_out":
        return int(estimator.num_samples)
    return 1


class VAETrainer:
    """Adam on the ELBO of a :class:`BernoulliVAE`, with one estimator at the latent site.

    Step ``t`` (1-based) uses minibatch ``t`` of a per-epoch permutation seeded by
    ``(seed, epoch)``, binarised by a draw seeded by ``(seed, t)``, and Pyro's generators
    seeded by ``(seed, t)``: the numbers of step ``t`` depend only on the seed, ``t`` and the
    state after step ``t - 1`` (:meth:`state_dict`), never on how the run was split into
    sessions. The gradient is :class:`~stochgrad.estimators.elbo.EstimatorELBO`'s, crediting
    each example's latents with that example's cost (the plate), with ``K`` vectorised
    particles for a leave-one-out score function (``num_samples = K``), else one.
    """

    def __init__(
        self,
        vae: BernoulliVAE,
        train_x: Tensor,
        estimator: Any,
        *,
        batch: int = 50,
        lr: float = 1e-4,
        seed: int = 0,
    ):
        from stochgrad import estimators
        from stochgrad.estimators.elbo import EstimatorELBO

        self.batch = _check_int("batch", batch, 1)
        if batch > train_x.shape[0]:
            raise ValueError(f"batch {batch} is larger than the {train_x.shape[0]} training images")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        self.vae, self.train_x, self.seed, self.lr = vae, train_x, seed, float(lr)
        self.estimator = estimators.get(estimator) if isinstance(estimator, str) else estimator
        vae.estimator = self.estimator
        k = particles_for(self.estimator)
        self.particles = k
        self.elbo = EstimatorELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        self.probe_elbo = EstimatorELBO(
            num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1, update=False
        )
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=self.lr)
        self.step = 0
        self.per_epoch = train_x.shape[0] // self.batch
        self._order: tuple[int, Tensor] | None = None

    def minibatch(self, t: int) -> Tensor:
        """The binarised minibatch of step ``t`` (1-based)."""
        epoch, pos = divmod(t - 1, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            self._order = (epoch, torch.randperm(self.train_x.shape[0], generator=g))
        idx = self._order[1][pos * self.batch : (pos + 1) * self.batch]
        g = torch.Generator().manual_seed(derived_seed(self.seed, "binarise", t))
        grey = self.train_x[idx]
        return (torch.rand(grey.shape, generator=g) < grey).to(grey.dtype)

    def train_step(self) -> float:
        """One Adam step; returns the minibatch's ELBO estimate per example."""
        t = self.step + 1
        xb = self.minibatch(t)
        with torch.random.fork_rng(devices=[]):
            pyro.set_rng_seed(derived_seed(self.seed, "step", t) % 2**32)
            self.optimizer.zero_grad()
            loss = self.elbo.loss_and_grads(self.vae.model, self.vae.guide, xb)
            self.optimizer.step()
        self.step = t
        return -float(loss) / xb.shape[0]

    def gradient_draws(self, x: Tensor, draws: int, seed: int) -> dict[str, Tensor]:
        """``draws`` independent gradients of ``-ELBO(x)`` at the current parameters.

        Per parameter ``(draws, *shape)``; no optimiser step and no estimator state update.
        """
        _check_int("draws", draws, 1)
        params = dict(self.vae.named_parameters())
        out: dict[str, list[Tensor]] = {k: [] for k in params}
        saved = {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}
        with torch.random.fork_rng(devices=[]):
            for i in range(draws):
                pyro.set_rng_seed(derived_seed(seed, "draw", i) % 2**32)
                for p in params.values():
                    p.grad = None
                self.probe_elbo.loss_and_grads(self.vae.model, self.vae.guide, x)
                for k, p in params.items():
                    out[k].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
        for k, p in params.items():
            p.grad = saved[k]
        return {k: torch.stack(v) for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "vae": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator = state["estimator"]
        self.vae.estimator = self.estimator
        self.step = int(state["step"])


def _cache_dir(cache: str | None) -> Path:
    if cache is not None:
        return Path(cache)
    root = os.environ.get("STOCHGRAD_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "stochgrad"
    return base / "vae"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def _linear_layers(module: nn.Module, prefix: str) -> list[str]:
    """Parameter-name prefixes of the affine layers of ``module``, in order."""
    if isinstance(module, nn.Linear):
        return [prefix]
    assert isinstance(module, nn.Sequential)
    return [f"{prefix}.{i}" for i, m in enumerate(module) if isinstance(m, nn.Linear)]


class VAE(StochasticObjective):
    """Negative ELBO of a fixed MNIST minibatch, the 50 x 200 latents as stochastic units."""

    name = "vae"
    description = (
        "Bernoulli VAE on binarised MNIST (batch 50, 200 latents; arch=linear|nonlinear), "
        "at initialisation or after steps=N; reference estimated (not enumerable)"
    )

    def __init__(
        self,
        arch: str = "linear",
        steps: int = 0,
        batch: int = 50,
        latents: int = 200,
        hidden: int = 200,
        seed: int = 0,
        trainer: str = DEFAULT_TRAINER,
        lr: float = 1e-4,
        data: str | None = None,
        cache: str | None = None,
        checkpoint: str | None = None,
        reference_draws: int = 2000,
        device: str | torch.device = "cpu",
    ):
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
        _check_int("steps", steps, 0)
        _check_int("batch", batch, 1)
        _check_int("latents", latents, 1)
        _check_int("hidden", hidden, 1)
        _check_int("seed", seed, 0)
        _check_int("reference_draws", reference_draws, 2)
        if checkpoint is not None and steps:
            raise ValueError("give steps=N or checkpoint=PATH, not both")
        from stochgrad import estimators

        estimators.lookup(trainer)  # a bad trainer name fails here
        self.arch, self.steps, self.batch, self.latents = arch, steps, batch, latents
        self.hidden, self.seed, self.trainer, self.lr = hidden, seed, trainer, float(lr)
        self.data, self.cache, self.checkpoint = data, cache, checkpoint
        self.reference_draws = reference_draws
        train_x, _, source = load_images(data)
        self.source = source
        if batch > train_x.shape[0]:
            raise ValueError(f"batch {batch} is larger than the {train_x.shape[0]} training images")
        vae = make_vae(train_x, arch, latents, hidden, seed)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            vae.load_state_dict(state["trainer"]["vae"] if "trainer" in state else state["vae"])
        elif steps:
            self._trained(vae, train_x)
        g = torch.Generator().manual_seed(derived_seed(seed, "objective batch"))
        idx = torch.randperm(train_x.shape[0], generator=g)[:batch]
        grey = train_x[idx]
        x = (torch.rand(grey.shape, generator=g) < grey).to(torch.float32)
        self._setup(vae, x, device)

    # -- construction helpers ------------------------------------------------------------------

    def _cache_key(self) -> str:
        key = {
            "arch": self.arch,
            "steps": self.steps,
            "batch": self.batch,
            "latents": self.latents,
            "hidden": self.hidden,
            "seed": self.seed,
            "trainer": self.trainer,
            "lr": self.lr,
            "source": self.source,
            "version": 1,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _trained(self, vae: BernoulliVAE, train_x: Tensor) -> None:
        path = _cache_dir(self.cache) / f"{self.arch}-{self.steps}-{self._cache_key()}.pt"
        if path.is_file():
            vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        trainer = VAETrainer(vae, train_x, self.trainer, batch=self.batch, lr=self.lr,
                             seed=self.seed)  # fmt: skip
        for _ in range(self.steps):
            trainer.train_step()
        vae.estimator = None
        _atomic_save(vae.state_dict(), path)

    def _setup(self, vae: BernoulliVAE, x: Tensor, device: str | torch.device) -> None:
        self.pixels = vae.pixels
        self.x = x.to(device)
        mean = vae.input_mean if isinstance(vae.input_mean, Tensor) else torch.zeros(vae.pixels)
        self.x_centred = (x - mean).to(device)
        self.encoder_layers = _linear_layers(vae.encoder, "encoder")
        self.decoder_layers = _linear_layers(vae.decoder, "decoder")
        self.activation = vae.activation
        self.params = {
            k: v.detach().clone().to(device).requires_grad_(True) for k, v in vae.named_parameters()
        }

    @classmethod
    def from_module(cls, vae: BernoulliVAE, x: Tensor) -> VAE:
        """The objective of ``vae``'s current parameters on the binary batch ``x``."""
        self = cls.__new__(cls)
        self.arch, self.steps, self.batch, self.latents = (
            vae.architecture,
            0,
            x.shape[0],
            vae.latents,
        )
        self.hidden, self.seed, self.trainer, self.lr = vae.hidden, 0, DEFAULT_TRAINER, 1e-4
        self.data = self.cache = self.checkpoint = None
        self.reference_draws, self.source = 2000, "given"
        self._setup(vae, x, "cpu")
        return self

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arch": self.arch,
            "steps": self.steps,
            "batch": self.batch,
            "latents": self.latents,
            "hidden": self.hidden,
            "seed": self.seed,
            "trainer": self.trainer,
            "lr": self.lr,
            "reference_draws": self.reference_draws,
            "source": self.source,
        }
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return out

    # -- the program ---------------------------------------------------------------------------

    def _net(self, layers: list[str], h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        for i, name in enumerate(layers):
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]  # (D, out, in), (D, out)
            h = torch.matmul(h, w.transpose(-1, -2)) + b.unsqueeze(-2)
            if i < len(layers) - 1:
                h = torch.nn.functional.leaky_relu(h, 0.3) if self.activation == "leaky_relu" \
                    else torch.tanh(h)  # fmt: skip
        return h

    def model(self, params: Mapping[str, Tensor]) -> Tensor:
        logits = self._net(self.encoder_layers, self.x_centred, params)  # (D, batch, latents)
        z = pyro.sample("z", dist.Bernoulli(logits=logits).to_event(2))
        log_q = (z * logits - nn.functional.softplus(logits)).sum((-1, -2))
        prior = params["prior_logits"].unsqueeze(-2)  # (D, 1, latents)
        log_prior = (z * prior - nn.functional.softplus(prior)).sum((-1, -2))
        out = self._net(self.decoder_layers, z, params)  # (D, batch, pixels)
        log_lik = (self.x * out - nn.functional.softplus(out)).sum((-1, -2))
        return -(log_lik + log_prior - log_q)

    # -- references ----------------------------------------------------------------------------

    def _units(self) -> int:
        return int(self.x.shape[0]) * int(self.params["prior_logits"].shape[-1])

    def exact_grad(self) -> dict[str, Tensor]:
        if self._units() > MAX_EXACT_UNITS:
            raise NotImplementedError(
                f"vae: {self._units()} binary latents cannot be enumerated (at most "
                f"{MAX_EXACT_UNITS}); the reference gradient is estimated"
            )
        return super().exact_grad()

    def expected_cost(self) -> Tensor:
        if self._units() > MAX_EXACT_UNITS:
            raise NotImplementedError(
                f"vae: {self._units()} binary latents cannot be enumerated; use a Monte Carlo mean"
            )
        return super().expected_cost()


__all__ = ["VAE", "VAETrainer", "derived_seed", "load_images", "make_vae", "particles_for"]
