"""The data side of learning probabilities (spec §8): the problem, the paths and the loss.

``LearningProblem`` holds a ladder (a ``MultilevelDrift`` with costs), the SDE around it and its time grid,
and solves ML-EM with any schedule on a ``PathSet``: initial points, Brownian paths and the reference
solution at the final time (``LearningProblem.reference``: EM with the top level on the same path, or an
exact strong solution). ``squared_error`` is the default per-path loss. A ``GridBrownian`` path set can be
split into minibatches (``PathSet.subset``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .brownian import GridBrownian
from .coins import CoinScheme
from .drift import MultilevelDrift
from .integrate import sdeint
from .probabilities import Constant
from .sde import MultilevelSDE
from .grid import uniform_grid, validate_grid
from .stats import Stats

__all__ = ["LearningProblem", "PathSet", "squared_error"]

F64 = torch.float64


def squared_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``||x - reference||^2`` per sample: ``(batch,)`` (summed over every non-batch dimension)."""
    return (x - reference).pow(2).flatten(1).sum(1)


# -- paths -----------------------------------------------------------------------------------------
class _TabulatedBrownian:
    """A Brownian path given by a table of increments on a grid: ``increments[n]`` is ``(batch, m)``.

    Used for subsets of a ``GridBrownian`` (minibatches of a learning set); follows torchsde's protocol.
    """

    levy_area_approximation = "none"

    def __init__(self, times: np.ndarray, increments: torch.Tensor):
        self.times = np.asarray(times, dtype=np.float64)
        self.table = increments
        self._spacing = np.diff(self.times)

    @property
    def shape(self) -> torch.Size:
        return self.table.shape[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        return self.table.device

    def increment(self, i: int) -> torch.Tensor:
        return self.table[i]

    def index_of(self, t) -> int:
        tf = float(t)
        j = int(np.abs(self.times - tf).argmin())
        if abs(self.times[j] - tf) > 0.25 * self._spacing[min(j, len(self._spacing) - 1)]:
            raise ValueError(f"Brownian path queried at t={tf!r}, which is not on its grid")
        return j

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False) -> torch.Tensor:
        if return_U or return_A:
            raise ValueError("no Levy area (levy_area_approximation='none')")
        if tb is None:
            ta, tb = self.times[0], ta
        i, j = self.index_of(ta), self.index_of(tb)
        if j < i:
            raise ValueError(f"need ta <= tb, got ta={float(ta)!r}, tb={float(tb)!r}")
        return self.table[i] if j == i + 1 else self.table[i:j].sum(0)

    def select(self, index: torch.Tensor) -> "_TabulatedBrownian":
        return _TabulatedBrownian(self.times, self.table.index_select(1, index.to(self.table.device)))


