"""The main job (``mlsde demo``): EM against ML-EM on the shipped nested ladder, and the true-error panel.

Everything is offline. By default the demo loads the pretrained ladder shipped inside the package
(:mod:`.pretrained`: one :class:`~.nested.NestedUNet` trained on scikit-learn's digits at 16x16, whose five
widths are the levels), then

1. ``out/true-error``: the exact-score Gaussian-mixture diffusion with a synthetic ladder, where the error is
   measured against the exact solution (:mod:`multilevel_sde.true_error`) -- the theory's polynomial speedup;
2. ``out/experiment``: the paper's experiment on the image ladder (:mod:`.experiment`): EM with every width and
   step count, ML-EM over all five widths with inverse-cost, theory-exponent and learned probabilities,
   T-Stitch; ``report.md``, the error-cost figure, the speedup figure and a labelled sample grid.

``--train`` retrains the ladder from scratch with the recorded command (``out/ladder``) instead of loading it;
``--quick`` is the smoke version of every stage (its own default folder ``runs/demo-quick``, its own
sub-folders, so quick and full runs never share a cache)::

    results = run_demo("runs/demo")                       # <= 5 min on 2 CPU cores
    results = run_demo("runs/demo-quick", quick=True)     # <= 2 min
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .experiment import Experiment, ExperimentConfig

__all__ = ["DemoPlan", "FULL", "QUICK", "TRAIN_ARGS", "run_demo", "format_speedups", "save_labelled_grid"]

#: ``mlsde train`` arguments that made the shipped ladder (``--out`` is added); ``mlsde demo --train`` reruns them.
TRAIN_ARGS = ("--nested", "nested-cpu", "--data", "default", "--image-size", "16", "--steps", "3000",
              "--batch-size", "64", "--lr", "1e-3", "--warmup", "100", "--decay", "1000", "--eval-every", "500",
              "--eval-size", "90", "--checkpoint-every", "250")
_QUICK_TRAIN_ARGS = ("--nested", "nested-cpu", "--data", "default", "--image-size", "16", "--steps", "40",
                     "--batch-size", "32", "--lr", "2e-3", "--warmup", "5", "--eval-every", "40", "--eval-size", "32",
                     "--checkpoint-every", "40", "--widths", "3,6,10")


@dataclass(frozen=True)
class DemoPlan:
    """The experiment to run on the ladder, how to retrain the ladder, and the size of the true-error panel."""

    experiment: ExperimentConfig
    train_args: tuple = TRAIN_ARGS
    true_error_quick: bool = False
    folder: str = "runs/demo"
    suffix: str = ""  # of the sub-folders, so a quick and a full run never share a cache


FULL = DemoPlan(
    experiment=ExperimentConfig(heldout=32, select=16, batch=32, samplers=("ddpm",),
                                em_steps=(10, 25, 50, 100, 250), reference_steps=250,
                                mlem_steps=(100, 50, 25), p_top=(0.3, 0.1, 0.03),
                                strategies=("inverse-cost", "theory", "learned"),
                                stratified=("inverse-cost", "theory"), comonotone=("inverse-cost", "theory"),
                                coupling="batch",
                                learn_steps=4, learn_batch=16, learn_grid=50, deltas=(-1.0, 0.0, 1.0),
                                tstitch_fractions=(0.3, 0.6), tstitch_steps=(100,)),
)

QUICK = DemoPlan(
    experiment=ExperimentConfig(heldout=8, select=8, batch=8, samplers=("ddpm", "ddim"), em_steps=(10, 25, 50),
                                reference_steps=50, mlem_steps=(25,), p_top=(0.3,), strategies=("inverse-cost",
                                "learned"), stratified=("inverse-cost",), coupling="batch", learn_steps=2,
                                learn_batch=8, learn_grid=10, deltas=(0.0,), tstitch_fractions=(0.5,),
                                tstitch_steps=(25,), grid_images=4),
    train_args=_QUICK_TRAIN_ARGS, true_error_quick=True, folder="runs/demo-quick", suffix="-quick",
)


def _ladder(plan: DemoPlan, out: Path, train: bool, progress: bool, log: Callable[[str], None]):
    """The nested network and its record: the shipped one, or one trained now with ``plan.train_args``."""
    from .pretrained import DEFAULT_LADDER, export_pretrained, load_pretrained

    if not train:
        net, record = load_pretrained(DEFAULT_LADDER)
        log(f"ladder: the shipped {record['name']} (widths {record['model_config']['widths']}, trained "
            f"{record['steps']} steps on {record['data']['name']}; retrain with `mlsde demo --train`)")
        return net, record
    from .train import main as train_main

    folder = out / f"ladder{plan.suffix}"
    args = [*plan.train_args, "--out", str(folder), "--progress" if progress else "--no-progress"]
    log(f"ladder: mlsde train {shlex.join(args)} (a finished checkpoint there is reused, an unfinished one resumes)")
    train_main(args, quiet=True)
    command = "mlsde train " + shlex.join([*plan.train_args, "--out", "OUT"])
    export_pretrained(folder, folder / "ladder", command=command, data=DIGITS)
    return load_pretrained(folder / "ladder.json")


#: What the shipped ladder was trained on (recorded beside its weights).
DIGITS = {"name": "the built-in digits",
          "source": "scikit-learn load_digits (1,797 images, 8x8, 17 grey levels; ships inside the wheel)",
          "preprocessing": "bicubic upsampling to 16x16, pixels scaled to [-1, 1]",
          "split": "5% held out (seed 0), as `mlsde train --holdout 0.05`"}


def run_demo(out=None, quick: bool = False, train: bool = False, plan: Optional[DemoPlan] = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Runs the true-error panel and the experiment on the ladder (module docstring); returns the experiment's
    results with ``true_error`` added."""
    from ..files import check_writable_folder
    from ..true_error import format_true_error, run_true_error_panel

    plan = plan or (QUICK if quick else FULL)
    out = check_writable_folder(out if out is not None else plan.folder, "--out")  # before any work
    net, record = _ladder(plan, out, train, progress, log)
    log(f"[1/2] true-error panel (exact-score Gaussian mixture) -> {out / ('true-error' + plan.suffix)}")
    panel = run_true_error_panel(out / f"true-error{plan.suffix}", quick=plan.true_error_quick, progress=progress)
    log(format_true_error(panel))
    folder = out / f"experiment{plan.suffix}"
    log(f"[2/2] experiment on the image ladder -> {folder}")
    names = [f"width {w}" for w in net.widths]  # (the experiment samples with the schedule the ladder records)
    experiment = Experiment(net.levels(), record["image_shape"], plan.experiment, folder, names=names,
                            progress=progress)
    if experiment.cached_points:
        log(f"reusing {experiment.cached_points} points measured by an earlier run with the same settings and "
            f"weights ({folder / 'points.jsonl'}); delete the folder to measure them again")
    command = "mlsde demo" + (" --quick" if quick else "") + (" --train" if train else "") + f" --out {out}"
    results = experiment.run(title=f"mlsde demo: EM vs ML-EM on {record['name']}", command=command)
    grid = save_labelled_grid(experiment, folder / "samples_labelled.png")
    if grid is not None:
        results["figures"].append(grid.name)
    elif (folder / "samples_labelled.png").exists():  # every point came from the cache: the earlier grid stands
        grid = folder / "samples_labelled.png"
    results["true_error"] = panel
    log(format_speedups(results))
    log(f"report: {folder / 'report.md'}; labelled samples: {grid}; true-error panel: "
        f"{out / ('true-error' + plan.suffix) / 'true_error.png'}")
    return results


