"""Results directories: append-only, atomic, resumable.

Layout of a results directory ``DIR``::

    DIR/run.json             kind, configuration, environment (versions, git revision, device),
                             status, history of invocations, skipped cells
    DIR/summary.csv          one row per (model, estimator, param[, swept value]); SPEC columns
    DIR/per_coordinate.csv   per-coordinate mean, bias, standard error, z, variance, reference
    DIR/cells/               one pair of CSV files per finished cell (the source of truth)
    DIR/figures/             PNG and PDF figures

A *cell* is the unit of work (one estimator on one model, at one grid point for sweeps). When a
cell finishes, its rows are written to ``cells/`` (temporary file, then ``os.replace``: a file
is either absent or complete), after which ``summary.csv`` and ``per_coordinate.csv`` are
rebuilt from the cells, again atomically. An interrupted run re-run with the same directory
and configuration finds its finished cells there and computes only the rest; the tables come
out in plan order, identical to an uninterrupted run's (timing columns aside).

A directory whose ``run.json`` records a different kind of run or a different configuration
(models, seed, draws, grid, ...) is refused with :class:`IncompatibleResults` before anything
is written. The estimator list may grow between runs: new estimators are new cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "IncompatibleResults",
    "ResultsDir",
    "environment",
    "atomic_write_text",
    "atomic_write_csv",
]

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.csv"
COORDS_FILE = "per_coordinate.csv"
CELLS_DIR = "cells"
FIGURES_DIR = "figures"
CELL_COLUMN = "cell"


class IncompatibleResults(ValueError):
    """The results directory holds a different run; nothing was written to it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, then replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    """``frame.to_csv`` (no index, full float precision) written atomically.

    A file that already holds exactly this text is left alone (its time stamp too).
    """
    text = frame.to_csv(index=False, float_format="%.17g")
    path = Path(path)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or not rev:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return rev + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions of Python and the libraries, platform, device name and git revision."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "stochgrad": version("stochgrad"),
        "torch": version("torch"),
        "pyro-ppl": version("pyro-ppl"),
        "numpy": version("numpy"),
        "pandas": version("pandas"),
        "scipy": version("scipy"),
        "git_revision": _git_revision(),
        "argv": list(sys.argv),
    }
    if device is not None:
        env["device"] = device
        if str(device).startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        else:
            env["device_name"] = platform.processor() or platform.machine()
    return env


def _jsonable(obj: Any) -> Any:
    """Configuration values normalised as JSON would store them (tuples -> lists)."""
    return json.loads(json.dumps(obj, default=str))


