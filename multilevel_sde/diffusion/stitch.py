"""The T-Stitch baseline: a small network for the first (noisiest) steps, a large one for the rest.

A deterministic, biased peer of ML-EM (Pan et al., "T-Stitch", 2024): no coins, no differences, so no
variance, but the bias of the small network on the steps it takes. Its cost is exact: ``switch`` steps of
the small network and ``N - switch`` of the large one, per sample.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .levels import DenoiserLevel, declared_schedule, per_level_predictions
from .sample import SampleResult, sample
from .schedule import NoiseSchedule, StepGrid, respaced_timesteps

__all__ = ["SwitchDrift", "stitch_sample"]


class SwitchDrift(nn.Module):
    """``f(s, y)``: the small level before solver time ``switch_time``, the large one from it on.

    Counts the samples each level was evaluated on (``evaluations``, small then large).
    """

    def __init__(self, small: DenoiserLevel, large: DenoiserLevel, switch_time: float):
        super().__init__()
        self.small, self.large, self.switch_time = small, large, float(switch_time)
        self.evaluations = [0, 0]

    def forward(self, s, y: torch.Tensor) -> torch.Tensor:
        use_large = float(s) >= self.switch_time
        self.evaluations[int(use_large)] += y.shape[0]
        return (self.large if use_large else self.small)(s, y)


def stitch_sample(small: nn.Module, large: nn.Module, image_shape: Sequence[int], switch: int, *, batch: int,
                  method: str = "ddpm", steps: int = 1000, costs: Sequence[float],
                  schedule: Optional[NoiseSchedule] = None, seed: int = 0, device=None,
                  **kwargs) -> SampleResult:
    """Samples with ``small`` for the first ``switch`` of ``steps`` steps and ``large`` after (same noise as
    :func:`sample` with this ``seed``). ``costs``: per-sample cost of one forward of ``small`` and ``large``;
    the result's ``flops`` is their exact total."""
    if not isinstance(switch, int) or not 0 <= switch <= steps:
        raise ValueError(f"switch must be an integer in [0, steps={steps}], got {switch!r}")
    if len(costs) != 2:
        raise ValueError(f"costs must give the cost of small and large, got {costs!r}")
    schedule = schedule or declared_schedule([small, large]) or NoiseSchedule.cosine()
    grid = StepGrid(schedule, respaced_timesteps(schedule.T, steps), method)
    prediction, clip = kwargs.pop("prediction", None), kwargs.pop("clip", 1.0)
    predictions = per_level_predictions(prediction, 2)
    levels = [DenoiserLevel(m, grid, image_shape, kind, clip, device)
              for m, kind in zip((small, large), predictions)]
    # step n is evaluated at times[n]: steps n < switch fall before the midpoint of times[switch - 1:switch + 1]
    switch_time = float("-inf") if switch == 0 else 0.5 * (grid.times[switch - 1] + grid.times[switch])
    drift = SwitchDrift(levels[0], levels[1], switch_time)
    result = sample([small, large], image_shape, batch=batch, method=method, steps=steps, schedule=schedule,
                    seed=seed, device=device, drift=drift, **kwargs)
    result.flops = float(sum(c * e for c, e in zip(costs, drift.evaluations)))
    result.settings.update(switch=switch, evaluations=list(drift.evaluations))
    return result
