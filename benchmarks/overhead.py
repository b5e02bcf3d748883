"""What the library costs beyond the user's own drift: the guard rails of issue #18, on ``torch.utils.benchmark``.

(a) Plain Euler–Maruyama, ``mlsde.sdeint`` against ``torchsde.sdeint(method="euler")`` on the same SDE, a
    1000-dimensional Ornstein–Uhlenbeck process ``dX = -X dt + dW`` (diagonal noise, float32, batch 256,
    dt = 1e-3 on [0, 1], outputs at ``ts = [0, 1]``):
      * each with its default noise (ours: a seeded ``GridBrownian``; torchsde: a ``BrownianInterval``) --
        target: ours >= 2x faster;
      * both reading one shared ``GridBrownian(cache="all")`` -- the results must be bit-identical
        (checked with ``torch.equal``), and the ratio shows the solver loops alone.
(b) ML-EM bookkeeping: four MLP levels (widths 64, 128, 256, 512; d = 64, batch 256) in a ``MultilevelDrift``
    with p = (1, 1/2, 1/4, 1/8) inside a ``MultilevelSDE`` (diffusion 1, dt = 1e-3, 1000 steps), one coin per
    batch and one per sample. Timed side by side:
      * T: the ML-EM solve, ``mlsde.sdeint(sde, y0, ts, seed=...)`` (the seed fixes the coins, so every run
        makes the same level calls);
      * R: plain EM of the same SDE whose drift makes the same level calls, step by step, on the live state
        (``SameCalls``: each call's level, batch size and time is logged once by the levels themselves and
        checked against the solve's ``stats``): the networks, the noise, the EM update and the loop, interleaved
        as in the solve, with none of ML-EM's work;
      * L: the same level calls made directly, in order, on a ready input of each batch size;
      * E: plain EM of the same SDE with a zero-cost drift (one preallocated zero tensor).
    Bookkeeping (coins, sub-batches, the weighted sum, statistics, checks) = (T - R) / T -- targets: <= 10 % with
    batch coins, <= 30 % per sample. Printed beside it: (T - L - E) / T, the first definition, which also charges
    ML-EM with the networks running slower inside any solve than alone ((R - L - E) / T: the noise and the
    updates take their cache); (T - L) / T, everything outside the network calls; and Z, the same solve (same
    coins, calls and sub-batches) with zero-cost levels: (Z - E) / T, the bookkeeping with no network time to
    subtract (which misses what the weighted sum of real outputs costs).

Every variant of a part is timed once per round (``torch.utils.benchmark.Timer``: one call warms it up and sizes its
block, then one ``timeit`` of that block a round; the order rotates between rounds), under
``torch.no_grad()`` with one thread (``torch.set_num_threads(1)``: the machine may be shared). Ratios and fractions
are computed within each round, from times measured seconds apart, and the headline is their median over the
rounds, printed with every round's value so that the spread of a busy machine shows. Only public API is used. Usage::

    python benchmarks/overhead.py --quick      # d = 100 in (a), 200 steps in (b), ~15 s: results/overhead_quick.json
    python benchmarks/overhead.py              # full sizes: results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torchsde
from torch import nn
from torch.utils import benchmark

import multilevel_sde as mlsde
from run_info import environment

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1234
TARGET_SPEEDUP = 2.0
TARGET_BOOKKEEPING = {"batch": 0.10, "sample": 0.30}


def settings(quick: bool) -> dict:
    cfg = {"dt": 1e-3, "a_batch": 256, "a_dim": 1000, "a_t1": 1.0, "b_batch": 256, "b_dim": 64, "b_t1": 1.0,
           "widths": [64, 128, 256, 512], "probabilities": [1.0, 0.5, 0.25, 0.125], "a_rounds": 5,
           "b_rounds": 15, "min_run_time": 0.5, "threads": 1}
    if quick:
        cfg.update(a_dim=100, b_t1=0.2, a_rounds=2, b_rounds=5, min_run_time=0.05)
    return cfg


def side_by_side(fns: dict, rounds: int, min_run_time: float, log=print) -> dict:
    """Times every ``fns[name]()`` once per round, rotating the order between rounds, so that the variants share
    the machine's load round by round. One call first warms each variant up and sizes its block (the number of
    calls that fill ``min_run_time``); a round is then one ``Timer.timeit`` of that block per variant.
    Returns {name: {"median_s": per call, over the rounds, "round_s": [per call, each round], "number": n}}."""
    timers = {n: benchmark.Timer("fn()", globals={"fn": torch.no_grad()(f)}, label=n, num_threads=1)
              for n, f in fns.items()}
    number = {n: max(1, round(min_run_time / timer.timeit(1).median)) for n, timer in timers.items()}  # warm-up
    per_round = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            per_round[n].append(timers[n].timeit(number[n]).median)
        log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.4f}s" for n in names))
    return {n: {"median_s": statistics.median(per_round[n]), "round_s": per_round[n], "number": number[n]}
            for n in names}


def ratio(timed: dict, num: str, den: str) -> dict:
    """``num / den``: the median of the ratios of the same round (the headline), their range, the ratio of medians."""
    per_round = [a / b for a, b in zip(timed[num]["round_s"], timed[den]["round_s"])]
    return {"ratio": statistics.median(per_round), "per_round": per_round,
            "ratio_of_medians": timed[num]["median_s"] / timed[den]["median_s"]}


# -- (a) plain EM against torchsde -----------------------------------------------------------------------------
class OU(nn.Module):
    """``dX = -X dt + dW`` in torchsde's protocol."""

    noise_type, sde_type = "diagonal", "ito"

    def f(self, t, y):
        return -y

    def g(self, t, y):
        return torch.ones_like(y)


