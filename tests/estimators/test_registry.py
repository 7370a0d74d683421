"""The estimator registry: names, classes, options, costs, registration."""

from __future__ import annotations

import inspect
import math

import pytest

from stochgrad import estimators, models
from stochgrad.estimators import registry
from stochgrad.estimators.base import Cost, Estimator

NAMES = estimators.available()


def test_available_is_sorted_and_holds_the_paper_estimators():
    assert NAMES == sorted(NAMES)
    assert set(estimators.PAPER_ESTIMATORS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_name_is_lower_snake_and_matches_its_module(name):
    cls = estimators.lookup(name)
    assert name.isidentifier() and name == name.lower()
    assert cls.name == name
    assert cls.__module__.rsplit(".", 1)[-1] == name
    assert issubclass(cls, Estimator)
    assert cls.description


@pytest.mark.parametrize("name", NAMES)
def test_get_builds_with_defaults_and_reports_its_options(name):
    est = estimators.get(name)
    assert isinstance(est, estimators.lookup(name))
    assert estimators.get(est) is est
    opts = est.options()
    assert list(opts) == est.option_names()
    # rebuilding from the reported options gives the same estimator
    assert estimators.get(name, **opts).options() == opts
    assert est.label() == name  # defaults only: the bare name
    assert name in repr(est) or type(est).__name__ in repr(est)


def test_label_shows_the_non_default_options():
    est = estimators.get("score_function", baseline="leave_one_out", num_samples=4)
    assert est.label().startswith("score_function:")
    assert "baseline=leave_one_out" in est.label() and "num_samples=4" in est.label()


@pytest.mark.parametrize("name", NAMES)
def test_options_are_keyword_parameters_with_defaults(name):
    sig = inspect.signature(estimators.lookup(name).__init__)
    for p in list(sig.parameters.values())[1:]:
        assert p.default is not inspect.Parameter.empty, f"{name}.{p.name} has no default"


def test_declared_costs():
    """Work per draw as the SPEC states it."""
    sbn = models.get("sbn")  # 10 units, 29 parameters
    numel = sum(v.numel() for v in sbn.params.values())
    assert numel == 29
    cases = [
        (("score_function", {}), Cost(1, 1)),
        (("score_function", {"baseline": "leave_one_out", "num_samples": 4}), Cost(4, 1)),
        (("straight_through", {}), Cost(1, 1)),
        (("sts", {}), Cost(1, 1)),
        (("noisy_rectifier", {}), Cost(1, 1)),
        (("spsa", {}), Cost(2, 0)),
        (("spsa", {"num_pairs": 3}), Cost(6, 0)),
        (("finite_difference", {}), Cost(2 * numel, 0)),
        (("node_perturbation", {}), Cost(2, 1)),
        # The sbn's 2 examples are independent: 2^5 runs enumerate both examples' 5 units.
        (("exact", {}), Cost(2**5, 1)),
    ]
    for (name, opts), want in cases:
        assert estimators.get(name, **opts).cost(sbn) == want, (name, opts)


def test_register_rejects_bad_and_duplicate_names(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class NoName(Estimator):
        pass

    with pytest.raises(ValueError, match="lower_snake `name`"):
        estimators.register(NoName)

    class Shouting(Estimator):
        name = "Shouting"

    with pytest.raises(ValueError, match="lower_snake"):
        estimators.register(Shouting)

    class Impostor(Estimator):
        name = "spsa"

    with pytest.raises(ValueError, match="already registered"):
        estimators.register(Impostor)


def test_a_registered_estimator_is_available_and_usable(monkeypatch):
    """Registering is all it takes (no model or registry edits)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @estimators.register
    class Zero(Estimator):
        name = "zero_for_test"
        unbiased = "no"
        description = "always zero"

        def __init__(self, level: float = 0.0):
            self.level = level

        def cost(self, objective):
            return Cost(0.0, 0.0)

        def _draw(self, objective, draws, rng):
            return {
                k: v.detach().new_full((draws, *v.shape), self.level)
                for k, v in objective.params.items()
            }

    assert "zero_for_test" in estimators.available()
    est = estimators.get("zero_for_test", level=1.5)
    g = est.estimate(models.get("toy", dim=3), 4, seed=0)
    assert g["logits"].shape == (4, 3) and float(g["logits"].sum()) == 18.0
    with pytest.raises(ValueError, match="allowed: level"):
        estimators.get("zero_for_test", lvl=1)


def test_declared_unbiasedness_is_one_of_three():
    with pytest.raises(ValueError, match="unbiased must be one of"):

        class Bad(Estimator):  # noqa: F841
            name = "bad"
            unbiased = "maybe"


@pytest.mark.parametrize("name", NAMES)
def test_default_chunk_size_is_positive(name):
    for obj in (models.get("toy", dim=200), models.get("sbn")):
        n = estimators.get(name).default_chunk_size(obj)
        assert isinstance(n, int) and n >= 1
        assert not math.isnan(n)


def test_spsa_gain_sequences():
    """Spall's a_k = a / (k + 1 + A)^alpha and c_k = c / (k + 1)^gamma."""
    est = estimators.get("spsa", a=0.3, c=0.2, A=5.0)
    for k in (0, 1, 10, 1000):
        a_k, c_k = est.gains(k)
        assert a_k == pytest.approx(0.3 / (k + 1 + 5.0) ** 0.602, rel=1e-12)
        assert c_k == pytest.approx(0.2 / (k + 1) ** 0.101, rel=1e-12)
