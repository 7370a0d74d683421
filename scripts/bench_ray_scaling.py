"""Cells per minute of a `compare` grid through the Ray executor with 1 and 2 worker processes.

A local Ray instance with N CPUs runs N cells at once (one CPU per cell, one torch thread
each). The grid: ``--models`` toy models of dimension ``--dim`` (targets 0.40, 0.41, ...) times
the score-function and straight-through estimators, ``--draws`` draws per cell, so each cell
lasts seconds rather than milliseconds. Prints, per N, the wall time of the grid, cells per
minute, and the speed-up of 2 over 1 measured in the same run; also the load average before and
after (other jobs on the machine share its cores). Each N starts its own Ray instance; its
start-up is left out of the timing (the clock starts once one trivial task has run on each of
its N worker processes), the import of the package by the workers is not."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from stochgrad.analysis.compare import run_compare
from stochgrad.analysis.executor import RayExecutor

ESTIMATORS = ["score_function", "straight_through"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--draws", type=int, default=600_000)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--models", type=int, default=4, help="toy models with targets 0.40, 0.41, ...")
    a = p.parse_args()
    import ray

    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker process
    models = [f"toy:dim={a.dim},target=0.{40 + i}" for i in range(a.models)]
    cells = len(models) * len(ESTIMATORS)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates = {}
    for workers in (1, 2):
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        up = ray.remote(lambda: os.getpid())
        ray.get([up.remote() for _ in range(workers)])  # the instance is up before the clock
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            table = run_compare(
                models, ESTIMATORS, a.draws, 0, out=out, progress=False,
                echo=lambda s: None, executor=RayExecutor(progress=False),
            )  # fmt: skip
            dt = time.perf_counter() - t0
        ray.shutdown()
        per_cell = float((table["seconds_per_draw"] * table["draws"]).groupby(
            [table["model"], table["estimator"]]).first().mean())  # fmt: skip
        rates[workers] = 60 * cells / dt
        print(
            f"{workers} worker(s): {cells} cells in {dt:.1f} s = {rates[workers]:.1f} cells/min "
            f"(a cell's own draws took {per_cell:.1f} s on average)"
        )
    print(f"speed-up 2 vs 1 worker: {rates[2] / rates[1]:.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
