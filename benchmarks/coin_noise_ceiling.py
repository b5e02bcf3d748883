"""How far ML-EM could go on a measured ladder: a fitted noise model and its best allocation, against every EM point.

    python benchmarks/coin_noise_ceiling.py benchmarks/results/celeba16-cpu/ddpm-nested-3 ... \
        --out benchmarks/results/celeba16-cpu/coin_noise_ceiling.json

For each experiment folder (its ``results.json``) the sample MSE of ML-EM on ``N`` steps with constant
probabilities ``p = (1, p_2, .., p_k)`` and independent coins (the unbiased estimator) is modelled as

    mse(N, p) = E_top(N) + sum_{l >= 2} c_l (1 / p_l - 1) / N

``E_top(N)``: the top network's own EM error on ``N`` steps (measured; log-log interpolated between its step
counts); the second term: the coin noise of each difference ``f^l - f^{l-1}``, whose variance per step is
``(1/p_l - 1)`` times its square and whose sum over ``N`` steps of size ``1/N`` falls like ``1/N`` (the Monte
Carlo rate), while ``E_top`` falls like ``N^-1.9`` here. The ``c_l`` are fitted by weighted non-negative least
squares (weights ``1 / mse_se``) to the measured ML-EM points; the residuals are printed in standard errors.

The model is then searched over every ``N`` between the EM top network's smallest and largest step counts and every
``p_l`` in ``[1e-3, 1]``, each configuration priced by the exact evaluation rule (a level runs when one of its two
differences is drawn; a level whose two differences are certain cancels), and its Pareto frontier is scored by
``frontier.speedup_curve``/``speedup_at`` against every EM point with the experiment's threshold: the same rule as
the reports. Printed beside it: the same score on the measured points (what was reached), the model on the
measured configurations only (the model's check), and the factor by which every ``c_l`` would have to shrink for
the bound to reach 4x (rungs closer in RMS by its square root).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import bisect, nnls

from multilevel_sde.diffusion.frontier import speedup_at, speedup_curve
from multilevel_sde.files import atomic_write_json

TARGET = 4.0
P_POINTS = 61  # values of each p_l (fewer for longer ladders: the search is over the grid's power k - 1)


def top_em_error(em_points: list, top_curve: str):
    """``E_top(N)`` from the top network's EM points: log-log interpolation within its measured step counts."""
    pairs = sorted((int(p["steps"]), float(p["mse"])) for p in em_points if p["curve"] == top_curve and p["mse"] > 0)
    steps, mse = np.array(pairs, dtype=float).T
    return lambda n: np.exp(np.interp(np.log(n), np.log(steps), np.log(mse))), (steps[0], steps[-1])


def fit_noise(points: list, e_top) -> dict:
    """``c_2 .. c_k`` of the noise model from ML-EM points with independent coins and constant ``p`` (``p_1 = 1``),
    weighted by ``1 / mse_se`` (by ``1 / mse``, relative errors, where the points have no standard error: one coin
    per batch gives one pattern, not a sample of them)."""
    fitted = [p for p in points if p["family"] == "mlem" and p.get("coins") == "independent"
              and p.get("probabilities") and p["probabilities"][0] == 1.0]
    have_se = all(math.isfinite(float(p["mse_se"])) and p["mse_se"] > 0 for p in fitted)
    x = np.array([[(1 / q - 1) / p["steps"] for q in p["probabilities"][1:]] for p in fitted])
    y = np.array([p["mse"] - float(e_top(p["steps"])) for p in fitted])
    w = np.array([1 / (p["mse_se"] if have_se else p["mse"]) for p in fitted])
    c, _ = nnls(x * w[:, None], y * w)
    residuals = np.abs(y - x @ c) * w
    return {"c": c.tolist(), "points": len(y), "weights": "1/mse_se" if have_se else "1/mse",
            "p_min": [min(p["probabilities"][l] for p in fitted) for l in range(1, x.shape[1] + 1)],
            "residual_weighted_median_abs": float(np.median(residuals)),
            "residual_weighted_max_abs": float(np.max(residuals))}


