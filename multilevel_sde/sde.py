"""MultilevelSDE: ``dX = F dt + g dW`` in torchsde's SDE protocol, with ``F`` the ML-EM drift estimate.

``torchsde.sdeint(sde, y0, ts, method="euler", dt=sde.dt)`` runs it and gives ML-EM; so does
``mlsde.sdeint``, which also passes the true step size of every step (the last, shorter step and
non-uniform grids) and returns statistics.
"""

from __future__ import annotations

import inspect
import math
from numbers import Number
from typing import Callable, Optional, Union

import torch

from .drift import MultilevelDrift

__all__ = ["MultilevelSDE", "NOISE_TYPES"]

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")


def _takes_state(fn: Callable) -> bool:
    """True when ``fn`` needs two positional arguments ``(t, y)``; False for a function of ``t`` alone."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return True
    return len(params) >= 2


class MultilevelSDE(torch.nn.Module):
    """An Itô SDE whose drift is a ``MultilevelDrift`` (or any ``f(t, y)``) and whose diffusion is given.

    Args:
        drift: a ``MultilevelDrift`` (``f`` is then its random estimate) or any callable ``f(t, y)``.
        diffusion: a number ``sigma``, a function of time ``sigma(t)`` (a number or a tensor that
            broadcasts to ``g``'s shape), or a state-dependent ``g(t, y)`` returning torchsde's shape for
            the noise type. The first two are state-independent (``state_independent_noise`` is True).
        noise_type: ``"diagonal"`` (``g`` is ``(batch, d)``), ``"scalar"`` (``(batch, d, 1)``),
            ``"additive"`` or ``"general"`` (``(batch, d, m)``). A number or ``sigma(t)`` gives
            ``sigma * I`` (``m = d``) for the last two.
        dt: the step size ``f`` is estimated for (the schedules proportional to ``dt`` need it).
    """

    sde_type = "ito"

    def __init__(
        self,
        drift: Union[MultilevelDrift, Callable],
        diffusion: Union[Number, Callable],
        noise_type: str = "diagonal",
        dt: Optional[float] = None,
    ):
        super().__init__()
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if not callable(drift):
            raise TypeError(f"drift must be a MultilevelDrift or a callable f(t, y), got {drift!r}")
        if dt is not None and (isinstance(dt, bool) or not isinstance(dt, Number) or not math.isfinite(dt) or dt <= 0):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        self.drift = drift
        self.noise_type = noise_type
        self.dt = None if dt is None else float(dt)
        if isinstance(diffusion, Number) and not isinstance(diffusion, bool):
            if not math.isfinite(diffusion):
                raise ValueError(f"diffusion must be finite, got {diffusion!r}")
            self._sigma: Optional[Callable] = lambda t, s=float(diffusion): s
            self._g = None
        elif callable(diffusion):
            if _takes_state(diffusion):
                self._sigma, self._g = None, diffusion
            else:
                self._sigma, self._g = diffusion, None
        else:
            raise TypeError(f"diffusion must be a number, sigma(t) or g(t, y), got {diffusion!r}")
        self.diffusion = diffusion

    @property
    def state_independent_noise(self) -> bool:
        """True when the diffusion is a number or a function of time alone."""
        return self._sigma is not None

    @property
    def multilevel(self) -> Optional[MultilevelDrift]:
        return self.drift if isinstance(self.drift, MultilevelDrift) else None

    def sigma(self, t) -> Union[float, torch.Tensor]:
        """The state-independent noise scale at ``t``; a ValueError for a state-dependent ``g(t, y)``."""
        if self._sigma is None:
            raise ValueError("this SDE's diffusion g(t, y) depends on the state; it has no sigma(t)")
        return self._sigma(t)

    # -- torchsde protocol --------------------------------------------------------------------------
    def f_step(self, t, y: torch.Tensor, dt: Optional[float]) -> torch.Tensor:
        """The drift for a step of size ``dt``: the ML estimate, or ``drift(t, y)`` for a plain drift."""
        if isinstance(self.drift, MultilevelDrift):
            return self.drift.sample(t, y, dt)
        return self.drift(t, y)

    def f(self, t, y: torch.Tensor) -> torch.Tensor:
        return self.f_step(t, y, self.dt)

    def g(self, t, y: torch.Tensor) -> torch.Tensor:
        if self._g is not None:
            return self._g(t, y)
        sigma = torch.as_tensor(self._sigma(t), dtype=y.dtype, device=y.device)
        if self.noise_type == "diagonal":
            return sigma.expand_as(y) if sigma.dim() == 0 else sigma * torch.ones_like(y)
        if self.noise_type == "scalar":
            return (sigma * torch.ones_like(y)).unsqueeze(-1)
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        return (sigma * eye).expand(y.shape[0], -1, -1) if sigma.dim() == 0 else sigma.expand(y.shape[0], -1, -1)

    def g_prod(self, t, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``g(t, y) @ v``, without building ``g`` for the state-independent scalar cases."""
        if self._sigma is not None:
            sigma = self._sigma(t)
            if isinstance(sigma, Number) or (torch.is_tensor(sigma) and sigma.dim() == 0):
                return sigma * v if self.noise_type != "scalar" else sigma * v.expand_as(y)
        g = self.g(t, y)
        if self.noise_type == "diagonal":
            return g * v
        return torch.bmm(g, v.unsqueeze(-1)).squeeze(-1)

    def noise_channels(self, t, y: torch.Tensor) -> int:
        """Number of Brownian channels ``m`` at a state ``y`` of shape ``(batch, d)``."""
        if self.noise_type == "scalar":
            return 1
        if self.noise_type == "diagonal":
            return y.shape[1]
        return self.g(t, y).shape[-1]

    def extra_repr(self) -> str:
        kind = "state-independent" if self.state_independent_noise else "g(t, y)"
        return f"noise_type={self.noise_type!r}, dt={self.dt}, diffusion={kind}"
