"""``stochgrad train --model vae``: Bernoulli-VAE training curves per estimator, resumable.

Settings (Dong, Mnih & Tucker 2020, DisARM, Sec. 6): dynamically binarised MNIST, batch 50,
200 binary latents, Adam with learning rate 1e-4 on encoder, decoder and prior, encoder
inputs centred by the training mean, decoder output bias at ``logit`` of the mean pixel;
``linear`` (affine encoder / decoder) or ``nonlinear`` (784-200-200, LeakyReLU(0.3)). Each
(estimator, seed) is a :class:`~stochgrad.models.vae_objective.VAETrainer`; the estimator
acts at the latent site of the Pyro model through
:class:`~stochgrad.estimators.elbo.EstimatorELBO`, each example's latents credited with that
example's ELBO; a leave-one-out score function with ``num_samples = K`` uses ``K`` particles.

Log. Every ``eval_every`` steps (and at step 0) a row per (estimator, seed):

- ``batch_elbo``: mean of the minibatch ELBO estimates of the steps since the last row;
- ``train_elbo`` / ``test_elbo``: the one-sample ELBO per example on ``eval_size`` training /
  test images (each binarised once with a fixed seed), averaged over those images;
- ``test_iw``: the ``test_samples``-sample importance-weighted bound on the first
  ``iw_size`` test images (only when ``test_samples > 0``);
- ``log_var_encoder``: ``log`` of the mean over encoder coordinates of the variance of
  ``variance_draws`` independent gradient draws at the current parameters, on the next
  step's minibatch (natural log; the quantity of the REBAR / RELAX / DisARM variance plots);
- ``seconds``: training time so far (evaluations excluded).

Files under ``out``: ``run.json`` (the configuration; a re-run must match it except for
``steps``), ``cells/<estimator>/seed<k>.csv`` and ``seed<k>.ckpt`` (model, optimiser,
estimator state, the rows so far; written atomically after every evaluation), ``curves.csv``
(all rows) and ``figures/elbo.{png,pdf}``, ``figures/log_variance.{png,pdf}``.

Resuming. Cells advance in rounds of ``eval_every`` steps, one cell after the other, so all
cells progress together and each is checkpointed at every evaluation. Every random number of
step ``t`` is seeded by ``(seed, t)`` (:class:`~stochgrad.models.vae_objective.VAETrainer`),
so a run stopped at any point and started again with the same command (or with a larger
``--steps``) continues from the checkpoints and produces the numbers of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from stochgrad.models.vae import ARCHITECTURES, BernoulliVAE
from stochgrad.models.vae_objective import VAETrainer, derived_seed, load_images, make_vae

__all__ = [
    "DEFAULT_ESTIMATORS",
    "LOG_COLUMNS",
    "elbo_per_example",
    "encoder_log_variance",
    "plot_curves",
    "run_train_vae",
]

DEFAULT_ESTIMATORS = (
    "score_function:baseline=leave_one_out,num_samples=2",
    "straight_through",
    "disarm",
)

LOG_COLUMNS = [
    "estimator",
    "seed",
    "step",
    "seconds",
    "batch_elbo",
    "train_elbo",
    "test_elbo",
    "test_iw",
    "log_var_encoder",
]

#: Options recorded in run.json that a resumed run must repeat (everything but ``steps``).
_CONFIG_KEYS = (
    "arch",
    "estimators",
    "seeds",
    "lr",
    "batch",
    "latents",
    "hidden",
    "eval_every",
    "eval_size",
    "test_samples",
    "iw_size",
    "variance_draws",
    "data",
)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def elbo_per_example(vae: BernoulliVAE, x: Tensor, samples: int, seed: int) -> float:
    """Mean over ``x`` of the ``samples``-sample bound (1: the ELBO), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "bound", samples) % 2**63)
        chunk = max(1, 20000 // samples)
        return float(vae.bound(x, samples, chunk=chunk).mean())


def encoder_log_variance(grads: dict[str, Tensor]) -> float:
    """``log`` of the mean per-coordinate variance (``n - 1`` divisor) of the encoder grads."""
    flat = torch.cat([g.flatten(1) for k, g in grads.items() if k.startswith("encoder.")], 1)
    var = flat.double().var(0, unbiased=True).mean()
    return float(torch.log(var)) if var > 0 else float("-inf")


# ---------------------------------------------------------------------------------------------
# One (estimator, seed) cell
# ---------------------------------------------------------------------------------------------


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


class _Cell:
    def __init__(self, label: str, spec: Any, seed: int, run: _Run):
        from .compare import make_estimator

        self.label, self.seed, self.run = label, seed, run
        self.dir = run.out / "cells" / _safe(label) if run.out is not None else None
        est = make_estimator(spec)
        vae = make_vae(run.train_x, run.arch, run.latents, run.hidden, seed)
        self.trainer = VAETrainer(vae, run.train_x, est, batch=run.batch, lr=run.lr, seed=seed)
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.running: list[float] = []
        if self.dir is not None and self.ckpt.is_file():
            state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            self.trainer.load_state_dict(state["trainer"])
            self.rows, self.seconds = list(state["rows"]), float(state["seconds"])
        if not self.rows:
            self.evaluate()

    @property
    def ckpt(self) -> Path:
        assert self.dir is not None
        return self.dir / f"seed{self.seed}.ckpt"

    @property
    def step(self) -> int:
        return self.trainer.step

    def advance(self, target: int, tick: Callable[[], None]) -> None:
        import time

        while self.trainer.step < target:
            t0 = time.perf_counter()
            self.running.append(self.trainer.train_step())
            self.seconds += time.perf_counter() - t0
            tick()
        self.evaluate()

    def evaluate(self) -> None:
        run, tr = self.run, self.trainer
        vae, step = tr.vae, tr.step
        s = derived_seed(self.seed, "eval", step)
        row: dict[str, Any] = {
            "estimator": self.label,
            "seed": self.seed,
            "step": step,
            "seconds": round(self.seconds, 3),
            "batch_elbo": sum(self.running) / len(self.running) if self.running else math.nan,
            "train_elbo": elbo_per_example(vae, run.train_eval, 1, s),
            "test_elbo": elbo_per_example(vae, run.test_eval, 1, s),
            "test_iw": math.nan,
            "log_var_encoder": math.nan,
        }
        if run.test_samples:
            row["test_iw"] = elbo_per_example(
                vae, run.test_eval[: run.iw_size], run.test_samples, s
            )
        if run.variance_draws >= 2:
            grads = tr.gradient_draws(tr.minibatch(step + 1), run.variance_draws, s)
            row["log_var_encoder"] = encoder_log_variance(grads)
        self.rows.append(row)
        self.running = []
        if self.dir is not None:
            self.save()

    def save(self) -> None:
        assert self.dir is not None
        frame = pd.DataFrame(self.rows, columns=LOG_COLUMNS)
        _atomic_write(self.dir / f"seed{self.seed}.csv", lambda p: frame.to_csv(p, index=False))
        state = {"trainer": self.trainer.state_dict(), "rows": self.rows, "seconds": self.seconds}
        _atomic_write(self.ckpt, lambda p: torch.save(state, p))


@dataclass
class _Run:
    out: Path | None
    arch: str
    latents: int
    hidden: int
    batch: int
    lr: float
    train_x: Tensor
    train_eval: Tensor
    test_eval: Tensor
    test_samples: int
    iw_size: int
    variance_draws: int


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _check(name: str, v: Any, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an int >= {minimum}, got {v!r}")


def run_train_vae(
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    *,
    arch: str = "linear",
    steps: int = 10_000,
    seeds: int = 1,
    seed: int = 0,
    lr: float = 1e-4,
    batch: int = 50,
    latents: int = 200,
    hidden: int = 200,
    eval_every: int = 1000,
    eval_size: int = 10_000,
    test_samples: int = 0,
    iw_size: int = 1000,
    variance_draws: int = 20,
    data: str | None = None,
    out: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """Train every (estimator, seed) to ``steps`` steps; return all log rows (:data:`LOG_COLUMNS`).

    See the module docstring for the log, the files and resuming. ``seeds``: runs per
    estimator, seeds ``seed, seed + 1, ...``; ``steps`` must be a multiple of ``eval_every``.
    """
    from tqdm.auto import tqdm

    from .compare import _estimator_label, _unique, make_estimator

    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    for name, v, lo in [
        ("steps", steps, 1), ("seeds", seeds, 1), ("seed", seed, 0), ("batch", batch, 1),
        ("latents", latents, 1), ("hidden", hidden, 1), ("eval_every", eval_every, 1),
        ("eval_size", eval_size, 1), ("test_samples", test_samples, 0), ("iw_size", iw_size, 1),
        ("variance_draws", variance_draws, 0),
    ]:  # fmt: skip
        _check(name, v, lo)
    if steps % eval_every:
        raise ValueError(
            f"--steps {steps} must be a multiple of --eval-every {eval_every} (evaluations "
            "fall on multiples of --eval-every, which keeps a run extendable)"
        )
    if variance_draws == 1:
        raise ValueError("--variance-draws must be 0 (off) or >= 2 (a variance needs 2 draws)")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {lr!r}")
    estimators = list(estimators)
    if not estimators:
        raise ValueError("no estimators given")
    for e in estimators:
        est = make_estimator(e)
        if "Bernoulli" not in getattr(est, "site_distributions", ()):
            raise ValueError(f"estimator {_estimator_label(e)!r} cannot act at a Bernoulli site")
    labels = _unique([_estimator_label(e) for e in estimators])
    run_seeds = [seed + i for i in range(seeds)]

    train_x, test_x, source = load_images(data, echo=echo)
    if batch > train_x.shape[0]:
        raise ValueError(f"--batch {batch} is larger than the {train_x.shape[0]} training images")
    config = {
        "arch": arch, "estimators": labels, "seeds": run_seeds, "lr": lr, "batch": batch,
        "latents": latents, "hidden": hidden, "eval_every": eval_every, "eval_size": eval_size,
        "test_samples": test_samples, "iw_size": iw_size, "variance_draws": variance_draws,
        "data": source,
    }  # fmt: skip
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _open(out_path, config, steps, echo)

    g = torch.Generator().manual_seed(derived_seed(seed, "evaluation images"))

    def fixed(x: Tensor) -> Tensor:
        x = x[:eval_size]
        return (torch.rand(x.shape, generator=g) < x).to(torch.float32)

    run = _Run(
        out=out_path, arch=arch, latents=latents, hidden=hidden, batch=batch, lr=lr,
        train_x=train_x, train_eval=fixed(train_x), test_eval=fixed(test_x),
        test_samples=test_samples, iw_size=iw_size, variance_draws=variance_draws,
    )  # fmt: skip
    cells = [_Cell(lab, spec, s, run) for spec, lab in zip(estimators, labels) for s in run_seeds]
    done = sum(min(c.step, steps) for c in cells)
    if done and echo is not None:
        echo(f"resuming {out}: {done} of {steps * len(cells)} steps already done")
    title = f"Bernoulli VAE ({arch}), {source}"

    def table() -> pd.DataFrame:
        rows = [r for c in cells for r in c.rows if r["step"] <= steps]
        return pd.DataFrame(rows, columns=LOG_COLUMNS)

    def write() -> None:  # the merged log and the figures, after every round
        if out_path is None:
            return
        t = table()
        _atomic_write(out_path / "curves.csv", lambda p: t.to_csv(p, index=False))
        if plots:
            plot_curves(t, out_path / "figures", title=title)

    with tqdm(
        total=steps * len(cells), initial=done, desc="train vae", unit="step",
        disable=None if progress is None else not progress,
    ) as bar:  # fmt: skip
        for target in range(eval_every, steps + 1, eval_every):
            moved = False
            for c in cells:
                if c.step < target:
                    import pyro

                    pyro.clear_param_store()
                    c.advance(target, lambda: bar.update(1))
                    last = c.rows[-1]
                    bar.set_postfix_str(f"{c.label} s{c.seed} test ELBO {last['test_elbo']:.1f}")
                    moved = True
            if moved:
                write()
    if out_path is not None and not (out_path / "curves.csv").is_file():
        write()
    return table()


def _open(out: Path, config: dict[str, Any], steps: int, echo: Any) -> None:
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in _CONFIG_KEYS if old.get("config", {}).get(k) != config.get(k)]
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}: "
                f"{', '.join(repr(old['config'].get(k)) for k in diff)}); use another --out "
                "or the same options"
            )
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": "train_vae", "config": config, "steps": steps}
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(record, indent=2) + "\n"))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_curves(table: pd.DataFrame, directory: str | os.PathLike, title: str = "") -> list[str]:
    """``elbo`` (train and test ELBO) and ``log_variance`` figures, PNG and PDF.

    One line per estimator (the mean over seeds), the band spans the seeds (min to max).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    seeds = table["seed"].nunique() if not table.empty else 0
    band = f"band: range over {seeds} seeds" if seeds > 1 else "one seed"

    def lines(ax: Any, column: str) -> None:
        for i, (label, df) in enumerate(table.groupby("estimator", sort=False)):
            stats = df.groupby("step")[column].agg(["mean", "min", "max"]).dropna()
            if stats.empty:
                continue
            color = f"C{i}"
            ax.plot(stats.index, stats["mean"], color=color, label=label, lw=1.5)
            if seeds > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.25)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)

    def limits(columns: list[str]) -> tuple[float, float] | None:
        # keep the early, very low ELBOs from flattening the curves of interest
        vals = pd.concat([table[table["step"] > 0][c] for c in columns]).dropna()
        if vals.empty:
            return None
        lo, hi = float(vals.quantile(0.05)), float(vals.max())
        pad = max(0.15 * (hi - lo), 0.5)
        return lo - pad, hi + 0.3 * pad

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, column, name in [(axes[0], "train_elbo", "training"), (axes[1], "test_elbo", "test")]:
        lines(ax, column)
        ax.set_title(f"{name} ELBO (nats per example)")
    lim = limits(["train_elbo", "test_elbo"])
    if lim is not None:
        axes[0].set_ylim(*lim)
    axes[0].set_ylabel("ELBO")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}; {band}", fontsize=10)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        path = directory / f"elbo.{ext}"
        fig.savefig(path, dpi=130)
        written.append(str(path))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines(ax, "log_var_encoder")
    ax.set_ylabel("log mean variance of encoder gradient")
    ax.set_title(f"{title}; {band}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        path = directory / f"log_variance.{ext}"
        fig.savefig(path, dpi=130)
        written.append(str(path))
    plt.close(fig)
    return written
