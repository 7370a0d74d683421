"""SVI step time of the Bernoulli VAE: our ELBO vs Pyro's TraceGraph_ELBO vs hand-written torch.

Batch 50 of binarised MNIST, 200 binary latents, linear (or nonlinear) encoder and decoder;
every method uses the score function with the same baseline (a moving average per example
position, started at 0) and Adam. The methods are timed interleaved in one run (see
:func:`stochgrad.models.vae.time_steps`), and the ratios come from that run.

    python scripts/bench_svi.py --data ../shared/data/mnist.npz
    python scripts/bench_svi.py --architecture nonlinear --threads 2 --no-validation
"""

from __future__ import annotations

import argparse

import pyro
import torch

from stochgrad.models.data import load_mnist
from stochgrad.models.vae import ARCHITECTURES, step_functions, time_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.npz or a directory of IDX files")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--latents", type=int, default=200)
    p.add_argument("--architecture", choices=ARCHITECTURES, default="linear")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="steps per repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-validation", action="store_true", help="pyro.enable_validation(False)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_validation:
        pyro.enable_validation(False)
    digits = load_mnist(args.data, binarize="threshold")
    x = digits.train.x[: args.batch_size]
    steps = step_functions(x, latents=args.latents, architecture=args.architecture)
    rows = time_steps(steps, repeats=args.repeats, per_repeat=args.steps)
    ref = {r["method"]: r["median_ms"] for r in rows}
    graph, hand = ref["pyro TraceGraph_ELBO"], ref["hand-written torch"]
    print(
        f"Bernoulli VAE ({args.architecture}), {digits.source}, batch {x.shape[0]}, "
        f"{args.latents} latents; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} thread(s), validation "
        f"{'off' if args.no_validation else 'on'}; {args.repeats} x {args.steps} steps each"
    )
    print(f"| {'method':<44} | median ms/step | best ms/step | vs TraceGraph | vs hand |")
    print(f"|{'-' * 46}|---------------:|-------------:|--------------:|--------:|")
    for r in rows:
        m = r["median_ms"]
        print(
            f"| {r['method']:<44} | {m:14.2f} | {r['best_ms']:12.2f} | "
            f"{m / graph:12.2f}x | {m / hand:6.2f}x |"
        )


if __name__ == "__main__":
    main()
