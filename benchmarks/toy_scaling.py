"""Error against cost for EM and ML-EM on synthetic HTMC ladders: the polynomial speedup, measured (spec §12.10).

For each cost exponent gamma and target accuracy eps = 2^-j, the ladder has k = j levels
(``problems.htmc_ladder``: |f^l - f| <= 2^-l, cost 2^(gamma l)). Every method runs on the same Brownian paths;
the error is the RMS over paths of |X_T - X_T^ref| (X^ref: fine-step EM of the true drift), the cost the
realised cost per path by the exact rule. EM uses the top level at dt = eps; ML-EM dt = eps / 4 (its network
cost does not depend on dt).

PRE-REGISTERED, fixed before the run; the headline and the targets use nothing else:

- variant: ML-EM with Theorem 1's probabilities at the spec's constant (A = 9 G_k / eps^2), independent coins
  (the paper's), one coin per sample, dt = eps / 4: ``mlem_theorem1``;
- fit: cost ~ error^-beta, least squares in log-log with 95 % regression intervals, over the accuracies where
  the variant has some p < 1 (where every p = 1 ML-EM is EM with f^k, and says nothing about ML-EM); EM is
  fitted over the same accuracies;
- targets (checked and printed for each gamma):
  T1  EM's exponent: gamma + 1 inside its interval;
  T2  ML-EM's exponent: the asymptotic max(gamma, 2) inside its interval;
  T3  ML-EM's exponent: Theorem 1's finite-k prediction, 2 + d log G_k^2 / d log(1/eps) over the fitted
      accuracies, inside its interval;
  T4  separation (spec): ML-EM's exponent < EM's - 0.4 (point estimates);
  T5  gamma = 3 only (spec): ML-EM's exponent in [3, 3.4] (point estimate);
  T6  gamma < 2 only (spec): 2 inside ML-EM's interval;
- headline: EM's cost over ML-EM's at ML-EM's smallest error (EM's cost by log-log interpolation, extrapolated
  from EM's last two points when ML-EM's smallest error lies below EM's: the factor is recorded).

SECOND PRE-REGISTERED VARIANT (issue #19 §3), fixed before its first run here; its rule and budget are those of
the earlier exploratory measurement in docs/theory.md ("A principled constant"), not tuned on this run:

- variant: Giles' adaptive probabilities ``mlsde.Adaptive``, ``mlem_adaptive``: a pilot (EM with the top level,
  the run's ladder and y0, dt = eps / 4, its own Brownian path, seed + 1), scaled to the budget rms = eps / 2,
  independent coins, one coin per sample, dt = eps / 4. Its cost is the solve's; the pilot's (k level
  evaluations per step and pilot path, per path of the run) is recorded beside it as "pilot_cost", not in it;
- fit: over the same accuracies as the primary; EM likewise;
- targets (gamma = 3 only):
  T7  mlem_adaptive's exponent in [2.6, 3.4] (point estimate: within 0.4 of 3);
  T8  EM's cost over mlem_adaptive's at mlem_adaptive's smallest error >= 10 (the headline's rule).

EXPLORATORY, measured on the same paths, reported beside the headline but never used for it (no maximum over
them is taken): the Poisson-jump solver with Theorem 1's rates; Theorem 1 with comonotone coins (unbiased) and
with stratified coins (lower variance, biased path); Theorem 1's constant times 0.1 with independent and with
stratified coins; inverse cost per unit time, p_l = min(1, eps^-gamma dt / C_l).

    python benchmarks/toy_scaling.py --quick   # ~2 minutes, writes results/toy_scaling_quick.json
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
PRIMARY, ADAPTIVE = "mlem_theorem1", "mlem_adaptive"
EXPLORATORY = ("poisson_theorem1", "mlem_theorem1_comonotone", "mlem_theorem1_stratified", "mlem_theorem1_x0.1",
               "mlem_theorem1_x0.1_stratified", "mlem_inverse_cost")
METHODS = ("em", PRIMARY, ADAPTIVE) + EXPLORATORY
ML_METHODS = METHODS[1:]
BIASED = ("mlem_theorem1_stratified", "mlem_theorem1_x0.1_stratified")  # stratified coins: the path is biased


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

    theorem = mlsde.Theorem1(eps=eps, gamma=gamma)
    p = ladder.drift(theorem).probabilities_at(0.0, dt_ml)  # Theorem 1's p depend on dt only
    out = {"eps": eps, "k": k, "p_theorem1": p.tolist(), "fitted": bool((p < 1).any())}
    top = ladder.levels[-1]
    out["em"] = measure(mlsde.MultilevelSDE(top, sigma), eps, stats_cost=lambda s: s.evaluations[0] * ladder.costs[-1])
    for name, coins in ((PRIMARY, "independent"), ("mlem_theorem1_comonotone", "comonotone"),
                        ("mlem_theorem1_stratified", "stratified")):
        drift = ladder.drift(theorem, coupling="sample", coins=coins)
        out[name] = measure(mlsde.MultilevelSDE(drift, sigma), dt_ml)
    tenth = mlsde.Theorem1(eps=eps, gamma=gamma, scale=0.1)
    for name, coins in (("mlem_theorem1_x0.1", "independent"), ("mlem_theorem1_x0.1_stratified", "stratified")):
        out[name] = measure(mlsde.MultilevelSDE(ladder.drift(tenth, coupling="sample", coins=coins), sigma), dt_ml)
    inverse = mlsde.InverseCost(c=eps**-gamma, per_unit_time=True)
    out["mlem_inverse_cost"] = measure(mlsde.MultilevelSDE(ladder.drift(inverse, coupling="sample"), sigma), dt_ml)
    poisson_drift = ladder.drift(theorem, coupling="sample")
    out["poisson_theorem1"] = measure(mlsde.MultilevelSDE(poisson_drift, sigma), dt_ml, method="poisson")
    start = time.perf_counter()  # last, on its own seeds: the methods above do not see it
    pilot = mlsde.Adaptive.pilot(ladder.levels, y0, 0.0, T, dt_ml, diffusion=sigma, seed=seed + 1)
    adaptive = pilot.scaled(dt_ml, ladder.costs, rms=eps / 2)
    pilot_seconds = time.perf_counter() - start
    out[ADAPTIVE] = measure(mlsde.MultilevelSDE(ladder.drift(adaptive, coupling="sample"), sigma), dt_ml)
    out[ADAPTIVE].update(pilot_cost=pilot.times.numel() * float(sum(ladder.costs)), pilot_seconds=pilot_seconds,
                         c=adaptive.c)
    return out


def fit(points: list, method: str) -> dict:
    """Cost exponent of ``method`` over ``points`` (the pre-registered accuracies), with its 95 % interval."""
    errors = [p[method]["error"] for p in points]
    costs = [p[method]["cost"] for p in points]
    f = mlsde.cost_exponent(errors, costs)
    half = (f.interval[1] - f.interval[0]) / 2
    return {"exponent": f.slope, "interval": list(f.interval), "half_width": half, "intercept": f.intercept,
            "points": len(errors), "eps": [p["eps"] for p in points]}


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


def _inside(value: float, interval) -> bool:
    return interval[0] <= value <= interval[1]


def targets(gamma: float, fits: dict, predicted: float, speedups: dict) -> dict:
    """The pre-registered targets (module docstring): {name: {"holds": bool, "what": str}}."""
    em, ml = fits["em"], fits[PRIMARY]
    out = {
        "T1": (_inside(gamma + 1, em["interval"]), f"EM exponent {em['exponent']:.2f} "
               f"[{em['interval'][0]:.2f}, {em['interval'][1]:.2f}] contains gamma + 1 = {gamma + 1:g}"),
        "T2": (_inside(max(gamma, 2.0), ml["interval"]), f"ML-EM exponent {ml['exponent']:.2f} "
               f"[{ml['interval'][0]:.2f}, {ml['interval'][1]:.2f}] contains max(gamma, 2) = {max(gamma, 2.0):g}"),
        "T3": (_inside(predicted, ml["interval"]), f"ML-EM exponent's interval contains Theorem 1's finite-k "
               f"prediction {predicted:.2f}"),
        "T4": (ml["exponent"] < em["exponent"] - 0.4, f"ML-EM exponent {ml['exponent']:.2f} < EM's "
               f"{em['exponent']:.2f} - 0.4 (gap {em['exponent'] - ml['exponent']:.2f} +- "
               f"{math.hypot(em['half_width'], ml['half_width']):.2f}, the intervals combined as if independent)"),
    }
    if gamma == 3.0:
        out["T5"] = (3.0 <= ml["exponent"] <= 3.4, f"ML-EM exponent {ml['exponent']:.2f} in [3, 3.4]")
        ad, speedup = fits[ADAPTIVE], speedups[ADAPTIVE]
        out["T7"] = (2.6 <= ad["exponent"] <= 3.4, f"{ADAPTIVE} exponent {ad['exponent']:.2f} in [2.6, 3.4]")
        out["T8"] = (speedup >= 10, f"EM / {ADAPTIVE} cost at its smallest error {speedup:.2f}x >= 10")
    if gamma < 2:
        out["T6"] = (_inside(2.0, ml["interval"]), "ML-EM exponent's interval contains 2")
    return {name: {"holds": bool(holds), "what": what} for name, (holds, what) in out.items()}


def summarise(gamma: float, points: list) -> dict:
    fitted = [p for p in points if p["fitted"]]
    fits = {m: fit(fitted, m) for m in METHODS}
    # Theorem 1's cost grows like G_k^2 / eps^2: over few levels G_k is far from its asymptote
    g = [mlsde.Theorem1(eps=p["eps"], gamma=gamma).G_k for p in fitted]
    predicted = 2.0 + 2 * math.log(g[-1] / g[0]) / math.log(fitted[0]["eps"] / fitted[-1]["eps"])
    last = fitted[-1]
    speedups = {m: cost_at_error(fitted, "em", last[m]["error"]) / last[m]["cost"] for m in ML_METHODS}
    headline = speedups[PRIMARY]
    exploratory = {m: speedups[m] for m in EXPLORATORY}
    return {
        "gamma": gamma,
        "fitted_eps": [p["eps"] for p in fitted],
        "fits": fits,
        "theory": {"em": gamma + 1, "mlem": max(gamma, 2.0), "mlem_theorem1_over_fitted_k": predicted},
        "targets": targets(gamma, fits, predicted, speedups),
        "headline_speedup_at_min_error": headline,
        "min_error_mlem": last[PRIMARY]["error"],
        # EM's cost there is extrapolated past EM's smallest error when ML-EM's is smaller (by this factor)
        "em_extrapolated_by": max(1.0, min(p["em"]["error"] for p in fitted) / last[PRIMARY]["error"]),
        "adaptive_speedup_at_min_error": speedups[ADAPTIVE],  # its solve's cost; the pilot's is beside it
        "min_error_adaptive": last[ADAPTIVE]["error"],
        "adaptive_em_extrapolated_by": max(1.0, min(p["em"]["error"] for p in fitted) / last[ADAPTIVE]["error"]),
        "adaptive_pilot_cost_at_min_error": last[ADAPTIVE]["pilot_cost"],
        "exploratory_speedups_at_min_error": exploratory,
        "points": points,
    }


def plot(summaries: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.4 * len(summaries), 4.2), squeeze=False)
    styles = {"em": ("o-", 1.8), PRIMARY: ("s-", 1.8), ADAPTIVE: ("*-", 1.8), "poisson_theorem1": ("x:", 0.8),
              "mlem_theorem1_comonotone": ("P:", 0.8), "mlem_theorem1_stratified": ("^:", 0.8),
              "mlem_theorem1_x0.1": ("D:", 0.8), "mlem_theorem1_x0.1_stratified": ("v:", 0.8),
              "mlem_inverse_cost": ("d:", 0.8)}
    for ax, s in zip(axes[0], summaries):
        for m in METHODS:
            style, width = styles[m]
            fitted = [p for p in s["points"] if p["fitted"]]
            label = m + (" †" if m in BIASED else "") + f" ({s['fits'][m]['exponent']:.2f})"
            line, = ax.loglog([p[m]["error"] for p in fitted], [p[m]["cost"] for p in fitted], style, lw=width,
                              ms=4, label=label)
            skipped = [p for p in s["points"] if not p["fitted"]]
            if skipped:  # not fitted (every p = 1): hollow
                ax.loglog([p[m]["error"] for p in skipped], [p[m]["cost"] for p in skipped], style[0],
                          mfc="none", color=line.get_color(), ms=4)
        e = np.array([p["em"]["error"] for p in s["points"] if p["fitted"]])
        anchor = next(p for p in s["points"] if p["fitted"])[PRIMARY]
        for slope, style, label in ((s["theory"]["em"], "--", "slope γ+1"), (s["theory"]["mlem"], "-.", "slope max(γ,2)")):
            ax.loglog(e, anchor["cost"] * (e / anchor["error"]) ** -slope, "k" + style, lw=0.6, label=label)
        ax.set_title(f"γ = {s['gamma']}")
        ax.set_xlabel("RMS error at T")
        ax.set_ylabel("cost per path")
        ax.invert_xaxis()
        ax.legend(fontsize=5.5)
    fig.suptitle(f"bold: EM and the pre-registered ML-EM ({PRIMARY}, {ADAPTIVE}); dotted: exploratory; "
                 "† biased path; hollow: not fitted (every p = 1)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _interval(f: dict) -> str:
    return f"{f['exponent']:.2f} [{f['interval'][0]:.2f}, {f['interval'][1]:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced size (~2 minutes)")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.5, 2.5, 3.0, 4.0])
    parser.add_argument("--paths", type=int, default=None)
    parser.add_argument("--d", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = args.paths or (256 if args.quick else 1024)
    exps = range(2, 7) if args.quick else range(2, 9)
    fine_exp = 10 if args.quick else 12
    torch.set_num_threads(1)
    started = time.perf_counter()
    summaries = []
    for gamma in args.gammas:
        points = []
        for j in exps:
            points.append(run_accuracy(gamma, j, paths, args.d, args.seed, fine_exp))
            p = points[-1]
            print(f"gamma={gamma} eps=2^-{j} (min p {min(p['p_theorem1']):.3g}{'' if p['fitted'] else ', not fitted'}): "
                  + "  ".join(f"{m}: err {p[m]['error']:.3g} cost {p[m]['cost']:.3g}" for m in METHODS), flush=True)
        summaries.append(summarise(gamma, points))
        s = summaries[-1]
        print(f"gamma={gamma}, fitted over eps = {', '.join(f'2^{round(math.log2(e))}' for e in s['fitted_eps'])}: "
              f"EM {_interval(s['fits']['em'])} (theory {gamma + 1:g}); ML-EM [{PRIMARY}] {_interval(s['fits'][PRIMARY])} "
              f"(asymptotic {max(gamma, 2.0):g}, Theorem 1 over these k {s['theory']['mlem_theorem1_over_fitted_k']:.2f}); "
              f"EM/ML-EM cost at ML-EM's smallest error {s['headline_speedup_at_min_error']:.2f}x (EM extrapolated to an "
              f"error {s['em_extrapolated_by']:.2f}x below its smallest)", flush=True)
        print(f"  second pre-registered [{ADAPTIVE}]: {_interval(s['fits'][ADAPTIVE])}; EM/{ADAPTIVE} cost at its "
              f"smallest error {s['adaptive_speedup_at_min_error']:.2f}x (EM extrapolated by "
              f"{s['adaptive_em_extrapolated_by']:.2f}x); its pilot costs {s['adaptive_pilot_cost_at_min_error']:.3g} "
              f"per path there, not included", flush=True)
        for name, t in s["targets"].items():
            print(f"  {name} {'holds' if t['holds'] else 'FAILS'}: {t['what']}", flush=True)
        print("  exploratory (not pre-registered): " + "; ".join(
            f"{m}{' (biased path)' if m in BIASED else ''} {_interval(s['fits'][m])}, "
            f"{s['exploratory_speedups_at_min_error'][m]:.2f}x" for m in EXPLORATORY), flush=True)
    name = "toy_scaling_quick" if args.quick else "toy_scaling"
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/toy_scaling.py" + (" --quick" if args.quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "pre_registered": {"variant": PRIMARY, "fit": "accuracies where the variant has some p < 1; EM over the same",
                           "targets": "T1-T6 of the module docstring",
                           "second_variant": ADAPTIVE, "second_targets": "T7-T8 of the module docstring (gamma = 3)",
                           "second_variant_cost": "the solve's; the pilot's is each point's pilot_cost",
                           "exploratory": list(EXPLORATORY), "biased_path": list(BIASED)},
        "settings": {"paths": paths, "d": args.d, "eps": [2.0**-j for j in exps], "fine_dt": 2.0**-fine_exp,
                     "ml_dt": "eps/4", "em_dt": "eps", "seed": args.seed, "T": 1.0, "sigma": 1.0,
                     "adaptive": "pilot on the run's ladder and y0 at dt = eps/4, seed + 1; rms = eps/2"},
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
