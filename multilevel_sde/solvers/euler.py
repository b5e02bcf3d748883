"""The (multilevel) Euler–Maruyama method on a fixed grid of times.

``y_{n+1} = y_n + F(t_n, y_n; h_n) h_n + g(t_n, y_n) dW_n``: with ``F`` the ML estimate this is ML-EM,
with a deterministic drift plain EM, and with no noise the (multilevel) Euler method for ODEs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..checks import NonFiniteError, all_finite
from ..drift import MultilevelDrift
from .base import Solver

__all__ = ["Euler"]

DriftFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class Euler(Solver):
    """(ML-)EM, or (ML-)Euler without noise.

    Args:
        times: the grid as a tensor (the dtype and device the levels see).
        steps: the step sizes as Python floats (``times[n+1] - times[n]`` computed in the grid's dtype).
        drift: ``drift(t_n, y_n, h_n)``.
        noise: ``noise(n, t_n, y_n)``, the diffusion term ``g dW`` of step ``n`` (None for an ODE).
        checked: the ``MultilevelDrift`` that ``drift`` samples, when the loop may take its checks over.
    """

    name = "ML-EM"

    def __init__(self, times: torch.Tensor, steps: list, drift: DriftFn, noise: Optional[NoiseFn] = None,
                 checked: Optional[MultilevelDrift] = None):
        super().__init__(times, checked)
        self.steps, self.drift, self.noise = steps, drift, noise

    def step(self, n: int, y: torch.Tensor) -> torch.Tensor:
        t, h = self.times[n], self.steps[n]
        return euler_update(y, self.drift(t, y, h), h, None if self.noise is None else self.noise(n, t, y))

    def checked_step(self, n: int, y: torch.Tensor) -> torch.Tensor:
        t, h = self.times[n], self.steps[n]
        f = self.drift(t, y, h)  # the drift raises NonFiniteError naming the level when the estimate is not finite
        g_dw = None if self.noise is None else self.noise(n, t, y)
        if g_dw is not None and not all_finite(g_dw):
            raise NonFiniteError(f"the noise term g dW holds NaN or inf at t={float(t):.6g}")
        out = euler_update(y, f, h, g_dw)
        if not all_finite(out):
            raise NonFiniteError(f"the state overflowed to NaN or inf in the step from t={float(t):.6g} to "
                                 f"t={float(self.times[n + 1]):.6g} (its drift estimate and noise were finite)")
        return out


def euler_update(y: torch.Tensor, f: torch.Tensor, h: float, g_dw: Optional[torch.Tensor]) -> torch.Tensor:
    """``(y + f h) + g dW``, rounded exactly as torchsde's Euler step, in one new tensor: the sum is built in
    place on the fresh product ``f h`` (addition commutes exactly), which spares two state-sized temporaries
    per step. Falls back to out-of-place sums when broadcasting or type promotion would change the result."""
    out = f * h
    if out.shape == y.shape and out.dtype == y.dtype:
        out += y
    else:
        out = y + out
    if g_dw is None:
        return out
    if g_dw.shape == out.shape and g_dw.dtype == out.dtype:
        out += g_dw
        return out
    return out + g_dw
