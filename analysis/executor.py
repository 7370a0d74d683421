"""Where the cells of a run are computed: in this process, or as tasks on a Ray cluster.

A run (``compare``, ``sweep``, ``train``, ``reproduce paper``) is a list of independent
*cells*, each seeded from its own key. The run builds a :class:`Cell` per unfinished cell
(a picklable function and its arguments) and hands them to an executor:

* :class:`LocalExecutor` calls them one after the other in this process (the default);
* :class:`RayExecutor` submits each as a Ray task with a resource request (``num_cpus``,
  ``num_gpus``, fractional allowed) and ``max_retries`` (a task whose worker dies is run
  again), on the cluster at ``address`` / ``RAY_ADDRESS`` or on a local Ray instance started
  for the run.

Either way :meth:`run` yields ``(cell, outcome)`` in the driver as cells finish, and the driver
alone writes the results directory (atomic and resumable, :mod:`stochgrad.analysis.results`):
workers never touch it, so they need no shared filesystem. An outcome is the cell function's
return value, or the ``ValueError``/``TypeError`` it raised (an estimator refusing a model:
the run records it as skipped, as it always has). Any other error of a Ray cell is reported
when it happens, the other cells go on, and :class:`CellsFailed` is raised at the end; the
finished cells are already written, so rerunning the same command computes only the rest.
Ctrl-C cancels the outstanding tasks.

Ray is an optional dependency (``pip install "stochgrad[ray]"``), imported only here and only
when a :class:`RayExecutor` is made.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "INSTALL_HINT",
    "Cell",
    "CellsFailed",
    "LocalExecutor",
    "RayExecutor",
    "add_arguments",
    "from_args",
]

#: Errors a cell may raise that mean "this estimator does not apply here": recorded as skipped.
SKIPPABLE = (ValueError, TypeError)

INSTALL_HINT = (
    "--executor ray needs Ray, which is not installed in this environment; install the extra "
    "with: pip install \"stochgrad[ray]\" (from a checkout: pip install \".[ray]\")"
)


@dataclass
class Cell:
    """One unit of work: ``fn(*args, **kwargs)``, picklable for Ray.

    ``label`` is shown by progress bars; ``progress_arg`` names a keyword of ``fn`` that takes
    a per-unit progress callback (passed only when the cell runs in this process).
    """

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    progress_arg: str | None = None


class CellsFailed(RuntimeError):
    """Some cells failed for a reason other than refusing their model; the rest are saved."""

    def __init__(self, failures: list[tuple[str, str]], total: int) -> None:
        self.failures = failures
        shown = "; ".join(f"{key}: {why}" for key, why in failures[:3])
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        super().__init__(
            f"{len(failures)} of {total} cells failed ({shown}{more}); the finished cells are "
            "saved: fix the cause and rerun the same command to compute only the missing ones"
        )


class LocalExecutor:
    """Every cell in this process, in order (today's behaviour; errors other than
    ``ValueError``/``TypeError`` propagate at once)."""

    in_process = True

    def run(self, cells: Iterable[Cell], bar: Any = None) -> Iterator[tuple[Cell, Any]]:
        """Yield ``(cell, result or skippable error)``; ``bar`` (tqdm) gets the cell's label
        and, through ``cell.progress_arg``, its per-unit progress."""
        for cell in cells:
            kwargs = dict(cell.kwargs)
            if bar is not None:
                bar.set_postfix_str(cell.label, refresh=False)
                if cell.progress_arg:
                    kwargs[cell.progress_arg] = bar.update
            try:
                outcome = cell.fn(*cell.args, **kwargs)
            except SKIPPABLE as e:
                outcome = e
            yield cell, outcome


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


class RayExecutor:
    """Each cell as a Ray task; results come back to the driver as they finish.

    Args:
        address: a running cluster (``HOST:PORT`` of its head, or ``"auto"``); default
            ``RAY_ADDRESS``, else a local Ray instance is started for the run and stopped after.
        cpus_per_cell, gpus_per_cell: the resource request of each task (fractions allowed).
        max_retries: how often a cell whose worker process died is run again.
        progress: a bar over cells (finished / running / queued / failed); ``None``: on a
            terminal only.
        num_cpus: CPUs of the local instance (ignored when connecting to a cluster).
        echo: where failures are reported as they happen (default: standard error).

    Raises ``ValueError`` with :data:`INSTALL_HINT` when Ray is not installed.
    """

    in_process = False

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float = 0.0,
        max_retries: int = 3,
        progress: bool | None = None,
        num_cpus: int | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        for name, v in (("cpus_per_cell", cpus_per_cell), ("gpus_per_cell", gpus_per_cell)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if cpus_per_cell == 0 and gpus_per_cell == 0:
            raise ValueError("cpus_per_cell and gpus_per_cell are both 0; request some resource")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self._ray = ray
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_cell = float(cpus_per_cell)
        self.gpus_per_cell = float(gpus_per_cell)
        self.max_retries = max_retries
        self.progress = progress
        self.num_cpus = num_cpus
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr))

    def _connect(self) -> bool:
        """Connect (or start a local instance); True when this call started Ray."""
        ray = self._ray
        if ray.is_initialized():
            return False
        if self.address is None:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=self.address, log_to_driver=True)
        return True

    def _slots(self) -> int:
        """Cells the cluster can run at once (for the bar's running / queued split)."""
        res = self._ray.cluster_resources()
        slots = math.inf
        if self.cpus_per_cell > 0:
            slots = min(slots, res.get("CPU", 0.0) / self.cpus_per_cell)
        if self.gpus_per_cell > 0:
            slots = min(slots, res.get("GPU", 0.0) / self.gpus_per_cell)
        return max(1, int(slots)) if math.isfinite(slots) else 1

    def run(self, cells: Iterable[Cell], bar: Any = None) -> Iterator[tuple[Cell, Any]]:
        """Submit every cell, then yield ``(cell, result or skippable error)`` as they finish.

        ``bar`` (the caller's in-process bar) is not used: this executor shows its own bar
        over cells. Raises :class:`CellsFailed` after the last cell when any failed.
        """
        from tqdm.auto import tqdm

        ray = self._ray
        started = self._connect()
        remote_fns: dict[Any, Any] = {}
        shared: dict[int, tuple[Any, Any]] = {}  # id -> (object kept alive, its ObjectRef)

        def put(value: Any) -> Any:
            # Large arguments shared by many cells (data, objectives, references) travel once.
            if value is None or isinstance(value, (str, int, float, bool)):
                return value
            hit = shared.get(id(value))
            if hit is None:
                hit = shared[id(value)] = (value, ray.put(value))
            return hit[1]

        pending: dict[Any, Cell] = {}
        failures: list[tuple[str, str]] = []
        try:
            for cell in cells:
                fn = remote_fns.get(cell.fn)
                if fn is None:
                    fn = remote_fns[cell.fn] = ray.remote(cell.fn)
                task = fn.options(
                    num_cpus=self.cpus_per_cell,
                    num_gpus=self.gpus_per_cell,
                    max_retries=self.max_retries,
                    retry_exceptions=False,
                    name=cell.label or cell.key,
                )
                args = [put(a) for a in cell.args]
                kwargs = {k: put(v) for k, v in cell.kwargs.items()}
                pending[task.remote(*args, **kwargs)] = cell
            total = len(pending)
            slots = self._slots()
            disable = None if self.progress is None else not self.progress
            with tqdm(total=total, desc="cells", unit="cell", disable=disable) as cbar:

                def status() -> None:
                    running = min(len(pending), slots)
                    cbar.set_postfix_str(
                        f"finished={cbar.n - len(failures)} running={running} "
                        f"queued={len(pending) - running} failed={len(failures)}",
                        refresh=True,
                    )

                status()
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        cell = pending.pop(ref)
                        outcome: Any
                        try:
                            outcome = ray.get(ref)
                        except ray.exceptions.RayTaskError as e:
                            cause = getattr(e, "cause", None)
                            if isinstance(cause, SKIPPABLE):
                                outcome = cause
                            else:
                                why = f"{type(cause or e).__name__}: {_first_line(str(cause or e))}"
                                failures.append((cell.key, why))
                                self.echo(f"cell failed: {cell.key}: {why}")
                                cbar.update(1)
                                status()
                                continue
                        except ray.exceptions.RayError as e:  # worker died max_retries + 1 times
                            why = f"{type(e).__name__}: {_first_line(str(e))}"
                            failures.append((cell.key, why))
                            self.echo(f"cell failed: {cell.key}: {why}")
                            cbar.update(1)
                            status()
                            continue
                        cbar.update(1)
                        status()
                        yield cell, outcome
        except BaseException:  # Ctrl-C, or the driver stopped reading: cancel what is left
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                self.echo(f"cancelled {len(pending)} outstanding cell(s)")
            raise
        finally:
            shared.clear()
            if started:
                ray.shutdown()
        if failures:
            raise CellsFailed(failures, total)


# ---------------------------------------------------------------------------------------------
# Reproduce: a (row, seed) run trained on a worker, its files sent back to the driver
# ---------------------------------------------------------------------------------------------


def train_run_remote(
    data: Any,
    row: str,
    seed: int,
    config: Any,
    device: str,
    key: dict[str, Any],
    files: dict[str, bytes] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``reproduce._train_one`` in a scratch folder of the worker.

    ``files`` (name -> bytes) are put into that folder first: a checkpoint already in the
    results directory, which the run goes on from. Returns the run's record and the files it wrote
    (``seedS.csv``, ``seedS.pt``, ``seedS.ckpt``, ...) as bytes, for the driver to write into
    the results directory.
    """
    from . import reproduce

    with tempfile.TemporaryDirectory(prefix="stochgrad-run-") as tmp:
        folder = Path(tmp)
        for name, blob in (files or {}).items():
            (folder / Path(name).name).write_bytes(blob)
        record = reproduce._train_one(data, row, seed, config, device, folder, key)
        written = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return record, written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address``, ``--cpus-per-cell``, ``--gpus-per-cell``, ``--max-retries``.
    """
    g = p.add_argument_group("where the cells run")
    g.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: in this process; ray: each cell a Ray task (needs the ray extra)",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run on (HOST:PORT or auto); default RAY_ADDRESS, else a local "
        "Ray instance started for the run",
    )
    g.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray: CPUs per cell task")
    g.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray: GPUs per cell task")
    g.add_argument(
        "--max-retries", type=int, default=3, help="Ray: reruns of a cell whose worker died"
    )


def from_args(args: argparse.Namespace) -> LocalExecutor | RayExecutor:
    """The executor the command line asked for (``ValueError`` with the fix when it cannot)."""
    if getattr(args, "executor", "local") != "ray":
        if getattr(args, "address", None):
            raise ValueError("--address is for --executor ray; add --executor ray")
        return LocalExecutor()
    if str(getattr(args, "device", "cpu")).startswith("cuda") and not args.gpus_per_cell:
        raise ValueError(
            "--device cuda with --executor ray needs a GPU per task: add e.g. --gpus-per-cell 1 "
            "(or 0.5 to put two cells on one GPU)"
        )
    progress = False if getattr(args, "no_progress", False) else None
    return RayExecutor(
        args.address,
        cpus_per_cell=args.cpus_per_cell,
        gpus_per_cell=args.gpus_per_cell,
        max_retries=args.max_retries,
        progress=progress,
    )
