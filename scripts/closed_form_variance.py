"""Measured vs closed-form variance of the single-draw estimators on the toy.

    python scripts/closed_form_variance.py [--draws 100000] [--seed 0]

For each estimator with a closed form (:meth:`stochgrad.models.Toy.closed_form_variance`) it
prints the closed form, the measured variance (the SPEC's: per-coordinate sample variance,
averaged over coordinates) and a CLT interval at level 1 - 1e-4 for the average squared
deviation from the known mean (what ``tests/estimators/test_variance.py`` checks).
"""

from __future__ import annotations

import argparse
import math

from scipy import stats

from stochgrad import estimators, models

CASES = [
    ("score_function", {}, {"baseline": "none"}, "score_function baseline=none"),
    (
        "score_function",
        {"baseline": "leave_one_out"},
        {"baseline": "leave_one_out"},
        "score_function leave_one_out K=2",
    ),
    (
        "score_function",
        {"baseline": "optimal", "mode": "oracle"},
        {"baseline": "oracle"},
        "score_function optimal (oracle)",
    ),
    ("straight_through", {}, {}, "straight_through identity"),
]
TOYS = [dict(dim=200, target=0.45, logits=0.0), dict(dim=50, target=0.499, logits=-1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    z = float(stats.norm.isf(0.5e-4))
    print(
        f"{'toy':34s} {'estimator':34s} {'closed form':>12s} {'measured':>12s} "
        f"{'CLT 1-1e-4 interval':>26s}"
    )
    for opts in TOYS:
        obj = models.get("toy", **opts)
        label = f"dim={opts['dim']} t={opts['target']} logits={opts['logits']}"
        for name, est_opts, closed_opts, title in CASES:
            closed = obj.closed_form_variance(name, **closed_opts)
            g = estimators.get(name, **est_opts).estimate(obj, args.draws, seed=args.seed)
            g = g["logits"].double()
            if name == "straight_through":
                mu = 2 * (obj.probs().double() - obj.target)
            else:
                mu = obj.exact_grad()["logits"].double()
            q = ((g - mu) ** 2).mean(1)
            half = z * float(q.std()) / math.sqrt(len(q))
            lo, hi = float(q.mean()) - half, float(q.mean()) + half
            print(
                f"{label:34s} {title:34s} {closed:12.6g} {float(g.var(0).mean()):12.6g} "
                f"[{lo:11.6g}, {hi:11.6g}]"
            )


if __name__ == "__main__":
    main()
