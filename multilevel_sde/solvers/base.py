"""The solvers' shared loop, in torchsde's style: a solver defines ``step`` (one step of its own grid) and inherits
``integrate`` (the loop over the steps, the outputs and their interpolation, the callback, the progress bar and
the NaN policy).

Unlike torchsde's ``step(t0, t1, y)``, a step is named by its index ``n`` on a grid fixed before the solve: step ``n``
reads the ``n``-th Brownian increment and the ``n``-th step size (a Python float computed once from the grid), so
no float time is ever matched back to a cell of the grid; ``times[n]`` and ``times[n + 1]`` are its ``t0`` and ``t1``.

NaN policy: when the solve's drift is a ``MultilevelDrift`` that checks its estimates (``check_finite``) and the
solver calls it directly, the loop takes the checks over: the drift skips its per-step check (a reduction and a
host sync a step) inside ``deferred_checks()``, and the loop checks its state every ``CHECK_EVERY`` steps and
after the last. When the state is not finite, it replays the steps since its last good check with the drift
rewound to the coins it drew then (``MultilevelDrift.rewind``) and ``checked_step`` checking everything, which
raises a ``NonFiniteError`` naming the level (or the noise, or the state) and the time. Other drifts are not
checked here: a ``MultilevelDrift`` called through an SDE's own ``f`` checks each estimate itself.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..checks import NonFiniteError, all_finite
from ..drift import MultilevelDrift
from ..grid import OutputPlan

__all__ = ["Solver", "CHECK_EVERY"]

CHECK_EVERY = 16  # steps between two checks of the state when the drift's per-step checks are deferred


class Solver:
    """A fixed sequence of ``num_steps`` steps from ``times[0]``; subclasses define ``step(n, y)``.

    Args:
        times: the times the steps end at, ``num_steps + 1`` of them (a tensor; ``callback`` gets ``times[n + 1]``).
        checked: the ``MultilevelDrift`` whose finiteness checks the loop takes over (None: no checks here).
    """

    name = "solver"

    def __init__(self, times: torch.Tensor, checked: Optional[MultilevelDrift] = None):
        self.times = times
        self.num_steps = len(times) - 1
        self.checked = checked if checked is not None and checked.check_finite else None

    def step(self, n: int, y: torch.Tensor) -> torch.Tensor:
        """The state after step ``n`` (from ``times[n]`` to ``times[n + 1]``) from the state ``y`` before it."""
        raise NotImplementedError

    def checked_step(self, n: int, y: torch.Tensor) -> torch.Tensor:
        """``step(n, y)`` with every term checked for NaN/inf (the replay of the NaN policy); a ``NonFiniteError``
        names what turned non-finite."""
        out = self.step(n, y)
        if not all_finite(out):
            raise NonFiniteError(f"the state overflowed to NaN or inf in the step from t={float(self.times[n]):.6g} "
                                 f"to t={float(self.times[n + 1]):.6g}")
        return out

    def integrate(self, y0: torch.Tensor, plan: OutputPlan, callback: Optional[Callable] = None,
                  progress: bool = False) -> torch.Tensor:
        """Runs every step from ``y0`` and returns the states at the plan's outputs, ``(outputs, *y0.shape)``;
        ``callback(n, times[n + 1], y_{n+1})`` after each step."""
        wanted: dict[int, list[int]] = {}
        for j, n in enumerate(plan.step):
            wanted.setdefault(n, []).append(j)
        outputs: list[Optional[torch.Tensor]] = [None] * len(plan.step)

        def emit(n: int, prev: Optional[torch.Tensor], curr: torch.Tensor) -> None:
            for j in wanted.get(n, ()):
                if plan.w_prev[j] == 0.0:
                    outputs[j] = curr
                elif plan.delta_form:
                    outputs[j] = prev + plan.w_curr[j] * (curr - prev)
                else:
                    outputs[j] = plan.w_prev[j] * prev + plan.w_curr[j] * curr

        drift = self.checked
        y = y0
        emit(0, None, y)
        with drift.deferred_checks() if drift is not None else contextlib.nullcontext():
            good = (0, y0, drift.checkpoint()) if drift is not None else None  # the last state found finite
            bar = tqdm(total=self.num_steps, disable=not progress, desc=self.name, leave=False)
            for n in range(self.num_steps):
                y_next = self.step(n, y)
                if callback is not None:
                    callback(n, self.times[n + 1], y_next)
                emit(n + 1, y, y_next)
                y = y_next
                bar.update(1)
                if drift is not None and ((n + 1) % CHECK_EVERY == 0 or n + 1 == self.num_steps):
                    if not all_finite(y):
                        bar.close()
                        self._trace(*good, n + 1)
                    good = (n + 1, y, drift.checkpoint())
            bar.close()
        return torch.stack(outputs, dim=0)

    def _trace(self, start: int, y: torch.Tensor, checkpoint, stop: int) -> None:
        """Replays steps ``start .. stop - 1`` from their first state ``y`` with the coins they drew, every term
        checked; raises the ``NonFiniteError`` that names the cause."""
        with self.checked.rewind(checkpoint):
            for n in range(start, stop):
                y = self.checked_step(n, y)
        raise NonFiniteError(f"the state became NaN or inf between t={float(self.times[start]):.6g} and "
                             f"t={float(self.times[stop]):.6g}, but replaying these steps gave finite values: a level "
                             "or the diffusion is not deterministic")
