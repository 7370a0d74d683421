"""Results directories: atomic cells, plan order, resume, incompatible runs refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stochgrad.analysis.results import IncompatibleResults, ResultsDir, read_summary


def _cell(i: int) -> pd.DataFrame:
    return pd.DataFrame({"model": ["toy"], "estimator": [f"e{i}"], "variance": [0.1 * i]})


def _snapshot(path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


def test_append_is_o1_and_rebuild_orders_by_plan(tmp_path):
    out = tmp_path / "r"
    rd = ResultsDir(out, "compare", {"seed": 0, "estimators": ["e0", "e1", "e2"]}).open()
    plan = ["k0", "k1", "k2"]
    rd.append("k2", _cell(2))
    cells = sorted(p.name for p in (out / "cells").iterdir())
    rd.append("k0", _cell(0), _cell(0))
    # Appending writes the cell's own files and nothing else: no combined table yet.
    assert not (out / "summary.csv").exists() and not (out / "per_coordinate.csv").exists()
    assert len(sorted(p.name for p in (out / "cells").iterdir())) == len(cells) + 2
    assert rd.done() == {"k0", "k2"}
    assert list(rd.rebuild(plan)["estimator"]) == ["e0", "e2"]
    assert list(read_summary(out)["estimator"]) == ["e0", "e2"]
    rd.append("k1", _cell(1))
    assert list(read_summary(out)["estimator"]) == ["e0", "e2"]  # rebuilt only on request
    rd.rebuild(plan)
    rd.finish(skipped=[])
    assert list(read_summary(out)["estimator"]) == ["e0", "e1", "e2"]
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "compare" and run["status"] == "finished"
    assert run["config"]["seed"] == 0
    env = run["environment"]
    for key in ("python", "torch", "pyro-ppl", "stochgrad", "git_revision"):
        assert key in env
    assert (out / "per_coordinate.csv").is_file()
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_reopen_same_config_resumes_and_records_history(tmp_path):
    out = tmp_path / "r"
    cfg = {"seed": 1, "draws": 100, "estimators": ["a"]}
    ResultsDir(out, "compare", cfg).open().append("k", _cell(0))
    rd = ResultsDir(out, "compare", {**cfg, "estimators": ["a", "b"]}).open()
    assert rd.done() == {"k"}
    run = json.loads((out / "run.json").read_text())
    assert len(run["history"]) == 2
    assert run["config"]["estimators"] == ["a", "b"]  # the estimator list may grow


@pytest.mark.parametrize(
    "kind, change",
    [("compare", {"seed": 2}), ("compare", {"models": ["toy:target=0.3"]}), ("sweep", {})],
)
def test_incompatible_directory_refused_untouched(tmp_path, kind, change):
    out = tmp_path / "r"
    cfg = {"seed": 1, "models": ["toy:target=0.45"], "estimators": ["a"]}
    rd = ResultsDir(out, "compare", cfg).open()
    rd.append("k", _cell(0), _cell(0))
    rd.finish()
    before = _snapshot(out)
    with pytest.raises(IncompatibleResults, match="nothing was overwritten") as info:
        ResultsDir(out, kind, {**cfg, **change}).open()
    for k in change:
        assert k in str(info.value)
    assert _snapshot(out) == before


def test_foreign_nonempty_directory_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(IncompatibleResults, match="not a stochgrad results directory"):
        ResultsDir(tmp_path, "compare", {"seed": 0}).open()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_empty_existing_directory_accepted(tmp_path):
    ResultsDir(tmp_path, "compare", {"seed": 0}).open()
    assert (tmp_path / "run.json").is_file()


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no run.json"):
        ResultsDir.read_run(tmp_path)
    with pytest.raises(ValueError, match="no summary.csv"):
        read_summary(tmp_path)


def test_written_files_follow_the_umask(tmp_path):
    import os

    from stochgrad.analysis.results import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_damaged_cell_file_is_named(tmp_path):
    import pytest

    from stochgrad.analysis.results import ResultsDir

    r = ResultsDir(tmp_path / "run", "compare", {"seed": 0}).open({})
    bad = tmp_path / "run" / "cells" / "0123.summary.csv"
    bad.write_text("garbage,here\n1,2\n")
    with pytest.raises(ValueError, match="0123.summary.csv"):
        r.done()
    with pytest.raises(ValueError, match="0123.summary.csv"):
        r.rebuild()
