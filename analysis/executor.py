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
Ctrl-C cancels the outstanding tasks (their worker processes are stopped) and shuts down a local
Ray instance started for the run.

A cell whose function is a generator streams: every :class:`Partial` it yields reaches the
driver as soon as it is made (``Cell.on_partial``), before the cell ends; the last other value
it yields is its outcome. ``reproduce paper`` sends each epoch's checkpoint this way.

Ray is an optional dependency (``pip install "stochgrad[ray]"``), imported only here and only
when a :class:`RayExecutor` is made.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "INSTALL_HINT",
    "Cell",
    "CellsFailed",
    "CellCounts",
    "LocalExecutor",
    "Partial",
    "RayExecutor",
    "add_arguments",
    "from_args",
]

#: Errors a cell may raise that mean "this estimator does not apply here": recorded as skipped.
SKIPPABLE = (ValueError, TypeError)

INSTALL_HINT = (
    "--executor ray needs Ray, which is not installed in this environment; install the extra "
    'with: pip install "stochgrad[ray]" (from a checkout: pip install ".[ray]")'
)


@dataclass
class Cell:
    """One unit of work: ``fn(*args, **kwargs)``, picklable for Ray.

    ``label`` is shown by progress bars; ``progress_arg`` names a keyword of ``fn`` that takes
    a per-unit progress callback (passed only when the cell runs in this process).
    When ``fn`` is a generator function, the cell streams: each :class:`Partial` it yields is
    handed to ``on_partial`` in the driver as it arrives; the last value it yields that is not
    a :class:`Partial` is the cell's outcome.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    progress_arg: str | None = None
    on_partial: Callable[[Any], None] | None = None

    @property
    def streams(self) -> bool:
        return inspect.isgeneratorfunction(self.fn)


class Partial(NamedTuple):
    """A value a streaming cell sends to the driver before it ends (see :class:`Cell`)."""

    value: Any


class NoOutcome(RuntimeError):
    """A streaming cell ended without yielding its outcome."""


def _drain(cell: Cell, values: Iterable[Any]) -> Any:
    """Hand a streaming cell's partial values to ``on_partial``; return its outcome."""
    outcome: Any = NoOutcome(f"cell {cell.key} yielded no outcome")
    for v in values:
        if isinstance(v, Partial):
            if cell.on_partial is not None:
                cell.on_partial(v.value)
        else:
            outcome = v
    if isinstance(outcome, NoOutcome):
        raise outcome
    return outcome


