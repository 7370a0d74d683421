"""Bad input gets a ValueError/TypeError that names what was wrong and what is allowed."""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from stochgrad import estimators, models
from stochgrad.estimators.score_function import BASELINES
from stochgrad.models.base import StochasticObjective

NAMES = estimators.available()


def test_unknown_estimator_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'") as err:
        estimators.get("reinforce")
    for name in NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="score_function"):
        estimators.lookup("nope")


def test_estimator_name_of_the_wrong_type():
    with pytest.raises(TypeError, match="estimator name .*got int"):
        estimators.get(3)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'mnist'") as err:
        models.get("mnist")
    for name in models.available():
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_names_it_and_lists_the_allowed(name):
    with pytest.raises(ValueError) as err:
        estimators.get(name, bogus_option=1)
    msg = str(err.value)
    assert "bogus_option" in msg and name in msg
    for option in estimators.lookup(name).option_names():
        assert option in msg


def test_unknown_model_option():
    with pytest.raises(ValueError, match=r"bogus.*'toy'.*allowed: .*dim.*target"):
        models.get("toy", bogus=1)


def test_options_with_an_estimator_object():
    with pytest.raises(ValueError, match="set them when constructing"):
        estimators.get(estimators.get("spsa"), c=0.2)


@pytest.mark.parametrize(
    ("kwargs", "option", "allowed"),
    [
        ({"baseline": "average"}, "baseline", BASELINES),
        ({"baseline": "optimal", "mode": "exact"}, "mode", ("online", "oracle")),
        ({"baseline": "moving_average", "init": "one"}, "init", ("first", "zero")),
    ],
)
def test_bad_choice_lists_the_choices(kwargs, option, allowed):
    with pytest.raises(ValueError, match=f"{option} must be one of") as err:
        estimators.get("score_function", **kwargs)
    for choice in allowed:
        assert repr(choice) in str(err.value)


@pytest.mark.parametrize(
    ("name", "option", "choices"),
    [
        ("straight_through", "variant", ["identity", "sigmoid"]),
        ("sts", "variant", ["paper", "code"]),
        ("noisy_rectifier", "noise", ["gaussian", "logistic"]),
    ],
)
def test_bad_variant_lists_the_choices(name, option, choices):
    with pytest.raises(ValueError, match=f"{option} must be one of") as err:
        estimators.get(name, **{option: "other"})
    for c in choices:
        assert repr(c) in str(err.value)


@pytest.mark.parametrize("k", [1, 0, -3])
def test_leave_one_out_needs_two_samples(k):
    with pytest.raises(ValueError, match=r"leave_one_out.*K >= 2.*num_samples=" + str(k)):
        estimators.get("score_function", baseline="leave_one_out", num_samples=k)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("spsa", "c", 0.0),
        ("spsa", "c", -1.0),
        ("spsa", "c", math.inf),
        ("finite_difference", "eps", 0.0),
        ("node_perturbation", "sigma", -0.1),
        ("noisy_rectifier", "scale", math.nan),
        ("spsa", "num_pairs", 0),
        ("score_function", "num_samples", 0),
        ("score_function", "decay", 1.0),
    ],
)
def test_bad_numeric_option_names_it(name, option, value):
    with pytest.raises(ValueError, match=option):
        estimators.get(name, **{option: value})


def test_wrong_type_options():
    with pytest.raises(TypeError, match="num_pairs must be an int"):
        estimators.get("spsa", num_pairs=1.5)
    with pytest.raises(TypeError, match="common_random_numbers must be a bool"):
        estimators.get("spsa", common_random_numbers="yes")
    with pytest.raises(TypeError, match="c must be a positive number"):
        estimators.get("spsa", c="0.1")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("draws", [0, -5])
def test_num_draws_must_be_positive(name, draws):
    obj = models.get("toy", dim=3)
    with pytest.raises(ValueError, match=rf"num_draws must be >= 1, got {draws}"):
        estimators.get(name).estimate(obj, draws, seed=0)


@pytest.mark.parametrize("name", NAMES)
def test_num_draws_of_the_wrong_type(name):
    with pytest.raises(TypeError, match="num_draws must be an int"):
        estimators.get(name).estimate(models.get("toy", dim=3), 2.5, seed=0)


def test_seed_and_chunk_size_are_checked():
    est, obj = estimators.get("straight_through"), models.get("toy", dim=3)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        est.estimate(obj, 3, seed="0")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        est.estimate(obj, 3, seed=0, chunk_size=0)


