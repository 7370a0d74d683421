"""Shared fixtures and statistical helpers for the test suite.

Every randomized test fixes its seed and states its false-alarm rate. The helpers here (the
``stat`` fixture) turn per-draw gradient estimates ``(N, d)`` into Bonferroni-corrected
z-tests against a known mean, and choose the number of draws from a pilot variance so that a
test has a stated power to detect a stated bias.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from scipy import stats

torch.set_num_threads(1)

#: Family-wise false-alarm rate of every statistical test in the suite (unless stated).
FALSE_ALARM = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one thread, whatever a command under test set (``--threads``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The development MNIST: ``../shared/data/mnist.npz`` beside the checkout (as CI runs it).
REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture
def real_mnist() -> Path:
    """Path of the real MNIST file; the test is skipped where it is absent."""
    if not REAL_MNIST.is_file():
        pytest.skip(f"real MNIST not available at {REAL_MNIST}")
    return REAL_MNIST


#: Score-function options and particles per baseline: ``(estimator options, num_particles)``.
SF_CASES = {
    "none": ({}, 1),
    "moving_average": ({"baseline": "moving_average"}, 1),
    "optimal": ({"baseline": "optimal"}, 1),
    "leave_one_out": ({"baseline": "leave_one_out"}, 2),
    "learned": ({"baseline": "learned"}, 1),
}


@pytest.fixture
def sf_case(baseline):
    """``(options, particles)`` for the test's ``baseline`` parameter (every baseline of
    :data:`stochgrad.estimators.score_function.BASELINES` must have an entry above)."""
    if baseline not in SF_CASES:
        raise KeyError(f"add the new baseline {baseline!r} to SF_CASES in tests/conftest.py")
    return SF_CASES[baseline]


# ---------------------------------------------------------------------------------------------
# Flattening
# ---------------------------------------------------------------------------------------------


def flatten_draws(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: (N, *shape)}`` -> ``(N, d)`` float64, parameters in dict order."""
    return torch.cat([g.reshape(g.shape[0], -1).double() for g in grads.values()], dim=1)


def flatten_params(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: shape}`` -> ``(d,)`` float64, parameters in dict order."""
    return torch.cat([g.reshape(-1).double() for g in grads.values()])


# ---------------------------------------------------------------------------------------------
# Bonferroni z-tests
# ---------------------------------------------------------------------------------------------


def z_critical(coords: int, alpha: float = FALSE_ALARM) -> float:
    """Two-sided per-coordinate critical |z| for a family-wise rate ``alpha`` over ``coords``."""
    return float(stats.norm.isf(alpha / (2 * coords)))


@dataclass
class ZTest:
    """Per-coordinate ``z = (mean - target) / (s / sqrt(N))`` with a Bonferroni threshold."""

    mean: torch.Tensor  # (d,)
    se: torch.Tensor  # (d,)
    target: torch.Tensor  # (d,)
    z: torch.Tensor  # (d,)
    critical: float
    alpha: float
    draws: int

    @property
    def z_max(self) -> float:
        return float(self.z.abs().max())

    @property
    def rejects(self) -> bool:
        return self.z_max > self.critical

    @property
    def bias(self) -> torch.Tensor:
        return self.mean - self.target

    def describe(self) -> str:
        i = int(self.z.abs().argmax())
        return (
            f"N={self.draws}, d={self.z.numel()}, |z|max={self.z_max:.2f} at coordinate {i} "
            f"(mean {float(self.mean[i]):.6g}, target {float(self.target[i]):.6g}, "
            f"se {float(self.se[i]):.3g}); Bonferroni critical |z|={self.critical:.2f} "
            f"at family-wise rate {self.alpha:g}"
        )


def z_test(samples: torch.Tensor, target: torch.Tensor, alpha: float = FALSE_ALARM) -> ZTest:
    """Bonferroni z-test of the per-coordinate mean of ``samples`` ``(N, d)`` against ``target``."""
    x = samples.double()
    n = x.shape[0]
    target = target.double().reshape(-1)
    mean = x.mean(0)
    se = (x.var(0) / n).sqrt()
    diff = mean - target
    # A coordinate with zero spread is tested exactly: any difference is infinitely significant.
    safe = torch.where(se > 0, se, torch.ones_like(se))
    z = torch.where(se > 0, diff / safe, torch.where(diff == 0, 0.0, math.inf * diff.sign()))
    return ZTest(mean, se, target, z, z_critical(x.shape[1], alpha), alpha, n)


def assert_unbiased(samples: torch.Tensor, target: torch.Tensor, alpha: float = FALSE_ALARM):
    """Fail (with probability ``alpha`` when the mean is ``target``) on a significant bias."""
    t = z_test(samples, target, alpha)
    assert not t.rejects, "mean differs from the exact gradient: " + t.describe()
    return t


def assert_biased(samples: torch.Tensor, target: torch.Tensor, alpha: float = FALSE_ALARM):
    """Require a bias significant at family-wise level ``alpha``."""
    t = z_test(samples, target, alpha)
    assert t.rejects, "expected a detectable bias, found none: " + t.describe()
    return t


def draws_for_power(
    sd: torch.Tensor,
    detectable: torch.Tensor | float,
    coords: int,
    alpha: float = FALSE_ALARM,
    power: float = 0.99,
    inflate: float = 1.25,
) -> int:
    """Draws so a bias of ``detectable`` in any one coordinate is found with ``power``.

    ``sd`` is a pilot estimate of the per-coordinate standard deviation, ``inflate`` a margin
    for the pilot's own error. Solves ``(z_crit + z_power) * sd / sqrt(N) <= detectable``.
    """
    z = z_critical(coords, alpha) + float(stats.norm.isf(1 - power))
    ratio = (inflate * sd.double() / torch.as_tensor(detectable, dtype=torch.float64)).max()
    return int(math.ceil(float((z * ratio) ** 2)))


def planned_draws(
    make_estimator,
    objective,
    detectable: float,
    seed: int,
    alpha: float = FALSE_ALARM,
    power: float = 0.99,
    pilot: int = 4000,
    max_draws: int = 2_000_000,
) -> int:
    """Draws for ``power`` against a bias of ``detectable``, from a pilot run's variance.

    ``make_estimator()`` builds a fresh estimator (stateful baselines warm up again). Fails if
    more than ``max_draws`` would be needed: the variance is then far above what it should be.
    """
    g = flatten_draws(make_estimator().estimate(objective, pilot, seed=seed))
    n = draws_for_power(g.std(0), detectable, g.shape[1], alpha, power)
    assert n <= max_draws, (
        f"{n} draws needed for power {power} against a bias of {detectable:.3g}; the variance "
        f"is larger than expected (pilot max sd {float(g.std(0).max()):.3g})"
    )
    return max(n, pilot)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stat():
    """The helpers above as a namespace: ``stat.z_test``, ``stat.assert_unbiased``, ...

    (A fixture rather than an import, so it works in every pytest import mode.)
    """
    return sys.modules[__name__]
