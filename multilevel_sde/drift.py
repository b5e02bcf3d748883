"""MultilevelDrift: a ladder of approximators ``f^1 .. f^k`` of a drift, sampled the ML-EM way.

Each step, coins ``B_l ~ Bernoulli(p_l)`` decide which differences ``f^l - f^{l-1}`` enter the unbiased
estimate ``F = sum_l (B_l / p_l) (f^l - f^{l-1})`` (spec §4.1). The whole step is ``MultilevelDrift.sample``,
read top to bottom: probabilities -> ``coins = scheme.draw(p, ...)`` (``coins.py``) -> ``combine``: which
levels run (``_runs``), their coefficients ``c_m = B_m/p_m - B_{m+1}/p_{m+1}`` (``_coefficients``), the terms
``(m, rows, c_m)`` they make (``_terms``) and the sum ``F = sum_m c_m f^m`` (``_sum``). Each level is evaluated
at most once per step (f^m is shared by the differences m and m+1), only when one of them is drawn, and with
every ``p = 1`` the estimate is ``f^k`` to the last bit. ``accelerate`` keeps the terms of each coin pattern
instead of recomputing them (the only accelerated path, the same numbers). The drift knows nothing of steppers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .checks import (NonFiniteError, all_finite, as_level, check_costs, check_output, check_probabilities, check_state,
                     check_time, raise_non_finite, time_repr)
from .coins import CoinRecord, CoinScheme, as_coin_scheme
from .cost import measure_costs
from .probabilities import as_schedule
from .random_streams import check_seed, fresh_seed
from .stats import Stats

__all__ = ["MultilevelDrift", "NonFiniteError", "COUPLINGS"]

COUPLINGS = ("batch", "sample")
TimeLike = Union[float, torch.Tensor]
_MEMO_SIZE = 256  # values of the probabilities whose host arithmetic is kept (one per step size on a uniform grid)


class MultilevelDrift(nn.Module):
    """An unbiased random estimate of ``f^k`` from a ladder of approximators (ML-EM's drift).

    Args:
        levels: ``k >= 1`` callables ``f(t, y) -> tensor like y``, cheapest first (``nn.Module`` allowed;
            kept in an ``nn.ModuleList`` so ``.to(device)`` and ``.parameters()`` work).
        probabilities: a schedule ``schedule(t, dt, costs) -> (k,)`` (see ``probabilities.py``) or ``k``
            constant probabilities in ``(0, 1]``.
        costs: cost of one evaluation of each level for one sample (any unit). None: measured on the
            first call (FLOPs where the flop counter sees work in every level, else seconds).
        coupling: ``"batch"``: one coin per level and step for the whole batch (levels run on the whole
            batch or not at all); ``"sample"``: one coin per sample (levels run on sub-batches).
        coins: ``"independent"`` (the paper's), ``"comonotone"`` (one uniform per step shared by the levels:
            unbiased, cheaper), ``"stratified"`` (systematic in time: lower variance, but the path is biased;
            see ``coins.py``), a ``CoinScheme`` (the drift keeps its own copy) or a bool pattern to replay
            (``coins.Replay``). The scheme's stream starts from ``seed``.
        base: ``f^0`` (default: zero), free of cost; the estimate is then
            ``f^0 + sum_l (B_l / p_l)(f^l - f^{l-1})``, still unbiased for ``f^k`` (spec §4.5).
        seed: seed of the coins (None: fresh entropy, kept in ``.seed``).
        check_finite: check each step's estimate for NaN/inf and name the level at fault (one host
            sync per step, which mlsde's solvers replace by a check of their state every few steps).
        prune_certain: skip a level whose two differences are both certain (``p_m = p_{m+1} = 1``):
            its coefficient is exactly 0, so it is neither evaluated nor paid for. False follows the
            literal rule "f^m is paid when difference m or m+1 is drawn".
        accelerate: with probabilities without a gradient, take each step's levels and coefficients from float64
            host arithmetic, kept per coin pattern and ``p`` with one coin per level (the only accelerated path:
            as ``False``, the reference ``combine``, to the bit for float64 ``p``; a float32 schedule's may differ).

    ``sample(t, y, dt)`` is the estimate; ``exact(t, y)`` is ``f^k``; ``expected_cost(t, dt)`` the expected
    cost per sample and step (with every ``p = 1`` only ``f^k`` runs: ML-EM is then EM, at EM's cost).
    ``stats`` accumulates over calls (``reset_stats()``); ``track()`` collects the stats of a block (the
    solvers use it for their per-solve stats).
    """

    def __init__(
        self,
        levels: Sequence[Callable],
        probabilities,
        costs: Optional[Sequence[float]] = None,
        coupling: str = "batch",
        coins: Union[str, CoinScheme, torch.Tensor] = "independent",
        base: Optional[Callable] = None,
        seed: Optional[int] = None,
        check_finite: bool = True,
        prune_certain: bool = True,
        accelerate: bool = True,
    ):
        super().__init__()
        if isinstance(levels, (nn.Module, str)) or callable(levels) or not hasattr(levels, "__iter__"):
            raise TypeError(f"levels must be a sequence of callables, got {levels!r}")
        levels = list(levels)
        if not levels:
            raise ValueError("levels must hold at least one level, got an empty ladder []")
        self.levels = nn.ModuleList(as_level(f, f"levels[{i}] (level {i + 1})") for i, f in enumerate(levels))
        self.base = None if base is None else as_level(base, "base")
        self.probabilities = as_schedule(probabilities)
        tied = getattr(self.probabilities, "num_levels", lambda: None)()
        if tied is not None and tied != self.num_levels:
            raise ValueError(f"probabilities has {tied} entries but the ladder has {self.num_levels} levels: "
                             f"{self.probabilities!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.coupling = coupling
        seed = check_seed(seed)
        self.seed = fresh_seed() if seed is None else seed
        self.coins = coins  # a copy of the scheme, its stream started from the seed (the ``coins`` setter)
        self.check_finite = bool(check_finite)
        self.prune_certain = bool(prune_certain)
        self.accelerate = bool(accelerate)
        self._costs = check_costs(costs, self.num_levels)
        self._stats = Stats(self.num_levels, costs=None if self._costs is None else self._costs.tolist())
        self._trackers: list[Stats] = []
        self._stats_targets: tuple[Stats, ...] = (self._stats,)  # what each step and level call is recorded in
        self._deferred = 0  # > 0 inside deferred_checks(): the solver checks its state and vouches for t and y
        self._recording = False
        self.recorded: list[CoinRecord] = []

    # -- ladder and costs ---------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self._modules["levels"])

    @property
    def costs(self) -> Optional[torch.Tensor]:
        """Cost per sample of each level, float64 ``(k,)`` (None until given or measured)."""
        return self._costs

    @property
    def cost_unit(self) -> str:
        return self._stats.cost_unit

    def set_costs(self, costs: Sequence[float], unit: str = "given") -> None:
        self._costs = check_costs(costs, self.num_levels)
        self._plans = {}
        for stats in self._stats_targets:
            stats.costs, stats.cost_unit = self._costs.tolist(), unit

    def measure_costs(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """Measures and sets the per-sample costs on an example state ``y`` (FLOPs, else seconds)."""
        costs, unit = measure_costs(list(self.levels), t, y)
        self.set_costs(costs, unit)
        return costs

    def require_costs(self, t: TimeLike, y: Optional[torch.Tensor]) -> torch.Tensor:
        """The costs, measured on ``(t, y)`` first when they are unknown (a ValueError without ``y``)."""
        if self._costs is None:
            if y is None:
                raise ValueError("costs are unknown: pass costs= to MultilevelDrift or call measure_costs(t, y) first")
            self.measure_costs(t, y)
        return self._costs

    # -- coins --------------------------------------------------------------------------------------
    @property
    def coins(self) -> CoinScheme:
        """The coin scheme; setting it (a name, a ``CoinScheme`` or a pattern) starts its stream from ``seed``."""
        return self.__dict__["_coins"]

    @coins.setter
    def coins(self, coins: Union[str, CoinScheme, torch.Tensor]) -> None:
        scheme = copy.copy(as_coin_scheme(coins))
        scheme.seed(self.seed)
        self.__dict__["_coins"] = scheme
        self._plans: dict = {}  # _HostPlan per value of p (they depend on the scheme's evaluation rule)

    def reseed(self, seed: Optional[int] = None) -> int:
        """Restarts the coin stream (and the coin scheme) from ``seed`` (None: fresh entropy)."""
        seed = check_seed(seed)
        self.seed = fresh_seed() if seed is None else seed
        self.coins.seed(self.seed)
        if self._recording:
            self.recorded = []
        return self.seed

    def draw_coins(self, p: torch.Tensor, batch: int) -> torch.Tensor:
        """The scheme's coins for float64 CPU ``p``: bool CPU ``(k,)`` (batch coupling) or ``(k, batch)``."""
        return self.coins.draw(p, None if self.coupling == "batch" else batch)

    def record_coins(self, enabled: bool = True) -> None:
        """Starts (or stops) recording the coins of every step into ``recorded`` (cleared on start)."""
        self._recording = bool(enabled)
        if enabled:
            self.recorded = []

    def recorded_coins(self) -> torch.Tensor:
        """The recorded coins, bool ``(steps, k)`` (batch coupling) or ``(steps, k, batch)``."""
        return torch.stack([r.coins for r in self._records()])

    def recorded_probabilities(self) -> torch.Tensor:
        """The probabilities of every recorded step, float64 ``(steps, k[, batch])``."""
        return torch.stack([r.probabilities for r in self._records()])

    def _records(self) -> list:
        if not self.recorded:
            raise ValueError("no coins recorded: call record_coins() before solving")
        return self.recorded

    # -- statistics ---------------------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """The statistics accumulated over all calls."""
        return self._stats

    def reset_stats(self) -> None:
        self._stats.reset()

    @contextlib.contextmanager
    def track(self) -> Iterator[Stats]:
        """Collects the statistics of the calls made inside the block into a fresh ``Stats``."""
        stats = Stats(self.num_levels, costs=self._stats.costs, cost_unit=self._stats.cost_unit, seed=self.seed)
        self._trackers.append(stats)
        self._stats_targets = (self._stats, *self._trackers)
        try:
            yield stats
        finally:
            self._trackers.remove(stats)
            self._stats_targets = (self._stats, *self._trackers)

    def record_step(self, samples: int, expected_cost: float, theory_cost: float) -> None:
        """Counts one step (of a solver that estimates the drift its own way, e.g. the Poisson solver) in
        ``stats`` and in every open ``track()``."""
        for stats in self._stats_targets:
            stats.record_step(samples, expected_cost, theory_cost)

    def record_jumps(self, level: int, count: int) -> None:
        """Counts ``count`` jumps of level ``level + 1`` (``level`` from 0) like ``record_step``."""
        for stats in self._stats_targets:
            stats.record_jumps(level, count)

    # -- probabilities ------------------------------------------------------------------------------
    def probabilities_at(self, t: TimeLike, dt: Optional[float], costs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The schedule's ``p`` at ``(t, dt)``, validated: shape ``(k,)`` (or ``(k, *t.shape)``), in ``(0, 1]``."""
        return self._probabilities(t, dt, costs)[0]

    def _probabilities(self, t: TimeLike, dt: Optional[float], costs: Optional[torch.Tensor], check_values=True):
        """``probabilities_at`` and its float64 CPU copy (values unchecked with ``check_values=False``)."""
        schedule, k = self._modules["probabilities"], len(self._modules["levels"])
        if dt is None and getattr(schedule, "per_unit_time", False):
            raise ValueError(f"the schedule {schedule!r} depends on the step size: call sample(t, y, dt) with dt")
        if dt is not None and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 0 < dt < math.inf):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        if costs is None:
            costs = self._costs if self._costs is not None else torch.ones(k, dtype=torch.float64)
        p = schedule(t, dt, costs)
        if p.__class__ is not torch.Tensor:
            try:
                p = torch.as_tensor(p)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"probabilities: {schedule!r} returned {type(p).__name__}, "
                                f"expected a tensor of {k} values") from err
        expected = (k, *t.shape) if isinstance(t, torch.Tensor) else (k,)
        if not p.shape or p.shape[0] != k or (self.coupling == "batch" and p.shape != expected):
            raise ValueError(f"probabilities must give {k} values (one per level), got shape {tuple(p.shape)} "
                             f"(expected {expected}) from {schedule!r}")
        host = p.detach().to("cpu", torch.float64)
        if check_values:
            check_probabilities(host, schedule, t, dt)
        return p, host

    def expected_cost(self, t: TimeLike, dt: Optional[float]) -> float:
        """Expected cost per sample and step by the exact rule: ``sum_m C_m P(f^m evaluated)``, with
        ``P = 1 - (1 - p_m)(1 - p_{m+1})`` for ``m < k`` and ``p_k`` for the top level (spec §4.4)."""
        costs, p = self.require_costs(t, None), self._probabilities(t, dt, None)[1]
        return float((self.evaluation_probabilities(p) * costs.reshape(-1, *(1,) * (p.dim() - 1))).sum(0).mean())

    def theory_cost(self, t: TimeLike, dt: Optional[float]) -> float:
        """The paper's accounting ``sum_l p_l C_l`` per sample and step."""
        costs, p = self.require_costs(t, None), self._probabilities(t, dt, None)[1]
        return float((p * costs.reshape(-1, *(1,) * (p.dim() - 1))).sum(0).mean())

    def evaluation_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        """``P(f^m evaluated)`` for each level from ``p`` ``(k, ...)``: the exact union rule
        ``1 - (1 - p_m)(1 - p_{m+1})`` (``p_k`` for the top level) for coins independent across levels, the
        coin scheme's own rule otherwise (``ComonotoneCoins``: ``max(p_m, p_{m+1})``); 0 for a level that
        cancels out (``p_m = p_{m+1} = 1`` with ``prune_certain``)."""
        return self.coins.evaluation_probabilities(p).masked_fill(self._cancelling(p), 0.0)

    def _cancelling(self, p: torch.Tensor) -> torch.Tensor:
        """Levels whose coefficient is identically 0: both adjacent differences are certain (p = 1)."""
        cancel = torch.zeros_like(p, dtype=torch.bool)
        if self.prune_certain:
            certain = p >= 1
            cancel[:-1] = certain[:-1] & certain[1:]
        return cancel

    # -- the ML-EM step -----------------------------------------------------------------------------
    def sample(self, t: TimeLike, y: torch.Tensor, dt: Optional[float]) -> torch.Tensor:
        """The unbiased estimate ``sum_l (B_l / p_l) (f^l - f^{l-1})(t, y)`` of ``f^k(t, y)``: one ML-EM step.

        Args:
            t: time (float or 0-d tensor; with ``coupling="sample"`` also a ``(batch,)`` tensor).
            y: state ``(batch, ...)``.
            dt: the step size the estimate is for (schedules proportional to ``dt`` need it).
        Returns:
            a tensor like ``y``, differentiable in ``y``, the levels' parameters and the schedule's
            parameters (through the ``1/p`` weights, in reverse and forward mode).
        """
        if not self._deferred:  # a solver's own times and state are valid by construction
            check_state(y)
            check_time(t, y.shape[0])
        batch = y.shape[0]
        costs = self.require_costs(t, y)
        p, p_host = self._probabilities(t, dt, costs, check_values=False)  # (k,), or (k, batch) per-sample times
        if self.coupling == "batch" and p.dim() > 1:
            p, p_host = self._one_per_level(p), self._one_per_level(p_host)
        plan = self._host_plan(p_host, costs, t, dt)  # checks the values of p the first time it sees them
        coins = self.draw_coins(p_host, batch)  # bool CPU (k,) or (k, batch), from the scheme's own stream
        samples = batch if p_host.dim() == 1 else 1  # the plan's costs are per sample of a (k,) p
        self.record_step(batch, plan.expected * samples, plan.theory * samples)
        if self._recording:
            self.recorded.append(CoinRecord(float(t) if not isinstance(t, torch.Tensor) or t.numel() == 1 else math.nan,
                                            math.nan if dt is None else float(dt), p_host, coins.clone()))
        if self.accelerate and not (p.requires_grad or fwAD.unpack_dual(p).tangent is not None):
            out, outputs = self._sum(plan.terms(self, coins, y), t, y)  # the accelerated path
        else:
            out, outputs = self.combine(coins, p, t, y)
        if self.check_finite and not self._deferred and outputs and not all_finite(out):
            raise_non_finite(t, y, outputs)
        return out

    def combine(self, coins: torch.Tensor, p: torch.Tensor, t: TimeLike, y: torch.Tensor):
        """``(F, outputs)``: ``F = sum_m c_m f^m(t, y)`` for a step's ``coins`` and ``outputs = {m: f^m}`` of the
        levels that ran (``m = 0``: the base): the levels of ``_runs``, the ``c_m`` of ``_coefficients``, ``_sum``."""
        certain = p.detach().to("cpu", torch.float64).numpy().reshape(len(p), -1) >= 1
        c = self._coefficients(coins, p, y.dtype).to(y.device)
        terms = _terms(self._runs(coins, certain), c, y)
        return self._sum(terms, t, y) if terms else (torch.zeros_like(y) * c.sum(), {})  # no coin: 0, on p's graph

    def _runs(self, coins: torch.Tensor, certain: np.ndarray) -> np.ndarray:
        """Where each ``f^m`` runs, bool ``(k + 1, 1 or batch)`` (row 0: the base, everywhere): where ``B_m`` or
        ``B_{m+1}`` came up, unless ``f^m`` cancels (``certain``: ``p >= 1``, ``(k, 1 or batch)``; ``f^m`` cancels
        where ``p_m = p_{m+1} = 1``, with ``prune_certain``)."""
        k = self.num_levels
        drawn = coins.numpy().reshape(k, -1)
        run = np.empty((k + 1, drawn.shape[1]), dtype=bool)
        run[0] = self.base is not None
        run[1:] = drawn
        run[1:-1] |= drawn[1:]
        if self.prune_certain:
            run[1:-1] &= ~(certain[:-1] & certain[1:])
        return run

    def _coefficients(self, coins: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``c_0 .. c_k`` in ``dtype``, ``(k + 1,)`` or ``(k + 1, batch)``: ``c_m = w_m - w_{m+1}`` with the weights
        ``w_l = B_l / p_l``, ``w_0 = 1`` (``c_0 = 1 - w_1`` is the base's) and ``w_{k+1} = 0``; tensor operations on
        ``p``, differentiable in the schedule."""
        w = coins.to(device=p.device, dtype=p.dtype) / (p if p.dim() == coins.dim() else p.unsqueeze(-1))
        return torch.cat([torch.rsub(w[:1], 1), w[:-1] - w[1:], w[-1:]]).to(dtype)

    def _sum(self, terms: list, t: TimeLike, y: torch.Tensor):
        """``(sum_m c_m f^m(t, y), outputs)`` over ``terms = [(m, rows, c_m)]`` (``_terms``): ``f^m`` on the whole
        batch (``rows`` None) or on the sub-batch ``rows``; 0 without terms."""
        per_sample_t = isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == y.shape[0] > 1
        out, outputs = None, {}
        for m, rows, c in terms:
            if rows is None:  # the whole batch
                f = outputs[m] = self._evaluate(m, t, y)
                out = c * f if out is None else out.addcmul_(f, c)
            else:  # the samples that need f^m
                f = outputs[m] = self._evaluate(m, t.index_select(0, rows) if per_sample_t else t,
                                                y.index_select(0, rows))
                out = torch.zeros_like(y) if out is None else out
                out.index_put_((rows,), c * f, accumulate=True)  # (faster than index_add_ on the CPU)
        return (torch.zeros_like(y) if out is None else out), outputs

    def _host_plan(self, p: torch.Tensor, costs: torch.Tensor, t: TimeLike, dt: Optional[float]) -> "_HostPlan":
        """The ``_HostPlan`` of the float64 CPU ``p`` (kept for later steps); ``p`` is checked when it is made."""
        key = (p.numpy().tobytes(), p.shape, self.prune_certain)
        plan = self._plans.get(key)
        if plan is None:
            check_probabilities(p, self._modules["probabilities"], t, dt)
            if len(self._plans) >= _MEMO_SIZE:
                self._plans.clear()
            plan = self._plans[key] = _HostPlan(self, p, costs)
        return plan

    def _one_per_level(self, p: torch.Tensor) -> torch.Tensor:
        if p.numel() != self.num_levels:
            raise ValueError(f"coupling='batch' draws one coin per level for the whole batch, but the schedule gave "
                             f"probabilities of shape {tuple(p.shape)}: give a scalar time or use coupling='sample'")
        return p.reshape(self.num_levels)

    # -- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, m: int, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """``f^m(t, y)`` (``m = 0``: the base, free), checked and recorded."""
        if m == 0:
            out = self.base(t, y)
            check_output(out, y, "base (level 0)", t)
            return out
        start = time.perf_counter()
        out = self._modules["levels"]._modules[str(m - 1)](t, y)  # (nn.Module.__getattr__ is slow per step)
        seconds = time.perf_counter() - start
        rows = y.shape[0]
        for stats in self._stats_targets:  # the work ran: it is paid for even if its output is refused
            stats.record_level(m - 1, rows, seconds)
        if out.__class__ is not torch.Tensor or out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
            check_output(out, y, f"level {m}", t)  # one comparison chain on the hot path; names on failure
        return out

    def exact(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """``f^k(t, y)``: the top level, evaluated on the whole batch (counted in the stats)."""
        check_state(y)
        return self._evaluate(self.num_levels, t, y)

    def combination(self, coefficients: dict, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """``sum_m c_m f^m(t, y)`` for ``coefficients = {m: c_m}`` (``m = 0`` is the base; ``c_m`` a number
        or a ``(batch,)`` tensor); each level with a coefficient is evaluated once (``_sum``) and recorded."""
        check_state(y)
        terms = []
        for m in sorted(coefficients, reverse=True):
            if m > 0 or self.base is not None:
                c = torch.as_tensor(coefficients[m]).to(device=y.device, dtype=y.dtype)
                terms.append((m, None, c.reshape(-1, *(1,) * (y.dim() - 1)) if c.dim() == 1 else c))
        out = self._sum(terms, t, y)[0]
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"levels {sorted(coefficients)} gave NaN or inf at t={time_repr(t)}")
        return out

    def forward(self, t: TimeLike, y: torch.Tensor, dt: Optional[float] = None) -> torch.Tensor:
        """``sample(t, y, dt)``; ``dt`` may be omitted for schedules that do not depend on it."""
        return self.sample(t, y, dt)

    # -- finiteness checks --------------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Inside the block ``sample`` does not check its estimate for NaN/inf (a reduction and a host sync a step)
        nor its time and state (the caller vouches for them: a solver's grid and state are valid by construction):
        a solver checks its state every few steps instead and, when it is not finite, replays the steps since its
        last good check inside ``rewind(checkpoint)``, which names the level and the time (``solvers/base.py``)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def checkpoint(self) -> tuple:
        """Where the coins stand (the scheme's stream and the recorded steps), for ``rewind``."""
        return self.coins.get_state(), len(self.recorded)

    @contextlib.contextmanager
    def rewind(self, checkpoint: tuple) -> Iterator[None]:
        """Inside the block the coins start again from ``checkpoint`` (the same steps draw the same coins),
        every estimate is checked, and nothing is counted in the statistics."""
        state, recorded = checkpoint
        saved = [copy.deepcopy(vars(stats)) for stats in self._stats_targets]
        deferred, self._deferred = self._deferred, 0
        self.coins.set_state(state)
        del self.recorded[recorded:]
        try:
            yield
        finally:
            self._deferred = deferred
            for stats, fields in zip(self._stats_targets, saved):
                vars(stats).update(fields)

    def extra_repr(self) -> str:
        return f"k={self.num_levels}, coupling={self.coupling!r}, coins={self.coins!r}, seed={self.seed}"


def _terms(run: np.ndarray, c: torch.Tensor, y: torch.Tensor) -> list:
    """The terms ``[(m, rows, c_m)]`` of ``sum_m c_m f^m``, top level first, from where each level runs (``run``,
    ``(k + 1, 1 or batch)``) and the coefficients ``c`` (``(k + 1,)`` or ``(k + 1, batch)``, on ``y``'s device):
    ``rows`` is None where ``f^m`` runs on the whole batch, else the indices of its samples (and ``c_m`` theirs)."""
    if c.dim() > 1:  # per-sample coefficients (k + 1, batch, 1, ...); a batch's stay 0-d
        c = c.reshape(*c.shape, *(1,) * (y.dim() - 1))
    terms, width = [], run.shape[1]
    for m, count in reversed(list(enumerate(run.sum(1).tolist()))):
        if count == width:
            terms.append((m, None, c[m]))
        elif count:
            rows = torch.from_numpy(np.flatnonzero(run[m])).to(y.device)
            terms.append((m, rows, c[m].index_select(0, rows)))
    return terms


class _HostPlan:
    """What follows from one value of a step's float64 ``p``: the expected and theory cost of a step per sample
    (summed over the samples for per-sample ``p``) and, for one coin per level, each coin pattern's terms. A pure
    function of ``p``, the costs, the coin scheme and ``prune_certain`` (``MultilevelDrift._host_plan``)."""

    def __init__(self, drift: MultilevelDrift, p: torch.Tensor, costs: torch.Tensor):
        column = costs.reshape(-1, *(1,) * (p.dim() - 1))
        self.expected = float((drift.evaluation_probabilities(p) * column).sum())
        self.theory = float((p * column).sum())
        rows = p.numpy().reshape(len(p), -1)  # (k, 1) or (k, batch)
        self.inverse, self.certain = 1 / rows, rows >= 1
        self.terms_of: dict = {}

    def terms(self, drift: MultilevelDrift, coins: torch.Tensor, y: torch.Tensor) -> list:
        """``_terms`` of ``drift._runs`` and ``drift._coefficients`` for ``coins``, the coefficients computed on the
        host (numpy: the same float64 numbers) and, for one coin per level, kept per coin pattern (and base, dtype
        and device of the state)."""
        key = (coins.numpy().tobytes(), drift.base is not None, y.dtype, y.device) if coins.dim() == 1 else None
        terms = self.terms_of.get(key)
        if terms is None:
            w = coins.numpy().reshape(len(coins), -1) * self.inverse  # B_l / p_l
            c = torch.from_numpy(np.concatenate([1 - w[:1], w[:-1] - w[1:], w[-1:]])).to(y.dtype).to(y.device)
            terms = _terms(drift._runs(coins, self.certain), c[:, 0] if coins.dim() == 1 else c, y)
            if key is not None:
                self.terms_of[key] = terms
        return terms
