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
unbiased. The model is evaluated on ``3 * draws`` rows at once: hard ``b``, relaxed
``sigma_l(z)``, relaxed ``sigma_l(z~)``; ``v`` uses the uniforms after ``u``.

Adaptation (``adapt=True``, paper Sec. 3.3): ``log lambda`` and ``eta`` minimise the
estimator's variance by stochastic gradient descent on the mean squared norm of the per-draw
estimates (its gradient equals that of the variance, the mean being unchanged), computed by
double backpropagation. ``estimate()`` resets them to the constructor's values and runs
``WARMUP_STEPS`` Adam steps on chunks of ``WARMUP_DRAWS`` draws from its own seeded stream;
then the measured draws use the adapted values held fixed, so they are i.i.d.

Cost per draw: 3 model evaluations and 1 backward pass (measured draws; the warm-up adds
``WARMUP_STEPS`` chunks of 3 evaluations and 2 backward passes each, not counted per draw).
Bias: none. What the model must allow: its cost is evaluated at relaxed values in (0, 1),
so it must be defined and differentiable there; the site logits must not depend on other
sites' values (a single stochastic layer: the conditional ``p(z | b)`` above is that of
independent units; a clear error is raised otherwise). Batched core only: no Pyro-site form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    """Site rule for the ``(draws, 3)`` batch: hard ``b``, ``sigma(z / l)``, ``sigma(z~ / l)``."""

    def __init__(self, rng: Rng, draws: int, temperature: Tensor):
        self.rng, self.draws, self.temperature = rng, draws, temperature
        self.parts: dict[str, dict[str, Tensor]] = {}

    def __call__(self, name: str, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        unit = tuple(logits.shape[1:])
        blocks = logits.view(self.draws, 3, *unit)
        if not (
            torch.equal(blocks[:, 0].detach(), blocks[:, 1].detach())
            and torch.equal(blocks[:, 0].detach(), blocks[:, 2].detach())
        ):
            raise ValueError(
                "rebar/relax need site logits that do not depend on other sites' values "
                "(one stochastic layer); this model's logits change with the relaxed values"
            )
        u = self.rng.uniform((self.draws, *unit), logits.dtype)
        v = self.rng.uniform((self.draws, *unit), logits.dtype)
        a_hard, a_z, a_zt = blocks[:, 0], blocks[:, 1], blocks[:, 2]
        z = logistic_pre_activation(a_z, u)
        b = (z.detach() > 0).to(logits.dtype)
        zt = conditional_pre_activation(a_zt, b, v)
        lam = self.temperature
        value = torch.stack([b, torch.sigmoid(z / lam), torch.sigmoid(zt / lam)], 1)
        extra = {"log_prob": bernoulli_log_prob(a_hard, b), "b": b, "z": z, "zt": zt}
        self.parts[name] = extra
        return value.reshape(logits.shape), extra


@register
class Rebar(Estimator):
    """REINFORCE with the concrete-relaxation control variate; ``lambda, eta`` adapted."""

    name = "rebar"
    unbiased = "yes"
    description = "REINFORCE + concrete-relaxation control variate, variance-adapted (Tucker 2017)"
    # Refuses models whose site logits depend on other sites' values (see the module doc).
    single_layer = True

    def __init__(self, temperature: float = 0.5, eta: float = 1.0, adapt: bool = True):
        self.temperature = check_positive_float("temperature", temperature)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta != eta:
            raise ValueError(f"eta must be a real number, got {eta!r}")
        self.eta = float(eta)
        if not isinstance(adapt, bool):
            raise TypeError(f"adapt must be True or False, got {adapt!r}")
        self.adapt = adapt
        self.reset()

    def reset(self) -> None:
        # float64 state: the constructor's values reach a float64 model unrounded
        self.log_temperature = torch.tensor(math.log(self.temperature), dtype=torch.float64)
        self.eta_value = torch.tensor(self.eta, dtype=torch.float64)

    def cost(self, objective: Any) -> Cost:
        return Cost(evals=3.0, backwards=1.0)

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

    def _estimates(
        self,
        objective: Any,
        draws: int,
        rng: Rng,
        log_temperature: Tensor,
        eta: Tensor,
        create_graph: bool,
    ) -> dict[str, Tensor]:
        leaves = per_draw_params(objective.params, draws)
        batched = repeat_draws(leaves, 3)
        rule = _Relaxed(rng, draws, log_temperature.exp())
        cost, sites = run_model(objective, batched, rule, self.name)
        f = cost.view(draws, 3)
        f_b, f_z, f_zt = f[:, 0], f[:, 1], f[:, 2]
        path = f_b.sum() + eta * (f_z.sum() - f_zt.sum())
        log_p = torch.zeros(draws, dtype=f_b.dtype, device=f_b.device)
        for s in sites.values():
            log_p = log_p + s.extra["log_prob"].reshape(draws, -1).sum(1)
        signal = f_b.detach() - eta * f_zt.detach()
        if not create_graph:
            return grads_or_zeros(path + (log_p * signal).sum(), leaves)
        # Adaptation: the learning signal keeps its dependence on eta and lambda (only those
        # are differentiated later), so the score part is taken apart: g = signal d log p + d path.
        signal = f_b.detach() - eta * f_zt
        g_score = _grads(log_p.sum(), leaves, create_graph=False, retain_graph=True)
        g_path = _grads(path, leaves, create_graph=True)
        return {
            k: signal.view(-1, *[1] * (g_path[k].dim() - 1)) * g_score[k] + g_path[k]
            for k in leaves
        }

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
        for _ in range(WARMUP_STEPS):
            g = self._estimates(objective, WARMUP_DRAWS, rng, lt, eta, create_graph=True)
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
