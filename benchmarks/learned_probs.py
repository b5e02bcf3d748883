"""Learned time-dependent probabilities (spec §8) against fixed ones, on synthetic HTMC ladders.

Problems (``problems.htmc_ladder(k=4, gamma=3, d=2)``: |f^l - f| <= 2^-l, cost (2^l)^gamma = 8, 64, 512, 4096
per sample; SDE dX = F dt + dW on [0, T], N uniform steps):

- ``htmc``: the ladder as is. Its level errors are constant in time and follow the cost law exactly, so the
  power law alpha = 1 + gamma/2 is already the optimal level profile (spec §6): little is left to learn
  beyond the time profile that the contraction of the drift gives (theory: under 10% for T = 1).
- ``htmc_time_varying``: the same levels with their errors scaled by w(t) = 2^(4t/T - 2) (1/4 at the start, 4
  at the end), as a denoiser's error varies with the noise level. Fixed probabilities cannot follow that;
  learned p_l(t) can (theory bound for the time profile alone: about 1.8x).

The reference of every path is EM with the top level on the same grid and Brownian path (the paper's: the
largest model, all steps, same noise), so the error is the ML-EM error alone: MSE = mean over paths of
||X_T - X_T^ref||^2.

Protocol (honest evaluation):
- a learning set (initial points and Brownian paths from one seed) is used to set lambda (so that the start
  is balanced, error = lambda * cost), to fit the Sigmoid schedule (``learning.fit_probabilities``: the
  combined REINFORCE + forward-gradient estimator with per-sample coins) and to select best-of-15 batch coin
  patterns;
- every reported number comes from a held-out set (other seeds), with the same paths and the same coin seed
  for every method: the learned schedule swept by Delta (a_l + Delta), inverse-cost probabilities
  p_l = min(1, c / C_l) (alpha = gamma) swept by c, and the power law alpha = 1 + gamma/2,
  p_l = min(1, c C_l^(-alpha/gamma)), swept by c. Costs are realised costs per path by the exact rule.
- "compute saved at equal error": each curve's Pareto front is interpolated log-log; the ratio of costs at
  equal held-out MSE is reported at the learned schedule's own point (Delta = 0, the trade-off it was trained
  for) and over the range of errors both curves reach (geometric mean, min, max).

    python benchmarks/learned_probs.py --quick   # < 1 minute, writes results/learned_probs_quick.{json,png}
    python benchmarks/learned_probs.py           # a few minutes, writes results/learned_probs.{json,png}
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
from multilevel_sde import learning as L
from multilevel_sde.problems import htmc_drift, htmc_ladder

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = ("htmc", "htmc_time_varying")


class TimeVaryingLevel:
    """``f(x) + w(t) (f^l(t, x) - f(x))`` with ``w(t) = 2^(4 t / T - 2)`` (from 1/4 to 4): a level whose error
    grows along the solve, as a denoiser's error varies with the noise level."""

    def __init__(self, level, T: float):
        self.level, self.T = level, T
        self.__name__ = f"time_varying_{getattr(level, '__name__', 'level')}"

    def __call__(self, t, y):
        f = htmc_drift(t, y)
        return f + 2.0 ** (4.0 * t / self.T - 2.0) * (self.level(t, y) - f)


def make_problem(k: int, gamma: float, d: int, T: float, steps: int, sigma: float, ladder_seed: int,
                 time_varying: bool = False):
    ladder = htmc_ladder(k, gamma, d, seed=ladder_seed)
    if time_varying:
        ladder.levels = [TimeVaryingLevel(level, T) for level in ladder.levels]
    drift = ladder.drift([1.0] * k)
    problem = L.LearningProblem(drift, mlsde.MultilevelSDE(drift, sigma), t1=T, dt=T / steps)
    return problem, ladder


def make_paths(problem: L.LearningProblem, n: int, d: int, T: float, steps: int, seed: int) -> L.PathSet:
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    bm = mlsde.GridBrownian(t0=0.0, t1=T, dt=T / steps, size=(n, d), seed=seed, dtype=torch.float64)
    return problem.paths(y0, bm)  # reference: EM with the top level on the same path


