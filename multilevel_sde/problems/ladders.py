"""Synthetic ladders over a problem's true drift: ``f^l = f + eps_l h_l`` with fixed, seeded perturbations.

``perturbed_ladder(problem, k)`` gives levels with ``||f^l - f|| <= eps_l`` (Euclidean norm per sample;
spec §2.1, default ``eps_l = 2^-l``), Lipschitz perturbations (constant <= 1) and synthetic costs
(default ``cost_base ** l``). The ``"linear"`` kind keeps an affine drift affine and exposes
``f^l(y) = A_l y + b_l`` for exact moment recursions (spec §11); ``"sine"`` is a bounded nonlinear one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..random_streams import check_seed, make_generator
from ..drift import MultilevelDrift

__all__ = ["Ladder", "perturbed_ladder", "KINDS"]

KINDS = ("linear", "sine")
F64 = torch.float64


@dataclass
class Ladder:
    """A ladder of ``k`` levels over a problem.

    Attributes:
        levels: callables ``f^l(t, y) -> (batch, d)``, level 1 (cheapest) first.
        costs: synthetic cost per sample of each level (``k`` floats).
        eps: perturbation sizes ``eps_l`` (``||f^l - f|| <= eps_l`` on the ladder's region).
        affine: for an affine ladder, ``[(A_l (d, d), b_l (d,)), ...]`` float64 with ``f^l(y) = A_l y + b_l``;
            else None.
    """

    levels: list
    costs: list
    eps: list
    affine: Optional[list] = None

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def drift(self, probabilities, **kwargs) -> MultilevelDrift:
        """A ``MultilevelDrift`` over these levels and costs; ``kwargs`` go to ``MultilevelDrift``."""
        return MultilevelDrift(self.levels, probabilities, costs=self.costs, **kwargs)


class _Perturbed:
    """``f^l(t, y) = f(t, y) + eps * h(y)``."""

    def __init__(self, f: Callable, eps: float, h: Callable, name: str):
        self.f, self.eps, self.h, self.__name__ = f, eps, h, name

    def __call__(self, t: Union[float, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return self.f(t, y) + self.eps * self.h(y)

    def __repr__(self) -> str:
        return f"{self.__name__}(eps={self.eps:g})"


def _affine_h(M: torch.Tensor, c: torch.Tensor) -> Callable:
    return lambda y: y @ M.to(y).T + c.to(y)


def _sine_h(W: torch.Tensor, phase: torch.Tensor) -> Callable:
    scale = 1.0 / math.sqrt(W.shape[0])
    return lambda y: scale * torch.sin(y @ W.to(y).T + phase.to(y))


def _unit_spectral(gen: torch.Generator, d: int) -> torch.Tensor:
    M = torch.randn(d, d, generator=gen, dtype=F64)
    return M / torch.linalg.matrix_norm(M, ord=2)


def _sequence(name: str, values, k: int, *, positive: bool) -> list[float]:
    try:
        vec = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of {k} numbers, got {values!r}") from err
    if vec.size != k:
        raise ValueError(f"{name} must have one entry per level ({k}), got {vec.size}: {vec.tolist()}")
    bad = ~np.isfinite(vec) | ((vec <= 0) if positive else (vec < 0))
    if bad.any():
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {rule}, got {vec.tolist()}")
    return vec.tolist()


def perturbed_ladder(
    problem,
    k: int,
    kind: str = "linear",
    eps: Optional[Sequence[float]] = None,
    costs: Optional[Sequence[float]] = None,
    cost_base: float = 2.0,
    seed: int = 0,
    radius: float = 1.0,
) -> Ladder:
    """Levels ``f^l = f + eps_l h_l``, ``l = 1..k``, over ``problem.drift`` (``problem.d`` coordinates).

    Args:
        problem: anything with ``drift(t, y)`` and ``d`` (e.g. ``OrnsteinUhlenbeck``).
        k: number of levels, ``>= 1``.
        kind: ``"linear"``: ``h_l(y) = M_l y + c_l`` with ``||M_l||_2 = min(1, 1 / (2 radius))`` and
            ``||c_l|| = 1/2``, so ``||h_l(y)|| <= 1`` for ``||y|| <= radius``; ``"sine"``:
            ``h_l(y) = sin(W_l y + phi_l) / sqrt(d)`` with ``||W_l||_2 = 1``, ``||h_l|| <= 1`` everywhere.
            Both are Lipschitz with constant ``<= 1``.
        eps: ``k`` sizes ``>= 0`` (default ``2^-l``).
        costs: ``k`` costs ``> 0`` (default ``cost_base ** l``).
        cost_base: base of the default costs, ``> 0``.
        seed: seed of the generator the ``h_l`` are drawn from (same seed, same ladder).
        radius: the region ``||y|| <= radius`` of the ``"linear"`` bound, ``> 0``.

    Returns:
        a ``Ladder``; ``affine`` is set for the ``"linear"`` kind when ``problem`` has ``affine = (A, b)``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not callable(getattr(problem, "drift", None)) or not isinstance(getattr(problem, "d", None), int):
        raise TypeError(f"problem must have drift(t, y) and an integer d, got {problem!r}")
    for name, value in (("cost_base", cost_base), ("radius", radius)):
        if isinstance(value, bool) or not isinstance(value, Number) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed must be a non-negative integer, got None")
    eps = [2.0**-l for l in range(1, k + 1)] if eps is None else _sequence("eps", eps, k, positive=False)
    costs = [float(cost_base) ** l for l in range(1, k + 1)] if costs is None else _sequence("costs", costs, k, positive=True)

    gen, d = make_generator(seed), problem.d
    levels, affine = [], None
    base = getattr(problem, "affine", None) if kind == "linear" else None
    if base is not None:
        affine = []
    for l, e in enumerate(eps, start=1):
        if kind == "linear":
            M = min(1.0, 0.5 / radius) * _unit_spectral(gen, d)
            c = torch.randn(d, generator=gen, dtype=F64)
            c = 0.5 * c / torch.linalg.vector_norm(c)
            h = _affine_h(M, c)
            if affine is not None:
                affine.append((base[0].to(F64) + e * M, base[1].to(F64) + e * c))
        else:
            W = _unit_spectral(gen, d)
            phase = 2 * math.pi * torch.rand(d, generator=gen, dtype=F64)
            h = _sine_h(W, phase)
        levels.append(_Perturbed(problem.drift, e, h, f"{kind}_level_{l}"))
    return Ladder(levels=levels, costs=costs, eps=eps, affine=affine)
