"""Cells per minute of a `compare` grid through the Ray executor with 1 and 2 worker processes.

A local Ray instance with N CPUs runs N cells at once (one CPU per cell). Prints one line per N.
Each run starts its own Ray instance; its start-up is left out of the timing (the clock starts
once one trivial task has run), the start of the worker processes for the cells is not."""

from __future__ import annotations

import argparse
import tempfile
import time

from stochgrad.analysis.compare import run_compare
from stochgrad.analysis.executor import RayExecutor

ESTIMATORS = ["score_function", "straight_through", "spsa", "finite_difference"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--draws", type=int, default=20_000)
    p.add_argument("--seeds", type=int, default=3, help="models toy with seeds 0..N-1 as cells")
    a = p.parse_args()
    import ray

    models = [f"toy:dim=50,target=0.{40 + i}" for i in range(a.seeds)]
    cells = len(models) * len(ESTIMATORS)
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray.get(ray.remote(lambda: 0).remote())  # the instance is up before the clock starts
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run_compare(models, ESTIMATORS, a.draws, 0, out=out, progress=False,
                        echo=lambda s: None, executor=RayExecutor(progress=False))
            dt = time.perf_counter() - t0
        ray.shutdown()
        print(f"{workers} worker(s): {cells} cells in {dt:.1f} s = {60 * cells / dt:.1f} cells/min")


if __name__ == "__main__":
    main()