def step_cost(p: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """FLOPs per sample and step for probabilities ``p`` ``(k, ...)`` (``p_1 = 1``), independent coins, exact rule."""
    drawn_next = np.concatenate([p[1:], np.zeros_like(p[:1])])
    runs = 1 - (1 - p) * (1 - drawn_next)
    runs[:-1] = np.where((p[:-1] >= 1) & (p[1:] >= 1), 0.0, runs[:-1])  # both differences certain: it cancels
    return np.tensordot(costs, runs, axes=1)


def model_curves(c: np.ndarray, costs: np.ndarray, e_top, steps: np.ndarray, p_min: np.ndarray) -> dict:
    """The model's curves, one per number of steps, each ``p_l`` log-spaced in ``[p_min_l, 1]`` (the measured range:
    the model is not extrapolated to rarer coins): ``{N: [{"flops", "mse", "steps", "probabilities"}]}``,
    Pareto-optimal points only."""
    k = len(costs)
    points = max(11, round(P_POINTS ** (2 / (k - 1))))
    mesh = np.meshgrid(*(np.geomspace(lo, 1.0, points) for lo in p_min), indexing="ij")
    p = np.stack([np.ones(mesh[0].size)] + [m.ravel() for m in mesh])
    noise, cost = ((1 / p[1:] - 1) * c[:, None]).sum(0), step_cost(p, costs)
    curves = {}
    for n in steps:
        mse, flops = e_top(n) + noise / n, n * cost
        order = np.lexsort((mse, flops))
        keep = order[np.minimum.accumulate(mse[order]) == mse[order]]
        curves[int(n)] = [{"flops": float(flops[i]), "mse": float(mse[i]), "steps": int(n),
                           "probabilities": p[:, i].tolist()} for i in keep]
    return curves


def score(em: list, curves: dict, threshold: float, mses: list) -> dict:
    """The best of ``curves`` (``{name: points}``) as the reports score them: the largest ``speedup_curve`` max over
    every EM point above ``threshold`` (with the curve, the MSE and the configuration nearest it), and the largest
    ``speedup_at`` each of ``mses``."""
    best = {"max": math.nan, "curve": None}
    for name, points in curves.items():
        curve = speedup_curve(em, points, "flops", threshold)
        if math.isfinite(curve["max"]) and not curve["max"] <= best["max"]:
            at = min(points, key=lambda q: abs(math.log(q["mse"] / curve["mse_at_max"])))
            best = {"max": curve["max"], "curve": name, "mse_at_max": curve["mse_at_max"],
                    "nearest_config": {"steps": at["steps"], "probabilities": at["probabilities"], "mse": at["mse"]}}
    for m in mses:
        at = [s for s in (speedup_at(em, points, "flops", m) for points in curves.values()) if math.isfinite(s)]
        best[f"at_mse_{m}"] = max(at) if at else math.nan
    return best


def by_curve(points: list) -> dict:
    curves: dict = {}
    for p in points:
        curves.setdefault(p["curve"], []).append(p)
    return curves


def analyse(folder: Path, mses: list) -> dict:
    result = json.loads((folder / "results.json").read_text())
    points = [p for p in result["points"] if p["sampler"] == "ddpm"]
    threshold = float(result["thresholds"]["ddpm"])
    em = [p for p in points if p["family"] == "em"]
    names = [n["name"] for n in result["networks"]]
    ladder = [names[i] if isinstance(i, int) else i for i in result["mlem_networks"]]
    costs = np.array([next(n["flops"] for n in result["networks"] if n["name"] == name) for name in ladder], float)
    e_top, (lo, hi) = top_em_error(em, "EM top network")
    fit = fit_noise(points, e_top)
    c = np.array(fit["c"])
    measured = [p for p in points if p["family"] == "mlem" and p.get("coins") == "independent"
                and p.get("probabilities")]
    modelled = [{**p, "mse": float(e_top(p["steps"]) + sum(ci * (1 / q - 1) for ci, q in
                                                           zip(c, p["probabilities"][1:])) / p["steps"])}
                for p in measured if p["probabilities"][0] == 1.0]
    steps = np.unique(np.geomspace(lo, hi, 80).round())

    def bound(scale: float) -> dict:
        return score(em, model_curves(c * scale, costs, e_top, steps, np.array(fit["p_min"])), threshold, mses)

    at_one = bound(1.0)
    shrink = None
    if at_one["max"] < TARGET:
        gap = lambda s: bound(s)["max"] - TARGET  # decreasing in s
        shrink = 1 / bisect(gap, 1e-4, 1.0, xtol=1e-4) if gap(1e-4) > 0 else math.inf
    return {"ladder": ladder, "costs_flops": costs.tolist(), "threshold": threshold,
            "top_em_steps": [lo, hi], "noise_fit": fit,
            "measured_independent": score(em, by_curve(measured), threshold, mses),
            "model_at_measured_configs": score(em, by_curve(modelled), threshold, mses),
            "bound_any_steps_and_p": at_one, "top_over_smallest_cost": float(costs[-1] / costs[0]),
            f"c_shrink_for_{TARGET:g}x": shrink}


def print_entry(folder: str, entry: dict, mses: list) -> None:
    fit, shrink = entry["noise_fit"], entry[f"c_shrink_for_{TARGET:g}x"]
    print(f"{folder}: ladder {entry['ladder']}, threshold {entry['threshold']:.4f}")
    unit = " SE" if fit["weights"] == "1/mse_se" else " of the MSE"
    print(f"  noise fit c = {np.round(fit['c'], 3).tolist()} over {fit['points']} points, |residual| median "
          f"{fit['residual_weighted_median_abs']:.2f}{unit}, max {fit['residual_weighted_max_abs']:.2f}{unit}")
    rows = (("measured", "measured_independent"), ("model, measured configs", "model_at_measured_configs"),
            ("bound, any N and p", "bound_any_steps_and_p"))
    for label, key in rows:
        row = entry[key]
        at = ", ".join(f"MSE {m}: {row[f'at_mse_{m}']:.2f}x" for m in mses)
        print(f"  {label:<24} max {row['max']:.2f}x ({row['curve']}, MSE {row['mse_at_max']:.4f}, "
              f"p = {np.round(row['nearest_config']['probabilities'], 3).tolist()}); {at}")
    if 0.0 in fit["c"]:
        print("  (a c_l fitted at 0: the model charges nothing for that difference's coins: the bound is optimistic)")
    verdict = (f"every c_l must shrink {shrink:.1f}x for the bound to reach {TARGET:g}x" if shrink
               else f"the bound reaches {TARGET:g}x")
    print(f"  top / smallest cost {entry['top_over_smallest_cost']:.1f}x; {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="experiment folders holding results.json")
    parser.add_argument("--mse", default="0.02,0.01", help="comma-separated MSEs (default: %(default)s)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    mses = [float(v) for v in args.mse.split(",")]
    table = {}
    for folder in args.folders:
        table[folder] = entry = analyse(Path(folder), mses)
        print_entry(folder, entry, mses)
    command = ("python benchmarks/coin_noise_ceiling.py " + " ".join(args.folders)
               + f" --mse {args.mse} --out {args.out}")
    atomic_write_json(args.out, {"command": command, "model": __doc__, "ladders": table}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