def part_a(cfg: dict, log=print) -> dict:
    batch, dim, dt, t1 = cfg["a_batch"], cfg["a_dim"], cfg["dt"], cfg["a_t1"]
    sde, ts = OU(), torch.tensor([0.0, t1])
    y0 = torch.randn(batch, dim, generator=torch.Generator().manual_seed(SEED))
    shared = mlsde.GridBrownian(t0=0.0, t1=t1, dt=dt, size=(batch, dim), seed=0, cache="all")
    with torch.no_grad():
        ours = mlsde.sdeint(sde, y0, ts, bm=shared, dt=dt)
        theirs = torchsde.sdeint(sde, y0, ts, bm=shared, method="euler", dt=dt)
    identical = bool(torch.equal(ours, theirs))
    log(f"  shared GridBrownian: results bit-identical: {identical} "
        f"(max |difference| {float((ours - theirs).abs().max()):.3g})")
    timed = side_by_side({
        "mlsde_default": lambda: mlsde.sdeint(sde, y0, ts, dt=dt, seed=SEED),
        "torchsde_default": lambda: torchsde.sdeint(sde, y0, ts, method="euler", dt=dt),
        "mlsde_shared": lambda: mlsde.sdeint(sde, y0, ts, bm=shared, dt=dt),
        "torchsde_shared": lambda: torchsde.sdeint(sde, y0, ts, bm=shared, method="euler", dt=dt),
    }, cfg["a_rounds"], cfg["min_run_time"], log)
    default = ratio(timed, "torchsde_default", "mlsde_default")
    return {"steps": round(t1 / dt), "times": timed, "bit_identical_shared_path": identical,
            "max_abs_difference_shared_path": float((ours - theirs).abs().max()),
            "speedup_default_noise": default, "speedup_shared_path": ratio(timed, "torchsde_shared", "mlsde_shared"),
            "target_speedup_default_noise": TARGET_SPEEDUP, "met": default["ratio"] >= TARGET_SPEEDUP and identical}


# -- (b) ML-EM bookkeeping --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``f(t, y) = net(y)``: Linear(d, w) - Tanh - Linear(w, w) - Tanh - Linear(w, d). While ``log`` is a list,
    every call appends ``(index, batch size, t)`` to it."""

    def __init__(self, dim: int, width: int, index: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, dim))
        self.index, self.log = index, None

    def forward(self, t, y):
        if self.log is not None:
            self.log.append((self.index, y.shape[0], float(t)))
        return self.net(y)


class ZeroLevel(nn.Module):
    """A zero-cost level: a slice of one preallocated zero tensor (sub-batches included)."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.zero = torch.zeros_like(like)

    def forward(self, t, y):
        return self.zero[: y.shape[0]]


