"""The ``stochgrad`` command line.

    stochgrad list                         estimators and models, with one-line descriptions
    stochgrad compare                      every paper estimator on the default models
    stochgrad sweep --param logits         variance against a model or estimator option
    stochgrad train                        SGD curves per estimator over seeds
    stochgrad plot DIR                     redraw the figures of a results directory
    stochgrad reproduce ...                the paper's conditional-computation experiment
    stochgrad bench                        estimator throughput against hand-written torch

Run ``stochgrad COMMAND --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import time
import zipfile
from collections.abc import Sequence
from typing import Any

from .executor import CellsFailed

__all__ = ["main", "build_parser", "format_table"]

_EPILOG = """\
specs: a model or estimator is NAME or NAME:KEY=VALUE,KEY=VALUE, e.g.
  score_function:baseline=optimal   toy:target=0.499,dim=50   spsa:c=0.05
  (lists inside a value: hidden=4|3)

examples:
  stochgrad compare                                   # the default comparison (< 1 min)
  stochgrad compare --models toy:target=0.45 --estimators score_function:baseline=optimal \\
      straight_through --draws 100000 --out results/mine
  stochgrad sweep --param logits --grid=-4:4:9        # variance against sigmoid(logits)
  stochgrad sweep --param c --grid 0.01,0.1,1         # SPSA's step (estimator option)
  stochgrad train --model sbn --steps 300 --seeds 5
  stochgrad plot results/compare
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _common(p: argparse.ArgumentParser, draws: int | None, out: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (all estimators share it)")
    if draws is not None:
        p.add_argument(
            "--draws", type=int, default=draws, help="independent gradient draws per estimator"
        )
    p.add_argument("--out", default=out, help="results directory (resumable; see `plot`)")
    p.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda or cuda:N (where draws live)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="hide progress bars (shown on terminals)"
    )
    p.add_argument("--no-plots", action="store_true", help="write tables only, no figures")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the default models are small, where one thread is fastest "
        "(0 = torch's own choice)",
    )
    from .executor import add_arguments

    add_arguments(p)


def _max_evals(p: argparse.ArgumentParser) -> None:
    from .defaults import DEFAULT_MAX_EVALS, MIN_CAPPED_DRAWS

    p.add_argument(
        "--max-evals",
        type=float,
        default=DEFAULT_MAX_EVALS,
        help="model evaluations per (model, estimator) cell: costly estimators (finite "
        f"differences) get fewer draws, at least {MIN_CAPPED_DRAWS}; 0 = no cap",
    )


def bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``stochgrad bench`` (and ``scripts/bench_estimators.py``); defined here,
    without torch, so that ``--help`` stays fast."""
    p.add_argument(
        "--dims",
        "--dim",
        type=int,
        nargs="+",
        default=[4, 200, 2000],
        metavar="D",
        help="toy dimensions (exact runs at min(D, 12); finite differences at draws/100)",
    )
    p.add_argument("--draws", type=int, nargs="+", default=[1_000, 100_000, 1_000_000], metavar="N")
    p.add_argument("--repeats", type=int, default=3, help="minimum over this many")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="keep the estimators whose label starts with one of these",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=1024.0,
        metavar="MIB",
        help="skip cells whose float32 output (draws x dim) would exceed this many MiB",
    )


def build_parser(reproduce: Any = None) -> argparse.ArgumentParser:
    """The argument parser; ``reproduce`` is the reproduce module (or an import error)."""
    from .defaults import DEFAULT_MODELS

    parser = argparse.ArgumentParser(
        prog="stochgrad",
        description=(
            "Estimate and compare gradients through stochastic neurons (Bengio, Leonard & "
            "Courville 2013 and later work): bias, variance, MSE, cosine, SNR and cost of "
            "every estimator, with confidence intervals, tables and figures."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "list",
        help="list estimators and models",
        description="Estimators (unbiasedness, cost on the default toy) and models.",
        formatter_class=_Formatter,
    )

    p = sub.add_parser(
        "compare",
        help="compare estimators on models (default: paper estimators, default models)",
        description=(
            "Run each estimator on each model; print bias, variance, MSE, cosine, SNR, the "
            "Bonferroni unbiasedness test and cost, with 95% intervals; write summary.csv, "
            "per_coordinate.csv, run.json and figures to --out. A rerun with the same --out "
            "resumes: finished (model, estimator) cells are kept, not recomputed."
        ),
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--models", nargs="+", default=None, metavar="SPEC",
        help=f"default: {' '.join(DEFAULT_MODELS)}",
    )  # fmt: skip
    p.add_argument(
        "--estimators", nargs="+", default=None, metavar="SPEC",
        help="default: the paper estimators and the field's (arm ... gumbel_rao; with --pyro: "
        "the score-function baselines, "
        "straight_through, pyro:tracegraph and pyro:tracegraph+avg)",
    )  # fmt: skip
    p.add_argument("--level", type=float, default=0.95, help="confidence level of intervals")
    _max_evals(p)
    p.add_argument(
        "--pyro", default=None, metavar="FILE.py:MODEL,GUIDE",
        help="compare the estimators at the discrete guide sites of a Pyro program instead of "
        "on --models: the file is loaded by path, MODEL and GUIDE are its functions; the "
        "table has one row per (estimator, pyro.param)",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, metavar="VALUE",
        help="with --pyro: the program's arguments. If the file defines data(value), it gets "
        "VALUE (text); otherwise VALUE is a .npz file (arrays as keyword arguments) or a "
        ".pt file (torch.load: dict -> keyword, tuple/list -> positional arguments). Without "
        "--data, the file's data() (if any) gives them",
    )  # fmt: skip
    p.add_argument(
        "--warmup", type=int, default=None,
        help="with --pyro: ELBO calls before the measured draws (default: enough for a "
        "stateful baseline to forget its start, else 0)",
    )  # fmt: skip
    p.add_argument(
        "--no-vectorize",
        action="store_true",
        help="with --pyro: run the draws one ELBO call at a time, even where they vectorise",
    )
    _common(p, 10_000, "results/compare")

    p = sub.add_parser(
        "sweep",
        help="statistics against a model or estimator option over a grid",
        description=(
            "Vary one option over a grid -- a model option (toy: logits, target, dim) or an "
            "estimator option (num_samples, c, sigma, eps, ...) -- and record every statistic "
            "at each grid point. Prefix model./estimator. to disambiguate."
        ),
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--model", default="toy:target=0.45", metavar="SPEC")
    p.add_argument("--param", default="logits", help="the option to vary")
    p.add_argument(
        "--grid", default="-3:3:7", help="values 'a,b,c' or an inclusive range 'start:stop:num'"
    )
    p.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="default: the paper estimators that the swept option applies to",
    )
    p.add_argument("--level", type=float, default=0.95, help="confidence level of intervals")
    _max_evals(p)
    _common(p, 5_000, "results/sweep")

    p = sub.add_parser(
        "train",
        help="SGD curves of each estimator on a model, over seeds",
        description=(
            "Each estimator drives plain SGD (theta -= lr * mean of --batch draws) on a fresh "
            "copy of the model; the exact expected loss is recorded every --eval-every steps. "
            "Figure: mean over seeds with a +-1 standard-error band.\n\n"
            "--model vae: the Bernoulli VAE on dynamically binarised MNIST under the DisARM "
            "paper's settings (Adam, batch 50, 200 latents, centred inputs): per (estimator, "
            "seed) a log of training / test ELBO and the encoder gradient's log-variance every "
            "--eval-every steps, figures of both, checkpoints after every evaluation (a re-run "
            "of the same command, or one with a larger --steps, resumes)."
        ),
        epilog=_EPILOG
        + "  stochgrad train --model vae --data ../shared/data/mnist.npz --steps 20000 \\\n"
        "      --seeds 2 --eval-every 1000 --out runs/vae_linear\n",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", default="sbn", metavar="SPEC", help="a model spec, or vae")
    p.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="default: the paper estimators; for vae: "
        "score_function:baseline=leave_one_out,num_samples=2 straight_through disarm",
    )
    p.add_argument("--steps", type=int, default=None, help="default 200; vae: 10000")
    p.add_argument(
        "--lr", type=float, default=None, help="SGD learning rate (default 0.05); vae: Adam's, 1e-4"
    )
    p.add_argument(
        "--batch", type=int, default=None, help="draws averaged per step (default 1); vae: "
        "images per minibatch (50)"
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="runs per estimator (seed, seed+1, ...)")
    p.add_argument("--eval-every", type=int, default=None, help="default 10; vae: 1000")
    g = p.add_argument_group("vae only")
    g.add_argument("--arch", choices=["linear", "nonlinear"], default=None, help="default linear")
    g.add_argument("--data", default=None, help="mnist.npz or IDX directory (default location)")
    g.add_argument(
        "--test-samples",
        type=int,
        default=None,
        help="K of the K-sample importance-weighted test bound (e.g. 100; default 0 = off)",
    )
    g.add_argument(
        "--variance-draws",
        type=int,
        default=None,
        help="gradient draws per evaluation for the encoder log-variance (default 20; 0 = off)",
    )
    g.add_argument(
        "--eval-size", type=int, default=None, help="train / test images per ELBO (10000)"
    )
    _common(p, None, "results/train")

    p = sub.add_parser(
        "plot",
        help="redraw the figures of a results directory",
        description="Redraw DIR/figures/*.png and *.pdf from DIR/summary.csv and DIR/run.json.",
        formatter_class=_Formatter,
    )
    p.add_argument("dir", metavar="DIR")

    if reproduce is not None:
        reproduce.add_parser(sub)  # adds `reproduce` and its own options to the subparsers
    else:
        # Placeholder for the command list; `main` loads the real parser on demand.
        sub.add_parser("reproduce", help="the paper's conditional-computation experiment (MNIST)")

    p = sub.add_parser(
        "bench",
        help="estimator throughput against hand-written torch references",
        description="Per-draw throughput and peak memory of each estimator on the toy, as "
        "ratios to a tight hand-written torch reference (chunked, in place, analytic "
        "gradients), over a grid of dims and draws, measured in one run.",
        formatter_class=_Formatter,
    )
    bench_arguments(p)
    return parser


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

# The compact summary printed by ``compare``: the columns a reader needs first. The full
# table, intervals and costs included, is summary.csv.
_TABLE_COLUMNS = [
    ("estimator", "estimator"),
    ("param", "param"),
    ("bias_l2", "bias"),
    ("bias_noise_floor", "floor"),
    ("variance", "variance"),
    ("mse", "mse"),
    ("snr", "snr"),
    ("p_unbiased", "p_unbiased"),
]

#: Widest line ``format_table`` prints.
TABLE_WIDTH = 100

# Shortened spellings of long estimator names in the printed table.
_SHORT = {
    "score_function": "sf",
    "straight_through": "st",
    "baseline=": "",
    "variant=": "",
}


def _short_name(name: str) -> str:
    """``score_function:baseline=moving_average`` -> ``sf:moving_average``."""
    head, sep, tail = name.partition(":")
    head = _SHORT.get(head, head)
    for k, v in _SHORT.items():
        if k.endswith("="):
            tail = tail.replace(k, v)
    return head + sep + tail


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "~"


def _g(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if v != v:
        return "-"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"


def _tail_mark(row: Any, key: str) -> str:
    """``!`` after variance, mse and snr when the row's draws are heavy-tailed."""
    flagged = "heavy_tails" in row and bool(row["heavy_tails"])
    return "!" if flagged and key in ("variance", "mse", "snr") else ""


