"""Resume: a sweep killed part-way (SIGKILL, in a subprocess) and re-run loses nothing.

The final tables equal those of an uninterrupted run with the same seed, apart from the
timing columns (wall-clock measurements).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from stochgrad.analysis.compare import run_sweep
from stochgrad.analysis.results import IncompatibleResults

TIMING = ["seconds_per_draw", "work_variance_seconds"]
SWEEP = dict(
    model="toy:dim=5,target=0.45",
    param="logits",
    grid="-1:1:3",
    estimators=["score_function:baseline=moving_average", "straight_through"],
    num_draws=3000,
    seed=7,
    progress=False,
)


def _killed_run(out, after_cells: int) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from stochgrad.analysis.compare import run_sweep
        done = []
        def hook(key):
            done.append(key)
            if len(done) == {after_cells}:
                os.kill(os.getpid(), signal.SIGKILL)
        run_sweep(out={str(out)!r}, cell_hook=hook, **{SWEEP!r})
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_killed_sweep_resumes_to_the_same_table(tmp_path):
    out = tmp_path / "interrupted"
    proc = _killed_run(out, after_cells=2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Two cells survived the kill, in their own files (the combined table is built at the end).
    assert len(list((out / "cells").glob("*.summary.csv"))) == 2
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    computed = []
    resumed = run_sweep(out=out, cell_hook=computed.append, **SWEEP)
    assert len(computed) == 4  # only the missing cells were computed
    fresh = run_sweep(out=tmp_path / "fresh", **SWEEP)

    a = pd.read_csv(out / "summary.csv").drop(columns=TIMING)
    b = pd.read_csv(tmp_path / "fresh" / "summary.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b)
    assert len(resumed) == len(fresh) == 6
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "per_coordinate.csv"),
        pd.read_csv(tmp_path / "fresh" / "per_coordinate.csv"),
    )
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and len(run["history"]) == 2


def test_rerun_of_finished_sweep_computes_nothing_and_other_seed_is_refused(tmp_path):
    small = {**SWEEP, "num_draws": 500, "grid": "0,1"}
    run_sweep(out=tmp_path, **small)
    computed = []
    run_sweep(out=tmp_path, cell_hook=computed.append, **small)
    assert computed == []
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    with pytest.raises(IncompatibleResults, match="seed"):
        run_sweep(out=tmp_path, **{**small, "seed": 8})
    with pytest.raises(IncompatibleResults, match="grid"):
        run_sweep(out=tmp_path, **{**small, "grid": "0,2"})
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before
