"""Exponent fits on log–log scales: the ladder's gamma and a method's cost exponent, with intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["PowerLawFit", "fit_power_law", "GammaEstimate", "estimate_gamma", "cost_exponent"]


@dataclass(frozen=True)
class PowerLawFit:
    """``log y = intercept + slope * log x`` by least squares, with a ``confidence`` interval on the slope."""

    slope: float
    intercept: float
    interval: tuple
    confidence: float
    points: int

    def predict(self, x):
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope


def _positive_array(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {arr.tolist()}")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {arr.tolist()}")
    return arr


def fit_power_law(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> PowerLawFit:
    """Fits ``y ~ C x^slope``. With two points the interval is the point itself (no residual)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    lx, ly = np.log(_positive_array("x", x)), np.log(_positive_array("y", y))
    if lx.size != ly.size:
        raise ValueError(f"x and y must have the same length, got {lx.size} and {ly.size}")
    if np.ptp(lx) == 0:
        raise ValueError(f"x must not be constant, got {np.exp(lx).tolist()}")
    fit = stats.linregress(lx, ly)
    if lx.size > 2:
        half = stats.t.ppf(0.5 + confidence / 2, lx.size - 2) * fit.stderr
    else:
        half = 0.0
    return PowerLawFit(float(fit.slope), float(fit.intercept), (fit.slope - half, fit.slope + half), confidence,
                       int(lx.size))


@dataclass(frozen=True)
class GammaEstimate:
    """``gamma`` with its interval (from the slope's), and the underlying fit."""

    gamma: float
    interval: tuple
    fit: PowerLawFit


def estimate_gamma(errors: Sequence[float], costs: Sequence[float], squared: bool = False,
                   confidence: float = 0.95) -> GammaEstimate:
    """The cost exponent gamma of a ladder (cost ~ eps^-gamma) from each level's error and cost.

    Fits ``log eps = c - (1/gamma) log C`` (RMS-type errors), or ``log MSE = c - (2/gamma) log C`` with
    ``squared=True`` (spec §9.7). The interval maps the slope's interval through ``gamma = -k/slope``;
    it is unbounded (``inf``) when the slope's interval reaches 0.
    """
    fit = fit_power_law(costs, errors, confidence)
    k = 2.0 if squared else 1.0
    if fit.slope >= 0:
        raise ValueError(f"errors do not decrease with cost (slope {fit.slope:.3g}): gamma is undefined")
    lo, hi = fit.interval
    upper = math.inf if hi >= 0 else -k / hi
    lower = -k / lo if lo < 0 else math.inf
    return GammaEstimate(-k / fit.slope, (min(lower, upper), max(lower, upper)), fit)


def cost_exponent(errors: Sequence[float], costs: Sequence[float], confidence: float = 0.95) -> PowerLawFit:
    """The exponent ``beta`` of ``cost ~ error^-beta`` (slope of log cost against log 1/error)."""
    return fit_power_law(1.0 / _positive_array("errors", errors), costs, confidence)
