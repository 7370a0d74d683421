"""``analysis.compare_pyro`` and ``stochgrad compare --pyro``: the table on a Pyro program.

The program is an enumerable chain ``z1 -> z2`` of Bernoulli sites in a plate, with seven
params (float64). Statistical tests: fixed seeds, family-wise false-alarm rate 1e-4 over the
rows tested (Bonferroni; each row's ``p_unbiased`` is already Bonferroni-Holm over its
coordinates), against the exact gradient of ``TraceEnum_ELBO``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from stochgrad import analysis, estimators
from stochgrad.analysis import cli
from stochgrad.analysis.compare import SUMMARY_COLUMNS
from stochgrad.analysis.compare_pyro import load_program, run_compare_pyro
from stochgrad.analysis.stats import GradientStats
from stochgrad.estimators.elbo import EstimatorELBO
from stochgrad.estimators.handlers import estimator_config

FALSE_ALARM = 1e-4
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chain.py"
X = torch.tensor([0.3, 1.7, -0.4], dtype=torch.float64)
PARAMS = ["q1", "r", "s", "a", "b0", "b1", "loc"]


@pytest.fixture(autouse=True)
def clean_store():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)


def _example_model():
    """The model of ``examples/chain.py`` (the tests pair it with their own guide)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model


model = _example_model()


def guide(x):
    q1 = pyro.param("q1", torch.tensor([-1.0, 0.2, 0.9]))
    r = pyro.param("r", torch.tensor([0.5, 0.0, -0.5]))
    s = pyro.param("s", torch.tensor(0.8))
    with pyro.plate("data", x.shape[-1]):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=q1))
        pyro.sample("z2", dist.Bernoulli(logits=r + s * z1))


def exact_grads() -> dict[str, torch.Tensor]:
    """``d(-ELBO)/d params`` by enumeration (independently of the module under test)."""
    guide(X), model(X)  # create the params
    ps = pyro.get_param_store()
    params = dict(ps.named_parameters())
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model, config_enumerate(guide, "parallel"), X
    )
    grads = torch.autograd.grad(loss, [params[k] for k in PARAMS])
    return dict(zip(PARAMS, grads))


def rows(table, estimator):
    return table[table["estimator"] == estimator].set_index("param")


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_columns_params_and_reference():
    table = analysis.compare_pyro(model, guide, ["score_function"], 200, 0, X)
    assert list(table.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert list(table["param"]) == PARAMS  # guide's params first, in the order they are read
    assert set(table["reference"]) == {"exact"} and table["reference_se_l2"].eq(0).all()
    assert table["vectorized"].all() and table["draws"].eq(200).all()
    assert table["evals_per_draw"].eq(1).all() and table["backwards_per_draw"].eq(1).all()
    ref = exact_grads()
    for k in PARAMS:
        norm = float(ref[k].norm())
        assert rows(table, "score_function").loc[k, "grad_norm"] == pytest.approx(norm, rel=1e-12)


@pytest.mark.slow
@pytest.mark.statistical
@pytest.mark.parametrize("vectorize", [None, False])
def test_unbiased_estimators_pass_and_straight_through_is_biased(vectorize):
    """Vectorised draws (4000) and sequential draws (fewer: one ELBO call each)."""
    unbiased = [
        "score_function:baseline=none",
        "score_function:baseline=moving_average",
        "score_function:baseline=optimal",
        "score_function:baseline=leave_one_out",
        "pyro:tracegraph",
        "pyro:tracegraph+avg",
    ]
    draws = 4000 if vectorize is None else 600
    table = analysis.compare_pyro(
        model, guide, [*unbiased, "straight_through"], draws, 11, X, vectorize=vectorize
    )
    assert table["vectorized"].all() == (vectorize is None)
    # the exact estimator enumerates 2^6 runs per draw: few draws; it has no spread
    exact = analysis.compare_pyro(model, guide, ["exact"], 4, 11, X)
    tested = len(unbiased) + 1
    for e in unbiased:
        r = rows(table, e)
        assert (r["p_unbiased"] > FALSE_ALARM / tested).all(), (e, r["p_unbiased"])
    r = rows(exact, "exact")
    assert (r["p_unbiased"] > FALSE_ALARM / tested).all() and r["variance"].max() < 1e-20
    st = rows(table, "straight_through")
    for k in ["q1", "r", "s"]:  # the guide's params: straight-through's bias
        assert st.loc[k, "p_unbiased"] < FALSE_ALARM and st.loc[k, "bias_l2_lo"] > 0
    # baselines reduce the guide params' variance against the plain score function
    plain = rows(table, "score_function:baseline=none")
    for e in ["score_function:baseline=moving_average", "pyro:tracegraph+avg"]:
        assert rows(table, e).loc["q1", "variance_hi"] < plain.loc["q1", "variance_lo"]


@pytest.mark.statistical
def test_quick_unbiased_and_biased():
    """The default suite's version: one unbiased and one biased estimator, vectorised."""
    table = analysis.compare_pyro(
        model, guide, ["score_function:baseline=leave_one_out", "straight_through"], 2000, 12, X
    )
    assert (
        rows(table, "score_function:baseline=leave_one_out")["p_unbiased"] > FALSE_ALARM / 2
    ).all()
    st = rows(table, "straight_through")
    assert st.loc["q1", "p_unbiased"] < FALSE_ALARM and st.loc["q1", "bias_l2_lo"] > 0


def test_no_baseline_equals_pyros_tracegraph():
    table = analysis.compare_pyro(model, guide, ["score_function", "pyro:tracegraph"], 300, 4, X)
    a, b = rows(table, "score_function"), rows(table, "pyro:tracegraph")
    for col in ["variance", "mse", "z_max", "cosine"]:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9)


