"""Several seeds of one row of the paper's table trained as one program.

:func:`train_seeds` trains ``S`` networks of the same gate type, protocol and settings, each
with its own seed, as one computation: their weights are stacked along a leading seed
dimension and every layer is one batched matrix product (``torch.baddbmm``), so one Python
step drives ``S`` optimisation steps. What each seed computes is what its own run of
:func:`stochgrad.models.conditional.train` computes:

* the same initialisation and random streams: each seed keeps its own copy of torch's global
  generator state (the state its sequential run would have: ``torch.manual_seed(seed)``, then
  the network built, see :meth:`SeedRun.build`); before each of its draws the state is swapped
  in, the draw made with the very calls the sequential program makes (the surrogate's
  per-particle integer, the pre-gate noise, one uniform per gate), and the state kept again;
* the same minibatch order (a generator seeded by the seed), gate units (the estimators' own
  value functions), objective (mean NLL plus the sparsity penalty at the seed's own ``λ``),
  SGD with momentum and the two learning rates, max-norm, sparsity controller;
* the same end-of-epoch evaluation, selection, log rows, checkpoints and final numbers: those
  run per seed through the sequential functions, on a network whose parameters are views of
  the stacked weights, with the seed's random state swapped in.

The matrix products are the only place where the two could round differently; the batched
layer (:class:`_Linear`) is written so that on CPU each seed's slice has the bits of the
sequential ``nn.Linear`` forward and backward, and with one thread the whole trajectory is
bit-identical to the sequential one (tested). Elsewhere (more threads, another BLAS, a GPU)
the guarantee is agreement to float rounding (tested at ``rtol=1e-5`` in float32), and
trajectories with hard gates can drift apart once a rounding difference flips a gate whose
uniform lies within rounding of its probability. A seed that stops (early stopping, or a
non-finite training cost) leaves the stack and is frozen at its last state while the others
go on.

Checkpoints are the sequential trainer's, one file per seed, in the same format: a batched
run resumes a sequential checkpoint and a sequential run resumes a batched one.

Not supported: stateful gate estimators (the score-function gate with its moving-average
baseline, the ``sbn`` row), whose per-site state would have to be stacked too; their rows are
trained by :func:`~stochgrad.models.conditional.train`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stochgrad.estimators.noisy_rectifier import NoisyRectifier, noisy_rectifier_value
from stochgrad.estimators.straight_through import StraightThrough, straight_through_value
from stochgrad.estimators.sts import STS, sts_value

from . import conditional as cc

__all__ = ["SeedRun", "batchable", "capture_rng", "train_seeds"]

# Parameter names of ConditionalNet in the order of make_optimizer's two groups.
_GATER = ("gater_hidden.weight", "gater_hidden.bias", "gater_out.weight", "gater_out.bias")
_REST = ("experts.weight", "experts.bias", "output.weight", "output.bias")
_PARAMS = _GATER + _REST


def capture_rng(device: str | torch.device = "cpu") -> dict[str, Tensor | None]:
    """A copy of torch's global random state (CPU, and CUDA when ``device`` is a GPU)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng(state: dict[str, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])  # type: ignore[arg-type]
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)  # type: ignore[arg-type]


