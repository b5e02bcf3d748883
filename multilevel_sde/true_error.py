"""True-error panel: EM against ML-EM on a diffusion whose exact solution is known (issue #20).

Problem: ``problems.GaussianMixtureDiffusion`` (2-D, 3 components, exact score), reverse SDE from the exact
prior ``p_T`` to ``t_min``; the ladder is ``problems.diffusion_ladder`` (``||f^l - f|| <= 2^-l``, synthetic
costs ``2^(gamma l)``, gamma = 3: the "harder than Monte Carlo" regime). For each target ``eps = 2^-j``:

- EM runs the level ``k = j`` (accuracy ``eps``) with step ``dt = eps / 4``; cost = evaluations x ``C_k``;
- ML-EM runs levels ``1..k`` with Theorem 1's probabilities (``Theorem1(eps, gamma)``, the spec's constant,
  independent per-sample coins) on the same grid; cost = the realised cost by the exact rule.

Both share one prior draw and one Brownian path per sample. The *true* error is the RMS over paths of
``|X - X_ref|`` at ``t_min``, where ``X_ref`` is EM of the EXACT reverse drift at a fine step on the same
path (a strong, pathwise error; its own error is estimated by re-solving at twice the step). Exponents are
fitted as ``cost ~ error^-beta`` (``scaling.cost_exponent``, 95% intervals) on the points where ML-EM has
some ``p_l < 1``; the speedup is EM's cost, interpolated piecewise on the log-log line through EM's
measured points at ML-EM's smallest error, over ML-EM's cost there.

The variant is fixed here in advance (Theorem 1, scale 1; ``dt = eps/4`` for both, which is about the best
of ``dt = eps * 2^-c``, c = 0..4, for EM on this problem, so the baseline is not handicapped). Asymptotically
the exponents are gamma + 1 (EM) and gamma (ML-EM); over eps = 2^-2..2^-8 Theorem 1's own cost
``~ G_k^2 / eps^2`` still has exponent 3.3 at gamma = 3 (``theory`` in the result), so expect a gap near 0.7.

Caveat: the ladder has ``f^0 = 0``, so the first level difference ``Delta_1 = f^1`` carries the whole stiff
reverse drift (evaluated at every step, ``p_1 = 1``) and the others are small time-independent sines. This
demonstrates the theory, not the paper's claim about neural-network ladders.

    from multilevel_sde.true_error import run_true_error_panel, format_true_error
    print(format_true_error(run_true_error_panel("out", quick=True)))
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from .random_streams import TrueErrorStream, derive_seed
from .brownian import GridBrownian
from .files import atomic_write, atomic_write_json
from .integrate import sdeint
from .probabilities import Theorem1
from .problems import GaussianMixtureDiffusion, diffusion_ladder
from .scaling import cost_exponent

__all__ = ["PanelSettings", "DEFAULT", "QUICK", "CAVEAT", "run_true_error_panel", "format_true_error"]

F64 = torch.float64
TARGET_SPEEDUP = 5.0
TARGET_EXPONENT_GAP = 0.6
CAVEAT = (
    "The synthetic ladder (problems.diffusion_ladder with f^0 = 0) puts the whole stiff reverse drift "
    "x + 2 grad log p_t (exact score plus the level-1 sine) into the first level difference Delta_1 = f^1, "
    "which Theorem 1 evaluates at every step here (p_1 = 1), and small time-independent sines of size ~2^-l "
    "into the other differences; the costs 2^(gamma l) are synthetic. It demonstrates the theory (Theorem 1's "
    "rate against the exact law of a diffusion), not the paper's claim on neural-network ladders."
)


@dataclass(frozen=True)
class PanelSettings:
    """Problem size of one panel; ``DEFAULT`` and ``QUICK`` are fixed in advance."""

    gamma: float = 3.0
    paths: int = 1024
    j_min: int = 2  # targets eps = 2^-j, j = j_min..j_max (ladder depth k = j)
    j_max: int = 8
    step_factor: float = 0.25  # dt = step_factor * eps for EM and ML-EM
    reference_exp: int = 14  # reference step 2^-reference_exp
    T: float = 1.05
    t_min: float = 0.05  # the reverse process runs over solver time [0, T - t_min] = [0, 1]
    means: tuple = ((-1.0, 0.5), (1.0, 0.8), (0.2, -0.8))
    stds: tuple = ((0.5, 0.6), (0.7, 0.5), (0.6, 0.8))
    weights: tuple = (0.3, 0.4, 0.3)

    @property
    def eps(self) -> list[float]:
        return [2.0**-j for j in range(self.j_min, self.j_max + 1)]


DEFAULT = PanelSettings()
QUICK = PanelSettings(paths=256, j_max=6, reference_exp=12)


# -- the runs ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only add overhead (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _problem(s: PanelSettings) -> GaussianMixtureDiffusion:
    return GaussianMixtureDiffusion(s.means, s.stds, s.weights, T=s.T, t_min=s.t_min)


def _shared_noise(gm: GaussianMixtureDiffusion, s: PanelSettings, seed: int) -> tuple[torch.Tensor, GridBrownian]:
    """One prior draw and one Brownian path (on the reference grid) per sample, shared by every solve."""
    y0 = gm.sample_prior(s.paths, torch.Generator().manual_seed(derive_seed(seed, TrueErrorStream.PRIOR)))
    bm = GridBrownian(t0=0.0, t1=gm.s_end, dt=2.0**-s.reference_exp, size=(s.paths, gm.d),
                      seed=derive_seed(seed, TrueErrorStream.BROWNIAN), dtype=F64, cache="all")
    return y0, bm.predraw()


def _show(x: Union[float, str]) -> str:
    return f"{x:.4g}" if isinstance(x, float) else x


def _rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref) ** 2).sum(-1).mean().sqrt())


def _solve(gm: GaussianMixtureDiffusion, drift, y0: torch.Tensor, bm: GridBrownian, dt: float,
           seed: Optional[int] = None):
    start = time.perf_counter()
    ys, stats = sdeint(gm.sde(drift), y0, gm.solver_times(), bm=bm, dt=dt, seed=seed, return_stats=True)
    return ys[-1], stats, time.perf_counter() - start


def _finite(x: float, what: str) -> Union[float, str]:
    return float(x) if math.isfinite(x) else f"non-finite {what} ({x})"


def _run_em(gm, ladder, y0, bm, dt: float, ref: torch.Tensor) -> dict:
    x, stats, seconds = _solve(gm, ladder.levels[-1], y0, bm, dt)
    cost = stats.evaluations[0] * ladder.costs[-1] / y0.shape[0]
    return {"error": _finite(_rms(x, ref), "error"), "cost": cost, "seconds": seconds}


def _run_mlem(gm, ladder, schedule: Theorem1, y0, bm, dt: float, ref: torch.Tensor, seed: int) -> dict:
    drift = ladder.drift(schedule, coupling="sample", seed=seed)
    x, stats, seconds = _solve(gm, drift, y0, bm, dt, seed=seed)
    p = drift.probabilities_at(0.0, dt).tolist()
    paths = y0.shape[0]
    return {"error": _finite(_rms(x, ref), "error"), "cost": stats.cost / paths,
            "expected_cost": stats.expected_cost / paths, "seconds": seconds, "probabilities": p,
            "some_p_below_one": bool(min(p) < 1.0)}


def _point(gm, s: PanelSettings, j: int, y0, bm, ref: torch.Tensor, seed: int) -> dict:
    eps, dt = 2.0**-j, s.step_factor * 2.0**-j
    ladder = diffusion_ladder(gm, k=j, gamma=s.gamma, seed=derive_seed(seed, TrueErrorStream.LADDER))
    schedule = Theorem1(eps=eps, gamma=s.gamma)
    return {"eps": eps, "k": j, "dt": dt, "em": _run_em(gm, ladder, y0, bm, dt, ref),
            "mlem": _run_mlem(gm, ladder, schedule, y0, bm, dt, ref, derive_seed(seed, TrueErrorStream.COINS, j))}


# -- the summary -------------------------------------------------------------------------------------
def _usable(p: dict) -> bool:
    return p["mlem"]["some_p_below_one"] and all(isinstance(p[m]["error"], float) and p[m]["error"] > 0
                                                   for m in ("em", "mlem"))


def _fit(points: list, method: str) -> dict:
    errors, costs = [p[method]["error"] for p in points], [p[method]["cost"] for p in points]
    try:
        f = cost_exponent(errors, costs)
    except ValueError as err:
        return {"unavailable": f"cannot fit {len(points)} points: {err}"}
    if len(points) < 3:
        return {"unavailable": f"only {len(points)} usable points: no interval"}
    return {"exponent": f.slope, "interval": [float(v) for v in f.interval], "intercept": f.intercept,
            "points": f.points}


def _cost_at_error(errors: list, costs: list, error: float) -> tuple[float, bool]:
    """Cost at ``error`` on the piecewise log-log line through the points (end segments extrapolate)."""
    le, lc = np.log(errors), np.log(costs)
    order = np.argsort(le)
    le, lc = le[order], lc[order]
    x = math.log(error)
    i = int(np.clip(np.searchsorted(le, x) - 1, 0, len(le) - 2))
    slope = (lc[i + 1] - lc[i]) / (le[i + 1] - le[i])
    return float(math.exp(lc[i] + slope * (x - le[i]))), not le[0] <= x <= le[-1]


def _speedup(points: list) -> dict:
    em = [p for p in points if isinstance(p["em"]["error"], float) and p["em"]["error"] > 0]
    ml = [p for p in points if _usable(p)]
    if len(em) < 2 or not ml:
        return {"speedup_unavailable": f"{len(em)} finite EM points and {len(ml)} usable ML-EM points"}
    best = min(ml, key=lambda p: p["mlem"]["error"])
    em_cost, extrapolated = _cost_at_error([p["em"]["error"] for p in em], [p["em"]["cost"] for p in em],
                                           best["mlem"]["error"])
    return {"speedup_at_min_error": em_cost / best["mlem"]["cost"], "min_error_mlem": best["mlem"]["error"],
            "em_cost_at_min_error": em_cost, "mlem_cost_at_min_error": best["mlem"]["cost"],
            "speedup_extrapolated": extrapolated,
            "speedup_method": "EM's cost interpolated piecewise on the log-log line through its measured "
                              "(error, cost) points, at ML-EM's smallest true error, divided by ML-EM's cost there"
                              + (" (EXTRAPOLATED: outside EM's error range)" if extrapolated else "")}


def _theory(s: PanelSettings, fit_eps: list) -> dict:
    """Asymptotic exponents and Theorem 1's cost ~ G_k^2 / eps^2 over the fitted targets."""
    out = {"em": s.gamma + 1, "mlem": max(s.gamma, 2.0)}
    if len(fit_eps) >= 2:
        g = [Theorem1(eps=e, gamma=s.gamma).G_k for e in (fit_eps[0], fit_eps[-1])]
        out["mlem_theorem1_over_these_eps"] = 2.0 + 2 * math.log(g[1] / g[0]) / math.log(fit_eps[0] / fit_eps[-1])
    return out


