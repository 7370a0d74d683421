"""Throughput of each estimator against a hand-written vectorised torch reference.

The reference for an estimator is the same estimator written directly for the toy objective
``sum_i (b_i - t)^2`` with plain tensor operations and the derivative worked out by hand --
no Pyro, no autograd, no per-draw parameter copies. Both sides make the same number of
independent draws in one run; the table reports draws per second and the ratio
``time(stochgrad) / time(reference)`` (so 1.0 means parity, 2.0 means twice as slow).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from stochgrad import estimators, models
from stochgrad.estimators.base import Rng

Reference = Callable[[Tensor, float, int, torch.Generator], Tensor]


def _bern(phi: Tensor, u: Tensor) -> Tensor:
    return (u < torch.sigmoid(phi)).to(u.dtype)


def _loss(h: Tensor, t: float) -> Tensor:
    return ((h - t) ** 2).sum(-1)


def ref_score_function(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    h = (torch.rand(n, phi.numel(), generator=g) < p).to(phi.dtype)  # (draws, d)
    return (h - p) * _loss(h, t).unsqueeze(1)


def ref_moving_average(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    h = (torch.rand(n, phi.numel(), generator=g) < p).to(phi.dtype)
    cost = _loss(h, t)
    baseline = 0.5 * phi.numel() * (t**2 + (1 - t) ** 2)  # a fixed earlier value
    return (h - p) * (cost - baseline).unsqueeze(1)


def ref_optimal(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    h = (torch.rand(n, phi.numel(), generator=g) < p).to(phi.dtype)
    cost = _loss(h, t).unsqueeze(1)
    sq = (h - p) ** 2
    baseline = torch.full_like(phi, 0.5 * phi.numel() * (t**2 + (1 - t) ** 2))
    est = (h - p) * (cost - baseline)
    # the online EMA update the estimator also performs
    _ = (sq * cost).mean(0) / sq.mean(0)
    return est


def ref_leave_one_out(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    h = (torch.rand(n, 2, phi.numel(), generator=g) < p).to(phi.dtype)  # (draws, K, d)
    cost = _loss(h, t)  # (draws, K)
    others = cost.flip(1)
    return ((h - p) * (cost - others).unsqueeze(-1)).mean(1)


def ref_straight_through(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    h = _bern(phi, torch.rand(n, phi.numel(), generator=g))
    return 2 * (h - t)


def ref_sts(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    s = p.sqrt()
    b = (torch.rand(n, phi.numel(), generator=g) < s).to(phi.dtype)
    h = b * s
    return 2 * (h - t) * b * 0.5 * s * (1 - p)  # d sqrt(p)/dphi = sqrt(p)(1-p)/2


def ref_noisy_rectifier(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    u = torch.rand(n, phi.numel(), generator=g)
    z = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    pre = phi + z
    return 2 * (torch.relu(pre) - t) * (pre > 0).to(phi.dtype)


def ref_spsa(phi: Tensor, t: float, n: int, g: torch.Generator, c: float = 0.1) -> Tensor:
    d = phi.numel()
    delta = 2.0 * torch.randint(0, 2, (n, d), generator=g).to(phi.dtype) - 1
    u = torch.rand(n, d, generator=g)
    plus = _loss(_bern(phi + c * delta, u), t)
    minus = _loss(_bern(phi - c * delta, u), t)
    return ((plus - minus) / (2 * c)).unsqueeze(1) * delta


def ref_finite_difference(
    phi: Tensor, t: float, n: int, g: torch.Generator, eps: float = 0.1
) -> Tensor:
    d = phi.numel()
    u = torch.rand(n, 1, 1, d, generator=g)  # shared by the 2d evaluations of a draw
    steps = eps * torch.eye(d, dtype=phi.dtype)
    points = phi + torch.tensor([1.0, -1.0]).view(2, 1, 1, 1) * steps  # (2, 1, d, d)
    cost = _loss(_bern(points.unsqueeze(1), u.unsqueeze(0)).squeeze(2), t)  # (2, n, d)
    return (cost[0] - cost[1]) / (2 * eps)


def ref_node_perturbation(
    phi: Tensor, t: float, n: int, g: torch.Generator, sigma: float = 0.1
) -> Tensor:
    d = phi.numel()
    u = torch.rand(n, d, generator=g)
    xi = sigma * torch.randn(n, d, generator=g)
    c0 = _loss(_bern(phi, u), t)
    c1 = _loss(_bern(phi + xi, u), t)
    return ((c1 - c0) / sigma**2).unsqueeze(1) * xi


def ref_exact(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    d = phi.numel()
    bits = ((torch.arange(2**d).unsqueeze(1) >> torch.arange(d)) & 1).to(phi.dtype)
    p = torch.sigmoid(phi)
    w = torch.where(bits > 0, p, 1 - p).prod(1)  # (2^d,)
    cost = _loss(bits, t)
    grad = (w.unsqueeze(1) * cost.unsqueeze(1) * (bits - p)).sum(0)  # sum_h q(h) L(h) (h-p)
    return grad.expand(n, d).clone()


def ref_arm(phi: Tensor, t: float, n: int, g: torch.Generator, disarm: bool = False) -> Tensor:
    # one pair per draw; on the toy (b - t)^2 = b (1 - 2t) + t^2, so f(b~) - f(b) is
    # (1 - 2t) sum_i (b~_i - b_i)
    u = torch.rand(n, phi.numel(), generator=g)
    p = torch.sigmoid(phi)
    b, bt = _bern(phi, u), (1 - u < p).to(phi.dtype)
    diff = ((1 - 2 * t) * (bt - b).sum(1)).unsqueeze(1)
    if not disarm:
        return diff * (u - 0.5)
    return -0.5 * diff * (1 - 2 * bt) * (b != bt).to(phi.dtype) * torch.sigmoid(phi.abs())


def ref_disarm(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    return ref_arm(phi, t, n, g, disarm=True)


def ref_gumbel_softmax(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    tau = 0.5
    u = torch.rand(n, phi.numel(), generator=g)
    z = torch.sigmoid((phi + torch.log1p(-u) - torch.log(u)) / tau)
    return 2 * (_bern(phi, u) - t) * z * (1 - z) / tau


def ref_reinmax(phi: Tensor, t: float, n: int, g: torch.Generator) -> Tensor:
    p = torch.sigmoid(phi)
    b = _bern(phi, torch.rand(n, phi.numel(), generator=g))
    q = (b + p) / 2  # temperature 1
    return 2 * (b - t) * (2 * q * (1 - q) - p * (1 - p) / 2)


def ref_gumbel_rao(phi: Tensor, t: float, n: int, g: torch.Generator, k: int = 10) -> Tensor:
    tau = 0.5
    p = torch.sigmoid(phi)
    b = _bern(phi, torch.rand(n, phi.numel(), generator=g))
    raw = torch.rand(k, n, phi.numel(), generator=g)
    v = torch.where(b > 0, raw * p, p + raw * (1 - p))
    z = torch.sigmoid((phi + torch.log1p(-v) - torch.log(v)) / tau)
    return 2 * (b - t) * (z * (1 - z)).mean(0) / tau


def ref_rebar(
    phi: Tensor, t: float, n: int, g: torch.Generator, lam: float = 0.5, eta: float = 1.0
) -> Tensor:
    """REBAR at fixed temperature and eta: closed-form f, f' and dz~/da (no autograd)."""
    d = phi.numel()
    p = torch.sigmoid(phi)
    u = torch.rand(n, d, generator=g, dtype=phi.dtype).clamp_min(1e-30)
    v = torch.rand(n, d, generator=g, dtype=phi.dtype).clamp_min(1e-30)
    b = (u < p).to(phi.dtype)
    z = phi + torch.log1p(-u) - torch.log(u)
    ut = torch.where(b > 0, v * p, p + v * (1 - p))
    zt = phi + torch.log1p(-ut) - torch.log(ut)
    dzt = torch.where(b > 0, 1 - (1 - p) / (1 - ut), 1 - p / ut)
    s, st = torch.sigmoid(z / lam), torch.sigmoid(zt / lam)
    f_b, f_st = _loss(b, t), _loss(st, t)
    ds = 2 * (s - t) * s * (1 - s) / lam
    dst = 2 * (st - t) * st * (1 - st) / lam * dzt
    return (f_b - eta * f_st).unsqueeze(1) * (b - p) + eta * (ds - dst)


