"""Checks run by :meth:`Estimator.estimate` before and after drawing.

* :func:`check_draw_budget` refuses, before any work, a request whose returned draws could not
  fit in memory (``num_draws`` x parameter elements x element size, against half the physical
  memory of the host, or the memory of the GPU holding the parameters).
* :func:`check_finite_draws` refuses draws containing ``nan`` or ``inf`` (a cost that is not
  finite somewhere, an overflow), naming the model, the estimator and the fraction of bad
  draws, instead of returning numbers that turn every later statistic into ``nan``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FiniteDraws",
    "NonFiniteDrawsError",
    "check_draw_budget",
    "check_finite_draws",
    "memory_limit_bytes",
]

_FALLBACK_LIMIT = 8 << 30  # bytes, where the host's memory cannot be read


class NonFiniteDrawsError(ValueError):
    """Some per-draw gradient estimates are ``nan`` or ``inf``."""


def memory_limit_bytes(device: torch.device) -> int:
    """The most bytes of returned draws that :func:`check_draw_budget` accepts on ``device``."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_LIMIT
    return int(physical) // 2 if physical > 0 else _FALLBACK_LIMIT


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def check_draw_budget(estimator: Any, objective: Any, num_draws: int) -> None:
    """Raise ``ValueError`` when ``num_draws`` draws of every parameter cannot fit in memory."""
    params: Mapping[str, Tensor] = objective.params
    per_draw = sum(int(v.numel()) * v.element_size() for v in params.values())
    need = num_draws * per_draw
    device = next(iter(params.values())).device
    limit = memory_limit_bytes(device)
    if need > limit:
        fit = max(1, limit // max(1, per_draw))
        raise ValueError(
            f"{getattr(estimator, 'name', type(estimator).__name__)}.estimate: {num_draws} draws "
            f"of {type(objective).__name__}'s parameters need {_gib(need)} ({per_draw} bytes a "
            f"draw), more than the {_gib(limit)} allowed on {device}; ask for at most {fit} "
            "draws, or stream statistics over chunks with stochgrad.analysis.compare.evaluate "
            "(`stochgrad compare --draws N` streams any N)"
        )


class FiniteDraws:
    """Counts the non-finite draws of a stream of chunks (each ``{param: (draws, ...)}``).

    Checking chunk by chunk keeps the check's memory at a chunk's size: ``torch.isfinite``
    on a whole output would allocate a temporary as large as the output itself.
    """

    def __init__(self) -> None:
        self.bad = 0
        self.total = 0
        self.names: list[str] = []

    def add(self, draws: Mapping[str, Tensor]) -> None:
        bad: Tensor | None = None
        rows = 0
        for k, v in draws.items():
            r = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)  # (draws,)
            if bool(r.any()) and k not in self.names:
                self.names.append(k)
            bad = r if bad is None else bad | r
            rows = v.shape[0]
        self.total += rows
        if bad is not None:
            self.bad += int(bad.sum())

    def check(self, estimator: Any, objective: Any) -> None:
        """Raise :class:`NonFiniteDrawsError` when any draw added so far is ``nan``/``inf``."""
        if not self.bad:
            return
        n_bad, total = self.bad, self.total
        raise NonFiniteDrawsError(
            f"{getattr(estimator, 'name', type(estimator).__name__)} on {objective!r}: {n_bad} of "
            f"{total} draws ({n_bad / total:.1%}) have non-finite (nan or inf) gradients in "
            f"{self.names}; the model's cost is not finite for some samples (or overflows). Make "
            "the cost finite for every sample, e.g. clamp logs and divisions"
        )


def check_finite_draws(estimator: Any, objective: Any, draws: Mapping[str, Tensor]) -> None:
    """Raise :class:`NonFiniteDrawsError` when any draw of any parameter is ``nan``/``inf``."""
    counter = FiniteDraws()
    counter.add(draws)
    counter.check(estimator, objective)
