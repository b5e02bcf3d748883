"""The main job (``mlsde demo``): train a small UNet ladder on the built-in digits, then run the experiment.

Everything is offline: scikit-learn's 8x8 digits, upsampled to 16x16. Checkpoints are cached in
``out/ladder`` (a finished level is reused, an unfinished one resumes) and points in
``out/experiment/points.jsonl``, so a second run only redoes what changed.

    results = run_demo("runs/demo")            # <= 15 min on 2 CPU cores
    results = run_demo("runs/demo-quick", quick=True)   # the <= 3 min smoke version of every stage
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .experiment import ExperimentConfig, run_experiment
from .train import TrainConfig

__all__ = ["DemoPlan", "FULL", "QUICK", "run_demo", "format_speedups"]


@dataclass(frozen=True)
class DemoPlan:
    """A ladder to train on the default data and the experiment to run on it."""

    presets: tuple
    image_size: int
    train: TrainConfig
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)


FULL = DemoPlan(
    presets=("cpu-xs", "cpu-s", "cpu-m", "cpu-l"),
    image_size=16,
    train=TrainConfig(steps=600, batch_size=64, lr=1e-3, warmup=50, eval_every=None, eval_size=256,
                      checkpoint_every=250, log_every=50),
    experiment=ExperimentConfig(heldout=32, select=16, batch=32, samplers=("ddpm",),
                                em_steps=(10, 25, 50, 100, 250, 500, 1000), mlem_steps=(500, 250),
                                p_top=(0.3, 0.1, 0.03), learn_steps=4, learn_batch=16, learn_grid=50,
                                deltas=(-1.0, 0.0, 1.0), tstitch_fractions=(0.3, 0.6), tstitch_steps=(1000,)),
)

QUICK = DemoPlan(
    presets=("cpu-xs", "cpu-s", "cpu-m"),
    image_size=16,
    train=TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup=10, eval_every=None, eval_size=64,
                      checkpoint_every=None, log_every=50),
    experiment=ExperimentConfig(heldout=8, select=8, batch=8, samplers=("ddpm", "ddim"),
                                em_steps=(25, 50, 100), reference_steps=100, mlem_steps=(100,),
                                p_top=(0.3, 0.1), learn_steps=2, learn_batch=8, learn_grid=25,
                                deltas=(-1.0, 1.0), tstitch_fractions=(0.5,), tstitch_steps=(100,)),
)


def run_demo(out="runs/demo", quick: bool = False, plan: Optional[DemoPlan] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Trains ``plan``'s ladder on the default data in ``out/ladder`` (or reuses it), runs the experiment into
    ``out/experiment`` and returns its results (see ``experiment.Experiment.run``)."""
    from .data import load_dataset
    from .train import load_ladder, train_ladder

    plan = plan or (QUICK if quick else FULL)
    out = Path(out)
    data = load_dataset("default", plan.image_size)
    log(f"[1/2] ladder {', '.join(plan.presets)} on the built-in digits ({len(data)} images, "
        f"{plan.image_size}x{plan.image_size}), {plan.train.steps} steps each -> {out / 'ladder'}")
    train_ladder(list(plan.presets), data, plan.train.replace(progress=progress), out / "ladder", report=False)
    models, _, shape = load_ladder(out / "ladder")
    log(f"[2/2] experiment -> {out / 'experiment'}")
    command = "mlsde demo" + (" --quick" if quick else "") + f" --out {out}"
    results = run_experiment(models, shape, out / "experiment", plan.experiment, names=list(plan.presets),
                             progress=progress, title="mlsde demo: EM vs ML-EM on the built-in digits",
                             command=command)
    log(format_speedups(results))
    log(f"report: {out / 'experiment' / 'report.md'}")
    return results


def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _unthresholded(results: dict, sampler: str, curve: str) -> float:
    entry = (results.get("summary_no_threshold") or {}).get(sampler, {}).get("curves", {}).get(curve)
    return entry["flops"]["all"]["max"] if entry else math.nan


def format_speedups(results: dict) -> str:
    """A plain-text table of every ML-EM and T-Stitch curve's speedups (FLOPs and wall time)."""
    lines = []
    gamma = results.get("gamma")
    if gamma and math.isfinite(gamma.get("gamma", math.nan)):
        lo, hi = gamma["interval"]
        lines.append(f"gamma of the ladder: {gamma['gamma']:.2f} (95% interval {lo:.2f}–{hi:.2f})")
    elif gamma:
        lines.append(f"gamma of the ladder: not identified ({gamma.get('problem', 'no fit')}); see the report")
    header = (f"{'sampler':<7} {'curve':<34} {'max FLOPs':>10} {'protocol':>10} {'@EM-500':>9} {'max time':>9} "
              f"{'no thr.':>8}")
    lines += [header, "-" * len(header)]
    for sampler, entry in results["summary"].items():
        for curve, by_cost in entry["curves"].items():
            flops, seconds = by_cost["flops"], by_cost["seconds"]
            lines.append(f"{sampler:<7} {curve:<34} {_fmt(flops['all']['max']):>10} "
                         f"{_fmt(flops['protocol']['max']):>10} {_fmt(flops['all']['at_top500']):>9} "
                         f"{_fmt(seconds['all']['max']):>9} {_fmt(_unthresholded(results, sampler, curve)):>8}")
        lines.append(f"{'':<7} threshold MSE {entry['threshold']:.3g}; EM top network 500 steps: MSE "
                     f"{entry['top500_mse']:.3g}")
    lines.append("speedup = compute of the best EM configuration / compute of the curve, at equal held-out MSE "
                 "(max over MSEs above the threshold; '@EM-500' at the MSE of EM with the top network and 500 "
                 "steps; 'protocol' against EM with 250-1000 steps only; 'no thr.': max FLOP speedup over every "
                 "MSE, threshold ignored)")
    return "\n".join(lines)