def format_table(df: Any, width: int = TABLE_WIDTH) -> str:
    """A compact summary, one block per model (3 significant digits), no line over ``width``.

    Estimator names are shortened (``sf`` = score_function, ``st`` = straight_through) and
    long names clipped with ``~``; ``!`` marks variance, mse and snr of heavy-tailed draws
    (``heavy_tails``); every other column is in ``summary.csv``.
    """
    if df.empty:
        return "(no rows)"
    blocks = []
    single_param = df.groupby("model")["param"].nunique().max() == 1
    keys = [k for k, _ in _TABLE_COLUMNS if not (k == "param" and single_param)]
    heads = [h for k, h in _TABLE_COLUMNS if k in keys]
    text_cols = [j for j, k in enumerate(keys) if k in ("estimator", "param")]
    for model, sub in df.groupby("model", sort=False):
        rows = []
        for _, r in sub.iterrows():
            rows.append(
                [
                    _short_name(str(r[k])) if k == "estimator"
                    else str(r[k]) if k == "param"
                    else _g(r[k]) + _tail_mark(r, k) if k in r else "-"
                    for k in keys
                ]
            )  # fmt: skip
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(heads)]
        # shrink the widest text column until the line fits
        while sum(widths) + 2 * (len(widths) - 1) > width:
            j = max(text_cols, key=lambda i: widths[i])
            if widths[j] <= max(6, len(heads[j])):
                break
            widths[j] -= 1
        rows = [[_clip(c, widths[j]) for j, c in enumerate(r)] for r in rows]
        left = set(text_cols)

        def fmt(cells: list[str], widths: list[int] = widths, left: set[int] = left) -> str:
            return "  ".join(
                c.ljust(w) if j in left else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        ref = sub["reference"].iloc[0] if "reference" in sub else "?"
        lines = [_clip(f"== {model}  (reference gradient: {ref})", width)]
        lines.append(fmt(heads))
        lines.append(fmt(["-" * w for w in widths]))
        lines += [fmt(r) for r in rows]
        blocks.append("\n".join(lines))
    legend = [
        "bias: debiased ||mean - g*|| (0 = within Monte Carlo noise); floor: sqrt(tr(cov) / draws)",
        "sf = score_function, st = straight_through",
    ]
    if "heavy_tails" in df and df["heavy_tails"].astype(bool).any():
        legend.append(
            "!: heavy-tailed draws (tail_index > 0.5): their variance, mse and snr "
            "intervals under-cover"
        )
    return "\n\n".join(blocks) + "\n\n" + "\n".join(_clip(x, width) for x in legend)


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr)


