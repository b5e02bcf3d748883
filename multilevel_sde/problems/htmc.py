"""Synthetic "harder than Monte Carlo" ladders with a tunable cost exponent gamma (spec §12 item 10).

The true drift is ``f(x) = -x + sin(2x)/2`` (elementwise, Lipschitz, contracting on average); level ``l``
is ``f^l = f + eps_l sin(x + phi_l)`` with ``eps_l = 2^-l`` (or given) and seeded phases, so
``|f^l - f| <= eps_l`` everywhere, and costs ``(c 2^l)^gamma`` (= ``(c / eps_l)^gamma``). The reference
solution is fine-step EM of the true drift on the same Brownian path.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..brownian import GridBrownian
from ..integrate import sdeint
from ..sde import MultilevelSDE
from .ladders import Ladder

__all__ = ["htmc_drift", "htmc_ladder", "htmc_reference"]


def htmc_drift(t, y: torch.Tensor) -> torch.Tensor:
    """The true drift ``f(x) = -x + sin(2x) / 2``."""
    return -y + 0.5 * torch.sin(2 * y)


class _HTMCLevel:
    def __init__(self, eps: float, phase: torch.Tensor, level: int):
        self.eps, self.phase, self.__name__ = eps, phase, f"htmc_level_{level}"

    def __call__(self, t, y: torch.Tensor) -> torch.Tensor:
        return htmc_drift(t, y) + self.eps * torch.sin(y + self.phase.to(y))


def htmc_ladder(k: int, gamma: float, d: int = 1, c: float = 1.0, eps: Optional[Sequence[float]] = None,
                seed: int = 0) -> Ladder:
    """A ``k``-level ladder with ``|f^l - f| <= eps_l`` and cost ``(c / eps_l)^gamma`` per sample.

    Args:
        k: depth; gamma: cost exponent (> 0); d: dimension; c: cost constant (> 0);
        eps: accuracies, decreasing (default ``2^-l``); seed: seeds the phases ``phi_l ~ U[0, 2 pi)^d``.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not gamma > 0 or not c > 0 or not isinstance(d, int) or d < 1:
        raise ValueError(f"need gamma > 0, c > 0 and an integer d >= 1, got gamma={gamma!r}, c={c!r}, d={d!r}")
    eps_list = [2.0**-l for l in range(1, k + 1)] if eps is None else [float(e) for e in eps]
    if len(eps_list) != k or any(e <= 0 for e in eps_list):
        raise ValueError(f"eps must hold {k} positive accuracies, got {eps!r}")
    gen = torch.Generator().manual_seed(seed)
    phases = torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 * math.pi
    levels = [_HTMCLevel(eps_list[l], phases[l], l + 1) for l in range(k)]
    costs = [(c / e) ** gamma for e in eps_list]
    return Ladder(levels=levels, costs=costs, eps=eps_list)


def htmc_reference(y0: torch.Tensor, T: float, bm: GridBrownian, sigma: float = 1.0) -> torch.Tensor:
    """EM of the true drift on ``bm``'s own grid (its finest step), ``(batch, d)`` at time ``T``."""
    fine = float(bm.times[1] - bm.times[0])
    return sdeint(MultilevelSDE(htmc_drift, sigma), y0, [float(bm.times[0]), T], bm=bm, dt=fine)[-1]
