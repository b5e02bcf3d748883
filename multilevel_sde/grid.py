"""Time grids and output interpolation with torchsde's and torchdiffeq's exact float semantics (used by the
solvers, ``GridBrownian`` and ``learning``).

torchsde steps ``t <- min(t + dt, ts[-1])`` in the dtype of ``ts`` and interpolates outputs linearly in the
last step taken; torchdiffeq builds ``arange(n) * step + t[0]`` and interpolates in the step that covers
each output. Reproducing both to the last bit lets our solvers match theirs to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["uniform_grid", "validate_grid", "as_times", "numpy_dtype", "OutputPlan", "torchsde_output_plan",
           "torchdiffeq_grid", "torchdiffeq_output_plan"]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def numpy_dtype(dtype: torch.dtype):
    return _NUMPY_DTYPES.get(dtype, np.float64)


def as_times(name: str, ts, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``ts`` as a 1-D, finite, strictly increasing tensor (a list of numbers takes ``dtype``)."""
    if not torch.is_tensor(ts):
        if not isinstance(ts, (list, tuple, np.ndarray)):
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of floats, got {type(ts).__name__}")
        ts = torch.tensor(ts, dtype=dtype, device=device)
    if ts.dim() != 1 or ts.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    if not ts.is_floating_point():
        ts = ts.to(dtype)
    host = ts.detach().cpu()
    if not torch.isfinite(host).all():
        raise ValueError(f"{name} must be finite, got {host.tolist()}")
    if ts.numel() > 1 and not (host[1:] > host[:-1]).all():
        raise ValueError(f"{name} must be strictly increasing, got {host.tolist()}")
    return ts


def uniform_grid(t0: float, t1: float, dt: float, np_dtype=np.float64) -> np.ndarray:
    """Step times of torchsde's fixed-step loop: ``t <- min(t + dt, t1)`` accumulated in ``np_dtype``."""
    if not np.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    t, end, step = np_dtype(t0), np_dtype(t1), dt
    times = [t]
    while t < end:
        t = min(np_dtype(t + step), end)
        times.append(t)
    return np.asarray(times, dtype=np_dtype)


def validate_grid(name: str, grid: Union[Sequence[float], np.ndarray, torch.Tensor]) -> np.ndarray:
    """A user grid as a float64 numpy array, checked finite and strictly increasing with >= 1 step."""
    if torch.is_tensor(grid):
        arr = grid.detach().cpu().numpy()
    else:
        arr = np.asarray(grid)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 times, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if not (np.diff(arr) > 0).all():
        raise ValueError(f"{name} must be strictly increasing, got {arr.tolist()}")
    return arr


@dataclass(frozen=True)
class OutputPlan:
    """Which solver state feeds each output time.

    For output ``j``, ``step[j]`` is the number of steps taken before it is read; the output is
    ``w_prev[j] * y(step-1) + w_curr[j] * y(step)`` (``w_prev = 0`` when the time is on the grid, and then
    the state is taken as is).
    """

    step: list
    w_prev: list
    w_curr: list
    delta_form: bool = False  # torchdiffeq's y0 + w_curr * (y1 - y0) instead of w_prev * y0 + w_curr * y1


def torchsde_output_plan(grid: np.ndarray, ts: np.ndarray) -> OutputPlan:
    """Replicates torchsde's ``integrate`` loop: step while ``t < out_t``, interpolate in the last step."""
    step, w_prev, w_curr = [0], [0.0], [1.0]
    n = 0
    for out_t in ts[1:]:
        while grid[n] < out_t:
            n += 1
        t0, t1 = grid[n - 1], grid[n]
        if out_t == t1:
            step.append(n), w_prev.append(0.0), w_curr.append(1.0)
        else:
            step.append(n), w_prev.append(float((t1 - out_t) / (t1 - t0))), w_curr.append(float((out_t - t0) / (t1 - t0)))
    return OutputPlan(step, w_prev, w_curr)


def torchdiffeq_grid(t: torch.Tensor, step_size: float) -> torch.Tensor:
    """torchdiffeq's ``_grid_constructor_from_step_size`` (same arithmetic, on the CPU)."""
    t = t.detach().cpu()
    start, end = t[0], t[-1]
    niters = max(2, torch.ceil((end - start) / step_size + 1).item())
    grid = torch.arange(0, niters, dtype=t.dtype) * step_size + start
    grid[-1] = t[-1]
    return grid


def torchdiffeq_output_plan(grid: np.ndarray, t: np.ndarray) -> OutputPlan:
    """torchdiffeq's fixed-grid outputs: after the step ``[t0, t1]``, every ``t[j] <= t1`` not yet written
    is ``y0`` at ``t0``, ``y1`` at ``t1``, else ``y0 + (t - t0)/(t1 - t0) (y1 - y0)``."""
    step, w_prev, w_curr = [0], [0.0], [1.0]
    j = 1
    for n in range(1, len(grid)):
        t0, t1 = grid[n - 1], grid[n]
        while j < len(t) and t1 >= t[j]:
            if t[j] == t1:
                step.append(n), w_prev.append(0.0), w_curr.append(1.0)
            elif t[j] == t0:
                step.append(n - 1), w_prev.append(0.0), w_curr.append(1.0)
            else:
                slope = float((t[j] - t0) / (t1 - t0))
                step.append(n), w_prev.append(1.0 - slope), w_curr.append(slope)
            j += 1
    return OutputPlan(step, w_prev, w_curr, delta_form=True)
