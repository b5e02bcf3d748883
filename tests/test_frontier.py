"""Pareto frontiers, cost-to-reach interpolation and speedup summaries of measured sampler points."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from multilevel_sde.diffusion.frontier import (baseline_cost, best_curve, cost_to_reach, pareto_frontier, speedup_at,
                                               speedup_curve, summarise)

THRESHOLDS = {"ddpm": 5e-5, "ddim": 1e-3}


def point(sampler: str, family: str, curve: str, steps: int, flops: float, mse: float,
          protocol: bool = False) -> dict:
    """One measured configuration; calls and seconds are proportional to FLOPs."""
    return {"sampler": sampler, "family": family, "curve": curve, "label": f"{curve}, {steps} steps",
            "steps": steps, "networks": [0, 1], "mse": mse, "mse_se": 0.1 * mse, "flops": flops,
            "calls": flops / 100, "seconds": flops * 1e-6, "protocol": protocol}


def sampler_points(sampler: str, scale: float = 1.0) -> list[dict]:
    """EM top network (mse = scale / flops, paper steps), a cheap EM curve whose 500-step point is not the
    reference, an ML-EM and a T-Stitch curve, and a reference point (mse 0, ignored)."""
    pts = [point(sampler, "reference", "reference", 1000, 1e5, 0.0)]
    pts += [point(sampler, "em", "EM top network", s, 10.0 * s, scale / (10.0 * s), True) for s in (250, 500, 1000)]
    pts += [point(sampler, "em", "EM cpu-s", s, float(s), scale * m, s == 500)
            for s, m in ((100, 5e-3), (200, 4e-3), (500, 3.5e-3))]
    pts += [point(sampler, "mlem", "ML-EM inverse-cost 1000", 1000, f, scale * m)
            for f, m in ((80.0, 6e-3), (1000.0, 4e-4), (2000.0, 2e-4), (4000.0, 1e-4))]
    pts += [point(sampler, "tstitch", "T-Stitch 1000", 1000, f, scale * m)
            for f, m in ((3000.0, 3e-4), (6000.0, 1.5e-4))]
    return pts


def synthetic_points() -> list[dict]:
    return sampler_points("ddpm") + sampler_points("ddim", scale=2.0)


def as_points(costs, mses) -> list[dict]:
    return [{"flops": c, "mse": m} for c, m in zip(costs, mses)]


def test_pareto_frontier_keeps_strict_improvements_and_ignores_invalid_points():
    costs = [2, 1, 3, 3, 4, 5, 0, 6, math.inf, 7, 8]
    mses = [2.0, 1.0, 0.5, 0.4, 0.4, math.nan, 0.1, -1.0, 0.01, 0.0, 0.1]
    assert pareto_frontier(as_points(costs, mses), "flops") == [(1.0, 1.0), (3.0, 0.4), (8.0, 0.1)]
    assert pareto_frontier([], "flops") == []
    assert pareto_frontier([{"flops": None, "mse": 1.0}], "flops") == []


@pytest.mark.parametrize("cost", [1.0, 3.7, 10.0, 37.0, 512.0, 1000.0])
def test_cost_to_reach_is_exact_on_a_power_law(cost):
    costs = np.array([1.0, 10.0, 100.0, 1000.0])
    frontier = pareto_frontier(as_points(costs, 5.0 * costs**-2), "flops")
    assert cost_to_reach(frontier, 5.0 * cost**-2) == pytest.approx(cost, rel=1e-12)


def test_cost_to_reach_outside_the_frontier():
    frontier = [(1.0, 1.0), (10.0, 0.1)]
    assert math.isnan(cost_to_reach(frontier, 0.09))
    assert cost_to_reach(frontier, 5.0) == 1.0  # above the cheapest point: its cost, no extrapolation
    assert math.isnan(cost_to_reach([], 0.5)) and math.isnan(cost_to_reach(frontier, math.nan))


def test_a_curve_three_times_cheaper_has_speedup_three_everywhere():
    costs, mses = [1.0, 2.5, 7.0, 30.0, 100.0], [0.9, 0.5, 0.3, 0.05, 0.04]
    baseline, method = as_points(costs, mses), as_points([c / 3 for c in costs], mses)
    curve = speedup_curve(baseline, method, "flops", 0.0, num=40)
    assert len(curve["mse"]) == 40 and curve["mse"][0] == pytest.approx(0.04) and curve["mse"][-1] == 0.9
    np.testing.assert_allclose(curve["speedup"], 3.0, rtol=1e-9)
    assert curve["max"] == pytest.approx(3.0, rel=1e-9) and curve["cost_key"] == "flops"
    assert speedup_at(baseline, method, "flops", 0.2) == pytest.approx(3.0, rel=1e-9)


def test_speedup_at_on_power_laws():
    costs = np.geomspace(1.0, 1e4, 6)
    baseline, method = as_points(costs, costs**-2.0), as_points(costs, (4.0 * costs) ** -2.0)
    assert speedup_at(baseline, method, "flops", 1e-5) == pytest.approx(4.0, rel=1e-9)
    assert math.isnan(speedup_at(baseline, method, "flops", 1e-9))


def test_grid_respects_the_threshold_and_the_lowest_common_mse():
    costs = [1.0, 10.0, 100.0]
    baseline, method = as_points(costs, [1.0, 0.1, 0.01]), as_points(costs, [0.5, 0.05, 0.001])
    curve = speedup_curve(baseline, method, "flops", threshold=0.02)
    assert len(curve["mse"]) == 63 and min(curve["mse"]) > 0.02 and curve["mse"][-1] == 0.5
    assert curve["threshold"] == 0.02 and curve["mse_at_max"] in curve["mse"]
    assert speedup_curve(baseline, method, "flops", threshold=0.0)["mse"][0] == pytest.approx(0.01)  # baseline's floor
    above = speedup_curve(baseline, method, "flops", threshold=0.6)
    assert above["mse"] == [] and math.isnan(above["max"]) and math.isnan(above["mse_at_max"])


def test_no_overlap_gives_nan():
    baseline, method = as_points([1.0, 2.0], [1.0, 0.5]), as_points([1.0, 2.0], [0.1, 0.05])
    curve = speedup_curve(baseline, method, "flops", 0.0)
    assert curve["mse"] == [] and curve["speedup"] == [] and math.isnan(curve["max"])
    assert math.isnan(speedup_curve([], method, "flops", 0.0)["max"])


def test_baseline_cost_follows_a_networks_own_curve_under_the_frontiers_chord():
    """The top network at 10 steps is dominated by the middle one at 50, but the top's own curve (10 -> 25
    steps) runs far below the frontier's chord from middle-100 to top-25: EM's cost there is the top's."""
    middle = [{"curve": "m", "flops": 10.0 * s, "mse": m} for s, m in ((25, 0.077), (50, 0.066), (100, 0.063))]
    top = [{"curve": "top", "flops": 55.0 * s, "mse": m} for s, m in ((10, 0.071), (25, 0.0148))]
    method = [{"curve": "ml", "flops": f, "mse": m} for f, m in ((240.0, 0.076), (450.0, 0.0315))]
    frontier, curves = pareto_frontier(middle + top, "flops"), [pareto_frontier(c, "flops") for c in (middle, top)]
    assert (550.0, 0.071) not in frontier  # dominated by middle-50 (500 FLOPs, 0.066)
    mse = 0.062
    on_top = cost_to_reach(curves[1], mse)
    assert on_top < 0.7 * cost_to_reach(frontier, mse)  # the chord overstates EM's cost
    assert baseline_cost(frontier, curves, mse) == pytest.approx(on_top)
    assert speedup_at(middle + top, method, "flops", mse) == pytest.approx(on_top / cost_to_reach(
        pareto_frontier(method, "flops"), mse))
    # in the gap between the networks' ranges the chord is the cheaper estimate and is kept
    gap = [{"curve": "a", "flops": 1.0, "mse": 1.0}, {"curve": "b", "flops": 100.0, "mse": 0.01}]
    assert baseline_cost(pareto_frontier(gap, "flops"), [pareto_frontier([g], "flops") for g in gap], 0.1) \
        == pytest.approx(10.0)


