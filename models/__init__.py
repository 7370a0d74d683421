"""Stochastic-neuron models as Pyro programs, with exact references where they enumerate.

>>> from stochgrad import models
>>> obj = models.get("toy", target=0.45, dim=200)
>>> sorted(obj.params)
['logits']
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import StochasticObjective
from .sbn import SBN
from .toy import Toy
from .toy_categorical import ToyCategorical
from .vae import BernoulliVAE, TrainConfig
from .vae_objective import VAE

_MODELS: dict[str, type[StochasticObjective]] = {
    "toy": Toy,
    "toy_categorical": ToyCategorical,
    "sbn": SBN,
    "vae": VAE,
}


def available() -> list[str]:
    """Sorted names of the objectives usable with ``estimate`` and ``analysis.compare``."""
    return sorted(_MODELS)


def lookup(name: str) -> type[StochasticObjective]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available())}")
    return _MODELS[name]


def get(name: str, **options: Any) -> StochasticObjective:
    """An objective by name, with options; unknown names or options raise ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"expected a model name (str), got {type(name).__name__}")
    cls = lookup(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(**options)


__all__ = [
    "SBN",
    "BernoulliVAE",
    "StochasticObjective",
    "Toy",
    "ToyCategorical",
    "TrainConfig",
    "VAE",
    "available",
    "get",
    "lookup",
]