@dataclass
class SeedRun:
    """One seed of a batched training: its network, settings, random state and files.

    ``net``: the seed's network as its sequential run would start it; ``config``: its settings
    (``config.seed`` orders its minibatches); ``rng``: torch's global random state its
    sequential run would start from (:func:`capture_rng` right after building ``net``);
    ``on_epoch``, ``checkpoint``, ``description``, ``controller``: as for
    :func:`~stochgrad.models.conditional.train`.
    """

    net: cc.ConditionalNet
    config: cc.TrainConfig
    rng: dict[str, Tensor | None]
    on_epoch: Callable[[dict[str, float]], None] | None = None
    checkpoint: str | Path | None = None
    description: str = ""
    controller: cc.SparsityController | None = None

    @classmethod
    def build(
        cls,
        gate: str | cc.GateType,
        seed: int,
        config: cc.TrainConfig,
        net_config: cc.ConditionalConfig | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> SeedRun:
        """The seed's network built as ``stochgrad reproduce paper`` builds it sequentially:
        ``torch.manual_seed(seed)``, the network, the original initialisation under
        ``protocol="original"``; then the random state is captured (and the global state the
        caller had is put back)."""
        outer = capture_rng(device)
        torch.manual_seed(seed)
        net = cc.ConditionalNet(gate, net_config)
        if config.original:
            cc.init_original_(net)
        net = net.to(device)
        rng = capture_rng(device)
        _set_rng(outer, torch.device(device))
        return cls(net, dataclasses.replace(config, seed=seed), rng, **kwargs)


def batchable(gate: cc.GateType) -> bool:
    """Whether the gate type's unit can be trained by :func:`train_seeds` (not stateful)."""
    est = gate.make_estimator()
    return not bool(getattr(est, "stateful", False)) and isinstance(
        est, (StraightThrough, NoisyRectifier, STS, cc.Rectifier, cc.Sigmoid)
    )


def _draws_uniforms(estimator: Any) -> bool:
    """Whether the gate site draws one uniform per gate (the baseline units draw none)."""
    return not isinstance(estimator, (cc.Rectifier, cc.Sigmoid))


def _gate_value(estimator: Any, a: Tensor, u: Tensor | None) -> Tensor:
    """The gate unit's value (with its gradient) at logits ``a``, uniforms ``u``."""
    if isinstance(estimator, StraightThrough):
        assert u is not None
        return straight_through_value(a, u, estimator.variant)
    if isinstance(estimator, NoisyRectifier):
        assert u is not None
        return noisy_rectifier_value(a, u, estimator.noise, estimator.scale)
    if isinstance(estimator, STS):
        assert u is not None
        return sts_value(a, u, estimator.variant)
    if isinstance(estimator, (cc.Rectifier, cc.Sigmoid)):
        return estimator.value(a)
    raise TypeError(f"gate estimator {type(estimator).__name__} cannot be trained batched")


@dataclass
class _Seed:
    """The loop state of one seed (everything the sequential loop keeps in local variables)."""

    run: SeedRun
    opt: torch.optim.SGD
    controller: cc.SparsityController | None
    order: torch.Generator
    rng: dict[str, Tensor | None]
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    first: int = 1
    buffers: dict[str, Tensor] | None = None  # momentum buffers loaded from a checkpoint
    done: bool = False


def _check_runs(runs: Sequence[SeedRun]) -> None:
    if not runs:
        raise ValueError("train_seeds needs at least one SeedRun")
    base = runs[0]
    for r in runs:
        if r.net.gate != base.net.gate or r.net.config != base.net.config:
            raise ValueError(
                f"every seed must have the same gate type and sizes; got {r.net.gate.name} "
                f"{r.net.config} and {base.net.gate.name} {base.net.config}"
            )
        same = dataclasses.replace(r.config, seed=base.config.seed, progress=base.config.progress)
        if same != base.config:
            raise ValueError(
                f"every seed must have the same settings except the seed; got {r.config} "
                f"and {base.config}"
            )
        if not batchable(r.net.gate):
            raise ValueError(
                f"gate type {r.net.gate.name!r} (estimator {r.net.gate.estimator!r}) is "
                "stateful or not supported by the batched trainer; train it with "
                "stochgrad.models.conditional.train"
            )
        if r.config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {r.config.batch_size}")
    if len({id(r.net) for r in runs}) != len(runs):
        raise ValueError("every SeedRun needs its own network")


def _momentum_buffers(opt: torch.optim.SGD, net: nn.Module) -> dict[str, Tensor] | None:
    """The optimiser's momentum buffers by parameter name (``None`` when it has none yet)."""
    params = dict(net.named_parameters())
    out = {}
    for name in _PARAMS:
        buf = opt.state.get(params[name], {}).get("momentum_buffer")
        if buf is None:
            return None
        out[name] = buf
    return out


def _load(seed: _Seed, device: torch.device) -> None:
    """Go on from the seed's checkpoint, as the sequential loop does."""
    run, config = seed.run, seed.run.config
    saved = torch.load(run.checkpoint, map_location=device, weights_only=False)  # type: ignore[arg-type]
    run.net.load_state_dict(saved["net"])
    seed.opt.load_state_dict(saved["opt"])
    if seed.controller is not None and saved["controller"] is not None:
        seed.controller.load_state_dict(saved["controller"])
    if saved["estimator"] is not None:
        run.net.estimator.load_state_dict(saved["estimator"])
    seed.order.set_state(saved["order"])
    seed.rng = {"cpu": saved["rng"], "cuda": saved["cuda_rng"]}
    seed.history, seed.best, seed.first = saved["history"], saved["best"], saved["epoch"] + 1
    seed.buffers = _momentum_buffers(seed.opt, run.net)
    criterion = "valid_cost" if config.original else "valid_error"
    if cc.early_stop([h[criterion] for h in seed.history], config.patience):
        seed.first = config.epochs + 1


def _save(seed: _Seed, epoch: int, buffers: dict[str, Tensor] | None, device: torch.device):
    """The sequential trainer's checkpoint of this seed after ``epoch``."""
    net, opt = seed.run.net, seed.opt
    if buffers is not None and opt.defaults["momentum"] != 0:
        params = dict(net.named_parameters())
        for name in _PARAMS:
            opt.state[params[name]]["momentum_buffer"] = buffers[name]
    cc.save_atomic(
        {
            "epoch": epoch,
            "net": net.state_dict(),
            "opt": opt.state_dict(),
            "controller": seed.controller.state_dict() if seed.controller is not None else None,
            "estimator": getattr(net.estimator, "state_dict", lambda: None)(),
            "order": seed.order.get_state(),
            "rng": seed.rng["cpu"],
            "cuda_rng": seed.rng["cuda"] if device.type == "cuda" else None,
            "history": seed.history,
            "best": seed.best,
        },
        seed.run.checkpoint,  # type: ignore[arg-type]
    )


class _Stack:
    """The stacked parameters and momentum buffers of the seeds still training.

    Each seed's network keeps its own ``nn.Parameter`` objects, whose data are views of row
    ``i`` of the stacked tensors: the sequential functions (evaluation, ``state_dict``) read the
    current weights without a copy.
    """

    def __init__(self, seeds: list[_Seed], momentum: float):
        self.seeds = seeds
        self.momentum = momentum
        nets = [s.run.net for s in seeds]
        named = [dict(n.named_parameters()) for n in nets]
        self.params = {
            k: torch.stack([p[k].detach() for p in named]).requires_grad_(True) for k in _PARAMS
        }
        self.buffers: dict[str, Tensor] | None = None
        if momentum != 0:
            self.buffers = {
                k: torch.stack(
                    [
                        s.buffers[k] if s.buffers is not None else torch.zeros_like(p[k])
                        for s, p in zip(seeds, named)
                    ]
                )
                for k in _PARAMS
            }
        self._point()

    def _point(self) -> None:
        for i, s in enumerate(self.seeds):
            for k, p in s.run.net.named_parameters():
                p.data = self.params[k].detach()[i]

    def buffers_of(self, i: int) -> dict[str, Tensor] | None:
        if self.buffers is None:
            return None
        return {k: b[i].clone() for k, b in self.buffers.items()}

    def release(self) -> None:
        """Give every network its own copy of its weights and every seed its buffers back."""
        for i, s in enumerate(self.seeds):
            for p in s.run.net.parameters():
                p.data = p.data.clone()
            s.buffers = self.buffers_of(i)
        self.seeds = []


def _penalty(controllers: list[cc.SparsityController], stat: Tensor) -> Tensor:
    """Each seed's sparsity penalty, shape (S,), from ``stat (S, batch, gates)``."""
    first = controllers[0]
    if first.kind == "l1":
        stat = stat.abs()
    per_gate = stat.sum(1) if first.reduce == "sum" else stat.mean(1)  # (S, gates)
    lam = torch.tensor([c.lam for c in controllers], dtype=stat.dtype, device=stat.device)
    if first.kind == "l1":
        return lam * per_gate.abs().sum(-1)
    eps = 1e-7
    p = per_gate.clamp(eps, 1 - eps)
    s = first.target
    return -lam * (s * torch.log(p) + (1 - s) * torch.log1p(-p)).sum(-1)


class _Linear(torch.autograd.Function):
    """``x W^T + b`` for every seed at once: ``x (S, B, in)``, ``W (S, out, in)``, ``b (S, out)``.

    Forward ``torch.baddbmm``; backward ``grad W`` as ``bmm(grad^T, x)``. On CPU each seed's
    slice of these products then has the bits of the sequential ``nn.Linear`` (``addmm``) and
    its backward, at every layer shape of the network (measured; plain ``baddbmm`` autograd
    differs in the last bit for the 10-class output layer's weight gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.mT)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad, w) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.mT, x), grad.sum(1)


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    out = _Linear.apply(x, w, b)
    assert isinstance(out, Tensor)
    return out


def _forward(
    stack: _Stack, xb: Tensor, yb: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic pass of every seed: ``(nll (S, B), logits, gate logits, gates)``.

    The random numbers are drawn per seed, from its own state, by the calls of the sequential
    program in its order: the surrogate's per-particle integer, the pre-gate noise, one
    uniform per gate.
    """
    p = stack.params
    S, B = xb.shape[0], xb.shape[1]
    net0 = stack.seeds[0].run.net
    units = p["gater_out.weight"].shape[1]
    hidden = torch.tanh(_linear(xb, p["gater_hidden.weight"], p["gater_hidden.bias"]))
    a = _linear(hidden, p["gater_out.weight"], p["gater_out.bias"])
    h = _linear(xb, p["experts.weight"], p["experts.bias"])
    draws_u = _draws_uniforms(net0.estimator)
    noise: Any = net0._noise  # the same distribution object the sequential program samples
    noises, uniforms = [], []
    outer = capture_rng(device)
    for s in stack.seeds:
        _set_rng(s.rng, device)
        torch.randint(0, 2**62, ())  # the surrogate's per-particle seed
        if noise is not None:
            noises.append(noise.expand((B, units)).sample().to(device))
        if draws_u:
            uniforms.append(torch.rand((B, units), dtype=a.dtype, device=device))
        s.rng = capture_rng(device)
    _set_rng(outer, device)
    if noises:
        a = a + torch.stack(noises)
    if not bool(torch.isfinite(a.detach()).all()):
        ok = torch.isfinite(a.detach()).flatten(1).all(1).tolist()
        bad = [s.run.config.seed for s, fine in zip(stack.seeds, ok) if not fine]
        raise ValueError(f"gate logits of seed(s) {bad} are not finite (training diverged)")
    u = torch.stack(uniforms) if uniforms else None
    g = _gate_value(net0.estimator, a, u)  # (S, B, gates)
    logits = _linear(g * h, p["output.weight"], p["output.bias"])
    nll = nn.functional.cross_entropy(
        logits.reshape(S * B, -1), yb.reshape(-1), reduction="none"
    ).reshape(S, B)
    return nll, logits, a, g


def _step(stack: _Stack, lrs: dict[str, float], max_norm: float, output: bool) -> None:
    """SGD (as ``torch.optim.SGD``: no dampening or Nesterov) on every row, then max-norm."""
    with torch.no_grad():
        for k, param in stack.params.items():
            grad = param.grad
            assert grad is not None
            if stack.buffers is not None:
                buf = stack.buffers[k]
                buf.mul_(stack.momentum).add_(grad)
                grad = buf
            param.add_(grad, alpha=-lrs[k])
            param.grad = None
        names = ["gater_hidden.weight", "gater_out.weight", "experts.weight"]
        for k in names + (["output.weight"] if output else []):
            w = stack.params[k]
            norms = w.norm(dim=2, keepdim=True)  # (S, out, 1)
            w.mul_(torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0))


