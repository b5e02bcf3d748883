"""Linear SDEs with exact solutions: Ornstein–Uhlenbeck, geometric Brownian motion, ``dX = (AX + b)dt + B dW``.

Each problem gives its true drift ``drift(t, y)``, what to pass as ``MultilevelSDE``'s ``diffusion``, its
``noise_type``, ``sde(drift=None, dt=None)``, the exact law (``mean``, ``covariance``) and the strong
solution ``strong_solution(y0, ts, bm)`` driven by a given ``GridBrownian`` path. All are time-homogeneous:
times in ``mean``/``covariance`` are elapsed times, and ``strong_solution`` starts at ``bm.times[0]``.
States are ``(batch, d)``; results come back in ``y0``'s dtype and device (computed in float64).
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..brownian import GridBrownian
from ..sde import MultilevelSDE

__all__ = ["OrnsteinUhlenbeck", "GeometricBrownianMotion", "LinearSDE"]

F64 = torch.float64
Times = Union[Sequence[float], torch.Tensor, np.ndarray]
TimeLike = Union[float, torch.Tensor]


# -- validation ------------------------------------------------------------------------------------
def as_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Number) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _dim(d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    return int(d)


def _matrix(name: str, value, ndim: int) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=F64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a {ndim}-D array of numbers, got {value!r}") from err
    if out.dim() != ndim or 0 in out.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _state(y0, d: int) -> torch.Tensor:
    if not isinstance(y0, torch.Tensor) or not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor of shape (batch, {d}), got {y0!r}")
    if y0.dim() != 2 or y0.shape[1] != d or y0.shape[0] == 0:
        raise ValueError(f"y0 must have shape (batch, {d}), got {tuple(y0.shape)}")
    return y0


# -- the Brownian path on its grid -----------------------------------------------------------------
def _grid_indices(bm: GridBrownian, ts: Times) -> list[int]:
    """The grid index of every time in ``ts`` (each must be a grid time, within 1e-3 of the spacing)."""
    times = np.asarray(ts.detach().cpu() if torch.is_tensor(ts) else ts, dtype=np.float64).reshape(-1)
    if times.size == 0:
        raise ValueError("ts must hold at least one time, got none")
    out = []
    for t in times:
        j = bm.index_of(t)  # ValueError off the grid
        spacing = bm.times[min(j + 1, bm.num_steps)] - bm.times[max(j - 1, 0)]
        if abs(bm.times[j] - t) > 1e-3 * spacing:
            raise ValueError(f"ts must lie on bm's grid: t={t!r} is not a grid time (nearest {bm.times[j]!r})")
        out.append(j)
    return out


def _walk(y0: torch.Tensor, ts: Times, bm: GridBrownian, channels: int, step: Optional[Callable],
          read: Callable) -> torch.Tensor:
    """Walks ``bm``'s grid from ``bm.times[0]`` to the last of ``ts`` (memory ``O(batch * channels)``).

    ``carry = step(carry, h, w, w_next)`` advances a quadrature along each grid step (``carry`` starts as
    None; ``w`` is ``W - W(times[0])`` in float64 ``(batch, channels)``); ``read(carry, s, w)`` is the
    solution at elapsed time ``s``, ``(batch, d)``. Returns ``(len(ts), batch, d)`` in ``y0``'s dtype.
    """
    if not isinstance(bm, GridBrownian):
        raise TypeError(f"bm must be a multilevel_sde.GridBrownian, got {type(bm).__name__}")
    if tuple(bm.shape) != (y0.shape[0], channels):
        raise ValueError(f"bm must have shape (batch={y0.shape[0]}, channels={channels}), got {tuple(bm.shape)}")
    idx = _grid_indices(bm, ts)
    wanted: dict[int, list[int]] = {}
    for j, i in enumerate(idx):
        wanted.setdefault(i, []).append(j)
    outs: list[Optional[torch.Tensor]] = [None] * len(idx)
    w = torch.zeros(y0.shape[0], channels, dtype=F64, device=y0.device)
    carry = None
    for i in range(max(idx) + 1):
        for j in wanted.get(i, ()):
            outs[j] = read(carry, float(bm.times[i] - bm.times[0]), w)
        if i == max(idx):
            break
        w_next = w + bm.increment(i).to(device=y0.device, dtype=F64)
        if step is not None:
            carry = step(carry, float(bm.times[i + 1] - bm.times[i]), w, w_next)
        w = w_next
    return torch.stack(outs).to(y0.dtype)


def _elapsed(t) -> float:
    return as_number("t", t, nonnegative=True)


# -- problems --------------------------------------------------------------------------------------
class _Problem:
    """Shared parts: ``d``, ``noise_channels``, ``sde()``; subclasses set ``noise_type`` and ``diffusion``."""

    noise_type = "diagonal"
    d: int
    diffusion: Union[float, Callable]

    @property
    def noise_channels(self) -> int:
        """Number of Brownian channels ``m`` (the ``bm`` size is ``(batch, m)``)."""
        return self.d

    def drift(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sde(self, drift: Optional[Callable] = None, dt: Optional[float] = None) -> MultilevelSDE:
        """``MultilevelSDE`` with ``drift`` (a ``MultilevelDrift`` or any ``f(t, y)``; default the true drift)."""
        return MultilevelSDE(self.drift if drift is None else drift, self.diffusion, self.noise_type, dt=dt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"


class OrnsteinUhlenbeck(_Problem):
    """``dX = theta (mu - X) dt + sigma dW``, ``d`` independent coordinates (diagonal noise, ``theta > 0``).

    ``mean = mu + (y0 - mu) e^{-theta t}`` ``(batch, d)``; ``covariance = sigma^2 (1 - e^{-2 theta t}) / (2 theta) I``
    ``(d, d)`` (independent of ``y0``). ``strong_solution`` is exact up to the quadrature of
    ``int e^{-theta (t - s)} W_s ds`` by the trapezoid rule on ``bm``'s grid (spacing ``h``): O(h^2) from the
    conditional mean given the grid values, plus the sub-grid (Brownian-bridge) part of the path that no
    function of the grid values sees, of RMS at most ``theta sigma h sqrt(t / 12)``.
    """

    noise_type = "diagonal"

    def __init__(self, theta: float = 1.0, mu: float = 0.0, sigma: float = 1.0, d: int = 1):
        self.theta = as_number("theta", theta, positive=True)
        self.mu = as_number("mu", mu)
        self.sigma = as_number("sigma", sigma, nonnegative=True)
        self.d = _dim(d)
        self.diffusion = self.sigma

    def _repr_args(self) -> str:
        return f"theta={self.theta}, mu={self.mu}, sigma={self.sigma}, d={self.d}"

    @property
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The drift as ``A y + b``: ``(A (d, d), b (d,))`` in float64."""
        return -self.theta * torch.eye(self.d, dtype=F64), torch.full((self.d,), self.theta * self.mu, dtype=F64)

    def drift(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        return self.theta * (self.mu - y)

    def mean(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``E[X_t | X_0 = y0]``, ``(batch, d)``."""
        y0 = _state(y0, self.d)
        return self.mu + (y0 - self.mu) * math.exp(-self.theta * _elapsed(t))

    def covariance(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``Cov[X_t | X_0 = y0]``, ``(d, d)`` (the same for every ``y0``)."""
        y0 = _state(y0, self.d)
        var = self.sigma**2 * -math.expm1(-2 * self.theta * _elapsed(t)) / (2 * self.theta)
        return var * torch.eye(self.d, dtype=y0.dtype, device=y0.device)

    def strong_solution(self, y0: torch.Tensor, ts: Times, bm: GridBrownian) -> torch.Tensor:
        """``X`` at the grid times ``ts`` for ``X(bm.times[0]) = y0`` on the path ``bm``: ``(len(ts), batch, d)``.

        Uses ``X_t = mu + (y0 - mu) e^{-theta t} + sigma (W_t - theta J_t)``, ``J_t = int_0^t e^{-theta (t-s)} W_s ds``
        (integration by parts), ``J`` by the trapezoid rule on ``bm``'s grid.
        """
        y0 = _state(y0, self.d)
        x0, theta = y0.to(F64), self.theta

        def step(J, h, w, w_next):
            decay = math.exp(-theta * h)
            J = torch.zeros_like(w) if J is None else J
            return decay * J + 0.5 * h * (decay * w + w_next)

        def read(J, s, w):
            out = self.mu + (x0 - self.mu) * math.exp(-theta * s) + self.sigma * w
            return out if J is None else out - self.sigma * theta * J

        return _walk(y0, ts, bm, self.d, step, read)


class GeometricBrownianMotion(_Problem):
    """``dX = mu X dt + sigma X dW``, coordinate-wise (diagonal noise ``g(t, y) = sigma y``).

    ``mean = y0 e^{mu t}`` ``(batch, d)``; ``covariance = diag(y0^2 e^{2 mu t} (e^{sigma^2 t} - 1))``
    ``(batch, d, d)``; ``strong_solution`` is exact: ``X_t = y0 exp((mu - sigma^2 / 2) t + sigma W_t)``.
    """

    noise_type = "diagonal"

    def __init__(self, mu: float = 0.0, sigma: float = 1.0, d: int = 1):
        self.mu = as_number("mu", mu)
        self.sigma = as_number("sigma", sigma, nonnegative=True)
        self.d = _dim(d)
        self.diffusion = self.g

    def _repr_args(self) -> str:
        return f"mu={self.mu}, sigma={self.sigma}, d={self.d}"

    @property
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The drift as ``A y + b``: ``(mu I (d, d), 0 (d,))`` in float64."""
        return self.mu * torch.eye(self.d, dtype=F64), torch.zeros(self.d, dtype=F64)

    def drift(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        return self.mu * y

    def g(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """The diagonal diffusion ``sigma y``, ``(batch, d)``."""
        return self.sigma * y

    def mean(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``E[X_t | X_0 = y0]``, ``(batch, d)``."""
        return _state(y0, self.d) * math.exp(self.mu * _elapsed(t))

    def covariance(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``Cov[X_t | X_0 = y0]``, ``(batch, d, d)`` (diagonal; it depends on ``y0``)."""
        t = _elapsed(t)
        var = _state(y0, self.d) ** 2 * math.exp(2 * self.mu * t) * math.expm1(self.sigma**2 * t)
        return torch.diag_embed(var)

    def strong_solution(self, y0: torch.Tensor, ts: Times, bm: GridBrownian) -> torch.Tensor:
        """``X`` at the grid times ``ts`` for ``X(bm.times[0]) = y0`` on the path ``bm``: ``(len(ts), batch, d)``."""
        y0 = _state(y0, self.d)
        x0, drift = y0.to(F64), self.mu - 0.5 * self.sigma**2
        return _walk(y0, ts, bm, self.d, None, lambda _, s, w: x0 * torch.exp(drift * s + self.sigma * w))


def _expm_affine(A: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e^{At}, int_0^t e^{As} ds)`` from one exponential of the block matrix ``[[A, I], [0, 0]] t``."""
    d = A.shape[0]
    block = torch.zeros(2 * d, 2 * d, dtype=F64)
    block[:d, :d], block[:d, d:] = A, torch.eye(d, dtype=F64)
    E = torch.linalg.matrix_exp(block * t)
    return E[:d, :d], E[:d, d:]


class LinearSDE(_Problem):
    """``dX = (A X + b) dt + B dW`` with additive noise: ``A`` ``(d, d)``, ``b`` ``(d,)`` (None: 0), ``B`` ``(d, m)``.

    ``noise_type`` is ``"general"`` and ``diffusion`` is ``sigma(t) = B`` (state-independent; the SDE's
    ``g`` is ``B`` expanded to ``(batch, d, m)``). ``mean = e^{At} y0 + int_0^t e^{As} ds b`` ``(batch, d)``;
    ``covariance = int_0^t e^{As} B B^T e^{A^T s} ds`` ``(d, d)`` (independent of ``y0``), by Van Loan's
    block exponential. ``strong_solution`` is exact up to the trapezoid quadrature on ``bm``'s grid (see
    ``OrnsteinUhlenbeck``).
    """

    noise_type = "general"

    def __init__(self, A, b, B):
        self.A = _matrix("A", A, 2)
        self.d = self.A.shape[0]
        if self.A.shape != (self.d, self.d):
            raise ValueError(f"A must be square (d, d), got shape {tuple(self.A.shape)}")
        self.b = torch.zeros(self.d, dtype=F64) if b is None else _matrix("b", b, 1)
        if self.b.shape != (self.d,):
            raise ValueError(f"b must have shape ({self.d},) to match A, got {tuple(self.b.shape)}")
        self.B = _matrix("B", B, 2)
        if self.B.shape[0] != self.d:
            raise ValueError(f"B must have shape ({self.d}, m) to match A, got {tuple(self.B.shape)}")
        self.diffusion = self.sigma

    def _repr_args(self) -> str:
        return f"d={self.d}, m={self.noise_channels}"

    @property
    def noise_channels(self) -> int:
        return self.B.shape[1]

    @property
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The drift as ``A y + b``: ``(A (d, d), b (d,))`` in float64."""
        return self.A, self.b

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """The noise matrix ``B`` ``(d, m)``, the same at every ``t``."""
        return self.B

    def drift(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.to(y).T + self.b.to(y)

    def mean(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``E[X_t | X_0 = y0]``, ``(batch, d)``."""
        y0 = _state(y0, self.d)
        E, Phi = _expm_affine(self.A, _elapsed(t))
        return (y0.to(F64) @ E.T + Phi @ self.b).to(y0)

    def covariance(self, y0: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``Cov[X_t | X_0 = y0]``, ``(d, d)`` (the same for every ``y0``): ``F22^T F12`` of
        ``exp([[-A, B B^T], [0, A^T]] t)`` (Van Loan 1978)."""
        y0, t, d = _state(y0, self.d), _elapsed(t), self.d
        block = torch.zeros(2 * d, 2 * d, dtype=F64)
        block[:d, :d], block[:d, d:], block[d:, d:] = -self.A, self.B @ self.B.T, self.A.T
        F = torch.linalg.matrix_exp(block * t)
        cov = F[d:, d:].T @ F[:d, d:]
        return (0.5 * (cov + cov.T)).to(y0)

    def strong_solution(self, y0: torch.Tensor, ts: Times, bm: GridBrownian) -> torch.Tensor:
        """``X`` at the grid times ``ts`` for ``X(bm.times[0]) = y0`` on the path ``bm``: ``(len(ts), batch, d)``.

        Uses ``X_t = e^{At} y0 + int_0^t e^{As} ds b + B W_t + A J_t``, ``J_t = int_0^t e^{A(t-s)} B W_s ds``
        (integration by parts), ``J`` by the trapezoid rule on ``bm``'s grid.
        """
        y0 = _state(y0, self.d)
        dev = y0.device
        x0, A, b, B = y0.to(F64), self.A.to(dev), self.b.to(dev), self.B.to(dev)
        cache: dict[float, torch.Tensor] = {}

        def step(J, h, w, w_next):
            key = float(f"{h:.14g}")  # uniform grids accumulate rounding: one exponential per step size
            if key not in cache:
                cache[key] = torch.linalg.matrix_exp(self.A * key).to(dev)
            E = cache[key]
            J = torch.zeros(w.shape[0], self.d, dtype=F64, device=dev) if J is None else J
            return J @ E.T + 0.5 * h * (w @ (E @ B).T + w_next @ B.T)

        def read(J, s, w):
            E, Phi = _expm_affine(self.A, s)
            out = x0 @ E.T.to(dev) + (Phi.to(dev) @ b) + w @ B.T
            return out if J is None else out + J @ A.T

        return _walk(y0, ts, bm, self.noise_channels, step, read)
