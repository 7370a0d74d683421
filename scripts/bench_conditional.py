"""Time the paper's promised saving: the expert + output layers, sparse vs dense.

For densities 1, 5, 10, 25, 50, 100% and batch sizes 1, 32, 256, prints the counted
multiply-adds and the wall time of computing only the active experts (two methods) against
the dense masked computation, measured in one run (see
:func:`stochgrad.analysis.reproduce.bench_sparse_inference`).

    python scripts/bench_conditional.py                      # CPU, 1 thread
    python scripts/bench_conditional.py --device cuda        # GPU, when one is available
    python scripts/bench_conditional.py --threads 2 --csv bench.csv
"""

from __future__ import annotations

import argparse

import torch

from stochgrad.analysis.reproduce import (
    BENCH_BATCHES,
    BENCH_DENSITIES,
    bench_sparse_inference,
    format_bench,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BENCH_BATCHES))
    p.add_argument("--densities", type=float, nargs="+", default=list(BENCH_DENSITIES))
    p.add_argument("--experts", type=int, default=2000)
    p.add_argument("--inputs", type=int, default=784)
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    p.add_argument("--min-seconds", type=float, default=0.2, help="time per repeat, at least")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    table = bench_sparse_inference(
        densities=args.densities,
        batches=args.batches,
        device=args.device,
        experts=args.experts,
        inputs=args.inputs,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
    )
    print(
        f"expert + output layers: {args.experts} experts, {args.inputs} inputs, 10 classes; "
        f"device {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    print(format_bench(table))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
