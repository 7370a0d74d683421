"""Throughput and peak memory of each estimator against a tight hand-written torch reference.

The reference for an estimator is the same estimator written directly for the toy objective
``sum_i (b_i - t)^2`` the way a careful engineer would write it for speed: one preallocated
``(draws, d)`` output, filled in chunks of rows small enough that a chunk's working arrays
stay in the L2 cache (:data:`CHUNK_BYTES`), in-place tensor operations on buffers allocated
once, and the derivative worked out by hand -- no Pyro, no autograd, no per-draw parameter
copies. On binary ``h`` the cost is linear, ``L(h) = (1 - 2t) sum_i h_i + d t^2``, and the
references use that wherever it holds (the estimators do not know it, which is the point of
the comparison: it is what hand-written code for this objective would do).

Every reference draws from the same distribution as its estimator with the same options (the
tests check the mean against the exact gradient or against ``estimate()``), but not from the
same random stream. A reference draws all the uniforms of a draw as one contiguous block of
a single ``torch.rand`` call per chunk, so its output does not depend on the chunk size.

Both sides make the same number of independent draws in one run, interleaved over repeats;
the table reports draws per second, ``time(stochgrad) / time(reference)`` (1.0 is parity,
2.0 twice as slow) and each side's peak resident-memory increase relative to the output size.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from stochgrad import estimators, models
from stochgrad.estimators.base import Rng

Reference = Callable[[Tensor, float, int, torch.Generator], Tensor]

#: Bytes of working arrays per chunk of rows (about the L2 cache of one core). Chosen by timing
#: the score-function, SPSA, Gumbel-Rao and REBAR references (3, 4, 24 and 8 arrays a row) at
#: dim 200, 100k draws, one thread, with 64 KiB, 256 KiB, 512 KiB, 1 MiB, 4 MiB and one chunk:
#: 256 KiB - 4 MiB were within 15% of each other for the first three and 1 MiB within 5% of
#: their best; 64 KiB (per-operation overhead on few rows) and one chunk (out of cache) were
#: 1.4-2x slower. REBAR kept improving up to 4 MiB (0.75 s against 0.88 s at 1 MiB).
CHUNK_BYTES = 1 << 20


def _chunks(
    n: int, d: int, arrays: float, chunk_bytes: int | None, size: int = 4
) -> Iterator[tuple[int, int]]:
    """``(start, rows)`` pairs covering ``n`` rows, ``arrays`` arrays of ``d`` values a row."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, int(budget // (arrays * d * size)))
    for start in range(0, n, rows):
        yield start, min(rows, n - start)


def _rows(n: int, d: int, arrays: float, chunk_bytes: int | None) -> int:
    return next(_chunks(n, d, arrays, chunk_bytes))[1]


def _consts(phi: Tensor, t: float) -> tuple[int, Tensor, Tensor, float, float]:
    """``d``, ``p``, ``1 - p``, the slope ``1 - 2t`` and the offset ``d t^2`` of ``L``."""
    p = torch.sigmoid(phi)
    return phi.numel(), p, 1 - p, 1.0 - 2.0 * t, phi.numel() * t * t


