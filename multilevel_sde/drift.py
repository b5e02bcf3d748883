"""MultilevelDrift: a ladder of approximators ``f^1 .. f^k`` of a drift, sampled the ML-EM way.

Each step, coins ``B_l ~ Bernoulli(p_l)`` decide which differences ``f^l - f^{l-1}`` enter the unbiased
estimate ``F = sum_l (B_l / p_l) (f^l - f^{l-1})`` (spec §4.1). It is computed as ``sum_m c_m f^m`` with
``c_m = B_m/p_m - B_{m+1}/p_{m+1}``: each level is evaluated at most once per step (f^m is shared by the
differences m and m+1), only when one of them is drawn, and with every ``p = 1`` the estimate is ``f^k``
to the last bit. The drift knows nothing of steppers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ._fast import _FastBatch, _FastSample, _host_to_like, _on_device
from ._random import check_seed, fresh_seed, make_generator
from .coins import CoinRecord, CoinScheme, IndependentCoins, UniformStream, as_coin_scheme
from .cost import measure_costs
from .probabilities import as_schedule
from .stats import Stats

__all__ = ["MultilevelDrift", "NonFiniteError", "COUPLINGS"]

COUPLINGS = ("batch", "sample")
_PLAN_CACHE_SIZE = 256  # step plans kept per drift (one per distinct dt of a dt-dependent schedule)
TimeLike = Union[float, torch.Tensor]


class NonFiniteError(ValueError, FloatingPointError):
    """A level (or the state) produced NaN or inf; the message names the level and the time."""


class _FunctionLevel(nn.Module):
    """Holds a plain callable ``f(t, y)`` inside an ``nn.ModuleList``."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, t, y):
        return self.fn(t, y)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _as_module(fn, name: str) -> nn.Module:
    if isinstance(fn, nn.Module):
        return fn
    if not callable(fn):
        raise TypeError(f"{name} must be callable f(t, y) -> tensor, got {fn!r}")
    return _FunctionLevel(fn)


def _validate_costs(costs, k: int) -> Optional[torch.Tensor]:
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