def save_labelled_grid(experiment: Experiment, path: Path, sampler: str = "ddpm") -> Optional[Path]:
    """A PNG with one labelled row per method: EM with each width at the reference's step count, the reference
    (EM top network), and the most accurate ML-EM point of the best curve. None when no images were kept (every
    point came from a cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_write
    from .data import image_grid
    from .frontier import best_curve

    cfg = experiment.config
    rows = [(f"EM {name}, {cfg.reference_steps} steps", (sampler, f"EM {name} {cfg.reference_steps}"))
            for name in experiment.names[:-1]]
    rows.append((f"reference: EM {experiment.names[-1]} (top), {cfg.reference_steps} steps", (sampler, "reference")))
    summary = _summary(experiment)
    best = best_curve(summary, sampler, family="mlem") if sampler in summary else None
    mlem = [p for p in experiment.points if p["sampler"] == sampler and p["family"] == "mlem"
            and (best is None or p["curve"] == best)]
    if mlem:
        chosen = min(mlem, key=lambda p: p["mse"])
        ratio = chosen["flops"] / next((p["flops"] for p in experiment.points if p["sampler"] == sampler and
                                        p["label"] == f"EM {experiment.names[-1]} {cfg.reference_steps}"), math.nan)
        rows.append((f"{chosen['label']}\n{ratio:.2f}x the reference's FLOPs, MSE {chosen['mse']:.3g}",
                     (sampler, chosen["label"])))
    images = [(label, experiment.grids.get(key)) for label, key in rows]
    images = [(label, im) for label, im in images if im is not None]
    if not images:
        return None
    n = max(im.shape[0] for _, im in images)
    fig, axes = plt.subplots(len(images), 1, figsize=(4.5 + 0.75 * n, 0.8 * len(images) + 0.2), squeeze=False)
    for ax, (label, im) in zip(axes[:, 0], images):
        ax.imshow(image_grid(im, nrow=im.shape[0]), interpolation="nearest")
        ax.text(-0.02, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
        ax.axis("off")
    fig.subplots_adjust(left=4.4 / (4.5 + 0.75 * n), right=0.99, top=0.98, bottom=0.02, hspace=0.15)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path


def _summary(experiment: Experiment) -> dict:
    from .frontier import summarise

    thresholds = {s: experiment.threshold(s) for s in experiment.config.samplers}
    return summarise(experiment.points, thresholds)


def _fmt(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _unthresholded(results: dict, sampler: str, curve: str) -> float:
    entry = (results.get("summary_no_threshold") or {}).get(sampler, {}).get("curves", {}).get(curve)
    return entry["flops"]["all"]["max"] if entry else math.nan


def format_speedups(results: dict) -> str:
    """A plain-text table of every ML-EM and T-Stitch curve's speedups (FLOPs and wall time); a '–' is
    explained below the table."""
    lines = []
    gamma = results.get("gamma")
    if gamma and math.isfinite(gamma.get("gamma", math.nan)):
        lo, hi = gamma["interval"]
        interval = f"95% interval {lo:.2f}–{hi:.2f}" if math.isfinite(hi) else \
            f"95% interval from {lo:.2f}, no upper bound with {len(gamma.get('flops', []))} smaller networks"
        lines.append(f"gamma of the ladder: {gamma['gamma']:.2f} ({interval})")
    elif gamma:
        lines.append(f"gamma of the ladder: not identified ({gamma.get('problem', 'no fit')}); see the report")
    header = (f"{'sampler':<7} {'curve':<34} {'max FLOPs':>10} {'protocol':>10} {'@EM-top':>9} {'max time':>9} "
              f"{'no thr.':>8}")
    lines += [header, "-" * len(header)]
    for sampler, entry in results["summary"].items():
        for curve, by_cost in entry["curves"].items():
            flops, seconds = by_cost["flops"], by_cost["seconds"]
            label = curve + (" †" if "stratified" in curve else "")
            lines.append(f"{sampler:<7} {label:<34} {_fmt(flops['all']['max']):>10} "
                         f"{_fmt(flops['protocol']['max']):>10} {_fmt(flops['all']['at_top500']):>9} "
                         f"{_fmt(seconds['all']['max']):>9} {_fmt(_unthresholded(results, sampler, curve)):>8}")
        top = entry.get("top500_mse")
        top_text = f"{top:.3g}" if top is not None and math.isfinite(top) else "not run (no 500-step EM point)"
        lines.append(f"{'':<7} threshold MSE {entry['threshold']:.3g}; EM top network 500 steps: MSE {top_text}")
    lines.append("speedup = compute of the best EM configuration (any network, any step count) / compute of the "
                 "curve, at equal held-out MSE (max over MSEs above the threshold; '@EM-top': at the MSE of EM with "
                 "the top network and 500 steps; 'protocol': against EM with 250-1000 steps only; 'no thr.': max FLOP "
                 "speedup over every MSE, threshold ignored); '–': the curve never reaches an MSE where EM has a "
                 "point to compare with (or beats none)")
    if any("stratified" in curve for entry in results["summary"].values() for curve in entry["curves"]):
        lines.append("† stratified coins: lower variance, but coins dependent across steps bias the path (the other "
                     "ML-EM curves are unbiased for the top network's sampler); see docs/theory.md")
    return "\n".join(lines)
