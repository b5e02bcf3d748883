"""The built-in example: ML-EM against EM on a synthetic ladder whose cost grows like ``(2^l)^gamma``.

The true drift is ``f(x) = -x + sin(2x)/2``; level ``l`` adds a perturbation of size ``2^-l``
(``f^l = f + 2^-l sin(x + phi_l)``) and costs ``2^(gamma l)`` units. Every method shares one Brownian path
per sample; errors are RMS distances at ``T`` to a fine-step EM solution of the true drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .brownian import GridBrownian
from .drift import MultilevelDrift
from .integrate import sdeint
from .probabilities import Theorem1
from .problems.htmc import htmc_ladder, htmc_reference
from .random_streams import ToyDemoSeed
from .sde import MultilevelSDE

__all__ = ["run_toy_demo", "format_rows", "DemoRow"]


@dataclass
class DemoRow:
    method: str
    dt: float
    rms_error: float
    cost: float


def run_toy_demo(k: int = 6, gamma: float = 3.0, d: int = 4, paths: int = 256, seed: int = 0) -> list[DemoRow]:
    """Solves the toy SDE on ``[0, 1]`` (``sigma = 1``) with EM (top level) and ML-EM (Theorem 1)."""
    T, fine_dt = 1.0, 2.0**-12
    path_seed, solve_seed = seed + ToyDemoSeed.PATH, seed + ToyDemoSeed.SOLVES
    y0 = torch.ones(paths, d, dtype=torch.float64)
    ts = torch.tensor([0.0, T], dtype=torch.float64)
    bm = GridBrownian(t0=0.0, t1=T, dt=fine_dt, size=(paths, d), seed=path_seed, dtype=torch.float64)
    reference = htmc_reference(y0, T, bm)
    ladder = htmc_ladder(k, gamma, d, seed=path_seed)
    levels, costs = ladder.levels, ladder.costs

    def rms(x: torch.Tensor) -> float:
        return float(((x - reference) ** 2).sum(-1).mean().sqrt())

    rows = []
    for dt in (2.0**-4, 2.0**-6):
        ys, stats = sdeint(MultilevelSDE(levels[-1], 1.0), y0, ts, bm=bm, dt=dt, return_stats=True)
        rows.append(DemoRow(f"EM, top level (k={k})", dt, rms(ys[-1]), stats.evaluations[0] * costs[-1]))
    for scale in (0.05, 0.5):
        schedule = Theorem1(eps=2.0**-k, gamma=gamma, scale=scale)
        drift = MultilevelDrift(levels, schedule, costs=costs, coupling="sample")
        for dt in (2.0**-6, 2.0**-9):
            ys, stats = sdeint(MultilevelSDE(drift, 1.0), y0, ts, bm=bm, dt=dt, seed=solve_seed, return_stats=True)
            rows.append(DemoRow(f"ML-EM, Theorem1 x{scale}", dt, rms(ys[-1]), stats.cost))
    return rows


def format_rows(rows: list[DemoRow], paths: int) -> str:
    em_best = min((r for r in rows if r.method.startswith("EM")), key=lambda r: r.rms_error)
    lines = [f"{'method':<28}{'dt':>10}{'RMS error':>12}{'cost/path':>14}{'EM-best/cost':>14}"]
    for r in rows:
        lines.append(
            f"{r.method:<28}{r.dt:>10.5f}{r.rms_error:>12.4f}{r.cost / paths:>14.4g}{em_best.cost / r.cost:>13.1f}x"
        )
    return "\n".join(lines)
