"""Statistics, comparisons, sweeps, results directories and figures for gradient estimators.

>>> from stochgrad import analysis, models
>>> obj = models.get("toy", target=0.45, dim=20)
>>> table = analysis.compare(obj, ["score_function", "straight_through"], num_draws=1000)

``analysis.compare`` is the function (SPEC's public contract); the module of the same name is
``importlib.import_module("stochgrad.analysis.compare")`` or reached with
``from stochgrad.analysis.compare import ...``.
"""

from .compare import (
    DEFAULT_MODELS,
    PAPER_ESTIMATORS,
    SUMMARY_COLUMNS,
    compare,
    evaluate,
    run_compare,
    run_sweep,
    run_train,
    sweep,
    train,
)
from .compare_pyro import compare_pyro, run_compare_pyro
from .results import IncompatibleResults, ResultsDir
from .stats import GradientStats, Summary, summarize

__all__ = [
    "DEFAULT_MODELS",
    "GradientStats",
    "IncompatibleResults",
    "PAPER_ESTIMATORS",
    "ResultsDir",
    "SUMMARY_COLUMNS",
    "Summary",
    "compare",
    "compare_pyro",
    "evaluate",
    "run_compare",
    "run_compare_pyro",
    "run_sweep",
    "run_train",
    "summarize",
    "sweep",
    "train",
]
