"""``stochgrad reproduce paper``: the conditional-computation experiment of the paper, rerun.

Trains every row of the paper's table (:data:`stochgrad.models.conditional.GATE_TYPES`) on
MNIST over several seeds with the settings of its Sec. 6 (see
:func:`stochgrad.models.conditional.train`), and writes to ``--out``::

    report.md          our train criterion / valid / test error (mean ± sd over seeds) beside
                       the paper's, test-time gate density, the choices we made where the paper
                       is silent, and the measured cost of sparse vs dense inference
    valid_curves.png   validation error per epoch, one line per row (mean ± sd over seeds)
    epochs.csv         the raw per-epoch log of every (row, seed)
    results.csv        one line per finished (row, seed)
    bench.csv          the sparse-vs-dense inference benchmark (unless --no-bench)
    runs/ROW/seedS.json, runs/ROW/seedS.csv   the finished runs (the source of truth)
    runs/ROW/seedS.ckpt                       the state after the last epoch trained

Resuming: a (row, seed) whose ``runs/ROW/seedS.json`` exists with the same settings is not
trained again. One that was interrupted goes on from its checkpoint, written after every
epoch, so a restarted command loses at most the epoch it was in and ends with the same numbers
as an uninterrupted one. Asking for more ``--epochs`` than a finished run had continues that
run from its last epoch; asking for fewer, or changing any other setting, trains afresh. Every
file is written atomically (temporary file, then rename).

The benchmark (:func:`bench_sparse_inference`, also ``scripts/bench_conditional.py``) times
the expert and output layers computed densely and from the active experts only, as the paper
proposed but never measured.

Reference: Bengio, Léonard & Courville (2013), arXiv:1308.3432, Sec. 6 and Table 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from stochgrad.analysis import executor as ex
from stochgrad.analysis.results import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    environment,
)
from stochgrad.models import conditional as cc
from stochgrad.models.data import Digits, Split, default_mnist_path, load_mnist

__all__ = [
    "BENCH_BATCHES",
    "BENCH_DENSITIES",
    "PAPER_TABLE",
    "add_parser",
    "bench_sparse_inference",
    "format_bench",
    "main",
    "run",
    "run_rows",
    "summarize",
    "write_report",
]

# The paper's Table 1 (one run each): training criterion, validation and test error in %.
PAPER_TABLE: dict[str, tuple[float, float, float]] = {
    "noisy_rectifier": (6.7e-4, 1.52, 1.87),
    "straight_through": (3.3e-3, 1.42, 1.39),
    "sts": (4.4e-3, 1.86, 1.96),
    "sbn": (9.9e-3, 1.78, 1.89),
    "baseline_rectifier": (6.3e-5, 1.66, 1.60),
    "baseline_sigmoid_noise": (1.8e-3, 1.88, 1.87),
    "baseline_sigmoid": (3.2e-3, 1.97, 1.92),
}
GATE_ESTIMATOR_ROWS = ("noisy_rectifier", "straight_through", "sts", "sbn")
BENCH_DENSITIES = (0.01, 0.05, 0.10, 0.25, 0.50, 1.00)
BENCH_BATCHES = (1, 32, 256)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reproduce`` (with its ``paper`` experiment) to a ``subparsers`` object."""
    p = subparsers.add_parser(
        "reproduce",
        help="rerun the paper's conditional-computation experiment on MNIST",
        description=(
            "Train every row of Bengio, Leonard & Courville (2013) Table 1 over several seeds "
            "and write a report beside the paper's numbers. Finished (row, seed) runs in --out "
            "are kept and skipped when the command is run again; interrupted ones go on from "
            "their last finished epoch, and so do finished ones given more --epochs."
        ),
    )
    p.add_argument("experiment", choices=["paper"], help="which experiment (only 'paper')")
    p.add_argument(
        "--data",
        default=None,
        help="MNIST: a Keras mnist.npz or a directory of IDX files (default: "
        "../shared/data/mnist.npz when present, else scikit-learn's 8x8 digits, a smoke test)",
    )
    p.add_argument(
        "--protocol",
        choices=list(cc.PROTOCOLS),
        default="original",
        help="'original': the authors' code (fixed KL weight, original initialisation, "
        "max-norm 2.1 without the softmax, selection on the sampled-gate validation cost); "
        "'spec': this project's earlier reading of the paper (default original)",
    )
    p.add_argument(
        "--epochs",
        "--max-epochs",
        dest="epochs",
        type=int,
        default=None,
        help="maximum training epochs per run (default 10; --smoke: 1)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping: stop when the selection criterion has not improved for this "
        "many epochs (default: none, train every epoch)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a smoke run: 1000 training examples, 1 epoch, seed 0, no benchmark (minutes)",
    )
    p.add_argument(
        "--seeds",
        default="3",
        help="a count N (seeds 0..N-1) or a comma list, e.g. '4,7' or '5,' (default 3)",
    )
    p.add_argument(
        "--rows",
        default="all",
        help=f"comma list of rows or 'all' ({', '.join(cc.GATE_TYPES)})",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="results/reproduce", help="output directory")
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N training examples only (smoke runs)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-bench", action="store_true", help="skip the inference benchmark")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--batch-seeds",
        action="store_true",
        help="train the seeds of each row together as one batched program (stacked weights, "
        "batched matrix products): the same numbers and files per seed as one after the "
        "other, to float rounding; rows with a stateful gate estimator (sbn) stay sequential",
    )
    ex.add_arguments(p)  # --executor local|ray: each (row, seed) run a Ray task
    p.set_defaults(func=run)
    return p


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> ``[0, 1, 2]``; ``"0,4,7"`` -> ``[0, 4, 7]``."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ValueError(f"--seeds must be a count or a comma list of ints, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(
            f"--seeds must give at least one non-negative seed, got {text!r} (a single number "
            "is a count: '3' means seeds 0, 1, 2; for one given seed write e.g. '5,')"
        )
    return seeds


