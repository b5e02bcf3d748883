"""GridBrownian: a Brownian path given by independent Gaussian increments on a grid of times.

Increments are drawn lazily in chunks of steps; chunk ``j`` comes from its own generator seeded by
``derive_seed(seed, j)`` (counter-based), so any part of the path is reproducible on demand, memory stays
bounded, and two solvers that query the same object see the same path. With ``cache="all"`` every chunk
stays in memory once drawn (``predraw()`` draws them all at once), so repeated solves on one path draw
nothing. ``bm(ta, tb)`` follows torchsde's
Brownian protocol (``W(tb) - W(ta)``, grid points only), so ``torchsde.sdeint`` accepts it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .grid import uniform_grid, validate_grid
from .random_streams import check_seed, derive_seed, fresh_seed, make_generator

__all__ = ["GridBrownian", "CACHE_MODES"]

_CHUNK_ELEMENTS = 1 << 24  # increments drawn per chunk, in scalars (64 MiB at float32)
CACHE_MODES = ("chunk", "all")
_SNAP_ULPS = 4  # a query this many float32 ulps from a grid time is on it (float32 rounding of accumulated times)


class GridBrownian:
    """Brownian motion on a fixed time grid with pre-drawn (chunked, counter-based) increments.

    Args:
        times: the grid ``t_0 < t_1 < ... < t_N`` (sequence or 1-D tensor), or use ``t0, t1, dt``.
        size: ``(batch, noise_channels)``.
        seed: seed of the path (None: fresh entropy; the value is kept in ``.seed``).
        dtype, device: of the increments.
        cache: ``"chunk"`` keeps one chunk (at most 2^24 increments) in memory and redraws the others,
            identically, when they are queried again; ``"all"`` keeps every chunk it has drawn
            (``steps x batch x channels`` numbers in all).
        t0, t1, dt: a uniform grid built with torchsde's accumulation ``t <- min(t + dt, t1)``.

    ``increment(i)`` is the increment over ``[t_i, t_{i+1}]``, shape ``size``; ``bm(ta, tb)`` sums the
    increments between two grid times.
    """

    levy_area_approximation = "none"

    def __init__(
        self,
        times: Optional[Union[Sequence[float], torch.Tensor, np.ndarray]] = None,
        size: Sequence[int] = (1, 1),
        seed: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        cache: str = "chunk",
        *,
        t0: Optional[float] = None,
        t1: Optional[float] = None,
        dt: Optional[float] = None,
    ):
        if times is not None and (t0, t1, dt) != (None, None, None):
            given = ", ".join(f"{k}={v!r}" for k, v in (("t0", t0), ("t1", t1), ("dt", dt)) if v is not None)
            raise ValueError(f"GridBrownian takes either times= or t0=, t1=, dt=, not both (got times and {given})")
        if times is None:
            if t0 is None or t1 is None or dt is None:
                raise ValueError("GridBrownian needs either times= or all of t0=, t1=, dt=")
            times = uniform_grid(float(t0), float(t1), float(dt), np.float64)
        self.times = validate_grid("times", times)
        if not hasattr(size, "__iter__") or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in size
        ):
            raise ValueError(f"size must be (batch, noise_channels) of positive ints, got {size!r}")
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be (batch, noise_channels) with positive entries, got {size!r}")
        self._size = torch.Size(size)
        self._dtype = dtype
        self._device = torch.device(device)
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.cache = cache
        seed = check_seed(seed)
        self.seed = fresh_seed() if seed is None else seed
        self._spacing = np.diff(self.times)
        self._sqrt_dt = torch.as_tensor(np.sqrt(self._spacing), dtype=torch.float64)
        self.chunk_steps = max(1, _CHUNK_ELEMENTS // self._size.numel())
        self._chunks: dict[int, torch.Tensor] = {}  # chunk index -> increments (one entry with cache="chunk")

    # -- torchsde's Brownian attributes -------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    # -- increments ---------------------------------------------------------------------------------
    def _load_chunk(self, j: int) -> torch.Tensor:
        chunk = self._chunks.get(j)
        if chunk is None:
            if self.cache == "chunk":
                self._chunks.clear()  # before the new chunk is drawn: one 64 MiB buffer at a time
            start = j * self.chunk_steps
            stop = min(start + self.chunk_steps, self.num_steps)
            gen = make_generator(derive_seed(self.seed, j), self._device)
            noise = torch.randn((stop - start, *self._size), generator=gen, dtype=self._dtype, device=self._device)
            scale = self._sqrt_dt[start:stop].to(self._dtype).to(self._device)
            chunk = self._chunks[j] = noise.mul_(scale.reshape(-1, 1, 1))  # in place: one buffer, not two
        return chunk

    def predraw(self) -> "GridBrownian":
        """Draws every increment now (``cache="all"`` only), so that no later query draws; returns ``self``."""
        if self.cache != "all":
            raise ValueError(f"predraw() keeps the whole path in memory: build the GridBrownian with cache='all' "
                             f"(it has cache={self.cache!r})")
        for j in range(-(-self.num_steps // self.chunk_steps)):
            self._load_chunk(j)
        return self

    def increment(self, i: int) -> torch.Tensor:
        """``W(t_{i+1}) - W(t_i)``, shape ``(batch, noise_channels)``."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} outside the grid's {self.num_steps} steps")
        return self._load_chunk(i // self.chunk_steps)[i % self.chunk_steps]

    def increments(self, start: int, stop: int) -> torch.Tensor:
        """Sum of the increments of steps ``start .. stop-1`` (``W(t_stop) - W(t_start)``); for one step, the
        stored increment itself (a view: do not modify)."""
        if stop == start + 1:
            return self.increment(start)
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
                and 0 <= start <= stop <= self.num_steps):  # else the loop below would never end
            raise IndexError(f"increments({start!r}, {stop!r}): need integers 0 <= start <= stop <= "
                             f"{self.num_steps} (the grid's steps)")
        total = torch.zeros(self._size, dtype=self._dtype, device=self._device)
        i = start
        while i < stop:
            j = i // self.chunk_steps
            chunk = self._load_chunk(j)
            lo, hi = i - j * self.chunk_steps, min(stop - j * self.chunk_steps, chunk.shape[0])
            total = total + chunk[lo:hi].sum(0)
            i = j * self.chunk_steps + hi
        return total

    def index_of(self, t) -> int:
        """The grid index of time ``t`` (within a quarter of the spacing around it, or a few float32 ulps),
        else a ValueError."""
        return int(self.indices_of(np.array([float(t)]))[0])

    def indices_of(self, times: np.ndarray) -> np.ndarray:
        """``index_of`` for many times at once: int64 grid indices, shaped like ``times``. A time snaps to the
        nearest grid time when it is within a quarter of the step that contains it (the first or last step
        outside the grid) or within ``_SNAP_ULPS`` float32 ulps of it, so a solver whose grid was accumulated
        in another dtype (float32 ``t + dt``) still finds its steps on the path's grid, also next to the
        sliver of a step that the accumulation ``t <- min(t + dt, t1)`` can leave at the end of a path."""
        query = np.asarray(times, dtype=np.float64)
        right = np.clip(np.searchsorted(self.times, query), 1, len(self.times) - 1)
        left = right - 1
        nearest = np.where(np.abs(self.times[left] - query) <= np.abs(self.times[right] - query), left, right)
        tolerance = np.maximum(0.25 * self._spacing[left],
                               _SNAP_ULPS * np.spacing(np.abs(query).astype(np.float32)).astype(np.float64))
        off = np.abs(self.times[nearest] - query) > tolerance
        if off.any():
            bad = int(np.flatnonzero(off.reshape(-1))[0])
            tf, j = float(query.reshape(-1)[bad]), int(nearest.reshape(-1)[bad])
            raise ValueError(
                f"GridBrownian queried at t={tf!r}, which is not on its grid "
                f"[{self.times[0]}, {self.times[-1]}] (nearest grid time {self.times[j]})"
            )
        return nearest

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False) -> torch.Tensor:
        if return_U or return_A:
            raise ValueError("GridBrownian has no Levy area (levy_area_approximation='none')")
        if tb is None:
            ta, tb = self.times[0], ta
        ia, ib = self.index_of(ta), self.index_of(tb)
        if ib < ia:
            raise ValueError(f"GridBrownian needs ta <= tb, got ta={float(ta)!r}, tb={float(tb)!r}")
        return self.increments(ia, ib)

    def __repr__(self) -> str:
        return (
            f"GridBrownian(steps={self.num_steps}, t=[{self.times[0]}, {self.times[-1]}], size={tuple(self._size)}, "
            f"seed={self.seed}, dtype={self._dtype}, device={self._device}, cache={self.cache!r})"
        )