@dataclass
class CellCounts:
    """What the bar over cells shows: how many are queued, running, finished and failed.

    Ray does not tell the driver when a task starts, so *running* is the number of submitted,
    unfinished cells the cluster has room for (``slots``, from its resources and the
    per-cell request) and *queued* the rest.
    """

    total: int
    slots: int
    finished: int = 0
    failed: int = 0

    @property
    def open(self) -> int:
        return self.total - self.finished - self.failed

    @property
    def running(self) -> int:
        return min(self.open, self.slots)

    @property
    def queued(self) -> int:
        return self.open - self.running

    def text(self) -> str:
        return (
            f"finished={self.finished} running={self.running} queued={self.queued} "
            f"failed={self.failed}"
        )


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
                if cell.streams:
                    outcome = _drain(cell, outcome)
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
        """Connect (or start a local instance); True when this call started Ray.

        Without an address a *new* local instance is started (``address="local"``), never one
        left behind by an earlier driver that was killed.
        """
        ray = self._ray
        if ray.is_initialized():
            return False
        if self.address is None:
            ray.init(
                address="local", num_cpus=self.num_cpus, include_dashboard=False,
                log_to_driver=True,
            )  # fmt: skip
        else:
            ray.init(address=self.address, log_to_driver=True)
        return True

    def _slots(self, local: bool) -> int:
        """Cells the cluster can run at once (for the bar's running / queued split).

        Raises ``ValueError`` when a local instance started for the run lacks the resources of
        one cell (its tasks would wait forever); on a cluster, only warns (nodes may join).
        """
        res = self._ray.cluster_resources()
        slots = math.inf
        for name, per_cell in (("CPU", self.cpus_per_cell), ("GPU", self.gpus_per_cell)):
            if per_cell > 0:
                have = res.get(name, 0.0)
                if have < per_cell:
                    why = (
                        f"each cell asks for {per_cell:g} {name}(s) but the Ray "
                        f"{'instance started here' if local else 'cluster'} has {have:g}"
                    )
                    if local:
                        raise ValueError(
                            f"{why}; lower --{name.lower()}s-per-cell or give --address of a "
                            "cluster that has them"
                        )
                    self.echo(f"warning: {why}; the cells wait until such a node joins")
                slots = min(slots, have / per_cell)
        return max(1, int(slots)) if math.isfinite(slots) else 1

    def run(self, cells: Iterable[Cell], bar: Any = None) -> Iterator[tuple[Cell, Any]]:
        """Submit every cell, then yield ``(cell, result or skippable error)`` as they finish.

        ``bar`` (the caller's in-process bar) is not used: this executor shows its own bar
        over cells. Raises :class:`CellsFailed` after the last cell when any failed. When
        interrupted (Ctrl-C, or the caller stops reading), the outstanding tasks are cancelled
        with their worker processes stopped, and the interruption propagates.
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

        pending: dict[Any, Cell] = {}  # ObjectRef, or ObjectRefGenerator of a streaming cell
        failures: list[tuple[str, str]] = []
        try:
            slots = self._slots(local=started and self.address is None)
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
                    **({"num_returns": "streaming"} if cell.streams else {}),
                )
                args = [put(a) for a in cell.args]
                kwargs = {k: put(v) for k, v in cell.kwargs.items()}
                pending[task.remote(*args, **kwargs)] = cell
            counts = CellCounts(total=len(pending), slots=slots)
            disable = None if self.progress is None else not self.progress
            with tqdm(total=counts.total, desc="cells", unit="cell", disable=disable) as cbar:

                def done(cell: Cell, failed: str | None = None) -> None:
                    if failed is None:
                        counts.finished += 1
                    else:
                        counts.failed += 1
                        failures.append((cell.key, failed))
                        self.echo(f"cell failed: {cell.key}: {failed}")
                    cbar.update(1)
                    cbar.set_postfix_str(counts.text(), refresh=True)

                cbar.set_postfix_str(counts.text(), refresh=True)
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for waitable in ready:
                        cell = pending[waitable]
                        outcome: Any
                        try:
                            if cell.streams:
                                ref = next(waitable, None)
                                if ref is None:
                                    raise NoOutcome(f"cell {cell.key} yielded no outcome")
                                outcome = ray.get(ref)
                                if isinstance(outcome, Partial):
                                    if cell.on_partial is not None:
                                        cell.on_partial(outcome.value)
                                    continue  # the cell goes on
                            else:
                                outcome = ray.get(waitable)
                        except ray.exceptions.RayTaskError as e:
                            pending.pop(waitable)
                            cause = getattr(e, "cause", None)
                            if isinstance(cause, SKIPPABLE):
                                outcome = cause
                            else:
                                why = f"{type(cause or e).__name__}: {_first_line(str(cause or e))}"
                                done(cell, why)
                                continue
                        except (ray.exceptions.RayError, NoOutcome) as e:
                            # the worker died max_retries + 1 times, or no outcome came
                            pending.pop(waitable)
                            done(cell, f"{type(e).__name__}: {_first_line(str(e))}")
                            continue
                        pending.pop(waitable)
                        done(cell)
                        yield cell, outcome
        except BaseException:  # Ctrl-C, or the driver stopped reading: cancel what is left
            self._cancel(list(pending))
            raise
        finally:
            shared.clear()
            if started:
                ray.shutdown()
        if failures:
            raise CellsFailed(failures, counts.total)

    def _cancel(self, waitables: list[Any]) -> None:
        """Cancel outstanding tasks, stopping the worker processes that run them."""
        ray = self._ray
        for w in waitables:
            try:
                ray.cancel(w, force=True)
            except Exception:  # already finished, or the cluster is gone: nothing runs it
                pass
        if waitables:
            self.echo(f"cancelled {len(waitables)} outstanding cell(s)")


# ---------------------------------------------------------------------------------------------
# Reproduce: a (row, seed) run trained on a worker, its files sent back to the driver
# ---------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Refuse, on the machine that runs the cell, a CUDA device it does not have."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        import socket

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"--device {device}: CUDA is not available on the Ray worker on "
            f"{socket.gethostname()} (torch {torch.__version__}, torch.cuda.is_available() is "
            f"False, CUDA_VISIBLE_DEVICES={visible!r}); run on nodes with GPUs or use --device cpu"
        )


def train_run_remote(
    data: Any,
    row: str,
    seed: int,
    config: Any,
    device: str,
    key: dict[str, Any],
    files: dict[str, bytes] | None = None,
) -> Iterator[Any]:
    """``reproduce._train_one`` in a scratch folder of the worker, streaming its checkpoints.

    ``files`` (name -> bytes) are put into that folder first: a checkpoint already in the
    results directory, which the run goes on from. After every epoch, as soon as its checkpoint
    is written, yields a :class:`Partial` with the checkpoint, its key file and the CSV log so
    far (name -> bytes), for the driver to write into the results directory: a run whose driver
    dies goes on from its last finished epoch when the command is run again. Finally yields the
    run's record and every file it wrote (``seedS.csv``, ``seedS.pt``, ``seedS.ckpt``, ...).
    """
    import queue
    import threading

    from . import reproduce

    check_device(device)
    names = (f"seed{seed}.ckpt.json", f"seed{seed}.ckpt", f"seed{seed}.csv")
    with tempfile.TemporaryDirectory(prefix="stochgrad-run-") as tmp:
        folder = Path(tmp)
        for name, blob in (files or {}).items():
            (folder / Path(name).name).write_bytes(blob)
        # Training runs in a thread so that this generator can yield while it goes on.
        news: queue.Queue[tuple[str, Any]] = queue.Queue()

        def on_checkpoint(epoch: int) -> None:  # in the training thread, before the next epoch
            saved = {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}
            news.put(("epoch", saved))

        def train() -> None:
            try:
                record = reproduce._train_one(
                    data, row, seed, config, device, folder, key, on_checkpoint=on_checkpoint
                )
                news.put(("record", record))
            except BaseException as e:  # re-raised in the task below
                news.put(("error", e))

        worker = threading.Thread(target=train, name=f"train {row} seed {seed}", daemon=True)
        worker.start()
        while True:
            kind, value = news.get()
            if kind == "epoch":
                yield Partial(value)
                continue
            worker.join()
            if kind == "error":
                raise value
            record = value
            break
        written = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    yield record, written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--executor``, ``--address``, ``--cpus-per-cell``, ``--gpus-per-cell`` and
    ``--max-retries`` to ``p``."""
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
