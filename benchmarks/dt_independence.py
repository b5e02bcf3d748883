"""Small steps are free for ML-EM: its cost and its accuracy do not depend on dt, while EM's cost grows as 1/dt.

With probabilities proportional to dt, ``p_l = lambda_l dt`` (Theorem 1's), level l is drawn about ``lambda_l T``
times per path whatever dt is, and as dt -> 0 ML-EM tends to the Poisson-jump solver (``method="poisson"``),
which jumps at the rates ``lambda_l`` and has no dt in its network cost at all.

Setup: ``mlsde.problems.htmc_ladder(k=3, gamma=3, d=4)`` (|f^l - f| <= 2^-l, costs 2^(3l)), diffusion 1, T = 1,
float64, batch 256, ``mlsde.Theorem1(eps=2^-3, gamma=3)`` at its own constant (rates lambda = (636, 112, 20)
per unit time; no p is clipped at the largest dt, which is checked). Step sizes dt = 2^-10 ... 2^-16. Methods:
ML-EM with one coin per sample and one per batch, the Poisson solver (per sample), and plain EM with the top
level f^3. Per dt and seed, every method runs on one Brownian path (a ``GridBrownian`` on the finest step) and
is compared with ``htmc_reference`` (EM of the exact drift on that finest grid) on the same path:

  * cost per path: the realised cost of ``stats`` (``costs[m] * evaluations[m]``), mean +- s.e. over seeds,
    and the library's expected cost; evaluations per level;
  * error: RMS over all paths of |X_T - X_T^ref|, and ML-EM's coin error alone, RMS |X_T - X_T^EM(f^3)| against
    EM with the top level at the same dt on the same path;
  * wall time of one solve with its default noise (``torch.utils.benchmark``, one thread; the median over rounds
    that each time every method at every dt).

Expected: ML-EM's and Poisson's cost and errors flat over dt (the Poisson solver's evaluations identical at every
dt on the same seed: its jumps do not depend on dt); EM's cost ~ 1/dt for an error that stops improving at the
top level's own bias. ML-EM's wall time still grows as 1/dt on these cheap levels (each step draws noise and
coins); the Poisson solver's does not. Usage::

    python benchmarks/dt_independence.py --quick   # seconds: results/dt_independence_quick.json
    python benchmarks/dt_independence.py           # results/dt_independence.json and .png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

import multilevel_sde as mlsde
from run_info import environment
from multilevel_sde.problems import htmc_ladder, htmc_reference

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 4242
METHODS = ("mlem[sample]", "mlem[batch]", "poisson", "em_top")
FLAT = 1.2  # "flat": max / min over dt at most this


def settings(quick: bool) -> dict:
    cfg = {"k": 3, "gamma": 3.0, "d": 4, "sigma": 1.0, "T": 1.0, "batch": 256, "dt_exponents": [10, 12, 14, 16],
           "seeds": 4, "rounds": 3, "min_run_time": 0.2, "threads": 1}
    if quick:
        cfg.update(batch=64, dt_exponents=[10, 12], seeds=2, rounds=2, min_run_time=0.05)
    return cfg


def spread(values) -> float:
    """max / min of positive values (1 when all are equal)."""
    values = [float(v) for v in values]
    return 1.0 if max(values) == min(values) else max(values) / min(values)


def loglog_slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


class Problem:
    """The ladder, the schedule, and one ``MultilevelSDE`` per method."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.ladder = htmc_ladder(cfg["k"], cfg["gamma"], cfg["d"], seed=0)
        self.schedule = mlsde.Theorem1(eps=2.0 ** -cfg["k"], gamma=cfg["gamma"])
        self.dts = [2.0**-j for j in cfg["dt_exponents"]]
        p_max = [float(r) * max(self.dts) for r in self.schedule.rates()]
        if max(p_max) > 1:
            raise ValueError(f"p = {p_max} at dt = {max(self.dts)}: clipped; use smaller steps")
        sigma = cfg["sigma"]
        self.sdes = {
            "mlem[sample]": mlsde.MultilevelSDE(self.ladder.drift(self.schedule, coupling="sample"), sigma),
            "mlem[batch]": mlsde.MultilevelSDE(self.ladder.drift(self.schedule, coupling="batch"), sigma),
            "poisson": mlsde.MultilevelSDE(self.ladder.drift(self.schedule, coupling="sample"), sigma),
            "em_top": mlsde.MultilevelSDE(self.ladder.levels[-1], sigma),
        }

    def solve(self, method: str, y0, dt: float, seed: int, bm=None):
        """(X_T, cost per path, expected cost per path, evaluations per level) of one solve."""
        ys, stats = mlsde.sdeint(self.sdes[method], y0, [0.0, self.cfg["T"]], bm=bm, dt=dt, seed=seed,
                                 method="poisson" if method == "poisson" else "euler", return_stats=True)
        n = y0.shape[0]
        if method == "em_top":  # a plain drift's stats count evaluations, not costs
            cost = stats.evaluations[0] * self.ladder.costs[-1] / n
            return ys[-1], cost, cost, [0] * (self.cfg["k"] - 1) + list(stats.evaluations)
        return ys[-1], stats.cost / n, stats.expected_cost / n, list(stats.evaluations)