def test_summarise_per_sampler_frontier_and_reference_point():
    points = synthetic_points()
    summary = summarise(points, THRESHOLDS)
    assert list(summary) == ["ddpm", "ddim"]
    ddpm, ddim = summary["ddpm"], summary["ddim"]
    assert list(ddpm["curves"]) == ["ML-EM inverse-cost 1000", "T-Stitch 1000"]
    assert ddpm["families"] == {"ML-EM inverse-cost 1000": "mlem", "T-Stitch 1000": "tstitch"}
    assert ddpm["threshold"] == 5e-5 and ddpm["top500_mse"] == pytest.approx(2e-4)  # top network, not cpu-s
    mlem = ddpm["curves"]["ML-EM inverse-cost 1000"]
    assert set(mlem) == {"flops", "calls", "seconds"} and set(mlem["flops"]) == {"all", "protocol"}
    # At the top-500 MSE both EM frontiers need 5000 FLOPs, ML-EM 2000.
    assert mlem["flops"]["all"]["at_top500"] == pytest.approx(2.5) == mlem["flops"]["protocol"]["at_top500"]
    # The curves stop at the cheapest EM point's MSE (5e-3 at 100 FLOPs; protocol: 3.5e-3 at 500): EM is never
    # extrapolated beyond what was measured.
    everything, protocol = mlem["flops"]["all"]["curve"], mlem["flops"]["protocol"]["curve"]
    ml_frontier = pareto_frontier([p for p in points if p["sampler"] == "ddpm" and p["family"] == "mlem"], "flops")
    assert everything["mse"][-1] == pytest.approx(5e-3) and protocol["mse"][-1] == pytest.approx(3.5e-3)
    assert everything["speedup"][-1] == pytest.approx(100 / cost_to_reach(ml_frontier, 5e-3))
    assert protocol["speedup"][-1] == pytest.approx(500 / cost_to_reach(ml_frontier, 3.5e-3))
    assert protocol["max"] > mlem["flops"]["all"]["max"]
    for key in ("calls", "seconds"):  # proportional costs: the same speedups
        assert mlem[key]["all"]["max"] == pytest.approx(mlem["flops"]["all"]["max"], rel=1e-9)

    # ddim: its own points only; its top-500 MSE (4e-4) is below its threshold, so at_top500 is nan.
    assert ddim["top500_mse"] == pytest.approx(4e-4) and ddim["threshold"] == 1e-3
    entry = ddim["curves"]["ML-EM inverse-cost 1000"]["flops"]["protocol"]
    assert math.isnan(entry["at_top500"])
    em_protocol = [p for p in points if p["sampler"] == "ddim" and p["family"] == "em" and p["protocol"]]
    mlem_ddim = [p for p in points if p["sampler"] == "ddim" and p["curve"] == "ML-EM inverse-cost 1000"]
    assert entry["curve"] == speedup_curve(em_protocol, mlem_ddim, "flops", 1e-3)
    assert len(entry["curve"]["mse"]) == 63 and min(entry["curve"]["mse"]) > 1e-3
    assert ddim["curves"]["T-Stitch 1000"]["flops"]["all"]["curve"]["mse"] == []  # entirely below the threshold

    text = json.dumps(summary)
    assert "NaN" in text and json.loads(text)["ddpm"]["threshold"] == 5e-5


def test_summarise_without_the_reference_point_and_best_curve():
    points = [p for p in synthetic_points() if not (p["curve"] == "EM top network" and p["steps"] == 500)]
    summary = summarise(points, THRESHOLDS)
    assert math.isnan(summary["ddpm"]["top500_mse"])
    assert math.isnan(summary["ddpm"]["curves"]["T-Stitch 1000"]["flops"]["all"]["at_top500"])
    curves = summary["ddpm"]["curves"]
    expected = max(curves, key=lambda name: curves[name]["flops"]["all"]["max"])
    assert best_curve(summary, "ddpm") == expected
    assert best_curve(summary, "ddpm", family="tstitch") == "T-Stitch 1000"
    assert best_curve(summary, "ddpm", family="nothing") is None