def test_not_an_objective():
    with pytest.raises(TypeError, match="stochastic objective with a non-empty `params`"):
        estimators.get("straight_through").estimate(object(), 3, seed=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_rejected_by_the_toy(bad):
    with pytest.raises(ValueError, match="logits must be finite"):
        models.get("toy", dim=3, logits=[0.0, bad, 1.0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_parameters_are_refused(name, bad):
    """Parameters that became non-finite (e.g. after a diverging step) are named and refused."""
    obj = models.get("toy", dim=4)
    with torch.no_grad():
        obj.params["logits"][2] = bad
    with pytest.raises(ValueError, match=r"parameter 'logits' of Toy has 1 non-finite"):
        estimators.get(name).estimate(obj, 5, seed=0)


class ReciprocalLogits(StochasticObjective):
    """Finite parameters whose logits ``1 / w`` overflow to inf where ``w = 0``."""

    name = "reciprocal_logits"

    def __init__(self):
        self.params = {"w": torch.tensor([1.0, 0.0, 2.0], requires_grad=True)}

    def options(self):
        return {}

    def model(self, params):
        h = pyro.sample("h_recip", dist.Bernoulli(logits=1.0 / params["w"]).to_event(1))
        return h.sum(-1)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_logits_at_a_site(name):
    """Logits that are not finite although the parameters are: the message names the site."""
    with pytest.raises(ValueError, match=r"site 'h_recip'.*not finite.*must be finite"):
        estimators.get(name).estimate(ReciprocalLogits(), 5, seed=0)


class NormalSite(StochasticObjective):
    """A tiny objective with a Gaussian sample site: not something Bernoulli estimators handle."""

    name = "normal_site"

    def __init__(self):
        self.params = {"mu": torch.zeros(3, requires_grad=True)}

    def options(self):
        return {}

    def model(self, params):
        z = pyro.sample("z_gauss", dist.Normal(params["mu"], 1.0).to_event(1))
        return (z**2).sum(-1)


@pytest.mark.parametrize("name", NAMES)
def test_bernoulli_estimator_on_a_normal_site_names_the_site_and_distribution(name):
    with pytest.raises(TypeError) as err:
        estimators.get(name).estimate(NormalSite(), 4, seed=0)
    msg = str(err.value)
    assert "'z_gauss'" in msg and "Normal" in msg and "Bernoulli" in msg
    assert name in msg or "estimator" in msg


def test_exact_refuses_a_model_too_large_to_enumerate():
    with pytest.raises(ValueError, match=r"21 binary units.*max_sites=20") as err:
        estimators.get("exact").estimate(models.get("toy", dim=21), 2, seed=0)
    assert "closed-form" in str(err.value) or "smaller model" in str(err.value)
    with pytest.raises(ValueError, match=r"per example 9 binary units.*max_sites=8"):
        estimators.get("exact", max_sites=8).estimate(models.get("sbn", hidden=(5, 4)), 2, seed=0)
    with pytest.raises(ValueError, match=r"max_sites=20"):
        models.get("sbn", hidden=(12, 12), batch=1).exact_grad()


def test_exact_max_sites_is_checked():
    with pytest.raises(ValueError, match="max_sites must be a positive int"):
        estimators.get("exact", max_sites=0)


def test_oracle_mode_only_for_the_optimal_baseline():
    with pytest.raises(
        ValueError, match=re.escape("mode='oracle' applies only to baseline='optimal'")
    ):
        estimators.get("score_function", mode="oracle")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dim": 0}, "dim must be a positive int"),
        ({"dim": 3, "logits": [0.0, 1.0]}, r"logits must be a scalar or have shape \(3,\)"),
        ({"target": math.nan}, "target must be a finite number"),
    ],
)
def test_toy_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.get("toy", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"hidden": (3,)}, r"hidden must be two positive ints"),
        ({"batch": 0}, "batch must be a positive int"),
        ({"input_dim": -1}, "input_dim must be a positive int"),
    ],
)
def test_sbn_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.get("sbn", **kwargs)


def test_stateless_estimators_reject_state():
    with pytest.raises(ValueError, match="has no state"):
        estimators.get("spsa").load_state_dict({"mean": 1.0})
    with pytest.raises(ValueError, match="baseline='none' has no state"):
        estimators.get("score_function").load_state_dict({"mean": 1.0})
