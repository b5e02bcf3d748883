"""The dt -> 0 limit of ML-EM: an event-driven Poisson-jump solver (spec §7).

Level ``l`` jumps at the times of a Poisson process of rate ``lambda_l(t) = p_l(t, dt) / dt`` (the drift's
schedule at the solver's ``dt``); a jump adds ``(f^l - f^{l-1})(t, X) / lambda_l(t)``. Between jumps the
state moves by the exact Gaussian increment of the state-independent noise ``sigma(t) dW`` (on a shared
``GridBrownian``, by ``sigma`` at the left end of each piece: exact for a constant ``sigma``). Levels whose
probability is 1 at ``dt`` (and a ``base`` f^0) cannot jump: they are evaluated on the ``dt`` grid with an
Euler step (the hybrid that diffusion sampling needs). Time-dependent rates are handled by thinning
against a bound taken from the rates on the ``dt`` grid (exact for rates monotone between grid points; a
rate found above its bound raises).

Clocks: with ``coupling="batch"`` one clock per level serves the whole batch (levels get a 0-d ``t``);
with ``coupling="sample"`` each sample has its own clocks and levels get a ``(n,)`` tensor of per-sample
times (levels must accept it).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..brownian import GridBrownian
from ..drift import MultilevelDrift
from ..grid import OutputPlan, uniform_grid
from .base import Solver

__all__ = ["Poisson", "THINNING_MARGIN"]

THINNING_MARGIN = 1.25
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


class _Sigma:
    """``sigma(t)`` (a constant, or a function of time returning a number) and ``int_a^b sigma^2``."""

    def __init__(self, sigma_fn: Callable, constant: Optional[float]):
        self.fn, self.constant = sigma_fn, constant

    def at(self, t):
        return self.constant if self.constant is not None else self.fn(t)

    def integrated_variance(self, a, b):
        """``int_a^b sigma(u)^2 du`` for scalar or per-sample ``a, b`` (8-point Gauss–Legendre)."""
        if self.constant is not None:
            return self.constant**2 * (b - a)
        half, mid = (b - a) / 2, (b + a) / 2
        total = 0.0
        for x, w in zip(_GL_NODES, _GL_WEIGHTS):
            total = total + float(w) * torch.as_tensor(self.fn(mid + half * float(x)), dtype=torch.float64) ** 2
        return half * total


def _shape_noise(std, xi: torch.Tensor, noise_type: str, d: int, per_sample: bool) -> torch.Tensor:
    """``std * xi`` as a state increment ``(n, d)``; ``std`` is a number, a ``(d,)`` vector, or ``(n,)``
    per sample when ``per_sample``."""
    std = torch.as_tensor(std, dtype=xi.dtype).to(xi.device)
    if per_sample:
        std = std.reshape(-1, 1)
    out = std * xi
    return out.expand(xi.shape[0], d) if noise_type == "scalar" else out


class _GaussianNoise:
    """Exact Gaussian increments ``int sigma dW`` from the solver's own generator."""

    def __init__(self, sigma: _Sigma, batch: int, channels: int, noise_type: str, d: int, generator, dtype, device):
        self.sigma, self.batch, self.channels, self.noise_type, self.d = sigma, batch, channels, noise_type, d
        self.generator, self.dtype, self.device = generator, dtype, device

    def __call__(self, a, b, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.batch if rows is None else rows.shape[0]
        std = torch.as_tensor(self.sigma.integrated_variance(a, b), dtype=torch.float64).clamp(min=0).sqrt()
        xi = torch.randn((n, self.channels), generator=self.generator, dtype=self.dtype, device=self.device)
        return _shape_noise(std, xi, self.noise_type, self.d, rows is not None)


class _BridgeNoise:
    """Noise read from a ``GridBrownian``: whole cells from its increments, partial cells by the Brownian
    bridge (exact in law), so the jump solver shares the path of grid solvers on the same ``bm``. Each piece is
    weighted by ``sigma`` at its left end, as EM weights a step: exact for a constant ``sigma``, first order in
    the piece's length for a time-dependent one (the solver's own noise, without ``bm``, is exact)."""

    def __init__(self, bm: GridBrownian, t0: float, sigma: _Sigma, noise_type: str, d: int, generator):
        self.bm, self.sigma, self.noise_type, self.d, self.generator = bm, sigma, noise_type, d, generator
        self.cell = bm.index_of(t0)
        self.s = float(bm.times[self.cell])
        self.rest = bm.increment(self.cell) if self.cell < bm.num_steps else None

    def _weighted(self, piece: torch.Tensor, t: float) -> torch.Tensor:
        return _shape_noise(self.sigma.at(t), piece, self.noise_type, self.d, False)

    def __call__(self, a: float, b: float, rows=None) -> torch.Tensor:
        total = torch.zeros(self.bm.shape[0], self.d, dtype=self.bm.dtype, device=self.bm.device)
        times = self.bm.times
        while True:
            if self.rest is None:
                raise ValueError(f"the Brownian path ends at {times[-1]} before t={b}")
            right = float(times[self.cell + 1])
            if b >= right:
                total = total + self._weighted(self.rest, self.s)
                self.cell += 1
                self.s = right
                self.rest = self.bm.increment(self.cell) if self.cell < self.bm.num_steps else None
                if b == right:
                    return total
                continue
            frac = (b - self.s) / (right - self.s)
            std = math.sqrt(max((b - self.s) * (right - b) / (right - self.s), 0.0))
            z = torch.randn(self.rest.shape, generator=self.generator, dtype=self.rest.dtype, device=self.rest.device)
            piece = frac * self.rest + std * z
            self.rest = self.rest - piece
            total = total + self._weighted(piece, self.s)
            self.s = b
            return total


class _PerSampleBridge:
    """Noise from a ``GridBrownian`` for per-sample clocks: ``W`` at each sample's own times, by the
    Brownian bridge between the grid values (and the sample's last time), exact in law.

    Holds the path's cumulative values on its grid: ``steps x batch x channels`` numbers.
    """

    def __init__(self, bm: GridBrownian, t0: float, sigma: _Sigma, noise_type: str, d: int, generator):
        start = bm.index_of(t0)
        increments = torch.stack([bm.increment(i) for i in range(start, bm.num_steps)])
        self.W = torch.cat([torch.zeros_like(increments[:1]), increments.cumsum(0)])  # (N + 1, batch, m)
        self.times = torch.as_tensor(bm.times[start:], dtype=torch.float64)
        self.last_t = torch.full((bm.shape[0],), float(bm.times[start]), dtype=torch.float64)
        self.last_W = torch.zeros_like(self.W[0])
        self.sigma, self.noise_type, self.d, self.generator = sigma, noise_type, d, generator

    def __call__(self, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows_cpu = rows.cpu()
        cell = (torch.searchsorted(self.times, b, right=True) - 1).clamp(0, len(self.times) - 2)
        grid_left, right = self.times[cell], self.times[cell + 1]
        own = self.last_t[rows_cpu] > grid_left  # the sample's last time is inside this cell
        left = torch.where(own, self.last_t[rows_cpu], grid_left)
        dev = self.W.device
        W_left = torch.where(own.to(dev).unsqueeze(-1), self.last_W[rows], self.W[cell.to(dev), rows])
        W_right = self.W[(cell + 1).to(dev), rows]
        span = (right - left).clamp(min=1e-300)
        frac = ((b - left) / span).clamp(0, 1)
        std = ((b - left) * (right - b) / span).clamp(min=0).sqrt()
        z = torch.randn(W_left.shape, generator=self.generator, dtype=W_left.dtype, device=dev)
        W_b = W_left + _col(frac, W_left) * (W_right - W_left) + _col(std, W_left) * z
        increment = W_b - self.last_W[rows]
        self.last_t[rows_cpu], self.last_W[rows] = b, W_b
        sigma = self.sigma.constant if self.sigma.constant is not None else self.sigma.at(a)
        return _shape_noise(sigma, increment, self.noise_type, self.d, self.sigma.constant is None)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).unsqueeze(-1)


def _rates(drift: MultilevelDrift, times: torch.Tensor, dt: float) -> torch.Tensor:
    """``lambda_l(t) = p_l(t, dt) / dt`` at every time, float64 ``(k, n)``."""
    p = drift.probabilities_at(times, dt).detach().to("cpu", torch.float64)
    if p.dim() == 1:
        p = p.unsqueeze(-1).expand(-1, times.numel())
    return p / dt


def _segments(ts: np.ndarray, dt: float, march: bool) -> np.ndarray:
    """Segment ends: ``ts``, and when marching also the grid solvers' step times (torchsde's accumulation,
    the grid of ``GridBrownian(t0, t1, dt)``), so a shared path is read whole cell by whole cell."""
    if not march:
        return ts
    return np.unique(np.concatenate([uniform_grid(ts[0], ts[-1], dt), ts]))


class Poisson(Solver):
    """The jump process of the drift's rates ``p_l(t, dt) / dt`` on ``[ts[0], ts[-1]]``, one segment a step: the
    segments end at ``ts`` and, when some level is certain or there is a base (the hybrid), at the ``dt`` grid's
    times. Its jump times and levels come from the drift's coin stream (``drift.coins.generator``); its noise from
    ``noise_generator`` or the shared path ``bm``. Every evaluation is checked by ``drift.combination``."""

    name = "Poisson"

    def __init__(self, drift: MultilevelDrift, sigma_fn: Callable, sigma_constant: Optional[float], noise_type: str,
                 y0: torch.Tensor, ts: np.ndarray, dt: float, noise_generator: torch.Generator,
                 bm: Optional[GridBrownian] = None):
        batch, d = y0.shape[0], y0.shape[1]
        self.drift, self.dt, self.batch = drift, dt, batch
        self.per_sample = drift.coupling == "sample"
        sigma = _Sigma(sigma_fn, sigma_constant)
        if bm is not None:
            bridge = _PerSampleBridge if self.per_sample else _BridgeNoise
            self.noise = bridge(bm, float(ts[0]), sigma, noise_type, d, noise_generator)
        else:
            channels = 1 if noise_type == "scalar" else d
            self.noise = _GaussianNoise(sigma, batch, channels, noise_type, d, noise_generator, y0.dtype, y0.device)
        self.costs = drift.require_costs(float(ts[0]), y0)
        self.grid_t = torch.as_tensor(uniform_grid(ts[0], ts[-1], dt), dtype=torch.float64)
        self.grid_rates = _rates(drift, self.grid_t, dt)
        march = drift.base is not None or bool((self.grid_rates * dt >= 1).any())
        self.bounds = _segments(ts, dt, march)
        super().__init__(torch.as_tensor(self.bounds, dtype=torch.float64))
        self.generator = drift.coins.generator

    def output_plan(self, ts: np.ndarray) -> OutputPlan:
        """The states at ``ts``: the ends of the segments that end there."""
        step = [0] + np.searchsorted(self.bounds, ts[1:]).tolist()
        return OutputPlan(step, [0.0] * len(step), [1.0] * len(step))

    def step(self, n: int, y: torch.Tensor) -> torch.Tensor:
        drift, dt, batch, costs = self.drift, self.dt, self.batch, self.costs
        a, b = float(self.bounds[n]), float(self.bounds[n + 1])
        inside = self.grid_rates[:, (self.grid_t >= a - 1e-12) & (self.grid_t <= b + 1e-12)]
        rates_a = _rates(drift, torch.tensor([a], dtype=torch.float64), dt)[:, 0]
        certain = rates_a * dt >= 1
        bound = THINNING_MARGIN * torch.maximum(inside.max(1).values if inside.numel() else rates_a, rates_a)
        hybrid, hybrid_cost = _hybrid_drift(drift, certain, a, y, costs)
        events = _draw_events(drift, certain, bound, a, b, dt, batch if self.per_sample else None, self.generator)
        y = (_run_sample_segment if self.per_sample else _run_batch_segment)(drift, y, a, b, hybrid, events,
                                                                              self.noise)
        rate_integrals = (rates_a * (b - a)).masked_fill(certain, 0.0)  # left-point rule on the segment
        pair_costs = costs + torch.cat([costs.new_zeros(1), costs[:-1]])  # a jump pays C_l + C_{l-1}
        expected = (float(rate_integrals @ pair_costs) + hybrid_cost) * batch
        theory = (float(rate_integrals @ costs) + float(certain.double() @ costs)) * batch
        drift.record_step(batch, expected, theory)
        return y


def _hybrid_drift(drift: MultilevelDrift, certain: torch.Tensor, t: float, y: torch.Tensor, costs: torch.Tensor):
    """``(f^0 + sum_{l certain} Delta_l at (t, y), its cost per sample)``; ``(None, 0)`` when nothing is
    certain and there is no base. Only levels with a nonzero coefficient are evaluated."""
    if not certain.any() and drift.base is None:
        return None, 0.0
    member = [True] + certain.tolist() + [False]  # is difference m in the set (m = 0 stands for the base)
    coefficients = {m: float(member[m]) - float(member[m + 1]) for m in range(1, drift.num_levels + 1)}
    coefficients[0] = 1.0 - float(member[1])
    coefficients = {m: c for m, c in coefficients.items() if c != 0.0}
    cost = float(sum(costs[m - 1] for m in coefficients if m > 0))
    return drift.combination(coefficients, torch.tensor(t, dtype=y.dtype, device=y.device), y), cost


def _draw_events(drift, certain, bound, a, b, dt, batch, gen):
    """Accepted jump events in ``(a, b]``: ``(times, levels, rates[, samples])`` sorted by (sample,) time."""
    times, levels, samples = [], [], []
    for l in range(drift.num_levels):
        if certain[l] or bound[l] <= 0:
            continue
        mean = float(bound[l]) * (b - a)
        counts = torch.poisson(torch.full((batch or 1,), mean, dtype=torch.float64), generator=gen).long()
        total = int(counts.sum())
        if total == 0:
            continue
        times.append(a + (b - a) * torch.rand(total, generator=gen, dtype=torch.float64))
        levels.append(torch.full((total,), l, dtype=torch.long))
        samples.append(torch.repeat_interleave(torch.arange(batch or 1), counts))
    if not times:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long)
    times, levels, samples = torch.cat(times), torch.cat(levels), torch.cat(samples)
    rates = _rates(drift, times, dt)  # (k, n)
    rate = rates.gather(0, levels.unsqueeze(0))[0]
    if (rate > bound[levels] * (1 + 1e-9)).any():
        worst = int(levels[(rate > bound[levels]).nonzero()[0, 0]]) + 1
        raise ValueError(f"the rate of level {worst} exceeds its thinning bound inside [{a}, {b}]: the schedule "
                         f"varies too fast between points of the dt grid; use a smaller dt")
    keep = torch.rand(times.shape, generator=gen, dtype=torch.float64) * bound[levels] < rate
    times, levels, samples, rate = times[keep], levels[keep], samples[keep], rate[keep]
    order = torch.argsort(samples.double() * (2 * (b - a) + 1) + (times - a), stable=True)
    return times[order], levels[order], rate[order], samples[order]