def _figures(out: str, no_plots: bool, quiet: bool = False) -> list[str]:
    """Draw the figures of ``out``, one progress line per figure on stderr unless ``quiet``."""
    if no_plots:
        return []
    from .plots import plot_results

    return [str(f) for f in plot_results(out, echo=None if quiet else _echo)]


def _progress(args: argparse.Namespace) -> bool | None:
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's own choice), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(args.threads)
    return False if args.no_progress else None


def _executor(args: argparse.Namespace) -> Any:
    from .executor import from_args

    return from_args(args)


def _device(name: str) -> str:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu or cuda")
    return name


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _first_line(text: str | None) -> str:
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def cmd_list(args: argparse.Namespace) -> int:
    from stochgrad import estimators, models

    toy = models.get("toy")
    print("Estimators (cost per draw on the default toy, dim 200):")
    rows = []
    for name in estimators.available():
        cls = estimators.lookup(name)
        est = cls()
        try:
            c = est.cost(toy)
            cost = f"{float(c.evals):g} evals, {float(c.backwards):g} backward"
        except (ValueError, TypeError, NotImplementedError) as e:
            cost = f"n/a ({_first_line(str(e))[:60]})"
        desc = _first_line(getattr(cls, "description", "") or cls.__doc__)
        opts = ", ".join(cls.option_names())
        rows.append((name, str(est.unbiased), cost, desc, opts))
    w = max(len(r[0]) for r in rows)
    for name, unb, cost, desc, opts in rows:
        print(f"  {name.ljust(w)}  unbiased: {unb:<10}  {cost}")
        for line in textwrap.wrap(desc, 88):
            print(" " * (w + 4) + line)
        if opts:
            print(" " * (w + 4) + "options: " + opts)
    print("\nModels:")
    w = max(len(n) for n in models.available())
    for name in models.available():
        cls = models.lookup(name)
        desc = _first_line(getattr(cls, "description", "") or cls.__doc__)
        print(f"  {name.ljust(w)}  {desc}")
    print(
        "\nDefault comparison: `stochgrad compare` (models: toy:target=0.45, toy:target=0.499, sbn)"
    )
    return 0