def _end_of_epoch(
    seed: _Seed,
    epoch: int,
    totals: list[float],
    seen: int,
    tensors: dict[str, Tensor],
    seconds: float,
    buffers: dict[str, Tensor] | None,
    device: torch.device,
) -> bool:
    """The sequential loop's end of epoch for one seed; returns whether the seed stops."""
    net, config, controller = seed.run.net, seed.run.config, seed.controller
    criterion = "valid_cost" if config.original else "valid_error"
    stateful = bool(getattr(net.estimator, "stateful", False))
    pass_chunk = config.batch_size if stateful else config.eval_chunk
    outer = capture_rng(device)
    _set_rng(seed.rng, device)
    start = time.perf_counter()
    net.eval()
    xs, ys, xv, yv, xt, yt = (tensors[k] for k in ("xs", "ys", "xv", "yv", "xt", "yt"))
    threshold = cc.tune_on(net, xv, config.density, config.eval_chunk)
    valid_error, valid_density = cc.evaluate(net, xv, yv, threshold, config.eval_chunk)
    row = {
        "epoch": epoch,
        "train_criterion": totals[0] / seen,
        "train_error": totals[1] / seen,
        "train_density": totals[2] / seen,
        "lambda": controller.lam if controller is not None else float("nan"),
        "valid_error": valid_error,
        "valid_density": valid_density,
        "threshold": threshold if threshold is not None else float("nan"),
    }
    if config.original:
        row["train_running_criterion"] = row["train_criterion"]
        row["train_criterion"], _ = cc.sampled_cost(net, xs, ys, pass_chunk)
        row["valid_cost"], row["valid_error_sampled"] = cc.sampled_cost(net, xv, yv, pass_chunk)
        row["test_error"], row["test_density"] = cc.evaluate(
            net, xt, yt, threshold, config.eval_chunk
        )
    seed.rng = capture_rng(device)
    _set_rng(outer, device)
    row["seconds"] = seconds + time.perf_counter() - start
    seed.history.append(row)
    if seed.run.on_epoch is not None:
        seed.run.on_epoch(row)
    if not math.isfinite(row["train_criterion"]):
        return True
    if row[criterion] < seed.best[criterion]:
        seed.best = {
            **row,
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "thr": threshold,
        }
    if seed.run.checkpoint is not None:
        _save(seed, epoch, buffers, device)
    return cc.early_stop([h[criterion] for h in seed.history], config.patience)