def ref_score_function(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    baseline: float | Tensor = 0.0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``(h - p) (L(h) - c)``; ``c`` a fixed scalar (moving average) or per-unit (optimal)."""
    d, p, _, a, off = _consts(phi, t)
    per_unit = isinstance(baseline, Tensor) and baseline.dim() > 0
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 3, chunk_bytes)
    buf = torch.empty(rows, d, dtype=phi.dtype)
    cost = torch.empty(rows, dtype=phi.dtype)
    shift = off if per_unit else off - float(baseline)
    for s, m in _chunks(n, d, 3, chunk_bytes):
        h = torch.rand(m, d, generator=g, dtype=phi.dtype, out=buf[:m]).lt_(p)
        c = torch.sum(h, 1, out=cost[:m]).mul_(a).add_(shift).unsqueeze(1)
        o = torch.sub(h, p, out=out[s : s + m])
        if per_unit:
            h.copy_(o).mul_(baseline)  # (h - p) c_j
            o.mul_(c).sub_(h)
        else:
            o.mul_(c)
    return out


def ref_leave_one_out(
    phi: Tensor, t: float, n: int, g: torch.Generator, chunk_bytes: int | None = None
) -> Tensor:
    """K = 2: ``mean_k (h_k - p)(L_k - L_other) = (h_1 - h_2)(L_1 - L_2) / 2``."""
    d, p, _, a, _ = _consts(phi, t)
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 3, chunk_bytes)
    buf = torch.empty(rows, 2, d, dtype=phi.dtype)
    diff = torch.empty(rows, dtype=phi.dtype)
    for s, m in _chunks(n, d, 3, chunk_bytes):
        h = torch.rand(m, 2, d, generator=g, dtype=phi.dtype, out=buf[:m]).lt_(p)
        o = torch.sub(h[:, 0], h[:, 1], out=out[s : s + m])
        o.mul_(torch.sum(o, 1, out=diff[:m]).mul_(0.5 * a).unsqueeze(1))
    return out


def ref_straight_through(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    variant: str = "identity",
    chunk_bytes: int | None = None,
) -> Tensor:
    """``dL/dh = 2 (h - t)``, times ``p (1 - p)`` for the sigmoid variant."""
    d, p, q, _, _ = _consts(phi, t)
    out = torch.empty(n, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, 1, chunk_bytes):
        o = torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m])
        o.lt_(p).sub_(t)
        if variant == "identity":
            o.mul_(2.0)
        else:
            o.mul_(2 * p * q)
    return out


def ref_sts(
    phi: Tensor, t: float, n: int, g: torch.Generator, chunk_bytes: int | None = None
) -> Tensor:
    """``h = b sqrt(p)``, ``b ~ Bernoulli(sqrt p)``: ``2 (h - t) b dsqrt(p)/da = b (s - t) s q``
    with ``s = sqrt(p)``."""
    d, p, q, _, _ = _consts(phi, t)
    sq = p.sqrt()
    slope = (sq - t) * sq * q
    out = torch.empty(n, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, 1, chunk_bytes):
        torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m]).lt_(sq).mul_(slope)
    return out


def ref_noisy_rectifier(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    scale: float = 1.0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Gaussian noise: ``2 (r - t) 1[r > 0]`` with ``r = a + scale sqrt(2) erfinv(2u - 1)``."""
    d = phi.numel()
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 1.25, chunk_bytes)
    off = torch.empty(rows, d, dtype=torch.bool)
    for s, m in _chunks(n, d, 1.25, chunk_bytes):
        o = torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m])
        o.mul_(2.0).sub_(1.0).erfinv_().mul_(math.sqrt(2.0) * scale).add_(phi)
        mask = torch.le(o, 0.0, out=off[:m])
        o.sub_(t).mul_(2.0).masked_fill_(mask, 0.0)
    return out


def ref_spsa(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    c: float = 0.1,
    chunk_bytes: int | None = None,
) -> Tensor:
    """One pair, Rademacher ``delta``, shared ``u``: ``(L+ - L-) / (2c) delta``.

    ``b+_j - b-_j = delta_j 1[sigmoid(a_j - c) <= u_j < sigmoid(a_j + c)]``."""
    d = phi.numel()
    a = 1.0 - 2.0 * t
    hi, lo = torch.sigmoid(phi + c), torch.sigmoid(phi - c)
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 4, chunk_bytes)
    buf = torch.empty(rows, 2, d, dtype=phi.dtype)
    work = torch.empty(rows, d, dtype=phi.dtype)
    total = torch.empty(rows, dtype=phi.dtype)
    for s, m in _chunks(n, d, 4, chunk_bytes):
        r = torch.rand(m, 2, d, generator=g, dtype=phi.dtype, out=buf[:m])
        delta, u = r[:, 0], r[:, 1]
        delta.lt_(0.5).mul_(2.0).sub_(1.0)
        w = work[:m]
        w.copy_(u).lt_(hi)
        w.sub_(u.lt_(lo)).mul_(delta)
        torch.sum(w, 1, out=total[:m]).mul_(a / (2 * c))
        torch.mul(delta, total[:m].unsqueeze(1), out=out[s : s + m])
    return out


