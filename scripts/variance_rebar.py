"""Variance of rebar and relax against the score function and ARM: toy (dim 200, t = 0.45 and
t = 0.499, logits 0) and ``sbn``, 5000 draws, seed 0, through ``analysis.compare``.

    OMP_NUM_THREADS=1 python scripts/variance_rebar.py [--draws 5000] [--seed 0]

Prints, per estimator, ``compare``'s ``variance`` column (the per-coordinate variance averaged
over coordinates) on each toy and, on ``sbn``, that column summed over its six parameters
("sbn total"), plus the state rebar / relax adapted to on the t = 0.45 toy. The same numbers
come from ``stochgrad compare --models sbn toy:target=0.45 toy:target=0.499 --estimators
score_function arm rebar relax --draws 5000 --seed 0``.
"""

from __future__ import annotations

import argparse

from stochgrad import estimators, models
from stochgrad.analysis.compare import compare, make_estimator

SPECS = ["score_function", "arm", "rebar", "relax", "relax:warmup_steps=1000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    toys = {t: models.get("toy", dim=200, target=t, logits=0.0) for t in (0.45, 0.499)}
    sbn = models.get("sbn")
    ests = [make_estimator(s) for s in SPECS]
    cols: dict[str, list[float]] = {s: [] for s in SPECS}
    for obj in [*toys.values(), sbn]:
        table = compare(obj, ests, args.draws, args.seed)
        for spec, est in zip(SPECS, ests):
            rows = table[table["estimator"] == est.label()]
            cols[spec].append(float(rows["variance"].sum()))
    print(f"{'estimator':26} {'toy t=0.45':>11} {'toy t=0.499':>12} {'sbn total':>10}")
    for spec in SPECS:
        a, b, c = cols[spec]
        print(f"{spec:26} {a:>11.3g} {b:>12.3g} {c:>10.3g}")
    for spec in ("rebar", "relax", "relax:warmup_steps=1000"):
        est = make_estimator(spec)
        assert isinstance(est, estimators.Estimator)
        est.estimate(toys[0.45], 1, seed=args.seed)
        state = est.state_dict()
        print(
            f"{spec} on toy t=0.45: lambda {float(state['log_temperature'].exp()):.3f}, "
            f"eta {float(state['eta']):.3f}"
        )


if __name__ == "__main__":
    main()