# -- curves ----------------------------------------------------------------------------------------
def pareto(points: list) -> list:
    """The points (error > 0) that no cheaper point beats in error, sorted by cost."""
    front, best = [], math.inf
    for p in sorted((p for p in points if p["error"] > 0), key=lambda q: q["cost"]):
        if p["error"] < best:
            front.append(p)
            best = p["error"]
    return front


def cost_at_error(front: list, error: float):
    """Cost on a Pareto front at ``error`` by log-log interpolation (None outside its error range)."""
    errs = np.log([p["error"] for p in front])[::-1]  # increasing error
    costs = np.log([p["cost"] for p in front])[::-1]
    x = math.log(error)
    if x < errs[0] - 1e-12 or x > errs[-1] + 1e-12:
        return None
    return float(math.exp(np.interp(x, errs, costs)))


def savings(learned: list, baseline: list, at_error=None, grid_points: int = 25) -> dict:
    """Cost ratio baseline / learned at equal error over the common error range of the two Pareto fronts
    (and at ``at_error`` when given and inside it)."""
    fl, fb = pareto(learned), pareto(baseline)
    lo = max(min(p["error"] for p in fl), min(p["error"] for p in fb))
    hi = min(max(p["error"] for p in fl), max(p["error"] for p in fb))
    if not lo < hi:
        return {"range": None}
    errors = np.exp(np.linspace(math.log(lo), math.log(hi), grid_points))
    ratios = [cost_at_error(fb, e) / cost_at_error(fl, e) for e in errors]
    out = {
        "range": [lo, hi],
        "errors": errors.tolist(),
        "ratios": ratios,
        "geometric_mean_ratio": float(np.exp(np.mean(np.log(ratios)))),
        "min_ratio": float(min(ratios)),
        "max_ratio": float(max(ratios)),
    }
    if at_error is not None and lo <= at_error <= hi:
        out["at_error"] = at_error
        out["ratio_at_error"] = cost_at_error(fb, at_error) / cost_at_error(fl, at_error)
    return out


def sweep_fixed(problem, heldout, make_schedule, values, seed):
    out = []
    for c in values:
        ev = L.evaluate(problem, make_schedule(c), heldout, seed=seed)
        out.append({"c": c, **ev.as_dict()})
    return out


def _fmt(points):
    return "  ".join(f"({p['cost']:.3g}, {p['error']:.3g})" for p in sorted(points, key=lambda q: q["cost"]))


