"""Distribution kinds of stochastic units: logits, unit shape, sampling, log-density.

A *kind* describes one base distribution a ``pyro.sample`` site may have, in the terms the
batched core (:func:`stochgrad.estimators.base.run_model`) works with:

- ``logits(name, base, fn)``: the unconstrained parameters at the site's full shape, checked
  finite; for ``Bernoulli`` shape ``(batch, *units)``, for ``Categorical`` ``(batch, *units, K)``;
- ``unit_shape(logits)``: the shape of the unit values (one uniform per unit);
- ``sample(logits, u)``: the unit values by inverse CDF from one uniform ``u`` per unit;
- ``log_prob(logits, value)``: ``log q(value)`` per unit, differentiable in ``logits``.

Supported: ``Bernoulli`` (``h = 1[u < sigmoid(a)]``, exactly as
:func:`~stochgrad.estimators.base.hard_sample`, so its numbers are unchanged),
``Categorical`` (``k`` with ``cdf_{k-1} <= u < cdf_k``, ``cdf`` the cumulative sum of
``softmax(a)``; values are float tensors holding the category index) and
``OneHotCategorical`` (the same ``k``, as a one-hot vector over the last dim; its values and
logits have the same shape, the categories last). ``index(value)`` gives the category index of
a value (Categorical, OneHotCategorical).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Distribution, Independent
from torch.nn.functional import log_softmax, softplus

__all__ = ["BERNOULLI", "CATEGORICAL", "KINDS", "ONE_HOT_CATEGORICAL", "Kind", "kind_of", "unwrap"]


def unwrap(fn: Distribution) -> Any:
    """The base distribution under ``Independent`` and Pyro's masked/expanded wrappers."""
    base: Any = fn
    while isinstance(base, Independent) or type(base).__name__ in (
        "MaskedDistribution",
        "ExpandedDistribution",
    ):
        base = base.base_dist
    return base


def _check_finite(name: str, logits: Tensor, kind: str) -> Tensor:
    # a finite sum implies finite terms; only a non-finite sum is checked term by term
    if not math.isfinite(float(logits.detach().sum())) and not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"site {name!r}: {bad} of {logits.numel()} logits are not finite (nan or inf); "
            f"{kind} logits must be finite real numbers"
        )
    return logits


class Kind:
    """One base distribution of stochastic units (see the module docstring)."""

    name: ClassVar[str] = ""
    event_dims: ClassVar[int] = 0  # trailing logits dims that are not unit dims

    def matches(self, base: Any) -> bool:
        raise NotImplementedError

    def logits(self, name: str, base: Any, fn: Distribution) -> Tensor:
        raise NotImplementedError

    def unit_shape(self, logits: Tensor) -> torch.Size:
        return logits.shape[: logits.dim() - self.event_dims]

    def sample(self, logits: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def log_prob(self, logits: Tensor, value: Tensor) -> Tensor:
        raise NotImplementedError

    def index(self, value: Tensor) -> Tensor:
        """The category index of each unit's value (categorical kinds)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


class _Bernoulli(Kind):
    name = "Bernoulli"

    def matches(self, base: Any) -> bool:
        return isinstance(base, Bernoulli)

    def logits(self, name: str, base: Any, fn: Distribution) -> Tensor:
        return _check_finite(name, base.logits.expand(fn.batch_shape + fn.event_shape), self.name)

    def sample(self, logits: Tensor, u: Tensor) -> Tensor:
        from .base import hard_sample

        return hard_sample(logits, u)

    def log_prob(self, logits: Tensor, value: Tensor) -> Tensor:
        return value * logits - softplus(logits)


class _Categorical(Kind):
    name = "Categorical"
    event_dims = 1

    def matches(self, base: Any) -> bool:
        return isinstance(base, Categorical) and type(base).__name__ != "OneHotCategorical"

    def logits(self, name: str, base: Any, fn: Distribution) -> Tensor:
        shape = fn.batch_shape + fn.event_shape + base.logits.shape[-1:]
        return _check_finite(name, base.logits.expand(shape), self.name)

    def sample(self, logits: Tensor, u: Tensor) -> Tensor:
        """``k = #{j < K-1 : cdf_j <= u}``: the index with ``cdf_{k-1} <= u < cdf_k``."""
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)[..., :-1]  # the last is 1 (rounding)
        return (cdf <= u.unsqueeze(-1)).sum(-1).to(logits.dtype)

    def log_prob(self, logits: Tensor, value: Tensor) -> Tensor:
        index = value.long().unsqueeze(-1)
        return log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)

    def index(self, value: Tensor) -> Tensor:
        return value


class _OneHotCategorical(_Categorical):
    name = "OneHotCategorical"

    def matches(self, base: Any) -> bool:
        return type(base).__name__ == "OneHotCategorical"

    def logits(self, name: str, base: Any, fn: Distribution) -> Tensor:
        return _check_finite(name, base.logits.expand(fn.batch_shape + fn.event_shape), self.name)

    def sample(self, logits: Tensor, u: Tensor) -> Tensor:
        k = super().sample(logits, u).long()
        return torch.nn.functional.one_hot(k, logits.shape[-1]).to(logits.dtype)

    def log_prob(self, logits: Tensor, value: Tensor) -> Tensor:
        return (log_softmax(logits, dim=-1) * value).sum(-1)

    def index(self, value: Tensor) -> Tensor:
        return value.argmax(-1)


BERNOULLI: Kind = _Bernoulli()
CATEGORICAL: Kind = _Categorical()
ONE_HOT_CATEGORICAL: Kind = _OneHotCategorical()
KINDS: dict[str, Kind] = {k.name: k for k in (BERNOULLI, CATEGORICAL, ONE_HOT_CATEGORICAL)}


def kind_of(fn: Distribution) -> tuple[Kind | None, Any]:
    """The kind of a site's distribution (``None`` when unsupported) and its base."""
    base = unwrap(fn)
    for kind in KINDS.values():
        if kind.matches(base):
            return kind, base
    return None, base
