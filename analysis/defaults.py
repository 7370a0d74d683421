"""The command line's defaults: plain constants, importable without torch.

``stochgrad --help`` builds its parser from these, so that it starts in a fraction of a
second; :mod:`stochgrad.analysis.compare` re-exports them.
"""

from __future__ import annotations

DEFAULT_MODELS = ("toy:target=0.45", "toy:target=0.499", "sbn")

PAPER_ESTIMATORS = (
    "score_function:baseline=none",
    "score_function:baseline=moving_average",
    "score_function:baseline=optimal",
    "score_function:baseline=leave_one_out",
    "straight_through:variant=identity",
    "straight_through:variant=sigmoid",
    "sts",
    "noisy_rectifier",
    "spsa",
    "finite_difference",
    "node_perturbation",
    "exact",
)

#: The estimators the field compares today (ARM, DisARM, REBAR, RELAX and the Gumbel family).
FIELD_ESTIMATORS = (
    "arm",
    "disarm",
    "rebar",
    "relax",
    "gumbel_softmax",
    "reinmax",
    "gumbel_rao",
)

#: The default `stochgrad compare`: the paper's estimators and the field's.
DEFAULT_ESTIMATORS = PAPER_ESTIMATORS + FIELD_ESTIMATORS

TRAIN_ESTIMATORS = PAPER_ESTIMATORS

#: Model evaluations per (model, estimator) cell before the draws are capped.
DEFAULT_MAX_EVALS = 1_000_000

#: The fewest draws a capped cell gets.
MIN_CAPPED_DRAWS = 1000
