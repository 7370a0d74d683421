"""The Ray executor: same numbers as in-process, failures reported, retries, resume, and a
clear line when Ray is not installed. Ray tests share one local instance with 2 CPUs."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pandas as pd
import pytest

from stochgrad.analysis.cli import main
from stochgrad.analysis.executor import INSTALL_HINT, Cell, CellsFailed, RayExecutor

TIMING = {"seconds_per_draw", "work_variance_seconds"}
GRID = ["--models", "toy:dim=3", "--estimators", "score_function", "straight_through"]
QUIET = ["--draws", "200", "--no-plots", "--no-progress"]


def test_missing_extra_gives_one_line(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    rc = main(["compare", *GRID, *QUIET, "--out", str(tmp_path / "o"), "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and 'pip install ".[ray]"' in err[0]
    assert INSTALL_HINT.split(";")[0] in err[0]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _same(a: Path, b: Path) -> None:
    x, y = pd.read_csv(a / "summary.csv"), pd.read_csv(b / "summary.csv")
    cols = [c for c in x.columns if c not in TIMING]
    key = ["model", "estimator", "param"] + (["sweep_value"] if "sweep_value" in x else [])
    x, y = (d.sort_values(key).reset_index(drop=True)[cols] for d in (x, y))
    pd.testing.assert_frame_equal(x, y, check_exact=True)


@pytest.mark.slow
def test_compare_ray_equals_local(ray_local, tmp_path):
    assert main(["compare", *GRID, *QUIET, "--out", str(tmp_path / "l")]) == 0
    assert main(["compare", *GRID, *QUIET, "--out", str(tmp_path / "r"), "--executor", "ray"]) == 0
    _same(tmp_path / "l", tmp_path / "r")


@pytest.mark.slow
def test_sweep_ray_equals_local(ray_local, tmp_path):
    sw = ["sweep", "--model", "toy:dim=3", "--grid=-1:1:3", "--estimators", "score_function"]
    assert main([*sw, *QUIET, "--out", str(tmp_path / "l")]) == 0
    assert main([*sw, *QUIET, "--out", str(tmp_path / "r"), "--executor", "ray"]) == 0
    _same(tmp_path / "l", tmp_path / "r")


def _ok(i: int) -> int:
    return i


def _boom(i: int) -> int:
    raise RuntimeError(f"cell {i} is broken")


def _die_once(i: int, marker: str) -> int:
    m = Path(marker)
    if not m.exists():
        m.write_text("died")
        os._exit(1)
    return i


@pytest.mark.slow
def test_failing_cell_reported_others_finish(ray_local):
    seen = []
    cells = [Cell("a", _ok, (1,)), Cell("bad", _boom, (2,)), Cell("c", _ok, (3,))]
    ex = RayExecutor(progress=False, echo=seen.append)
    got = {}
    with pytest.raises(CellsFailed, match="1 of 3 cells failed") as e:
        for cell, out in ex.run(cells):
            got[cell.key] = out
    assert got == {"a": 1, "c": 3}
    assert e.value.failures[0][0] == "bad" and "cell 2 is broken" in e.value.failures[0][1]
    assert any("bad" in s for s in seen)


@pytest.mark.slow
def test_killed_worker_is_retried(ray_local, tmp_path):
    marker = tmp_path / "died"
    ex = RayExecutor(progress=False, max_retries=2, echo=lambda s: None)
    got = dict((c.key, o) for c, o in ex.run([Cell("k", _die_once, (7, str(marker)))]))
    assert marker.exists() and got == {"k": 7}


@pytest.mark.slow
def test_rerun_after_interruption_skips_finished(ray_local, tmp_path):
    out = tmp_path / "o"
    args = ["compare", *GRID, *QUIET, "--out", str(out), "--executor", "ray"]
    assert main(args) == 0
    first = pd.read_csv(out / "summary.csv")
    # drop one cell's rows, as if the run had been interrupted before it was written
    kept = first[first["estimator"] != "straight_through"]
    kept.to_csv(out / "summary.csv", index=False)
    assert main(args) == 0
    again = pd.read_csv(out / "summary.csv")
    sf = lambda d: d[d["estimator"] == "score_function"].reset_index(drop=True)  # noqa: E731
    # the finished cell is not recomputed: even its timing columns are unchanged
    pd.testing.assert_frame_equal(sf(first), sf(again), check_exact=True)
    assert set(again["estimator"]) == {"score_function", "straight_through"}


REPRO = [
    "reproduce", "paper", "--epochs", "1", "--seeds", "1",
    "--rows", "straight_through,baseline_sigmoid", "--train-subset", "64",
    "--no-bench", "--no-progress",
]  # fmt: skip


@pytest.mark.slow
def test_reproduce_ray_equals_local_and_resumes(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ../shared/data/mnist.npz from here: the 8x8 digits
    local, remote = tmp_path / "l", tmp_path / "r"
    assert main([*REPRO, "--out", str(local)]) == 0
    assert main([*REPRO, "--out", str(remote), "--executor", "ray"]) == 0
    x, y = pd.read_csv(local / "results.csv"), pd.read_csv(remote / "results.csv")
    assert len(x) == 2
    cols = [c for c in x.columns if c != "seconds"]
    pd.testing.assert_frame_equal(x[cols], y[cols], check_exact=True)
    x, y = pd.read_csv(local / "epochs.csv"), pd.read_csv(remote / "epochs.csv")
    cols = [c for c in x.columns if c != "seconds"]
    pd.testing.assert_frame_equal(x[cols], y[cols], check_exact=True)
    for name in ("seed0.json", "seed0.csv", "seed0.pt", "seed0.ckpt"):  # written by the driver
        assert (remote / "runs" / "straight_through" / name).is_file(), name

    # A re-run trains only what is missing: the finished run is skipped, untouched.
    (remote / "runs" / "baseline_sigmoid" / "seed0.json").unlink()
    kept = (remote / "runs" / "straight_through" / "seed0.json").read_text()
    capsys.readouterr()
    assert main([*REPRO, "--out", str(remote), "--executor", "ray"]) == 0
    err = capsys.readouterr().err
    assert err.count("already finished, skipped") == 1
    assert "straight_through seed 0 already finished" in err
    assert (remote / "runs" / "straight_through" / "seed0.json").read_text() == kept
    again = pd.read_csv(remote / "results.csv")
    cols = [c for c in again.columns if c != "seconds"]
    pd.testing.assert_frame_equal(pd.read_csv(local / "results.csv")[cols], again[cols])

    # More epochs: the checkpoint travels to the worker and the run goes on from epoch 1 (the
    # first epoch's line, its recorded time included, is the one trained before).
    first = pd.read_csv(remote / "epochs.csv")
    longer = [*REPRO, "--out", str(remote), "--executor", "ray"]
    longer[longer.index("--epochs") + 1] = "2"
    assert main(longer) == 0
    epochs = pd.read_csv(remote / "epochs.csv")
    assert sorted(epochs.groupby(["row", "seed"])["epoch"].apply(list).tolist()) == [[1, 2]] * 2
    pd.testing.assert_frame_equal(
        epochs[epochs["epoch"] == 1].reset_index(drop=True), first, check_exact=True
    )


@pytest.mark.slow
def test_reproduce_ray_failing_run_exits_nonzero_keeping_finished(
    ray_local, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    # A corrupt checkpoint under the run's own settings makes that run fail on its worker.
    args = [*REPRO, "--out", str(out), "--executor", "ray"]
    assert main(args) == 0
    (out / "runs" / "baseline_sigmoid" / "seed0.json").unlink()
    (out / "runs" / "baseline_sigmoid" / "seed0.ckpt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 of 1 cells failed" in err and "baseline_sigmoid/seed0" in err
    assert (out / "runs" / "straight_through" / "seed0.json").is_file()
    assert list(pd.read_csv(out / "results.csv")["row"]) == ["straight_through"]
