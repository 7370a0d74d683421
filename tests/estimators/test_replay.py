"""Exact replays: every estimator's draws recomputed by hand in float64 from the same stream.

Each estimator draws its randomness from ``torch.Generator().manual_seed(seed)`` in a fixed
order (per chunk; per site in program order; for each site the uniforms ``u``, then any
normals). The hand versions below re-create that stream, run the toy and the stochastic binary
network with explicit float64 algebra (no Pyro, no autograd, analytic backward passes) and
must agree with ``est.estimate`` to 1e-10. A change to the randomness layout, a formula, the
chunking or a baseline's update order makes them fail.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from scipy import special

from stochgrad import estimators, models
from stochgrad.estimators.score_function import BASELINES

SEED = 20240501
NUM_DRAWS = 50
CHUNK = 20  # three chunks: 20, 20, 10
TOL = dict(rtol=1e-10, atol=1e-10)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Hand-written models: forward with a per-site value rule, analytic backward
# ---------------------------------------------------------------------------------------------

ValueFn = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class Record:
    params: dict[str, torch.Tensor]  # (n, *shape)
    logits: list[torch.Tensor] = field(default_factory=list)  # per site (n, *unit)
    values: list[torch.Tensor] = field(default_factory=list)
    slopes: list[torch.Tensor | None] = field(default_factory=list)  # d value / d logit
    cost: torch.Tensor | None = None  # (n,)
    dout: torch.Tensor | None = None  # d cost / d (last layer's output)


class HandToy:
    """``sum_i (h_i - t)^2``; one site, logits are the parameters."""

    def __init__(self, obj):
        self.t = obj.target
        self.params = {k: v.detach().to(F64) for k, v in obj.params.items()}
        self.units = [tuple(self.params["logits"].shape)]

    def run(self, params: dict[str, torch.Tensor], value_fn: ValueFn) -> Record:
        rec = Record(params)
        a = params["logits"]  # (n, d)
        v, s = value_fn(0, a)
        rec.logits.append(a)
        rec.values.append(v)
        rec.slopes.append(s)
        rec.cost = ((v - self.t) ** 2).sum(-1)
        rec.dout = 2 * (v - self.t)
        return rec

    def backprop(self, rec: Record, extra: list[torch.Tensor | float], scale=None):
        """Per-row gradient of ``scale * cost + sum_site extra * logits`` (values' slopes)."""
        g = extra[0] + (0 if rec.slopes[0] is None else rec.dout * rec.slopes[0])
        g = g + torch.zeros_like(rec.logits[0])
        if scale is not None and rec.slopes[0] is not None:
            raise AssertionError("pathwise weights are only used with hard samples")
        return {"logits": g}


class HandSBN:
    """x -> h1 ~ Bern(sigmoid(x W1 + b1)) -> h2 ~ Bern(sigmoid(h1 W2 + b2)) -> h2 W3 + b3."""

    def __init__(self, obj):
        self.x = obj.x.to(F64)  # (B, in)
        self.y = obj.y.to(F64)  # (B, out)
        self.params = {k: v.detach().to(F64) for k, v in obj.params.items()}
        batch = self.x.shape[0]
        self.units = [(batch, self.params["b1"].numel()), (batch, self.params["b2"].numel())]

    def run(self, params: dict[str, torch.Tensor], value_fn: ValueFn) -> Record:
        rec = Record(params)
        a1 = torch.einsum("bi,nij->nbj", self.x, params["W1"]) + params["b1"][:, None, :]
        v1, s1 = value_fn(0, a1)
        a2 = torch.einsum("nbi,nij->nbj", v1, params["W2"]) + params["b2"][:, None, :]
        v2, s2 = value_fn(1, a2)
        out = torch.einsum("nbi,nij->nbj", v2, params["W3"]) + params["b3"][:, None, :]
        rec.logits += [a1, a2]
        rec.values += [v1, v2]
        rec.slopes += [s1, s2]
        rec.cost = ((out - self.y) ** 2).sum((-1, -2))
        rec.dout = 2 * (out - self.y)  # (n, B, out)
        return rec

    def backprop(self, rec: Record, extra: list[torch.Tensor | float], scale=None):
        """Per-row gradient of ``scale * cost + sum_site extra * logits``.

        Values with a slope carry gradient back to their logits (surrogate units); values
        without one are constants (hard samples).
        """
        p = rec.params
        dout = rec.dout if scale is None else rec.dout * scale.view(-1, 1, 1)
        v1, v2 = rec.values
        s1, s2 = rec.slopes
        g2 = extra[1] + torch.zeros_like(rec.logits[1])
        if s2 is not None:
            g2 = g2 + torch.einsum("nbo,nio->nbi", dout, p["W3"]) * s2
        g1 = extra[0] + torch.zeros_like(rec.logits[0])
        if s1 is not None:
            g1 = g1 + torch.einsum("nbj,nij->nbi", g2, p["W2"]) * s1
        return {
            "W1": torch.einsum("bi,nbj->nij", self.x, g1),
            "b1": g1.sum(1),
            "W2": torch.einsum("nbi,nbj->nij", v1, g2),
            "b2": g2.sum(1),
            "W3": torch.einsum("nbi,nbo->nio", v2, dout),
            "b3": dout.sum(1),
        }


def hand_model(obj):
    return HandToy(obj) if isinstance(obj, models.Toy) else HandSBN(obj)


def batched(params: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(n, *v.shape) for k, v in params.items()}


def rand(gen, shape):
    return torch.rand(tuple(shape), generator=gen, dtype=F64)


def mean_over_samples(g: dict[str, torch.Tensor], n: int, k: int) -> dict[str, torch.Tensor]:
    return {name: v.reshape(n, k, *v.shape[1:]).mean(1) for name, v in g.items()}


def sigmoid(a):
    return 1 / (1 + torch.exp(-a))


# ---------------------------------------------------------------------------------------------
# Hand-written estimators (one chunk of ``n`` draws each)
# ---------------------------------------------------------------------------------------------


def hand_enumeration(m) -> tuple[Record, torch.Tensor]:
    """Every configuration of the units, with its probability ``q(h)``."""
    sizes = [math.prod(s) for s in m.units]
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=sum(sizes))), dtype=F64)
    splits = torch.split(configs, sizes, dim=1)

    def fixed(i, a):
        return splits[i].reshape(len(configs), *m.units[i]), None

    rec = m.run(batched(m.params, len(configs)), fixed)
    logq = sum(
        (h * torch.log(sigmoid(a)) + (1 - h) * torch.log(sigmoid(-a)))
        .reshape(len(configs), -1)
        .sum(1)
        for h, a in zip(rec.values, rec.logits)
    )
    return rec, torch.exp(logq)


