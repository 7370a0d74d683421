"""Per-draw throughput and peak memory of every estimator on the toy against tight torch.

    python scripts/bench_estimators.py [--dims 4 200 2000] [--draws 1000 100000 1000000]
                                       [--repeats 3] [--threads N] [--only LABEL ...]
                                       [--memory-budget MIB]

For every estimator and (dim, draws) cell: draws per second for stochgrad's ``estimate()``
and for a tight hand-written reference of the same estimator (preallocated output, chunks
sized to the L2 cache, in-place operations, analytic gradients), their ratio (time ours /
time reference; min of repeats, the two interleaved, all in this one run), the per-call
warm-up of stateful estimators (excluded from ours), and each side's peak resident-memory
increase over the output's size. Finite differences use draws/100; ``exact`` runs at
min(dim, 12). Cells whose output exceeds the memory budget are listed as skipped. The first
line names the machine (CPU model, cores, load average), the torch version and threads.
"""

from __future__ import annotations

import argparse
import sys

from stochgrad.analysis import benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    args = parser.parse_args()
    try:
        benchmark.main_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