class SameCalls:
    """A plain drift for the control R: at its n-th call it makes the level calls of the ML-EM solve's n-th step
    (``steps[n]``, ``[(level, batch size)]``) on the live state (a sub-batch: its first rows, a view) and returns the
    output of the step's first whole-batch call. An EM solve with this drift pays the same network calls as the
    ML-EM solve, interleaved with the same noise and updates, but none of ML-EM's bookkeeping."""

    def __init__(self, levels: list, steps: list):
        self.levels, self.steps, self.n = levels, steps, 0

    def __call__(self, t, y):
        out = None
        for m, b in self.steps[self.n]:
            f = self.levels[m](t, y if b == y.shape[0] else y[:b])
            out = f if out is None and b == y.shape[0] else out
        self.n += 1
        return out


def calls_by_step(calls: list) -> list:
    """The ``(level, batch size)`` of each step's calls, one list a step, from ``logged_calls``' ``(level, batch
    size, t)`` (the levels are called with their step's time)."""
    steps = {}
    for m, b, t in calls:
        steps.setdefault(t, []).append((m, b))
    return list(steps.values())


def logged_calls(levels: list, solve) -> tuple[list, mlsde.Stats]:
    """The ``(level, batch size, t)`` of every level call ``solve()`` makes, in order, and its stats."""
    calls = []
    for lvl in levels:
        lvl.log = calls
    try:
        with torch.no_grad():
            _, stats = solve(return_stats=True)
    finally:
        for lvl in levels:
            lvl.log = None
    return calls, stats


