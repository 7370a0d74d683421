"""Tests for ``stochgrad reproduce paper``: report, resume, benchmark, and a timed smoke run."""

from __future__ import annotations

import argparse
import json
import warnings

import pandas as pd
import pytest

from stochgrad.analysis import reproduce


def _digits_args(tmp_path, epochs=2):
    return [
        "paper", "--epochs", str(epochs), "--seeds", "2",
        "--rows", "straight_through,baseline_sigmoid", "--out", str(tmp_path / "out"),
        "--train-subset", "96", "--no-bench", "--no-progress",
    ]  # fmt: skip


def test_fallback_run_writes_report_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ../shared/data/mnist.npz from here: the 8x8 digits
    assert reproduce.main(_digits_args(tmp_path)) == 0
    err = capsys.readouterr().err
    assert "scikit-learn's 8x8 digits" in err
    out = tmp_path / "out"
    for name in ("report.md", "valid_curves.png", "epochs.csv", "results.csv"):
        assert (out / name).is_file(), name
    epochs = pd.read_csv(out / "epochs.csv")
    assert len(epochs) == 2 * 2 * 2  # rows x seeds x epochs
    assert {"row", "seed", "epoch", "train_criterion", "valid_error", "lambda"} <= set(epochs)
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["row"].unique()) == ["baseline_sigmoid", "straight_through"]
    report = (out / "report.md").read_text()
    assert "| Straight-through | 3.3e-03 |" in report and "1.39" in report
    assert "8x8 digits (fallback" in report
    assert (out / "runs" / "straight_through" / "seed1.csv").is_file()

    # Resume: a finished (row, seed) is skipped; a deleted one is trained again.
    (out / "runs" / "baseline_sigmoid" / "seed1.json").unlink()
    before = json.loads((out / "runs" / "straight_through" / "seed0.json").read_text())
    assert reproduce.main(_digits_args(tmp_path)) == 0
    err = capsys.readouterr().err
    assert err.count("already finished, skipped") == 3
    assert "baseline_sigmoid seed 1: valid" in err
    after = json.loads((out / "runs" / "straight_through" / "seed0.json").read_text())
    assert after == before

    # Fewer epochs: nothing is reused (selection must not see the later epochs).
    assert reproduce.main(_digits_args(tmp_path, epochs=1)) == 0
    err = capsys.readouterr().err
    assert "already finished" not in err and "resumes" not in err
    assert len(pd.read_csv(out / "epochs.csv")) == 2 * 2 * 1

    # More epochs: every run goes on from its last checkpoint instead of starting again.
    assert reproduce.main(_digits_args(tmp_path, epochs=3)) == 0
    assert capsys.readouterr().err.count("resumes after epoch 1") == 4
    epochs = pd.read_csv(out / "epochs.csv")
    assert sorted(epochs.groupby(["row", "seed"])["epoch"].apply(list).tolist()) == [[1, 2, 3]] * 4

    # Another dataset or other settings: the checkpoints are not used.
    args = _digits_args(tmp_path, epochs=3)
    args[args.index("96")] = "64"
    assert reproduce.main(args) == 0
    err = capsys.readouterr().err
    assert "resumes" not in err and err.count("has other settings, starting afresh") == 4


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown row"):
        reproduce.parse_rows("straight_through,warp_drive")
    with pytest.raises(ValueError, match="--seeds must be"):
        reproduce.parse_seeds("many")
    assert reproduce.parse_seeds("3") == [0, 1, 2]
    assert reproduce.parse_seeds("4,7") == [4, 7]
    assert reproduce.parse_seeds("5,") == [5]
    with pytest.raises(ValueError, match="for one given seed"):
        reproduce.parse_seeds("0")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    reproduce.add_parser(sub)
    args = parser.parse_args(["reproduce", "paper", "--device", "cpu"])
    # --epochs resolves in run(): 10, or 1 under --smoke
    assert args.func is reproduce.run and args.epochs is None and args.data is None
    assert args.protocol == "original"
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "paper", "--device", "tpu"])


def test_bench_sparse_inference_small():
    table = reproduce.bench_sparse_inference(
        densities=(0.0, 0.1, 1.0), batches=(1, 4), experts=50, inputs=12,
        repeats=1, min_seconds=0.0,
    )  # fmt: skip
    assert len(table) == 6
    row = table[(table["batch"] == 4) & (table["density"] == 0.1)].iloc[0]
    assert row["macs_dense"] == 4 * 50 * (12 + 1 + 10)
    assert row["macs_sparse"] == 20 * (12 + 1 + 10)
    assert row["mac_ratio"] == pytest.approx(10.0)
    assert row["best_method"] in ("gather", "csr") and row["speedup"] > 0
    assert "| 4 | 10% |" in reproduce.format_bench(table)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["original", "spec"])
def test_smoke_run_on_mnist_every_row(tmp_path, real_mnist, protocol):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = reproduce.main([
            "paper", "--data", str(real_mnist), "--epochs", "1", "--seeds", "1",
            "--train-subset", "300", "--out", str(tmp_path), "--no-progress",
            "--protocol", protocol,
        ])  # fmt: skip
    assert status == 0
    report = (tmp_path / "report.md").read_text()
    assert "## The compute saving, measured" in report
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == len(reproduce.cc.GATE_TYPES)
    assert (results["protocol"] == protocol).all()
    sparse = results[results["row"].isin(["straight_through", "sts", "noisy_rectifier"])]
    assert sparse["test_density"].between(0.07, 0.13).all()