def ref_relax(
    est: estimators.Estimator, phi: Tensor, t: float, n: int, g: torch.Generator
) -> Tensor:
    """RELAX at ``est``'s trained state (``lambda``, ``eta``, a one-hidden-layer network):
    closed-form f, f', dz~/da and the network's input gradient, no autograd; chunks of about
    32k elements per array, in place where the values are not needed again."""
    state = est.state_dict()
    lam, eta = float(state["log_temperature"].exp()), float(state["eta"])
    w1, c1, w2, c2 = (w.to(phi.dtype) for w in state["net"])
    w2v, w1t = w2[:, 0].contiguous(), w1.T.contiguous()
    d = phi.numel()
    p = torch.sigmoid(phi)
    q = 1 - p
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = max(1, 2**15 // d)

    def network(x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.addmm(c1, x, w1).tanh_()  # (m, hidden)
        r = torch.mv(h, w2v).add_(c2)
        dr = torch.mm(h.square_().neg_().add_(1).mul_(w2v), w1t)  # dr/dx, (m, d)
        return r, dr

    for start in range(0, n, rows):
        m = min(rows, n - start)
        u = torch.rand(m, d, generator=g, dtype=phi.dtype).clamp_min_(1e-30)
        v = torch.rand(m, d, generator=g, dtype=phi.dtype).clamp_min_(1e-30)
        on = u < p
        b = on.to(phi.dtype)
        ut = torch.where(on, v * p, torch.addcmul(p, v, q))
        dzt = torch.where(on, 1 - q / (1 - ut), 1 - p / ut)
        s = torch.log1p(-u).sub_(u.log_()).add_(phi).div_(lam).sigmoid_()
        st = torch.log1p(-ut).sub_(ut.log_()).add_(phi).div_(lam).sigmoid_()
        r_st, dr_st = network(st)
        _, dr_s = network(s)
        f_b = (b - t).square_().sum(1)
        signal = f_b.sub_((st - t).square_().sum(1), alpha=eta).sub_(r_st)
        ds = s * (1 - s) / lam
        dst = (st * (1 - st) / lam).mul_(dzt)
        o = out[start : start + m]
        torch.mul(b.sub_(p), signal.unsqueeze(1), out=o)
        o.addcmul_(ds, s.sub_(t).mul_(2 * eta).add_(dr_s))
        o.addcmul_(dst, st.sub_(t).mul_(2 * eta).add_(dr_st), value=-1)
    return out


@dataclass
class Case:
    label: str
    estimator: estimators.Estimator
    reference: Reference
    draws: int
    dim: int


def default_cases(draws: int = 100_000, dim: int = 200) -> list[Case]:
    get = estimators.get
    relax = get("relax")  # the reference reads its trained state
    return [
        Case("score_function", get("score_function"), ref_score_function, draws, dim),
        Case(
            "score_function[moving_average]",
            get("score_function", baseline="moving_average"),
            ref_moving_average,
            draws,
            dim,
        ),
        Case(
            "score_function[optimal]",
            get("score_function", baseline="optimal"),
            ref_optimal,
            draws,
            dim,
        ),
        Case(
            "score_function[leave_one_out,K=2]",
            get("score_function", baseline="leave_one_out", num_samples=2),
            ref_leave_one_out,
            draws,
            dim,
        ),
        Case("straight_through", get("straight_through"), ref_straight_through, draws, dim),
        Case("sts", get("sts"), ref_sts, draws, dim),
        Case("rebar[fixed]", get("rebar", adapt=False), ref_rebar, draws, dim),
        Case("noisy_rectifier", get("noisy_rectifier"), ref_noisy_rectifier, draws, dim),
        Case("spsa", get("spsa"), ref_spsa, draws, dim),
        Case("node_perturbation", get("node_perturbation"), ref_node_perturbation, draws, dim),
        Case(
            "finite_difference",
            get("finite_difference"),
            ref_finite_difference,
            max(1, draws // 100),
            dim,
        ),
        Case("exact (toy dim 12)", get("exact"), ref_exact, draws, 12),
        Case("arm", get("arm"), ref_arm, draws, dim),
        Case("disarm", get("disarm"), ref_disarm, draws, dim),
        Case("gumbel_softmax", get("gumbel_softmax"), ref_gumbel_softmax, draws, dim),
        Case("reinmax", get("reinmax"), ref_reinmax, draws, dim),
        Case("gumbel_rao", get("gumbel_rao"), ref_gumbel_rao, draws, dim),
        Case("relax", relax, partial(ref_relax, relax), draws, dim),
    ]


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(cases: list[Case], repeats: int = 3, target: float = 0.45) -> list[dict[str, object]]:
    """Time every case (best of ``repeats``) and return one row per estimator."""
    rows = []
    for case in cases:
        obj = models.get("toy", dim=case.dim, target=target)
        phi = obj.params["logits"].detach()
        est = case.estimator
        est.estimate(obj, min(case.draws, 1000), seed=0)  # warm-up (and baseline state)
        gen = torch.Generator().manual_seed(0)
        total = _best_time(partial(est.estimate, obj, case.draws, seed=1), repeats)
        # the fixed cost of a call: a stateful baseline's warm-up, run afresh by every call
        warm = _best_time(partial(est.warmup, obj, Rng(1)), repeats) if _stateful(est) else 0.0
        ours = max(total - warm, 1e-12)
        ref = _best_time(partial(case.reference, phi, target, case.draws, gen), repeats)
        rows.append(
            {
                "estimator": case.label,
                "dim": case.dim,
                "draws": case.draws,
                "stochgrad_draws_per_s": case.draws / ours,
                "reference_draws_per_s": case.draws / ref,
                "ratio": ours / ref,
                "warmup_s": warm,
            }
        )
    return rows


def _stateful(est: Any) -> bool:
    """Whether ``est`` has a warm-up (its own ``warmup``, run by every ``estimate`` call)."""
    return type(est).warmup is not estimators.base.Estimator.warmup


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as text. ``ours draws/s`` excludes the per-call warm-up (``warm-up ms``)."""
    head = f"{'estimator':36} {'dim':>4} {'draws':>8} {'ours draws/s':>14} {'ref draws/s':>14}"
    lines = [head + f" {'ratio':>6} {'warm-up ms':>10}", "-" * (len(head) + 18)]
    for r in rows:
        warm = float(r.get("warmup_s", 0.0))  # type: ignore[arg-type]
        lines.append(
            f"{r['estimator']!s:36} {r['dim']:>4} {r['draws']:>8} "
            f"{r['stochgrad_draws_per_s']:>14,.0f} {r['reference_draws_per_s']:>14,.0f} "
            f"{r['ratio']:>6.2f} {1e3 * warm:>10.1f}"
        )
    return "\n".join(lines)