def part_b(cfg: dict, log=print) -> dict:
    batch, dim, dt, t1 = cfg["b_batch"], cfg["b_dim"], cfg["dt"], cfg["b_t1"]
    torch.manual_seed(SEED)
    levels = [MLP(dim, w, m).requires_grad_(False) for m, w in enumerate(cfg["widths"])]
    y0 = torch.randn(batch, dim, generator=torch.Generator().manual_seed(SEED))
    ts = torch.tensor([0.0, t1], dtype=torch.float64)  # the grid accumulates t + dt in float64: exact steps
    costs = [mlsde.flops_per_sample(lvl, 0.0, y0) for lvl in levels]
    zero = torch.zeros_like(y0)
    em_zero = mlsde.MultilevelSDE(lambda t, y: zero, 1.0, dt=dt)
    fns = {"em_zero_drift": lambda: mlsde.sdeint(em_zero, y0, ts, seed=SEED)}
    out = {"costs_flops_per_sample": costs, "configs": {}}
    t0 = torch.tensor(0.0, dtype=torch.float64)
    for coupling in ("batch", "sample"):
        drift = mlsde.MultilevelDrift(levels, cfg["probabilities"], costs=costs, coupling=coupling, seed=0)
        sde = mlsde.MultilevelSDE(drift, 1.0, dt=dt)

        def solve(sde=sde, **kw):
            return mlsde.sdeint(sde, y0, ts, seed=SEED, **kw)

        timed_calls, _ = logged_calls(levels, solve)
        again, stats = logged_calls(levels, solve)  # a warm solve's stats
        calls = [(m, b) for m, b, _ in timed_calls]
        steps = calls_by_step(timed_calls)
        same_calls = SameCalls(levels, steps)
        em_same_calls = mlsde.MultilevelSDE(same_calls, 1.0, dt=dt)
        per_level = [[b for m, b in calls if m == j] for j in range(len(levels))]
        checks = {"calls_match_stats": [len(c) for c in per_level] == list(stats.calls),
                  "evaluations_match_stats": [sum(c) for c in per_level] == list(stats.evaluations),
                  "same_calls_every_solve": again == timed_calls, "steps_match_stats": len(steps) == stats.steps}
        inputs = {b: torch.randn(b, dim, generator=torch.Generator().manual_seed(b)) for b in {b for _, b in calls}}

        def replay(calls=calls, inputs=inputs):
            for m, b in calls:
                levels[m](t0, inputs[b])

        # the same solve (same coins, calls and sub-batches) with zero-cost levels: Z - E is the bookkeeping
        # without the networks, a cross-check that a busy machine disturbs less (no network time to subtract)
        zero_drift = mlsde.MultilevelDrift([ZeroLevel(y0) for _ in levels], cfg["probabilities"], costs=costs,
                                           coupling=coupling, seed=0)
        zero_sde = mlsde.MultilevelSDE(zero_drift, 1.0, dt=dt)
        with torch.no_grad():
            _, zero_stats = mlsde.sdeint(zero_sde, y0, ts, seed=SEED, return_stats=True)
        checks["zero_levels_same_calls"] = zero_stats.evaluations == stats.evaluations
        if not all(checks.values()):
            raise RuntimeError(f"{coupling}: the logged level calls do not match the solve: {checks}")
        fns[f"mlem[{coupling}]"] = solve

        def em_with_same_calls(same_calls=same_calls, sde=em_same_calls):
            same_calls.n = 0
            return mlsde.sdeint(sde, y0, ts, seed=SEED)

        fns[f"em_same_calls[{coupling}]"] = em_with_same_calls
        fns[f"levels_alone[{coupling}]"] = replay
        fns[f"mlem_zero_levels[{coupling}]"] = lambda zero_sde=zero_sde: mlsde.sdeint(zero_sde, y0, ts, seed=SEED)
        out["configs"][coupling] = {"steps": stats.steps, "calls": list(stats.calls),
                                    "evaluations": list(stats.evaluations),
                                    "level_s_in_solve_stats": sum(stats.wall_time), "checks": checks}
    timed = side_by_side(fns, cfg["b_rounds"], cfg["min_run_time"], log)
    e_rounds = timed["em_zero_drift"]["round_s"]
    for coupling, res in out["configs"].items():
        def rounds(name, coupling=coupling):
            return timed[f"{name}[{coupling}]"]["round_s"]

        def per_step_us(fracs, t=rounds("mlem"), steps=res["steps"]):
            return statistics.median(f * a for f, a in zip(fracs, t)) / steps * 1e6

        t, same, lv = rounds("mlem"), rounds("em_same_calls"), rounds("levels_alone")
        zero_t = rounds("mlem_zero_levels")
        book = [(a - r) / a for a, r in zip(t, same)]  # T and R of the same round
        book_alone = [(a - b - e) / a for a, b, e in zip(t, lv, e_rounds)]
        in_solve = [(r - b - e) / a for a, r, b, e in zip(t, same, lv, e_rounds)]
        zero = [(z - e) / a for z, e, a in zip(zero_t, e_rounds, t)]
        frac = statistics.median(book)
        res.update({
            "solve_s": timed[f"mlem[{coupling}]"]["median_s"],
            "em_same_calls_s": timed[f"em_same_calls[{coupling}]"]["median_s"],
            "levels_alone_s": timed[f"levels_alone[{coupling}]"]["median_s"],
            "em_zero_drift_s": timed["em_zero_drift"]["median_s"],
            "bookkeeping_frac": frac, "bookkeeping_frac_per_round": book, "bookkeeping_us_per_step": per_step_us(book),
            "bookkeeping_frac_levels_alone": statistics.median(book_alone),
            "bookkeeping_frac_levels_alone_per_round": book_alone,
            "bookkeeping_us_per_step_levels_alone": per_step_us(book_alone),
            "levels_slower_in_a_solve_frac": statistics.median(in_solve),
            "outside_levels_frac": statistics.median((a - b) / a for a, b in zip(t, lv)),
            "zero_levels_s": timed[f"mlem_zero_levels[{coupling}]"]["median_s"],
            "bookkeeping_frac_zero_levels": statistics.median(zero), "bookkeeping_frac_zero_levels_per_round": zero,
            "bookkeeping_us_per_step_zero_levels": per_step_us(zero),
            "target": TARGET_BOOKKEEPING[coupling], "met": frac <= TARGET_BOOKKEEPING[coupling]})
    out["times"] = timed
    return out


