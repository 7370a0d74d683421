"""Per-draw throughput of every estimator on the toy (dim 200) against hand-written torch.

    python scripts/bench_estimators.py [--draws 100000] [--repeats 3] [--threads N]
                                       [--only LABEL ...]

Prints one row per estimator: draws per second for stochgrad and for a hand-written
vectorised reference of the same estimator, and their ratio (time ours / time reference),
all measured in this one run. Finite differences use draws/100 (2 x 200 evaluations a draw);
``exact`` runs on a 12-unit toy (the 200-unit toy cannot be enumerated). ``relax``'s reference
uses the state its own warm-up trained (the network included); its warm-up time is a column.
``--only`` keeps the estimators whose label starts with one of the given names.
"""

from __future__ import annotations

import argparse

import torch

from stochgrad.analysis import benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")
    cases = benchmark.default_cases(args.draws, args.dim)
    if args.only:
        cases = [c for c in cases if any(c.label.startswith(o) for o in args.only)]
        if not cases:
            parser.error(f"no estimator label starts with {' or '.join(args.only)}")
    rows = benchmark.run(cases, repeats=args.repeats)
    print(benchmark.format_table(rows))


if __name__ == "__main__":
    main()