def _time_repr(t: TimeLike) -> str:
    if isinstance(t, torch.Tensor) and t.numel() != 1:
        return f"tensor of shape {tuple(t.shape)}"
    return f"{float(t):.6g}"


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
            see ``coins.py``), a ``CoinScheme`` or a bool pattern to replay (``coins.Replay``).
        base: ``f^0`` (default: zero), free of cost; the estimate is then
            ``f^0 + sum_l (B_l / p_l)(f^l - f^{l-1})``, still unbiased for ``f^k`` (spec §4.5).
        seed: seed of the coin generator (None: fresh entropy, kept in ``.seed``).
        check_finite: check each step's estimate for NaN/inf and name the level at fault (one host
            sync per step; switch off for maximal GPU throughput).
        prune_certain: skip a level whose two differences are both certain (``p_m = p_{m+1} = 1``):
            its coefficient is exactly 0, so it is neither evaluated nor paid for. False follows the
            literal rule "f^m is paid when difference m or m+1 is drawn".

    ``sample(t, y, dt)`` is the estimate; ``exact(t, y)`` is ``f^k``; ``expected_cost(t, dt)`` the expected
    cost per sample and step (with every ``p = 1`` only ``f^k`` runs: ML-EM is then EM, at EM's cost). ``stats`` accumulates over calls (``reset_stats()``); ``track()`` collects
    the stats of a block (the solvers use it for their per-solve stats).
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
    ):
        super().__init__()
        if isinstance(levels, (nn.Module, str)) or callable(levels) or not hasattr(levels, "__iter__"):
            raise TypeError(f"levels must be a sequence of callables, got {levels!r}")
        levels = list(levels)
        if not levels:
            raise ValueError("levels must hold at least one level, got an empty ladder []")
        self.levels = nn.ModuleList(_as_module(f, f"levels[{i}] (level {i + 1})") for i, f in enumerate(levels))
        self.base = None if base is None else _as_module(base, "base")
        self.probabilities = as_schedule(probabilities)
        tied = getattr(self.probabilities, "num_levels", lambda: None)()
        if tied is not None and tied != self.num_levels:
            raise ValueError(
                f"probabilities has {tied} entries but the ladder has {self.num_levels} levels: {self.probabilities!r}"
            )
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.coupling = coupling
        self.coins = as_coin_scheme(coins)
        seed = check_seed(seed)
        self.seed = fresh_seed() if seed is None else seed
        self._generator = make_generator(self.seed)
        self._uniforms = UniformStream(self._generator)
        self._step = 0
        self.check_finite = bool(check_finite)
        self.prune_certain = bool(prune_certain)
        costs_vec = _validate_costs(costs, self.num_levels)
        self._stats = Stats(self.num_levels, costs=None if costs_vec is None else costs_vec.tolist())
        self._costs = costs_vec
        self._plan_cache: dict = {}
        self._last_plan: Optional[tuple] = None  # (schedule, step-size key, token, plan) of the last cached plan
        self._trackers: list[Stats] = []
        self._stats_targets: tuple[Stats, ...] = (self._stats,)  # what each step and level call is recorded in
        self._fast: Optional[Union[_FastBatch, _FastSample]] = None  # the steady state's path (_start_fast)
        self._step_log: Optional[StepLog] = None  # set by deferred_checks()
        self._recording = False
        self.recorded: list[CoinRecord] = []

    # -- ladder -------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def _level_modules(self) -> tuple:
        """The levels, cheapest first (read from ``_modules`` directly: ``nn.Module.__getattr__`` is slow
        on the per-step path)."""
        return tuple(self._modules["levels"]._modules.values())

    @property
    def costs(self) -> Optional[torch.Tensor]:
        """Cost per sample of each level, float64 ``(k,)`` (None until given or measured)."""
        return self._costs

    @property
    def cost_unit(self) -> str:
        return self._stats.cost_unit

    def set_costs(self, costs: Sequence[float], unit: str = "given") -> None:
        self._costs = _validate_costs(costs, self.num_levels)
        self._plan_cache, self._last_plan = {}, None
        for stats in self._stats_targets:
            stats.costs, stats.cost_unit = self._costs.tolist(), unit

    def __setattr__(self, name: str, value) -> None:
        """Any attribute set (coupling, coins, base, recording, costs, schedule, trackers, ...) ends the fast
        path, whose statistics are first folded into the ``Stats`` objects it counted for."""
        if self.__dict__.get("_fast") is not None:
            self._drop_fast()
        super().__setattr__(name, value)

    def measure_costs(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """Measures and sets the per-sample costs on an example state ``y`` (FLOPs, else seconds)."""
        costs, unit = measure_costs(list(self.levels), t, y)
        self.set_costs(costs, unit)
        return costs

    def _require_costs(self, t: TimeLike, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self._costs is None:
            if y is None:
                raise ValueError("costs are unknown: pass costs= to MultilevelDrift or call measure_costs(t, y) first")
            self.measure_costs(t, y)
        return self._costs

    # -- randomness ---------------------------------------------------------------------------------
    def reseed(self, seed: Optional[int] = None) -> int:
        """Restarts the coin stream (and the coin scheme) from ``seed`` (None: fresh entropy)."""
        seed = check_seed(seed)
        self.seed = fresh_seed() if seed is None else seed
        self._generator.manual_seed(self.seed)
        self._uniforms.reset()
        self._step = 0
        self.coins.reset()
        if self._recording:
            self.recorded = []
        return self.seed

    def record_coins(self, enabled: bool = True) -> None:
        """Starts (or stops) recording the coins of every step into ``recorded`` (cleared on start)."""
        self._recording = bool(enabled)
        if enabled:
            self.recorded = []

    def recorded_coins(self) -> torch.Tensor:
        """The recorded coins, bool ``(steps, k)`` (batch coupling) or ``(steps, k, batch)``."""
        if not self.recorded:
            raise ValueError("no coins recorded: call record_coins() before solving")
        return torch.stack([r.coins for r in self.recorded])

    def recorded_probabilities(self) -> torch.Tensor:
        """The probabilities of every recorded step, float64 ``(steps, k[, batch])``."""
        if not self.recorded:
            raise ValueError("no coins recorded: call record_coins() before solving")
        return torch.stack([r.probabilities for r in self.recorded])

    # -- statistics ---------------------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """The statistics accumulated over all calls (up to date whenever read)."""
        self._flush_fast()
        return self._stats

    def reset_stats(self) -> None:
        self._flush_fast()
        self._stats.reset()

    @contextlib.contextmanager
    def track(self) -> Iterator[Stats]:
        """Collects the statistics of the calls made inside the block into a fresh ``Stats``."""
        stats = Stats(self.num_levels, costs=self._stats.costs, cost_unit=self._stats.cost_unit, seed=self.seed)
        self._trackers.append(stats)
        self._stats_targets = (self._stats, *self._trackers)  # __setattr__ first folds the fast path's counts
        try:
            yield stats
        finally:
            self._trackers.remove(stats)
            self._stats_targets = (self._stats, *self._trackers)

    def _all_stats(self) -> tuple[Stats, ...]:
        self._flush_fast()
        return self._stats_targets

    def _flush_fast(self) -> None:
        fast = self.__dict__.get("_fast")
        if fast is not None:
            fast.flush(self._stats_targets)

    def _drop_fast(self) -> None:
        self._flush_fast()
        self.__dict__["_fast"] = None

    # -- probabilities ------------------------------------------------------------------------------
    def probabilities_at(self, t: TimeLike, dt: Optional[float], costs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The schedule's ``p`` at ``(t, dt)``, validated: shape ``(k,)`` (or ``(k, *t.shape)``), in ``(0, 1]``."""
        if dt is None and getattr(self.probabilities, "per_unit_time", False):
            raise ValueError(
                f"the schedule {self.probabilities!r} depends on the step size: call sample(t, y, dt) with dt"
            )
        if dt is not None and (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 0 < dt < float("inf")):
            raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
        costs = self._costs if costs is None else costs
        if costs is None:
            costs = torch.ones(self.num_levels, dtype=torch.float64)
        raw = self.probabilities(t, dt, costs)
        try:
            p = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"probabilities: {self.probabilities!r} returned {type(raw).__name__}, "
                            f"expected a tensor of {self.num_levels} values") from err
        expected = (self.num_levels,) + (tuple(t.shape) if isinstance(t, torch.Tensor) else ())
        if p.dim() == 0 or p.shape[0] != self.num_levels or (self.coupling == "batch" and tuple(p.shape) != expected):
            raise ValueError(
                f"probabilities must give {self.num_levels} values (one per level), got shape {tuple(p.shape)} "
                f"(expected {expected}) from {self.probabilities!r}"
            )
        host = p.detach().to("cpu", torch.float64)
        if not ((host > 0) & (host <= 1)).all():
            raise ValueError(
                f"probabilities must lie in (0, 1]; {self.probabilities!r} gave {host.tolist()} "
                f"at t={_time_repr(t)}, dt={dt!r}"
            )
        return p

    def expected_cost(self, t: TimeLike, dt: Optional[float]) -> float:
        """Expected cost per sample and step by the exact rule: ``sum_m C_m P(f^m evaluated)``, with
        ``P = 1 - (1 - p_m)(1 - p_{m+1})`` for ``m < k`` and ``p_k`` for the top level (spec §4.4)."""
        costs = self._require_costs(t, None)
        p = self.probabilities_at(t, dt).detach().to("cpu", torch.float64)
        return float(self._expected_cost_of(p, costs).mean())

    def theory_cost(self, t: TimeLike, dt: Optional[float]) -> float:
        """The paper's accounting ``sum_l p_l C_l`` per sample and step."""
        costs = self._require_costs(t, None)
        p = self.probabilities_at(t, dt).detach().to("cpu", torch.float64)
        return float((p * costs.reshape(-1, *([1] * (p.dim() - 1)))).sum(0).mean())

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

    def _expected_cost_of(self, p: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (p.dim() - 1)
        return (self.evaluation_probabilities(p) * costs.reshape(shape)).sum(0)

    # -- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, m: int, t: TimeLike, y: torch.Tensor, level: Optional[nn.Module] = None) -> torch.Tensor:
        """``f^{m+1}(t, y)`` (``m`` from 0; ``level`` is ``self.levels[m]`` when the caller has it), checked
        and recorded."""
        level = self.levels[m] if level is None else level
        start = time.perf_counter()
        out = level(t, y)
        seconds = time.perf_counter() - start
        rows = y.shape[0]
        for stats in self._stats_targets:  # the work ran: it is paid for even if its output is refused
            stats.record_level(m, rows, seconds)
        if out.__class__ is not torch.Tensor or out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
            self._check_output(out, y, f"level {m + 1}", t)  # one comparison chain on the hot path; names on failure
        return out

    def _evaluate_base(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        out = self.base(t, y)
        self._check_output(out, y, "base (level 0)", t)
        return out

    @staticmethod
    def _check_output(out, y: torch.Tensor, who: str, t: TimeLike) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{who} must return a tensor, got {type(out).__name__} at t={_time_repr(t)}")
        if out.shape != y.shape:
            raise ValueError(f"{who} returned shape {tuple(out.shape)} for a state of shape {tuple(y.shape)}")
        if out.dtype != y.dtype:
            raise ValueError(f"{who} returned dtype {out.dtype} for a state of dtype {y.dtype}")
        if out.device != y.device:
            raise ValueError(f"{who} returned a tensor on {out.device} for a state on {y.device}")

    def exact(self, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """``f^k(t, y)``: the top level, evaluated on the whole batch (counted in the stats)."""
        self._check_state(y)
        return self._evaluate(self.num_levels - 1, t, y)

    def combination(self, coefficients: dict, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        """``sum_m c_m f^m(t, y)`` for ``coefficients = {m: c_m}`` (``m = 0`` is the base; ``c_m`` a number
        or a ``(batch,)`` tensor); each level with a coefficient is evaluated once and recorded."""
        self._check_state(y)
        trailing = (1,) * (y.dim() - 1)
        out = torch.zeros_like(y)
        for m in sorted(coefficients, reverse=True):
            c = coefficients[m]
            if m == 0 and self.base is None:
                continue
            f_m = self._evaluate_base(t, y) if m == 0 else self._evaluate(m - 1, t, y)
            if isinstance(c, torch.Tensor) and c.dim() == 1:
                c = c.to(device=y.device, dtype=y.dtype).reshape(-1, *trailing)
            out = out + c * f_m
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"levels {sorted(coefficients)} gave NaN or inf at t={_time_repr(t)}")
        return out

    def forward(self, t: TimeLike, y: torch.Tensor, dt: Optional[float] = None) -> torch.Tensor:
        """``sample(t, y, dt)``; ``dt`` may be omitted for schedules that do not depend on it."""
        return self.sample(t, y, dt)

    def _check_state(self, y) -> None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a tensor, got {type(y).__name__}")
        if y.dim() < 1 or y.shape[0] == 0:
            raise ValueError(f"y must have shape (batch, ...) with batch >= 1, got {tuple(y.shape)}")

    def draw_coins(self, p: torch.Tensor, batch: int) -> torch.Tensor:
        """The coins of the next step (bool CPU ``(k,)`` or ``(k, batch)``), advancing the step counter."""
        if self._buffered_coins():
            p_host = p.detach().to("cpu", torch.float64)
            p_rows = p_host.numpy().reshape(p_host.shape[0], -1)
            coins = self._independent_coins(p_rows, _uncertain_rows(p_rows), 1 if self.coupling == "batch" else batch)
            return torch.from_numpy(coins.reshape(-1) if self.coupling == "batch" else coins)
        coins = self.coins.draw(p, None if self.coupling == "batch" else batch, self._generator, self._step)
        self.__dict__["_step"] = self._step + 1  # a plain counter: skip nn.Module.__setattr__ on the hot path
        return coins

    def _buffered_coins(self) -> bool:
        """Independent coins are ``u < p`` of fresh uniforms, taken from the buffered stream ``_uniforms``."""
        return type(self.coins) is IndependentCoins

    def _independent_coins(self, p: np.ndarray, uncertain: tuple, width: int) -> np.ndarray:
        """Independent coins ``u < p`` for ``p`` float64 ``(k, 1)`` or ``(k, width)``: bool ``(k, width)``, advancing
        the step counter. A level whose ``p`` is 1 (for every sample) is certain and takes no uniform; the
        others take ``width`` uniforms each, in level order, from the buffered stream."""
        self.__dict__["_step"] = self._step + 1
        k, n = p.shape[0], len(uncertain)
        if not n:
            return np.ones((k, width), dtype=bool)
        u = self._uniforms.numpy(n * width).reshape(n, width)
        first = uncertain[0]
        if uncertain[-1] - first == n - 1:  # a run of levels (the usual case: the certain ones are the cheapest)
            coins = np.empty((k, width), dtype=bool)
            coins[:first] = True
            coins[first + n:] = True
            np.less(u, p[first:first + n], out=coins[first:first + n])
        else:
            coins = np.ones((k, width), dtype=bool)
            coins[list(uncertain)] = u < p[list(uncertain)]
        return coins

    def _batch_code(self, plan: "_StepPlan") -> int:
        """One coin per level for the whole batch, as an integer (bit ``m``: the coin of level ``m + 1``),
        advancing the step counter. Independent coins come from ``UniformStream.next_code``: the same
        uniforms, compared with ``p`` many steps at a time."""
        if not self._buffered_coins():
            return _code_of(self.draw_coins(plan.p_host, 1).tolist())
        self.__dict__["_step"] = self._step + 1
        if not plan.uncertain:
            return plan.code_base
        return self._uniforms.next_code(plan, plan.code_thresholds, plan.code_bits, plan.code_base)

    def _sample_coins(self, plan: "_StepPlan", batch: int) -> np.ndarray:
        """One coin per level and sample, bool ``(k, batch)`` (``coupling="sample"``)."""
        if self._buffered_coins():
            return self._independent_coins(plan.p_numpy, plan.uncertain, batch)
        return self.draw_coins(plan.p_host, batch).numpy()

    def sample(self, t: TimeLike, y: torch.Tensor, dt: Optional[float]) -> torch.Tensor:
        """The unbiased estimate ``sum_l (B_l / p_l) (f^l - f^{l-1})(t, y)`` of ``f^k(t, y)``.

        Args:
            t: time (float or 0-d tensor; with ``coupling="sample"`` also a ``(batch,)`` tensor).
            y: state ``(batch, ...)``.
            dt: the step size the estimate is for (schedules proportional to ``dt`` need it).
        Returns:
            a tensor like ``y``, differentiable in ``y``, the levels' parameters and the schedule's
            parameters (through the ``1/p`` weights, in reverse and forward mode).
        """
        fast = self._fast  # the steady state of a solve: the same plan, batch size and kind of time as last step
        if (fast is not None and y.__class__ is torch.Tensor and y.dim() != 0 and y.shape[0] == fast.batch
                and (fast.dt is None or fast.dt == dt)
                and ((t.__class__ is torch.Tensor and t.dim() == 0  # a NaN/inf host time falls through and is refused
                      and (t.device.type != "cpu" or math.isfinite(t.item())))
                     or (t.__class__ is float and t - t == 0.0))
                and (fast.schedule_fixed or fast.token == fast.schedule.cache_token())):
            return self._sample_fast(t, y, fast) if fast.__class__ is _FastBatch else self._sample_fast_rows(t, y, fast)
        if y.__class__ is not torch.Tensor or y.dim() < 1 or y.shape[0] == 0:
            self._check_state(y)
        _check_time(t, y.shape[0])  # (the fast path above takes finite floats and 0-d tensors only)
        log = self._step_log
        if log is not None and log.replay is not None:
            return self._replay_step(t, y, log)
        costs = self._costs if self._costs is not None else self._require_costs(t, y)
        previous = self._last_plan
        plan = self._step_plan(t, dt, costs)
        batch = y.shape[0]
        if previous is not None and previous[3] is plan and self._fast_path_fits(t, plan):  # a plan used twice
            fast = self._start_fast(plan, batch)
            return self._sample_fast(t, y, fast) if fast.__class__ is _FastBatch else self._sample_fast_rows(t, y, fast)
        scale = batch if plan.one_coin_shape else 1
        for stats in self._stats_targets:
            stats.record_step(batch, plan.expected * scale, plan.theory * scale)
        coins = self._draw(t, dt, plan, batch)
        out, outputs = self._estimate(t, y, coins, plan)
        if log is not None and log.checking:  # a solver checks its state instead (deferred_checks)
            log.entries.append((coins, plan))
            return out
        if self.check_finite and outputs and not _all_finite(out):
            self._raise_non_finite(t, y, outputs)
        return out

    def _draw(self, t: TimeLike, dt: Optional[float], plan: "_StepPlan", batch: int):
        """The coins of one step: an ``int`` code with one coin per level (batch coupling, or per-sample
        coupling where every sample's coins are certain), a bool ``(k, batch)`` array (per-sample coins), or
        a bool tensor (probabilities that carry a gradient); recorded when ``record_coins`` is on."""
        if plan.attached:
            coins = self.draw_coins(plan.p_host, batch)
            record = coins.clone() if self._recording else None
        elif self.coupling == "batch" or (not plan.uncertain and plan.one_coin_shape and self._buffered_coins()):
            coins = self._batch_code(plan)
            if self._recording:
                record = torch.tensor([(coins >> m) & 1 for m in range(self.num_levels)], dtype=torch.bool)
                record = record if self.coupling == "batch" else record[:, None].repeat(1, batch)
        else:
            coins = self._sample_coins(plan, batch)
            record = torch.from_numpy(coins.copy()) if self._recording else None
        if self._recording:
            self._record(t, dt, plan, record)
        return coins

    def _estimate(self, t: TimeLike, y: torch.Tensor, coins, plan: "_StepPlan"):
        """``(estimate, {level: output})`` for the coins of ``_draw``."""
        if plan.attached:
            return self._combine_attached(t, y, coins, plan)
        if coins.__class__ is int:
            if coins == 0 and self.base is None:
                return torch.zeros_like(y), {}  # no coin came up: nothing to evaluate (common for small dt)
            return self._combine_batch_floats(t, y, coins, plan)
        if self.base is None and not coins.any():
            return torch.zeros_like(y), {}
        return self._combine_sample_host(t, y, coins, plan)

    # -- the fast path ------------------------------------------------------------------------------
    def _fast_path_fits(self, t: TimeLike, plan: "_StepPlan") -> bool:
        """Whether the steps of ``plan`` can take a fast path (``_sample_fast``, or ``_sample_fast_rows`` for
        per-sample coins): one probability per level for the whole batch, independent coins, no base, no
        recording, no replay, scalar time, a plan reused from the previous step (``_last_plan``)."""
        last = self._last_plan
        return (last is not None and last[3] is plan and self.base is None
                and not self._recording and self._buffered_coins() and plan.one_coin_shape and not plan.attached
                and (self._step_log is None or self._step_log.replay is None)
                and (t.__class__ is not torch.Tensor or t.dim() == 0))

    def _start_fast(self, plan: "_StepPlan", batch: int) -> Union[_FastBatch, _FastSample]:
        schedule, step_key, token, _ = self._last_plan
        if self._fast is not None:
            self._drop_fast()
        per_sample = self.coupling == "sample" and bool(plan.uncertain)  # else one coin per level serves all
        fast = (_FastSample if per_sample else _FastBatch)(plan, schedule, step_key, token, batch, self.num_levels)
        fast.schedule_fixed = self._step_log is not None and self._step_log.schedule_fixed
        self.__dict__["_fast"] = fast
        return fast

    def _sample_fast(self, t: TimeLike, y: torch.Tensor, fast: _FastBatch) -> torch.Tensor:
        """One step of the steady batch-coupling path: the general path's estimate, coins and checks, with the
        statistics kept as counts per coin pattern (``_FastBatch.flush``) and no per-step lookups."""
        plan = fast.plan
        code = self._uniforms.next_code(plan, plan.code_thresholds, plan.code_bits, plan.code_base) \
            if plan.uncertain else plan.code_base  # _batch_code, inlined (the fast path has independent coins)
        self.__dict__["_step"] = self._step + 1
        recipe = plan.recipes.get(code) or self._recipe(plan, code)
        fast.counts[code] += 1
        modules, wall, perf_counter = self._modules["levels"]._modules, fast.wall, time.perf_counter
        shape, dtype, device = y.shape, y.dtype, y.device
        outputs = {}
        for m, name in recipe.modules:  # the top level first
            start = perf_counter()
            try:
                f_m = modules[name](t, y)
            except BaseException:
                fast.fail(code, outputs, self._stats_targets)  # what ran before it stays counted
                raise
            wall[m] += perf_counter() - start
            outputs[m + 1] = f_m
            if f_m.__class__ is not torch.Tensor or f_m.shape != shape or f_m.dtype != dtype or f_m.device != device:
                try:
                    self._check_output(f_m, y, f"level {m + 1}", t)
                except (TypeError, ValueError):
                    fast.fail(code, outputs, self._stats_targets)
                    raise
        out = _combine(recipe, outputs)
        if out is None:
            out = torch.zeros_like(y)
        log = self._step_log
        if log is not None and log.checking:  # a solver checks its state instead (deferred_checks)
            log.entries.append((code, plan))
        elif self.check_finite and outputs and not _all_finite(out):
            self._raise_non_finite(t, y, outputs)
        return out

    def _sample_fast_rows(self, t: TimeLike, y: torch.Tensor, fast: _FastSample) -> torch.Tensor:
        """One step of the steady per-sample path: the general path's coins and estimate (``_combine_sample_host``,
        to the last bit), read from a block of steps worked out at once (``_SampleBlock``)."""
        stream = self._uniforms
        block = fast.block
        if block is None or not block.fits(stream, y):
            block = fast.next_block(stream, list(self._modules["levels"]._modules), y)
        s = block.next
        block.next = s + 1
        stream.advance(block.width)
        block.position = stream.position()
        self.__dict__["_step"] = self._step + 1
        modules, wall, perf_counter = self._modules["levels"]._modules, fast.wall, time.perf_counter
        outputs, scattered = {}, []
        out, owned = None, False
        scatter = block.scatter[s]
        gathered = None if scatter is None else y.index_select(0, scatter[0])  # every sub-batch, one gather
        for m, name, part, c in block.terms[s]:  # the top level first
            x = y if part is None else gathered[part]
            start = perf_counter()
            try:
                f_m = modules[name](t, x)
            except BaseException:
                fast.fail(outputs, self._stats_targets)  # what ran before it stays counted
                raise
            wall[m] += perf_counter() - start
            outputs[m + 1] = f_m
            if f_m.__class__ is not torch.Tensor or f_m.shape != x.shape or f_m.dtype != x.dtype or f_m.device != x.device:
                try:
                    self._check_output(f_m, x, f"level {m + 1}", t)
                except (TypeError, ValueError):
                    fast.fail(outputs, self._stats_targets)
                    raise
            if part is not None:
                scattered.append(f_m)
            elif c.__class__ is float:
                out, owned = _accumulate(out, owned, f_m, c)
            else:
                out, owned = _accumulate_scaled(out, owned, f_m, c)
        if scatter is not None:
            rows, coefficients = scatter
            terms = torch.cat(scattered) if len(scattered) > 1 else scattered[0].clone()
            terms.mul_(coefficients)
            if not owned:
                out = torch.zeros_like(y) if out is None else out.clone()
            out.index_add_(0, rows, terms)
        if out is None:
            out = torch.zeros_like(y)
        log = self._step_log
        if log is not None and log.checking:  # a solver checks its state instead (deferred_checks)
            log.entries.append((block.coins[s], fast.plan))
        elif self.check_finite and outputs and not _all_finite(out):
            self._raise_non_finite(t, y, outputs)
        return out

    # -- deferred finiteness checks -------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred_checks(self, schedule_fixed: bool = False) -> Iterator[Optional["StepLog"]]:
        """For a solver that checks its own state instead of every estimate (``solvers/euler.py``).

        Inside the block ``sample`` skips its per-step finiteness check (a reduction over the estimate, and a
        host synchronisation, every step) and logs each step's coins in the yielded ``StepLog``; the solver
        checks its state every few steps, and when the state is not finite, replays the steps since its last
        good check with ``log.replaying()``, which checks each estimate as ``sample`` does and so names the
        level and the time at fault. Yields None (nothing logged, nothing to check) when ``check_finite`` is
        off or another solver already defers.

        ``schedule_fixed``: nothing but the solve runs until the block ends (no callback), so a time-independent
        schedule read at the first step cannot change: later steps skip comparing its ``cache_token()``."""
        if self._step_log is not None:
            yield None
            return
        log = StepLog(self, schedule_fixed, checking=self.check_finite)
        self._step_log = log  # a fresh fast path starts at the first step (__setattr__), with the schedule read
        try:
            yield log if log.checking else None
        finally:
            self._step_log = None

    def _replay_step(self, t: TimeLike, y: torch.Tensor, log: "StepLog") -> torch.Tensor:
        """The next logged step again, its estimate checked (``StepLog.replaying``)."""
        if log.replay >= len(log.entries):
            raise RuntimeError(f"the replay asked for step {log.replay + 1}, but only {len(log.entries)} are logged")
        coins, plan = log.entries[log.replay]
        log.replay += 1
        out, outputs = self._estimate(t, y, coins, plan)
        if outputs and not _all_finite(out):
            self._raise_non_finite(t, y, outputs)
        return out

    def _record(self, t: TimeLike, dt: Optional[float], plan: "_StepPlan", coins: torch.Tensor) -> None:
        self.recorded.append(CoinRecord(_time_float(t), _float_or_nan(dt), plan.p_host, coins))

    def _step_plan(self, t: TimeLike, dt: Optional[float], costs: torch.Tensor) -> "_StepPlan":
        """The probabilities of a step and what follows from them (host copies, expected and theory cost per
        sample, cancelling levels). Cached for schedules that do not depend on time (per ``dt`` for those that
        depend on the step size), for as long as the schedule's ``cache_token()`` (else its ``extra_repr()``)
        stays the same."""
        schedule = self._modules["probabilities"]
        last = self._last_plan  # the previous step's (schedule, dt, token, plan), checked first: the usual case
        scalar_t = t.__class__ is not torch.Tensor or t.dim() == 0
        if (last is not None and last[0] is schedule and (last[1] is None or last[1] == dt) and scalar_t
                and last[2] == schedule.cache_token()):
            return last[3]
        cacheable = not getattr(schedule, "time_dependent", True)
        if cacheable:
            token = schedule.cache_token() if hasattr(schedule, "cache_token") else schedule.extra_repr()
            shape = t.shape if isinstance(t, torch.Tensor) else ()  # per-sample times give per-sample p
            key = (dt if getattr(schedule, "step_dependent", True) else None, shape, token)
            plan = self._plan_cache.get(key)
            if plan is not None:
                self._remember_plan(schedule, key[0], token, plan, scalar_t)
                return plan
        p = self.probabilities_at(t, dt, costs)
        p_host = p.detach().to("cpu", torch.float64)
        column = costs.reshape(-1, *([1] * (p_host.dim() - 1)))
        cancel = self._cancelling(p_host)
        p_numpy = p_host.numpy() if p_host.dim() == 2 else p_host.numpy()[:, None]
        uncertain = _uncertain_rows(p_numpy)
        plan = _StepPlan(
            p=p,
            p_host=p_host,
            p_list=p_host.tolist(),
            p_numpy=p_numpy,
            expected=float(self._expected_cost_of(p_host, costs).sum()),
            theory=float((p_host * column).sum()),
            cancel=cancel,
            cancel_list=cancel.tolist(),
            keep_numpy=~(cancel.numpy() if cancel.dim() == 2 else cancel.numpy()[:, None]),
            uncertain=uncertain,
            attached=p.requires_grad or fwAD.unpack_dual(p).tangent is not None,
            one_coin_shape=p_host.dim() == 1,
        )
        if plan.one_coin_shape:  # the integer coin codes of _batch_code
            plan.code_thresholds = p_numpy[list(uncertain), 0]
            plan.code_bits = np.array([1 << m for m in uncertain], dtype=np.int64 if self.num_levels < 63 else object)
            plan.code_base = sum(1 << m for m in range(self.num_levels) if m not in uncertain)
        if cacheable and not plan.attached:
            if len(self._plan_cache) >= _PLAN_CACHE_SIZE:  # a non-uniform grid of a dt-dependent schedule
                self._plan_cache.clear()
            self._plan_cache[key] = plan
            self._remember_plan(schedule, key[0], token, plan, scalar_t)
        return plan

    def _remember_plan(self, schedule, step_key, token, plan: "_StepPlan", scalar_t: bool) -> None:
        """Keeps ``plan`` for the next step (at the same ``dt`` unless ``step_key`` is None: a schedule that
        ignores the step size), for scalar times and schedules with a ``cache_token``."""
        if scalar_t and hasattr(schedule, "cache_token"):
            self.__dict__["_last_plan"] = (schedule, step_key, token, plan)

    def _combine_batch_floats(self, t, y, code: int, plan: "_StepPlan"):
        """``sum_m c_m f^m`` with one coin per level (``code``, from ``_batch_code``); which levels run and their
        float coefficients depend only on the coins, so they are worked out once per coin pattern of a plan
        (``_batch_recipe``)."""
        recipe = self._recipe(plan, code)
        levels = self._level_modules()
        outputs = {}
        for m in recipe.evaluate:  # the top level first
            outputs[m + 1] = self._evaluate(m, t, y, levels[m])
        if self.base is not None:
            outputs[0] = self._evaluate_base(t, y)
        out = _combine(recipe, outputs)
        return (torch.zeros_like(y) if out is None else out), outputs

    def _recipe(self, plan: "_StepPlan", code: int) -> "_BatchRecipe":
        """The recipe of one coin pattern of ``plan``, worked out on its first use."""
        key = code if self.base is None else (code, "base")  # a base set after the plan was cached
        recipe = plan.recipes.get(key)
        if recipe is None:
            coins = [(code >> m) & 1 == 1 for m in range(self.num_levels)]
            recipe = plan.recipes[key] = self._batch_recipe(coins, plan)
        return recipe

    def _batch_recipe(self, coins: list, plan: "_StepPlan") -> "_BatchRecipe":
        """The levels one coin pattern evaluates (``m`` from 0, top first) and the terms ``(j, c_j)`` of its sum
        (``j`` = 0 for the base), a term with coefficient 1 first (``_start_with_unit``), or as a chain of
        ``lerp`` when that takes one tensor operation fewer (``_lerp_chain``)."""
        k = self.num_levels
        weights = [1.0 / p if c else 0.0 for c, p in zip(coins, plan.p_list)] + [0.0]
        evaluate = [m for m in range(k - 1, -1, -1)
                    if (coins[m] or (m + 1 < k and coins[m + 1])) and not plan.cancel_list[m]]
        terms = [(m + 1, weights[m] - weights[m + 1]) for m in evaluate]
        if self.base is not None:  # F = f^0 + sum_l w_l (f^l - f^{l-1}): f^0 enters with 1 - w_1
            terms.append((0, 1.0 - weights[0]))
        return _BatchRecipe(evaluate=evaluate, terms=_start_with_unit(terms), chain=_lerp_chain(terms),
                            modules=[(m, str(m)) for m in evaluate])

    def _combine_sample_host(self, t, y, drawn: np.ndarray, plan: "_StepPlan"):
        """Per-sample coins, nothing to differentiate: coefficients and sub-batches are worked out on the host
        (numpy, a few microseconds); each level runs on the sub-batch that needs it. A level needed by every
        sample enters the sum directly (as a number when its coefficient is the same for all); the sub-batch
        terms are scattered into it with one ``index_add_``."""
        batch, k = y.shape[0], len(plan.p_list)
        weights = drawn / plan.p_numpy  # B_l / p_l, float64 (k, batch)
        coef = weights.copy()
        coef[:-1] -= weights[1:]  # c_m = w_m - w_{m+1}
        need = drawn.copy()
        need[:-1] |= drawn[1:]
        need &= plan.keep_numpy
        counts, heads = need.sum(1).tolist(), drawn.sum(1).tolist()
        uniform_p = plan.p_numpy.shape[1] == 1
        levels = self._level_modules()
        trailing = (1,) * (y.dim() - 1)
        per_sample_t = _is_per_sample(t, batch)
        out, owned, outputs, scattered = None, False, {}, []
        for m in range(k - 1, -1, -1):
            count = counts[m]
            if count == 0:
                continue
            if count < batch:
                rows = np.flatnonzero(need[m])
                idx = _on_device(torch.from_numpy(rows), y.device)
                t_sub = t.index_select(0, idx) if per_sample_t else t
                outputs[m + 1] = self._evaluate(m, t_sub, y.index_select(0, idx), levels[m])
                scattered.append((rows, outputs[m + 1], coef[m, rows]))
                continue
            f_m = outputs[m + 1] = self._evaluate(m, t, y, levels[m])
            if uniform_p and heads[m] in (0, batch) and (m + 1 == k or heads[m + 1] in (0, batch)):
                out, owned = _accumulate(out, owned, f_m, float(coef[m, 0]))  # the same coefficient for all
            else:
                out, owned = _accumulate_rows(out, owned, f_m, coef[m], y)
        if self.base is not None:  # f^0 is free and always enters, with coefficient 1 - w_1
            f_0 = outputs[0] = self._evaluate_base(t, y)
            out, owned = _accumulate_rows(out, owned, f_0, 1.0 - weights[0], y)
        if scattered:
            rows = np.concatenate([r for r, _, _ in scattered])
            terms = torch.cat([f for _, f, _ in scattered]) if len(scattered) > 1 else scattered[0][1].clone()
            terms.mul_(_host_to_like(np.concatenate([c for _, _, c in scattered]), y).reshape(-1, *trailing))
            if not owned:
                out = torch.zeros_like(y) if out is None else out.clone()
            out.index_add_(0, _on_device(torch.from_numpy(rows), y.device), terms)
        return out, outputs

    def _combine_attached(self, t, y, coins, plan: "_StepPlan"):
        """The estimate as tensor operations on ``p``, so that it stays differentiable in the schedule."""
        p = plan.p
        p_b = p.unsqueeze(-1) if coins.dim() > p.dim() else p
        weights = coins.to(device=p.device, dtype=p.dtype) / p_b  # B_l / p_l, differentiable in p
        coef = weights - torch.cat([weights[1:], torch.zeros_like(weights[:1])])  # c_m, m = 1..k
        cancel = plan.cancel.unsqueeze(-1).expand(coins.shape) if coins.dim() > plan.cancel.dim() else plan.cancel
        need = (coins | torch.cat([coins[1:], torch.zeros_like(coins[:1])])) & ~cancel
        if self.coupling == "batch":
            return self._combine_batch(t, y, coins, need, coef, weights)
        return self._combine_sample(t, y, coins, need, coef, weights)

    def _combine_batch(self, t, y, coins, need, coef, weights):
        out, outputs = None, {}
        for m in reversed(range(self.num_levels)):
            if not bool(need[m]):
                continue
            f_m = outputs[m + 1] = self._evaluate(m, t, y)
            term = coef[m].to(y.dtype) * f_m
            out = term if out is None else out + term
        if self.base is not None:  # F = f^0 + sum_l w_l (f^l - f^{l-1}): f^0 enters with 1 - w_1
            f_0 = outputs[0] = self._evaluate_base(t, y)
            term = (1 - weights[0]).to(y.dtype) * f_0
            out = term if out is None else out + term
        if out is None:  # no coin came up: F = 0, still attached to the schedule's graph
            out = torch.zeros_like(y) + 0 * weights.sum().to(y.dtype)
        return out, outputs

    def _combine_sample(self, t, y, coins, need, coef, weights):
        """Per-sample coins, differentiable in ``p``: each level runs on the sub-batch that needs it. The
        coefficients move to the device once and the sub-batch sizes come from one count."""
        batch = y.shape[0]
        trailing = (1,) * (y.dim() - 1)
        levels = list(range(self.num_levels, 0, -1))
        masks, coefs = [need[m - 1] for m in levels], [coef[m - 1] for m in levels]
        if self.base is not None:  # f^0 is free and always enters, with coefficient 1 - w_1
            levels.append(0), masks.append(torch.ones_like(coins[0])), coefs.append(1 - weights[0])
        counts = torch.stack(masks).sum(1).tolist()
        coefs = torch.stack(coefs).to(device=y.device, dtype=y.dtype)
        out, outputs = torch.zeros_like(y), {}
        for level, mask, c, count in zip(levels, masks, coefs, counts):
            if count == 0:
                continue
            evaluate = self._evaluate_base if level == 0 else (lambda tt, yy, m=level - 1: self._evaluate(m, tt, yy))
            if count == batch:
                f_l = outputs[level] = evaluate(t, y)
                out = out + c.reshape(-1, *trailing) * f_l
            else:
                idx = mask.nonzero().squeeze(1).to(y.device, non_blocking=True)
                t_sub = t.index_select(0, idx) if _is_per_sample(t, batch) else t
                f_l = outputs[level] = evaluate(t_sub, y.index_select(0, idx))
                out = out.index_add(0, idx, c.index_select(0, idx).reshape(-1, *trailing) * f_l)
        if not outputs:  # no coin came up: F = 0, still attached to the schedule's graph
            out = out + 0 * weights.sum().to(y.dtype)
        return out, outputs

    def _raise_non_finite(self, t, y, outputs) -> None:
        if not bool(torch.isfinite(y).all()):
            raise NonFiniteError(f"the state y holds NaN or inf at t={_time_repr(t)}")
        for level in sorted(outputs):
            if not bool(torch.isfinite(outputs[level]).all()):
                name = "base (level 0)" if level == 0 else f"level {level}"
                raise NonFiniteError(f"{name} returned NaN or inf at t={_time_repr(t)}")
        raise NonFiniteError(f"the ML estimate overflowed (NaN or inf) at t={_time_repr(t)}; check the probabilities")

    def extra_repr(self) -> str:
        return f"k={self.num_levels}, coupling={self.coupling!r}, coins={self.coins!r}, seed={self.seed}"


@dataclass
class _StepPlan:
    p: torch.Tensor
    p_host: torch.Tensor
    expected: float  # per sample (summed over samples for per-sample probabilities)
    theory: float
    cancel: torch.Tensor
    attached: bool  # p carries a gradient (reverse or forward mode)
    p_list: list = None
    cancel_list: list = None
    p_numpy: np.ndarray = None  # float64 (k, 1) or (k, batch)
    keep_numpy: np.ndarray = None  # bool, ~cancel, shaped like p_numpy
    uncertain: tuple = ()  # levels whose coin is not certain (p < 1 for some sample)
    one_coin_shape: bool = True  # p is (k,): one probability per level for the whole batch
    code_thresholds: np.ndarray = None  # p of the uncertain levels (one_coin_shape only)
    code_bits: np.ndarray = None  # 1 << m for each uncertain level m
    code_base: int = 0  # the bits of the certain levels
    recipes: dict = field(default_factory=dict)  # coin code (with the base: (code, "base")) -> _BatchRecipe


class StepLog:
    """The coins of each step since a solver's last good check (``MultilevelDrift.deferred_checks``)."""

    def __init__(self, drift: "MultilevelDrift", schedule_fixed: bool = False, checking: bool = True):
        self.drift = drift
        self.schedule_fixed = schedule_fixed  # see MultilevelDrift.deferred_checks
        self.checking = checking  # False: check_finite is off, nothing is logged or checked
        self.entries: list = []  # (coins, plan) per step
        self.replay: Optional[int] = None  # index of the next entry to replay, while replaying

    def clear(self) -> None:
        """Forgets the logged steps (the solver's state after them was found finite)."""
        self.entries.clear()

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Inside the block, the drift's ``sample`` calls replay the logged steps in order (same coins, same
        probabilities), each estimate checked, without counting them in the statistics again."""
        self.drift._drop_fast()  # the replayed steps take the general path
        saved = [copy.deepcopy(stats.__dict__) for stats in self.drift._stats_targets]
        self.replay = 0
        try:
            yield
        finally:
            self.replay = None
            for stats, fields in zip(self.drift._stats_targets, saved):
                stats.__dict__.update(fields)


@dataclass
class _BatchRecipe:
    evaluate: list  # levels to evaluate (m from 0), top first
    terms: list  # (j, c_j): output j (0 the base, m + 1 level m) with its coefficient, in the order of the sum
    chain: Optional[tuple]  # (j first, [(j, lerp weight), ...]) when the sum is a cheaper chain of lerps
    modules: list  # (m, key of level m in the levels' ModuleList), as evaluate


def _code_of(coins: list) -> int:
    """Per-level bools as an integer: bit ``m`` is the coin of level ``m + 1``."""
    return sum(1 << m for m, c in enumerate(coins) if c)


def _uncertain_rows(p: np.ndarray) -> tuple:
    """The levels (rows of ``p`` ``(k, ...)``) where some ``p < 1``."""
    return tuple(np.flatnonzero((p.reshape(p.shape[0], -1) < 1).any(1)).tolist())


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: one reduction, and the full check only when the sum is not finite."""
    return math.isfinite((x.detach() if x.requires_grad else x).sum().item()) or bool(torch.isfinite(x).all())


def _accumulate(out: Optional[torch.Tensor], owned: bool, f: torch.Tensor, coefficient: float):
    """``(out + coefficient * f, owned)``: ``f`` itself when it is the first term with coefficient 1, in place
    when ``out`` is a tensor of our own (``owned``), never in place on a level's output. A zero coefficient
    still multiplies, so a level's NaN is not hidden."""
    if out is None:
        return (f, False) if coefficient == 1.0 else (f * coefficient, True)
    if owned:
        return out.add_(f, alpha=coefficient), True
    return torch.add(out, f, alpha=coefficient), True


def _combine_ordered(terms: list, outputs) -> Optional[torch.Tensor]:
    """``sum c_j * outputs[j]`` over ``terms = [(j, c_j), ...]`` (``c_j`` floats; None for no terms), accumulated
    in the given order: the first term as it is when its ``c`` is 1 (the output itself for a single such term),
    each other one with one fused ``add(f, alpha=c)``, in place on the sum once it is a tensor of our own, never
    on a level's output."""
    out, owned = None, False
    for j, c in terms:
        out, owned = _accumulate(out, owned, outputs[j], c)
    return out


def _combine(recipe: "_BatchRecipe", outputs) -> Optional[torch.Tensor]:
    """A batch recipe's sum of ``outputs`` (None for no terms): its lerp chain, else ``_combine_ordered``."""
    if recipe.chain is None:
        return _combine_ordered(recipe.terms, outputs)
    first, links = recipe.chain
    (j, w), rest = links[0], links[1:]
    out = torch.lerp(outputs[first], outputs[j], w)  # a tensor of our own: the next links work in place
    for j, w in rest:
        out.lerp_(outputs[j], w)
    return out


def _lerp_chain(terms: list) -> Optional[tuple]:
    """``sum_j c_j f_j`` as ``lerp(... lerp(f_a, f_b, w_b) ..., f_z, w_z)`` with ``w_j = c_j / S_j`` (``S_j`` the
    coefficients summed so far; ``x_j = (sum_{i <= j} c_i f_i) / S_j`` at each link): ``(a, [(b, w_b), ...])``.
    Worth it when the coefficients sum to exactly 1 and none is 1 (with ``p_1 = 1`` they telescope to
    ``B_1 / p_1 = 1``): then it takes one tensor operation less than a multiply and fused adds. Positive
    coefficients come first, so that no partial sum is 0. None when it would not save an operation."""
    if len(terms) < 2 or any(c == 1.0 for _, c in terms):
        return None
    ordered = [t for t in terms if t[1] > 0] + [t for t in terms if not t[1] > 0]
    (first, partial), links = ordered[0], []
    for j, c in ordered[1:]:
        partial += c
        if partial == 0.0:
            return None
        links.append((j, c / partial))
    return (first, links) if partial == 1.0 and ordered[0][1] > 0 else None


def _start_with_unit(terms: list) -> list:
    """``terms`` (pairs whose second entry is a float coefficient) with the first one whose coefficient is 1
    moved to the front, so that the sum starts without a multiply (``_accumulate``)."""
    start = next((i for i, (_, c) in enumerate(terms) if c == 1.0), None)
    return terms if start is None else [terms[start], *terms[:start], *terms[start + 1:]]


def _accumulate_rows(out: Optional[torch.Tensor], owned: bool, f: torch.Tensor, coefficients: np.ndarray,
                     like: torch.Tensor):
    """``(out + c * f, owned)`` with one coefficient per sample (``coefficients``: float64 ``(batch,)``)."""
    return _accumulate_scaled(out, owned, f, _host_to_like(coefficients, like).reshape(-1, *(1,) * (like.dim() - 1)))


def _accumulate_scaled(out: Optional[torch.Tensor], owned: bool, f: torch.Tensor, c: torch.Tensor):
    """``(out + c * f, owned)`` with ``c`` a tensor that broadcasts against ``f`` (one coefficient per sample)."""
    if out is None:
        return f * c, True
    if owned:
        return out.addcmul_(f, c), True
    return torch.addcmul(out, f, c), True


def _check_time(t, batch: int) -> None:
    """``t`` of ``sample``: a finite real number, or a real tensor / array that is 0-d or ``(batch,)`` (per-sample
    times; finiteness is checked for host values only, to keep a GPU solve free of host syncs)."""
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


def _is_per_sample(t, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == batch and batch > 1


def _time_float(t: TimeLike) -> float:
    if isinstance(t, torch.Tensor) and t.numel() != 1:
        return float("nan")
    return float(t)


def _float_or_nan(dt) -> float:
    return float("nan") if dt is None else float(dt)
