"""The drift's steady-state paths: what ``MultilevelDrift`` works out once for many steps of one plan.

``_FastBatch`` (one coin per level for the whole batch) keeps the statistics as counts per coin pattern.
``_FastSample`` (one coin per level and sample) works out a block of steps at once from the uniforms they
will consume (``_SampleBlock``): the coins, the levels each step evaluates, the rows of their sub-batches and
the per-sample coefficients, as tensors ready to use. Both give the general path's coins, estimates (to the
last bit) and statistics.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np
import torch

from .coins import UniformStream
from .stats import Stats

__all__ = ["_FastBatch", "_FastSample", "_SampleBlock"]

SAMPLE_BLOCK_STEPS = 64  # steps a per-sample block works out at once (fewer when the buffer holds fewer)


class _FastBatch:
    """What ``MultilevelDrift._sample_fast`` needs for the steps of one plan and batch size, and what it counted:
    steps per coin pattern and seconds per level, folded into ``Stats`` objects by ``flush``."""

    __slots__ = ("plan", "schedule", "dt", "token", "batch", "counts", "wall", "schedule_fixed")

    def __init__(self, plan, schedule, dt: Optional[float], token, batch: int, num_levels: int):
        self.plan, self.schedule, self.dt, self.token, self.batch = plan, schedule, dt, token, batch
        self.schedule_fixed = False  # True within a solve that runs nothing else (no cache_token check per step)
        self.counts: collections.defaultdict = collections.defaultdict(int)  # coin code -> steps
        self.wall = [0.0] * num_levels

    def flush(self, targets: Sequence[Stats]) -> None:
        """Adds the counted steps (their evaluations, calls, expected and theory costs) and seconds to every
        ``Stats`` in ``targets`` and starts counting afresh."""
        if not self.counts:
            return
        plan, batch, k = self.plan, self.batch, len(self.wall)
        evaluations, calls, steps = [0] * k, [0] * k, 0
        for code, count in self.counts.items():
            for m in plan.recipes[code].evaluate:
                evaluations[m] += count * batch
                calls[m] += count
            steps += count
        _add_steps(targets, plan, batch, steps, evaluations, calls, self.wall)
        self.counts.clear()
        self.wall = [0.0] * k

    def fail(self, code: int, outputs: dict, targets: Sequence[Stats]) -> None:
        """A level of the step of ``code`` failed: that step counts only the levels that returned (``outputs``)."""
        self.counts[code] -= 1
        _record_partial_step(targets, self.plan, self.batch, {level: self.batch for level in outputs})


class _SampleBlock:
    """The next ``steps`` steps of one plan with per-sample coins, worked out from the uniforms they consume.

    For step ``s``: ``coins[s]`` bool ``(k, batch)``; ``scatter[s]`` is ``(rows, coefficients)`` of all the
    step's sub-batch terms, top level first (None without any): the step gathers ``y[rows]`` once;
    ``terms[s]`` the levels to evaluate, top first, as ``(m, module key, part, coefficient)``: ``part`` None for
    the whole batch (``coefficient`` a float when every sample has the same one, else a tensor
    ``(batch, 1, ...)``) or the slice of the gathered rows that is the level's sub-batch (``coefficient`` None:
    its terms are scattered at the end); ``counts[s]`` the samples each level runs on.
    """

    __slots__ = ("steps", "next", "accounted", "width", "position", "dtype", "device", "ndim",
                 "coins", "terms", "scatter", "counts")

    def __init__(self, plan, stream: UniformStream, modules: Sequence[str], like: torch.Tensor):
        k, batch, uncertain = len(plan.p_list), like.shape[0], list(plan.uncertain)
        self.width = len(uncertain) * batch
        u, self.position = stream.lookahead(self.width, SAMPLE_BLOCK_STEPS)
        steps = self.steps = u.shape[0]
        self.next = self.accounted = 0
        self.dtype, self.device, self.ndim = like.dtype, like.device, like.dim()
        # the general path's coins and arithmetic (MultilevelDrift._independent_coins, _combine_sample_host) for
        # all the steps at once: w_m = B_m * (1 / p_m) and c_m = w_m - w_{m+1} (w_{k+1} = 0), bit for bit
        inverse = np.append(1.0 / plan.p_numpy[:, 0], 0.0)  # (k + 1,)
        coins = np.ones((steps, k + 1, batch), dtype=bool)  # level k + 1: never drawn
        coins[:, k] = False
        coins[:, uncertain] = u.reshape(steps, len(uncertain), batch) < plan.p_numpy[uncertain]
        need = coins[:, :k] | coins[:, 1:]  # f^m runs when difference m or m + 1 is drawn ...
        need &= plan.keep_numpy  # ... and does not cancel
        counts, heads = np.count_nonzero(need, axis=2), np.count_nonzero(coins, axis=2)  # (steps, k), (steps, k + 1)
        sub = (counts > 0) & (counts < batch)
        all_or_none = (heads == 0) | (heads == batch)  # the coin of (step, level) is the same for every sample
        whole = (counts == batch) & ~(all_or_none[:, :k] & all_or_none[:, 1:])  # per-sample coefficients
        trailing = (1,) * (like.dim() - 1)
        # the sub-batch rows of every step, top level first, rows ascending (the general path's order)
        step_of, reversed_level, rows = np.nonzero((need & sub[:, :, None])[:, ::-1])
        level = k - 1 - reversed_level
        row_coef = coins[step_of, level, rows] * inverse[level] - coins[step_of, level + 1, rows] * inverse[level + 1]
        per_step = np.bincount(step_of, minlength=steps).tolist()
        scatter_rows = torch.split(_on_device(torch.from_numpy(rows), like.device), per_step)
        scatter_coef = torch.split(_host_to_like(row_coef, like).reshape(-1, *trailing), per_step)
        whole_step, reversed_level = np.nonzero(whole[:, ::-1])  # top level first too
        whole_level = k - 1 - reversed_level
        whole_coef = (coins[whole_step, whole_level] * inverse[whole_level, None]
                      - coins[whole_step, whole_level + 1] * inverse[whole_level + 1, None])  # (levels, batch)
        whole_coef_t = _host_to_like(whole_coef, like).reshape(-1, batch, *trailing).unbind(0)
        self.coins, self.counts = coins[:, :k], counts.tolist()
        self.terms, self.scatter = [], []
        first_rows = coins[:, :, 0].tolist()  # sample 0's coins: the coefficient of an all-or-none level
        next_whole = iter(whole_coef_t)
        plain = inverse.tolist()
        for s, (step_counts, step_sub, step_whole, first) in enumerate(
                zip(self.counts, sub.tolist(), whole.tolist(), first_rows)):
            terms, start = [], 0
            for m in range(k - 1, -1, -1):
                if step_sub[m]:  # its rows of the step's gathered sub-batch rows
                    terms.append((m, modules[m], slice(start, start + step_counts[m]), None))
                    start += step_counts[m]
                elif step_whole[m]:
                    terms.append((m, modules[m], None, next(next_whole)))
                elif step_counts[m]:
                    terms.append((m, modules[m], None, first[m] * plain[m] - first[m + 1] * plain[m + 1]))
            self.terms.append(terms)
            self.scatter.append((scatter_rows[s], scatter_coef[s]) if per_step[s] else None)

    def fits(self, stream: UniformStream, y: torch.Tensor) -> bool:
        """Whether the block's next step is the stream's next and its tensors suit ``y``."""
        return (self.next < self.steps and self.position == stream.position() and y.dtype == self.dtype
                and y.device == self.device and y.dim() == self.ndim)


class _FastSample:
    """What ``MultilevelDrift._sample_fast_rows`` needs for the steps of one plan and batch size with per-sample
    coins (the current ``_SampleBlock``), and what it counted, folded into ``Stats`` objects by ``flush``."""

    __slots__ = ("plan", "schedule", "dt", "token", "batch", "schedule_fixed", "block", "wall", "evaluations",
                 "calls", "steps")

    def __init__(self, plan, schedule, dt: Optional[float], token, batch: int, num_levels: int):
        self.plan, self.schedule, self.dt, self.token, self.batch = plan, schedule, dt, token, batch
        self.schedule_fixed = False
        self.block: Optional[_SampleBlock] = None
        self.wall = [0.0] * num_levels
        self.evaluations = np.zeros(num_levels, dtype=np.int64)
        self.calls = np.zeros(num_levels, dtype=np.int64)
        self.steps = 0

    def next_block(self, stream: UniformStream, modules: Sequence[str], like: torch.Tensor) -> _SampleBlock:
        """Counts the steps the current block ran and works out the next one at the stream's position."""
        self._account()
        self.block = _SampleBlock(self.plan, stream, modules, like)
        return self.block

    def _account(self, upto: Optional[int] = None) -> None:
        """Adds the evaluations and calls of the block's steps that ran (before ``upto``) to the counts."""
        block = self.block
        if block is None:
            return
        upto = block.next if upto is None else upto
        if upto > block.accounted:
            ran = np.asarray(block.counts[block.accounted:upto])
            self.evaluations += ran.sum(0)
            self.calls += (ran > 0).sum(0)
            self.steps += upto - block.accounted
            block.accounted = upto

    def flush(self, targets: Sequence[Stats]) -> None:
        """Adds the steps that ran (evaluations, calls, expected and theory costs) and seconds to every ``Stats``
        in ``targets`` and starts counting afresh."""
        self._account()
        if not self.steps:
            return
        k = len(self.wall)
        _add_steps(targets, self.plan, self.batch, self.steps, self.evaluations.tolist(), self.calls.tolist(),
                   self.wall)
        self.evaluations[:] = 0
        self.calls[:] = 0
        self.steps, self.wall = 0, [0.0] * k

    def fail(self, outputs: dict, targets: Sequence[Stats]) -> None:
        """A level of the block's last step failed: that step counts only the levels that returned (``outputs``)."""
        block = self.block
        self._account(block.next - 1)
        block.accounted = block.next
        step_counts = block.counts[block.next - 1]
        _record_partial_step(targets, self.plan, self.batch, {level: step_counts[level - 1] for level in outputs})


