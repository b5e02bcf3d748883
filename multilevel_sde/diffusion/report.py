"""Figures and a markdown report of an ML-EM diffusion experiment, from its points and their summary.

matplotlib is imported inside the plotting functions (figures drawn on an Agg canvas, no pyplot state), so
importing this module does not need it.

    results = {"title": ..., "points": points, "summary": summarise(points, thresholds), ...}
    write_all(results, "runs/celeba")   # error_flops_ddpm.png, ..., report.md
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .frontier import is_positive, unique

__all__ = ["plot_error_vs_cost", "plot_speedup", "plot_gamma", "write_report", "write_all", "points_section", "COST_LABELS"]

PathLike = Union[str, Path]

COST_LABELS = {"flops": "FLOPs per sample", "calls": "network evaluations per sample",
               "seconds": "wall time per sample (s)"}
_COST_NOUNS = {"flops": "FLOPs", "calls": "calls", "seconds": "wall time"}
_MARKERS = "s^Dv<>PXh*"
_DPI = 120


def _figure(size=(7.5, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _finish(fig, ax, path: PathLike) -> None:
    """Small legend outside the axes (if anything is labelled), save as PNG; the figure is then released."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    from ..files import atomic_write

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=_DPI, bbox_inches="tight"))
    fig.clear()