@dataclass
class PathSet:
    """Initial points, Brownian paths and the reference solution at the final time, one row per path.

    Attributes:
        y0: ``(M, d)`` initial states.
        bm: the Brownian motion of the ``M`` paths, shape ``(M, m)`` (a ``GridBrownian`` on the problem's
            grid is fastest; any torchsde-style ``bm(ta, tb)`` works, but only a ``GridBrownian`` can be
            split into minibatches).
        reference: ``(M, ...)``: the reference solution ``X_T^ref`` of each path (what the loss compares
            the ML-EM solution with), e.g. from ``LearningProblem.reference`` (EM with the top level on the
            same path) or an exact strong solution.
    """

    y0: torch.Tensor
    bm: object
    reference: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.y0, torch.Tensor) or self.y0.dim() != 2:
            raise ValueError(f"y0 must be a (M, d) tensor, got {getattr(self.y0, 'shape', self.y0)!r}")
        if not isinstance(self.reference, torch.Tensor) or self.reference.shape[0] != self.y0.shape[0]:
            raise ValueError(f"reference must be a tensor with {self.y0.shape[0]} rows (one per path), got "
                             f"{getattr(self.reference, 'shape', self.reference)!r}")
        shape = tuple(getattr(self.bm, "shape", ()))
        if not callable(self.bm) or len(shape) != 2 or shape[0] != self.y0.shape[0]:
            raise ValueError(f"bm must be a Brownian motion of shape (M={self.y0.shape[0]}, m), got {shape}")
        self._table: Optional[_TabulatedBrownian] = None

    def __len__(self) -> int:
        return self.y0.shape[0]

    def _tabulated(self) -> _TabulatedBrownian:
        if self._table is None:
            if isinstance(self.bm, _TabulatedBrownian):
                self._table = self.bm
            elif isinstance(self.bm, GridBrownian):
                table = torch.stack([self.bm.increment(i) for i in range(self.bm.num_steps)])
                self._table = _TabulatedBrownian(self.bm.times, table)
            else:
                raise TypeError("only a GridBrownian path set can be split into subsets, got "
                                f"{type(self.bm).__name__}")
        return self._table

    def subset(self, index: Union[torch.Tensor, Sequence[int]]) -> "PathSet":
        """The paths ``index`` (their increments are copied from the path's grid)."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() == len(self) and torch.equal(index, torch.arange(len(self))):
            return self
        dev = self.y0.device
        return PathSet(self.y0.index_select(0, index.to(dev)), self._tabulated().select(index),
                       self.reference.index_select(0, index.to(self.reference.device)))


# -- problem ---------------------------------------------------------------------------------------
class LearningProblem:
    """A ladder, the SDE around it and its time grid: what ``fit_probabilities`` and friends solve.

    Args:
        drift: a ``MultilevelDrift`` with known ``costs`` (``measure_costs`` first if needed). Its levels,
            ``base``, costs, ``check_finite`` and ``prune_certain`` are used; its schedule, coupling and
            coins are not (each solve builds a drift over the same levels with the schedule being learned
            or evaluated, so ``drift`` itself is never modified).
        sde: how to build the SDE around a drift: a callable ``make_sde(drift) -> sde`` (torchsde's
            protocol, whose ``multilevel`` is that drift, e.g. ``lambda d: ou.sde(d)``), or a
            ``MultilevelSDE`` whose diffusion, noise type and ``dt`` are reused.
        t1: final time (with ``t0`` and ``dt``), or give ``grid``.
        t0: initial time.
        dt: step size of the uniform grid (torchsde's accumulation); default: the ``MultilevelSDE``'s ``dt``.
        grid: the exact step times instead (non-uniform allowed).
        loss: ``loss(x_T, reference) -> (M,)``, the per-path error (default ``squared_error``).

    The Sigmoid schedule sees the solver's time ``t`` times its ``time_scale``; ``time_scale = 1 / t1`` maps
    ``[0, t1]`` to ``[0, 1]`` (spec §8.1), see ``sigmoid_from_probabilities``.
    """

    def __init__(
        self,
        drift: MultilevelDrift,
        sde: Union[MultilevelSDE, Callable],
        t1: Optional[float] = None,
        *,
        t0: float = 0.0,
        dt: Optional[float] = None,
        grid: Optional[Union[Sequence[float], torch.Tensor, np.ndarray]] = None,
        loss: Optional[Callable] = None,
    ):
        if not isinstance(drift, MultilevelDrift):
            raise TypeError(f"drift must be a MultilevelDrift, got {type(drift).__name__}")
        if drift.costs is None:
            raise ValueError("the drift's costs are unknown: pass costs= to MultilevelDrift or call "
                             "drift.measure_costs(t, y) first")
        self.drift = drift
        if grid is not None and dt is not None:
            raise ValueError("give either dt or grid, not both")
        if isinstance(sde, MultilevelSDE):
            template = sde
            self._make_sde = lambda d: MultilevelSDE(d, template.diffusion, template.noise_type, dt=template.dt)
            dt = template.dt if dt is None and grid is None else dt
        elif callable(sde):
            self._make_sde = sde
        else:
            raise TypeError(f"sde must be a MultilevelSDE or a callable make_sde(drift) -> sde, got {sde!r}")
        if grid is not None:
            self.grid = validate_grid("grid", grid).astype(np.float64)
        else:
            if t1 is None or dt is None:
                raise ValueError("give t1 and dt (or a MultilevelSDE with dt), or grid")
            if not (isinstance(dt, Number) and math.isfinite(dt) and dt > 0):
                raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
            if not float(t1) > float(t0):
                raise ValueError(f"need t1 > t0, got t0={t0!r}, t1={t1!r}")
            self.grid = uniform_grid(float(t0), float(t1), float(dt), np.float64)
        self.loss = squared_error if loss is None else loss

    # -- grid and costs -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return self.drift.num_levels

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1

    @property
    def costs(self) -> torch.Tensor:
        """Cost of one evaluation of each level per sample, float64 ``(k,)``."""
        return self.drift.costs

    def step_times(self) -> torch.Tensor:
        """The times ``t_n`` at which the drift is estimated (``n = 0 .. N-1``), float64 ``(N,)``."""
        return torch.as_tensor(self.grid[:-1], dtype=F64)

    # -- solving ------------------------------------------------------------------------------------
    def make_drift(self, schedule, coupling: str = "sample",
                   coins: Union[str, CoinScheme, torch.Tensor] = "independent",
                   seed: Optional[int] = 0) -> MultilevelDrift:
        """A ``MultilevelDrift`` over the problem's levels with ``schedule``, ``coupling`` and ``coins``."""
        d = self.drift
        drift = MultilevelDrift(list(d.levels), schedule, costs=d.costs.tolist(), coupling=coupling, coins=coins,
                                base=d.base, seed=seed, check_finite=d.check_finite, prune_certain=d.prune_certain)
        drift.set_costs(d.costs.tolist(), d.cost_unit)
        return drift

    def solve(self, schedule, paths: PathSet, coupling: str = "sample",
              coins: Union[str, CoinScheme, torch.Tensor] = "independent", seed: int = 0,
              record: bool = False) -> tuple[torch.Tensor, Stats, MultilevelDrift]:
        """ML-EM on ``paths`` with ``schedule``: ``(X_T (M, ...), stats, drift)`` (the coins recorded in
        ``drift.recorded`` when ``record``). ``seed`` seeds the coins (the Brownian paths are ``paths.bm``)."""
        drift = self.make_drift(schedule, coupling, coins)
        sde = self._make_sde(drift)
        if getattr(sde, "multilevel", None) is not drift:
            raise ValueError("make_sde(drift) must return an SDE whose drift (.multilevel) is the given drift")
        if record:
            drift.record_coins()
        y0 = paths.y0
        ts = torch.tensor([self.grid[0], self.grid[-1]], dtype=y0.dtype if y0.is_floating_point() else F64)
        ys, stats = sdeint(sde, y0, ts, bm=paths.bm, grid=self.grid, seed=seed, return_stats=True)
        return ys[-1], stats, drift

    def reference(self, y0: torch.Tensor, bm) -> torch.Tensor:
        """EM with the top level ``f^k`` on the problem's grid and the path ``bm``: ``(M, d)`` at the final
        time (ML-EM with every ``p = 1``, which is EM with ``f^k`` to the last bit)."""
        top = Constant([1.0] * self.num_levels)
        x, _, _ = self.solve(top, PathSet(y0, bm, torch.zeros_like(y0)), coupling="batch")
        return x.detach()

    def paths(self, y0: torch.Tensor, bm, reference: Optional[torch.Tensor] = None) -> PathSet:
        """A ``PathSet``; ``reference=None`` takes ``reference(y0, bm)`` (EM with the top level)."""
        return PathSet(y0, bm, self.reference(y0, bm) if reference is None else reference)