def parse_rows(text: str) -> list[str]:
    if text == "all":
        return list(cc.GATE_TYPES)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in cc.GATE_TYPES]
    if unknown or not rows:
        raise ValueError(f"unknown row(s) {unknown}; valid: all, {', '.join(cc.GATE_TYPES)}")
    return rows


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stochgrad reproduce paper``; returns the exit status."""
    if args.smoke:
        args.epochs = args.epochs or 1
        args.seeds = "0,"
        args.train_subset = args.train_subset or 1000
        args.no_bench = True
    if args.epochs is None:
        args.epochs = 10
    seeds, rows = parse_seeds(args.seeds), parse_rows(args.rows)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    executor = ex.from_args(args)
    # With --executor ray the runs need CUDA on the workers, not here: checked there.
    if args.device == "cuda" and executor.in_process and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args.data, args.train_subset)
    out = Path(args.out)
    config = cc.for_protocol(
        args.protocol, epochs=args.epochs, progress=not args.no_progress, patience=args.patience
    )
    print(
        f"reproduce paper: {data.source} ({len(data.train)} train / {len(data.valid)} valid / "
        f"{len(data.test)} test), rows {rows}, seeds {seeds}, {args.epochs} epoch(s), "
        f"protocol {args.protocol}, device {args.device} -> {out}"
        + (" [SMOKE RUN: not comparable with the paper]" if args.smoke else ""),
        file=sys.stderr,
    )
    results, epochs = run_rows(
        data,
        rows,
        seeds,
        config,
        out,
        device=args.device,
        executor=executor,
        batch_seeds=getattr(args, "batch_seeds", False),
    )
    bench = None
    if not args.no_bench:
        bench = bench_sparse_inference(
            device=args.device, repeats=3, inputs=data.num_features, min_seconds=0.05
        )
        atomic_write_csv(out / "bench.csv", bench)
    command = "stochgrad reproduce paper " + " ".join(_cli_options(args))
    write_report(out, results, epochs, data, config, command, args.device, bench)
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0


def _cli_options(args: argparse.Namespace) -> list[str]:
    opts = []
    if args.data:
        opts += ["--data", str(args.data)]
    opts += ["--protocol", args.protocol, "--max-epochs", str(args.epochs)]
    if args.patience:
        opts += ["--patience", str(args.patience)]
    opts += ["--seeds", args.seeds, "--rows", args.rows]
    opts += ["--device", args.device, "--out", str(args.out)]
    if args.train_subset:
        opts += ["--train-subset", str(args.train_subset)]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    if args.smoke:
        opts += ["--smoke"]
    if getattr(args, "batch_seeds", False):
        opts += ["--batch-seeds"]
    if getattr(args, "executor", "local") != "local":
        opts += ["--executor", args.executor]
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stochgrad.analysis.reproduce paper ...`` (same options as the CLI)."""
    parser = argparse.ArgumentParser(prog="stochgrad")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reproduce", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except ex.CellsFailed as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# Training every (row, seed), resumably