def plot_error_vs_cost(points: Sequence[Mapping], sampler: str, cost_key: str, path: PathLike,
                       threshold: Optional[float] = None, title: Optional[str] = None) -> None:
    """Log–log MSE against ``cost_key`` for ``sampler``'s points: one line per curve (EM solid with circles,
    ML-EM solid with other markers, T-Stitch dashed), the threshold dotted. With more than
    ``_MAX_LABELLED_CURVES`` curves the styles say what a curve is (``_CurveStyles``)."""
    fig, ax = _figure()
    mine = [p for p in points if p["sampler"] == sampler and p["family"] != "reference"
            and is_positive(p.get(cost_key)) and is_positive(p.get("mse"))]
    names = unique(p["curve"] for p in mine)
    styles = _CurveStyles(names) if len(names) > _MAX_LABELLED_CURVES else None
    markers = itertools.cycle(_MARKERS)
    for name in names:
        curve = sorted((p for p in mine if p["curve"] == name), key=lambda p: float(p[cost_key]))
        family = curve[0]["family"]
        if styles is not None:
            style = styles.of(name, family)
        else:
            style = dict(label=_curve_label(name), marker="o" if family == "em" else next(markers),
                         linestyle="--" if family == "tstitch" else "-")
        ax.plot([float(p[cost_key]) for p in curve], [float(p["mse"]) for p in curve], markersize=4,
                linewidth=1.2, **style)
    if styles is not None:
        styles.legend_entries(ax)
    if threshold is not None and is_positive(threshold):
        ax.axhline(float(threshold), color="k", linestyle=":", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(COST_LABELS.get(cost_key, cost_key))
    ax.set_ylabel("MSE to reference")
    ax.set_title(title or f"{sampler.upper()}: MSE to reference vs {COST_LABELS.get(cost_key, cost_key)}")
    _finish(fig, ax, path)


_MAX_LABELLED_CURVES = 12
_CURVE_NAME = re.compile(r"^(ML-EM (?P<strategy>.+?)(?P<stratified> stratified)?|T-Stitch) (?P<steps>\d+)$")


class _CurveStyles:
    """Styles that let many curves share a short legend: colour = method (each EM network, each ML-EM strategy,
    T-Stitch), line = coins (solid independent, dashed stratified, dotted T-Stitch), marker = ML-EM's or
    T-Stitch's step grid (EM: circles, its own points are its step counts)."""

    def __init__(self, names: Sequence[str]):
        parsed = [_CURVE_NAME.match(n) for n in names]
        methods = unique(n if m is None else (m["strategy"] or "T-Stitch") for n, m in zip(names, parsed))
        grids = sorted({int(m["steps"]) for m in parsed if m is not None}, reverse=True)
        colours = [f"C{i % 10}" for i in range(len(methods))]
        self.colour = dict(zip(methods, colours))
        self.marker = {g: _MARKERS[i % len(_MARKERS)] for i, g in enumerate(grids)}
        self.stratified = any(m is not None and m["stratified"] for m in parsed)
        self.em = [n for n, m in zip(names, parsed) if m is None]

    def of(self, name: str, family: str) -> dict:
        m = _CURVE_NAME.match(name)
        if m is None:  # an EM curve: its own legend entry
            return dict(label=name, color=self.colour[name], marker="o")
        method = m["strategy"] or "T-Stitch"
        line = ":" if family == "tstitch" else ("--" if m["stratified"] else "-")
        return dict(color=self.colour[method], marker=self.marker[int(m["steps"])], linestyle=line)

    def legend_entries(self, ax) -> None:
        """Invisible lines whose labels explain the colours, line styles and markers."""
        for method, colour in self.colour.items():
            if method not in self.em:
                ax.plot([], [], color=colour, label=method if method == "T-Stitch" else f"ML-EM {method}")
        if self.stratified:
            ax.plot([], [], color="gray", linestyle="--", label="(dashed: stratified coins, biased path)")
        for grid, marker in self.marker.items():
            ax.plot([], [], color="gray", marker=marker, linestyle="none", label=f"{grid} steps")


def plot_speedup(summary: Mapping, sampler: str, cost_key: str, path: PathLike) -> None:
    """Speedup over the all-EM frontier against MSE for each of ``sampler``'s curves (log MSE axis)."""
    fig, ax = _figure()
    entry = summary[sampler]
    for name, by_cost in entry["curves"].items():
        curve = by_cost.get(cost_key, {}).get("all", {}).get("curve", {})
        if curve.get("mse"):
            dashed = entry.get("families", {}).get(name) == "tstitch"
            ax.plot(curve["mse"], curve["speedup"], label=name, linewidth=1.2, linestyle="--" if dashed else "-")
    ax.axhline(1.0, color="k", linewidth=0.8)
    if is_positive(entry.get("top500_mse")):
        ax.axvline(entry["top500_mse"], color="gray", linestyle=":", linewidth=1, label="EM-top-500 MSE")
    ax.set_xscale("log")
    ax.set_xlabel("MSE to reference")
    ax.set_ylabel(f"speedup in {_COST_NOUNS.get(cost_key, cost_key)} over EM")
    ax.set_title(f"{sampler.upper()}: speedup over the EM frontier ({_COST_NOUNS.get(cost_key, cost_key)})")
    _finish(fig, ax, path)


def plot_gamma(gamma: Mapping, path: PathLike) -> None:
    """Each network's error against its FLOPs (log–log), the fitted power law and the estimated γ."""
    fig, ax = _figure((6.0, 4.5))
    flops, error = np.asarray(gamma["flops"], dtype=float), np.asarray(gamma["error"], dtype=float)
    ax.scatter(flops, error, color="C0", zorder=3)
    for x, y, name in zip(flops, error, gamma.get("names") or []):
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if math.isfinite(gamma["slope"]) and math.isfinite(gamma["intercept"]):
        grid = np.geomspace(flops.min(), flops.max(), 50)
        ax.plot(grid, np.exp(gamma["intercept"]) * grid ** gamma["slope"], color="C1", linewidth=1.2,
                label=f"fit: slope {_fmt(gamma['slope'])}")
    lo, hi = gamma["interval"]
    ax.text(0.04, 0.06, f"γ = {_fmt(gamma['gamma'])}  [{_fmt(lo)}, {_fmt(hi)}]", transform=ax.transAxes,
            fontsize=10, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per network evaluation")
    ax.set_ylabel(str(gamma.get("quantity", "error")), fontsize=8)  # the runner's quantity is a sentence
    ax.set_title("Cost exponent γ of the ladder")
    _finish(fig, ax, path)


def _fmt(value) -> str:
    """3 significant digits; "–" for None and nan."""
    if value is None:
        return "–"
    x = float(value)
    return "–" if math.isnan(x) else f"{x:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _speedup(by_cost: Mapping, cost_key: str, frontier: str, field: str) -> float:
    return by_cost.get(cost_key, {}).get(frontier, {}).get(field, math.nan)


def _networks_section(networks: Sequence[Mapping]) -> list[str]:
    if not networks:
        return []
    rows = [(n["name"], _fmt(n.get("flops")), _fmt(n.get("params"))) for n in networks]
    return ["## Networks", ""] + _table(("network", "FLOPs per evaluation", "parameters"), rows)


def _gamma_section(gamma: Optional[Mapping]) -> list[str]:
    if not gamma:
        return []
    g, (lo, hi) = float(gamma["gamma"]), gamma["interval"]
    if not math.isfinite(g):
        return ["## Cost exponent γ", "", f"γ could not be estimated: {gamma.get('problem', 'no fit')}.", ""]
    names = ", ".join(str(n) for n in gamma.get("names") or [])
    lines = ["## Cost exponent γ", "",
             f"γ = {_fmt(g)} (interval [{_fmt(lo)}, {_fmt(hi)}]), from the log–log fit of "
             f"{gamma.get('quantity', 'the error')} against FLOPs per evaluation (slope {_fmt(gamma.get('slope'))})"
             + (f" over {names}." if names else "."), ""]
    if g <= 2:
        lines.append("γ ≤ 2: the ladder is not \"harder than Monte Carlo\"; ML-EM's asymptotic advantage over EM is "
                     "a constant factor at best.")
    else:
        lines.append("γ > 2: the polynomial-speedup regime, where ML-EM's cost grows with a smaller power of the "
                     "inverse error than EM's.")
    if float(lo) <= 2 <= float(hi):
        lines.append("The interval contains 2, so this fit does not settle the regime.")
    if not math.isfinite(float(hi)):
        lines.append("The interval is unbounded: the slope's interval reaches 0, so the fall of the error with cost "
                     "is not significant over these networks and γ is not identified.")
    return lines + [""]


def _thresholds_section(thresholds: Mapping[str, float], summary: Mapping) -> list[str]:
    if not thresholds:
        return []
    rows = [(s, _fmt(t), _fmt(summary.get(s, {}).get("top500_mse"))) for s, t in thresholds.items()]
    return (["## Thresholds", "", "Speedups are measured only at MSE above each sampler's threshold.", ""]
            + _table(("sampler", "MSE threshold", "EM-top-500 MSE"), rows))


_BIASED_MARK = " †"
_BIASED_NOTE = ("† stratified coins: lower variance, but coins dependent across steps bias the path (each step is "
                "unbiased at a fixed state, the trajectory is not); the MSE includes that bias, so the comparison "
                "with EM is fair, but these curves are not unbiased ML-EM. The other ML-EM curves are unbiased for "
                "the top network's sampler (docs/theory.md, tests/test_coin_bias.py).")


def _biased(curve: str) -> bool:
    """Whether a curve's coins bias the path (stratified in time)."""
    m = _CURVE_NAME.match(curve)
    return bool(m and m["stratified"])


def _curve_label(curve: str) -> str:
    """The curve's name, marked with a dagger when its path is biased (stratified coins)."""
    return curve + _BIASED_MARK if _biased(curve) else curve


def _biased_note(curves) -> list[str]:
    return [_BIASED_NOTE, ""] if any(_biased(c) for c in curves) else []


def _speedup_section(summary: Mapping) -> list[str]:
    rows = []
    for sampler, entry in summary.items():
        for name, by_cost in entry["curves"].items():
            rows.append((sampler, _curve_label(name),
                         _fmt(_speedup(by_cost, "flops", "all", "max")),
                         _fmt(_speedup(by_cost, "flops", "all", "mse_at_max")),
                         _fmt(_speedup(by_cost, "flops", "protocol", "max")),
                         _fmt(_speedup(by_cost, "flops", "all", "at_top500")),
                         _fmt(_speedup(by_cost, "flops", "protocol", "at_top500")),
                         _fmt(_speedup(by_cost, "calls", "all", "max")),
                         _fmt(_speedup(by_cost, "seconds", "all", "max"))))
    if not rows:
        return []
    header = ("sampler", "curve", "max FLOP speedup (all EM)", "at MSE", "max FLOP speedup (protocol EM)",
              "FLOP speedup at EM-top-500 MSE (all EM)",
              "FLOP speedup at EM-top-500 MSE (protocol EM)", "max speedup in calls (all EM)",
              "max speedup in wall time (all EM)")
    return (["## Speedups over EM", "",
             "Ratio of the cost EM's Pareto frontier needs to reach an MSE to the cost the curve's frontier needs "
             "(log–log interpolation), against every EM point (\"all EM\") or the paper's step set "
             "(\"protocol EM\").", ""] + _table(header, rows)
            + _biased_note(name for entry in summary.values() for name in entry["curves"]))


def points_section(points: Sequence[Mapping]) -> list[str]:
    """The lines of ``report.md``'s ``## Points`` section: every measured point (by sampler, curve and cost) with
    its MSE and standard error, and how many coin patterns an ML-EM point averages."""
    if not points:
        return []

    def key(p):
        flops = float(p.get("flops", math.nan))
        return p["sampler"], p["curve"], flops if math.isfinite(flops) else math.inf

    rows = [(p["sampler"], _curve_label(p["curve"]), p.get("label", ""), p.get("steps", ""),
             f"{_fmt(p.get('mse'))} ± {_fmt(p.get('mse_se'))}" + _patterns_note(p), _fmt(p.get("flops")),
             _fmt(p.get("calls")), _fmt(p.get("seconds"))) for p in sorted(points, key=key)]
    shared = [p["coin_patterns"] for p in points if "coin_patterns" in p]
    note = [] if not shared else [
        f"ML-EM coins are shared by each batch (`coupling=\"batch\"`): an ML-EM point averages {min(shared)}"
        + ("" if min(shared) == max(shared) else f"–{max(shared)}") + " coin pattern(s), and its ± is the spread "
        "between patterns (unknown, nan, with one pattern: such a point is a single draw, and a maximum over "
        "single draws flatters the curve).", ""]
    return (["## Points", ""] + note + _table(("sampler", "curve", "label", "steps", "MSE ± se", "FLOPs", "calls",
                                                "seconds"), rows) + _biased_note(p["curve"] for p in points))


def _patterns_note(point: Mapping) -> str:
    patterns = point.get("coin_patterns")
    return "" if patterns is None else f" ({patterns} pattern{'s' if patterns != 1 else ''})"


def _level_section(levels: Optional[Mapping]) -> list[str]:
    if not levels or not levels.get("timesteps"):
        return []
    pairs = list(levels.get("pairs") or [f"pair {i}" for i in range(len(levels["rms"]))])
    columns = [list(r) for r in levels["rms"]]
    if levels.get("discretization_rms"):
        pairs.append("discretization")
        columns.append(list(levels["discretization_rms"]))
    rows = [[str(t)] + [_fmt(c[i]) for c in columns] for i, t in enumerate(levels["timesteps"])]
    quantity = levels.get("quantity", "RMS difference")
    return (["## Level differences", "", f"{quantity}: differences between adjacent levels (columns) at each "
             "timestep (rows).", ""] + _table(["timestep"] + pairs, rows))


def write_report(results: Mapping, path: PathLike) -> None:
    """Writes the markdown report of ``results`` (title, command, networks, γ, thresholds, speedups, points,
    level differences, notes, figures) to ``path``."""
    summary = results.get("summary") or {}
    lines = [f"# {results.get('title') or 'ML-EM experiment'}", ""]
    if results.get("command"):
        lines += ["```", str(results["command"]), "```", ""]
    lines += _networks_section(results.get("networks") or [])
    lines += _gamma_section(results.get("gamma"))
    lines += _thresholds_section(results.get("thresholds") or {}, summary)
    lines += _speedup_section(summary)
    lines += points_section(results.get("points") or [])
    lines += _level_section(results.get("level_differences"))
    if results.get("notes"):
        lines += ["## Notes", ""] + [line for note in results["notes"] for line in (str(note), "")]
    if results.get("figures"):
        lines += ["## Figures", ""] + [line for name in results["figures"] for line in (f"![]({name})", "")]
    from ..files import atomic_write_text

    atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")


def write_all(results: dict, out_dir: PathLike) -> list[Path]:
    """Per sampler, ``error_flops_<s>.png``, ``error_time_<s>.png`` and ``speedup_<s>.png`` (FLOPs), and
    ``gamma.png`` when ``results["gamma"]`` is set; adds their names to ``results["figures"]`` and writes
    ``report.md``. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points, summary = results.get("points") or [], results.get("summary") or {}
    thresholds = results.get("thresholds") or {}
    names = []
    for sampler in unique(p["sampler"] for p in points):
        for cost_key, stem in (("flops", "error_flops"), ("seconds", "error_time")):
            names.append(f"{stem}_{sampler}.png")
            plot_error_vs_cost(points, sampler, cost_key, out / names[-1], threshold=thresholds.get(sampler))
        if sampler in summary:
            names.append(f"speedup_{sampler}.png")
            plot_speedup(summary, sampler, "flops", out / names[-1])
    if results.get("gamma"):
        names.append("gamma.png")
        plot_gamma(results["gamma"], out / names[-1])
    results["figures"] = unique(list(results.get("figures") or []) + names)
    write_report(results, out / "report.md")
    return [out / name for name in names] + [out / "report.md"]
