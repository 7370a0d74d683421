"""DisARM (Dong, Mnih & Tucker 2020, NeurIPS, Eq. 6): ARM Rao-Blackwellised over the pair.

Per unit, with ``b = 1[u < sigmoid(phi)]`` and ``b~ = 1[1 - u < sigmoid(phi)]``,

    g_phi = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|),

the conditional expectation of ARM's estimate given ``(b, b~)``, so never of larger variance.
Cost, bias, requirements and the Pyro-site behaviour are those of :mod:`.arm`
(``2 * num_samples`` evaluations per draw; unbiased for one stochastic layer).
"""

from __future__ import annotations

from .arm import _Antithetic, disarm_weight
from .registry import register


@register
class DisARM(_Antithetic):
    """ARM Rao-Blackwellised over ``u`` given the antithetic pair."""

    name = "disarm"
    description = "DisARM (Dong et al. 2020): ARM averaged over u given the antithetic pair"
    weight = staticmethod(disarm_weight)