def _jump(drift, level: int, t, y, rate):
    """``(f^l - f^{l-1})(t, y) / lambda`` (``level`` from 0); ``rate`` a number or per-sample tensor."""
    inverse = 1.0 / rate
    coefficients = {level + 1: inverse, level: -inverse}
    drift.record_jumps(level, y.shape[0])
    return drift.combination(coefficients, t, y)


def _run_batch_segment(drift, y, a, b, hybrid, events, noise):
    times, levels, rates, _ = events
    s = a
    for tau, level, rate in zip(times.tolist(), levels.tolist(), rates.tolist()):
        y = _advance(y, s, tau, hybrid, noise)
        y = y + _jump(drift, level, torch.tensor(tau, dtype=y.dtype, device=y.device), y, rate)
        s = tau
    return _advance(y, s, b, hybrid, noise)


def _advance(y, s, t, hybrid, noise, rows=None):
    """Moves from ``s`` to ``t`` without jumps: scalars for the whole batch, or per-sample ``(n,)`` times
    for the samples ``rows`` (``y`` then holds those samples only)."""
    per_sample = rows is not None
    step = noise(s, t, rows)
    if hybrid is not None:
        h = t - s
        if per_sample:
            h = h.to(device=y.device, dtype=y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
        step = step + h * (hybrid[rows] if per_sample else hybrid)
    return y + step


def _run_sample_segment(drift, y, a, b, hybrid, events, noise):
    """Per-sample clocks: the r-th jump of every sample that has one is processed together."""
    times, levels, rates, samples = events
    batch = y.shape[0]
    s = torch.full((batch,), a, dtype=torch.float64)
    if times.numel():
        first = torch.ones_like(samples, dtype=torch.bool)
        first[1:] = samples[1:] != samples[:-1]
        start_of = torch.cummax(torch.where(first, torch.arange(len(samples)), 0), 0).values
        rank = torch.arange(len(samples)) - start_of
        for r in range(int(rank.max()) + 1):
            pick = rank == r
            rows, tau, lev, rate = samples[pick], times[pick], levels[pick], rates[pick]
            rows_dev = rows.to(y.device)
            moved = _advance(y.index_select(0, rows_dev), s[rows], tau, hybrid, noise, rows_dev)
            for level in lev.unique().tolist():
                sel = (lev == level).nonzero().squeeze(1)
                sel_dev = sel.to(y.device)
                t_sub = tau[sel].to(device=y.device, dtype=y.dtype)
                jump = _jump(drift, level, t_sub, moved.index_select(0, sel_dev), rate[sel])
                moved = moved.index_add(0, sel_dev, jump)
            y = y.index_copy(0, rows_dev, moved)
            s[rows] = tau
    return _advance(y, s, torch.full((batch,), b, dtype=torch.float64), hybrid, noise,
                    torch.arange(batch, device=y.device))
