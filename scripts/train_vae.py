"""Train the Bernoulli VAE (sigmoid belief net) on binarised MNIST with SVI, per estimator.

For each estimator spec, trains a fresh VAE (same seed) with
:class:`~stochgrad.estimators.elbo.EstimatorELBO` and the spec set on the guide's latent site,
logging the train ELBO and a multi-sample test bound; writes ``OUT/curves.csv`` (one row per
estimator and evaluation) and ``OUT/elbo_curves.png``. The spec ``tracegraph`` is stock Pyro
(``TraceGraph_ELBO`` with its decaying-average baseline), for comparison.

    python scripts/train_vae.py --data ../shared/data/mnist.npz --epochs 5
    python scripts/train_vae.py --estimators score_function:baseline=moving_average \\
        score_function:baseline=learned straight_through --architecture nonlinear
    python scripts/train_vae.py --max-steps 200 --out /tmp/vae     # quick look

Without ``--data`` the default MNIST location is tried, then scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import argparse
import os

import pandas as pd
import torch
from pyro.infer import TraceGraph_ELBO
from tqdm import tqdm

from stochgrad import estimators
from stochgrad.analysis.compare import parse_spec
from stochgrad.models.data import load_mnist
from stochgrad.models.vae import ARCHITECTURES, BernoulliVAE, TrainConfig, train

DEFAULT_SPECS = [
    "score_function:baseline=moving_average",
    "score_function:baseline=optimal",
    "score_function:baseline=learned",
    "straight_through",
]


def build(spec: str, pixels: int, args: argparse.Namespace, mean: torch.Tensor):
    """The VAE and ELBO object for one spec."""
    common = dict(
        pixels=pixels,
        latents=args.latents,
        architecture=args.architecture,
        hidden=args.hidden,
        data_mean=mean,
    )
    if spec == "tracegraph":
        return BernoulliVAE(pyro_baseline={"use_decaying_avg_baseline": True}, **common), (
            TraceGraph_ELBO()
        )
    name, options = parse_spec(spec)
    return BernoulliVAE(estimator=estimators.get(name, **options), **common), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.npz or a directory of IDX files")
    p.add_argument("--estimators", nargs="+", default=DEFAULT_SPECS, metavar="SPEC")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="linear")
    p.add_argument("--latents", type=int, default=200)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--test-samples", type=int, default=100, help="K of the test bound")
    p.add_argument("--eval-size", type=int, default=1000, help="test examples evaluated")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--eval-every-steps", type=int, default=None, help="and steps between them")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="vae_results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_mnist(args.data)
    train_x, test_x = digits.train.x, digits.test.x
    pixels = train_x.shape[1]
    print(
        f"data: {digits.source} ({len(digits.train)} train, {len(digits.test)} test, {pixels} px)"
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        test_samples=args.test_samples,
        eval_every=args.eval_every,
        eval_every_steps=args.eval_every_steps,
        eval_size=args.eval_size,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    frames = []
    for spec in args.estimators:
        torch.manual_seed(args.seed)
        vae, elbo = build(spec, pixels, args, train_x.mean(0))
        with tqdm(total=total, desc=spec, unit="step") as bar:

            def progress(step: int, loss: float, bar: tqdm = bar) -> None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(elbo=f"{-loss:.2f}")

            rows = train(vae, train_x, test_x, config, elbo=elbo, progress=progress)
        table = pd.DataFrame(rows)
        table.insert(0, "estimator", spec)
        frames.append(table)
        last = rows[-1]
        print(
            f"{spec}: train ELBO {last['train_elbo']:.2f}, test ELBO {last['test_elbo']:.2f}, "
            f"{args.test_samples}-sample bound {last['test_bound']:.2f} "
            f"({last['seconds'] / max(last['step'], 1) * 1e3:.2f} ms/step)"
        )
    curves = pd.concat(frames, ignore_index=True)
    os.makedirs(args.out, exist_ok=True)
    curves.to_csv(os.path.join(args.out, "curves.csv"), index=False)
    plot(curves, os.path.join(args.out, "elbo_curves.png"), args.test_samples)
    print(f"wrote {args.out}/curves.csv and {args.out}/elbo_curves.png")


def plot(curves: pd.DataFrame, path: str, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (spec, df) in enumerate(curves.groupby("estimator", sort=False)):
        color = f"C{i}"
        ax.plot(df["step"], df["train_elbo"], "--", color=color, alpha=0.7)
        ax.plot(df["step"], df["test_bound"], "-o", color=color, label=spec, ms=3)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("nats per example")
    ax.set_title(f"Bernoulli VAE: train ELBO (dashed), {samples}-sample test bound (solid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
