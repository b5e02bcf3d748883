"""The cost of one evaluation of a level, per sample: measured FLOPs or measured seconds."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flops_per_sample", "seconds_per_sample", "measure_costs"]


def flops_per_sample(level: Callable, t, y: torch.Tensor) -> float:
    """FLOPs of ``level(t, y[:1])`` counted by ``torch.utils.flop_counter`` (0 when it sees no matmul/conv)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        level(t, y[:1])
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_sample(level: Callable, t, y: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``level(t, y)`` over ``repeats`` calls, divided by the batch size."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(y.device)
            start = time.perf_counter()
            level(t, y)
            _sync(y.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] / y.shape[0]


def measure_costs(levels: Sequence[Callable], t, y: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-sample costs of every level and their unit: ``"flops"`` when the counter sees work in every
    level, else ``"seconds"``. Returns a float64 tensor ``(k,)``."""
    flops = [flops_per_sample(level, t, y) for level in levels]
    if all(f > 0 for f in flops):
        return torch.tensor(flops, dtype=torch.float64), "flops"
    seconds = [seconds_per_sample(level, t, y) for level in levels]
    return torch.tensor([max(s, 1e-12) for s in seconds], dtype=torch.float64), "seconds"