# ---------------------------------------------------------------------------------------------


def load_data(path: str | None, train_subset: int | None = None) -> Digits:
    """MNIST from ``path`` (or the default location, or the 8x8 digits fallback, saying so)."""
    if path is None and default_mnist_path() is None:
        print(
            "reproduce: no --data and no ../shared/data/mnist.npz: using scikit-learn's 8x8 "
            "digits as a smoke test (not comparable with the paper's MNIST numbers)",
            file=sys.stderr,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = load_mnist(None)
    else:
        data = load_mnist(path)
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"--train-subset must be >= 1, got {train_subset}")
        data = dataclasses.replace(
            data, train=Split(data.train.x[:train_subset], data.train.y[:train_subset])
        )
    return data


def _run_key(data: Digits, config: cc.TrainConfig, row: str, seed: int) -> dict[str, Any]:
    """What a finished run must match to be reused."""
    return {
        "row": row,
        "seed": seed,
        "data": data.source,
        "data_path": data.path,
        "sizes": [len(data.train), len(data.valid), len(data.test)],
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
    }


def run_rows(
    data: Digits,
    rows: Sequence[str],
    seeds: Sequence[int],
    config: cc.TrainConfig,
    out: str | Path,
    device: str = "cpu",
    executor: Any = None,
    batch_seeds: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train each (row, seed) not already finished in ``out``; return all results and epochs.

    Returns ``(results, epochs)``: one line per (row, seed) with the selected epoch's numbers,
    and the per-epoch log. Both are also written to ``out/results.csv`` and ``out/epochs.csv``.

    ``executor``: where the runs are trained (:mod:`stochgrad.analysis.executor`); default, or
    a local one: here, one after the other. Otherwise each unfinished (row, seed) is one task;
    its record and files come back to this process, which writes them into ``out``. A run that
    fails there is reported, the others finish, and :class:`~stochgrad.analysis.executor.
    CellsFailed` is raised at the end with the finished runs written.

    ``batch_seeds``: the unfinished seeds of a row are trained together, as one batched
    program (:func:`stochgrad.models.conditional_batched.train_seeds`, the same numbers and
    files per seed); rows with a stateful gate estimator (the SBN) are still trained one seed
    after the other. Only with a local executor.
    """
    out = Path(out)
    runs = out / "runs"
    finished: dict[tuple[str, int], dict[str, Any]] = {}
    todo: list[tuple[str, int, dict[str, Any]]] = []
    in_process = executor is None or executor.in_process
    if batch_seeds and not in_process:
        raise ValueError("--batch-seeds trains in this process: use it with --executor local")
    for row in rows:
        (runs / row).mkdir(parents=True, exist_ok=True)
        batch: list[tuple[int, dict[str, Any]]] = []
        together = in_process and batch_seeds and _batchable(row, config)
        for seed in seeds:
            record_file = runs / row / f"seed{seed}.json"
            key = _run_key(data, config, row, seed)
            record = _load_record(record_file, key)
            if record is not None:
                print(f"reproduce: {row} seed {seed} already finished, skipped", file=sys.stderr)
            elif together:
                batch.append((seed, key))
                continue
            elif in_process:
                record = _train_one(data, row, seed, config, device, runs / row, key)
                atomic_write_text(record_file, json.dumps(record, indent=1))
            else:
                todo.append((row, seed, key))
                continue
            finished[row, seed] = record
        if batch:
            for (seed, _), record in zip(
                batch, _train_batch(data, row, batch, config, device, runs / row)
            ):
                atomic_write_text(runs / row / f"seed{seed}.json", json.dumps(record, indent=1))
                finished[row, seed] = record
    failed: ex.CellsFailed | None = None
    if todo:
        try:
            _run_remote(executor, data, todo, config, device, runs, finished)
        except ex.CellsFailed as e:
            failed = e
    ordered = [finished[row, seed] for row in rows for seed in seeds if (row, seed) in finished]
    results = pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in ordered])
    results = results.drop(columns=["key", "environment"], errors="ignore")
    epochs = pd.DataFrame(
        [{"row": r["row"], "seed": r["seed"], **h} for r in ordered for h in r["history"]]
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "results.csv", results)
    atomic_write_csv(out / "epochs.csv", epochs)
    if failed is not None:
        raise failed
    return results, epochs


def _run_remote(
    executor: Any,
    data: Digits,
    todo: list[tuple[str, int, dict[str, Any]]],
    config: cc.TrainConfig,
    device: str,
    runs: Path,
    finished: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """The runs of ``todo`` as cells of ``executor``; each finished one is written here."""
    quiet = dataclasses.replace(config, progress=False)  # no per-run bars from the workers
    cells = []
    for row, seed, key in todo:
        # A checkpoint in ``runs`` travels with its run, so the worker goes on from there.
        carried = {
            name: (runs / row / name).read_bytes()
            for name in (f"seed{seed}.ckpt", f"seed{seed}.ckpt.json")
            if (runs / row / name).is_file()
        }
        cells.append(
            ex.Cell(
                f"{row}/seed{seed}",
                ex.train_run_remote,
                (data, row, seed, quiet, device, key),
                {"files": carried},
                label=f"{row} seed {seed}",
                on_partial=functools.partial(_save_epoch, runs / row),
            )
        )
    failures: list[tuple[str, str]] = []
    try:
        for cell, outcome in executor.run(cells):
            if isinstance(outcome, Exception):  # a ValueError/TypeError: a failed run here
                why = f"{type(outcome).__name__}: {outcome}"
                print(f"reproduce: {cell.key} failed: {why}", file=sys.stderr)
                failures.append((cell.key, why))
                continue
            record, files = outcome
            row, seed = record["row"], record["seed"]
            for name, blob in files.items():  # the record last: it marks the run finished
                atomic_write_bytes(runs / row / name, blob)
            atomic_write_text(runs / row / f"seed{seed}.json", json.dumps(record, indent=1))
            print(
                f"reproduce: {row} seed {seed}: valid {100 * record['valid_error']:.2f}% test "
                f"{100 * record['test_error']:.2f}% density {record['test_density']:.3f} "
                f"(epoch {record['best_epoch']})",
                file=sys.stderr,
            )
            finished[row, seed] = record
    except ex.CellsFailed as e:
        failures += e.failures
    if failures:
        raise ex.CellsFailed(failures, len(cells))


def _batchable(row: str, config: cc.TrainConfig) -> bool:
    from stochgrad.models.conditional_batched import batchable

    ok = batchable(cc.original_gate(row) if config.original else cc.gate_type(row))
    if not ok:
        print(f"reproduce: {row}: stateful gate estimator, seeds one by one", file=sys.stderr)
    return ok


def _save_epoch(folder: Path, files: dict[str, bytes]) -> None:
    """Write the checkpoint (key file first) and CSV log a worker sent after an epoch, so a
    driver that dies mid-run leaves a run that the next one goes on from."""
    for name in sorted(files, key=lambda n: (not n.endswith(".ckpt.json"), n)):
        atomic_write_bytes(folder / Path(name).name, files[name])


def _load_record(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        print(f"reproduce: {path} unreadable, training again", file=sys.stderr)
        return None
    if record.get("key") != json.loads(json.dumps(key)):
        print(f"reproduce: {path} has other settings, training again", file=sys.stderr)
        return None
    return record


def _checkpoint(path: Path, key: dict[str, Any]) -> Path:
    """The per-epoch checkpoint of one (row, seed), removed if made under other settings.

    Its key is the run's without the epoch count, so a run asked for more epochs than a
    finished one goes on from the finished one's last epoch.
    """
    key = json.loads(json.dumps(key))
    key["config"].pop("epochs", None)
    key["config"].pop("patience", None)  # only decides when to stop, not the trajectory
    key_file = path.with_name(path.name + ".json")
    if path.is_file():
        try:
            same = json.loads(key_file.read_text()) == key
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            print(f"reproduce: {path} has other settings, starting afresh", file=sys.stderr)
            path.unlink()
    atomic_write_text(key_file, json.dumps(key, indent=1))
    return path


def _prepare(
    data: Digits,
    row: str,
    seed: int,
    config: cc.TrainConfig,
    device: str,
    folder: Path,
    key: dict[str, Any],
) -> tuple[cc.ConditionalNet, Path, Any]:
    """The seed's network (seeded), its checkpoint and its per-epoch log writer.

    Torch's global random state afterwards is the one its training starts from.
    """
    torch.manual_seed(seed)  # initialisation and the pre-gate noise
    gate = cc.original_gate(row) if config.original else cc.gate_type(row)
    net = cc.ConditionalNet(gate, cc.ConditionalConfig(inputs=data.num_features))
    if config.original:
        cc.init_original_(net)
    net = net.to(device)
    log_file = folder / f"seed{seed}.csv"
    checkpoint = _checkpoint(folder / f"seed{seed}.ckpt", key)
    log_file.unlink(missing_ok=True)
    if checkpoint.is_file():
        done = torch.load(checkpoint, map_location="cpu", weights_only=False)["history"]
        if len(done) > config.epochs:  # selection must only see the epochs asked for
            checkpoint.unlink()
        else:  # the log as far as the checkpoint goes
            lines = pd.DataFrame([{"row": row, "seed": seed, **h} for h in done])
            lines.to_csv(log_file, index=False)
            print(f"reproduce: {row} seed {seed} resumes after epoch {len(done)}", file=sys.stderr)

    def on_epoch(entry: dict[str, float]) -> None:  # the per-epoch CSV, appended as we go
        line = pd.DataFrame([{"row": row, "seed": seed, **entry}])
        line.to_csv(log_file, mode="a", header=not log_file.exists(), index=False)

    return net, checkpoint, on_epoch


def _train_one(
    data: Digits,
    row: str,
    seed: int,
    config: cc.TrainConfig,
    device: str,
    folder: Path,
    key: dict[str, Any],
    on_checkpoint: Any = None,
) -> dict[str, Any]:
    """Train one (row, seed) in ``folder`` (its CSV log, checkpoint and weights); its record.

    ``on_checkpoint(epoch)`` is called after each epoch's checkpoint is written.
    """
    net, checkpoint, on_epoch = _prepare(data, row, seed, config, device, folder, key)
    start = time.perf_counter()
    result = cc.train(
        net,
        data,
        dataclasses.replace(config, seed=seed),
        on_epoch,
        description=f"{row}/{seed}",
        checkpoint=checkpoint,
        on_checkpoint=on_checkpoint,
    )
    return _record(result, row, seed, config, device, folder, key, time.perf_counter() - start)


def _train_batch(
    data: Digits,
    row: str,
    todo: Sequence[tuple[int, dict[str, Any]]],
    config: cc.TrainConfig,
    device: str,
    folder: Path,
) -> list[dict[str, Any]]:
    """The seeds ``todo`` (``(seed, key)``) of one row trained together (``--batch-seeds``):
    the same numbers and files as :func:`_train_one` for each."""
    from stochgrad.models.conditional_batched import SeedRun, capture_rng, train_seeds

    runs = []
    for seed, key in todo:
        net, checkpoint, on_epoch = _prepare(data, row, seed, config, device, folder, key)
        runs.append(
            SeedRun(
                net,
                dataclasses.replace(config, seed=seed),
                capture_rng(device),
                on_epoch,
                checkpoint,
                description=f"{row}/{[s for s, _ in todo]}",
            )
        )
    print(f"reproduce: {row} seeds {[s for s, _ in todo]} trained together", file=sys.stderr)
    start = time.perf_counter()
    results = train_seeds(runs, data)
    seconds = time.perf_counter() - start
    return [
        _record(result, row, seed, config, device, folder, key, seconds)
        for result, (seed, key) in zip(results, todo)
    ]


def _record(
    result: cc.TrainResult,
    row: str,
    seed: int,
    config: cc.TrainConfig,
    device: str,
    folder: Path,
    key: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Save the selected weights; the run's record."""
    cc.save_atomic(result.state_dict, folder / f"seed{seed}.pt")
    print(
        f"reproduce: {row} seed {seed}: valid {100 * result.valid_error:.2f}% test "
        f"{100 * result.test_error:.2f}% density {result.test_density:.3f} "
        f"(epoch {result.best_epoch}, {seconds:.0f}s in this session)",
        file=sys.stderr,
    )
    return {
        "protocol": config.protocol,
        "row": row,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "stop_epoch": result.stop_epoch,
        "train_criterion": result.train_criterion,
        "valid_error": result.valid_error,
        "test_error": result.test_error,
        "valid_density": result.valid_density,
        "test_density": result.test_density,
        "threshold": result.threshold,
        "test_error_stochastic": result.test_error_stochastic,
        "test_density_stochastic": result.test_density_stochastic,
        "test_error_top_k": result.test_error_top_k,
        "seconds": sum(h["seconds"] for h in result.history),  # resumed sessions included
        "history": result.history,
        "key": key,
        "environment": environment(device),
    }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per row (errors in %), beside the paper's numbers."""
    lines = []
    for row, group in results.groupby("row", sort=False):
        paper = PAPER_TABLE.get(row, (math.nan,) * 3)
        line = {"row": row, "label": cc.GATE_TYPES[row].label, "seeds": len(group)}
        for col, scale in (
            ("train_criterion", 1.0),
            ("valid_error", 100.0),
            ("test_error", 100.0),
            ("test_density", 1.0),
            ("test_error_stochastic", 100.0),
            ("test_error_top_k", 100.0),
            ("best_epoch", 1.0),
        ):
            if col not in group:
                group = group.assign(**{col: math.nan})
            values = group[col].astype(float) * scale
            line[f"{col}_mean"] = values.mean()
            line[f"{col}_sd"] = values.std(ddof=1) if len(values) > 1 else math.nan
        line["paper_train"], line["paper_valid"], line["paper_test"] = paper
        lines.append(line)
    return pd.DataFrame(lines)


def _pm(mean: float, sd: float, fmt: str) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:{fmt}}" + ("" if math.isnan(sd) else f" ± {sd:{fmt}}")