def _compare_pyro(args: argparse.Namespace) -> Any:
    from .compare_pyro import load_program, run_compare_pyro

    if args.models is not None:
        raise ValueError("--pyro and --models exclude each other: give one of them")
    if args.device != "cpu":
        raise ValueError("--device does not apply with --pyro: the program places its tensors")
    if getattr(args, "executor", "local") != "local":
        raise ValueError("--pyro runs in this process only (--executor local)")
    model, guide, pargs, pkwargs, info = load_program(args.pyro, args.data)
    return run_compare_pyro(
        model,
        guide,
        args.estimators,
        args.draws,
        args.seed,
        *pargs,
        kwargs=pkwargs,
        out=args.out,
        model_label=args.pyro,
        level=args.level,
        warmup=args.warmup,
        vectorize=False if args.no_vectorize else None,
        progress=_progress(args),
        echo=_echo,
        run_info=info,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import DEFAULT_ESTIMATORS, DEFAULT_MODELS, run_compare

    t0 = time.perf_counter()
    if args.pyro is not None:
        table = _compare_pyro(args)
    elif args.data is not None or args.warmup is not None or args.no_vectorize:
        raise ValueError("--data, --warmup and --no-vectorize apply only with --pyro")
    else:
        table = run_compare(
            DEFAULT_MODELS if args.models is None else args.models,
            DEFAULT_ESTIMATORS if args.estimators is None else args.estimators,
            args.draws,
            args.seed,
            out=args.out,
            device=_device(args.device),
            level=args.level,
            max_evals=args.max_evals or None,
            progress=_progress(args),
            echo=_echo,
            executor=_executor(args),
        )
    print(format_table(table))
    for s in table.attrs.get("skipped", []):
        why = f"skipped: {s['estimator']} on {s['model']}: {_first_line(s['reason'])}"
        print(textwrap.fill(why, TABLE_WIDTH, subsequent_indent="  ", break_on_hyphens=False))
    t_plot = time.perf_counter()
    figs = _figures(args.out, args.no_plots, args.no_progress)
    t_end = time.perf_counter()
    print("\nall columns (intervals, z_max, costs, draws, ...) are in summary.csv")
    print(f"wrote {args.out}/summary.csv, per_coordinate.csv, run.json")
    if figs:
        print(f"wrote {len(figs)} figure files in {args.out}/figures")
    plots = f" (figures {t_end - t_plot:.1f} s)" if figs else ""
    print(f"wall time {t_end - t0:.1f} s{plots}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .compare import run_sweep

    table = run_sweep(
        args.model,
        args.param,
        args.grid,
        args.estimators,
        args.draws,
        args.seed,
        out=args.out,
        device=_device(args.device),
        level=args.level,
        max_evals=args.max_evals or None,
        progress=_progress(args),
        echo=_echo,
        executor=_executor(args),
    )
    cols = ["estimator", "sweep_value", "variance", "variance_lo", "variance_hi", "bias_l2"]
    cols += ["mse", "p_unbiased"]
    shown = table[cols].assign(estimator=table["estimator"].map(_short_name))
    with _pandas_display():
        print(shown.to_string(index=False, float_format=_g))
    print("sf = score_function, st = straight_through; all columns are in summary.csv")
    figs = _figures(args.out, args.no_plots, getattr(args, "no_progress", False))
    print(
        f"\nwrote {args.out}/summary.csv" + (f" and figures in {args.out}/figures" if figs else "")
    )
    return 0


_VAE_ONLY = ("arch", "data", "test_samples", "variance_draws", "eval_size")


def _vae_model(spec: str) -> dict[str, Any] | None:
    """The options of a ``vae`` model spec, or ``None`` for any other model."""
    from .compare import parse_spec

    name, options = parse_spec(spec)
    if name != "vae":
        return None
    unknown = sorted(set(options) - {"arch"})
    if unknown:
        raise ValueError(
            f"--model vae takes only arch= in its spec (got {', '.join(unknown)}); the other "
            "settings are train options (--steps, --lr, --batch, --data, ...)"
        )
    return options


def cmd_train_vae(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from .train_vae import DEFAULT_ESTIMATORS, run_train_vae

    if getattr(args, "executor", "local") != "local":
        raise ValueError("--model vae runs in this process; --executor ray is not supported")
    arch = options.get("arch")
    if arch is not None and args.arch is not None and arch != args.arch:
        raise ValueError(f"--model vae:arch={arch} and --arch {args.arch} disagree")
    _device(args.device)
    if args.device != "cpu":
        raise ValueError("--model vae trains on the CPU; use --device cpu")

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    table = run_train_vae(
        args.estimators or list(DEFAULT_ESTIMATORS),
        arch=pick(args.arch, arch or "linear"),
        steps=pick(args.steps, 10_000),
        seeds=args.seeds,
        seed=args.seed,
        lr=pick(args.lr, 1e-4),
        batch=pick(args.batch, 50),
        eval_every=pick(args.eval_every, 1000),
        eval_size=pick(args.eval_size, 10_000),
        test_samples=pick(args.test_samples, 0),
        variance_draws=pick(args.variance_draws, 20),
        data=args.data,
        out=args.out,
        plots=not args.no_plots,
        progress=_progress(args),
        echo=_echo,
    )
    last = table[table["step"] == table["step"].max()]
    cols = ["train_elbo", "test_elbo", "log_var_encoder"]
    if last["test_iw"].notna().any():
        cols.insert(2, "test_iw")
    agg = last.groupby("estimator", sort=False)[cols].mean()
    print(f"after {int(table['step'].max())} steps (mean over {args.seeds} seed(s)):")
    with _pandas_display():
        print(agg.to_string(float_format=lambda v: f"{v:.2f}"))
    figs = "" if args.no_plots else f" and figures in {args.out}/figures"
    print(f"\nwrote {args.out}/curves.csv, cells/*/seed*.csv{figs}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .compare import TRAIN_ESTIMATORS, run_train

    options = _vae_model(args.model)
    if options is not None:
        return cmd_train_vae(args, options)
    given = [f"--{k.replace('_', '-')}" for k in _VAE_ONLY if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for --model vae")
    table = run_train(
        args.model,
        args.estimators or list(TRAIN_ESTIMATORS),
        seeds=args.seeds,
        steps=200 if args.steps is None else args.steps,
        lr=0.05 if args.lr is None else args.lr,
        batch=1 if args.batch is None else args.batch,
        eval_every=10 if args.eval_every is None else args.eval_every,
        seed=args.seed,
        out=args.out,
        device=_device(args.device),
        progress=_progress(args),
        echo=_echo,
        executor=_executor(args),
    )
    if not table.empty:
        last = table[table["step"] == table["step"].max()]
        agg = last.groupby("estimator", sort=False)["loss"].agg(["mean", "std", "count"])
        print(f"expected loss after {int(table['step'].max())} steps (mean, sd over seeds):")
        with _pandas_display():
            print(agg.to_string(float_format=_g))
    figs = _figures(args.out, args.no_plots, getattr(args, "no_progress", False))
    print(
        f"\nwrote {args.out}/summary.csv" + (f" and figures in {args.out}/figures" if figs else "")
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_results

    for f in plot_results(args.dir, echo=_echo):
        print(f)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        benchmark = importlib.import_module("stochgrad.analysis.benchmark")
    except ImportError as e:
        print(
            f"stochgrad bench is not available in this installation ({e}); from a source "
            "checkout run: python scripts/bench_estimators.py",
            file=sys.stderr,
        )
        return 2
    try:
        return int(benchmark.main_from_args(args))
    except ValueError as e:
        print(f"stochgrad bench: {e}", file=sys.stderr)
        return 2


class _pandas_display:
    def __enter__(self) -> None:
        import pandas as pd

        self._ctx = pd.option_context("display.width", 200, "display.max_rows", 500)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _load_reproduce() -> Any:
    """The reproduce module, or the ImportError explaining why it is unavailable."""
    try:
        return importlib.import_module("stochgrad.analysis.reproduce")
    except ImportError as e:
        return e


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stochgrad`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import the (heavier) reproduce module only when that command is asked for.
    wants_reproduce = bool(argv) and argv[0] == "reproduce"
    reproduce = _load_reproduce() if wants_reproduce else None
    if wants_reproduce and (
        isinstance(reproduce, BaseException)
        or not hasattr(reproduce, "run")
        or not hasattr(reproduce, "add_parser")
    ):
        why = reproduce if isinstance(reproduce, BaseException) else "no add_parser()/run()"
        print(
            "stochgrad reproduce is not available: the module stochgrad.analysis.reproduce "
            f"could not be loaded ({why}).",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(reproduce)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args, reproduce)
    except KeyboardInterrupt:
        print(
            f"stochgrad {args.command}: interrupted; finished cells are kept: re-run the same "
            "command to resume",
            file=sys.stderr,
        )
        return 130
    except CellsFailed as e:
        print(f"stochgrad {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, zipfile.BadZipFile) as e:
        # Bad names, options, grids, files and incompatible directories: one line, no trace.
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"stochgrad {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, reproduce: Any) -> int:
    if args.command == "reproduce":
        assert reproduce is not None
        rc = reproduce.run(args)
        return int(rc or 0)
    commands = {
        "list": cmd_list,
        "compare": cmd_compare,
        "sweep": cmd_sweep,
        "train": cmd_train,
        "plot": cmd_plot,
        "bench": cmd_bench,
    }
    return int(commands[args.command](args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
