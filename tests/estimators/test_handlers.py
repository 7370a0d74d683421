"""Handler algebra of ``estimator_config`` / ``EstimatorMessenger`` and bad-input errors.

Every comparison is an exact replay: the same seed gives the same random numbers, so two
programs that should be treated alike give identical gradients.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import Trace_ELBO

from stochgrad import estimators
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.handlers import EstimatorMessenger, estimator_config
from stochgrad.estimators.straight_through import StraightThrough
from stochgrad.estimators.sts import STS
from stochgrad.estimators.surrogate import Surrogate, surrogate_loss

PHI = torch.tensor([[-1.0, 0.2, 0.7], [0.4, -0.3, 1.5]], dtype=torch.float64)
T = 0.3


def make_program(annotation=None):
    phi = PHI.clone().requires_grad_(True)

    def program():
        with pyro.plate("data", 2):
            infer = {} if annotation is None else {"estimator": annotation}
            b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1), infer=infer)
            c = pyro.sample("c", dist.Bernoulli(logits=phi.sum(-1)))
            return ((b - T) ** 2).sum(-1) * (1 + c)

    return program, phi


def grad_of(program, phi, seed, wrap=lambda f: f, context=None):
    pyro.set_rng_seed(seed)
    phi.grad = None
    if context is None:
        surrogate_loss(wrap(program)).backward()
    else:
        with context:
            surrogate_loss(wrap(program)).backward()
    return phi.grad.clone()


# ---------------------------------------------------------------------------------------------
# Annotation and precedence
# ---------------------------------------------------------------------------------------------


def test_handler_sets_annotation_and_leaves_sampling_alone():
    program, _ = make_program()
    pyro.set_rng_seed(0)
    plain = poutine.trace(program).get_trace()
    pyro.set_rng_seed(0)
    tr = poutine.trace(estimator_config(program, {"b": "sts"})).get_trace()
    assert isinstance(tr.nodes["b"]["infer"]["estimator"], STS)
    assert "estimator" not in tr.nodes["c"]["infer"]
    torch.testing.assert_close(tr.nodes["b"]["value"], plain.nodes["b"]["value"])


def test_stock_pyro_ignores_annotation():
    def model():
        pyro.sample("z", dist.Bernoulli(torch.tensor(0.3)))

    def guide(annotate):
        q = pyro.param("q", torch.tensor(0.2))
        pyro.sample("z", dist.Bernoulli(q), infer={"estimator": "sts"} if annotate else {})

    out = []
    for annotate in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = Trace_ELBO().loss_and_grads(model, lambda a=annotate: guide(a))
        out.append((loss, pyro.param("q").unconstrained().grad.clone()))
    assert out[0][0] == out[1][0]
    torch.testing.assert_close(out[0][1], out[1][1])
    pyro.clear_param_store()


def test_wrapper_context_manager_and_site_annotation_agree():
    est = estimators.get("score_function")
    program, phi = make_program()
    wrapped = grad_of(program, phi, 1, wrap=lambda f: estimator_config(f, {"b": est}))
    managed = grad_of(program, phi, 1, context=estimator_config(config={"b": est}))
    annotated_program, phi2 = make_program(est)
    annotated = grad_of(annotated_program, phi2, 1)
    torch.testing.assert_close(wrapped, managed)
    torch.testing.assert_close(wrapped, annotated)


def test_handler_overrides_site_and_outer_overrides_inner():
    program, phi = make_program("sts")
    over = grad_of(program, phi, 2, wrap=lambda f: estimator_config(f, {"b": "straight_through"}))
    inner_outer = grad_of(
        program,
        phi,
        2,
        wrap=lambda f: estimator_config(
            estimator_config(f, {"b": "noisy_rectifier"}), {"b": "straight_through"}
        ),
    )
    st_program, phi2 = make_program("straight_through")
    direct = grad_of(st_program, phi2, 2)
    torch.testing.assert_close(over, direct)
    torch.testing.assert_close(inner_outer, direct)


def test_callable_config_and_none():
    def config(msg):
        return "straight_through" if msg["name"] == "b" else None

    program, phi = make_program()
    by_callable = grad_of(program, phi, 3, wrap=lambda f: estimator_config(f, config=config))
    by_dict = grad_of(
        program, phi, 3, wrap=lambda f: estimator_config(f, {"b": "straight_through", "c": None})
    )
    torch.testing.assert_close(by_callable, by_dict)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_handler_is_idempotent(seed):
    cfg = {"b": estimators.get("score_function"), "c": "straight_through"}
    program, phi = make_program()
    once = grad_of(program, phi, seed, wrap=lambda f: estimator_config(f, cfg))
    twice = grad_of(
        program, phi, seed, wrap=lambda f: estimator_config(estimator_config(f, cfg), cfg)
    )
    torch.testing.assert_close(once, twice, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_straight_through_forward_is_binary(seed):
    program, _ = make_program("straight_through")
    pyro.set_rng_seed(seed)
    value = Surrogate().run(program).trace.nodes["b"]["value"]
    assert set(value.detach().unique().tolist()) <= {0.0, 1.0}
    assert value.requires_grad


# ---------------------------------------------------------------------------------------------
# Composition with Pyro's handlers
# ---------------------------------------------------------------------------------------------


def test_block_hides_site_from_outer_handler():
    """Blocked from the outer handler, the site gets Pyro's default (plain score function)."""
    program, phi = make_program()
    plain = grad_of(program, phi, 4)

    def blocked_in_handler():
        with estimator_config(config={"b": "straight_through"}):
            with poutine.block(hide=["b"]):
                return surrogate_loss(program)

    pyro.set_rng_seed(4)
    phi.grad = None
    with pytest.warns(UserWarning, match="'b': no sample site"):
        loss = blocked_in_handler()  # the handler never saw 'b', and says so
    loss.backward()
    torch.testing.assert_close(phi.grad, plain)