def _add_steps(targets: Sequence[Stats], plan, batch: int, steps: int, evaluations: list, calls: list,
               wall: list) -> None:
    done = Stats(len(wall), wall_time=wall)
    done.evaluations, done.calls, done.steps = evaluations, calls, steps
    done.samples = steps * batch
    done.expected_cost = plan.expected * batch * steps
    done.theory_cost = plan.theory * batch * steps
    for stats in targets:
        stats.add(done)


def _record_partial_step(targets: Sequence[Stats], plan, batch: int, rows: dict) -> None:
    """One step whose levels ``rows`` (level from 1 -> samples) ran (their seconds are counted elsewhere)."""
    for stats in targets:
        stats.record_step(batch, plan.expected * batch, plan.theory * batch)
        for level, count in rows.items():
            stats.record_level(level - 1, count, 0.0)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a CPU tensor) on ``device``; no call at all when that is the CPU."""
    return x if device.type == "cpu" else x.to(device, non_blocking=True)


def _host_to_like(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Host numbers as a tensor of ``like``'s dtype and device (converted by numpy when it can)."""
    np_dtype = _NUMPY_DTYPES.get(like.dtype)
    if np_dtype is None:
        return torch.from_numpy(values).to(device=like.device, dtype=like.dtype)
    return _on_device(torch.from_numpy(values.astype(np_dtype, copy=False)), like.device)
