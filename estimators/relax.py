"""RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, ICLR, "Backpropagation through the
Void: optimizing control variates for black-box gradient estimation"), Bernoulli units.

RELAX is REINFORCE with a *learned* control variate ``c_psi`` evaluated at the relaxed
sample, with REBAR's conditional reparameterisation (paper Sec. 3.3, Eq. 8; Algorithm 2).
Notation as in :mod:`.rebar`: ``z = a - logit(u)``, ``b = H(z)``, ``z~`` a reparameterised
draw of ``p(z | b)``; then

    g = [f(b) - c_psi(z~)] d log p(b) + d c_psi(z) - d c_psi(z~) + (d f)(b).

Whatever ``psi``, the last three terms have zero mean (``z~`` has the law of ``z``, and
``E[c(z~) | b] d log p(b)`` integrates to ``d E[c(z)] - E[d c(z~)]``), so ``g`` is unbiased
for every ``psi``, ``lambda`` and ``eta``.

The control variate used here is the paper's RELAX-with-REBAR form (its discrete
experiments): ``c_psi(z) = eta f(sigma_lambda(z)) + r_psi(x(z))``, ``f`` the model's own cost
at the relaxed values, ``r_psi`` a small multilayer perceptron (``hidden`` units per layer,
``tanh``) whose input ``x`` is the vector of every site's value in the relaxed run (the
relaxed units in ``(0, 1)``; with several sites, the hard values of the sites before the
relaxed one too, see below). Its last layer starts at zero, so before training RELAX is REBAR
at ``temperature`` and ``eta``.

Several stochastic sites (layers): as :mod:`.rebar`, site ``j``'s control variate
``c_j = eta f(relaxed run of j) + r_psi(x of that run)`` is a continuous function of ``z_j``
given the earlier hard values and the later sites' uniforms, and site ``j``'s score term is
that of ``p(b_j | b_<j)``; one ``r_psi`` is shared by all sites. ``1 + 2 L`` model
evaluations per draw for ``L`` sites.

Training (paper Sec. 3, Algorithm 2, the parameters ``theta`` held fixed): ``psi``,
``log lambda`` and ``eta`` follow Adam at ``lr`` on the single-sample estimate of the
gradient of the estimator's variance, ``d/dpsi mean ||g||^2`` (the mean of ``g`` does not
depend on them, so this is ``d Var / d psi``), by double backpropagation.
``estimate()`` starts from fresh state every call -- ``lambda = temperature``, ``eta``, the
network initialised from a generator seeded by a function of ``seed`` (the draws' stream is
not touched) -- and runs ``warmup_steps`` steps on chunks of ``WARMUP_DRAWS`` draws from its
own seeded stream; the measured draws then use the trained state held fixed, so they are
i.i.d. and the same seed gives the same numbers. ``state_dict()`` holds ``log_temperature``,
``eta`` and ``net`` (the network's weights and biases, input to output).

Cost per draw: ``1 + 2 L`` model evaluations and 1 backward pass (the warm-up adds
``warmup_steps`` chunks of ``1 + 2 L`` evaluations and 2 backward passes each, not counted
per draw). Bias: none. What the model must allow: as :mod:`.rebar` (a cost defined and
differentiable at relaxed values; the same sites in every run). Bernoulli sites only
(Categorical: ``TypeError``). Batched core only: at a Pyro site it raises the protocol's
``TypeError`` (the engine's re-runs carry no gradient, which ``d c_psi(z)`` needs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Rng, check_positive_float, check_positive_int, site_units
from .rebar import WARMUP_DRAWS, FreeForm, RelaxedControl, _dtype
from .registry import register


def check_hidden(hidden: Any) -> tuple[int, ...]:
    """``hidden`` as a tuple of layer widths (an int is one hidden layer; ``()``: linear)."""
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden must be an int or a sequence of ints, got {hidden!r}")
    out = tuple(hidden)
    for h in out:
        check_positive_int("hidden layer width", h)
    return out


def init_net(
    inputs: int, hidden: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """``[W_1, c_1, ..., W_out, c_out]``: uniform ``+-1/sqrt(fan_in)`` weights, zero biases,
    and a zero output layer (the network starts at ``r = 0``)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [inputs, *hidden]
    net = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(n_in)
        w = (2 * torch.rand(n_in, n_out, generator=gen, dtype=torch.float64) - 1) * bound
        net += [w.to(dtype=dtype, device=device), torch.zeros(n_out, dtype=dtype, device=device)]
    net += [
        torch.zeros(sizes[-1], 1, dtype=dtype, device=device),
        torch.zeros(1, dtype=dtype, device=device),
    ]
    return net


def net_forward(net: Sequence[Tensor], x: Tensor) -> Tensor:
    """``r(x)`` for ``x`` of shape ``(..., inputs)``: shape ``(...)``."""
    h = x
    for i in range(0, len(net) - 2, 2):
        h = torch.tanh(torch.addmm(net[i + 1], h.reshape(-1, h.shape[-1]), net[i]))
    out = torch.addmm(net[-1], h.reshape(-1, h.shape[-1]), net[-2])
    return out.view(x.shape[:-1])