def accuracy_and_cost(problem: Problem, log=print) -> dict:
    cfg = problem.cfg
    shape = (cfg["batch"], cfg["d"])
    raw = {m: {dt: {"sq_err": [], "sq_coin_err": [], "cost": [], "expected_cost": [], "evaluations": []}
               for dt in problem.dts} for m in METHODS}
    for s in range(cfg["seeds"]):
        seed = SEED + s
        y0 = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        bm = mlsde.GridBrownian(t0=0.0, t1=cfg["T"], dt=min(problem.dts), size=shape, seed=seed, dtype=torch.float64)
        reference = htmc_reference(y0, cfg["T"], bm, cfg["sigma"])
        for dt in problem.dts:
            results = {m: problem.solve(m, y0, dt, seed, bm) for m in METHODS}
            top = results["em_top"][0]
            for m, (x, cost, expected, evaluations) in results.items():
                r = raw[m][dt]
                r["sq_err"].append(float(((x - reference) ** 2).sum(-1).mean()))
                r["sq_coin_err"].append(float(((x - top) ** 2).sum(-1).mean()))
                r["cost"].append(cost)
                r["expected_cost"].append(expected)
                r["evaluations"].append(evaluations)
        log(f"    seed {s + 1}/{cfg['seeds']} done")
    out = {}
    for m in METHODS:
        rows = []
        for dt in problem.dts:
            r = raw[m][dt]
            n = len(r["cost"])
            rows.append({
                "dt": dt, "steps": round(cfg["T"] / dt),
                "cost_per_path": statistics.fmean(r["cost"]),
                "cost_per_path_se": statistics.stdev(r["cost"]) / math.sqrt(n) if n > 1 else float("nan"),
                "expected_cost_per_path": statistics.fmean(r["expected_cost"]),
                "rms_error": math.sqrt(statistics.fmean(r["sq_err"])),
                "rms_coin_error": math.sqrt(statistics.fmean(r["sq_coin_err"])),
                "evaluations_per_path": [float(e) / cfg["batch"] for e in np.mean(r["evaluations"], axis=0)],
                "raw": r})
        out[m] = {"rows": rows}
    # the Poisson solver's jumps do not depend on dt: the same evaluations on the same seed at every dt
    evals = [[tuple(e) for e in raw["poisson"][dt]["evaluations"]] for dt in problem.dts]
    out["poisson"]["evaluations_identical_over_dt"] = all(e == evals[0] for e in evals)
    return out


