"""Error–cost Pareto frontiers of measured sampler configurations, and the speedup of one family over another.

A *point* is a dict for one measured configuration: ``sampler`` ("ddpm" | "ddim"), ``family`` ("reference" |
"em" | "mlem" | "tstitch"), ``curve``, ``label``, ``steps``, ``networks``, ``mse``, ``mse_se``, its costs per
sample ``flops``, ``calls`` and ``seconds``, and ``protocol`` (an EM point of the paper's step set). A frontier
is a list of ``(cost, mse)`` pairs, by increasing cost and decreasing mse.

The baseline (EM) is a set of curves, one per network, and its cost to reach an mse is the cheaper of two
interpolations (:func:`baseline_cost`): along the Pareto frontier of all its points, and along each curve's
own points (the lower envelope of the curves). The frontier alone would credit the method wherever a
network's point is dominated by another network's but its own curve still runs below the frontier's chord
(e.g. the top network just above 10 steps, under the chord from a smaller network's 100-step point to the
top's 25-step one); the envelope alone would credit it in the gaps between networks' measured ranges.

    frontier = pareto_frontier(em_points, "flops")
    curve = speedup_curve(em_points, mlem_points, "flops", threshold=1e-3)   # curve["max"], curve["mse"], ...
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["pareto_frontier", "cost_to_reach", "baseline_cost", "speedup_curve", "speedup_at", "summarise",
           "best_curve", "COST_KEYS", "METHOD_FAMILIES", "FRONTIERS"]

COST_KEYS = ("flops", "calls", "seconds")
METHOD_FAMILIES = ("mlem", "tstitch")
FRONTIERS = ("all", "protocol")

Point = Mapping[str, object]
Frontier = list[tuple[float, float]]


def is_positive(value) -> bool:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x > 0


def unique(values: Iterable) -> list:
    """``values`` without repeats, in order of first appearance."""
    return list(dict.fromkeys(values))


def pareto_frontier(points: Iterable[Point], cost_key: str) -> Frontier:
    """The ``(cost, mse)`` pairs of ``points`` with strictly smaller mse than every cheaper point, by increasing
    cost; points whose cost or mse is missing, non-finite or non-positive are ignored."""
    pairs = sorted((float(p[cost_key]), float(p["mse"])) for p in points
                   if is_positive(p.get(cost_key)) and is_positive(p.get("mse")))
    frontier: Frontier = []
    for cost, mse in pairs:
        if not frontier or mse < frontier[-1][1]:
            frontier.append((cost, mse))
    return frontier


def cost_to_reach(frontier: Sequence[tuple[float, float]], mse: float) -> float:
    """The cost needed to reach ``mse`` on ``frontier`` (as :func:`pareto_frontier` returns it), interpolating
    log cost linearly in log mse between consecutive frontier points.

    ``nan`` when ``mse`` is below the frontier's smallest mse (or not > 0). Above the cheapest point's mse it is
    that point's cost: no cheaper configuration was measured, so none is credited (no extrapolation).
    """
    mse = float(mse)
    if not frontier or not mse > 0:
        return math.nan
    costs, errors = np.asarray(frontier, dtype=float).T
    if mse < errors[-1]:
        return math.nan
    if mse >= errors[0]:
        return float(costs[0])
    return float(np.exp(np.interp(np.log(mse), np.log(errors[::-1]), np.log(costs[::-1]))))


def _curve_frontiers(points: Iterable[Point], cost_key: str) -> list[Frontier]:
    """One frontier per ``curve`` of ``points`` (points without one form a single curve)."""
    groups: dict = {}
    for p in points:
        groups.setdefault(p.get("curve"), []).append(p)
    return [f for f in (pareto_frontier(group, cost_key) for group in groups.values()) if f]


def _baseline(points: Iterable[Point], cost_key: str) -> tuple[Frontier, list[Frontier]]:
    """The baseline's Pareto frontier and its per-curve frontiers (the arguments of :func:`baseline_cost`)."""
    points = list(points)
    return pareto_frontier(points, cost_key), _curve_frontiers(points, cost_key)


def baseline_cost(frontier: Frontier, curves: Sequence[Frontier], mse: float) -> float:
    """The cheapest cost to reach ``mse`` by :func:`cost_to_reach` on the baseline's Pareto ``frontier`` or on
    any of its ``curves`` (one frontier per curve); ``nan`` when none reaches it."""
    costs = [c for c in (cost_to_reach(f, mse) for f in (frontier, *curves)) if not math.isnan(c)]
    return min(costs) if costs else math.nan


def _mse_grid(baseline: Frontier, method: Frontier, threshold: float, num: int) -> list[float]:
    """Log-spaced mse values above ``threshold`` that both frontiers span (neither is extrapolated: beyond the
    cheapest measured EM point, EM's cost would be a guess, and crediting it would overstate the speedup)."""
    if not baseline or not method:
        return []
    lo, hi = max(threshold, baseline[-1][1], method[-1][1]), min(method[0][1], baseline[0][1])
    if not lo <= hi:
        return []
    grid = np.geomspace(lo, hi, num) if hi > lo else np.array([lo])
    return [float(m) for m in grid if m > threshold]