def _summary(s: PanelSettings, points: list) -> dict:
    usable = [p for p in points if _usable(p)]
    fits = {m: _fit(usable, m) for m in ("em", "mlem")}
    out = {"fits": fits, "fit_eps": [p["eps"] for p in usable], "theory": _theory(s, [p["eps"] for p in usable])}
    out.update(_speedup(points))
    targets = {"speedup_min": TARGET_SPEEDUP, "exponent_gap_min": TARGET_EXPONENT_GAP}
    if "exponent" in fits["em"] and "exponent" in fits["mlem"]:
        out["exponent_gap"] = fits["em"]["exponent"] - fits["mlem"]["exponent"]
    targets["speedup_met"] = out.get("speedup_at_min_error", 0.0) >= TARGET_SPEEDUP
    targets["exponent_gap_met"] = out.get("exponent_gap", -math.inf) >= TARGET_EXPONENT_GAP
    out["targets"] = targets
    return out


# -- output ------------------------------------------------------------------------------------------
def _plot_method(ax, result: dict, method: str, label: str, style: str) -> None:
    """One method's points and, when fitted, its line over the fitted points (exponent in the legend)."""
    shown = [p[method] for p in result["points"] if isinstance(p[method]["error"], float)]
    fit = result["fits"][method]
    if "exponent" in fit:
        label += f": cost ~ err^-{fit['exponent']:.2f} [{fit['interval'][0]:.2f}, {fit['interval'][1]:.2f}]"
    line = ax.loglog([q["error"] for q in shown], [q["cost"] for q in shown], style, label=label)[0]
    if "exponent" in fit:
        e = np.array([p[method]["error"] for p in result["points"] if p["eps"] in result["fit_eps"]])
        ax.loglog(e, np.exp(fit["intercept"]) * e ** -fit["exponent"], "-", color=line.get_color(), lw=1)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    _plot_method(ax, result, "em", "EM (level k, dt = eps/4)", "o")
    _plot_method(ax, result, "mlem", "ML-EM (Theorem 1)", "s")
    if "speedup_at_min_error" in result:
        where = (result["min_error_mlem"], result["mlem_cost_at_min_error"])
        ax.annotate(f"{result['speedup_at_min_error']:.1f}x cheaper than EM", where, textcoords="offset points",
                    xytext=(-60, -16), fontsize=8)
    ax.invert_xaxis()
    ax.set_xlabel("true error: RMS |X - X_exact| at t_min")
    ax.set_ylabel("cost per path (synthetic units)")
    ax.set_title(f"Gaussian-mixture diffusion, gamma = {result['settings']['gamma']:g}: EM vs ML-EM")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _check_json(obj, where: str = "result") -> None:
    """Raises if ``obj`` is not plain JSON without NaN/inf (a bug: non-finite values become strings)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_json(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")
    elif not isinstance(obj, (str, int, float, bool, type(None))):
        raise TypeError(f"{where} has type {type(obj).__name__}")


# -- public ------------------------------------------------------------------------------------------
def run_true_error_panel(out_dir: Optional[Union[str, Path]] = None, *, seed: int = 0, progress: bool = False,
                         quick: bool = False) -> dict:
    """Runs the panel (``QUICK`` settings with ``quick=True``) and returns a plain JSON-able dict.

    With ``out_dir``, also writes ``out_dir/true_error.json`` and ``out_dir/true_error.png``.
    The same ``seed`` gives the same numbers (timings aside).
    """
    result = _run_panel(QUICK if quick else DEFAULT, seed, progress)
    result["settings"]["quick"] = quick
    _check_json(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "true_error.json", result, indent=1, allow_nan=False)
        _plot(result, out / "true_error.png")
    return result


def _describe(s: PanelSettings, seed: int) -> dict:
    return {**json.loads(json.dumps(asdict(s))), "eps": s.eps, "seed": seed, "reference_dt": 2.0**-s.reference_exp,
            "dt": f"{s.step_factor:g} * eps for EM and ML-EM (same grid)",
            "em": "level k = log2(1/eps) of problems.diffusion_ladder, every step",
            "mlem": "Theorem1(eps, gamma) (scale 1), levels 1..k, per-sample independent coins",
            "error": "RMS over paths of |X - X_ref| at t = t_min; X_ref = EM of the exact reverse drift "
                     "at reference_dt on the same prior draw and Brownian path",
            "cost": "EM: evaluations x C_k; ML-EM: realised cost (exact rule); per path, C_l = 2^(gamma l)"}


def _run_panel(s: PanelSettings, seed: int, progress: bool) -> dict:
    """The panel under settings ``s`` (what ``run_true_error_panel`` runs with ``DEFAULT`` or ``QUICK``)."""
    started = time.perf_counter()
    with _one_thread():
        gm = _problem(s)
        y0, bm = _shared_noise(gm, s, seed)
        h = 2.0**-s.reference_exp
        ref, _, ref_seconds = _solve(gm, None, y0, bm, h)
        ref_coarse, _, _ = _solve(gm, None, y0, bm, 2 * h)
        points = []
        for j in range(s.j_min, s.j_max + 1):
            points.append(_point(gm, s, j, y0, bm, ref, seed))
            if progress:
                print(f"true-error panel eps=2^-{j}: " + " | ".join(
                    f"{name} err {_show(points[-1][m]['error'])} cost {points[-1][m]['cost']:.3g}"
                    for m, name in (("em", "EM"), ("mlem", "ML-EM"))), file=sys.stderr, flush=True)
    result = {
        "settings": _describe(s, seed),
        "paths": s.paths,
        "reference_error_estimate": _finite(_rms(ref_coarse, ref), "reference error"),
        "reference_seconds": ref_seconds,
        "points": points,
        **_summary(s, points),
        "caveat": CAVEAT,
    }
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _fit_line(name: str, fit: dict, theory: str) -> str:
    if "exponent" not in fit:
        return f"  {name:<6} exponent: {fit['unavailable']}"
    lo, hi = fit["interval"]
    return f"  {name:<6} cost ~ error^-{fit['exponent']:.2f}  95% [{lo:.2f}, {hi:.2f}]  (theory {theory})"


def format_true_error(result: dict) -> str:
    """A few plain-text lines: exponents with intervals, speedup at the smallest error, targets met or not."""
    t, th = result["targets"], result["theory"]
    lines = [f"True-error panel (Gaussian-mixture diffusion, gamma={result['settings']['gamma']:g}, "
             f"{result['paths']} paths, eps 2^-{result['settings']['j_min']}..2^-{result['settings']['j_max']}, "
             f"{result['wall_seconds']:.0f} s):",
             _fit_line("EM", result["fits"]["em"], f"{th['em']:g}"),
             _fit_line("ML-EM", result["fits"]["mlem"], f"{th['mlem']:g}" + (
                 f"; Theorem 1 over these eps {th['mlem_theorem1_over_these_eps']:.2f}"
                 if "mlem_theorem1_over_these_eps" in th else ""))]
    if "speedup_at_min_error" in result:
        note = " (extrapolated)" if result["speedup_extrapolated"] else ""
        lines.append(f"  EM/ML-EM cost at ML-EM's smallest true error {result['min_error_mlem']:.3g}: "
                     f"{result['speedup_at_min_error']:.1f}x{note}")
    else:
        lines.append(f"  speedup: {result['speedup_unavailable']}")
    gap = f"{result['exponent_gap']:.2f}" if "exponent_gap" in result else "n/a"
    lines.append(f"  targets: speedup >= {t['speedup_min']:g}x {'met' if t['speedup_met'] else 'NOT met'}; "
                 f"exponent gap {gap} >= {t['exponent_gap_min']:g} {'met' if t['exponent_gap_met'] else 'NOT met'}")
    lines.append("  caveat: synthetic ladder, stiff drift all in Delta_1: demonstrates the theory, not networks.")
    return "\n".join(lines)