def ref_node_perturbation(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    sigma: float = 0.1,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``(L(a + xi) - L(a)) xi / sigma^2`` with shared ``u``, ``xi = sigma sqrt2 erfinv(2v-1)``."""
    d, p, _, a, _ = _consts(phi, t)
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 4, chunk_bytes)
    buf = torch.empty(rows, 2, d, dtype=phi.dtype)
    work = torch.empty(rows, d, dtype=phi.dtype)
    total = torch.empty(rows, dtype=phi.dtype)
    for s, m in _chunks(n, d, 4, chunk_bytes):
        r = torch.rand(m, 2, d, generator=g, dtype=phi.dtype, out=buf[:m])
        u, xi = r[:, 0], r[:, 1]
        xi.mul_(2.0).sub_(1.0).erfinv_().mul_(math.sqrt(2.0) * sigma)
        w = torch.add(xi, phi, out=work[:m]).sigmoid_().gt_(u)  # 1[u < sigmoid(a + xi)]
        w.sub_(u.lt_(p))
        torch.sum(w, 1, out=total[:m]).mul_(a / sigma**2)
        torch.mul(xi, total[:m].unsqueeze(1), out=out[s : s + m])
    return out


def ref_finite_difference(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    eps: float = 0.1,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Central differences with one ``u`` shared by the ``2d`` evaluations of a draw: only
    unit ``j`` moves, so ``g_j = (1 - 2t) 1[s(a_j - eps) <= u_j < s(a_j + eps)] / (2 eps)``
    (``s`` the sigmoid)."""
    d = phi.numel()
    a = 1.0 - 2.0 * t
    hi, lo = torch.sigmoid(phi + eps), torch.sigmoid(phi - eps)
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 2, chunk_bytes)
    work = torch.empty(rows, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, 2, chunk_bytes):
        o = torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m])
        w = work[:m]
        w.copy_(o).lt_(lo)
        o.lt_(hi).sub_(w).mul_(a / (2 * eps))
    return out


def ref_exact(
    phi: Tensor, t: float, n: int, g: torch.Generator, chunk_bytes: int | None = None
) -> Tensor:
    """``sum_h q(h) L(h) (h - p)`` by enumerating the ``2^d`` configurations in chunks
    (float64 accumulation), then the same row for every draw."""
    d, p, _, _, _ = _consts(phi, t)
    if d > 24:
        raise ValueError(f"ref_exact enumerates 2^d configurations; d = {d} is too large")
    pp = p.double()
    logp, logq = pp.log(), (1 - pp).log()
    shifts = torch.arange(d)
    grad = torch.zeros(d, dtype=torch.float64)
    total = 2**d
    for s, m in _chunks(total, d, 4, chunk_bytes, size=8):
        bits = ((torch.arange(s, s + m).unsqueeze(1) >> shifts) & 1).to(torch.float64)
        w = torch.where(bits > 0, logp, logq).sum(1).exp_()
        w.mul_(bits.sum(1).mul_(1.0 - 2.0 * t).add_(d * t * t))
        grad.add_(torch.mv(bits.sub_(pp).T, w))
    out = torch.empty(n, d, dtype=phi.dtype)
    out.copy_(grad.to(phi.dtype).expand(n, d))
    return out


