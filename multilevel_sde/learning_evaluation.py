"""Measuring learned schedules (spec §8.6, §9.6): evaluation, the Delta sweep and best-of-N coin patterns.

``evaluate`` measures a schedule (or a replayed pattern) on a set of paths: the mean loss and the realised
cost by the core's exact rule. ``delta_sweep`` turns one learned schedule into a cost-error curve
(``a_l + Delta`` for all ``l``, spec §8.6); ``best_of_n`` draws ``n`` batch-shared coin patterns and keeps
the one with the smallest error on a selection set (spec §9.6), returned as a pattern to ``Replay``.

Honest evaluation: fit and select on one ``PathSet``; report numbers from another (held-out) one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .random_streams import check_seed, derive_seed
from .coins import CoinScheme, Replay
from .learning_problem import LearningProblem, PathSet
from .learning_schedule import shifted
from .probabilities import Sigmoid
from .stats import Stats

__all__ = ["Evaluation", "SweepPoint", "BestOfN", "evaluate", "delta_sweep", "best_of_n"]

F64 = torch.float64


@dataclass
class Evaluation:
    """A schedule (or a replayed coin pattern) measured on a set of paths.

    ``error``: mean loss over the paths (the MSE with the default loss); ``error_se``: its standard error
    over paths. ``cost``: realised cost per path by the core's exact rule (``stats.cost / M``);
    ``expected_cost``: its expectation over the coins; ``theory_cost``: the paper's ``sum p C``, both per
    path. ``losses``: ``(M,)``. ``stats``: the solve's ``Stats``.
    """

    error: float
    error_se: float
    cost: float
    expected_cost: float
    theory_cost: float
    losses: torch.Tensor
    stats: Optional[Stats] = None

    def as_dict(self) -> dict:
        return {"error": self.error, "error_se": self.error_se, "cost": self.cost,
                "expected_cost": self.expected_cost, "theory_cost": self.theory_cost}


def evaluate(problem: LearningProblem, schedule, paths: PathSet, *, coupling: str = "sample",
             coins: Union[str, CoinScheme, torch.Tensor] = "independent", seed: int = 0) -> Evaluation:
    """Runs ML-EM with ``schedule`` on ``paths`` (no gradients) and measures error and realised cost.

    ``coupling="sample"`` with independent coins measures the error averaged over coin draws;
    ``coupling="batch"`` shares one draw across the paths (GPU batching); ``coins`` may be a pattern
    (``best_of_n(...).pattern``) to replay.
    """
    with torch.no_grad():
        x, stats, _ = problem.solve(schedule, paths, coupling=coupling, coins=coins, seed=seed)
        losses = problem.loss(x, paths.reference).detach().to("cpu", F64).reshape(-1)
    M = losses.numel()
    se = float(losses.std() / math.sqrt(M)) if M > 1 else float("nan")
    return Evaluation(float(losses.mean()), se, stats.cost / M, stats.expected_cost / M, stats.theory_cost / M,
                      losses, stats)


@dataclass
class SweepPoint:
    """One point of a Delta sweep: the shift, the shifted schedule and its ``Evaluation``."""

    delta: float
    schedule: Sigmoid
    evaluation: Evaluation

    def as_dict(self) -> dict:
        return {"delta": self.delta, **self.evaluation.as_dict()}


def delta_sweep(schedule: Sigmoid, deltas: Sequence[float], evaluate: Callable[[Sigmoid], Evaluation]) -> list:
    """The cost-error curve of one learned schedule: ``evaluate(shifted(schedule, delta))`` for each
    ``delta`` (spec §8.6; ``delta > 0`` raises every ``p_l``: more compute, less error). Returns
    ``SweepPoint``s in the order of ``deltas``. Evaluate on held-out paths, with one coin seed for all
    ``delta`` (then the realised cost is monotone in ``delta`` too: each coin is ``u < p`` with the same
    ``u``)."""
    out = []
    for delta in deltas:
        s = shifted(schedule, float(delta))
        out.append(SweepPoint(float(delta), s, evaluate(s)))
    return out


@dataclass
class BestOfN:
    """Result of ``best_of_n``: ``pattern`` (bool ``(N, k)``, the chosen batch-shared coins), ``index`` of
    the chosen draw, and for every draw its ``errors`` and realised ``costs`` (per path) on the selection set,
    and the coin ``seeds``. ``replay()`` gives the pattern as a ``Replay`` coin scheme."""

    pattern: torch.Tensor
    index: int
    errors: list
    costs: list
    seeds: list
    patterns: list

    def replay(self) -> Replay:
        return Replay(self.pattern)


def best_of_n(problem: LearningProblem, schedule, paths: PathSet, n: int = 15, *, seed: int = 0) -> BestOfN:
    """Draws ``n`` coin patterns shared by the batch (``coupling="batch"``) with ``schedule``'s
    probabilities, measures each on the selection set ``paths`` and keeps the one with the smallest mean
    loss (spec §9.6; the costs are reported, and nearly equal). Deterministic given ``seed``; ``n = 1`` is a
    plain draw. Generate with ``evaluate(problem, schedule, heldout, coupling="batch", coins=result.pattern)``
    (the ``1/p`` weights still come from ``schedule``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed must be a non-negative integer")
    errors, costs, seeds, patterns = [], [], [], []
    for i in range(n):
        draw_seed = derive_seed(seed, i)
        with torch.no_grad():
            x, stats, drift = problem.solve(schedule, paths, coupling="batch", seed=draw_seed, record=True)
            losses = problem.loss(x, paths.reference).detach().to("cpu", F64)
        errors.append(float(losses.mean()))
        costs.append(stats.cost / len(paths))
        seeds.append(draw_seed)
        patterns.append(drift.recorded_coins())
    index = int(np.argmin(errors))
    return BestOfN(patterns[index], index, errors, costs, seeds, patterns)
