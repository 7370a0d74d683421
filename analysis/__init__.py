"""Statistics, comparisons, sweeps, results directories and figures for gradient estimators.

>>> from stochgrad import analysis, models
>>> obj = models.get("toy", target=0.45, dim=20)
>>> table = analysis.compare(obj, ["score_function", "straight_through"], num_draws=1000)

``analysis.compare`` is the function (SPEC's public contract); the module of the same name is
``importlib.import_module("stochgrad.analysis.compare")`` or reached with
``from stochgrad.analysis.compare import ...``.
"""

import importlib
from typing import Any

# Lazy attributes (PEP 562): ``import stochgrad.analysis`` (and so ``stochgrad --help``) does
# not import torch; each name is loaded from its module on first use.
_WHERE = {
    "DEFAULT_MODELS": "compare",
    "PAPER_ESTIMATORS": "compare",
    "SUMMARY_COLUMNS": "compare",
    "compare": "compare",
    "compare_pyro": "compare_pyro",
    "run_compare_pyro": "compare_pyro",
    "evaluate": "compare",
    "run_compare": "compare",
    "run_sweep": "compare",
    "run_train": "compare",
    "sweep": "compare",
    "train": "compare",
    "IncompatibleResults": "results",
    "ResultsDir": "results",
    "GradientStats": "stats",
    "Summary": "stats",
    "summarize": "stats",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


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
