"""The (multilevel) Euler–Maruyama step loop on a fixed grid of times.

``y_{n+1} = y_n + F(t_n, y_n; h_n) h_n + g(t_n, y_n) dW_n``: with ``F`` the ML estimate this is ML-EM,
with a deterministic drift plain EM, and with no noise the (multilevel) Euler method for ODEs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..drift import NonFiniteError, StepLog, _all_finite
from .grid import OutputPlan

__all__ = ["integrate_em", "CHECK_EVERY"]

CHECK_EVERY = 16  # steps between two checks of the state when the drift's per-step checks are deferred

DriftFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def integrate_em(
    y0: torch.Tensor,
    times: torch.Tensor,
    steps: list,
    plan: OutputPlan,
    drift: DriftFn,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    progress: bool = False,
    step_log: Optional[StepLog] = None,
) -> torch.Tensor:
    """Runs ``len(steps)`` EM steps and returns the states at the plan's outputs, ``(outputs, *y0.shape)``.

    Args:
        y0: initial state.
        times: the grid as a tensor (``len(steps) + 1`` times, the dtype and device levels see).
        steps: step sizes as Python floats (``times[n+1] - times[n]`` computed in the grid's dtype).
        plan: which states (and interpolation weights) make the outputs.
        drift: ``drift(t_n, y_n, h_n)``.
        noise: ``noise(n, t_n, y_n)``, the diffusion term ``g dW`` of step ``n`` (None for an ODE).
        callback: called as ``callback(n, t_{n+1}, y_{n+1})`` after each step.
        progress: show a tqdm progress bar.
        step_log: the log of a ``MultilevelDrift`` whose per-step finiteness checks are deferred
            (``MultilevelDrift.deferred_checks``): the state is then checked every ``CHECK_EVERY`` steps and
            after the last one instead, and a non-finite state is traced to its cause by replaying the steps
            since the last good check (``NonFiniteError`` naming the level and the time).
    """
    wanted: dict[int, list[int]] = {}
    for j, n in enumerate(plan.step):
        wanted.setdefault(n, []).append(j)
    outputs: list[Optional[torch.Tensor]] = [None] * len(plan.step)

    def emit(n: int, prev: Optional[torch.Tensor], curr: torch.Tensor) -> None:
        for j in wanted.get(n, ()):
            if plan.w_prev[j] == 0.0:
                outputs[j] = curr
            elif plan.delta_form:
                outputs[j] = prev + plan.w_curr[j] * (curr - prev)
            else:
                outputs[j] = plan.w_prev[j] * prev + plan.w_curr[j] * curr

    y = y0
    emit(0, None, y)
    checked_n, checked_y = 0, y0  # the last state the deferred checks found finite (y0: not yet checked)
    bar = tqdm(total=len(steps), disable=not progress, desc="ML-EM", leave=False)
    for n, h in enumerate(steps):
        t = times[n]
        y_next = _euler_update(y, drift(t, y, h), h, None if noise is None else noise(n, t, y))
        if callback is not None:
            callback(n, times[n + 1], y_next)
        emit(n + 1, y, y_next)
        y = y_next
        bar.update(1)
        if step_log is not None and ((n + 1) % CHECK_EVERY == 0 or n + 1 == len(steps)):
            if not _all_finite(y):
                bar.close()
                _trace_non_finite(step_log, checked_n, checked_y, n + 1, times, steps, drift, noise)
            checked_n, checked_y = n + 1, y
            step_log.clear()
    bar.close()
    return torch.stack(outputs, dim=0)


def _trace_non_finite(log: StepLog, start: int, y: torch.Tensor, stop: int, times: torch.Tensor, steps: list,
                      drift: DriftFn, noise: Optional[NoiseFn]) -> None:
    """Replays steps ``start .. stop - 1`` from their first state ``y`` with the logged coins, checking each
    estimate (the drift names the level, or the state), noise term and new state; raises ``NonFiniteError``."""
    with log.replaying():
        for n in range(start, stop):
            t, h = times[n], steps[n]
            f = drift(t, y, h)  # raises NonFiniteError when the estimate is not finite
            g_dw = None if noise is None else noise(n, t, y)
            if g_dw is not None and not _all_finite(g_dw):
                raise NonFiniteError(f"the noise term g dW holds NaN or inf at t={float(t):.6g}")
            y = _euler_update(y, f, h, g_dw)
            if not _all_finite(y):
                raise NonFiniteError(f"the state overflowed to NaN or inf in the step from t={float(t):.6g} to "
                                     f"t={float(times[n + 1]):.6g} (its drift estimate and noise were finite)")
    raise NonFiniteError(f"the state became NaN or inf between t={float(times[start]):.6g} and "
                         f"t={float(times[stop]):.6g}, but replaying these steps gave finite values: a level or "
                         "the diffusion is not deterministic")


def _euler_update(y: torch.Tensor, f: torch.Tensor, h: float, g_dw: Optional[torch.Tensor]) -> torch.Tensor:
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
