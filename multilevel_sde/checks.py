"""The core's checks of its inputs and outputs: errors are loud and early and name the argument and the value.

Used by the drift (times, states, costs, the levels' outputs, NaN/inf) and by the solvers (their NaN policy).
Host syncs only where a value must be read: a CPU time is checked for finiteness, a GPU one is not.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["NonFiniteError", "all_finite", "raise_non_finite", "check_time", "check_state", "check_output",
           "check_costs", "check_probabilities", "time_repr", "as_level"]

TimeLike = Union[float, torch.Tensor]


class NonFiniteError(ValueError, FloatingPointError):
    """A level (or the state) produced NaN or inf; the message names the level and the time."""


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: one reduction, and the full check only when the sum is not finite."""
    return math.isfinite((x.detach() if x.requires_grad else x).sum().item()) or bool(torch.isfinite(x).all())


def raise_non_finite(t: TimeLike, y: torch.Tensor, outputs: dict) -> None:
    """Raises the ``NonFiniteError`` that names why an estimate from ``y`` at ``t`` is not finite: the state, the
    first of the levels' ``outputs`` ``{level: tensor}`` (level 0: the base) that is not, or else the sum."""
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteError(f"the state y holds NaN or inf at t={time_repr(t)}")
    for level in sorted(outputs):
        if not bool(torch.isfinite(outputs[level]).all()):
            name = "base (level 0)" if level == 0 else f"level {level}"
            raise NonFiniteError(f"{name} returned NaN or inf at t={time_repr(t)}")
    raise NonFiniteError(f"the ML estimate overflowed (NaN or inf) at t={time_repr(t)}; check the probabilities")


def time_repr(t: TimeLike) -> str:
    if isinstance(t, torch.Tensor) and t.numel() != 1:
        return f"tensor of shape {tuple(t.shape)}"
    return f"{float(t):.6g}"


def check_state(y) -> None:
    """``y`` must be a tensor ``(batch, ...)`` with ``batch >= 1``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[0] == 0:
        raise ValueError(f"y must have shape (batch, ...) with batch >= 1, got {tuple(y.shape)}")


def check_time(t, batch: int) -> None:
    """``t`` must be a finite real number, or a real tensor / array that is 0-d or ``(batch,)`` (per-sample times;
    finiteness is checked for host values only, to keep a GPU solve free of host syncs)."""
    cls = t.__class__
    if cls is float:
        if t - t != 0.0:
            raise ValueError(f"t must be a finite number, got {t!r}")
        return
    if cls is torch.Tensor or isinstance(t, (torch.Tensor, np.ndarray)):
        shape = tuple(t.shape)
        if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, batch)):
            raise ValueError(f"t must be a number, a 0-d tensor or a (batch,) tensor of per-sample times (batch "
                             f"{batch}), got shape {shape}")
        if isinstance(t, np.ndarray):
            if t.dtype.kind not in "iuf" or not np.isfinite(t).all():
                raise ValueError(f"t must hold finite real times, got {t!r}")
        elif t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold real times, got a tensor of dtype {t.dtype}")
        elif t.device.type == "cpu" and t.numel() == 1 and not math.isfinite(float(t)):
            raise ValueError(f"t must be finite, got {float(t)!r}")
        return
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise TypeError(f"t must be a number or a tensor of times, got {t!r} ({type(t).__name__})")
    if not math.isfinite(t):
        raise ValueError(f"t must be a finite number, got {t!r}")


def check_output(out, y: torch.Tensor, who: str, t: TimeLike) -> None:
    """``out``, what ``who`` returned for the state ``y`` at ``t``, must be a tensor like ``y``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who} must return a tensor, got {type(out).__name__} at t={time_repr(t)}")
    if out.shape != y.shape:
        raise ValueError(f"{who} returned shape {tuple(out.shape)} for a state of shape {tuple(y.shape)}")
    if out.dtype != y.dtype:
        raise ValueError(f"{who} returned dtype {out.dtype} for a state of dtype {y.dtype}")
    if out.device != y.device:
        raise ValueError(f"{who} returned a tensor on {out.device} for a state on {y.device}")


def check_probabilities(p: torch.Tensor, schedule, t: TimeLike, dt: Optional[float]) -> None:
    """The float64 CPU probabilities ``p`` that ``schedule`` gave at ``(t, dt)`` must lie in ``(0, 1]``."""
    values = p.numpy()
    if not (values.min() > 0 and values.max() <= 1):
        raise ValueError(f"probabilities must lie in (0, 1]; {schedule!r} gave {values.tolist()} at t={time_repr(t)}, "
                         f"dt={dt!r}")


def check_costs(costs, k: int) -> Optional[torch.Tensor]:
    """``costs`` as a float64 CPU tensor ``(k,)`` of finite positive numbers (None stays None)."""
    if costs is None:
        return None
    try:
        vec = torch.as_tensor(costs, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"costs must be a sequence of {k} numbers, got {costs!r}") from err
    if vec.numel() != k:
        raise ValueError(f"costs must have one entry per level ({k}), got {vec.numel()}: {vec.tolist()}")
    bad = [(i + 1, v) for i, v in enumerate(vec.tolist()) if not (v > 0 and v < float("inf"))]
    if bad:
        raise ValueError(f"costs must be finite and > 0; got {vec.tolist()} (level, value) {bad}")
    return vec


class _FunctionLevel(nn.Module):
    """Holds a plain callable ``f(t, y)`` inside an ``nn.ModuleList``."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, t, y):
        return self.fn(t, y)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def as_level(fn, name: str) -> nn.Module:
    """A level ``f(t, y)`` as an ``nn.Module`` (a module as it is); a TypeError naming ``name`` unless callable."""
    if isinstance(fn, nn.Module):
        return fn
    if not callable(fn):
        raise TypeError(f"{name} must be callable f(t, y) -> tensor, got {fn!r}")
    return _FunctionLevel(fn)