def run_problem(name: str, args, cfg: dict, log) -> dict:
    T, steps, d = args.T, cfg["steps"], args.d
    problem, ladder = make_problem(args.k, args.gamma, d, T, steps, 1.0, args.seed, name == "htmc_time_varying")
    learn = make_paths(problem, cfg["learn"], d, T, steps, seed=1000 + args.seed)
    heldout = make_paths(problem, cfg["heldout"], d, T, steps, seed=2000 + args.seed)
    assert not torch.isin(heldout.y0[:, 0], learn.y0[:, 0]).any()  # disjoint sets
    costs = torch.tensor(ladder.costs, dtype=torch.float64)
    eval_seed = 7
    alpha = 1 + args.gamma / 2

    initial = L.sigmoid_from_probabilities(mlsde.PowerLaw(args.init_c, alpha, gamma=args.gamma), costs=ladder.costs,
                                           time_scale=1.0 / T)
    start_eval = L.evaluate(problem, initial, learn, seed=3)  # on the learning set: sets lam
    lam = args.lam if args.lam is not None else start_eval.error / start_eval.theory_cost
    log(f"[{name}] costs {ladder.costs}; N={steps}, T={T}; learning set {cfg['learn']}, held-out {cfg['heldout']}; "
        f"lam={lam:.4g}; start p = {[round(x, 4) for x in initial(0.0, None, costs).tolist()]}")

    fits, fit_seconds = {}, {}
    variants = [("baseline" if args.baseline else "plain", args.baseline)]
    if cfg["compare_baseline"] and name == "htmc_time_varying":  # the same fit with the other REINFORCE variant
        variants.append(("plain", False) if args.baseline else ("baseline", True))
    for label, use_baseline in variants:
        t0 = time.perf_counter()
        fits[label] = L.fit_probabilities(
            problem, initial, learn, lam=lam, steps=cfg["sgd_steps"], batch=cfg["batch"], lr=cfg["lr"],
            optimizer=args.optimizer, baseline=use_baseline, seed=args.seed,
            callback=lambda i, r: log(f"  sgd {i:2d}: objective {r['objective']:.4g} (mse {r['error']:.3g} + reg "
                                      f"{r['regulariser']:.3g}), realised cost {r['cost']:.4g}")
            if i % 5 == 4 else None)
        fit_seconds[label] = time.perf_counter() - t0
    fit = fits[variants[0][0]]  # the reported schedule
    learned = fit.schedule
    log(f"[{name}] fit {fit_seconds[variants[0][0]]:.1f}s: a = {[round(x, 2) for x in learned.a.tolist()]}, "
        f"b = {[round(x, 2) for x in learned.b.tolist()]}")

    def objective(schedule):
        ev = L.evaluate(problem, schedule, heldout, seed=eval_seed)
        return {"objective": ev.error + lam * ev.theory_cost, **ev.as_dict()}

    objectives = {"initial": objective(initial), **{f"learned_{k}": objective(f.schedule) for k, f in fits.items()}}
    for k, v in objectives.items():
        log(f"[{name}] held-out objective {k}: {v['objective']:.4g} (mse {v['error']:.3g}, cost {v['cost']:.4g})")

    deltas = [float(x) for x in np.linspace(-4, 4, cfg["deltas"])]
    sweep = L.delta_sweep(learned, deltas, lambda s: L.evaluate(problem, s, heldout, seed=eval_seed))
    curves = {"learned": [pt.as_dict() for pt in sweep]}
    cs = [float(2.0**j) for j in np.arange(-1, 13.01, cfg["c_step"])]
    curves["inverse_cost"] = sweep_fixed(problem, heldout, lambda c: mlsde.InverseCost(c), cs, eval_seed)
    curves["power_law"] = sweep_fixed(problem, heldout, lambda c: mlsde.PowerLaw(c, alpha, gamma=args.gamma),
                                      [c * 2.0 ** (alpha - args.gamma) for c in cs], eval_seed)
    best_curve = []
    if args.best_of > 0:  # best-of-N batch patterns: selected on the learning set, evaluated held out
        for pt in sweep[:: cfg["best_stride"]]:
            best = L.best_of_n(problem, pt.schedule, learn, n=args.best_of, seed=args.seed)
            draws = [L.evaluate(problem, pt.schedule, heldout, coupling="batch", coins=pattern)
                     for pattern in best.patterns]
            held = draws[best.index]
            best_curve.append({"delta": pt.delta, **held.as_dict(), "selection_errors": best.errors,
                               "selected": best.index, "heldout_errors_of_all_draws": [e.error for e in draws],
                               "mean_single_draw_error": float(np.mean([e.error for e in draws])),
                               "median_single_draw_error": float(np.median([e.error for e in draws])),
                               "mean_single_draw_cost": float(np.mean([e.cost for e in draws]))})
        curves["learned_best_of_n"] = best_curve
    for key, pts in curves.items():
        log(f"[{name}] {key} (cost, mse): {_fmt(pts)}")

    at = next(p["error"] for p in curves["learned"] if p["delta"] == 0.0)
    saved = {key: savings(curves["learned"], curves[key], at_error=at) for key in ("inverse_cost", "power_law")}
    for key, s in saved.items():
        if s["range"]:
            log(f"[{name}] compute saved by the learned schedule vs {key} at equal held-out MSE: "
                f"{s.get('ratio_at_error', float('nan')):.2f}x at its trained point (MSE {at:.3g}); over MSE in "
                f"[{s['range'][0]:.3g}, {s['range'][1]:.3g}]: geometric mean {s['geometric_mean_ratio']:.2f}x "
                f"(min {s['min_ratio']:.2f}x, max {s['max_ratio']:.2f}x)")
    if best_curve:
        ratios = [p["mean_single_draw_error"] / p["error"] for p in best_curve]
        medians = [p["median_single_draw_error"] / p["error"] for p in best_curve]
        saved["best_of_n_error_ratio"] = {"per_delta": ratios, "geometric_mean": float(np.exp(np.mean(np.log(ratios)))),
                                          "vs_median_draw_per_delta": medians,
                                          "vs_median_draw_geometric_mean": float(np.exp(np.mean(np.log(medians))))}
        log(f"[{name}] best-of-{args.best_of} batch pattern (selected on the learning set): held-out MSE "
            f"{saved['best_of_n_error_ratio']['geometric_mean']:.2f}x lower than a plain batch draw's (mean over the "
            f"{args.best_of} draws; geometric mean over Delta; per Delta {[round(r, 2) for r in ratios]}); "
            f"{saved['best_of_n_error_ratio']['vs_median_draw_geometric_mean']:.2f}x lower than the median draw's")

    t_plot = torch.linspace(0.0, T, 50, dtype=torch.float64)
    hist = fit.history
    ratio = float(np.mean([h["reinforce_variance_baseline"] / h["reinforce_variance"] for h in hist]))
    log(f"[{name}] REINFORCE variance with / without the leave-one-out baseline (mean over SGD steps): {ratio:.3f}")
    return {
        "settings": {"k": args.k, "gamma": args.gamma, "d": d, "T": T, "steps": steps, "sigma": 1.0,
                     "time_varying": name == "htmc_time_varying", "costs": ladder.costs,
                     "learn_paths": cfg["learn"], "heldout_paths": cfg["heldout"], "learn_seed": 1000 + args.seed,
                     "heldout_seed": 2000 + args.seed, "eval_coin_seed": eval_seed, "lam": lam,
                     "init": f"power law alpha={alpha}, c={args.init_c}", "floor": initial.floor,
                     "time_scale": initial.time_scale, "fit": fit.settings, "deltas": deltas, "cs": cs,
                     "alpha_power_law": alpha, "best_of": args.best_of,
                     "reference": "EM with the top level on the same grid and Brownian path"},
        "em_cost": steps * ladder.costs[-1],
        "fit_seconds": fit_seconds,
        "initial": {"a": initial.a.tolist(), "b": initial.b.tolist(), "learning_set": start_eval.as_dict()},
        "learned": {k: {"a": f.schedule.a.tolist(), "b": f.schedule.b.tolist()} for k, f in fits.items()},
        "heldout_objective": objectives,
        "history": hist,
        "history_other": {k: f.history for k, f in fits.items() if f is not fit},
        "reinforce_variance_ratio_baseline_over_plain": ratio,
        "curves": curves,
        "savings": saved,
        "schedule_plot": {"t": t_plot.tolist(),
                          "learned": learned(t_plot, None, costs).detach().tolist(),
                          "initial": initial(t_plot, None, costs).detach().tolist()},
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["problems"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4.2 * len(names)), squeeze=False)
    styles = {"learned": ("o-", "C0", "learned p_l(t), Δ sweep"),
              "learned_best_of_n": ("*--", "C3", f"learned + best-of-{record['best_of']} batch coins"),
              "inverse_cost": ("s-", "C1", "inverse cost p_l = min(1, c/C_l) (α = γ)"),
              "power_law": ("^-", "C2", "power law α = 1 + γ/2")}
    for row, name in zip(axes, names):
        rec = record["problems"][name]
        ax = row[0]
        for key, (style, color, label) in styles.items():
            pts = [p for p in rec["curves"].get(key, []) if p["error"] > 0]
            if not pts:
                continue
            pts = sorted(pts, key=lambda p: p["cost"])
            ax.loglog([p["cost"] for p in pts], [p["error"] for p in pts], style, color=color, label=label, ms=4)
        best = rec["curves"].get("learned_best_of_n")
        if best:
            pts = sorted(best, key=lambda p: p["mean_single_draw_cost"])
            ax.loglog([p["mean_single_draw_cost"] for p in pts], [p["mean_single_draw_error"] for p in pts], "x:",
                      color="C3", ms=5, label="learned, plain batch draw (mean of the draws)")
        trained = next(p for p in rec["curves"]["learned"] if p["delta"] == 0.0)
        ax.loglog([trained["cost"]], [trained["error"]], "o", mfc="none", mec="k", ms=10, label="learned, Δ = 0")
        ax.axvline(rec["em_cost"], color="k", ls=":", lw=0.8, label="EM with f^k (the reference)")
        ax.set_xlabel("realised cost per path (exact rule)")
        ax.set_ylabel("held-out MSE vs top-level EM")
        s = rec["savings"]["inverse_cost"]
        p = rec["savings"]["power_law"]
        ax.set_title(f"{name}: learned saves {s.get('ratio_at_error', float('nan')):.2f}× (vs α=γ), "
                     f"{p.get('ratio_at_error', float('nan')):.2f}× (vs α=1+γ/2) at Δ = 0", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", lw=0.3)
        ax = row[1]
        times = np.array(rec["schedule_plot"]["t"])
        for l, values in enumerate(rec["schedule_plot"]["learned"]):
            ax.semilogy(times, values, "-", color=f"C{l}", label=f"learned p_{l + 1}(t)")
        for l, values in enumerate(rec["schedule_plot"]["initial"]):
            ax.semilogy(times, values, ":", color=f"C{l}", label=f"start p_{l + 1}")
        ax.set_xlabel("t")
        ax.set_ylabel("p_l(t) at Δ = 0")
        ax.set_title(f"{name}: learned schedule (solid) and its start (dotted)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced size (< 1 minute)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--T", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=32, help="time steps N")
    parser.add_argument("--learn", type=int, default=None, help="paths in the learning set")
    parser.add_argument("--heldout", type=int, default=None, help="paths in the held-out set")
    parser.add_argument("--sgd-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--lam", type=float, default=None, help="default: balanced at the start (error / cost)")
    parser.add_argument("--init-c", type=float, default=16.0, help="start: power law p_l = min(1, c C_l^(-a/g))")
    parser.add_argument("--baseline", type=int, default=1, help="leave-one-out baseline in REINFORCE (1/0)")
    parser.add_argument("--best-of", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    quick = args.quick
    cfg = {
        "steps": args.steps,
        "learn": args.learn or (300 if quick else 1500),
        "heldout": args.heldout or (1000 if quick else 4000),
        "sgd_steps": args.sgd_steps or (15 if quick else 50),
        "batch": args.batch or (100 if quick else 300),
        "lr": args.lr or (0.3 if args.optimizer == "adam" else 0.5),
        "deltas": 9 if quick else 17,
        "c_step": 1.0 if quick else 0.5,
        "best_stride": 2 if quick else 2,
        "compare_baseline": not quick,
    }
    args.baseline = bool(args.baseline)
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = []

    def log(msg):
        if msg is None:
            return
        print(msg, flush=True)
        lines.append(msg)

    problems = {name: run_problem(name, args, cfg, log) for name in args.problems}
    name = "learned_probs_quick" if quick else "learned_probs"
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/learned_probs.py" + (" --quick" if quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "config": cfg, "optimizer": args.optimizer, "best_of": args.best_of, "seed": args.seed,
        "problems": problems,
        "log": lines,
    }
    record["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(record, indent=1))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {record['seconds']:.1f}s")


if __name__ == "__main__":
    main()
