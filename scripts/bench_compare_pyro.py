"""Seconds per gradient draw of ``compare_pyro``: vectorised draws against one ELBO call each.

On ``examples/chain.py`` (or another ``FILE.py:model,guide``), for each estimator, the same
number of draws is run both ways, alternating, in one run; the figures printed are the
per-draw times (best of ``--repeats``) and their ratio.

    python scripts/bench_compare_pyro.py
    python scripts/bench_compare_pyro.py --draws 2000 --estimators score_function straight_through
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stochgrad.analysis.compare_pyro import compare_pyro, load_program

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chain.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyro", default=f"{EXAMPLE}:model,guide", metavar="FILE.py:MODEL,GUIDE")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--estimators",
        nargs="+",
        default=["score_function", "score_function:baseline=leave_one_out", "pyro:tracegraph"],
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, guide, pargs, pkwargs, _ = load_program(args.pyro)
    print(f"{args.pyro}: {args.draws} draws, best of {args.repeats}, {args.threads} thread(s)")
    print(f"{'estimator':40s} {'vectorised s/draw':>18s} {'sequential s/draw':>18s} {'ratio':>7s}")
    for est in args.estimators:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):
            for vec in (True, False):
                table = compare_pyro(
                    model, guide, [est], args.draws, 0, *pargs, kwargs=pkwargs,
                    vectorize=vec, warmup=0,
                )  # fmt: skip
                best[vec] = min(best[vec], float(table["seconds_per_draw"].iloc[0]))
        print(f"{est:40s} {best[True]:18.3g} {best[False]:18.3g} {best[False] / best[True]:7.1f}")


if __name__ == "__main__":
    main()