def ref_arm(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    disarm: bool = False,
    chunk_bytes: int | None = None,
) -> Tensor:
    """One antithetic pair per draw, ``b = 1[u < p]``, ``b~ = 1[u > 1 - p]``:
    ARM ``(L(b~) - L(b)) (u - 1/2)``; DisARM ``(L(b~) - L(b)) (b~ - b) sigmoid(|a|) / 2``."""
    d, p, q, a, _ = _consts(phi, t)
    sig_abs = torch.sigmoid(phi.abs())
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 2, chunk_bytes)
    work = torch.empty(rows, d, dtype=phi.dtype)
    total = torch.empty(rows, dtype=phi.dtype)
    for s, m in _chunks(n, d, 2, chunk_bytes):
        o = torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m])
        w = work[:m]
        w.copy_(o).gt_(q)  # b~
        if not disarm:
            tot = torch.sum(w, 1, out=total[:m])
            w.copy_(o).lt_(p)
            tot.sub_(w.sum(1)).mul_(a)
            o.sub_(0.5).mul_(tot.unsqueeze(1))
        else:
            w.sub_(o.lt_(p))  # b~ - b
            tot = torch.sum(w, 1, out=total[:m]).mul_(0.5 * a)
            torch.mul(w, sig_abs, out=o).mul_(tot.unsqueeze(1))
    return out


def ref_disarm(
    phi: Tensor, t: float, n: int, g: torch.Generator, chunk_bytes: int | None = None
) -> Tensor:
    return ref_arm(phi, t, n, g, disarm=True, chunk_bytes=chunk_bytes)


def ref_gumbel_softmax(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    tau: float = 0.5,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Straight-through Gumbel-softmax: hard ``b`` forward, ``2 (b - t) z (1 - z) / tau``
    with ``z = sigmoid((a + log(1 - u) - log u) / tau)`` backward."""
    d, p, _, _, _ = _consts(phi, t)
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, 3, chunk_bytes)
    ubuf = torch.empty(rows, d, dtype=phi.dtype)
    zbuf = torch.empty(rows, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, 3, chunk_bytes):
        u = torch.rand(m, d, generator=g, dtype=phi.dtype, out=ubuf[:m])
        o = out[s : s + m]
        o.copy_(u).lt_(p).sub_(t).mul_(2.0 / tau)
        z = torch.neg(u, out=zbuf[:m]).log1p_().sub_(u.log_()).add_(phi).div_(tau).sigmoid_()
        o.mul_(z)
        o.mul_(z.neg_().add_(1.0))
    return out


def ref_reinmax(
    phi: Tensor, t: float, n: int, g: torch.Generator, chunk_bytes: int | None = None
) -> Tensor:
    """Temperature 1: ``2 (b - t)(2 q(1 - q) - p(1 - p)/2)``, ``q = (b + p)/2``, which takes one
    value per unit for ``b = 1`` and another for ``b = 0``."""
    d, p, q, _, _ = _consts(phi, t)
    half = p * q / 2
    on = 2 * (1 - t) * ((1 + p) * q / 2 - half)
    off = -2 * t * (p * (2 - p) / 2 - half)
    step = on - off
    out = torch.empty(n, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, 1, chunk_bytes):
        torch.rand(m, d, generator=g, dtype=phi.dtype, out=out[s : s + m]).lt_(p).mul_(step).add_(
            off
        )
    return out


def ref_gumbel_rao(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    k: int = 10,
    tau: float = 0.5,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``2 (b - t) mean_k z_k (1 - z_k) / tau`` over ``k`` logistic noises drawn given ``b``
    (``v ~ U(0, p)`` if ``b = 1``, ``U(p, 1)`` otherwise)."""
    d, p, q, _, _ = _consts(phi, t)
    arrays = 2 * k + 4
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, arrays, chunk_bytes)
    buf = torch.empty(rows, k + 1, d, dtype=phi.dtype)
    zbuf = torch.empty(rows, k, d, dtype=phi.dtype)
    sc = torch.empty(rows, d, dtype=phi.dtype)
    sh = torch.empty(rows, d, dtype=phi.dtype)
    for s, m in _chunks(n, d, arrays, chunk_bytes):
        r = torch.rand(m, k + 1, d, generator=g, dtype=phi.dtype, out=buf[:m])
        b, v = r[:, 0].lt_(p), r[:, 1:]
        scale = torch.mul(b, p - q, out=sc[:m]).add_(q)  # p if b else q
        shift = torch.mul(b, p, out=sh[:m]).neg_().add_(p)  # 0 if b else p
        v.mul_(scale.unsqueeze(1)).add_(shift.unsqueeze(1))
        z = torch.neg(v, out=zbuf[:m]).log1p_().sub_(v.log_()).add_(phi).div_(tau).sigmoid_()
        v.copy_(z).neg_().add_(1.0).mul_(z)
        o = torch.sum(v, 1, out=out[s : s + m])
        o.mul_(b.sub_(t)).mul_(2.0 / (tau * k))
    return out