def speedup_curve(baseline_points: Iterable[Point], method_points: Iterable[Point], cost_key: str,
                  threshold: float = 0.0, num: int = 64) -> dict:
    """Speedup of the method's frontier over the baseline (:func:`baseline_cost`, its points grouped by
    ``curve``) on ``num`` log-spaced mse values from the lowest mse both reach (at least ``threshold``, which
    is excluded) up to the smaller of the two sides' largest mse.

    Returns ``{"mse", "speedup", "max", "mse_at_max", "cost_key", "threshold"}``; empty lists and ``nan``
    max when the frontiers do not overlap above the threshold.
    """
    threshold = float(threshold)
    (baseline, curves), method = _baseline(baseline_points, cost_key), pareto_frontier(method_points, cost_key)
    grid = _mse_grid(baseline, method, threshold, num)
    speedups = [baseline_cost(baseline, curves, m) / cost_to_reach(method, m) for m in grid]
    best = int(np.argmax(speedups)) if speedups else None
    return {"mse": grid, "speedup": speedups,
            "max": math.nan if best is None else speedups[best],
            "mse_at_max": math.nan if best is None else grid[best],
            "cost_key": cost_key, "threshold": threshold}


def speedup_at(baseline_points: Iterable[Point], method_points: Iterable[Point], cost_key: str,
               mse: float) -> float:
    """The speedup of the method's frontier over the baseline's curves at one ``mse`` (``nan`` where either side
    does not reach it)."""
    return baseline_cost(*_baseline(baseline_points, cost_key), mse) / cost_to_reach(
        pareto_frontier(method_points, cost_key), mse)


def _reference_mse(em_points: Sequence[Point], curve: str, steps: int) -> float:
    for p in em_points:
        if p["curve"] == curve and int(p["steps"]) == steps:
            return float(p["mse"])
    return math.nan


def _speedup_entry(baseline: list, method: list, cost_key: str, threshold: float, at_mse: float) -> dict:
    curve = speedup_curve(baseline, method, cost_key, threshold)
    return {"max": curve["max"], "mse_at_max": curve["mse_at_max"],
            "at_top500": speedup_at(baseline, method, cost_key, at_mse), "curve": curve}


def summarise(points: Sequence[Point], thresholds: Mapping[str, float], cost_keys: Sequence[str] = COST_KEYS,
              reference_mse_curve: str = "EM top network", reference_steps: int = 500) -> dict:
    """Speedups of every ML-EM and T-Stitch curve over the EM frontiers, per sampler and cost key.

    Per sampler: ``{"threshold", "top500_mse", "curves", "families"}`` with ``curves[name][cost_key][frontier]
    = {"max", "mse_at_max", "at_top500", "curve"}``, ``frontier`` "all" (every EM point of the sampler) or
    "protocol" (EM points with ``protocol``), and ``families[name]`` the curve's family. ``at_top500`` is the
    speedup at the mse of the EM point of curve ``reference_mse_curve`` with ``reference_steps`` steps
    (``top500_mse``; nan when that point is missing or not above the threshold). A sampler absent from
    ``thresholds`` gets threshold 0. JSON-serialisable (nan included).
    """
    summary = {}
    for sampler in unique(p["sampler"] for p in points):
        mine = [p for p in points if p["sampler"] == sampler]
        em = [p for p in mine if p["family"] == "em"]
        baselines = {"all": em, "protocol": [p for p in em if p.get("protocol")]}
        threshold = float(thresholds.get(sampler, 0.0))
        top_mse = _reference_mse(em, reference_mse_curve, reference_steps)
        at_mse = top_mse if top_mse > threshold else math.nan
        methods = [p for p in mine if p["family"] in METHOD_FAMILIES]
        curves, families = {}, {}
        for name in unique(p["curve"] for p in methods):
            method = [p for p in methods if p["curve"] == name]
            families[name] = str(method[0]["family"])
            curves[name] = {key: {frontier: _speedup_entry(baseline, method, key, threshold, at_mse)
                                  for frontier, baseline in baselines.items()}
                            for key in cost_keys}
        summary[sampler] = {"threshold": threshold, "top500_mse": top_mse, "curves": curves, "families": families}
    return summary


def best_curve(summary: Mapping, sampler: str, cost_key: str = "flops", frontier: str = "all",
               family: Optional[str] = None) -> Optional[str]:
    """The curve of ``sampler`` (of ``family`` if given) with the largest max speedup; None when none has one."""
    entry = summary[sampler]
    best, best_value = None, -math.inf
    for name, by_cost in entry["curves"].items():
        if family is not None and entry["families"].get(name) != family:
            continue
        value = by_cost[cost_key][frontier]["max"]
        if value > best_value:  # False for nan
            best, best_value = name, value
    return best
