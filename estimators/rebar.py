"""REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, NIPS), Bernoulli units.

REBAR is REINFORCE with a control variate built from the concrete relaxation (paper Eq. 7-8
for one Bernoulli layer). With ``a`` the logits, ``p = sigmoid(a)`` and a uniform ``u``:

    z  = a - logit(u)                  logistic pre-activation (``b = H(z) = 1[u < p]``, the
                                       same hard sample as every other estimator here)
    z~ = a - logit(u~)                 ``u~ = v p`` if ``b = 1`` else ``p + v (1 - p)``, ``v``
                                       uniform: a reparameterised draw of ``p(z | b)``
    sigma_l(x) = sigmoid(x / lambda)   the relaxed unit at temperature ``lambda``

    g = [f(b) - eta f(sigma_l(z~))] d log p(b) + eta d f(sigma_l(z)) - eta d f(sigma_l(z~))
        + (d f)(b)   (the direct dependence of the cost on the parameters)

The last three terms have zero mean for every ``lambda, eta`` (paper Eq. 6), so ``g`` is
unbiased. For one stochastic site the model is evaluated on ``3 * draws`` rows at once: hard
``b``, relaxed ``sigma_l(z)``, relaxed ``sigma_l(z~)``; ``v`` uses the uniforms after ``u``.

Several stochastic sites (layers, in program order; a site's logits may depend on the values
of any earlier site, as in ``sbn``). The score term of site ``j`` is that of ``p(b_j | b_<j)``
and its control variate is a function of ``z_j`` alone given the earlier hard values and the
later sites' uniforms: in the two runs of site ``j`` the earlier sites keep their hard values
``b_<j`` (so site ``j`` sees the logits of the hard run), site ``j`` is relaxed at ``z_j`` and
at ``z~_j``, and every later site ``k`` is relaxed at ``a_k - logit(u_k)`` with the *same*
``u_k`` as the hard run, ``a_k`` computed from the relaxed values before it. Then

    g = (d f)(b) + sum_j { [f(b) - eta c_j(z~_j)] d log p(b_j | b_<j)
                           + eta d c_j(z_j) - eta d c_j(z~_j) },   c_j = f(relaxed run of j),

each ``c_j`` continuous in ``z_j`` (the later sites are relaxed, not thresholded), so the
reparameterisation identity of Eq. 6 holds site by site given ``b_<j`` and ``u_>j`` (which
are independent of site ``j``'s noise), and ``g`` stays unbiased. The parts of ``d c_j`` that
do not pass through ``z_j`` (parameters read directly by later sites or the read-out) have
equal means at ``z_j`` and ``z~_j`` (same marginal law) and cancel in expectation. Row layout
per draw: run 0 hard, runs ``1 + 2j`` and ``2 + 2j`` the two relaxed runs of site ``j``:
``1 + 2 L`` evaluations for ``L`` sites (3 for one site, exactly the single-layer estimator).
Uniforms per chunk: per site in program order, ``u`` then ``v``.

Adaptation (``adapt=True``, paper Sec. 3.3): ``log lambda`` and ``eta`` minimise the
estimator's variance by stochastic gradient descent on the mean squared norm of the per-draw
estimates (its gradient equals that of the variance, the mean being unchanged), computed by
double backpropagation. ``estimate()`` resets them to the constructor's values and runs
``WARMUP_STEPS`` Adam steps on chunks of ``WARMUP_DRAWS`` draws from its own seeded stream;
then the measured draws use the adapted values held fixed, so they are i.i.d.

Cost per draw: ``1 + 2 L`` model evaluations and 1 backward pass (measured draws; the warm-up
adds ``WARMUP_STEPS`` chunks of ``1 + 2 L`` evaluations and 2 backward passes each, not
counted per draw). Bias: none. What the model must allow: its cost is evaluated at relaxed
values in (0, 1) (and, with several sites, later sites' logits at relaxed earlier values), so
it must be defined and differentiable there; the same sites in every run. Batched core only:
at a Pyro site it raises the protocol's ``TypeError`` (the engine's re-runs carry no gradient,
which the terms ``eta d c_j`` need). Bernoulli sites only (``TypeError`` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (
    Cost,
    Estimator,
    Rng,
    check_positive_float,
    grads_or_zeros,
    per_draw_params,
    repeat_draws,
    run_model,
    site_units,
)
from .registry import register
from .score_function import bernoulli_log_prob

WARMUP_STEPS = 100
WARMUP_DRAWS = 64
WARMUP_LR = 0.05


def _open_unit(u: Tensor) -> Tensor:
    """``u`` moved into the open interval (0, 1) (``rand`` may return exactly 0)."""
    tiny = torch.finfo(u.dtype).tiny
    return u.clamp(min=tiny, max=1.0 - torch.finfo(u.dtype).eps)


def logistic_pre_activation(logits: Tensor, u: Tensor) -> Tensor:
    """``z = a - logit(u)``: logistic with location ``a``; ``z > 0`` iff ``u < sigmoid(a)``."""
    u = _open_unit(u)
    return logits - (torch.log(u) - torch.log1p(-u))


def conditional_pre_activation(logits: Tensor, b: Tensor, v: Tensor) -> Tensor:
    """A draw of ``z ~ p(z | H(z) = b)``, reparameterised in ``logits`` for fixed ``b, v``.

    ``u~`` is uniform on ``(0, p)`` when ``b = 1`` and on ``(p, 1)`` when ``b = 0``; the sign
    of the result is then forced to agree with ``b`` (rounding at the interval ends), so
    ``H(z~) = b`` exactly.
    """
    p = torch.sigmoid(logits)
    v = _open_unit(v)
    ut = torch.where(b > 0.5, v * p, p + v * (1 - p))
    zt = logistic_pre_activation(logits, ut)
    tiny = torch.finfo(zt.dtype).tiny
    return torch.where(b > 0.5, zt.clamp(min=tiny), zt.clamp(max=-tiny))


class _Relaxed:
    """Site rule for the ``(draws, 1 + 2 L)`` batch (module docstring): per site, the hard
    ``b``, and in the two runs of site ``j`` the hard value (sites before ``j``), the relaxed
    ``sigma(z_j / l)`` / ``sigma(z~_j / l)`` (site ``j``) or ``sigma((a - logit(u)) / l)``
    (sites after ``j``, same ``u``)."""

    def __init__(self, rng: Rng, draws: int, layers: int, temperature: Tensor):
        self.rng, self.draws, self.layers, self.temperature = rng, draws, layers, temperature
        self.runs = 1 + 2 * layers
        self.parts: dict[str, dict[str, Tensor]] = {}

    def __call__(self, name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        i = len(self.parts)
        if i >= self.layers:
            raise ValueError(
                f"the model sampled more stochastic sites than in its first run ({self.layers}); "
                "rebar/relax need the same sites in every run"
            )
        unit = tuple(logits.shape[1:])
        blocks = logits.view(self.draws, self.runs, *unit)
        u = self.rng.uniform((self.draws, *unit), logits.dtype)
        v = self.rng.uniform((self.draws, *unit), logits.dtype)
        lam = self.temperature
        b = (logistic_pre_activation(blocks[:, 0].detach(), u) > 0).to(logits.dtype)
        values = [b]
        for r in range(1, self.runs):
            layer, conditional = divmod(r - 1, 2)
            if layer > i:  # this site comes before the relaxed one: its hard value
                values.append(b)
            elif layer == i and conditional:
                values.append(torch.sigmoid(conditional_pre_activation(blocks[:, r], b, v) / lam))
            else:  # the relaxed site itself at z, or a later site with the same u
                values.append(torch.sigmoid(logistic_pre_activation(blocks[:, r], u) / lam))
        value = torch.stack(values, 1)
        extra = {"log_prob": bernoulli_log_prob(blocks[:, 0], b), "b": b, "value": value}
        self.parts[name] = extra
        return value.reshape(logits.shape), extra


FreeForm = Callable[[Mapping[str, Any], int, int], "list[tuple[Tensor, Tensor]]"]


class RelaxedControl(Estimator):
    """REINFORCE with the concrete-relaxation control variate, one or several sites.

    The shared core of ``rebar`` and ``relax``: ``_estimates`` computes the per-draw estimates
    of the module docstring for given ``log lambda``, ``eta`` and an optional free-form part
    ``r`` of the control variate (``c_j = eta f(relaxed run) + r(values of the run)``).
    """

    unbiased = "yes"

    def __init__(self, temperature: float = 0.5, eta: float = 1.0):
        self.temperature = check_positive_float("temperature", temperature)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta != eta:
            raise ValueError(f"eta must be a real number, got {eta!r}")
        self.eta = float(eta)

    def reset(self) -> None:
        # float64 state: the constructor's values reach a float64 model unrounded
        self.log_temperature = torch.tensor(math.log(self.temperature), dtype=torch.float64)
        self.eta_value = torch.tensor(self.eta, dtype=torch.float64)

    def cost(self, objective: Any) -> Cost:
        return Cost(evals=1.0 + 2.0 * max(1, len(site_units(objective, self))), backwards=1.0)

    def _estimates(
        self,
        objective: Any,
        draws: int,
        rng: Rng,
        log_temperature: Tensor,
        eta: Tensor,
        create_graph: bool,
        free_form: FreeForm | None = None,
        layers: int | None = None,
    ) -> dict[str, Tensor]:
        if layers is None:  # the number of stochastic sites, from a probe run
            layers = len(site_units(objective, self))
        runs = 1 + 2 * layers
        leaves = per_draw_params(objective.params, draws)
        batched = repeat_draws(leaves, runs)
        rule = _Relaxed(rng, draws, layers, log_temperature.exp())
        cost, sites = run_model(objective, batched, rule, self.name)
        if len(sites) != layers:
            raise ValueError(
                f"the model sampled {len(sites)} stochastic sites, {layers} in its first run; "
                "rebar/relax need the same sites in every run"
            )
        f = cost.view(draws, runs)
        f_b = f[:, 0]
        cv = f[:, 1].sum() - f[:, 2].sum()
        for j in range(1, layers):
            cv = cv + (f[:, 1 + 2 * j].sum() - f[:, 2 + 2 * j].sum())
        path = f_b.sum() + eta * cv
        extra = free_form(sites, draws, runs) if free_form is not None else []
        for r_z, r_zt in extra:
            path = path + (r_z.sum() - r_zt.sum())
        log_ps = []
        for s in sites.values():
            zero = torch.zeros(draws, dtype=f_b.dtype, device=f_b.device)
            log_ps.append(zero + s.extra["log_prob"].reshape(draws, -1).sum(1))

        def signal(j: int) -> Tensor:
            out = f_b.detach() - eta * (
                f[:, 2 + 2 * j] if create_graph else f[:, 2 + 2 * j].detach()
            )
            if extra:
                out = out - (extra[j][1] if create_graph else extra[j][1].detach())
            return out

        if not create_graph:
            score = (log_ps[0] * signal(0)).sum()
            for j in range(1, layers):
                score = score + (log_ps[j] * signal(j)).sum()
            return grads_or_zeros(path + score, leaves)
        # Adaptation: the learning signal keeps its dependence on eta, lambda and the free-form
        # part (only those are differentiated later), so the score part is taken apart:
        # g = sum_j signal_j d log p_j + d path.
        signals = [signal(j) for j in range(layers)]
        g_scores = [
            _grads(lp.sum(), leaves, create_graph=False, retain_graph=True) for lp in log_ps
        ]
        g_path = _grads(path, leaves, create_graph=True)
        out = {}
        for k in leaves:
            total: Tensor | None = None
            for sig, g_score in zip(signals, g_scores):
                term = sig.view(-1, *[1] * (g_path[k].dim() - 1)) * g_score[k]
                total = term if total is None else total + term
            assert total is not None
            out[k] = total + g_path[k]
        return out


@register
class Rebar(RelaxedControl):
    """REINFORCE with the concrete-relaxation control variate; ``lambda, eta`` adapted."""

    name = "rebar"
    description = "REINFORCE + concrete-relaxation control variate, variance-adapted (Tucker 2017)"

    def __init__(self, temperature: float = 0.5, eta: float = 1.0, adapt: bool = True):
        super().__init__(temperature, eta)
        if not isinstance(adapt, bool):
            raise TypeError(f"adapt must be True or False, got {adapt!r}")
        self.adapt = adapt
        self.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_temperature": self.log_temperature.clone(),
            "eta": self.eta_value.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"log_temperature", "eta"}:
            raise ValueError(
                f"rebar state needs keys ['eta', 'log_temperature'], got {sorted(state)}"
            )
        self.log_temperature = torch.as_tensor(state["log_temperature"]).clone().double()
        self.eta_value = torch.as_tensor(state["eta"]).clone().double()

    # -- the estimate -------------------------------------------------------------------------

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        lt, eta = self.log_temperature.detach(), self.eta_value.detach()
        lt = lt.to(_dtype(objective))
        eta = eta.to(_dtype(objective))
        return self._estimates(objective, draws, rng, lt, eta, create_graph=False)

    def warmup(self, objective: Any, rng: Rng) -> None:
        self.reset()
        if not self.adapt:
            return
        dtype = _dtype(objective)
        lt = self.log_temperature.to(dtype).clone().requires_grad_(True)
        eta = self.eta_value.to(dtype).clone().requires_grad_(True)
        opt = torch.optim.Adam([lt, eta], lr=WARMUP_LR)
        layers = len(site_units(objective, self))
        for _ in range(WARMUP_STEPS):
            g = self._estimates(objective, WARMUP_DRAWS, rng, lt, eta, True, layers=layers)
            loss = sum((v.reshape(WARMUP_DRAWS, -1) ** 2).sum(1).mean() for v in g.values())
            opt.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            opt.step()
        self.log_temperature = lt.detach().double()
        self.eta_value = eta.detach().double()


def _dtype(objective: Any) -> torch.dtype:
    return next(iter(objective.params.values())).dtype


def _grads(
    out: Tensor, leaves: Mapping[str, Tensor], create_graph: bool, retain_graph: bool = False
) -> dict[str, Tensor]:
    names = list(leaves)
    if not out.requires_grad:
        return {k: torch.zeros_like(leaves[k]) for k in names}
    grads = torch.autograd.grad(
        out,
        [leaves[k] for k in names],
        create_graph=create_graph,
        retain_graph=retain_graph or create_graph,
        allow_unused=True,
    )
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}
