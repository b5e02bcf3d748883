"""Statistics of the work a drift did: evaluations, realised and expected cost, wall time per level."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["Stats"]


@dataclass
class Stats:
    """Counters of one solve (or accumulated over many). Lists run over levels, level 1 first.

    Attributes:
        evaluations: samples each level was evaluated on.
        calls: calls of each level (one call evaluates a whole batch or sub-batch).
        wall_time: seconds spent inside each level's calls (host time; on a GPU, launch time unless the
            level synchronises).
        costs: cost of one evaluation of each level for one sample (``None`` until known).
        cost_unit: ``"flops"``, ``"seconds"`` or ``"given"``.
        cost: realised cost, ``sum_m costs[m] * evaluations[m]`` (the exact rule: f^m is paid when
            difference m or m+1 is drawn).
        expected_cost: the same in expectation over the coins, summed over steps and samples.
        theory_cost: the paper's accounting ``sum_n sum_l p_l C_l`` summed over samples.
        steps: number of drift estimates (solver steps); ``samples``: samples of the estimates, summed.
        jumps: jumps of each level (Poisson solver only; each jump evaluates f^l and f^{l-1}).
        seed: the seed of the solve (None when accumulated over several).
        total_time: seconds of the whole solve (set by the solvers).
    """

    num_levels: int
    evaluations: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    wall_time: list = field(default_factory=list)
    jumps: list = field(default_factory=list)
    costs: Optional[list] = None
    cost_unit: str = "given"
    expected_cost: float = 0.0
    theory_cost: float = 0.0
    steps: int = 0
    samples: int = 0
    seed: Optional[int] = None
    total_time: float = 0.0

    def __post_init__(self):
        k = self.num_levels
        self.evaluations = self.evaluations or [0] * k
        self.calls = self.calls or [0] * k
        self.wall_time = self.wall_time or [0.0] * k
        self.jumps = self.jumps or [0] * k

    @property
    def cost(self) -> float:
        if self.costs is None:
            return float("nan")
        return float(sum(c * e for c, e in zip(self.costs, self.evaluations)))

    def record_level(self, level: int, samples: int, seconds: float) -> None:
        """``level`` counts from 0 (level 1 is index 0)."""
        self.evaluations[level] += samples
        self.calls[level] += 1
        self.wall_time[level] += seconds

    def record_jumps(self, level: int, count: int) -> None:
        """``level`` counts from 0."""
        self.jumps[level] += count

    def record_step(self, samples: int, expected_cost: float, theory_cost: float) -> None:
        self.steps += 1
        self.samples += samples
        self.expected_cost += expected_cost
        self.theory_cost += theory_cost

    def add(self, other: "Stats") -> None:
        """Adds ``other``'s counters (evaluations, calls, wall time, jumps, costs, steps, samples) to these."""
        for mine, theirs in ((self.evaluations, other.evaluations), (self.calls, other.calls),
                             (self.wall_time, other.wall_time), (self.jumps, other.jumps)):
            for m, value in enumerate(theirs):
                mine[m] += value
        self.expected_cost += other.expected_cost
        self.theory_cost += other.theory_cost
        self.steps += other.steps
        self.samples += other.samples

    def reset(self) -> None:
        fresh = Stats(self.num_levels, costs=self.costs, cost_unit=self.cost_unit)
        self.__dict__.update(fresh.__dict__)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cost"] = self.cost
        return out

    def __repr__(self) -> str:
        return (
            f"Stats(steps={self.steps}, evaluations={self.evaluations}, calls={self.calls}, "
            f"cost={self.cost:.6g} ({self.cost_unit}), expected_cost={self.expected_cost:.6g}, "
            f"wall_time={[round(w, 4) for w in self.wall_time]}, seed={self.seed})"
        )