def hand_exact(m) -> dict[str, torch.Tensor]:
    """``sum_h q(h) [L(h) d log q(h) + dL(h)]``."""
    rec, q = hand_enumeration(m)
    extra = []
    for h, a in zip(rec.values, rec.logits):
        w = (q * rec.cost).view(-1, *([1] * (h.dim() - 1)))
        extra.append((h - sigmoid(a)) * w)
    g = m.backprop(rec, extra, scale=q)
    return {k: v.sum(0) for k, v in g.items()}


def hand_oracle_baseline(m) -> list[torch.Tensor]:
    """Per unit ``E[(h - p)^2 L] / E[(h - p)^2]`` with ``p`` the unit's conditional probability."""
    rec, q = hand_enumeration(m)
    out = []
    for h, a in zip(rec.values, rec.logits):
        sq = (h - sigmoid(a)) ** 2
        w = q.view(-1, *([1] * (h.dim() - 1)))
        c = rec.cost.view_as(w)
        out.append((w * sq * c).sum(0) / (w * sq).sum(0))
    return out


class HandScoreFunction:
    def __init__(
        self, baseline="none", num_samples=None, decay=0.9, mode="online", init="first", **kw
    ):
        self.baseline, self.decay, self.mode, self.init = baseline, decay, mode, init
        if num_samples is None:
            num_samples = 2 if baseline == "leave_one_out" else 1
        self.k = num_samples
        self.warmup_draws = kw.get("warmup_draws", 2000)
        self.warmup_chunk = kw.get("warmup_chunk", 100)
        self.lr = kw.get("lr", 1e-2)
        self.state: dict = {}
        self.oracle = None

    @property
    def stateful(self):
        return self.baseline in ("moving_average", "learned") or (
            self.baseline == "optimal" and self.mode == "online"
        )

    def warmup(self, m, gen):
        if self.baseline == "optimal" and self.mode == "oracle":
            if isinstance(m, HandToy):
                # Closed form: own term (1 - p)(1 - t)^2 + p t^2 plus E[(h_j - t)^2] of others.
                p, t = sigmoid(m.params["logits"]), m.t
                own = (1 - p) * (1 - t) ** 2 + p * t**2
                each = p * (1 - t) ** 2 + (1 - p) * t**2
                self.oracle = [own + each.sum() - each]
            else:
                self.oracle = hand_oracle_baseline(m)
        if self.stateful:
            left = self.warmup_draws
            while left > 0:
                n = min(self.warmup_chunk, left)
                self.draw(m, gen, n)
                left -= n

    def draw(self, m, gen, n):
        k = self.k

        def hard(i, a):
            return (rand(gen, a.shape) < sigmoid(a)).to(F64), None

        rec = m.run(batched(m.params, n * k), hard)
        cost = rec.cost  # (n * k,)
        extra = []
        for i, (h, a) in enumerate(zip(rec.values, rec.logits)):
            expand = (-1, *([1] * (h.dim() - 1)))
            if self.baseline == "none":
                b = 0.0
            elif self.baseline == "leave_one_out":
                c = cost.view(n, k)
                b = ((c.sum(1, keepdim=True) - c) / (k - 1)).reshape(expand)
            elif self.baseline == "moving_average":
                b = self.state.get("mean", 0.0)
            elif self.baseline == "learned":
                b = self.learned(i)[0].detach()
            elif self.mode == "oracle":
                b = self.oracle[i]
            else:
                s = self.state.get(i)
                b = 0.0 if s is None else s[0] / s[1]
            extra.append((h - sigmoid(a)) * (cost.view(expand) - b))
        g = mean_over_samples(m.backprop(rec, extra), n, k)
        # Update the state only after every draw of the chunk has used it.
        beta = self.decay
        if self.baseline == "moving_average":
            mean = cost.mean()
            old = self.state.get("mean")
            first = mean if self.init == "first" else (1 - beta) * mean
            self.state["mean"] = first if old is None else beta * old + (1 - beta) * mean
        elif self.baseline == "learned":
            for i in range(len(rec.values)):
                value, optim = self.learned(i)
                if not self.state[("fitted", i)]:
                    # start from the first batch's mean cost
                    value.data.fill_(float(cost.mean()))
                    self.state[("fitted", i)] = True
                # one Adam step on mean (L - b)^2: gradient -2 mean(L - b)
                value.grad = (-2 * (cost - value.detach()).mean()).to(value.dtype)
                optim.step()
        elif self.stateful:
            for i, (h, a) in enumerate(zip(rec.values, rec.logits)):
                sq = (h - sigmoid(a)) ** 2
                num = (sq * cost.view(-1, *([1] * (h.dim() - 1)))).mean(0)
                den = sq.mean(0)
                old = self.state.get(i)
                self.state[i] = (
                    (num, den)
                    if old is None
                    else (beta * old[0] + (1 - beta) * num, beta * old[1] + (1 - beta) * den)
                )
        return g

    def learned(self, i):
        """Site ``i``'s learned constant (objective dtype, float64 here) and its Adam."""
        if ("learned", i) not in self.state:
            value = torch.zeros((), dtype=torch.float64, requires_grad=True)
            self.state[("learned", i)] = (value, torch.optim.Adam([value], lr=self.lr))
            self.state[("fitted", i)] = False
        return self.state[("learned", i)]