def test_block_hides_site_from_inference():
    """A site hidden from the inference gets no estimator at all: no gradient path."""
    phi = torch.zeros(3, requires_grad=True)

    def program():
        b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1))
        return b.sum() + 0 * phi.sum()

    hidden = poutine.block(estimator_config(program, {"b": "straight_through"}), hide=["b"])
    result = Surrogate().run(hidden)
    assert "b" not in result.trace.nodes
    result.loss.backward()
    torch.testing.assert_close(phi.grad, torch.zeros(3))


def elbo_model():
    loc = pyro.param("loc", torch.tensor(0.8, dtype=torch.float64))
    with pyro.plate("rows", 3):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3, dtype=torch.float64)))
        pyro.sample("x", dist.Normal(loc * z, 1.0), obs=torch.tensor([1.0, 0.0, 2.0]).double())


def elbo_guide():
    q = pyro.param("q", torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    with pyro.plate("rows", 3):
        pyro.sample("z", dist.Bernoulli(logits=q))


def elbo_grads(model, guide, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = EstimatorELBO().loss_and_grads(model, guide)
    ps = pyro.get_param_store()
    grads = {k: ps[k].unconstrained().grad.clone() for k in ("loc", "q")}
    pyro.clear_param_store()
    return loss, grads


@pytest.mark.parametrize("name", ["score_function", "straight_through"])
def test_scale_multiplies_loss_and_gradient(name):
    guide = estimator_config(elbo_guide, {"z": name})
    loss1, g1 = elbo_grads(elbo_model, guide, 5)
    loss2, g2 = elbo_grads(poutine.scale(elbo_model, 2.5), poutine.scale(guide, 2.5), 5)
    assert loss2 == pytest.approx(2.5 * loss1, rel=1e-12)
    for k in g1:
        torch.testing.assert_close(g2[k], 2.5 * g1[k])


@pytest.mark.parametrize("name", ["score_function", "straight_through"])
def test_mask_removes_the_site_terms(name):
    mask = torch.tensor([True, False, True])
    guide = estimator_config(elbo_guide, {"z": name})
    _, g = elbo_grads(poutine.mask(elbo_model, mask=mask), poutine.mask(guide, mask=mask), 6)
    assert g["q"][1] == 0.0 and g["q"][0] != 0.0


def test_replay_keeps_the_replayed_values():
    program, phi = make_program("straight_through")
    pyro.set_rng_seed(7)
    first = Surrogate().run(program).trace
    for name in ["straight_through", "score_function"]:
        replayed = estimator_config(poutine.replay(program, trace=first), {"b": name})
        again = Surrogate().run(replayed).trace
        torch.testing.assert_close(
            again.nodes["b"]["value"].detach(), first.nodes["b"]["value"].detach()
        )


def test_trace_records_the_estimator_object():
    est = estimators.get("straight_through", variant="sigmoid")
    program, _ = make_program()
    tr = Surrogate().run(estimator_config(program, {"b": est})).trace
    assert tr.nodes["b"]["infer"]["estimator"] is est
    assert isinstance(tr.nodes["b"]["infer"]["estimator"], StraightThrough)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_malformed_configs():
    with pytest.raises(TypeError, match="dict .site name: estimator. or a callable"):
        EstimatorMessenger(["b", "straight_through"])
    with pytest.raises(TypeError, match="keys must be site names"):
        estimator_config(config={3: "sts"})
    with pytest.raises(ValueError, match=r"site 'b': unknown estimator 'stright_through'.*sts"):
        estimator_config(config={"b": "stright_through"})
    with pytest.raises(TypeError, match="needs config="):
        estimator_config(lambda: None)


def test_bad_callable_answer_names_site():
    program, _ = make_program()
    with pytest.raises(TypeError, match=r"site 'b'.*got int"):
        surrogate_loss(estimator_config(program, config=lambda msg: 3))


def test_unknown_annotation_names_site_and_valid_names():
    program, _ = make_program("reinforce")
    with pytest.raises(ValueError, match=r"site 'b': unknown estimator 'reinforce'; valid names: "):
        surrogate_loss(program)


def test_non_bernoulli_site_names_site_and_distribution():
    def program():
        return pyro.sample("s", dist.Normal(0.0, 1.0), infer={"estimator": "sts"})

    with pytest.raises(TypeError, match=r"site 's' has distribution Normal"):
        surrogate_loss(program)


def test_estimator_without_site_rule():
    class Custom(estimators.Estimator):
        name = "custom_for_test"

    def program():
        return pyro.sample("b", dist.Bernoulli(0.5), infer={"estimator": Custom()})

    with pytest.raises(TypeError, match="cannot act at a Pyro sample site"):
        surrogate_loss(program)


def test_decorator_form():
    phi = PHI.clone().requires_grad_(True)

    @estimator_config(config={"b": "straight_through"})
    def program():
        b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(2))
        return ((b - T) ** 2).sum()

    pyro.set_rng_seed(8)
    tr = Surrogate().run(program).trace
    assert isinstance(tr.nodes["b"]["infer"]["estimator"], StraightThrough)


# ---------------------------------------------------------------------------------------------
# Ignored annotations and entries warn, naming the sites
# ---------------------------------------------------------------------------------------------


def observed_program(annotate_obs=True):
    phi = PHI.clone().requires_grad_(True)

    def program():
        with pyro.plate("data", 2):
            b = pyro.sample("b", dist.Bernoulli(logits=phi).to_event(1))
            infer = {"estimator": "score_function"} if annotate_obs else {}
            y = pyro.sample(
                "y",
                dist.Bernoulli(logits=phi.sum(-1)),
                obs=torch.ones(2, dtype=PHI.dtype),
                infer=infer,
            )
            return ((b - T) ** 2).sum(-1) * (1 + y)

    return program


def test_annotation_on_observed_site_warns_in_surrogate_loss():
    with pytest.warns(UserWarning, match=r"observed site\(s\) 'y'"):
        surrogate_loss(observed_program())


def test_annotation_on_observed_site_warns_in_elbo():
    phi = torch.zeros(2, requires_grad=True)

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))
        pyro.sample(
            "x", dist.Normal(z, 1.0).to_event(1), obs=torch.ones(2), infer={"estimator": "sts"}
        )

    def guide():
        pyro.sample(
            "z", dist.Bernoulli(logits=phi).to_event(1), infer={"estimator": "score_function"}
        )

    with pytest.warns(UserWarning, match=r"observed site\(s\) 'x'"):
        EstimatorELBO().differentiable_loss(model, guide)


def test_config_entry_naming_no_site_warns_once_per_handler():
    handler = estimator_config(config={"b": "sts", "typo": "straight_through"})
    with pytest.warns(UserWarning, match=r"'typo': no sample site") as caught:
        with handler:
            surrogate_loss(make_program()[0])
    assert len(caught) == 1 and "'b'" not in str(caught[0].message)
    with handler:  # the same handler again: already warned about 'typo'
        surrogate_loss(make_program()[0])


def test_config_entry_naming_observed_site_warns():
    program = estimator_config(observed_program(annotate_obs=False), {"y": "sts", "b": "sts"})
    with pytest.warns(UserWarning, match=r"'y': an observed site"):
        surrogate_loss(program)


def test_correct_config_and_none_entries_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with estimator_config(config={"b": "sts", "c": "score_function", "absent": None}):
            surrogate_loss(make_program()[0])
        surrogate_loss(estimator_config(observed_program(annotate_obs=False), {"b": "sts"}))
