"""analysis.compare: tidy tables with the SPEC columns, honest statistics, clear errors."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stochgrad import estimators, models
from stochgrad.analysis.stats import summarize

# The package exports the function `compare`; the module is reached through importlib.
C = importlib.import_module("stochgrad.analysis.compare")

FALSE_ALARM = 1e-4

SPEC_COLUMNS = [
    "model", "estimator", "param", "draws", "bias_l2", "rel_bias", "variance", "mse", "cosine",
    "snr", "z_max", "p_unbiased", "evals_per_draw", "seconds_per_draw", "work_variance",
]  # fmt: skip


def test_public_api_contract():
    from stochgrad import analysis

    obj = models.get("toy", target=0.45, dim=20)
    est = estimators.get("score_function", baseline="leave_one_out", num_samples=2)
    table = analysis.compare(obj, ["score_function", est, "straight_through"], 500, seed=0)
    assert list(table["estimator"]) == [
        "score_function",
        est.label(),
        "straight_through",
    ]


def test_table_has_spec_columns_one_row_per_param():
    obj = models.get("sbn")
    table = C.compare(obj, ["score_function", "straight_through", "exact"], 500, seed=0)
    assert list(table.columns[: len(SPEC_COLUMNS)]) == SPEC_COLUMNS
    assert len(table) == 3 * len(obj.params)
    assert set(table["param"]) == set(obj.params)
    assert (table["reference"] == "exact").all()
    exact = table[table["estimator"] == "exact"]
    assert (exact["variance"] == 0).all() and (exact["p_unbiased"] == 1).all()
    assert (exact["bias_l2"] < 1e-5).all()
    sf = table[table["estimator"] == "score_function"]
    assert (sf["work_variance"] == sf["variance"] * sf["evals_per_draw"]).all()
    assert (sf["seconds_per_draw"] > 0).all()
    assert (sf["variance_lo"] <= sf["variance"]).all() and (
        sf["variance"] <= sf["variance_hi"]
    ).all()


def test_single_chunk_cell_equals_direct_estimate():
    """A cell whose draws fit one chunk is exactly est.estimate(obj, N, seed=seed)."""
    obj = models.get("toy", dim=7, target=0.3, logits=0.4)
    est = estimators.get("score_function", baseline="leave_one_out")
    cell = C.evaluate(obj, est, 3000, seed=11)
    g = estimators.get("score_function", baseline="leave_one_out").estimate(obj, 3000, seed=11)
    s = summarize(g["logits"], obj.exact_grad()["logits"])
    row = cell.summary.iloc[0]
    for k in ("variance", "bias_l2", "mse", "cosine", "z_max", "p_unbiased"):
        assert row[k] == pytest.approx(getattr(s, k), rel=1e-12), k
    assert len(cell.coords) == 7
    np.testing.assert_allclose(cell.coords["mean"], g["logits"].double().mean(0).numpy())


def test_chunked_draws_are_deterministic():
    obj = models.get("toy", dim=50)
    a = C.evaluate(obj, "straight_through", 4000, seed=3, chunk_elements=50 * 700)
    b = C.evaluate(obj, "straight_through", 4000, seed=3, chunk_elements=50 * 700)
    assert a.summary["draws"].iloc[0] == 4000
    assert a.summary["variance"].iloc[0] == b.summary["variance"].iloc[0]


def test_max_evals_caps_costly_estimators():
    obj = models.get("toy", dim=50)
    cell = C.evaluate(obj, "finite_difference", 10_000, seed=0, max_evals=200_000)
    assert cell.summary["draws"].iloc[0] == 2000  # 100 evaluations a draw
    assert C.cell_draws(10, 400.0, 1.0) == 10  # never more than asked
    assert C.cell_draws(10_000, 1e6, 1.0) == C.MIN_CAPPED_DRAWS


@pytest.mark.statistical
def test_biased_shown_biased_unbiased_not():
    """ST at logits -2 is detected biased; the score function passes (false alarm 1e-4)."""
    obj = models.get("toy", dim=10, target=0.45, logits=-2.0)
    table = C.compare(obj, ["straight_through", "score_function:baseline=optimal"], 20_000, 0)
    st_row, sf_row = table.iloc[0], table.iloc[1]
    assert st_row["p_unbiased"] < FALSE_ALARM and st_row["rel_bias"] > 0.5
    assert sf_row["p_unbiased"] > FALSE_ALARM


CLOSED_FORMS = [
    ("score_function:baseline=none", "score_function", {"baseline": "none"}),
    ("score_function:baseline=optimal,mode=oracle", "score_function", {"baseline": "oracle"}),
    ("score_function:baseline=leave_one_out", "score_function", {"baseline": "leave_one_out"}),
    ("straight_through", "straight_through", {}),
]


@pytest.mark.statistical
@pytest.mark.parametrize("spec, name, opts", CLOSED_FORMS)
def test_measured_variance_within_interval_of_closed_form(spec, name, opts):
    """Registry estimators on the toy: the reported interval holds the exact variance.

    Intervals at level 1 - 2.5e-5 each, so the four cases together have false-alarm rate 1e-4.
    """
    obj = models.get("toy", dim=8, target=0.45, logits=0.7, dtype=torch.float64)
    want = obj.closed_form_variance(name, **opts)
    row = C.compare(obj, [spec], 40_000, seed=5, level=1 - FALSE_ALARM / 4).iloc[0]
    assert row["variance_lo"] <= want <= row["variance_hi"], (row["variance_lo"], want)


class _NoExact:
    """A toy whose exact gradient is withheld, as for a model too large to enumerate."""

    def __init__(self):
        self._toy = models.get("toy", dim=4, target=0.3, logits=0.2, dtype=torch.float64)
        self.params = self._toy.params
        self.name = "toy-no-exact"

    def model(self, params):
        return self._toy.model(params)

    def exact_grad(self):
        raise ValueError("too large to enumerate")


@pytest.mark.statistical
def test_estimated_reference_is_declared_and_carried():
    obj = _NoExact()
    ref, se = C.reference_gradient(obj, reference_draws=20_000, seed=1)
    assert se is not None and (se["logits"] > 0).all()
    table = C.compare(obj, ["score_function:baseline=leave_one_out"], 5000, seed=2)
    row = table.iloc[0]
    assert row["reference"] == "estimated" and row["reference_se_l2"] > 0
    assert row["p_unbiased"] > FALSE_ALARM
    exact = obj._toy.exact_grad()["logits"]
    assert float((ref["logits"] - exact).abs().max() / se["logits"].max()) < 5


def test_explicit_reference_is_used():
    obj = models.get("toy", dim=3)
    ref = {"logits": torch.zeros(3)}
    row = C.compare(obj, ["straight_through"], 1000, 0, reference=ref).iloc[0]
    assert row["grad_norm"] == 0.0


def test_bad_names_and_options():
    obj = models.get("toy", dim=3)
    with pytest.raises(ValueError, match="unknown estimator 'nope'.*valid names"):
        C.compare(obj, ["nope"], 100)
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        C.compare(obj, ["spsa:bogus=1"], 100)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        C.run_compare(["nope"], ["spsa"], 100, progress=False)
    with pytest.raises(ValueError, match="no estimators"):
        C.compare(obj, [], 100)
    with pytest.raises(ValueError, match="num_draws"):
        C.compare(obj, ["spsa"], 1)
    with pytest.raises(ValueError, match="key=value"):
        C.parse_spec("spsa:c")
    with pytest.raises(ValueError, match="cannot parse"):
        C.parse_spec("9lives")


def test_inapplicable_estimator_skipped_with_reason():
    obj = models.get("toy", dim=30)
    table = C.compare(obj, ["exact", "straight_through"], 500, skip_inapplicable=True)
    assert list(table["estimator"]) == ["straight_through"]
    assert "enumeration" in table.attrs["skipped"][0]["reason"]


@given(
    name=st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
    opts=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
        st.one_of(
            st.integers(-1000, 1000),
            st.floats(allow_nan=False, allow_infinity=False, width=32),
            st.booleans(),
            st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(
                lambda s: s not in ("true", "false", "inf", "nan", "infinity")
            ),
        ),
        max_size=4,
    ),
)
def test_spec_round_trip(name, opts):
    assert C.parse_spec(C.format_spec(name, opts)) == (name, opts)


def test_spec_forms():
    assert C.parse_spec("score_function:baseline=none") == ("score_function", {"baseline": "none"})
    assert C.parse_spec("score_function[baseline=optimal,num_samples=2]") == (
        "score_function",
        {"baseline": "optimal", "num_samples": 2},
    )
    assert C.parse_spec("sbn:hidden=4|3") == ("sbn", {"hidden": [4, 3]})


def test_grids():
    assert C.parse_grid("-1:1:3") == [-1, 0, 1]
    assert C.parse_grid("-1.0:1:3") == [-1.0, 0.0, 1.0]
    assert C.parse_grid("0:1:3") == [0.0, 0.5, 1.0]
    assert all(isinstance(v, int) for v in C.parse_grid("2:8:4"))
    assert C.parse_grid("2,4,8") == [2, 4, 8]
    assert C.parse_grid([0.1]) == [0.1]
    for bad in ("", " ", "1:2", "1:2:0"):
        with pytest.raises(ValueError):
            C.parse_grid(bad)
    with pytest.raises(ValueError, match="empty grid"):
        C.parse_grid([])


def test_sweep_model_option_and_estimator_option():
    tab = C.sweep("toy:dim=4", "logits", "-1:1:3", ["straight_through"], 500, seed=0)
    assert list(tab["sweep_value"]) == [-1.0, 0.0, 1.0]
    assert (tab["estimator"] == "straight_through").all()
    tab = C.sweep("toy:dim=4", "c", "0.05,0.5", None, 500, seed=0)
    assert set(tab["estimator"]) == {"spsa"}
    assert list(tab["sweep_value"]) == [0.05, 0.5]
    tab = C.sweep("toy:dim=4", "num_samples", "2,4", ["score_function:baseline=leave_one_out"], 500)
    assert list(tab["evals_per_draw"]) == [2.0, 4.0]


def test_sweep_bad_input():
    with pytest.raises(ValueError, match="unknown sweep parameter 'nope'"):
        C.sweep("toy", "nope", "1,2")
    with pytest.raises(ValueError, match="empty grid"):
        C.sweep("toy", "logits", "")
    with pytest.raises(ValueError, match="both fixed"):
        C.sweep("toy:logits=1", "logits", "1,2")
    with pytest.raises(ValueError, match="leave_one_out"):
        C.sweep("toy:dim=3", "num_samples", "1,2", ["score_function:baseline=leave_one_out"], 100)


def test_train_decreases_loss_with_exact_gradient():
    curve = C.train("sbn", "exact", steps=40, lr=0.1, eval_every=10)
    assert list(curve["step"]) == [0, 10, 20, 30, 40]
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    assert math.isfinite(curve["loss"].iloc[-1])
    with pytest.raises(ValueError, match="steps"):
        C.train("sbn", "exact", steps=0)
    with pytest.raises(ValueError, match="lr"):
        C.train("sbn", "exact", lr=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compare_on_cuda():
    table = C.run_compare(
        ["toy:dim=20", "sbn"], ["score_function", "straight_through"], 2000, device="cuda",
        progress=False,
    )  # fmt: skip
    assert len(table) == 2 + 2 * 6
    assert (table["variance"] > 0).all() and (table["reference"] == "exact").all()


def test_default_compare_runs_every_registered_estimator():
    from stochgrad import estimators
    from stochgrad.analysis.defaults import DEFAULT_ESTIMATORS

    names = {C.parse_spec(s)[0] for s in DEFAULT_ESTIMATORS}
    assert names == set(estimators.available())
    assert len(set(DEFAULT_ESTIMATORS)) == len(DEFAULT_ESTIMATORS)