def _init_seed(seed: int) -> int:
    """The network's initialisation seed: a fixed mixing of the estimate's seed."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def _free_form(net: Sequence[Tensor]) -> FreeForm:
    """``r_psi`` of every relaxed run: ``[(r(x of run 1 + 2j), r(x of run 2 + 2j))]``."""

    def free_form(sites: Mapping[str, Any], draws: int, runs: int) -> list[tuple[Tensor, Tensor]]:
        x = torch.cat([s.extra["value"].reshape(draws, runs, -1) for s in sites.values()], -1)
        r = net_forward(net, x[:, 1:])  # (draws, 2 L)
        return [(r[:, 2 * j], r[:, 2 * j + 1]) for j in range(runs // 2)]

    return free_form


@register
class Relax(RelaxedControl):
    """REINFORCE with a learned control variate ``eta f(sigma_l(z)) + r_psi``, variance-trained."""

    name = "relax"
    description = (
        "RELAX (Grathwohl 2018): REINFORCE + learned control variate eta f(relaxed) + MLP, "
        "trained on the estimator's variance"
    )

    def __init__(
        self,
        temperature: float = 0.5,
        eta: float = 1.0,
        hidden: int | Sequence[int] = (32,),
        lr: float = 0.03,
        warmup_steps: int = 100,
    ):
        super().__init__(temperature, eta)
        self.hidden = check_hidden(hidden)
        self.lr = check_positive_float("lr", lr)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.net: list[Tensor] | None = None
        self.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_temperature": self.log_temperature.clone(),
            "eta": self.eta_value.clone(),
            "net": [w.clone() for w in self.net] if self.net is not None else [],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"log_temperature", "eta", "net"}:
            raise ValueError(
                f"relax state needs keys ['eta', 'log_temperature', 'net'], got {sorted(state)}"
            )
        net = [torch.as_tensor(w).clone() for w in state["net"]]
        if net:
            shapes = [tuple(w.shape) for w in net]
            sizes = [shapes[0][0] if shapes[0] else 0, *self.hidden, 1]
            want = []
            for n_in, n_out in zip(sizes[:-1], sizes[1:]):
                want += [(n_in, n_out), (n_out,)]
            if shapes != want:
                raise ValueError(
                    f"relax state 'net' must hold weights and biases for hidden={self.hidden} "
                    f"(input to output), got shapes {shapes}"
                )
        self.log_temperature = torch.as_tensor(state["log_temperature"]).clone().double()
        self.eta_value = torch.as_tensor(state["eta"]).clone().double()
        self.net = net or None

    # -- the estimate -------------------------------------------------------------------------

    def _net_for(self, objective: Any) -> list[Tensor]:
        units = sum(math.prod(s) for s in site_units(objective, self).values())
        if self.net is None:
            raise ValueError(
                "relax has no control-variate network yet; estimate() trains one (or load a "
                "state_dict)"
            )
        if self.net[0].shape[0] != units:
            raise ValueError(
                f"relax's control-variate network takes {self.net[0].shape[0]} inputs, but "
                f"this objective has {units} stochastic units; estimate() trains one afresh"
            )
        ref = next(iter(objective.params.values()))
        return [w.to(dtype=ref.dtype, device=ref.device) for w in self.net]

    def _draw(self, objective: Any, draws: int, rng: Rng) -> dict[str, Tensor]:
        dtype = _dtype(objective)
        lt = self.log_temperature.detach().to(dtype)
        eta = self.eta_value.detach().to(dtype)
        net = self._net_for(objective)
        return self._estimates(
            objective, draws, rng, lt, eta, create_graph=False, free_form=_free_form(net)
        )

    def warmup(self, objective: Any, rng: Rng) -> None:
        self.reset()
        ref = next(iter(objective.params.values()))
        units = sum(math.prod(s) for s in site_units(objective, self).values())
        self.net = init_net(units, self.hidden, _init_seed(rng.seed), ref.dtype, ref.device)
        if self.warmup_steps == 0:
            return
        lt = self.log_temperature.to(ref.dtype).clone().requires_grad_(True)
        eta = self.eta_value.to(ref.dtype).clone().requires_grad_(True)
        net = [w.clone().requires_grad_(True) for w in self.net]
        trained = [lt, eta, *net]
        opt = torch.optim.Adam(trained, lr=self.lr)
        free_form = _free_form(net)
        layers = len(site_units(objective, self))
        for _ in range(self.warmup_steps):
            g = self._estimates(
                objective, WARMUP_DRAWS, rng, lt, eta, True, free_form=free_form, layers=layers
            )
            loss = sum((v.reshape(WARMUP_DRAWS, -1) ** 2).sum(1).mean() for v in g.values())
            assert isinstance(loss, Tensor)
            if not loss.requires_grad:  # nothing to train: the estimate does not depend on psi
                break
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
            for p, gp in zip(trained, grads):
                p.grad = gp if gp is not None else torch.zeros_like(p)
            opt.step()
        self.log_temperature = lt.detach().double()
        self.eta_value = eta.detach().double()
        self.net = [w.detach().clone() for w in net]
