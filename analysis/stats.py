"""Statistics of per-draw gradient estimates, streamed in float64.

Every estimator returns per-draw estimates ``g_1 .. g_N`` of a true gradient ``g*``; here a
parameter is flattened to ``d`` coordinates, so draws arrive as tensors of shape ``(n, d)``,
chunk after chunk. With ``s_i^2`` the per-coordinate sample variance (denominator ``N - 1``)::

    mean_i        = (1/N) sum_n g_ni
    floor         = sqrt(tr(Sigma_hat)/N + ||r||^2)   (bias_noise_floor; tr Sigma_hat = sum_i s_i^2)
    bias_l2       = sqrt(max(0, ||mean - g*||^2 - floor^2))   rel_bias = bias_l2 / ||g*||
    variance      = (1/d) sum_i s_i^2
    mse           = (1/(N d)) sum_n ||g_n - g*||^2
    cosine        = (1/N) sum_n <g_n, g*> / (||g_n|| ||g*||)     (a draw with g_n = 0 counts 0)
    snr           = ||g*|| / sqrt(d * variance)
    work_variance = variance * evals_per_draw    work_variance_seconds = variance * seconds_per_draw

``||mean - g*||`` itself is about ``floor`` for an unbiased estimator (Monte Carlo noise);
``||mean - g*||^2 - floor^2`` is an unbiased estimate of the squared bias, and ``bias_l2`` is
its root clipped at 0.

Unbiasedness test (Bonferroni-Holm over the ``d`` coordinates; the smallest Holm-adjusted
p-value equals the Bonferroni one)::

    z_i        = (mean_i - g*_i) / sqrt(s_i^2 / N + r_i^2)
    c_i        = m3_i / N^2 / (s_i^2 / N + r_i^2)^(3/2)      (skewness of mean_i / sqrt(N))
    w_i        = z_i + c_i z_i^2 / 3 + c_i^2 z_i^3 / 27 + c_i / 6
    z_max      = max_i |w_i|                  (the statistic the p-value is computed from)
    p_unbiased = min(1, d * 2 * (1 - Phi(max_i |w_i|)))

``m3_i`` is the third central sample moment. ``w`` is Hall's (1992) monotone transformation,
which removes the first-order (skewness) Edgeworth term of a studentised mean: without it the
Bonferroni threshold lies in a tail where the normal approximation fails for skewed draws
(score function at extreme logits, Bernoulli draws with a small rate). NaN draws give a NaN
``p_unbiased``, never 1.

``r_i`` is the standard error of the reference: 0 when ``g*`` is exact, the Monte Carlo
standard error when it is itself an estimate (``reference = "estimated"``). A coordinate with
zero spread (``s_i = r_i = 0``, e.g. the ``exact`` estimator) has ``z_i = 0`` when
``|mean_i - g*_i| <= exact_tol * max(||g*||_inf, 1e-12)`` and ``z_i = inf`` otherwise.

Sufficient statistics. Draws are shifted by the first draw ``K`` (``y = g - K``, the "shifted
data" algorithm, stable when ``K`` lies within a few standard deviations of the mean) and
accumulated in float64 as sums of ``y`` and ``y^2`` per coordinate, together with the sum of
per-draw cosines. Memory is ``O(G d)`` whatever ``N``: 10^6 draws x 200 coordinates stream
through in chunks. Identical draws give a variance of exactly 0.

Confidence intervals (level ``1 - alpha``) use *batch means*: draw number ``n`` (counted over
all chunks) goes to group ``n mod G``; a statistic ``theta`` is computed within every group and
the interval is ``theta_hat +- t_{1-alpha/2, G-1} * sd(theta_g) / sqrt(G)`` with ``theta_hat``
the all-draw value. Groups are independent, so the interval holds for heavy-tailed, non-Gaussian
draws and correlated coordinates, which a chi-square interval (Gaussian draws) would not. It is
used for ``variance``, ``mse`` and ``cosine``; the ``snr`` and ``work_variance`` intervals are
the variance interval mapped through their monotone formulas. The ``bias_l2`` interval is
``B2 +- t * se`` on the squared bias ``B2 = ||mean - g*||^2 - floor^2``, mapped through
``sqrt(max(0, .))``; ``se`` is the leave-one-group-out jackknife over the same groups, plus
``4 sum_i b_i^2 r_i^2 + 2 sum_i r_i^4`` for an estimated reference. For an unbiased
estimator it contains 0 at the stated level.

Heavy tails. The batch-means intervals of ``variance`` and ``mse`` rest on a central limit
theorem for per-draw squared distances ``e_n = ||g_n - c||^2``, which needs ``E e^2 < inf``.
When the draws have a Pareto-like tail with index ``alpha`` (``P(|g| > x) ~ x^-alpha``), ``e``
has tail index ``alpha / 2`` and the condition fails for ``alpha <= 4``; short of that, a
lognormal tail makes the intervals under-cover at every practical ``N``. The accumulator keeps
the ``k + 1`` (``tail_k + 1``) largest ``e_n``, with ``c = g*`` (or the first draw ``K`` when
there is no reference): a streaming top-k, exact under any chunking (the new top-k is the
top-k of the kept values and the chunk together, which also merges two accumulators). At the
end it computes the Hill estimate of the tail exponent of ``e``::

    E_(1) >= ... >= E_(m)   the kept e_n with e_n >= 4 * mean(e)   (m <= k + 1)
    tail_index  = (1/(m-1)) sum_{j<m} log(E_(j) / E_(m))    (0 when m < 2: no draw far out)
    heavy_tails = not (tail_index <= 1/2)

``tail_index > 1/2`` is a tail with ``alpha < 4``: the variance of ``e`` looks infinite, and
the ``variance``/``mse`` intervals (and those mapped from them: ``snr``, ``work_variance``)
are not to be trusted. The cut at ``4 * mean(e)`` keeps atoms of the bulk (e.g. the zeros of
Bernoulli draws with a small rate) out of the estimate; draws that take few values (binary
neurons) have ties in the top and an index near 0. NaN draws give a NaN index, flagged.
tests/analysis/test_calibration.py measures the flag's false alarms and power and the
coverage of the intervals it leaves unflagged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from scipy import stats as _scipy_stats

__all__ = [
    "GradientStats",
    "Summary",
    "SUMMARY_FIELDS",
    "summarize",
    "mean_and_se",
]

_PIECE_ELEMENTS = 1 << 21  # float64 elements converted at once inside `update`
TAIL_K = 64  # largest squared distances kept per tail stream
TAIL_CUT = 4.0  # only distances >= TAIL_CUT * their mean enter the tail index
HEAVY_TAIL_INDEX = 0.5  # tail_index above this flags heavy tails (alpha < 4)


@dataclass
class Summary:
    """The statistics of one parameter's draws (see the module docstring for formulas)."""

    draws: int
    dim: int
    bias_l2: float
    bias_l2_lo: float
    bias_l2_hi: float
    bias_noise_floor: float
    rel_bias: float
    variance: float
    variance_lo: float
    variance_hi: float
    mse: float
    mse_lo: float
    mse_hi: float
    cosine: float
    cosine_lo: float
    cosine_hi: float
    snr: float
    snr_lo: float
    snr_hi: float
    z_max: float
    p_unbiased: float
    tail_index: float
    heavy_tails: bool
    evals_per_draw: float
    seconds_per_draw: float
    work_variance: float
    work_variance_lo: float
    work_variance_hi: float
    work_variance_seconds: float
    grad_norm: float
    reference: str
    reference_se_l2: float
    level: float
    groups: int
    per_coordinate: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def as_dict(self) -> dict[str, float | int | str]:
        """The scalar fields (everything except ``per_coordinate``)."""
        out = asdict(self)
        out.pop("per_coordinate")
        return out