def _read_cell(f: Path, usecols: list[str] | None = None) -> pd.DataFrame:
    """One cell file; a damaged one is named in the error with the way out."""
    try:
        frame = pd.read_csv(
            f, usecols=usecols, keep_default_na=False, na_values=["", "nan", "NaN"]
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(
            f"damaged cell file {f} ({str(e).splitlines()[0]}); delete it and re-run the same "
            "command to recompute that cell"
        ) from e
    if CELL_COLUMN not in frame.columns:
        raise ValueError(
            f"damaged cell file {f} (no {CELL_COLUMN!r} column); delete it and re-run the same "
            "command to recompute that cell"
        )
    return frame


class ResultsDir:
    """One results directory for a run of ``kind`` with a fixed ``config``.

    Args:
        path: the directory (created when missing).
        kind: ``"compare"``, ``"sweep"`` or ``"train"``.
        config: everything that determines the numbers (models, seed, draws, grid, device, ...);
            a directory with a different config is refused.
        ignore: config keys that may differ between runs sharing a directory (by default the
            estimator list, so that a rerun can add estimators).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: str,
        config: Mapping[str, Any],
        *,
        ignore: Iterable[str] = ("estimators",),
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.config = _jsonable(dict(config))
        self.ignore = set(ignore)
        self._run: dict[str, Any] | None = None
        self._started = time.time()

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def read_run(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The parsed ``run.json`` of a results directory (ValueError when there is none)."""
        f = Path(path) / RUN_FILE
        if not f.is_file():
            raise ValueError(
                f"{path} is not a stochgrad results directory (no {RUN_FILE}); expected the "
                "--out directory of `stochgrad compare`, `sweep` or `train`"
            )
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e}); the directory is damaged") from e

    def check(self) -> None:
        """Refuse a directory holding another kind of run or another configuration.

        Writes nothing. Raises :class:`IncompatibleResults` with the differing keys.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise IncompatibleResults(f"{self.path} exists and is not a directory")
        run_file = self.path / RUN_FILE
        if not run_file.is_file():
            if any(self.path.iterdir()):
                raise IncompatibleResults(
                    f"{self.path} exists, is not empty and is not a stochgrad results directory "
                    f"(no {RUN_FILE}); choose another --out or empty it"
                )
            return
        old = self.read_run(self.path)
        if old.get("kind") != self.kind:
            raise IncompatibleResults(
                f"{self.path} holds the results of a `{old.get('kind')}` run, this is a "
                f"`{self.kind}` run; choose another --out (nothing was overwritten)"
            )
        old_cfg = old.get("config", {})
        keys = (set(old_cfg) | set(self.config)) - self.ignore
        diff = sorted(k for k in keys if old_cfg.get(k) != self.config.get(k))
        if diff:
            lines = "; ".join(
                f"{k}: directory has {old_cfg.get(k)!r}, this run has {self.config.get(k)!r}"
                for k in diff
            )
            raise IncompatibleResults(
                f"{self.path} holds an incompatible {self.kind} run ({lines}). Use another --out "
                "or rerun with the directory's settings to resume it (nothing was overwritten)."
            )

    # -- writing --------------------------------------------------------------------------------

    def open(self, environment_info: Mapping[str, Any] | None = None) -> ResultsDir:
        """Check compatibility, create the directory and record this invocation in run.json."""
        self.check()
        (self.path / CELLS_DIR).mkdir(parents=True, exist_ok=True)
        run_file = self.path / RUN_FILE
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if run_file.is_file():
            run = self.read_run(self.path)
            # The ignored keys (e.g. the estimator list) record the union over invocations.
            for k in self.ignore:
                if k in self.config and isinstance(self.config[k], list):
                    merged = list(run["config"].get(k, []))
                    merged += [v for v in self.config[k] if v not in merged]
                    run["config"][k] = merged
        else:
            run = {"kind": self.kind, "config": self.config, "created": now, "history": []}
        run["environment"] = _jsonable(dict(environment_info or environment()))
        run["status"] = "running"
        run["history"].append({"started": now, "argv": list(sys.argv)})
        self._run = run
        self._write_run()
        return self

    def _write_run(self) -> None:
        assert self._run is not None
        atomic_write_text(self.path / RUN_FILE, json.dumps(self._run, indent=2, default=str) + "\n")

    @staticmethod
    def _cell_stem(key: str) -> str:
        return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]

    def done(self) -> set[str]:
        """Keys of the cells already finished in this directory."""
        keys: set[str] = set()
        cells = self.path / CELLS_DIR
        if not cells.is_dir():
            return keys
        for f in cells.glob("*.summary.csv"):
            frame = _read_cell(f, usecols=[CELL_COLUMN])
            keys.update(frame[CELL_COLUMN].astype(str))
        return keys

    def append(
        self,
        key: str,
        summary: pd.DataFrame,
        coords: pd.DataFrame | None = None,
    ) -> None:
        """Record one finished cell atomically, in O(1): only the cell's own files are written.

        The per-coordinate file is written first and the summary file last: a cell counts as
        finished exactly when its summary file exists. The combined tables (summary.csv,
        per_coordinate.csv) are rebuilt by :meth:`rebuild`, which a run calls once at its end;
        an interrupted run's tables are rebuilt when the same command resumes it.
        """
        stem = self._cell_stem(key)
        cells = self.path / CELLS_DIR
        if coords is not None:
            atomic_write_csv(cells / f"{stem}.coords.csv", coords.assign(**{CELL_COLUMN: key}))
        atomic_write_csv(cells / f"{stem}.summary.csv", summary.assign(**{CELL_COLUMN: key}))

    def _read_cells(self, suffix: str) -> list[pd.DataFrame]:
        files = sorted((self.path / CELLS_DIR).glob(f"*.{suffix}.csv"))
        return [_read_cell(f) for f in files]

    def rebuild(self, plan: list[str] | None = None) -> pd.DataFrame:
        """Rewrite summary.csv and per_coordinate.csv from the cells, in plan order."""
        order = {k: i for i, k in enumerate(plan or [])}

        def combine(frames: list[pd.DataFrame]) -> pd.DataFrame:
            if not frames:
                return pd.DataFrame()
            frame = pd.concat(frames, ignore_index=True)
            rank = frame[CELL_COLUMN].map(lambda k: (order.get(k, len(order)), k))
            frame = frame.iloc[sorted(range(len(frame)), key=lambda i: (rank.iloc[i], i))]
            return frame.reset_index(drop=True)

        summary = combine(self._read_cells("summary"))
        atomic_write_csv(self.path / SUMMARY_FILE, summary)
        coords = self._read_cells("coords")
        if coords:
            atomic_write_csv(self.path / COORDS_FILE, combine(coords))
        return summary

    def finish(self, **info: Any) -> None:
        """Mark the run finished and store ``info`` (wall time, skipped cells, ...)."""
        assert self._run is not None
        self._run["status"] = "finished"
        self._run["history"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._run["history"][-1]["wall_seconds"] = round(time.time() - self._started, 3)
        self._run.update(_jsonable(info))
        self._write_run()

    @property
    def figures(self) -> Path:
        return self.path / FIGURES_DIR


def read_summary(path: str | os.PathLike[str]) -> pd.DataFrame:
    """``summary.csv`` of a results directory."""
    f = Path(path) / SUMMARY_FILE
    if not f.is_file():
        raise ValueError(f"{path} has no {SUMMARY_FILE}; was the run interrupted before any cell?")
    return pd.read_csv(f)
