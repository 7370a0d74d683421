"""Variance table on the toy (dim 200, t = 0.45 and 0.499): rebar against the score function
(baselines none and leave_one_out) and straight-through, 4000 draws, seed 0.

    OMP_NUM_THREADS=1 python scripts/variance_rebar.py

``sbn`` is left out: rebar refuses models whose site logits depend on other sites' values.
"""

import torch

from stochgrad import estimators
from stochgrad.models.toy import Toy

for t in (0.45, 0.499):
    obj = Toy(dim=200, target=t, logits=0.0, dtype=torch.float64)
    ex = obj.exact_grad()["logits"]
    for spec, opts in [
        ("rebar", {}),
        ("score_function", {"baseline": "none"}),
        ("score_function", {"baseline": "leave_one_out"}),
        ("straight_through", {}),
    ]:
        e = estimators.get(spec, **opts)
        g = e.estimate(obj, 4000, seed=0)["logits"]
        print(
            f"t={t} {spec} {opts} total var {g.var(0).sum().item():.4g} "
            f"mean sq bias {((g.mean(0) - ex) ** 2).sum().item():.3g}",
            e.state_dict() if spec == "rebar" else "",
        )