def _result(seed: _Seed, tensors: dict[str, Tensor], device: torch.device) -> cc.TrainResult:
    """The sequential trainer's final selection and test numbers for one seed."""
    net, config, history, best = seed.run.net, seed.run.config, seed.history, seed.best
    if "state" not in best:
        raise RuntimeError(
            f"seed {config.seed}: training diverged in the first epoch (history: {history})"
        )
    outer = capture_rng(device)
    _set_rng(seed.rng, device)
    xt, yt = tensors["xt"], tensors["yt"]
    net.load_state_dict(best["state"])
    net.eval()
    test_error, test_density = cc.evaluate(net, xt, yt, best["thr"], config.eval_chunk)
    stochastic_error, stochastic_density = cc.evaluate_stochastic(net, xt, yt, config.batch_size)
    top_k_error = (
        cc.evaluate_top_k(net, xt, yt, config.density, config.eval_chunk)
        if net.gate.thresholded
        else test_error
    )
    seed.rng = capture_rng(device)
    _set_rng(outer, device)
    return cc.TrainResult(
        best_epoch=int(best["epoch"]),
        train_criterion=best["train_criterion"],
        valid_error=best["valid_error"],
        test_error=test_error,
        valid_density=best["valid_density"],
        test_density=test_density,
        threshold=best["thr"],
        history=history,
        state_dict=best["state"],
        test_error_stochastic=stochastic_error,
        test_density_stochastic=stochastic_density,
        test_error_top_k=top_k_error,
        stop_epoch=int(history[-1]["epoch"]),
    )


