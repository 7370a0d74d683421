"""Short ablations of the conditional-computation training: which setting holds a row back?

Trains one row of the paper's table (default: straight-through) for a few epochs under the
paper's settings and under one change at a time, from the same seed, and prints per variant
the training criterion, training and validation error per epoch, the final sparsity weight λ,
the test error of the best epoch, and two saturation diagnostics of the trained network:
the fraction of the gater's tanh units with |tanh| > 0.99 and the fraction of gates whose
probability of being on is below 0.01 or above 0.99 (validation set).

    python scripts/ablate_conditional.py                           # 4 epochs, every variant
    python scripts/ablate_conditional.py --epochs 8 --variants paper no_max_norm
    python scripts/ablate_conditional.py --row noisy_rectifier --csv ablation.csv

Variants (each changes one thing; "paper" changes nothing):

    paper                as in Sec. 6 (what ``stochgrad reproduce paper`` trains)
    no_max_norm          no max-norm constraint
    momentum             momentum 0.5 (the paper uses it for STS only)
    lr_0.3               learning rate 0.3 instead of 0.1
    lambda_cap_1e4       the sparsity weight λ clipped to [1e-13, 1e4] instead of [1e-13, 1]
    gate_bias_at_target  gate biases start at logit(0.1), so ~10% of the gates are on at first
    glorot               Glorot-uniform weights and zero biases instead of PyTorch's default
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import pandas as pd
import torch

from stochgrad.analysis.reproduce import load_data
from stochgrad.models import conditional as cc

VARIANTS = (
    "paper",
    "no_max_norm",
    "momentum",
    "lr_0.3",
    "lambda_cap_1e4",
    "gate_bias_at_target",
    "glorot",
)


def build(row: str, variant: str, inputs: int, seed: int, base: cc.TrainConfig):
    """``(net, config, controller)`` for one variant; ``controller=None`` is the paper's."""
    torch.manual_seed(seed)
    net = cc.ConditionalNet(row, cc.ConditionalConfig(inputs=inputs))
    config, controller = base, None
    if variant == "no_max_norm":
        config = dataclasses.replace(base, max_norm=math.inf)
    elif variant == "momentum":
        config = dataclasses.replace(base, momentum=0.5)
    elif variant == "lr_0.3":
        config = dataclasses.replace(base, lr=0.3)
    elif variant == "lambda_cap_1e4" and net.gate.sparsity:
        controller = cc.SparsityController(net.gate.sparsity, target=base.density, high=1e4)
    elif variant == "gate_bias_at_target":
        with torch.no_grad():
            net.gater_out.bias.fill_(math.log(base.density / (1 - base.density)))
    elif variant == "glorot":
        for layer in (net.gater_hidden, net.gater_out, net.experts, net.output):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    elif variant != "paper":
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return net, config, controller


@torch.no_grad()
def saturation(net: cc.ConditionalNet, x: torch.Tensor) -> tuple[float, float]:
    """``(fraction of gater tanh units with |tanh| > 0.99, fraction of gates with P(on) < 0.01
    or > 0.99)`` over the examples ``x`` (noise at its mean)."""
    tanh = torch.tanh(net.gater_hidden(x))
    p = net.on_probability(net.gater(x) + net.gate.noise_mean())
    return float((tanh.abs() > 0.99).float().mean()), float(
        ((p < 0.01) | (p > 0.99)).float().mean()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", default="straight_through", help="a row of the paper's table")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="MNIST (default ../shared/data/mnist.npz)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--csv", default=None, help="also write the per-epoch table to this CSV")
    args = p.parse_args()
    cc.gate_type(args.row)  # a clear error for an unknown row, before loading data
    torch.set_num_threads(args.threads)
    data = load_data(args.data)
    base = cc.TrainConfig(epochs=args.epochs, seed=args.seed, progress=False)
    lines, summary = [], []
    for variant in args.variants:
        net, config, controller = build(args.row, variant, data.num_features, args.seed, base)
        start = time.perf_counter()
        result = cc.train(net, data, config, controller=controller, description=variant)
        tanh_sat, gate_sat = saturation(net, data.valid.x[:2000])
        lines += [
            {"row": args.row, "variant": variant, "seed": args.seed, **h} for h in result.history
        ]
        last = result.history[-1]
        summary.append(
            {
                "variant": variant,
                "train_criterion": last["train_criterion"],
                "train_error_%": 100 * last["train_error"],
                "lambda": last["lambda"],
                "valid_error_%": 100 * last["valid_error"],
                "best_epoch": result.best_epoch,
                "test_error_%": 100 * result.test_error,
                "tanh_saturated": tanh_sat,
                "gates_saturated": gate_sat,
                "minutes": (time.perf_counter() - start) / 60,
            }
        )
        print(pd.DataFrame(summary[-1:]).to_string(index=False, float_format="%.4g"), flush=True)
    print(
        f"\n{args.row}, {args.epochs} epoch(s), seed {args.seed}; last-epoch numbers, test error "
        "of the best epoch; saturation on 2000 validation examples"
    )
    print(pd.DataFrame(summary).to_string(index=False, float_format="%.4g"))
    if args.csv:
        pd.DataFrame(lines).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
