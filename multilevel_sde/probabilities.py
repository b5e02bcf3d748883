"""Probability schedules: how often each level difference ``f^l - f^{l-1}`` is evaluated.

A schedule is any callable ``schedule(t, dt, costs) -> Tensor`` returning the ``k`` probabilities
``p_1 .. p_k`` in ``(0, 1]`` (shape ``(k,)`` for a scalar ``t``; ``(k, *t.shape)`` for a tensor of
times). ``costs`` is the ladder's cost per sample and level, a float64 tensor of shape ``(k,)``.

Formulas: ``ml-em-spec.md`` §5 (Theorem 1), §6 (flexible exponent, inverse cost), §8.1 (sigmoid); ``Adaptive``
is the MLMC rule (Giles 2008/2015) from a pilot solve.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

Number = Union[int, float]
TimeLike = Union[float, torch.Tensor]

__all__ = ["Schedule", "Constant", "InverseCost", "PowerLaw", "Theorem1", "Sigmoid", "Adaptive", "as_schedule"]


def _as_float_vector(name: str, values, *, allow_none: bool = False) -> Optional[torch.Tensor]:
    if values is None and allow_none:
        return None
    try:
        vec = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from err
    if vec.numel() == 0:
        raise ValueError(f"{name} must not be empty, got {values!r}")
    if not torch.isfinite(vec).all():
        raise ValueError(f"{name} must be finite, got {vec.tolist()}")
    return vec


def _positive(name: str, value: Number) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _time_shape(t: TimeLike) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


class Schedule(nn.Module):
    """Base class of the built-in schedules (an ``nn.Module`` so learnable ones carry parameters).

    Subclasses implement ``forward(t, dt, costs) -> Tensor (k, *t.shape)``. ``per_unit_time`` is True
    when the probabilities are proportional to ``dt`` (before clipping at 1), i.e. they define rates
    ``lambda_l = p_l / dt`` that do not depend on the step size.
    """

    per_unit_time: bool = False
    time_dependent: bool = False  # True when p depends on t (steps cannot share one evaluation)

    def num_levels(self) -> Optional[int]:
        """Number of levels the schedule is tied to, or None when it adapts to ``len(costs)``."""
        return None

    @property
    def step_dependent(self) -> bool:
        """True when the probabilities depend on the step size ``dt`` (the per-unit-time forms)."""
        return self.per_unit_time

    def _broadcast(self, p: torch.Tensor, t: TimeLike) -> torch.Tensor:
        shape = _time_shape(t)
        return p.reshape(p.shape + (1,) * len(shape)).expand(p.shape + shape) if shape else p


class Constant(Schedule):
    """Fixed probabilities ``p_l``, the same at every time and step size.

    Args:
        probabilities: ``k`` numbers in ``(0, 1]``, level 1 first.
    """

    def __init__(self, probabilities: Sequence[Number]):
        super().__init__()
        p = _as_float_vector("probabilities", probabilities)
        bad = [(i + 1, v) for i, v in enumerate(p.tolist()) if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"probabilities must lie in (0, 1]; got {p.tolist()} (level, value) {bad}")
        self.register_buffer("p", p, persistent=False)

    def num_levels(self) -> int:
        return self.p.numel()

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        return self._broadcast(self.p, t)

    def extra_repr(self) -> str:
        return f"p={self.p.tolist()}"


class InverseCost(Schedule):
    """``p_l = min(1, c / C_l)``: probability inversely proportional to the cost (alpha = gamma, spec §6).

    With ``per_unit_time=True`` the form is ``p_l = min(1, c * dt / C_l)``: ``c / C_l`` is then a rate
    per unit time, so the expected number of evaluations stays finite as ``dt -> 0``.
    """

    def __init__(self, c: Number, per_unit_time: bool = False):
        super().__init__()
        self.c = _positive("c", c)
        self.per_unit_time = bool(per_unit_time)

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        scale = self.c * (abs(float(dt)) if self.per_unit_time else 1.0)
        return self._broadcast(torch.clamp(scale / costs, max=1.0), t)

    def extra_repr(self) -> str:
        return f"c={self.c}, per_unit_time={self.per_unit_time}"


class PowerLaw(Schedule):
    """``p_l = min(1, c * eps_l ** alpha)`` (spec §6), or ``min(1, c * dt * eps_l ** alpha)`` per unit time.

    The level accuracies ``eps_l`` are, in order of precedence: given (``eps``); derived from the costs
    and the cost exponent ``gamma`` as ``eps_l = C_l ** (-1 / gamma)`` (spec §2.1, non-dyadic ladders);
    or dyadic ``eps_l = 2 ** -l``. ``alpha = 1 + gamma / 2`` is the theory-optimal exponent.
    """

    def __init__(
        self,
        c: Number,
        alpha: Number,
        eps: Optional[Sequence[Number]] = None,
        gamma: Optional[Number] = None,
        per_unit_time: bool = False,
    ):
        super().__init__()
        self.c = _positive("c", c)
        self.alpha = _positive("alpha", alpha)
        self.gamma = None if gamma is None else _positive("gamma", gamma)
        eps_vec = _as_float_vector("eps", eps, allow_none=True)
        if eps_vec is not None and (eps_vec <= 0).any():
            raise ValueError(f"eps must be > 0, got {eps_vec.tolist()}")
        self.register_buffer("eps", eps_vec, persistent=False)
        self.per_unit_time = bool(per_unit_time)

    def num_levels(self) -> Optional[int]:
        return None if self.eps is None else self.eps.numel()

    def accuracies(self, costs: torch.Tensor) -> torch.Tensor:
        """The ``eps_l`` used, shape ``(k,)``."""
        if self.eps is not None:
            return self.eps
        if self.gamma is not None:
            return costs ** (-1.0 / self.gamma)
        return 2.0 ** -torch.arange(1, costs.numel() + 1, dtype=torch.float64)

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        scale = self.c * (abs(float(dt)) if self.per_unit_time else 1.0)
        return self._broadcast(torch.clamp(scale * self.accuracies(costs) ** self.alpha, max=1.0), t)

    def extra_repr(self) -> str:
        return f"c={self.c}, alpha={self.alpha}, gamma={self.gamma}, per_unit_time={self.per_unit_time}"


class Theorem1(Schedule):
    """The probabilities of Theorem 1 (spec §5): ``p_l = min(1, A * dt * 2 ** (-(1 + gamma/2) * l))``.

    ``k = ceil(log2(1/eps))`` levels, ``G_k = sum_{l<=k} 2 ** ((gamma/2 - 1) * l)`` and
    ``A = 9 * G_k / eps**2``. The ladder must have exactly ``k`` levels. ``scale`` multiplies ``A``
    (the theorem's constant is a worst-case bound; ``scale < 1`` trades error for cost).
    """

    per_unit_time = True

    def __init__(self, eps: Number, gamma: Number, scale: Number = 1.0):
        super().__init__()
        eps = _positive("eps", eps)
        if eps > 1:
            raise ValueError(f"eps must lie in (0, 1], got {eps!r}")
        self.eps = eps
        self.gamma = _positive("gamma", gamma)
        self.scale = _positive("scale", scale)
        self.k = max(1, math.ceil(math.log2(1.0 / eps) - 1e-12))
        self.G_k = self.geometric_sum(self.gamma, self.k)
        self.A = self.scale * 9.0 * self.G_k / eps**2
        levels = torch.arange(1, self.k + 1, dtype=torch.float64)
        self._rates = self.A * 2.0 ** (-(1.0 + self.gamma / 2.0) * levels)

    @staticmethod
    def geometric_sum(gamma: float, k: int) -> float:
        """``G_k = sum_{l=1}^{k} 2 ** ((gamma/2 - 1) * l)``."""
        return float(sum(2.0 ** ((gamma / 2.0 - 1.0) * l) for l in range(1, k + 1)))

    def num_levels(self) -> int:
        return self.k

    def rates(self) -> torch.Tensor:
        """``lambda_l = A * 2 ** (-(1 + gamma/2) * l)``, shape ``(k,)``: the rates before clipping."""
        return self._rates.clone()

    def cost_bound(self, T: float, c: float = 1.0) -> float:
        """Theorem 1's bound on the expected cost (one evaluation per drawn level): ``T A c^gamma G_k``."""
        return T * self.A * c**self.gamma * self.G_k

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        if costs.numel() != self.k:
            raise ValueError(
                f"Theorem1(eps={self.eps}) needs k = ceil(log2(1/eps)) = {self.k} levels, "
                f"but the ladder has {costs.numel()}"
            )
        return self._broadcast(torch.clamp(self._rates * abs(float(dt)), max=1.0), t)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, gamma={self.gamma}, k={self.k}, A={self.A:.4g}"


class Sigmoid(Schedule):
    """Learnable ``p_l(t) = floor + (1 - floor) * sigmoid(a_l + b_l * t)`` (spec §8.1).

    ``a`` and ``b`` are ``nn.Parameter`` of shape ``(k,)``; ``t`` is used as given (normalise it to
    ``[0, 1]`` through ``time_scale``: the schedule sees ``t * time_scale``).
    """

    time_dependent = True

    def __init__(
        self,
        a: Sequence[Number],
        b: Optional[Sequence[Number]] = None,
        floor: Number = 1e-3,
        time_scale: Number = 1.0,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        a_vec = _as_float_vector("a", a)
        b_vec = torch.zeros_like(a_vec) if b is None else _as_float_vector("b", b)
        if b_vec.numel() != a_vec.numel():
            raise ValueError(f"b must have the length of a ({a_vec.numel()}), got {b_vec.numel()}")
        if not isinstance(floor, (int, float)) or not 0.0 <= floor < 1.0:
            raise ValueError(f"floor must lie in [0, 1), got {floor!r}")
        self.a = nn.Parameter(a_vec.to(dtype))
        self.b = nn.Parameter(b_vec.to(dtype))
        self.floor = float(floor)
        self.time_scale = _positive("time_scale", time_scale)

    def num_levels(self) -> int:
        return self.a.numel()

    def logits(self, t: TimeLike) -> torch.Tensor:
        """``a_l + b_l * t``, shape ``(k, *t.shape)``."""
        tt = torch.as_tensor(t, dtype=self.a.dtype, device=self.a.device) * self.time_scale
        extra = (1,) * tt.dim()
        return self.a.reshape(-1, *extra) + self.b.reshape(-1, *extra) * tt

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        return self.floor + (1.0 - self.floor) * torch.sigmoid(self.logits(t))

    def extra_repr(self) -> str:
        return f"k={self.a.numel()}, floor={self.floor}, time_scale={self.time_scale}"


class Adaptive(Schedule):
    """Variance-optimal probabilities from a pilot solve (the MLMC rule of Giles 2008/2015, per step):

        p_l(t) = min(1, c * dt * sqrt(V_l(t) / C_l)),    V_l(t) = E ||(f^l - f^{l-1})(t, X_t)||^2,

    with ``V_l`` measured along a few pilot paths (``pilot``) and ``C_l`` the ladder's costs. Minimising the coin
    variance the steps add to ``X_T`` at first order, ``sum_n dt^2 sum_l (1/p_l - 1) V_l(t_n)``, at a fixed
    expected cost ``sum_n sum_l p_l C_l`` (Lagrange) gives ``p`` proportional to ``dt sqrt(V / C)``; ``c`` scales
    it to a budget (``scaled``): an RMS coin noise of ``X_T`` or a cost per path. Clipped at 1 where a level is
    cheap or its difference large. Per unit time: the rates ``c sqrt(V/C)`` do not depend on ``dt``, so the
    budget holds for any step size. Works on any ladder (no accuracies or gamma needed).

    The variance model ignores how the dynamics carry a step's noise to ``T`` (contracting drifts shrink it,
    expanding ones grow it) and the state's dependence on the coins; measure the error, as with any schedule.

    Args:
        times: the pilot's step times, increasing, shape ``(m,)``; ``V_l(t)`` is piecewise constant between them.
        variances: ``V_l(t_i)``, shape ``(k, m)`` (per sample, summed over the state's coordinates).
        c: the scale (see ``scaled``).
        floor: the smallest probability (a level whose pilot variance is 0 is still drawn now and then).
    """

    per_unit_time = True
    time_dependent = True

    def __init__(self, times, variances, c: Number = 1.0, floor: Number = 1e-6):
        super().__init__()
        times = _as_float_vector("times", times)
        V = torch.as_tensor(variances, dtype=torch.float64).detach().cpu()
        if V.dim() != 2 or V.shape[1] != times.numel():
            raise ValueError(f"variances must have shape (k, {times.numel()}), got {tuple(V.shape)}")
        if not torch.isfinite(V).all() or (V < 0).any():
            raise ValueError("variances must be finite and >= 0")
        if times.numel() > 1 and not (times[1:] > times[:-1]).all():
            raise ValueError("times must be strictly increasing")
        if not isinstance(floor, (int, float)) or not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must lie in (0, 1], got {floor!r}")
        self.register_buffer("times", times, persistent=False)
        self.register_buffer("variances", V, persistent=False)
        self.c = _positive("c", c)
        self.floor = float(floor)

    def num_levels(self) -> int:
        return self.variances.shape[0]

    def _at(self, t: TimeLike) -> torch.Tensor:
        """``V_l(t)``, shape ``(k, *t.shape)``: the value of the last pilot time ``<= t`` (the first before it)."""
        tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        index = torch.clamp(torch.searchsorted(self.times, tt.reshape(-1), right=True) - 1, min=0)
        return self.variances[:, index].reshape(self.variances.shape[0], *tt.shape)

    def rates(self, t: TimeLike, costs: torch.Tensor) -> torch.Tensor:
        """``c * sqrt(V_l(t) / C_l)`` per unit time, shape ``(k, *t.shape)`` (before clipping)."""
        V = self._at(t)
        C = costs.detach().to("cpu", torch.float64).reshape(-1, *(1,) * (V.dim() - 1))
        return self.c * torch.sqrt(V / C)

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.rates(t, costs) * abs(float(dt)), min=self.floor, max=1.0)

    def predicted_variance(self, dt: Optional[float], costs: torch.Tensor, grid=None) -> float:
        """``sum_n h_n^2 sum_l (1/p_l - 1) V_l(t_n)`` (first order) over ``dt``-steps spanning the pilot's times,
        or over the steps of ``grid`` (step times, non-uniform allowed; ``dt`` is then ignored)."""
        p, h, V = self._steps(dt, costs, grid)
        return float((h**2 * (1 / p - 1) * V).sum())

    def predicted_cost(self, dt: Optional[float], costs: torch.Tensor, grid=None) -> float:
        """The paper's accounting ``sum_n sum_l p_l C_l`` per path over the same steps."""
        p, _, _ = self._steps(dt, costs, grid)
        return float((p * torch.as_tensor(costs, dtype=torch.float64).reshape(-1, 1)).sum())

    def _steps(self, dt: Optional[float], costs: torch.Tensor, grid=None):
        """``(p (k, n), h (n,), V (k, n))`` on each step ``n``: its probabilities, length and pilot variances."""
        if grid is None:
            if dt is None:
                raise ValueError("give dt or grid")
            span = float(self.times[-1] - self.times[0]) + self._step
            h = torch.full((max(1, round(span / abs(dt))),), abs(float(dt)), dtype=torch.float64)
            starts = self.times[0] + torch.arange(h.numel(), dtype=torch.float64) * h
        else:
            times = _as_float_vector("grid", grid)
            if times.numel() < 2 or not (times[1:] > times[:-1]).all():
                raise ValueError(f"grid must hold at least two strictly increasing times, got {times.tolist()}")
            starts, h = times[:-1], times[1:] - times[:-1]
        costs = torch.as_tensor(costs, dtype=torch.float64)
        p = torch.clamp(self.rates(starts, costs) * h, min=self.floor, max=1.0)
        return p, h, self._at(starts)

    @property
    def _step(self) -> float:
        return float(self.times[1] - self.times[0]) if self.times.numel() > 1 else 1.0

    def scaled(self, dt: Optional[float], costs, rms: Optional[Number] = None, cost: Optional[Number] = None,
               grid=None) -> "Adaptive":
        """A copy whose ``c`` meets one budget at step ``dt`` (or on the steps of ``grid``): predicted RMS coin
        noise of ``X_T`` equal to ``rms``, or expected cost per path (``sum p C``) equal to ``cost`` (bisection on
        ``log c``)."""
        if (rms is None) == (cost is None):
            raise ValueError("give exactly one budget: rms= or cost=")
        costs = torch.as_tensor(costs, dtype=torch.float64)
        trial = Adaptive(self.times, self.variances, 1.0, self.floor)
        if rms is not None:
            target, measure, decreasing = _positive("rms", rms) ** 2, trial.predicted_variance, True
        else:
            target, measure, decreasing = _positive("cost", cost), trial.predicted_cost, False
        lo, hi = math.log(1e-12), math.log(1e12)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            trial.c = math.exp(mid)
            above = measure(dt, costs, grid) > target
            lo, hi = (mid, hi) if above == decreasing else (lo, mid)
        return Adaptive(self.times, self.variances, math.exp(hi if decreasing else lo), self.floor)

    @classmethod
    def pilot(cls, levels: Sequence, y0: torch.Tensor, t0: float, t1: float, dt: Optional[float], diffusion=1.0,
              noise_type: str = "diagonal", base=None, seed: int = 0, floor: Number = 1e-6,
              grid=None) -> "Adaptive":
        """Runs EM with the top level from ``y0`` (a few paths) over ``[t0, t1]`` at step ``dt`` (or on the step
        times ``grid``, non-uniform allowed, as ``sdeint``'s), evaluates every level at each step's state and
        returns the schedule with ``V_l(t_n) = mean ||f^l - f^{l-1}||^2`` (``f^0 = base``, default 0) and
        ``c = 1``: scale it with ``scaled(dt, costs, rms=...)`` (or ``grid=``). The pilot costs ``k`` evaluations
        of its batch per step."""
        from .integrate import sdeint  # late: integrate imports the drift, which imports this module
        from .sde import MultilevelSDE

        if not t1 > t0:
            raise ValueError(f"the pilot runs forward in time: need t1 > t0, got t0={t0!r}, t1={t1!r}")
        levels = list(levels)
        times, states = [float(t0)], [y0]
        sde = MultilevelSDE(levels[-1], diffusion, noise_type, dt=None if grid is not None else dt)
        with torch.no_grad():
            sdeint(sde, y0, [float(t0), float(t1)], dt=None if grid is not None else dt, grid=grid, seed=seed,
                   callback=lambda n, t, y: (times.append(float(t)), states.append(y.clone())))
            rows = []
            for t, y in zip(times[:-1], states[:-1]):
                below = torch.zeros_like(y) if base is None else base(t, y)
                row = []
                for level in levels:
                    f = level(t, y)
                    row.append(float((f - below).pow(2).reshape(y.shape[0], -1).sum(1).mean()))
                    below = f
                rows.append(row)
        return cls(times[:-1], torch.tensor(rows, dtype=torch.float64).T, 1.0, floor)

    def extra_repr(self) -> str:
        return f"k={self.variances.shape[0]}, pilot steps={self.times.numel()}, c={self.c:.4g}"


def as_schedule(probabilities) -> nn.Module:
    """A schedule from a schedule, any callable, or a sequence of constant probabilities."""
    if isinstance(probabilities, nn.Module) or callable(probabilities):
        return probabilities if isinstance(probabilities, nn.Module) else _CallableSchedule(probabilities)
    if isinstance(probabilities, (Sequence, torch.Tensor)) or hasattr(probabilities, "__array__"):
        return Constant(probabilities)
    raise TypeError(
        f"probabilities must be a schedule (callable(t, dt, costs)) or a sequence of numbers, got {probabilities!r}"
    )


class _CallableSchedule(Schedule):
    """Wraps a plain function ``fn(t, dt, costs)`` so it can live inside a module tree."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.per_unit_time = bool(getattr(fn, "per_unit_time", False))
        self.time_dependent = bool(getattr(fn, "time_dependent", True))

    @property
    def step_dependent(self) -> bool:
        return True  # a plain function may read dt without saying so

    def forward(self, t: TimeLike, dt: float, costs: torch.Tensor) -> torch.Tensor:
        return self.fn(t, dt, costs)
