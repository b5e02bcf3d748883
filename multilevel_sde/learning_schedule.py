"""The ``Sigmoid`` schedule that learning fits (spec §8.1, §8.6): its start and its shifts.

``sigmoid_from_probabilities`` builds the spec's suggested start (``b = 0``, equal to given constant
probabilities); ``shifted`` adds ``Delta`` to every ``a_l`` (one learned schedule gives a cost-error curve);
``check_sigmoid`` rejects any other schedule.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch

from .probabilities import Sigmoid, as_schedule

__all__ = ["check_sigmoid", "sigmoid_from_probabilities", "shifted"]

F64 = torch.float64


def check_sigmoid(schedule) -> Sigmoid:
    """``schedule`` itself if it is a ``Sigmoid`` (the only schedule learning fits); TypeError otherwise."""
    if not isinstance(schedule, Sigmoid):
        raise TypeError(f"learning needs a mlsde.Sigmoid schedule, got {type(schedule).__name__}")
    return schedule


def sigmoid_from_probabilities(probabilities, floor: float = 1e-3, time_scale: float = 1.0,
                               costs: Optional[Sequence[float]] = None, t: float = 0.0, dt: float = 1.0,
                               max_logit: float = 12.0) -> Sigmoid:
    """A ``Sigmoid`` with ``b = 0`` equal to given constant probabilities (the spec's suggested start).

    Args:
        probabilities: ``k`` numbers in ``(0, 1]``, or a schedule evaluated at ``(t, dt, costs)``.
        floor, time_scale: of the ``Sigmoid`` (``time_scale = 1 / T`` normalises time to ``[0, 1]``).
        max_logit: ``|a_l|`` is capped here (``p = 1`` has no finite logit).

    A probability below ``floor`` cannot be represented (the schedule never goes below it): it is raised to about
    ``floor``, with a warning naming the levels.
    """
    if isinstance(probabilities, torch.nn.Module) or callable(probabilities):
        if costs is None:
            raise ValueError("costs are needed to evaluate a schedule")
        p = as_schedule(probabilities)(t, dt, torch.as_tensor(costs, dtype=F64))
    else:
        p = probabilities
    p = torch.as_tensor(p, dtype=F64).detach().reshape(-1)
    low = [(level, value) for level, value in enumerate(p.tolist(), start=1) if value < floor]
    if low:
        warnings.warn(f"probabilities below the Sigmoid's floor={floor:g} are raised to it: (level, p) {low}; give a "
                      "smaller floor to start from them", stacklevel=2)
    s = ((p - floor) / (1 - floor)).clamp(1e-300, 1.0)
    a = (torch.log(s) - torch.log1p(-s)).clamp(-max_logit, max_logit)
    return Sigmoid(a, floor=floor, time_scale=time_scale)


def shifted(schedule: Sigmoid, delta: float) -> Sigmoid:
    """A copy of ``schedule`` with ``a_l + delta`` for every level (``b`` unchanged; spec §8.6)."""
    out = copy.deepcopy(check_sigmoid(schedule))
    with torch.no_grad():
        out.a.add_(float(delta))
    return out

