"""Figures and the markdown report written from synthetic experiment results."""

from __future__ import annotations

import importlib
import sys

import pytest

from multilevel_sde.diffusion import report as report_module
from multilevel_sde.diffusion.frontier import summarise
from multilevel_sde.diffusion.report import plot_error_vs_cost, plot_gamma, write_all, write_report
from test_frontier import THRESHOLDS, synthetic_points

PNG = b"\x89PNG\r\n\x1a\n"


def make_results(gamma: float = 2.4) -> dict:
    points = synthetic_points()
    return {
        "title": "Synthetic ML-EM run", "command": "mlsde diffusion-experiment --synthetic",
        "networks": [{"name": "cpu-s", "flops": 1.0e6, "params": 1.2e4}, {"name": "top", "flops": 1.0e7,
                                                                            "params": 3.4e5}],
        "thresholds": THRESHOLDS,
        "gamma": {"flops": [1e6, 1e7, 1e8], "error": [0.1, 0.04, 0.016], "names": ["cpu-s", "mid", "top"],
                  "slope": -0.398, "intercept": 3.2, "gamma": gamma, "interval": [gamma - 0.3, gamma + 0.3],
                  "quantity": "RMS error of the noise prediction"},
        "points": points, "summary": summarise(points, THRESHOLDS),
        "level_differences": {"timesteps": [999, 500, 1], "pairs": ["cpu-s→mid", "mid→top"],
                              "rms": [[0.31, 0.12, 0.054], [0.2, 0.08, 0.0321]], "discretization_rms": [1.5, 0.7, 0.2]},
        "notes": ["The ladder was trained for 3 epochs."], "figures": [],
    }


