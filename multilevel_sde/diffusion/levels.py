"""Denoising networks as drifts: one rung of the ladder is ``F = (A_n x0 + (B_n - 1) x) / h_n`` (schedule.py).

The network's prediction is turned into a clipped ``x0`` *inside* the level, before any difference is taken
(spec §4.5), so ML-EM's telescoping acts on clipped ``x0`` estimates and stays unbiased. Levels see the
flattened state ``(B, C*H*W)`` that the core solvers use, and solver time ``s`` (a 0-d tensor, or ``(n,)``
per-sample times); the step index is found on the device, so no host synchronisation happens.

Prediction kinds (duck typing, no hard dependency):
- ``"eps"``: ``model(x_t, t) -> eps`` (``t`` integer timesteps ``(B,)``). A diffusers ``UNet2DModel`` fits
  too: an output with a ``.sample`` attribute is unwrapped.
- ``"x0"``: ``model(x_t, t) -> x0``.
- ``"k-diffusion"``: a k-diffusion denoiser ``model(x, sigma) -> x0`` in the variance-exploding
  parametrisation: ``x = x_t / sqrt(alpha_bar_t)``, ``sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .schedule import StepGrid

__all__ = ["DenoiserLevel", "LinearPart", "PREDICTIONS"]

PREDICTIONS = ("eps", "x0", "k-diffusion")


def _unwrap(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):  # diffusers' UNet2DOutput
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor (or an object with .sample)")


class _GridLookup(nn.Module):
    """Per-step coefficients on the device and the step index of a solver time."""

    def __init__(self, grid: StepGrid, device=None):
        super().__init__()
        for name, value in grid.tensors(device).items():
            self.register_buffer(name, value, persistent=False)
        self.register_buffer("mids", (self.times[:-1] + self.times[1:]) / 2, persistent=False)

    def index(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=self.times.dtype, device=self.times.device)
        return torch.searchsorted(self.mids, s).clamp(max=len(self.h) - 1)

    def coef(self, name: str, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        value = getattr(self, name)[n].to(like.dtype)
        return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


class DenoiserLevel(nn.Module):
    """A denoising network as the drift of the (DDPM or DDIM) sampling SDE on ``grid``.

    Args:
        model: the network (see the prediction kinds above).
        grid: the sampler's ``StepGrid``.
        image_shape: ``(C, H, W)``.
        prediction: "eps", "x0" or "k-diffusion".
        clip: clip ``x0`` to ``[-clip, clip]`` (None: no clipping).
    """

    def __init__(self, model: nn.Module, grid: StepGrid, image_shape: Sequence[int], prediction: str = "eps",
                 clip: Optional[float] = 1.0, device=None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model, self.prediction, self.clip = model, prediction, clip
        self.image_shape = tuple(int(s) for s in image_shape)
        self.lookup = _GridLookup(grid, device)

    def denoised(self, s, x: torch.Tensor) -> torch.Tensor:
        """The clipped ``x0`` estimate at solver time ``s`` for images ``x (B, C, H, W)``."""
        look = self.lookup
        n = look.index(s)
        steps = n.expand(x.shape[0]) if n.dim() == 0 else n
        sqrt_ab, sqrt_1m = look.coef("sqrt_ab", steps, x), look.coef("sqrt_1m_ab", steps, x)
        if self.prediction == "k-diffusion":
            x0 = _unwrap(self.model(x / sqrt_ab, (sqrt_1m / sqrt_ab).flatten()))
        else:
            out = _unwrap(self.model(x, look.t_from[steps]))
            x0 = out if self.prediction == "x0" else (x - sqrt_1m * out) / sqrt_ab
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0

    def forward(self, s, y: torch.Tensor) -> torch.Tensor:
        x = y.reshape(y.shape[0], *self.image_shape)
        n = self.lookup.index(s)
        steps = n.expand(x.shape[0]) if n.dim() == 0 else n
        A, B, h = (self.lookup.coef(k, steps, x) for k in ("A", "B", "h"))
        drift = (A * self.denoised(s, x) + (B - 1) * x) / h
        return drift.reshape(y.shape)


class LinearPart(nn.Module):
    """``f^0 = (B_n - 1) x / h_n``: the drift with ``x0 = 0``, exactly known (the alternative base of spec §4.5)."""

    def __init__(self, grid: StepGrid, device=None):
        super().__init__()
        self.lookup = _GridLookup(grid, device)

    def forward(self, s, y: torch.Tensor) -> torch.Tensor:
        n = self.lookup.index(s)
        steps = n.expand(y.shape[0]) if n.dim() == 0 else n
        B, h = self.lookup.coef("B", steps, y), self.lookup.coef("h", steps, y)
        return (B - 1) * y / h