def ref_rebar(
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    lam: float = 0.5,
    eta: float = 1.0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """REBAR at fixed temperature and eta: closed-form f, f' and dz~/da (no autograd)."""
    d, p, q, a, off = _consts(phi, t)
    arrays = 8
    out = torch.empty(n, d, dtype=phi.dtype)
    rows = _rows(n, d, arrays, chunk_bytes)
    buf = torch.empty(rows, 2, d, dtype=phi.dtype)
    bufs = [torch.empty(rows, d, dtype=phi.dtype) for _ in range(4)]
    fb, fst = torch.empty(rows, dtype=phi.dtype), torch.empty(rows, dtype=phi.dtype)
    for s, m in _chunks(n, d, arrays, chunk_bytes):
        r = torch.rand(m, 2, d, generator=g, dtype=phi.dtype, out=buf[:m]).clamp_min_(1e-30)
        u, ut = r[:, 0], r[:, 1]
        b, x, y, w = (t_[:m] for t_ in bufs)
        b.copy_(u).lt_(p)
        # u~ = v p if b else p + v q
        ut.mul_(torch.mul(b, p - q, out=x).add_(q)).add_(torch.mul(b, p, out=y).neg_().add_(p))
        # dz~/da = 1 - q / (1 - u~) if b else 1 - p / u~
        den = torch.mul(ut, -2.0, out=x).add_(1.0).mul_(b).add_(ut)
        dzt = torch.mul(b, q - p, out=y).add_(p).div_(den).neg_().add_(1.0)
        sig = torch.neg(u, out=x).log1p_().sub_(u.log_()).add_(phi).div_(lam).sigmoid_()
        st = torch.neg(ut, out=u).log1p_().sub_(ut.log_()).add_(phi).div_(lam).sigmoid_()
        stt = torch.sub(st, t, out=w)
        f_b = torch.sum(b, 1, out=fb[:m]).mul_(a).add_(off)
        f_st = torch.linalg.vector_norm(stt, dim=1, out=fst[:m]).square_()
        signal = f_b.sub_(f_st, alpha=eta).unsqueeze(1)
        o = torch.sub(b, p, out=out[s : s + m]).mul_(signal)
        dst = dzt.mul_(stt).mul_(st)
        dst.mul_(st.neg_().add_(1.0))  # (st - t) st (1 - st) dz~/da
        ds = torch.sub(sig, t, out=w).mul_(sig)
        ds.mul_(sig.neg_().add_(1.0))  # (s - t) s (1 - s)
        o.add_(ds.sub_(dst), alpha=2.0 * eta / lam)
    return out


def ref_relax(
    est: estimators.Estimator,
    phi: Tensor,
    t: float,
    n: int,
    g: torch.Generator,
    chunk_bytes: int | None = None,
) -> Tensor:
    """RELAX at ``est``'s trained state (``lambda``, ``eta``, a one-hidden-layer network):
    closed-form f, f', dz~/da and the network's input gradient, no autograd, in chunks, in
    place where the values are not needed again."""
    state = est.state_dict()
    lam, eta = float(state["log_temperature"].exp()), float(state["eta"])
    w1, c1, w2, c2 = (w.to(phi.dtype) for w in state["net"])
    w2v, w1t = w2[:, 0].contiguous(), w1.T.contiguous()
    d = phi.numel()
    p = torch.sigmoid(phi)
    q = 1 - p
    out = torch.empty(n, d, dtype=phi.dtype)
    arrays = 10

    def network(x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.addmm(c1, x, w1).tanh_()  # (m, hidden)
        r = torch.mv(h, w2v).add_(c2)
        dr = torch.mm(h.square_().neg_().add_(1).mul_(w2v), w1t)  # dr/dx, (m, d)
        return r, dr

    for start, m in _chunks(n, d, arrays, chunk_bytes):
        r = torch.rand(m, 2, d, generator=g, dtype=phi.dtype).clamp_min_(1e-30)
        u, v = r[:, 0], r[:, 1]
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


def score_baseline(est: Any) -> float | Tensor:
    """The baseline a score-function estimator's next batch uses (after its warm-up)."""
    state = est.state_dict()
    if getattr(est, "baseline", "none") == "moving_average":
        return float(state["mean"]) if "mean" in state else 0.0
    if getattr(est, "baseline", "none") == "optimal":
        s = state.get("b")
        if s is None:
            return 0.0
        return s["num"] / s["den"].clamp_min(torch.finfo(s["den"].dtype).tiny)
    return 0.0


def _fixed(ref: Callable[..., Tensor]) -> Callable[[Any], Reference]:
    return lambda est: ref


def _with_baseline(est: Any) -> Reference:
    return partial(ref_score_function, baseline=score_baseline(est))


def _relax(est: Any) -> Reference:
    return partial(ref_relax, est)


@dataclass
class Case:
    """One estimator (built by ``make``) and its reference (built from the estimator after
    its warm-up, for the references that read its state)."""

    label: str
    make: Callable[[], estimators.Estimator]
    reference: Callable[[Any], Reference]
    dim_rule: Callable[[int], int] = lambda d: d
    draw_rule: Callable[[int], int] = lambda n: n


def all_cases() -> list[Case]:
    get = estimators.get
    return [
        Case("score_function", lambda: get("score_function"), _fixed(ref_score_function)),
        Case(
            "score_function[moving_average]",
            lambda: get("score_function", baseline="moving_average"),
            _with_baseline,
        ),
        Case(
            "score_function[optimal]",
            lambda: get("score_function", baseline="optimal"),
            _with_baseline,
        ),
        Case(
            "score_function[leave_one_out,K=2]",
            lambda: get("score_function", baseline="leave_one_out", num_samples=2),
            _fixed(ref_leave_one_out),
        ),
        Case("straight_through", lambda: get("straight_through"), _fixed(ref_straight_through)),
        Case(
            "straight_through[sigmoid]",
            lambda: get("straight_through", variant="sigmoid"),
            _fixed(partial(ref_straight_through, variant="sigmoid")),
        ),
        Case("sts", lambda: get("sts"), _fixed(ref_sts)),
        Case("rebar[fixed]", lambda: get("rebar", adapt=False), _fixed(ref_rebar)),
        Case("noisy_rectifier", lambda: get("noisy_rectifier"), _fixed(ref_noisy_rectifier)),
        Case("spsa", lambda: get("spsa"), _fixed(ref_spsa)),
        Case("node_perturbation", lambda: get("node_perturbation"), _fixed(ref_node_perturbation)),
        Case(
            "finite_difference",
            lambda: get("finite_difference"),
            _fixed(ref_finite_difference),
            draw_rule=lambda n: max(1, n // 100),
        ),
        Case("exact", lambda: get("exact"), _fixed(ref_exact), dim_rule=lambda d: min(d, 12)),
        Case("arm", lambda: get("arm"), _fixed(ref_arm)),
        Case("disarm", lambda: get("disarm"), _fixed(ref_disarm)),
        Case("gumbel_softmax", lambda: get("gumbel_softmax"), _fixed(ref_gumbel_softmax)),
        Case("reinmax", lambda: get("reinmax"), _fixed(ref_reinmax)),
        Case("gumbel_rao", lambda: get("gumbel_rao"), _fixed(ref_gumbel_rao)),
        Case("relax", lambda: get("relax"), _relax),
    ]


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """The cases whose label starts with one of ``only`` (all when ``None``)."""
    if not only:
        return cases
    kept = [c for c in cases if any(c.label.startswith(o) for o in only)]
    if not kept:
        raise ValueError(f"no estimator label starts with {' or '.join(only)}")
    return kept


# -- measurement ---------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that memory a
    previous measurement freed is not reused unseen by the next one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_increase(fn: Callable[[], object]) -> tuple[float, int | None]:
    """``(seconds, bytes)``: run ``fn`` once; the peak resident size during the call above the
    resident size before it (``None`` where ``/proc`` does not allow the reset).

    Freed heap memory is first returned to the OS (``malloc_trim``), then the kernel's
    high-water mark is reset and read after the call, so no peak is missed (a sampling thread
    would miss short ones) and the output itself counts. Resolution is a page; memory the
    allocator keeps resident despite the trim (small blocks) goes unseen, so figures for
    outputs of a few MiB or less read low."""
    gc.collect()
    _trim_heap()
    before = _status_kb("VmRSS")
    ok = _reset_peak() and before is not None
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    peak = _status_kb("VmHWM") if ok else None
    del result
    if peak is None or before is None:
        return elapsed, None
    return elapsed, max(0, peak - before) * 1024


def machine() -> str:
    """CPU model, cores, torch version and thread count, one line."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores{load}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def run(
    cases: list[Case],
    dims: list[int] = (200,),  # type: ignore[assignment]
    draws: list[int] = (100_000,),  # type: ignore[assignment]
    repeats: int = 3,
    target: float = 0.45,
    memory_budget: int = 1 << 30,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Time every case on every (dim, draws) cell and return one row per cell.

    Each repeat times ``estimate()`` and then the reference (interleaved, so that a change
    in the machine's load hits both); the minimum time over repeats is kept, and the largest
    peak-memory increase. A cell whose ``(draws, dim)`` float32 output would
    exceed ``memory_budget`` bytes is returned with ``skipped`` set, not run."""
    rows: list[dict[str, object]] = []
    seen: set[tuple[str, int, int]] = set()
    for case in cases:
        for dim0 in dims:
            for n0 in draws:
                dim, n = case.dim_rule(dim0), case.draw_rule(n0)
                if (case.label, dim, n) in seen:
                    continue
                seen.add((case.label, dim, n))
                row: dict[str, object] = {"estimator": case.label, "dim": dim, "draws": n}
                out_bytes = 4 * n * dim
                if out_bytes > memory_budget:
                    row["skipped"] = (
                        f"output {out_bytes / 2**20:,.0f} MiB > budget "
                        f"{memory_budget / 2**20:,.0f} MiB"
                    )
                    rows.append(row)
                    if log:
                        log(f"skip {case.label} dim {dim} draws {n}: {row['skipped']}")
                    continue
                row.update(_measure(case, dim, n, repeats, target, out_bytes))
                rows.append(row)
                if log:
                    log(f"done {case.label} dim {dim} draws {n}: ratio {row['ratio']:.2f}")
    return rows


def _measure(
    case: Case, dim: int, n: int, repeats: int, target: float, out_bytes: int
) -> dict[str, object]:
    obj = models.get("toy", dim=dim, target=target)
    phi = obj.params["logits"].detach()
    est = case.make()
    est.estimate(obj, min(n, 1000), seed=0)  # warm-up of the code paths
    stateful = _stateful(est)
    warm = math.inf
    if stateful:
        for _ in range(repeats):
            start = time.perf_counter()
            est.warmup(obj, Rng(1))
            warm = min(warm, time.perf_counter() - start)
    else:
        est.warmup(obj, Rng(1))
        warm = 0.0
    reference = case.reference(est)  # reads the state the warm-up left, where it needs it
    reference(phi, target, min(n, 1000), torch.Generator().manual_seed(0))
    ours, ref = math.inf, math.inf
    mem_ours: int | None = None
    mem_ref: int | None = None
    for i in range(repeats):
        t_ours, m_ours = peak_rss_increase(partial(est.estimate, obj, n, seed=1))
        gen = torch.Generator().manual_seed(i)
        t_ref, m_ref = peak_rss_increase(partial(reference, phi, target, n, gen))
        ours, ref = min(ours, t_ours - warm), min(ref, t_ref)
        if m_ours is not None:
            mem_ours = max(mem_ours or 0, m_ours)
        if m_ref is not None:
            mem_ref = max(mem_ref or 0, m_ref)
    ours = max(ours, 1e-12)
    return {
        "stochgrad_draws_per_s": n / ours,
        "reference_draws_per_s": n / ref,
        "ratio": ours / ref,
        "warmup_s": warm,
        "output_bytes": out_bytes,
        "stochgrad_peak_x": None if mem_ours is None else mem_ours / out_bytes,
        "reference_peak_x": None if mem_ref is None else mem_ref / out_bytes,
    }


def _stateful(est: Any) -> bool:
    """Whether ``est`` has a warm-up (its own ``warmup``, run by every ``estimate`` call)."""
    return type(est).warmup is not estimators.base.Estimator.warmup


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as text. ``ours draws/s`` excludes the per-call warm-up (``warm-up ms``);
    ``peak/out`` is the peak resident-memory increase of a call over its output's size."""
    head = (
        f"{'estimator':34} {'dim':>5} {'draws':>8} {'ours draws/s':>13} {'ref draws/s':>13} "
        f"{'ratio':>6} {'warm-up ms':>10} {'ours peak/out':>13} {'ref peak/out':>12}"
    )
    lines = [head, "-" * len(head)]

    def x(v: object) -> str:
        return "n/a" if v is None else f"{float(v):.2f}"  # type: ignore[arg-type]

    for r in rows:
        lead = f"{r['estimator']!s:34} {r['dim']:>5} {r['draws']:>8}"
        if "skipped" in r:
            lines.append(f"{lead} skipped: {r['skipped']}")
            continue
        warm = float(r.get("warmup_s", 0.0))  # type: ignore[arg-type]
        lines.append(
            f"{lead} {r['stochgrad_draws_per_s']:>13,.0f} {r['reference_draws_per_s']:>13,.0f} "
            f"{r['ratio']:>6.2f} {1e3 * warm:>10.1f} {x(r.get('stochgrad_peak_x')):>13} "
            f"{x(r.get('reference_peak_x')):>12}"
        )
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    """The options shared by ``stochgrad bench`` and ``scripts/bench_estimators.py``."""
    from .cli import bench_arguments

    bench_arguments(parser)


def main_from_args(args: Any, out: Callable[[str], None] = print) -> int:
    """Run the grid the parsed ``args`` ask for and print the machine and the table."""
    for name in ("dims", "draws"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise ValueError(f"--{name} must be positive integers, got {bad}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be a positive integer, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    cases = select(all_cases(), args.only)
    out(machine())
    out(
        f"min of {args.repeats} repeats, stochgrad and reference interleaved; chunks of "
        f"{CHUNK_BYTES // 1024} KiB of working arrays in the references; memory budget "
        f"{args.memory_budget:,.0f} MiB of output"
    )
    rows = run(
        cases,
        dims=args.dims,
        draws=args.draws,
        repeats=args.repeats,
        memory_budget=int(args.memory_budget * 2**20),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    out(format_table(rows))
    return 0