SUMMARY_FIELDS = [f for f in Summary.__dataclass_fields__ if f != "per_coordinate"]


class GradientStats:
    """Streaming accumulator of the statistics of per-draw gradient estimates.

    Args:
        reference: the true gradient ``g*``, any shape with ``d`` elements (flattened), or
            ``None`` to accumulate mean and variance only (bias, mse, cosine, snr and the test
            are then NaN).
        reference_se: per-coordinate standard error ``r`` of an *estimated* reference, or
            ``None`` when ``reference`` is exact.
        groups: number ``G`` of batch-means groups for the confidence intervals (>= 2).
        exact_tol: relative tolerance for a zero-spread coordinate to count as unbiased.
        tail_k: number ``k`` of largest squared distances used by the tail check (>= 2).

    Requires: draws of shape ``(n, d)`` or ``(n, *param_shape)`` with ``d`` elements per draw,
    on one device throughout (the statistics stay on that device until ``result``).

    Example::

        acc = GradientStats(g_star)
        for chunk in chunks:      # (n, d)
            acc.update(chunk)
        s = acc.result(evals_per_draw=1.0)
    """

    def __init__(
        self,
        reference: torch.Tensor | None,
        reference_se: torch.Tensor | None = None,
        *,
        groups: int = 32,
        exact_tol: float = 1e-5,
        tail_k: int = TAIL_K,
    ) -> None:
        if not isinstance(groups, int) or groups < 2:
            raise ValueError(f"groups must be an int >= 2, got {groups!r}")
        if not isinstance(tail_k, int) or tail_k < 2:
            raise ValueError(f"tail_k must be an int >= 2, got {tail_k!r}")
        if reference is not None:
            if not isinstance(reference, torch.Tensor):
                raise TypeError(f"reference must be a torch.Tensor or None, got {type(reference)}")
            reference = reference.detach().reshape(-1).to(torch.float64)
            if not torch.isfinite(reference).all():
                raise ValueError("reference gradient contains non-finite values")
        if reference_se is not None:
            if reference is None:
                raise ValueError("reference_se given without a reference")
            reference_se = reference_se.detach().reshape(-1).to(torch.float64)
            if reference_se.shape != reference.shape:
                raise ValueError(
                    f"reference_se has {reference_se.numel()} elements, reference has "
                    f"{reference.numel()}; they must match"
                )
            if (reference_se < 0).any() or not torch.isfinite(reference_se).all():
                raise ValueError("reference_se must be finite and >= 0")
        self.reference = reference
        self.reference_se = reference_se
        self.groups = groups
        self.exact_tol = exact_tol
        self.tail_k = tail_k
        self.count = 0
        self._top: torch.Tensor | None = None  # (<= k+1,) largest ||x - g*||^2 (or ||x - K||^2)
        self._shift: torch.Tensor | None = None  # (d,)
        self._n: torch.Tensor | None = None  # (G,)
        self._s1: torch.Tensor | None = None  # (G, d)
        self._s2: torch.Tensor | None = None  # (G, d)
        self._s3: torch.Tensor | None = None  # (G, d)
        self._cos: torch.Tensor | None = None  # (G,)

    @property
    def dim(self) -> int | None:
        if self._shift is not None:
            return int(self._shift.numel())
        return None if self.reference is None else int(self.reference.numel())

    def _init(self, first: torch.Tensor) -> None:
        d = first.numel()
        if self.reference is not None and self.reference.numel() != d:
            raise ValueError(
                f"draws have {d} coordinates but the reference has {self.reference.numel()}"
            )
        dev = first.device
        self._shift = first.detach().to(torch.float64).clone()
        if self.reference is not None:
            self.reference = self.reference.to(dev)
        if self.reference_se is not None:
            self.reference_se = self.reference_se.to(dev)
        g = self.groups
        f64 = torch.float64
        self._n = torch.zeros(g, dtype=f64, device=dev)
        self._s1 = torch.zeros(g, d, dtype=f64, device=dev)
        self._s2 = torch.zeros(g, d, dtype=f64, device=dev)
        self._s3 = torch.zeros(g, d, dtype=f64, device=dev)
        self._cos = torch.zeros(g, dtype=f64, device=dev)

    def update(self, draws: torch.Tensor) -> GradientStats:
        """Add a chunk of draws, shape ``(n, d)`` or ``(n, *param_shape)``; returns ``self``."""
        if not isinstance(draws, torch.Tensor):
            raise TypeError(f"draws must be a torch.Tensor, got {type(draws)}")
        if draws.dim() < 1:
            raise ValueError("draws must have a leading draw dimension, got a scalar")
        n = draws.shape[0]
        if n == 0:
            return self
        x = draws.detach().reshape(n, -1)  # (n, d)
        if self._shift is None:
            self._init(x[0])
        assert self._shift is not None and self._s1 is not None
        if x.shape[1] != self._shift.numel():
            raise ValueError(
                f"draws have {x.shape[1]} coordinates per draw, earlier chunks had "
                f"{self._shift.numel()}"
            )
        if x.device != self._shift.device:
            raise ValueError(
                f"draws are on {x.device}, earlier chunks were on {self._shift.device}"
            )
        rows = max(1, _PIECE_ELEMENTS // max(1, x.shape[1]))
        for start in range(0, n, rows):
            self._update_piece(x[start : start + rows])
        return self

    def _update_piece(self, x: torch.Tensor) -> None:
        assert self._shift is not None and self._n is not None
        assert self._s1 is not None and self._s2 is not None and self._cos is not None
        assert self._s3 is not None
        n = x.shape[0]
        dev = x.device
        x64 = x.to(torch.float64)  # (n, d)
        y = x64 - self._shift  # (n, d)
        grp = torch.arange(self.count, self.count + n, device=dev) % self.groups  # (n,)
        self._n.index_add_(0, grp, torch.ones(n, dtype=torch.float64, device=dev))
        self._s1.index_add_(0, grp, y)
        y2 = y * y
        self._s2.index_add_(0, grp, y2)
        self._s3.index_add_(0, grp, y2 * y)
        if self.reference is not None:
            ref_norm = torch.linalg.vector_norm(self.reference)
            norms = torch.linalg.vector_norm(x64, dim=1)  # (n,)
            denom = norms * ref_norm
            cos = torch.where(denom > 0, (x64 @ self.reference) / denom.clamp_min(1e-300), 0.0)
            if ref_norm == 0:
                cos = torch.full_like(cos, math.nan)
            self._cos.index_add_(0, grp, cos)
        # Tail stream: the k + 1 largest squared distances to g* (or to K), from y^2 already
        # at hand: ||x - g*||^2 = sum(y^2) + 2 y.(K - g*) + ||K - g*||^2.
        e = y2.sum(1)
        if self.reference is not None:
            kg = self._shift - self.reference
            e = e + 2 * (y @ kg) + kg @ kg
        self._top = _top(self._top, e, self.tail_k + 1)
        self.count += n

    def result(
        self,
        *,
        evals_per_draw: float = math.nan,
        seconds_per_draw: float = math.nan,
        level: float = 0.95,
    ) -> Summary:
        """The statistics so far, with ``level`` confidence intervals (module docstring)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if self.count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 draws for a variance, got {self.count}")
        assert self._n is not None and self._s1 is not None
        assert self._s2 is not None and self._cos is not None
        N = float(self.count)
        d = self._shift.numel()
        K = self._shift
        S1 = self._s1.sum(0)  # (d,)
        S2 = self._s2.sum(0)  # (d,)
        mean = K + S1 / N  # (d,)
        var = ((S2 - S1 * S1 / N) / (N - 1)).clamp_min(0.0)  # (d,)
        variance = float(var.mean())

        # Per-group statistics for batch-means intervals.
        ng = self._n  # (G,)
        ok = ng >= 2
        G = int(ok.sum())
        tq = float(_scipy_stats.t.ppf(0.5 + level / 2, G - 1)) if G >= 2 else math.nan
        ngc = ng.clamp_min(1.0)[:, None]
        var_g = ((self._s2 - self._s1**2 / ngc) / (ngc - 1).clamp_min(1.0)).clamp_min(0.0)
        var_g = var_g.mean(1)[ok]  # (G_ok,)

        exact_draws = float(var.max()) == 0.0  # every draw identical: point intervals

        def interval(center: float, per_group: torch.Tensor) -> tuple[float, float]:
            if exact_draws:
                return center, center
            if G < 2 or not math.isfinite(center):
                return math.nan, math.nan
            half = tq * float(per_group.std(unbiased=True)) / math.sqrt(G)
            return center - half, center + half

        v_lo, v_hi = interval(variance, var_g)
        v_lo = max(v_lo, 0.0)

        # Tail check (module docstring): Hill index of the largest squared distances.
        assert self._top is not None
        kc = torch.zeros_like(K) if self.reference is None else K - self.reference  # K - c
        tail_index = _hill(self._top, float((S2 + 2 * kc * S1 + N * kc * kc).sum()) / N)

        nan = math.nan
        out: dict[str, float] = {}
        per_coord: dict[str, torch.Tensor] = {"mean": mean, "variance": var}
        se = (var / N).sqrt()  # (d,)
        per_coord["se"] = se
        if self.reference is None:
            reference_kind = "none"
            out.update(
                bias_l2=nan, bias_l2_lo=nan, bias_l2_hi=nan, bias_noise_floor=nan, rel_bias=nan,
                mse=nan, mse_lo=nan, mse_hi=nan, cosine=nan, cosine_lo=nan, cosine_hi=nan,
                snr=nan, snr_lo=nan, snr_hi=nan, z_max=nan, p_unbiased=nan, grad_norm=nan,
                reference_se_l2=nan,
            )  # fmt: skip
        else:
            g = self.reference
            r2 = self.reference_se**2 if self.reference_se is not None else torch.zeros_like(g)
            reference_kind = "exact" if self.reference_se is None else "estimated"
            gnorm = float(torch.linalg.vector_norm(g))
            b = mean - g  # (d,)
            bias = float(torch.linalg.vector_norm(b))
            # Unbiasedness test: per-coordinate statistic with its skewness removed (Hall's
            # monotone cubic transformation), two-sided normal p-values, Bonferroni-Holm.
            den = (var / N + r2).sqrt()
            tol = self.exact_tol * max(float(g.abs().max()), 1e-12)
            z = torch.where(
                den > 0,
                b / den.clamp_min(1e-300),
                torch.where(b.abs() <= tol, 0.0, math.inf * b.sign()),
            )
            S3 = self._s3.sum(0)  # type: ignore[union-attr]
            m3 = (S3 - 3 * S1 * S2 / N + 2 * S1**3 / N**2) / N  # third central moment of y
            c = torch.where(den > 0, m3 / N**2 / den.clamp_min(1e-300) ** 3, 0.0)
            c = torch.where(torch.isfinite(c), c, 0.0)
            zc = torch.where(torch.isfinite(z), z + c / 3 * z**2 + c**2 / 27 * z**3 + c / 6, z)
            zc_max = float(zc.abs().max())
            if math.isnan(float(z.abs().max())) or math.isnan(zc_max):
                p_unb = math.nan
            else:
                p_one = math.erfc(zc_max / math.sqrt(2.0))  # smallest per-coordinate p-value
                p_unb = min(1.0, d * p_one)
            # Bias: debiased ||E mean - g*||^2 = ||b||^2 - tr(Sigma)/N - ||r||^2, with a
            # jackknife (leave one group out) standard error.
            floor2 = float(var.sum()) / N + float(r2.sum())
            floor = math.sqrt(floor2)
            b2 = float((b * b).sum()) - floor2
            if exact_draws and float(r2.max()) == 0:
                b_lo = b_hi = bias
                b_est = bias
            elif G >= 2 and math.isfinite(b2):
                ngk = ng[ok][:, None]  # (G_ok, 1)
                s1k, s2k = self._s1[ok], self._s2[ok]
                n_rest = N - ngk  # (G_ok, 1)
                S1r, S2r = S1 - s1k, S2 - s2k
                mean_r = K + S1r / n_rest
                var_r = ((S2r - S1r**2 / n_rest) / (n_rest - 1)).clamp_min(0.0)
                br = mean_r - g
                b2_r = (br * br).sum(1) - (var_r / n_rest).sum(1) - float(r2.sum())  # (G_ok,)
                jk = float(((b2_r - b2_r.mean()) ** 2).sum()) * (G - 1) / G
                jk += 4 * float((b * b * r2).sum()) + 2 * float((r2 * r2).sum())
                half = tq * math.sqrt(jk)
                b_est = math.sqrt(max(b2, 0.0))
                b_lo = math.sqrt(max(b2 - half, 0.0))
                b_hi = math.sqrt(max(b2 + half, 0.0))
            else:
                b_est = math.sqrt(max(b2, 0.0)) if math.isfinite(b2) else math.nan
                b_lo = b_hi = nan
            bias = b_est
            # MSE: sum_n ||g_n - g*||^2 = sum_i [S2_i + 2 (K_i - g_i) S1_i + N (K_i - g_i)^2].
            kg = K - g  # (d,)
            sq = S2 + 2 * kg * S1 + N * kg * kg  # (d,)
            mse = float(sq.sum()) / (N * d)
            sq_g = (self._s2 + 2 * kg * self._s1 + ng[:, None] * kg * kg).sum(1)  # (G,)
            mse_g = (sq_g / (ng.clamp_min(1.0) * d))[ok]
            m_lo, m_hi = interval(mse, mse_g)
            m_lo = max(m_lo, 0.0)
            cosine = float(self._cos.sum()) / N
            cos_g = (self._cos / ng.clamp_min(1.0))[ok]
            c_lo, c_hi = interval(cosine, cos_g)
            snr = _snr(gnorm, d, variance)
            out.update(
                bias_l2=bias, bias_l2_lo=b_lo, bias_l2_hi=b_hi, bias_noise_floor=floor,
                rel_bias=bias / gnorm if gnorm > 0 else (0.0 if bias == 0 else math.inf),
                mse=mse, mse_lo=m_lo, mse_hi=m_hi,
                cosine=cosine, cosine_lo=max(c_lo, -1.0), cosine_hi=min(c_hi, 1.0),
                snr=snr, snr_lo=_snr(gnorm, d, v_hi), snr_hi=_snr(gnorm, d, v_lo),
                z_max=zc_max, p_unbiased=p_unb, grad_norm=gnorm,
                reference_se_l2=math.sqrt(float(r2.sum())),
            )  # fmt: skip
            per_coord.update(
                reference=g,
                reference_se=r2.sqrt(),
                bias=b,
                z=z,
                z_corrected=zc,
            )
        ev = float(evals_per_draw)
        sec = float(seconds_per_draw)
        return Summary(
            draws=int(N),
            dim=d,
            variance=variance,
            variance_lo=v_lo,
            variance_hi=v_hi,
            evals_per_draw=ev,
            seconds_per_draw=sec,
            work_variance=variance * ev,
            work_variance_lo=v_lo * ev,
            work_variance_hi=v_hi * ev,
            work_variance_seconds=variance * sec,
            reference=reference_kind,
            tail_index=tail_index,
            heavy_tails=not tail_index <= HEAVY_TAIL_INDEX,
            level=level,
            groups=G,
            per_coordinate={k: v.detach().to("cpu", torch.float64) for k, v in per_coord.items()},
            **out,
        )


def _top(kept: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest of ``kept`` and ``new`` together, in decreasing order."""
    both = new if kept is None else torch.cat([kept, new])
    return torch.topk(both, min(k, both.numel())).values


def _hill(top: torch.Tensor, mean_e: float) -> float:
    """Hill estimate of the tail exponent of ``e`` from its largest values ``top``
    (decreasing), using those ``>= TAIL_CUT * mean_e``; 0 when fewer than two qualify."""
    if not math.isfinite(mean_e) or bool(torch.isnan(top).any()):
        return math.nan
    if mean_e <= 0:
        return 0.0
    keep = top[top >= TAIL_CUT * mean_e]
    if keep.numel() < 2:
        return 0.0
    return float(torch.log(keep[:-1] / keep[-1]).mean())


def _snr(gnorm: float, d: int, variance: float) -> float:
    """``||g*|| / sqrt(d * variance)``; ``inf`` for zero variance and a nonzero gradient."""
    if math.isnan(variance) or math.isnan(gnorm):
        return math.nan
    if variance <= 0:
        return math.inf if gnorm > 0 else math.nan
    return gnorm / math.sqrt(d * variance)


def summarize(
    draws: torch.Tensor,
    reference: torch.Tensor | None,
    reference_se: torch.Tensor | None = None,
    *,
    evals_per_draw: float = math.nan,
    seconds_per_draw: float = math.nan,
    level: float = 0.95,
    groups: int = 32,
    chunk_draws: int | None = None,
    tail_k: int = TAIL_K,
) -> Summary:
    """All statistics of draws already in memory, shape ``(N, *param_shape)``.

    A convenience over :class:`GradientStats`; ``chunk_draws`` feeds the draws in chunks (the
    result does not depend on it).
    """
    acc = GradientStats(reference, reference_se, groups=groups, tail_k=tail_k)
    step = chunk_draws or max(1, draws.shape[0])
    for start in range(0, draws.shape[0], step):
        acc.update(draws[start : start + step])
    return acc.result(evals_per_draw=evals_per_draw, seconds_per_draw=seconds_per_draw, level=level)


def mean_and_se(chunks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and standard error ``s_i / sqrt(N)`` per coordinate of a stream of draw chunks.

    Used to build an *estimated* reference from many draws of an unbiased estimator. Each chunk
    is ``(n, *shape)``; returns ``(mean, se)`` shaped like one draw (float64) and ``N``.
    """
    acc: GradientStats | None = None
    shape: tuple[int, ...] = ()
    for chunk in chunks:
        if acc is None:
            acc = GradientStats(None)
            shape = tuple(chunk.shape[1:])
        acc.update(chunk)
    if acc is None or acc.count < 2:
        raise ValueError("need at least 2 draws to estimate a reference")
    s = acc.result()
    mean = s.per_coordinate["mean"].reshape(shape)
    se = s.per_coordinate["se"].reshape(shape)
    return mean, se, acc.count
