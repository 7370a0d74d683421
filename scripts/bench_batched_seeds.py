"""Time S seeds of one row trained batched against S separate sequential runs.

For each thread count and S in (1, 2, 4): one epoch of a fixed number of minibatches of the
paper's network (784 inputs, 400 tanh gater units, 2000 gates and experts, minibatch 32) per
seed, with its end-of-epoch evaluation and final test numbers on small validation and test
sets, trained by ``stochgrad.models.conditional.train`` once per seed and by
``stochgrad.models.conditional_batched.train_seeds`` for all seeds at once. Both are timed in
the same run, interleaved, best of ``--repeats``; the table gives training steps per second
(seeds x minibatches / wall time) and the batched / sequential ratio. The batched numbers are
checked against the sequential ones: the largest difference of any weight is printed (float
rounding of the matrix products, which grows over the steps of the 2000-unit layers).

    python scripts/bench_batched_seeds.py                      # CPU, 1 and 2 threads
    python scripts/bench_batched_seeds.py --threads 1 --row sts
    python scripts/bench_batched_seeds.py --device cuda        # on a GPU, when there is one
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
import warnings

import torch

from stochgrad.analysis.reproduce import load_data
from stochgrad.models import conditional as cc
from stochgrad.models.conditional_batched import SeedRun, batchable, train_seeds
from stochgrad.models.data import Split, default_mnist_path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _runs(gate, seeds, config, net_config, device):
    return [SeedRun.build(gate, s, config, net_config, device) for s in seeds]


def _time_sequential(gate, seeds, config, net_config, data, device):
    runs = _runs(gate, seeds, config, net_config, device)
    _sync(device)
    start = time.perf_counter()
    results = []
    for r in runs:
        torch.set_rng_state(r.rng["cpu"])  # type: ignore[arg-type]
        if r.rng["cuda"] is not None:
            torch.cuda.set_rng_state(r.rng["cuda"], device)
        results.append(cc.train(r.net, data, r.config))
    _sync(device)
    return time.perf_counter() - start, results


def _time_batched(gate, seeds, config, net_config, data, device):
    runs = _runs(gate, seeds, config, net_config, device)
    _sync(device)
    start = time.perf_counter()
    results = train_seeds(runs, data)
    _sync(device)
    return time.perf_counter() - start, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", default="straight_through", help="row of the table (not sbn)")
    p.add_argument("--protocol", default="original", choices=list(cc.PROTOCOLS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4], help="values of S")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    p.add_argument("--steps", type=int, default=20, help="minibatches per epoch (default 20)")
    p.add_argument("--eval", type=int, default=100, help="validation and test examples")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--data", default=None, help="MNIST path (default: as reproduce paper)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    gate = cc.original_gate(args.row) if args.protocol == "original" else cc.gate_type(args.row)
    if not batchable(gate):
        p.error(f"row {args.row!r} has a stateful gate estimator: not trained batched")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = load_data(args.data if args.data or default_mnist_path() else None)
    batch = 32
    n = args.steps * batch
    if len(data.train) < n:
        p.error(f"need {n} training examples for --steps {args.steps}, have {len(data.train)}")
    data = dataclasses.replace(
        data,
        train=Split(data.train.x[:n], data.train.y[:n]),
        valid=Split(data.valid.x[: args.eval], data.valid.y[: args.eval]),
        test=Split(data.test.x[: args.eval], data.test.y[: args.eval]),
    )
    net_config = cc.ConditionalConfig(inputs=data.num_features)
    config = cc.for_protocol(args.protocol, epochs=1, batch_size=batch, progress=False)
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs; platform {platform.platform()}; "
        f"torch {torch.__version__}; device {args.device}"
    )
    print(
        f"row {args.row} ({args.protocol}), {data.source} inputs {data.num_features}, "
        f"{net_config.gater_hidden} gater units, {gate.units} gates; one epoch of {args.steps} "
        f"minibatches of {batch} per seed + evaluation on {args.eval} valid / {args.eval} test "
        f"examples; best of {args.repeats}"
    )
    print()
    print("| threads | S | sequential s | batched s | sequential steps/s | batched steps/s "
          "| batched / sequential | max weight difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    total = time.perf_counter()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for S in args.seeds:
            seeds = list(range(S))
            best_seq = best_bat = float("inf")
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                t_seq, seq = _time_sequential(gate, seeds, config, net_config, data, args.device)
                t_bat, bat = _time_batched(gate, seeds, config, net_config, data, args.device)
                best_seq, best_bat = min(best_seq, t_seq), min(best_bat, t_bat)
            diff = max(
                float((b.state_dict[k] - v).abs().max())
                for a, b in zip(seq, bat)
                for k, v in a.state_dict.items()
            )
            if not diff < 1e-3:  # rounding stays far below; a different stream would not
                raise AssertionError(f"S={S}: batched weights differ from sequential by {diff}")
            steps = S * args.steps
            print(
                f"| {torch.get_num_threads()} | {S} | {best_seq:.2f} | {best_bat:.2f} "
                f"| {steps / best_seq:.1f} | {steps / best_bat:.1f} "
                f"| {best_seq / best_bat:.2f}x | {diff:.1e} |",
                flush=True,
            )
    print(f"\n(total {time.perf_counter() - total:.0f} s)")


if __name__ == "__main__":
    main()
