"""The stochgrad command line: every command runs, bad input gets a clear error."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from stochgrad import estimators
from stochgrad.analysis import cli

SMALL = ["--models", "toy:dim=5", "sbn", "--draws", "300", "--no-progress", "--threads", "1"]


def _files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


@pytest.mark.parametrize(
    "argv", [[], ["compare"], ["sweep"], ["train"], ["plot"], ["list"], ["bench"], ["reproduce"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: stochgrad" in capsys.readouterr().out


def test_list_names_every_estimator_and_model(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in estimators.available():
        assert name in out
    assert "unbiased: yes" in out and "toy" in out and "sbn" in out


def test_compare_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *SMALL, "--estimators", "straight_through", "exact", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "== toy:dim=5" in text and "== sbn" in text and "p_unbiased" in text
    table = pd.read_csv(out / "summary.csv")
    assert {"model", "estimator", "param", "draws", "work_variance", "p_unbiased"} <= set(table)
    assert len(table) == 2 + 2 * 6  # toy: 1 param (5 units enumerate); sbn: 6 params
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["seed"] == 0 and run["environment"]["device"] == "cpu"
    figs = {f.name for f in (out / "figures").iterdir()}
    assert {"bias_vs_std.png", "bias_vs_std.pdf", "mse_vs_cost.png", "variance.png"} <= figs
    before = pd.read_csv(out / "summary.csv")
    assert cli.main(argv + ["--no-plots"]) == 0  # resume: nothing recomputed
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), before)


def test_compare_bad_names_write_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    rc = cli.main(["compare", *SMALL, "--estimators", "nope", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown estimator 'nope'" in err and "score_function" in err
    assert not out.exists()
    assert cli.main(["compare", "--models", "nope", "--out", str(out), "--no-progress"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not out.exists()
    rc = cli.main(["compare", *SMALL, "--estimators", "spsa:bogus=1", "--out", str(out)])
    assert rc == 2 and "bogus" in capsys.readouterr().err


def test_compare_incompatible_directory_untouched(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", *SMALL, "--estimators", "straight_through", "--out", str(out)]
    assert cli.main([*base, "--no-plots"]) == 0
    before = _files(out)
    assert cli.main([*base, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "incompatible" in err and "seed" in err and "nothing was overwritten" in err
    assert _files(out) == before


def test_sweep_and_plot(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--model", "toy:dim=4", "--param", "logits", "--grid=-1:1:3"]
    argv += ["--estimators", "straight_through", "--draws", "300", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert (out / "figures" / "variance_sweep.png").stat().st_size > 1000
    table = pd.read_csv(out / "summary.csv")
    assert list(table["sweep_value"]) == [-1.0, 0.0, 1.0]
    printed = capsys.readouterr().out.splitlines()
    shown = printed[: next(i for i, x in enumerate(printed) if x.startswith("sf = "))]
    assert len(shown) == 4 and max(len(x) for x in shown) <= 100
    assert all(x.split()[0].startswith("st") for x in shown[1:])
    assert cli.main(["plot", str(out)]) == 0
    assert "variance_sweep.pdf" in capsys.readouterr().out


def test_sweep_bad_input(tmp_path, capsys):
    out = tmp_path / "sw"
    assert cli.main(["sweep", "--param", "nope", "--out", str(out), "--no-progress"]) == 2
    assert "unknown sweep parameter 'nope'" in capsys.readouterr().err
    assert cli.main(["sweep", "--grid", "", "--out", str(out), "--no-progress"]) == 2
    assert "empty grid" in capsys.readouterr().err
    assert not out.exists()


def test_train(tmp_path, capsys):
    out = tmp_path / "tr"
    argv = ["train", "--model", "sbn", "--estimators", "exact", "straight_through"]
    argv += ["--steps", "20", "--seeds", "2", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    table = pd.read_csv(out / "summary.csv")
    assert set(table["seed"]) == {0, 1} and table["step"].max() == 20
    assert (out / "figures" / "training.png").is_file()
    assert "expected loss after 20 steps" in capsys.readouterr().out


def test_plot_not_a_results_dir(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "not a stochgrad results directory" in capsys.readouterr().err


def test_bad_device(capsys):
    assert cli.main(["compare", "--device", "tpu", "--no-progress"]) == 2
    assert "--device" in capsys.readouterr().err


def test_reproduce_missing_module_is_explained(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "stochgrad.analysis.reproduce", None)  # import -> error
    assert cli.main(["reproduce", "--anything"]) == 2
    assert "reproduce is not available" in capsys.readouterr().err


def test_compare_table_fits_100_columns(tmp_path, capsys):
    """The printed summary of a compare over every default estimator fits 100 columns."""
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "toy:dim=5", "sbn", "--draws", "200", "--no-progress"]
    argv += ["--threads", "1", "--no-plots", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    table = lines[: next(i for i, x in enumerate(lines) if x.startswith("wrote "))]
    assert len(table) > 30 and max(len(x) for x in table) <= 100, max(table, key=len)
    assert "sf:moving_average" in text and "st:identity" in text and "node_perturbation" in text
    head = next(x for x in lines if x.startswith("estimator"))
    assert head.split() == ["estimator", "param", "bias", "floor", "variance", "mse", "snr",
                            "p_unbiased"]  # fmt: skip
    assert f"{out}/summary.csv" in text
    assert "all columns" in table[-1] and "summary.csv" in table[-1]
    assert "wall time" in text


def test_format_table_clips_long_names():
    row = {"model": "toy:" + "x" * 150, "estimator": "spsa:" + "c=1," * 40, "param": "p" * 60}
    row |= {"reference": "exact", "bias_l2": 1.0, "bias_noise_floor": 0.1, "variance": 2.0}
    row |= {"mse": 3.0, "snr": 0.5, "p_unbiased": 0.2}
    text = cli.format_table(pd.DataFrame([row, row | {"param": "q"}]))
    assert max(len(x) for x in text.splitlines()) <= 100
    assert "~" in text and "0.2" in text


def test_plotting_reports_progress(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "toy:dim=5", "--draws", "200", "--threads", "1"]
    argv += ["--estimators", "straight_through", "--out", str(out)]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    figs = [x.split()[2] for x in cap.err.splitlines() if x.startswith("figure ")]
    assert figs == ["bias_vs_std", "mse_vs_cost", "variance"]
    assert "(figures " in cap.out
    (out / "figures" / ".stamp").unlink()
    assert cli.main([*argv, "--no-progress"]) == 0  # redrawn, silently
    assert "figure " not in capsys.readouterr().err


def test_compare_skipped_cells_fit_100_columns(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "toy", "--estimators", "exact", "sts", "--draws", "50"]
    argv += ["--no-progress", "--threads", "1", "--no-plots", "--out", str(out)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = lines[: next(i for i, x in enumerate(lines) if x.startswith("wrote "))]
    assert any(x.startswith("skipped: exact on toy") for x in shown)
    assert max(len(x) for x in shown) <= 100, max(shown, key=len)