def wall_times(problem: Problem, log=print) -> dict:
    """Median over rounds of one solve's wall time with its default noise, per method and dt. Each (method, dt) is
    warmed up by one call that also sizes its block (``min_run_time``); a round is one ``Timer.timeit`` of every
    block, so a burst of load on a shared machine touches every dt alike."""
    cfg = problem.cfg
    y0 = torch.randn(cfg["batch"], cfg["d"], generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    keys = [(m, dt) for dt in problem.dts for m in METHODS]
    timers = {(m, dt): benchmark.Timer("fn()", globals={"fn": torch.no_grad()(
        lambda m=m, dt=dt: problem.solve(m, y0, dt, SEED))}, label=m, num_threads=1) for m, dt in keys}
    number = {key: max(1, round(cfg["min_run_time"] / t.timeit(1).median)) for key, t in timers.items()}
    rounds = {key: [] for key in keys}
    for r in range(cfg["rounds"]):
        for key in keys:
            rounds[key].append(timers[key].timeit(number[key]).median)
        log(f"    round {r + 1}/{cfg['rounds']} done")
    return {m: [statistics.median(rounds[m, dt]) for dt in problem.dts] for m in METHODS}


def summarise(problem: Problem, acc: dict, wall: dict) -> dict:
    dts = problem.dts
    summary = {}
    for m in METHODS:
        rows = acc[m]["rows"]
        for row, seconds in zip(rows, wall[m]):
            row["wall_s"] = seconds
            row["wall_us_per_step"] = seconds / row["steps"] * 1e6
        costs = [r["cost_per_path"] for r in rows]
        s = {"cost_spread": spread(costs), "cost_slope": loglog_slope(dts, costs),
             "expected_cost_spread": spread([r["expected_cost_per_path"] for r in rows]),
             "rms_error_spread": spread([r["rms_error"] for r in rows]),
             "wall_spread": spread(wall[m]), "wall_slope": loglog_slope(dts, wall[m])}
        if m != "em_top":
            s["rms_coin_error_spread"] = spread([r["rms_coin_error"] for r in rows])
            s["cost_flat"] = s["expected_cost_spread"] <= FLAT
        summary[m] = s
    summary["poisson"]["evaluations_identical_over_dt"] = acc["poisson"]["evaluations_identical_over_dt"]
    summary["poisson"]["wall_flat"] = summary["poisson"]["wall_spread"] <= FLAT
    return summary


def report(res: dict) -> None:
    cfg = res["settings"]
    print(f"\nhtmc ladder k={cfg['k']}, gamma={cfg['gamma']}, batch {cfg['batch']}, Theorem1 rates "
          f"{[round(r, 1) for r in res['rates']]}, {cfg['seeds']} seeds, {cfg['threads']} thread")
    print(f"  {'method':13s} {'dt':>9s} {'cost/path':>11s} {'+-se':>9s} {'expected':>11s} {'RMS err':>8s} "
          f"{'coin err':>8s} {'wall ms':>9s} {'us/step':>8s}  evaluations/path")
    for m in METHODS:
        for r in res["methods"][m]["rows"]:
            print(f"  {m:13s} {'2^' + str(round(math.log2(r['dt']))):>9s} {r['cost_per_path']:11.4g} "
                  f"{r['cost_per_path_se']:9.3g} {r['expected_cost_per_path']:11.4g} {r['rms_error']:8.4f} "
                  f"{r['rms_coin_error']:8.4f} {r['wall_s'] * 1e3:9.1f} {r['wall_us_per_step']:8.1f}  "
                  + " ".join(f"{e:.1f}" for e in r["evaluations_per_path"]))
    print("\n  max/min over dt (log-log slope in dt):")
    for m, s in res["summary"].items():
        extra = f", coin error {s['rms_coin_error_spread']:.2f}" if "rms_coin_error_spread" in s else ""
        print(f"  {m:13s} cost {s['cost_spread']:.2f} (slope {s['cost_slope']:+.2f}), expected cost "
              f"{s['expected_cost_spread']:.2f}, RMS error {s['rms_error_spread']:.2f}{extra}, wall "
              f"{s['wall_spread']:.2f} (slope {s['wall_slope']:+.2f})")
    p = res["summary"]["poisson"]
    print(f"  Poisson: evaluations identical at every dt on each seed: {p['evaluations_identical_over_dt']}; "
          f"wall time flat (<= {FLAT}x): {p['wall_flat']}")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("cost_per_path", "cost per path"), ("rms_error", "RMS error at T"), ("wall_s", "wall time (s)"))
    for ax, (key, label) in zip(axes, panels):
        for m in METHODS:
            rows = res["methods"][m]["rows"]
            ax.plot([r["dt"] for r in rows], [r[key] for r in rows], "o-", label=m)
        ax.set_xscale("log")
        if key == "rms_error":
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("dt")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"htmc ladder k={res['settings']['k']}, gamma={res['settings']['gamma']}, Theorem 1 rates; "
                 "ML-EM's cost and error do not depend on dt", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, cfg: dict | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two step sizes, batch 64, seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: results/dt_independence[_quick].json; the PNG beside it)")
    args = parser.parse_args(argv)
    cfg = {**settings(args.quick), **(cfg or {})}
    torch.set_num_threads(cfg["threads"])
    problem = Problem(cfg)
    print("accuracy and cost on shared paths")
    acc = accuracy_and_cost(problem)
    print("wall time of one solve, default noise")
    wall = wall_times(problem)
    res = {"benchmark": "dt_independence", "quick": args.quick, "settings": cfg, "environment": environment(),
           "rates": [float(r) for r in problem.schedule.rates()], "costs": list(problem.ladder.costs),
           "p_at_largest_dt": [float(r) * max(problem.dts) for r in problem.schedule.rates()],
           "summary": summarise(problem, acc, wall), "methods": acc}
    report(res)
    out = args.out or RESULTS / ("dt_independence_quick.json" if args.quick else "dt_independence.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
