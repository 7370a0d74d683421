"""Gradient estimators for stochastic neurons, in a registry.

>>> from stochgrad import estimators
>>> estimators.available()[:3]
['exact', 'finite_difference', 'node_perturbation']
>>> est = estimators.get("score_function", baseline="leave_one_out", num_samples=2)

Every estimator has the same entry point, ``est.estimate(objective, num_draws, seed=...)``,
returning ``{param name: Tensor(num_draws, *param.shape)}`` of independent per-draw
estimates (see :mod:`stochgrad.estimators.base`), and declares ``unbiased`` and
``cost(objective)`` (model evaluations and backward passes per draw).

In Pyro programs a site opts into an estimator with ``infer={"estimator": ...}`` or from
outside with :func:`estimator_config`; :class:`EstimatorELBO` trains with ``pyro.infer.SVI``
and :func:`surrogate_loss` gives a scalar whose ``.backward()`` leaves the estimate in
``.grad`` for plain torch optimisers.
"""

from . import (  # noqa: F401  (importing registers the estimators)
    arm,
    disarm,
    exact,
    finite_difference,
    gumbel_rao,
    gumbel_softmax,
    node_perturbation,
    noisy_rectifier,
    rebar,
    reinmax,
    relax,
    score_function,
    spsa,
    straight_through,
    sts,
)
from .base import Cost, Estimator
from .elbo import EstimatorELBO
from .exact import Exact
from .finite_difference import FiniteDifference
from .handlers import EstimatorMessenger, estimator_config
from .node_perturbation import NodePerturbation
from .noisy_rectifier import NoisyRectifier
from .registry import available, get, lookup, register
from .score_function import ScoreFunction
from .spsa import SPSA
from .straight_through import StraightThrough
from .sts import STS
from .surrogate import Surrogate, SurrogateResult, forward_gradient, surrogate_loss

PAPER_ESTIMATORS = (
    "score_function",
    "straight_through",
    "sts",
    "noisy_rectifier",
    "spsa",
    "finite_difference",
    "node_perturbation",
    "exact",
)

__all__ = [
    "Cost",
    "Estimator",
    "EstimatorELBO",
    "EstimatorMessenger",
    "Exact",
    "FiniteDifference",
    "NodePerturbation",
    "NoisyRectifier",
    "PAPER_ESTIMATORS",
    "SPSA",
    "STS",
    "ScoreFunction",
    "StraightThrough",
    "Surrogate",
    "SurrogateResult",
    "available",
    "estimator_config",
    "forward_gradient",
    "get",
    "lookup",
    "register",
    "surrogate_loss",
]