def _paper(v: float, fmt: str) -> str:
    return "—" if math.isnan(v) else f"{v:{fmt}}"


def results_table(summary: pd.DataFrame) -> str:
    """The side-by-side markdown table (errors in %)."""
    head = (
        "| method | train (paper) | train (ours) | valid % (paper) | valid % (ours) "
        "| test % (paper) | test % (ours) | test gate density | test % (sampled gates) "
        "| test % (top 10% per example) | best epoch | seeds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for _, s in summary.iterrows():
        body += (
            f"| {s['label']} | {_paper(s['paper_train'], '.1e')} "
            f"| {_pm(s['train_criterion_mean'], s['train_criterion_sd'], '.1e')} "
            f"| {_paper(s['paper_valid'], '.2f')} "
            f"| {_pm(s['valid_error_mean'], s['valid_error_sd'], '.2f')} "
            f"| {_paper(s['paper_test'], '.2f')} "
            f"| {_pm(s['test_error_mean'], s['test_error_sd'], '.2f')} "
            f"| {_pm(s['test_density_mean'], s['test_density_sd'], '.3f')} "
            f"| {_pm(s['test_error_stochastic_mean'], s['test_error_stochastic_sd'], '.2f')} "
            f"| {_pm(s['test_error_top_k_mean'], s['test_error_top_k_sd'], '.2f')} "
            f"| {s['best_epoch_mean']:.1f} | {s['seeds']} |\n"
        )
    return head + body


def plot_valid_curves(epochs: pd.DataFrame, path: Path) -> Path:
    """Validation error (%) against epoch, one line per row, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    frame = epochs.assign(
        valid=100 * epochs["valid_error"],
        method=epochs["row"].map(lambda r: cc.GATE_TYPES[r].label),
    )
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    sns.lineplot(data=frame, x="epoch", y="valid", hue="method", errorbar="sd", marker="o", ax=ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Conditional computation on MNIST: validation error (mean ± sd over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _comparison_notes(summary: pd.DataFrame) -> str:
    notes = []
    gate_rows = summary[summary["row"].isin(GATE_ESTIMATOR_ROWS)]
    if len(gate_rows):
        best = gate_rows.loc[gate_rows["test_error_mean"].idxmin()]
        notes.append(
            f"- Best of the four gate estimators on test error: **{best['label']}** "
            f"({best['test_error_mean']:.2f}%); in the paper: Straight-through (1.39%)."
        )
    for _, s in summary.iterrows():
        if math.isnan(s["paper_test"]):
            continue
        diff = s["test_error_mean"] - s["paper_test"]
        verdict = "within 0.3 points of" if abs(diff) <= 0.3 else "differs from"
        notes.append(
            f"- {s['label']}: test {s['test_error_mean']:.2f}% vs paper {s['paper_test']:.2f}% "
            f"({diff:+.2f} points, {verdict} the paper)."
        )
    return "\n".join(notes)


CHOICES = """\
- **Epochs**: the paper does not say how long it trained; every row here trains for the same
  number of epochs (above) and the epoch with the lowest validation error is kept.
- **Data**: MNIST, the first 50 000 training images for training and the last 10 000 for
  validation (the split of the classic `mnist.pkl.gz`), grey levels in [0, 1], not binarised.
- **Initialisation**: PyTorch's default for linear layers, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
  for weights and biases (the paper gives none). Seeds: `torch.manual_seed(seed)` before
  building the network; minibatch order and gate uniforms from generators seeded by the seed.
- **Optimisation**: SGD on the mean minibatch loss, minibatch 32, learning rate 0.1 for every
  parameter except the stochastic-binary-neuron gater (0.001), momentum 0.5 for STS and none
  otherwise, max-norm 2 on every unit's incoming weights after each step.
- **Sparsity**: target density 0.1; KL penalty on the minibatch-mean probability of each gate
  being on (sigmoid-type gates: ST, STS, SBN), L1 on the minibatch-mean gate value for the
  rectifiers; λ starts at 1e-5, ×1.1 when the minibatch density exceeds 0.11, ×0.9 below
  0.09, clipped to [1e-13, 1]. The sigmoid baselines have no penalty.
- **STS noise**: our reading of "skewed Beta noise at the sigmoid input, mode at 0.1, β = 40":
  `z = logit(n)`, `n ~ Beta(α, 40)` with `α = 5.33` so that the mode of `n` is 0.1 (a gate with
  zero pre-activation sits at `sigmoid(0 + z)` ≈ 0.1), added to the gate's pre-activation.
  Its probability of being on is `sqrt(p)` (paper Eq. 2), which is what the KL penalty sees.
- **Score-function gates**: REINFORCE on the per-example NLL with the paper's optimal per-unit
  baseline `E[(h-p)² L] / E[(h-p)²]`, each term an exponential moving average (decay 0.9) over
  earlier minibatches only; the sparsity penalty's gradient flows through `p` directly.
- **Sigmoid baselines**: 200 gates and 200 experts, gate = `sigmoid(a)` (with `N(0, 1)` noise at
  the sigmoid input for "+ noise"), no sparsity; at test time every gate is on.
- **Test time**: the gate noise is replaced by its mean; each gate gets a score (probability of
  being on, or the pre-activation for rectifiers) and a threshold tuned on the validation set
  turns on 10% of them (over all examples and gates). Binary gates are then 1, STS gates
  `sqrt(p)`, noisy-rectifier gates their expected output `E[max(0, a + z)]` (with the noise
  at its mean, far fewer than 10% of the pre-activations are positive), baseline-rectifier
  gates `max(0, a)`. Validation error during training uses the same rule.
- **Train criterion**: mean training negative log-likelihood over the selected epoch, with the
  stochastic gates as trained (no penalty). The paper's "train" column is its training
  criterion, presumably measured the same way.
"""


def write_report(
    out: str | Path,
    results: pd.DataFrame,
    epochs: pd.DataFrame,
    data: Digits,
    config: cc.TrainConfig,
    command: str,
    device: str,
    bench: pd.DataFrame | None = None,
) -> Path:
    """Write ``report.md`` and ``valid_curves.png`` into ``out``."""
    out = Path(out)
    summary = summarize(results)
    plot_valid_curves(epochs, out / "valid_curves.png")
    env = environment(device)
    seeds = sorted(results["seed"].unique().tolist())
    minutes = epochs["seconds"].sum() / 60  # every epoch, across resumed sessions too
    source = (
        f"MNIST from `{data.path}`"
        if data.source == "mnist"
        else "**scikit-learn's 8x8 digits (fallback, a smoke test: not comparable with MNIST)**"
    )
    text = f"""# Conditional computation on MNIST: the paper's table, reproduced

Bengio, Léonard & Courville (2013), *Estimating or Propagating Gradients Through Stochastic
Neurons for Conditional Computation*, arXiv:1308.3432, Sec. 6.

Command: `{command}`

Data: {source}; {len(data.train)} training / {len(data.valid)} validation / {len(data.test)} test
examples.

Training: {config.epochs} epoch(s), minibatch {config.batch_size}, seeds {seeds}, device
`{device}` ({env.get("device_name") or "?"}), torch {env.get("torch")}; total training time
(sum of the epochs, validation included) {minutes:.1f} min.

## Results

Errors in %, mean ± sd over seeds (the paper: one run each). "train" is the training
criterion (mean training NLL over the selected epoch). Test error uses the paper's deterministic
test-time gates (threshold tuned on validation, ~10% on); gate density is the fraction of
(example, gate) pairs on at test time. "Sampled gates": test error with the gates drawn as in
training (one draw per example), a diagnostic of the deterministic rule. "Top 10% per example":
each example's own 10% highest-scoring gates on instead of one threshold for all.

{results_table(summary)}
{_comparison_notes(summary)}

![validation error per epoch](valid_curves.png)

## Choices where the paper is silent

{CHOICES}
"""
    if bench is not None:
        text += f"""
## The compute saving, measured

Expert layer + output layer ({int(bench["experts"].iloc[0])} experts, \
{int(bench["inputs"].iloc[0])} inputs, 10 classes) computed densely (every expert, then masked)
and from the active experts only, on random gates at each density, device `{device}`,
{int(bench["threads"].iloc[0])} CPU thread(s). MAC ratio = dense / sparse multiply-adds
(counted); speed-up = dense time / sparse time (best of the sparse methods: `gather` per
example, `csr` sampled dense-dense product over the batch). The sparse output equals the dense
one to float tolerance in every cell.

{format_bench(bench)}
The gater (784·400 + 400·2000 = 1.11 M multiply-adds per example) runs densely on both paths,
so the whole network's saving at 10% density is bounded by (1.11 + 1.59) / (1.11 + 0.16) ≈ 2.1×
in multiply-adds even before kernel efficiency.
"""
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------
# The compute saving: sparse vs dense inference through the expert and output layers
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, repeats: int, min_seconds: float) -> float:
    """Best over ``repeats`` of the mean time per call over at least ``min_seconds``."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def bench_sparse_inference(
    densities: Sequence[float] = BENCH_DENSITIES,
    batches: Sequence[int] = BENCH_BATCHES,
    device: str = "cpu",
    experts: int = 2000,
    inputs: int = 784,
    classes: int = 10,
    repeats: int = 5,
    min_seconds: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Counted multiply-adds and wall time of the sparse vs dense expert + output layers.

    For each batch size and density, random gates with exactly that fraction on (non-zero
    gate values) are drawn; the dense path (:func:`~stochgrad.models.conditional.
    dense_expert_output`) and each sparse method (``gather``, ``csr``) are timed in the same
    run, and the sparse outputs are checked against the dense one. Returns one line per
    (batch, density) with ``macs_dense``, ``macs_sparse``, ``mac_ratio``, ``dense_ms``,
    ``gather_ms``, ``csr_ms``, ``speedup`` (dense / fastest sparse) and ``best_method``.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    layers = cc.PackedExperts.random(inputs, experts, classes, generator=gen).to(dev)
    lines = []
    for batch in batches:
        x = torch.rand(batch, inputs, generator=gen).to(dev)
        for density in densities:
            scores = torch.rand(batch, experts, generator=gen)
            gates = (scores > cc.tune_threshold(scores, density)).float().to(dev)
            dense = cc.dense_expert_output(x, gates, layers)
            line: dict[str, Any] = {
                "device": device,
                "threads": torch.get_num_threads(),
                "experts": experts,
                "inputs": inputs,
                "batch": batch,
                "density": density,
                "measured_density": float((gates != 0).float().mean()),
                "macs_dense": cc.count_macs(gates, inputs, classes, "dense"),
                "macs_sparse": cc.count_macs(gates, inputs, classes, "sparse"),
            }
            line["mac_ratio"] = line["macs_dense"] / max(line["macs_sparse"], 1)
            line["dense_ms"] = 1e3 * _time(
                lambda x=x, g=gates: cc.dense_expert_output(x, g, layers), dev, repeats, min_seconds
            )
            for method in ("gather", "csr"):
                sparse = cc.sparse_expert_output(x, gates, layers, method)
                torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
                line[f"{method}_ms"] = 1e3 * _time(
                    lambda x=x, g=gates, m=method: cc.sparse_expert_output(x, g, layers, m),
                    dev,
                    repeats,
                    min_seconds,
                )
            fastest = min(("gather", "csr"), key=lambda m: line[f"{m}_ms"])
            line["best_method"] = fastest
            line["speedup"] = line["dense_ms"] / line[f"{fastest}_ms"]
            lines.append(line)
    return pd.DataFrame(lines)


def format_bench(bench: pd.DataFrame) -> str:
    """The benchmark as a markdown table."""
    head = (
        "| batch | density | MACs dense | MACs sparse | MAC ratio | dense ms | gather ms "
        "| csr ms | speed-up (best sparse) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.batch} | {r.density:.0%} | {r.macs_dense:,} | {r.macs_sparse:,} "
        f"| {r.mac_ratio:.1f}× | {r.dense_ms:.3f} | {r.gather_ms:.3f} | {r.csr_ms:.3f} "
        f"| {r.speedup:.2f}× ({r.best_method}) |\n"
        for r in bench.itertuples()
    )
    return head + body


if __name__ == "__main__":
    raise SystemExit(main())