class HandSurrogateUnit:
    """Straight-through, STS and the noisy rectifier: a value and its slope per unit."""

    def __init__(self, unit: Callable):
        self.unit = unit

    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        def rule(i, a):
            return self.unit(a, rand(gen, a.shape))

        rec = m.run(batched(m.params, n), rule)
        return m.backprop(rec, [0.0] * len(rec.values))


def straight_through_unit(variant):
    def unit(a, u):
        p = sigmoid(a)
        slope = torch.ones_like(a) if variant == "identity" else p * (1 - p)
        return (u < p).to(F64), slope

    return unit


def sts_unit(variant):
    def unit(a, u):
        p = sigmoid(a)
        b = (u < (p.sqrt() if variant == "paper" else p)).to(F64)
        # d/da sqrt(sigmoid(a)) = sqrt(p) (1 - p) / 2
        return b * p.sqrt(), b * p.sqrt() * (1 - p) / 2

    return unit


def noisy_rectifier_unit(noise, scale):
    def unit(a, u):
        un = u.numpy()
        z = special.ndtri(un) if noise == "gaussian" else special.logit(un)
        pre = a + scale * torch.from_numpy(z)
        return pre.clamp_min(0), (pre > 0).to(F64)

    return unit


class HandNodePerturbation:
    def __init__(self, sigma=0.1):
        self.sigma = sigma

    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        noise = []

        def clean(i, a):
            u = rand(gen, a.shape)
            xi = self.sigma * torch.randn(tuple(a.shape), generator=gen, dtype=F64)
            noise.append((u, xi))
            return (u < sigmoid(a)).to(F64), None

        def perturbed(i, a):
            u, xi = noise[i]
            return (u < sigmoid(a + xi)).to(F64), None

        params = batched(m.params, n)
        rec0 = m.run(params, clean)
        rec1 = m.run(params, perturbed)
        delta = (rec1.cost - rec0.cost) / self.sigma**2  # (n,)
        extra = [delta.view(-1, *([1] * (xi.dim() - 1))) * xi for _, xi in noise]
        return m.backprop(rec0, extra)