def row(report: str, *cells: str) -> list[str]:
    """The cells of the first table row starting with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    line = next(line for line in report.splitlines() if line.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def test_write_all_writes_figures_and_report(tmp_path):
    results = make_results()
    paths = write_all(results, tmp_path / "out")
    names = [f"{kind}_{s}.png" for s in ("ddpm", "ddim") for kind in ("error_flops", "error_time", "speedup")]
    assert {p.name for p in paths} == set(names) | {"gamma.png", "report.md"}
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG
    assert sorted(results["figures"]) == sorted(names + ["gamma.png"])

    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# Synthetic ML-EM run") and "mlsde diffusion-experiment --synthetic" in report
    assert "γ = 2.4 (interval [2.1, 2.7])" in report and "γ > 2" in report
    assert row(report, "cpu-s") == ["cpu-s", "1e+06", "1.2e+04"]
    assert row(report, "ddim") == ["ddim", "0.001", "0.0004"]  # threshold table: threshold, EM-top-500 MSE

    mlem = results["summary"]["ddpm"]["curves"]["ML-EM inverse-cost 1000"]
    cells = row(report, "ddpm", "ML-EM inverse-cost 1000")
    assert cells[2:] == [f"{mlem['flops']['all']['max']:.3g}", f"{mlem['flops']['all']['mse_at_max']:.3g}",
                         f"{mlem['flops']['protocol']['max']:.3g}", "2.5", "2.5",
                         f"{mlem['calls']['all']['max']:.3g}", f"{mlem['seconds']['all']['max']:.3g}"]
    assert row(report, "ddim", "ML-EM inverse-cost 1000")[5:7] == ["–", "–"]  # top-500 MSE below the threshold
    assert row(report, "ddim", "T-Stitch 1000")[2] == "–"  # no overlap above the threshold

    # Points: sorted by sampler, curve, cost; mse ± se with 3 significant digits.
    assert row(report, "ddpm", "EM cpu-s", "EM cpu-s, 100 steps") == [
        "ddpm", "EM cpu-s", "EM cpu-s, 100 steps", "100", "0.005 ± 0.0005", "100", "1", "0.0001"]
    ddim_line = report.index("| ddim | EM top network | EM top network, 250 steps")
    assert ddim_line < report.index("| ddim | EM top network | EM top network, 1000 steps")
    assert ddim_line < report.index("| ddpm | EM cpu-s |")
    assert row(report, "999") == ["999", "0.31", "0.2", "1.5"]
    assert "| timestep | cpu-s→mid | mid→top | discretization |" in report
    assert "The ladder was trained for 3 epochs." in report
    assert "![](error_flops_ddpm.png)" in report and "![](gamma.png)" in report


def test_report_without_gamma_and_with_a_small_gamma(tmp_path):
    results = make_results(gamma=1.5)
    write_report(results, tmp_path / "small.md")
    small = (tmp_path / "small.md").read_text(encoding="utf-8")
    assert "γ ≤ 2" in small and "γ > 2" not in small and "interval contains 2" not in small
    nan = float("nan")
    results["gamma"].update(slope=nan, intercept=nan, gamma=nan, interval=[nan, nan], problem="errors do not fall")
    plot_gamma(results["gamma"], tmp_path / "no_fit.png")  # the points, no line
    write_report(results, tmp_path / "no_fit.md")
    assert (tmp_path / "no_fit.png").exists()
    assert "γ could not be estimated: errors do not fall." in (tmp_path / "no_fit.md").read_text("utf-8")
    ddpm = [p for p in results["points"] if p["sampler"] == "ddpm"]
    results.update(gamma=None, level_differences=None, notes=[], figures=["extra.png", "speedup_ddpm.png"],
                   points=ddpm, summary=summarise(ddpm, THRESHOLDS))
    paths = write_all(results, tmp_path / "plain")
    assert not (tmp_path / "plain" / "gamma.png").exists() and len(paths) == 4
    assert results["figures"] == ["extra.png", "speedup_ddpm.png", "error_flops_ddpm.png", "error_time_ddpm.png"]
    plain = (tmp_path / "plain" / "report.md").read_text(encoding="utf-8")
    assert "γ" not in plain and "Level differences" not in plain and "## Notes" not in plain


@pytest.mark.parametrize("cost_key", ["calls", "seconds"])
def test_plot_error_vs_cost(tmp_path, cost_key):
    path = tmp_path / f"{cost_key}.png"
    plot_error_vs_cost(synthetic_points(), "ddim", cost_key, path, threshold=1e-3, title="DDIM")
    assert path.read_bytes()[:8] == PNG


def test_importing_the_report_does_not_need_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any "import matplotlib" now raises ImportError
    importlib.reload(report_module)
    with pytest.raises(ImportError):
        report_module.plot_gamma(make_results()["gamma"], "unused.png")


def test_many_curves_share_a_legend_of_styles(tmp_path, monkeypatch):
    """Past a dozen curves, colour = method, dashes = stratified coins, marker = step grid: one legend entry
    per method, grid and EM network instead of one per curve."""
    points = []
    for steps in (1000, 250, 50, 10):
        for strategy in ("inverse-cost", "learned"):
            for coins in ("", " stratified"):
                for i, cost in enumerate((1e8, 1e9)):
                    points.append(dict(sampler="ddpm", family="mlem", curve=f"ML-EM {strategy}{coins} {steps}",
                                       mse=0.1 / (i + 1), flops=cost * steps / 100))
        points.append(dict(sampler="ddpm", family="tstitch", curve=f"T-Stitch {steps}", mse=0.2, flops=1e8 * steps))
    points += [dict(sampler="ddpm", family="em", curve="EM top network", mse=m, flops=f)
               for m, f in ((0.1, 1e8), (0.01, 1e9))]
    captured = {}
    from matplotlib.figure import Figure

    savefig = Figure.savefig

    def keep_labels(fig, *args, **kwargs):  # the figure as it is saved
        ax, = fig.axes
        captured["labels"] = [text.get_text() for text in ax.get_legend().get_texts()]
        captured["styles"] = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()
                              if len(line.get_xdata())}
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_labels)
    plot_error_vs_cost(points, "ddpm", "flops", tmp_path / "many.png", threshold=0.05)
    assert captured["labels"] == ["EM top network", "ML-EM inverse-cost", "ML-EM learned", "T-Stitch",
                                  "(dashed: stratified coins, biased path)", "1000 steps", "250 steps", "50 steps", "10 steps",
                                  "threshold 0.05"]
    assert len(captured["styles"]) == 1 + 4 * 4 + 4 + 1  # every curve in a style of its own, and the threshold
    assert (tmp_path / "many.png").read_bytes()[:8] == PNG


def test_stratified_curves_are_marked_as_biased_along_the_path(tmp_path):
    """Stratified coins bias the path (tests/test_coin_bias.py): their rows carry a dagger and a footnote says so;
    a report without them has neither."""
    results = make_results()
    for p in results["points"]:
        if p["curve"] == "ML-EM inverse-cost 1000":
            results["points"].append(dict(p, curve="ML-EM inverse-cost stratified 1000"))
    results["summary"] = summarise(results["points"], THRESHOLDS)
    write_report(results, tmp_path / "marked.md")
    marked = (tmp_path / "marked.md").read_text(encoding="utf-8")
    assert row(marked, "ddpm", "ML-EM inverse-cost stratified 1000 †")  # speedup table
    assert marked.count("| ML-EM inverse-cost stratified 1000 † |") >= 2  # and the points
    assert "| ML-EM inverse-cost 1000 |" in marked and "| ML-EM inverse-cost 1000 † |" not in marked
    assert marked.count("† stratified coins: lower variance, but coins dependent across steps bias the path") == 2
    write_report(make_results(), tmp_path / "plain.md")
    assert "†" not in (tmp_path / "plain.md").read_text(encoding="utf-8")
