"""Error against cost for EM and ML-EM on synthetic HTMC ladders: the polynomial speedup, measured.

For each cost exponent gamma and target accuracy eps = 2^-j, the ladder has k = j levels
(``problems.htmc_ladder``: |f^l - f| <= 2^-l, cost 2^(gamma l)). Methods, all on the same Brownian paths:

- EM with the top level f^k and dt = eps;
- ML-EM with Theorem 1's probabilities (the spec's constant), with independent and with stratified coins;
- ML-EM with inverse-cost probabilities per unit time, p_l = min(1, eps^-gamma dt / C_l);
- the Poisson-jump solver with Theorem 1's rates;
- beyond the spec: Theorem 1's probabilities scaled by 0.1 with stratified coins (the theorem's constant is a
  worst-case bound; low-variance coins let the constant shrink at little cost in error).

ML-EM methods step with dt = eps / 4 (their network cost does not depend on dt). The error is the RMS
over paths of |X_T - X_T^ref| with X^ref the fine-step EM solution of the true drift; the cost is the
realised cost per path by the exact rule. Exponents are fitted as cost ~ error^-beta with 95% intervals.

    python benchmarks/toy_scaling.py --quick   # <= 2 minutes, writes results/toy_scaling_quick.json
    python benchmarks/toy_scaling.py           # full run, writes results/toy_scaling.json and .png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import multilevel_sde as mlsde
from multilevel_sde.problems import htmc_ladder, htmc_reference

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("em", "mlem_theorem1", "mlem_theorem1_stratified", "mlem_inverse_cost", "poisson_theorem1",
           "mlem_theorem1_x0.1_stratified")
ML_METHODS = METHODS[1:]


def run_accuracy(gamma: float, j: int, paths: int, d: int, seed: int, fine_exp: int) -> dict:
    """Every method at target accuracy eps = 2^-j; returns {method: {error, cost, seconds, ...}}."""
    eps, k, T, sigma = 2.0**-j, j, 1.0, 1.0
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.randn(paths, d, generator=gen, dtype=torch.float64)
    bm = mlsde.GridBrownian(t0=0.0, t1=T, dt=2.0**-fine_exp, size=(paths, d), seed=seed + j, dtype=torch.float64)
    reference = htmc_reference(y0, T, bm, sigma)
    ladder = htmc_ladder(k, gamma, d, seed=seed)
    dt_ml = eps / 4
    ts = [0.0, T]

    def measure(sde, dt, method="euler", stats_cost=None):
        start = time.perf_counter()
        ys, stats = mlsde.sdeint(sde, y0, ts, bm=bm, dt=dt, method=method, seed=seed, return_stats=True)
        seconds = time.perf_counter() - start
        err = float(((ys[-1] - reference) ** 2).sum(-1).mean().sqrt())
        cost = stats_cost(stats) if stats_cost else stats.cost
        return {"error": err, "cost": cost / paths, "expected_cost": stats.expected_cost / paths,
                "seconds": seconds, "dt": dt, "evaluations": stats.evaluations}

    out = {"eps": eps, "k": k}
    top = ladder.levels[-1]
    out["em"] = measure(mlsde.MultilevelSDE(top, sigma), eps, stats_cost=lambda s: s.evaluations[0] * ladder.costs[-1])
    theorem = mlsde.Theorem1(eps=eps, gamma=gamma)
    for name, coins in (("mlem_theorem1", "independent"), ("mlem_theorem1_stratified", "stratified")):
        drift = ladder.drift(theorem, coupling="sample", coins=coins)
        out[name] = measure(mlsde.MultilevelSDE(drift, sigma), dt_ml)
    tuned = ladder.drift(mlsde.Theorem1(eps=eps, gamma=gamma, scale=0.1), coupling="sample", coins="stratified")
    out["mlem_theorem1_x0.1_stratified"] = measure(mlsde.MultilevelSDE(tuned, sigma), dt_ml)
    inverse = mlsde.InverseCost(c=eps**-gamma, per_unit_time=True)
    out["mlem_inverse_cost"] = measure(mlsde.MultilevelSDE(ladder.drift(inverse, coupling="sample"), sigma), dt_ml)
    poisson_drift = ladder.drift(theorem, coupling="sample")
    out["poisson_theorem1"] = measure(mlsde.MultilevelSDE(poisson_drift, sigma), dt_ml, method="poisson")
    return out


def fit(points: list, method: str, skip: int = 0) -> dict:
    errors = [p[method]["error"] for p in points[skip:]]
    costs = [p[method]["cost"] for p in points[skip:]]
    f = mlsde.cost_exponent(errors, costs)
    return {"exponent": f.slope, "interval": list(f.interval), "intercept": f.intercept, "points": len(errors)}


def cost_at_error(points: list, method: str, error: float) -> float:
    """Cost of ``method`` at ``error`` by log–log interpolation (extrapolation past the ends)."""
    errs = np.log([p[method]["error"] for p in points])
    costs = np.log([p[method]["cost"] for p in points])
    order = np.argsort(errs)
    errs, costs = errs[order], costs[order]
    x = math.log(error)
    if x <= errs[0]:
        i = 0
    elif x >= errs[-1]:
        i = len(errs) - 2
    else:
        i = int(np.searchsorted(errs, x)) - 1
    slope = (costs[i + 1] - costs[i]) / (errs[i + 1] - errs[i])
    return float(math.exp(costs[i] + slope * (x - errs[i])))


def summarise(gamma: float, points: list) -> dict:
    fits = {m: fit(points, m) for m in METHODS}
    fits_asymptotic = {m: fit(points, m, skip=1) for m in METHODS}  # without the coarsest eps
    ml = points[-1]["mlem_theorem1"]
    em_cost = cost_at_error(points, "em", ml["error"])
    speedups = {m: cost_at_error(points, "em", points[-1][m]["error"]) / points[-1][m]["cost"] for m in ML_METHODS}
    best = max(speedups, key=speedups.get)
    # Theorem 1's cost grows like G_k^2 / eps^2: over few levels G_k is far from its asymptote
    g = [mlsde.Theorem1(eps=p["eps"], gamma=gamma).G_k for p in points]
    predicted = max(gamma, 2.0) if len(g) < 2 else 2.0 + 2 * math.log(g[-1] / g[0]) / math.log(points[0]["eps"] / points[-1]["eps"])
    return {
        "gamma": gamma,
        "em_exponent": fits["em"]["exponent"],
        "mlem_exponent": fits["mlem_theorem1"]["exponent"],
        "poisson_exponent": fits["poisson_theorem1"]["exponent"],
        "stratified_exponent": fits["mlem_theorem1_stratified"]["exponent"],
        "inverse_cost_exponent": fits["mlem_inverse_cost"]["exponent"],
        "fits": fits,
        "fits_without_coarsest": fits_asymptotic,
        "theory": {"em": gamma + 1, "mlem": max(gamma, 2.0), "mlem_theorem1_over_these_k": predicted},
        "speedups_at_min_error": speedups,
        "best_method": best,
        "best_speedup_at_min_error": speedups[best],
        "min_error_mlem": ml["error"],
        "em_cost_at_min_error": em_cost,
        "mlem_cost_at_min_error": ml["cost"],
        "speedup_at_min_error": em_cost / ml["cost"],
        "points": points,
    }


def plot(summaries: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.2 * len(summaries), 4), squeeze=False)
    styles = {"em": "o-", "mlem_theorem1": "s-", "mlem_theorem1_stratified": "^-", "mlem_inverse_cost": "d-",
              "poisson_theorem1": "x--", "mlem_theorem1_x0.1_stratified": "v-"}
    for ax, s in zip(axes[0], summaries):
        for m in METHODS:
            errs = [p[m]["error"] for p in s["points"]]
            costs = [p[m]["cost"] for p in s["points"]]
            ax.loglog(errs, costs, styles[m], label=f"{m} ({s['fits'][m]['exponent']:.2f})", ms=4)
        e = np.array([p["em"]["error"] for p in s["points"]])
        anchor = s["points"][0]["mlem_theorem1"]
        for slope, style, label in ((s["theory"]["em"], ":", "slope γ+1"), (s["theory"]["mlem"], "-.", "slope max(γ,2)")):
            ax.loglog(e, anchor["cost"] * (e / anchor["error"]) ** -slope, "k" + style, lw=0.8, label=label)
        ax.set_title(f"γ = {s['gamma']}")
        ax.set_xlabel("RMS error at T")
        ax.set_ylabel("cost per path")
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced size (<= 2 minutes)")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.5, 2.5, 3.0, 4.0])
    parser.add_argument("--paths", type=int, default=None)
    parser.add_argument("--d", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = args.paths or (256 if args.quick else 1024)
    exps = range(2, 7) if args.quick else range(2, 8)
    fine_exp = 10 if args.quick else 12
    torch.set_num_threads(1)
    started = time.perf_counter()
    summaries = []
    for gamma in args.gammas:
        points = []
        for j in exps:
            points.append(run_accuracy(gamma, j, paths, args.d, args.seed, fine_exp))
            p = points[-1]
            print(f"gamma={gamma} eps=2^-{j}: " + "  ".join(
                f"{m}: err {p[m]['error']:.3g} cost {p[m]['cost']:.3g}" for m in METHODS), flush=True)
        summaries.append(summarise(gamma, points))
        s = summaries[-1]
        print(f"gamma={gamma}: EM exponent {s['em_exponent']:.2f} (theory {gamma + 1}), ML-EM {s['mlem_exponent']:.2f}, "
              f"Poisson {s['poisson_exponent']:.2f}, stratified {s['stratified_exponent']:.2f}, inverse cost "
              f"{s['inverse_cost_exponent']:.2f} (theory {max(gamma, 2.0)}, Theorem 1 over these k "
              f"{s['theory']['mlem_theorem1_over_these_k']:.2f}); EM/ML-EM cost at ML-EM's smallest error "
              f"{s['speedup_at_min_error']:.1f}x; best: {s['best_method']} {s['best_speedup_at_min_error']:.1f}x",
              flush=True)
    name = "toy_scaling_quick" if args.quick else "toy_scaling"
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/toy_scaling.py" + (" --quick" if args.quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "settings": {"paths": paths, "d": args.d, "eps": [2.0**-j for j in exps], "fine_dt": 2.0**-fine_exp,
                     "ml_dt": "eps/4", "em_dt": "eps", "seed": args.seed, "T": 1.0, "sigma": 1.0},
        "seconds": time.perf_counter() - started,
        "per_gamma": {str(s["gamma"]): s for s in summaries},
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out} in {record['seconds']:.0f} s")
    if not args.quick:
        plot(summaries, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