def train_seeds(runs: Sequence[SeedRun], data: Any) -> list[cc.TrainResult]:
    """Train every :class:`SeedRun` of ``runs`` (one row, several seeds) together.

    Each seed gets the numbers of ``stochgrad.models.conditional.train(run.net, data,
    run.config, run.on_epoch, run.description, run.checkpoint, run.controller)`` started from
    the global random state ``run.rng`` (to float rounding of the matrix products), and the
    same checkpoint file after each epoch, from which either trainer goes on. Returns one
    :class:`~stochgrad.models.conditional.TrainResult` per run, in order. A log row's
    ``seconds`` is the seed's share of the batched epoch (its wall time over the seeds trained
    in it) plus its own evaluation. Torch's global random state is left as it was.
    """
    from tqdm.auto import tqdm

    runs = list(runs)
    _check_runs(runs)
    config = runs[0].config
    device = next(runs[0].net.parameters()).device
    xs, ys = data.train.x.to(device), data.train.y.to(device)
    xv, yv = data.valid.x.to(device), data.valid.y.to(device)
    xt, yt = data.test.x.to(device), data.test.y.to(device)
    n = xs.shape[0]
    if n == 0 or xv.shape[0] == 0:
        raise ValueError(f"need training and validation examples; got {n} and {xv.shape[0]}")
    steps = n // config.batch_size
    if steps == 0:
        raise ValueError(f"need at least batch_size={config.batch_size} training examples, got {n}")
    tensors = {"xs": xs, "ys": ys, "xv": xv, "yv": yv, "xt": xt, "yt": yt}
    criterion = "valid_cost" if config.original else "valid_error"
    seeds: list[_Seed] = []
    for r in runs:
        controller = r.controller if r.controller is not None else cc.make_controller(r.net, config)
        seed = _Seed(
            run=r,
            opt=cc.make_optimizer(r.net, r.config),
            controller=controller,
            order=torch.Generator().manual_seed(r.config.seed),
            rng={k: (v.clone() if v is not None else None) for k, v in r.rng.items()},
            best={criterion: math.inf},
        )
        if r.checkpoint is not None and Path(r.checkpoint).is_file():
            _load(seed, device)
        seeds.append(seed)
    groups = seeds[0].opt.param_groups
    momentum = float(groups[0]["momentum"])
    lrs = {k: float(groups[0]["lr"]) for k in _GATER} | {k: float(groups[1]["lr"]) for k in _REST}
    controllers_on = seeds[0].controller is not None
    if controllers_on and any(s.controller is None for s in seeds):
        raise ValueError("either every seed has a sparsity controller or none has")
    kinds = {
        (s.controller.kind, s.controller.reduce, s.controller.target) for s in seeds if s.controller
    }
    if len(kinds) > 1:
        raise ValueError(f"every seed's sparsity controller must be of one kind; got {kinds}")
    if any(s.run.net.estimator is seeds[0].run.net.estimator for s in seeds[1:]):
        raise ValueError("every SeedRun needs its own network (an estimator object is shared)")

    net0 = seeds[0].run.net
    kl = controllers_on and seeds[0].controller.kind == "kl"  # type: ignore[union-attr]
    stack: _Stack | None = None
    first = min((s.first for s in seeds), default=config.epochs + 1)
    for epoch in range(first, config.epochs + 1):
        # The seeds due this epoch (one resumed from a later checkpoint joins when due).
        members = [s for s in seeds if not s.done and s.first <= epoch]
        if not members:
            break
        if stack is None or [id(s) for s in stack.seeds] != [id(s) for s in members]:
            if stack is not None:
                stack.release()
            stack = _Stack(members, momentum)
        for s in stack.seeds:
            s.run.net.train()
        start = time.perf_counter()
        perms = torch.stack([torch.randperm(n, generator=s.order) for s in stack.seeds]).to(device)
        S = len(stack.seeds)
        sums = torch.zeros(S, 3, device=device)
        seen = steps * config.batch_size
        bar = tqdm(
            range(steps),
            desc=f"{runs[0].description or net0.gate.name} x{S} epoch {epoch}",
            leave=False,
            disable=not config.progress,
            mininterval=1.0,
        )
        for step in bar:
            idx = perms[:, step * config.batch_size : (step + 1) * config.batch_size]  # (S, B)
            xb, yb = xs[idx], ys[idx]  # (S, B, D), (S, B)
            nll, logits, a, g = _forward(stack, xb, yb, device)
            B = yb.shape[1]
            objective = nll.sum(1) / B  # (S,): the surrogate's loss over the batch size
            density = (g.detach() != 0).float().mean((1, 2))  # (S,)
            controllers = [s.controller for s in stack.seeds]
            if controllers_on:
                stat = net0.on_probability(a) if kl else g
                objective = objective + _penalty(controllers, stat)  # type: ignore[arg-type]
            objective.sum().backward()  # the seeds' objectives share no parameter
            _step(stack, lrs, config.max_norm, output=not config.original)
            with torch.no_grad():
                wrong = (logits.argmax(2) != yb).float().sum(1)
                sums += torch.stack([nll.sum(1), wrong, density * B], dim=1)
            if controllers_on:
                for c, d in zip(controllers, density.tolist()):
                    c.update(d)  # type: ignore[union-attr]
        share = (time.perf_counter() - start) / S
        totals = sums.tolist()
        for i, s in enumerate(stack.seeds):
            buffers = stack.buffers_of(i)
            if _end_of_epoch(s, epoch, totals[i], seen, tensors, share, buffers, device):
                s.done = True
    if stack is not None:
        stack.release()
    return [_result(s, tensors, device) for s in seeds]
