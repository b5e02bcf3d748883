"""``benchmarks/coin_noise_ceiling.py``: the noise model's fit, its pricing of a step and its bound, on a synthetic
experiment whose ML-EM points follow the model exactly."""

import json
import math

import numpy as np
import pytest

import multilevel_sde as mlsde
from helpers import load_benchmark

ceiling = load_benchmark("coin_noise_ceiling")
COSTS = np.array([1.0, 4.0, 16.0])
C_TRUE = np.array([0.05, 0.08])


def e_top(n):
    return 10.0 / np.asarray(n, dtype=float) ** 2


def model_mse(n: int, p: list) -> float:
    return float(e_top(n) + sum(c * (1 / q - 1) for c, q in zip(C_TRUE, p[1:])) / n)


def synthetic_results(tmp_path):
    names = ["small", "mid", "top"]
    points = []
    for name, cost, offset in zip(names, COSTS, (0.3, 0.1, 0.0)):
        curve = "EM top network" if name == "top" else f"EM {name}"
        for n in (10, 25, 50, 100, 250, 500):
            points.append({"sampler": "ddpm", "family": "em", "curve": curve, "steps": n, "mse": offset + e_top(n),
                           "mse_se": 0.01, "flops": n * cost})
    for n in (10, 25, 50):
        for p_top in (0.5, 0.25, 0.1, 0.05):
            p = [1.0, min(1.0, 4 * p_top), p_top]
            mse = model_mse(n, p)
            points.append({"sampler": "ddpm", "family": "mlem", "curve": f"ML-EM inverse-cost {n}", "steps": n,
                           "probabilities": p, "coins": "independent", "mse": mse, "mse_se": 0.05 * mse,
                           "flops": float(n * ceiling.step_cost(np.array(p)[:, None], COSTS)[0])})
    results = {"networks": [{"name": n, "flops": c} for n, c in zip(names, COSTS)], "mlem_networks": names,
               "thresholds": {"ddpm": 0.005}, "points": points}
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path


@pytest.mark.parametrize("p", [[1.0, 1.0, 0.3], [1.0, 0.5, 0.2], [1.0, 0.05, 0.01], [1.0, 1.0, 1.0]])
def test_step_cost_is_the_drifts_expected_cost(p):
    drift = mlsde.MultilevelDrift([lambda t, y: y] * 3, p, costs=COSTS.tolist())
    assert ceiling.step_cost(np.array(p)[:, None], COSTS)[0] == pytest.approx(drift.expected_cost(0.5, 0.01))


def test_fit_recovers_the_noise_of_points_that_follow_the_model(tmp_path):
    points = json.loads((synthetic_results(tmp_path) / "results.json").read_text())["points"]
    fit = ceiling.fit_noise(points, e_top)
    assert fit["points"] == 12 and fit["weights"] == "1/mse_se"
    np.testing.assert_allclose(fit["c"], C_TRUE, rtol=1e-8)
    assert fit["p_min"] == [pytest.approx(0.2), 0.05]


def test_bound_covers_the_measured_points_and_the_shrink_reaches_the_target(tmp_path):
    entry = ceiling.analyse(synthetic_results(tmp_path), [0.02])
    measured, modelled, bound = (entry[k] for k in ("measured_independent", "model_at_measured_configs",
                                                   "bound_any_steps_and_p"))
    assert modelled["max"] == pytest.approx(measured["max"])  # the points follow the model exactly
    assert bound["max"] >= measured["max"] * (1 - 1e-9) and bound["at_mse_0.02"] >= measured["at_mse_0.02"] * (1 - 1e-9)
    shrink = entry["c_shrink_for_4x"]
    assert bound["max"] < ceiling.TARGET and 1 < shrink < math.inf
    result = json.loads((tmp_path / "results.json").read_text())
    em = [p for p in result["points"] if p["family"] == "em"]
    curves = ceiling.model_curves(C_TRUE / shrink, COSTS, ceiling.top_em_error(em, "EM top network")[0],
                                  np.unique(np.geomspace(10, 500, 80).round()), np.array([0.2, 0.05]))
    assert ceiling.score(em, curves, 0.005, [])["max"] == pytest.approx(ceiling.TARGET, abs=0.02)