def flatten(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(flat, like):
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[..., start : start + v.numel()].reshape(*flat.shape[:-1], *v.shape)
        start += v.numel()
    return out


class HandSPSA:
    def __init__(self, c=0.1, num_pairs=1, common_random_numbers=True):
        self.c, self.j, self.crn = c, num_pairs, common_random_numbers

    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        theta = flatten(m.params)  # (P,)
        pairs = n * self.j
        delta = (2 * torch.randint(0, 2, (pairs, theta.numel()), generator=gen) - 1).to(F64)
        points = torch.cat([theta + self.c * delta, theta - self.c * delta])  # (2 pairs, P)

        def hard(i, a):
            unit = a.shape[1:]
            if self.crn:
                u = rand(gen, (pairs, *unit)).repeat(2, *([1] * len(unit)))
            else:
                u = rand(gen, (2 * pairs, *unit))
            return (u < sigmoid(a)).to(F64), None

        cost = m.run(unflatten(points, m.params), hard).cost
        g = ((cost[:pairs] - cost[pairs:]).unsqueeze(1) / (2 * self.c * delta)).view(n, self.j, -1)
        return unflatten(g.mean(1), m.params)


class HandFiniteDifference:
    def __init__(self, eps=0.1):
        self.eps = eps

    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        theta = flatten(m.params)
        p = theta.numel()
        rows = []
        for sign in (1.0, -1.0):
            for _ in range(n):
                for i in range(p):
                    x = theta.clone()
                    x[i] += sign * self.eps
                    rows.append(x)
        points = torch.stack(rows)  # (2 * n * P, P), ordered (sign, draw, coordinate)

        def hard(i, a):
            unit = a.shape[1:]
            u = rand(gen, (n, *unit))  # one per draw, shared by its 2P evaluations
            u = u[None, :, None].expand(2, n, p, *unit).reshape(2 * n * p, *unit)
            return (u < sigmoid(a)).to(F64), None

        cost = m.run(unflatten(points, m.params), hard).cost.view(2, n, p)
        return unflatten((cost[0] - cost[1]) / (2 * self.eps), m.params)


class HandExact:
    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        return {k: v.expand(n, *v.shape) for k, v in hand_exact(m).items()}


def hand_replay(hand, m, num_draws, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    hand.warmup(m, gen)
    parts, done = [], 0
    while done < num_draws:
        n = min(chunk, num_draws - done)
        parts.append(hand.draw(m, gen, n))
        done += n
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# The cases: every registered estimator, every score-function baseline
# ---------------------------------------------------------------------------------------------

WARM = dict(warmup_draws=250, warmup_chunk=100)  # chunks of 100, 100, 50

CASES: list[tuple[str, dict, Callable]] = [
    ("score_function", {}, lambda: HandScoreFunction()),
    ("score_function", {"num_samples": 3}, lambda: HandScoreFunction(num_samples=3)),
    ("score_function", {"baseline": "leave_one_out"}, lambda: HandScoreFunction("leave_one_out")),
    (
        "score_function",
        {"baseline": "leave_one_out", "num_samples": 4},
        lambda: HandScoreFunction("leave_one_out", 4),
    ),
    (
        "score_function",
        {"baseline": "moving_average", "decay": 0.8, **WARM},
        lambda: HandScoreFunction("moving_average", decay=0.8, **WARM),
    ),
    (
        "score_function",
        {"baseline": "moving_average", "init": "zero", **WARM},
        lambda: HandScoreFunction("moving_average", init="zero", **WARM),
    ),
    (
        "score_function",
        {"baseline": "learned", **WARM},
        lambda: HandScoreFunction("learned", **WARM),
    ),
    (
        "score_function",
        {"baseline": "learned", "num_samples": 2, "lr": 0.1, **WARM},
        lambda: HandScoreFunction("learned", 2, lr=0.1, **WARM),
    ),
    (
        "score_function",
        {"baseline": "optimal", **WARM},
        lambda: HandScoreFunction("optimal", **WARM),
    ),
    (
        "score_function",
        {"baseline": "optimal", "num_samples": 2, "decay": 0.5, **WARM},
        lambda: HandScoreFunction("optimal", 2, decay=0.5, **WARM),
    ),
    (
        "score_function",
        {"baseline": "optimal", "mode": "oracle"},
        lambda: HandScoreFunction("optimal", mode="oracle"),
    ),
    ("straight_through", {}, lambda: HandSurrogateUnit(straight_through_unit("identity"))),
    (
        "straight_through",
        {"variant": "sigmoid"},
        lambda: HandSurrogateUnit(straight_through_unit("sigmoid")),
    ),
    ("sts", {}, lambda: HandSurrogateUnit(sts_unit("paper"))),
    ("sts", {"variant": "code"}, lambda: HandSurrogateUnit(sts_unit("code"))),
    ("noisy_rectifier", {}, lambda: HandSurrogateUnit(noisy_rectifier_unit("gaussian", 1.0))),
    (
        "noisy_rectifier",
        {"noise": "logistic", "scale": 0.7},
        lambda: HandSurrogateUnit(noisy_rectifier_unit("logistic", 0.7)),
    ),
    ("node_perturbation", {}, lambda: HandNodePerturbation()),
    ("node_perturbation", {"sigma": 0.7}, lambda: HandNodePerturbation(0.7)),
    ("spsa", {}, lambda: HandSPSA()),
    (
        "spsa",
        {"c": 0.3, "num_pairs": 3, "common_random_numbers": False},
        lambda: HandSPSA(0.3, 3, False),
    ),
    ("spsa", {"c": 0.3, "num_pairs": 2}, lambda: HandSPSA(0.3, 2, True)),
    ("finite_difference", {}, lambda: HandFiniteDifference()),
    ("finite_difference", {"eps": 0.4}, lambda: HandFiniteDifference(0.4)),
    ("exact", {}, lambda: HandExact()),
    ("gumbel_softmax", {}, lambda: HandSurrogateUnit(gumbel_unit(0.5, "straight_through"))),
    (
        "gumbel_softmax",
        {"temperature": 0.7, "variant": "relaxed"},
        lambda: HandSurrogateUnit(gumbel_unit(0.7, "relaxed")),
    ),
    ("reinmax", {}, lambda: HandSurrogateUnit(reinmax_unit(1.0))),
    ("reinmax", {"temperature": 0.4}, lambda: HandSurrogateUnit(reinmax_unit(0.4))),
    ("gumbel_rao", {}, lambda: HandGumbelRao(0.5, 10)),
    ("gumbel_rao", {"temperature": 1.5, "num_samples": 3}, lambda: HandGumbelRao(1.5, 3)),
]

# Estimators whose batched core handles one stochastic layer only: replayed on the toy.
TOY_ONLY_CASES = [
    ("arm", {}, lambda: HandAntithetic("arm", 1)),
    ("arm", {"num_samples": 3}, lambda: HandAntithetic("arm", 3)),
    ("disarm", {}, lambda: HandAntithetic("disarm", 1)),
    ("disarm", {"num_samples": 2}, lambda: HandAntithetic("disarm", 2)),
]


def case_id(case):
    name, opts, _ = case
    return name + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")


def make_model(kind):
    if kind == "toy":
        return models.get(
            "toy", dim=5, target=0.3, logits=[-1.5, -0.5, 0.0, 0.4, 2.0], dtype=torch.float64
        )
    return models.get("sbn", dtype=torch.float64)


# Estimators with a trained state (and several runs per draw) are replayed, on the toy and on
# the stochastic binary network, in their own test module.
REPLAYED_IN_OWN_MODULE = {
    "rebar": "tests/estimators/test_rebar_relax.py",
    "relax": "tests/estimators/test_rebar_relax.py",
}


def test_every_registered_estimator_has_a_replay():
    covered = {name for name, _, _ in CASES + TOY_ONLY_CASES} | set(REPLAYED_IN_OWN_MODULE)
    missing = sorted(set(estimators.available()) - covered)
    assert not missing, f"estimators without an exact replay test: {missing}"


def test_every_score_function_baseline_has_a_replay():
    covered = {opts.get("baseline", "none") for name, opts, _ in CASES if name == "score_function"}
    assert covered == set(BASELINES), f"baselines without a replay: {set(BASELINES) - covered}"


@pytest.mark.parametrize("kind", ["toy", "sbn"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_replay_matches_hand_computation(case, kind):
    name, opts, make_hand = case
    obj = make_model(kind)
    got = estimators.get(name, **opts).estimate(obj, NUM_DRAWS, seed=SEED, chunk_size=CHUNK)
    want = hand_replay(make_hand(), hand_model(obj), NUM_DRAWS, CHUNK, SEED)
    assert list(got) == list(obj.params)
    for k in obj.params:
        assert got[k].shape == (NUM_DRAWS, *obj.params[k].shape)
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    # A replay that compares zeros with zeros proves nothing.
    assert any(float(got[k].abs().max()) > 0 for k in got)


@pytest.mark.parametrize("kind", ["toy", "sbn"])
def test_replay_distinguishes_seeds(kind):
    """The hand replay is sensitive to the stream: another seed gives other numbers."""
    obj = make_model(kind)
    got = estimators.get("score_function").estimate(obj, NUM_DRAWS, seed=SEED + 1)
    want = hand_replay(HandScoreFunction(), hand_model(obj), NUM_DRAWS, NUM_DRAWS, SEED)
    assert any(not torch.allclose(got[k], want[k]) for k in got)


def _binary_concrete(a, u, tau):
    return sigmoid((a + torch.log1p(-u) - torch.log(u)) / tau)


def gumbel_unit(tau, variant):
    def unit(a, u):
        z = _binary_concrete(a, u, tau)
        slope = z * (1 - z) / tau
        return (z if variant == "relaxed" else (u < sigmoid(a)).to(F64)), slope

    return unit


def reinmax_unit(tau):
    def unit(a, u):
        p = sigmoid(a)
        b = (u < p).to(F64)
        q = (b + sigmoid(a / tau)) / 2
        return b, 2 * q * (1 - q) - p * (1 - p) / 2

    return unit


class HandGumbelRao(HandSurrogateUnit):
    """Per site: the unit's uniforms, then K more, conditioned on the hard sample by hand."""

    def __init__(self, tau, k):
        self.tau, self.k = tau, k

    def draw(self, m, gen, n):
        def rule(i, a):
            u = rand(gen, a.shape)
            raw = rand(gen, (self.k, *a.shape))
            p = sigmoid(a)
            b = (u < p).to(F64)
            z = _binary_concrete(a, torch.where(b > 0, raw * p, p + raw * (1 - p)), self.tau)
            return b, (z * (1 - z) / self.tau).mean(0)

        rec = m.run(batched(m.params, n), rule)
        return m.backprop(rec, [0.0] * len(rec.values))


class HandAntithetic:
    """ARM / DisARM on the toy in closed form: one uniform block (n, 1, S, d) per chunk."""

    def __init__(self, kind, s):
        self.kind, self.s = kind, s

    def warmup(self, m, gen):
        pass

    def draw(self, m, gen, n):
        a = m.params["logits"]
        u = rand(gen, (n, 1, self.s, *a.shape))[:, 0]
        p = sigmoid(a)
        b, bt = (u < p).to(F64), (1 - u < p).to(F64)
        diff = (((bt - m.t) ** 2).sum(-1) - ((b - m.t) ** 2).sum(-1)).unsqueeze(-1)
        if self.kind == "arm":
            g = diff * (u - 0.5)
        else:
            g = -0.5 * diff * (1 - 2 * bt) * (b != bt).to(F64) * sigmoid(a.abs())
        return {"logits": g.mean(1)}


@pytest.mark.parametrize("case", TOY_ONLY_CASES, ids=[case_id(c) for c in TOY_ONLY_CASES])
def test_replay_toy_only(case):
    name, opts, make_hand = case
    obj = make_model("toy")
    got = estimators.get(name, **opts).estimate(obj, NUM_DRAWS, seed=SEED, chunk_size=CHUNK)
    want = hand_replay(make_hand(), hand_model(obj), NUM_DRAWS, CHUNK, SEED)
    torch.testing.assert_close(got["logits"], want["logits"], **TOL)
    assert float(got["logits"].abs().max()) > 0
