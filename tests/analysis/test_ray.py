"""The Ray executor: same numbers as in-process, failures reported, retries, resume (after a
Ctrl-C, a killed driver, or a run interrupted mid-training on a worker), the bar over cells,
CUDA checked on the workers, and a clear line when Ray is not installed. Most Ray tests share
one local instance with 2 CPUs (and 1 declared GPU, which CPU-only torch cannot use); the
interruption tests run the command in a subprocess that starts its own."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from stochgrad.analysis import reproduce
from stochgrad.analysis.cli import main
from stochgrad.analysis.executor import (
    INSTALL_HINT,
    Cell,
    CellCounts,
    CellsFailed,
    Partial,
    RayExecutor,
)

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
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
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


# ---------------------------------------------------------------------------------------------
# The bar over cells
# ---------------------------------------------------------------------------------------------


def test_cell_counts_text_over_a_run():
    c = CellCounts(total=5, slots=2)
    seen = [c.text()]
    for failed in (False, True, False, False, False):
        if failed:
            c.failed += 1
        else:
            c.finished += 1
        seen.append(c.text())
    assert seen == [
        "finished=0 running=2 queued=3 failed=0",
        "finished=1 running=2 queued=2 failed=0",
        "finished=1 running=2 queued=1 failed=1",
        "finished=2 running=2 queued=0 failed=1",
        "finished=3 running=1 queued=0 failed=1",
        "finished=4 running=0 queued=0 failed=1",
    ]


@pytest.mark.slow
def test_bar_shows_counts_on_a_run(ray_local, capsys):
    cells = [Cell("a", _ok, (1,)), Cell("bad", _boom, (2,)), Cell("c", _ok, (3,))]
    ex = RayExecutor(progress=True, echo=lambda s: None)
    with pytest.raises(CellsFailed):
        list(ex.run(cells))
    err = capsys.readouterr().err
    assert "finished=0 running=2 queued=1 failed=0" in err  # 2 CPUs, 1 CPU per cell
    assert "3/3" in err and "finished=2 running=0 queued=0 failed=1" in err


def test_missing_resources_refused_on_a_local_instance():
    pytest.importorskip("ray")  # the executor needs the extra, though no instance is started
    ex = RayExecutor(gpus_per_cell=1, echo=lambda s: None)
    ex._ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    with pytest.raises(ValueError, match="asks for 1 GPU.*has 0"):
        ex._slots(local=True)
    warned = []
    ex.echo = warned.append
    assert ex._slots(local=False) == 1
    assert "wait until such a node joins" in warned[0]


# ---------------------------------------------------------------------------------------------
# Streaming cells
# ---------------------------------------------------------------------------------------------


def _stream(n: int):
    for i in range(n):
        yield Partial(i)
    yield f"done after {n}"


@pytest.mark.slow
def test_streaming_cell_sends_partials_then_outcome(ray_local):
    got: list[int] = []
    cell = Cell("s", _stream, (3,), on_partial=got.append)
    out = list(RayExecutor(progress=False).run([cell]))
    assert got == [0, 1, 2] and [o for _, o in out] == ["done after 3"]


# ---------------------------------------------------------------------------------------------
# Interruptions: Ctrl-C, a killed driver, a reproduce run stopped mid-training
# ---------------------------------------------------------------------------------------------

# Eight cells, two at a time: a run is still going for a few cells after its first is written.
SLOW = [
    "compare", "--models", "toy:dim=50,target=0.40", "toy:dim=50,target=0.42",
    "toy:dim=50,target=0.44", "toy:dim=50,target=0.46",
    "--estimators", "score_function", "straight_through",
    "--draws", "10000", "--no-plots", "--no-progress",
]  # fmt: skip
CELLS = 8


def _marked(mark: str) -> list[int]:
    """Processes whose environment holds ``mark`` (the driver and all it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _gone(mark: str, seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _start(args: list[str], mark: str) -> subprocess.Popen:
    env = dict(os.environ, STOCHGRAD_TEST_MARK=mark, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of its own
    code = "import sys; from stochgrad.analysis.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_cells(proc: subprocess.Popen, cells: Path, n: int = 1) -> None:
    deadline = time.monotonic() + 120
    while len(list(cells.glob("*.summary.csv"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no cell finished in 120 s"
        time.sleep(0.02)


def _snapshot(cells: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in cells.glob("*.csv")}


def _finished(cells: dict[str, bytes]) -> int:
    return len([k for k in cells if k.endswith(".summary.csv")])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_killed_driver_then_ctrl_c_then_rerun_equals_local(ray_local, tmp_path, capsys):
    """One chain, two drivers in subprocesses (each starting its own local Ray instance): the
    first is killed (SIGKILL), the second resumes, then gets Ctrl-C; a third run finishes."""
    out = tmp_path / "o"
    args = [*SLOW, "--out", str(out), "--executor", "ray"]

    # 1. A real kill of the driver, mid-run: the processes it started go with it.
    mark = f"kill-{uuid.uuid4().hex}"
    proc = _start(args, mark)
    _wait_for_cells(proc, out / "cells")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    kept = _snapshot(out / "cells")
    done = _finished(kept)
    assert 1 <= done < CELLS
    killed = mark  # its Ray processes are checked at the end (see below)

    # 2. The same command again: a fresh local instance, resuming; then Ctrl-C mid-run.
    mark = f"ctrl-c-{uuid.uuid4().hex}"
    proc = _start(args, mark)
    _wait_for_cells(proc, out / "cells", done + 1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert f"{done} of {CELLS} cells already done" in err, err
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert said == [
        "stochgrad compare: interrupted; finished cells are kept: re-run the same command to resume"
    ], err
    assert _gone(mark) == []  # its local Ray instance and workers are stopped
    after = _snapshot(out / "cells")
    assert {k: after[k] for k in kept} == kept  # finished cells were not computed again
    kept, done = after, _finished(after)
    assert done < CELLS, err  # it was interrupted, not finished

    # 3. Again (on the tests' instance): it finishes, computing only the missing cells.
    capsys.readouterr()
    assert main(args) == 0
    assert f"{done} of {CELLS} cells already done" in capsys.readouterr().err
    after = _snapshot(out / "cells")
    assert {k: after[k] for k in kept} == kept and _finished(after) == CELLS
    assert main([*SLOW, "--out", str(tmp_path / "l")]) == 0  # uninterrupted, in-process
    _same(tmp_path / "l", out)
    # Nothing of the killed driver's Ray instance keeps running: the raylet and GCS die with
    # it; Ray's agents notice their raylet is gone and exit on their own, which can take a
    # minute on a loaded machine, so they get until here and then up to two minutes more.
    assert _gone(killed, 120) == []


@pytest.mark.slow
def test_reproduce_interrupted_on_worker_resumes_from_last_epoch(
    ray_local, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the 8x8 digits
    run = [*REPRO, "--rows", "straight_through", "--executor", "ray"]
    run[run.index("--epochs") + 1] = "3"
    real = reproduce._save_epoch
    saved: list[int] = []

    def save_then_die(folder, files):  # the driver dies right after the 2nd epoch's checkpoint
        real(folder, files)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "_save_epoch", save_then_die)
    out = tmp_path / "r"
    assert main([*run, "--out", str(out)]) == 130
    folder = out / "runs" / "straight_through"
    assert not (folder / "seed0.json").exists()
    ckpt = torch.load(folder / "seed0.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2
    partial = pd.read_csv(folder / "seed0.csv")
    assert list(partial["epoch"]) == [1, 2]

    monkeypatch.setattr(reproduce, "_save_epoch", real)
    assert main([*run, "--out", str(out)]) == 0
    assert main([*run[: run.index("--executor")], "--out", str(tmp_path / "l")]) == 0
    x, y = (pd.read_json(d / "runs" / "straight_through" / "seed0.json", typ="series")
            for d in (tmp_path / "l", out))  # fmt: skip
    drop = ["seconds", "history", "environment"]
    assert x.drop(drop).to_dict() == y.drop(drop).to_dict()
    ex, ey = (pd.read_csv(d / "epochs.csv") for d in (tmp_path / "l", out))
    cols = [c for c in ex.columns if c != "seconds"]
    pd.testing.assert_frame_equal(ex[cols], ey[cols], check_exact=True)
    # epochs 1 and 2 were not trained again: their lines, times included, are those saved
    first = ey[ey["epoch"] <= 2].drop(columns=["row", "seed"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        first, pd.DataFrame(ckpt["history"])[first.columns], check_exact=True
    )


@pytest.mark.slow
def test_cuda_is_checked_on_the_workers(ray_local, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this test wants a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    args = [*REPRO, "--rows", "straight_through", "--out", str(tmp_path / "o")]
    args += ["--executor", "ray", "--device", "cuda", "--gpus-per-cell", "1"]
    assert main(args) == 1  # not refused here: the worker says why
    err = capsys.readouterr().err
    assert "1 of 1 cells failed" in err
    assert "CUDA is not available on the Ray worker" in err
    assert "reproduce paper: " in err  # the run started on the driver