# -- main -------------------------------------------------------------------------------------------------------
def report(res: dict) -> None:
    verdict = {True: "MET", False: "MISSED"}
    a, b = res.get("part_a"), res.get("part_b")
    if a:
        s = res["settings"]
        print(f"\n(a) plain EM, OU d={s['a_dim']} batch={s['a_batch']} steps={a['steps']}, {s['threads']} thread "
              f"(median times; ratios: median of the rounds', each round in brackets)")
        for n, v in a["times"].items():
            print(f"  {n:18s} {v['median_s'] * 1e3:10.1f} ms")
        for key, label in (("speedup_default_noise", "default noise"), ("speedup_shared_path", "shared path")):
            r = a[key]
            print(f"  torchsde / mlsde, {label:13s}: {r['ratio']:6.2f}x  ["
                  + ", ".join(f"{x:.2f}" for x in r["per_round"]) + "]")
        print(f"  bit-identical on the shared path: {a['bit_identical_shared_path']}")
        print(f"  target >= {TARGET_SPEEDUP:g}x with default noise and bit-identical: {verdict[a['met']]}")
    if b:
        print(f"\n(b) ML-EM bookkeeping, p = {res['settings']['probabilities']}, widths {res['settings']['widths']}, "
              f"batch {res['settings']['b_batch']}")
        print(f"  plain EM with a zero-cost drift E = {b['times']['em_zero_drift']['median_s'] * 1e3:.1f} ms")
        for coupling, c in b["configs"].items():
            print(f"  coins per {coupling:6s}: solve T = {c['solve_s'] * 1e3:8.1f} ms, EM with the same level calls "
                  f"R = {c['em_same_calls_s'] * 1e3:8.1f} ms, level calls alone "
                  f"L = {c['levels_alone_s'] * 1e3:8.1f} ms (solve's stats: {c['level_s_in_solve_stats'] * 1e3:.1f}), "
                  f"calls {c['calls']}")
            print(f"      bookkeeping (T - R) / T = {c['bookkeeping_frac']:6.1%} "
                  f"({c['bookkeeping_us_per_step']:.0f} us a step; per round "
                  + ", ".join(f"{x:.1%}" for x in c["bookkeeping_frac_per_round"])
                  + f")  target <= {c['target']:.0%}: {verdict[c['met']]}")
            print(f"      with the calls timed alone, (T - L - E) / T = {c['bookkeeping_frac_levels_alone']:.1%} "
                  f"({c['bookkeeping_us_per_step_levels_alone']:.0f} us a step), of which the networks running slower "
                  f"inside an EM solve than alone, (R - L - E) / T = {c['levels_slower_in_a_solve_frac']:.1%}")
            print(f"      outside the level calls (T - L) / T = {c['outside_levels_frac']:.1%}; cross-check, "
                  f"zero-cost levels (Z - E) / T = {c['bookkeeping_frac_zero_levels']:.1%} "
                  f"({c['bookkeeping_us_per_step_zero_levels']:.0f} us a step)")


def main(argv=None, cfg: dict | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, seconds")
    parser.add_argument("--parts", default="ab", help="which parts to run (default: ab)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/overhead[_quick].json)")
    args = parser.parse_args(argv)
    cfg = {**settings(args.quick), **(cfg or {})}
    torch.set_num_threads(cfg["threads"])
    res = {"benchmark": "overhead", "quick": args.quick, "settings": cfg, "environment": environment(torchsde=torchsde.__version__)}
    if "a" in args.parts:
        print("(a) mlsde.sdeint against torchsde.sdeint, plain EM")
        res["part_a"] = part_a(cfg)
    if "b" in args.parts:
        print("(b) ML-EM bookkeeping")
        res["part_b"] = part_b(cfg)
    report(res)
    out = args.out or RESULTS / ("overhead_quick.json" if args.quick else "overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