@pytest.mark.parametrize("baseline", ["none", "optimal"])
def test_row_equals_direct_estimator_elbo_draws(baseline):
    """Sequential draws: the row is the statistics of EstimatorELBO gradients, exactly."""
    n, seed = 60, 5
    spec = f"score_function:baseline={baseline}"
    table = analysis.compare_pyro(
        model, guide, [spec], n, seed, X, vectorize=False, warmup=0, groups=4
    )
    pyro.clear_param_store()
    ref = exact_grads()
    est = estimators.get("score_function", baseline=baseline)
    elbo = EstimatorELBO(max_plate_nesting=1)
    params = dict(pyro.get_param_store().named_parameters())
    accs = {k: GradientStats(ref[k], groups=4) for k in PARAMS}
    pyro.set_rng_seed(seed)
    for _ in range(n):
        for v in params.values():
            v.grad = None
        elbo.loss_and_grads(model, estimator_config(guide, {"z1": est, "z2": est}), X)
        for k in PARAMS:
            accs[k].update(params[k].grad.unsqueeze(0))
    r = rows(table, spec)
    for k in PARAMS:
        s = accs[k].result(level=0.95)
        for col in ["variance", "mse", "bias_l2", "bias_noise_floor", "z_max", "cosine"]:
            assert r.loc[k, col] == getattr(s, col), (k, col)


def test_dict_entry_and_leaves_store_and_rng_as_found():
    guide(X), model(X)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    state = torch.get_rng_state()
    table = analysis.compare_pyro(
        model, guide, [{"z1": "straight_through", "z2": "score_function"}], 100, 0, X
    )
    assert set(table["estimator"]) == {"z1=straight_through; z2=score_function"}
    assert set(table["unbiased"]) == {"no"}
    assert torch.equal(torch.get_rng_state(), state)
    after = pyro.get_param_store()
    assert sorted(after.keys()) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v)


def centred_guide(x):
    """Logits centred over *all* their dims: per-draw copies would be mixed by the mean."""
    q1 = pyro.param("q1", torch.tensor([-1.0, 0.2, 0.9]))
    with pyro.plate("data", x.shape[-1]):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=q1 - q1.mean()))
        pyro.sample("z2", dist.Bernoulli(logits=z1 - 0.5))


def test_interacting_draws_fall_back_to_sequential():
    messages = []
    table = analysis.compare_pyro(
        model, centred_guide, ["score_function"], 20, 0, X, echo=messages.append
    )
    assert not table["vectorized"].any()
    assert any("draws interact" in m for m in messages), messages
    with pytest.raises(ValueError, match="cannot be vectorised over draws"):
        analysis.compare_pyro(model, centred_guide, ["score_function"], 40, 0, X, vectorize=True)


def continuous_guide(x):
    guide(x)
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("u", dist.Normal(m, 1.0))


def continuous_model(x):
    model(x)
    pyro.sample("u", dist.Normal(0.0, 1.0))


def test_estimated_reference_when_a_site_is_continuous():
    table = analysis.compare_pyro(
        continuous_model, continuous_guide, ["score_function"], 100, 0, X, reference_draws=400
    )
    assert set(table["reference"]) == {"estimated"}
    assert (table["reference_se_l2"] > 0).all()
    assert "continuous latent guide sites (u)" in table.attrs["reference"]
    assert "m" in set(table["param"])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ---------------------------------------------------------------------------------------------


def normal_guide(x):
    loc = pyro.param("g", torch.tensor(0.0))
    pyro.sample("w", dist.Normal(loc, 1.0))


def normal_model(x):
    pyro.sample("w", dist.Normal(0.0, 1.0))


def extra_guide(x):
    guide(x)
    pyro.sample("extra", dist.Bernoulli(0.5))


def wide_guide(x):
    q1 = pyro.param("q1", torch.zeros(4))
    with pyro.plate("data", 4):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=q1))
        pyro.sample("z2", dist.Bernoulli(logits=z1))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda out: (normal_model, normal_guide, ["score_function"]), "no discrete latent"),
        (lambda out: (model, guide, [{"z3": "score_function"}]), "'z3', not discrete sample"),
        (lambda out: (model, extra_guide, ["score_function"]), "guide site 'extra' is not"),
        (lambda out: (model, wide_guide, ["score_function"]), "site 'x'.*not broadcastable"),
        (lambda out: (model, guide, ["nope"]), "unknown estimator 'nope'"),
    ],
)
def test_bad_programs_are_refused_before_writing(tmp_path, call, match):
    out = tmp_path / "never"
    m, g, ests = call(out)
    with pytest.raises((ValueError, TypeError), match=match):
        run_compare_pyro(m, g, ests, 100, 0, X, out=out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--pyro", f"{EXAMPLE}:model,guide", "--draws", "300", "--no-progress",
            "--estimators", "score_function:baseline=optimal", "straight_through",
            "pyro:tracegraph", "--out", str(out), "--no-plots"]  # fmt: skip
    rc, text, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "(reference gradient: exact)" in text and "sf:optimal" in text
    assert "pyro:tracegraph" in text
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 3 * 7
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "compare" and run["status"] == "finished"
    assert run["config"]["program"] == str(EXAMPLE) and run["config"]["data"] is None
    assert (out / "per_coordinate.csv").is_file()
    before = (out / "summary.csv").read_text()
    rc, text, err = run_cli(argv, capsys)  # the same command again: finished cells are kept
    assert rc == 0, err
    assert (out / "summary.csv").read_text() == before
    assert len(json.loads((out / "run.json").read_text())["history"]) == 2


def test_cli_data_npz_and_data_function(tmp_path, capsys):
    prog = tmp_path / "prog.py"
    prog.write_text(
        "import pyro, torch, pyro.distributions as dist\n"
        "def model(x):\n"
        "    with pyro.plate('d', x.shape[-1]):\n"
        "        z = pyro.sample('z', dist.Bernoulli(logits=pyro.param('a', torch.tensor(0.))))\n"
        "        pyro.sample('x', dist.Normal(z, 1.0), obs=x)\n"
        "def guide(x):\n"
        "    q = pyro.param('q', torch.zeros(x.shape[-1]))\n"
        "    with pyro.plate('d', x.shape[-1]):\n"
        "        pyro.sample('z', dist.Bernoulli(logits=q))\n"
    )
    np.savez(tmp_path / "obs.npz", x=np.array([0.5, -1.0, 2.0, 0.1]))
    argv = ["compare", "--pyro", f"{prog}:model,guide", "--data", str(tmp_path / "obs.npz"),
            "--draws", "50", "--no-progress", "--no-plots", "--estimators", "score_function",
            "--out", str(tmp_path / "a")]  # fmt: skip
    rc, text, err = run_cli(argv, capsys)
    assert rc == 0, err
    coords = (tmp_path / "a" / "per_coordinate.csv").read_text()
    assert coords.count(",q,") == 4 and coords.count(",a,") == 1
    # the example file's data(value): its observations from the text given
    argv = ["compare", "--pyro", f"{EXAMPLE}:model,guide", "--data", "0.5,1.5", "--draws", "50",
            "--no-progress", "--no-plots", "--estimators", "score_function",
            "--out", str(tmp_path / "b")]  # fmt: skip
    rc, text, err = run_cli(argv, capsys)
    assert rc == 0, err
    coords = (tmp_path / "b" / "per_coordinate.csv").read_text()
    assert coords.count(",q1,") == 2


@pytest.mark.parametrize(
    "spec, extra, match",
    [
        ("{tmp}/missing.py:model,guide", [], "no such file"),
        ("{example}:model,nothere", [], "has no guide 'nothere'"),
        ("{example}:model", [], "two names"),
        ("{example}:model,guide", ["--estimators", "nope"], "unknown estimator 'nope'"),
        ("{example}:model,guide", ["--models", "toy"], "--pyro and --models exclude"),
        ("{example}:model,guide", ["--data", "{tmp}/none.npz"], "--data: data()"),
        ("{tmp}/noguide.py:model,guide", [], "no discrete latent sample site"),
    ],
)
def test_cli_bad_input_one_line_nothing_written(tmp_path, capsys, spec, extra, match):
    (tmp_path / "noguide.py").write_text(
        "import pyro, torch, pyro.distributions as dist\n"
        "def model():\n    pyro.sample('w', dist.Normal(0.0, 1.0))\n"
        "def guide():\n    pyro.sample('w', dist.Normal(pyro.param('g', torch.tensor(0.)), 1.))\n"
    )
    out = tmp_path / "never"
    fmt = {"tmp": str(tmp_path), "example": str(EXAMPLE)}
    argv = ["compare", "--pyro", spec.format(**fmt), *[e.format(**fmt) for e in extra],
            "--draws", "50", "--no-progress", "--out", str(out)]  # fmt: skip
    rc, text, err = run_cli(argv, capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stochgrad compare: error:") and match in lines[0], lines[0]
    assert not out.exists()


def test_example_file_loads_with_its_data():
    m, g, args, kwargs, info = load_program(f"{EXAMPLE}:model,guide")
    assert m.__name__ == "model" and g.__name__ == "guide" and kwargs == {}
    assert args[0].shape == (5,) and info["program"] == str(EXAMPLE)
    assert math.isfinite(float(args[0].sum())) and "z1 -> z2" in m.__globals__["__doc__"]
