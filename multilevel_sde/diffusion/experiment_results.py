"""What an experiment's measured points yield besides the speedups (:mod:`.frontier`): the ladder's gamma fits,
the notes of ``results.json``, and :func:`rescore`, which recomputes the speedups of a finished experiment."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..files import DamagedFileError, atomic_write_json, check_writable_folder, clean_stale_temporaries, read_json
from ..scaling import estimate_gamma

__all__ = ["ladder_gamma", "drift_gamma", "run_notes", "unthresholded_notes", "rescore", "UNTHRESHOLDED_NOTE"]

# what marks the notes of unthresholded speedups (rescore replaces them)
UNTHRESHOLDED_NOTE = ", without the threshold, max FLOP speedup over all EM points:"


def ladder_gamma(points: Sequence[dict], names: Sequence[str], reference_steps: int,
                 sampler: str = "ddpm") -> Optional[dict]:
    """gamma from the ``reference_steps``-step sample MSE of every network but the top against the top's (spec
    §9.7), read from the EM ``points``; ``names``: one per network, cheapest first. None: fewer than two networks
    below the top with a positive MSE."""
    rows = [(p["flops"] / reference_steps, p["mse"], names[p["networks"][0]])
            for p in points if p["sampler"] == sampler and p["family"] == "em"
            and p["steps"] == reference_steps and p["networks"][0] < len(names) - 1]
    rows = [r for r in rows if r[1] > 0]
    if len(rows) < 2:
        return None
    flops, errors, measured = zip(*rows)
    out = dict(flops=list(flops), error=list(errors), names=list(measured),
               quantity=f"MSE of each network's {reference_steps}-step {sampler.upper()} samples "
                        "to the top network's")
    try:
        est = estimate_gamma(errors, flops, squared=True)
    except ValueError as err:  # errors that do not fall with cost: no gamma
        return dict(out, slope=float("nan"), intercept=float("nan"), gamma=float("nan"),
                    interval=[float("nan")] * 2, problem=str(err))
    return dict(out, slope=est.fit.slope, intercept=est.fit.intercept, gamma=est.gamma,
                interval=list(est.interval))


def drift_gamma(differences: dict, flops: Sequence[float]) -> dict:
    """gamma from each network's distance to the top network's ``x0`` estimate along the reference trajectory
    (``differences["to_top"]``, from ``Experiment.level_differences``; ``flops``: every network's, cheapest first):
    an RMS-type error of the drift itself, ``log eps = c - (1/gamma) log C``."""
    errors = [float(np.mean(row)) for row in differences["to_top"]]
    try:
        est = estimate_gamma(errors, flops[:-1])
    except ValueError as err:
        return dict(gamma=float("nan"), interval=[float("nan")] * 2, problem=str(err), error=errors)
    return dict(gamma=est.gamma, interval=list(est.interval), slope=est.fit.slope, error=errors,
                flops=flops[:-1], quantity="RMS of each network's clipped x0 estimate to the top network's "
                                           "along the reference trajectory")


def run_notes(gamma: Optional[dict], gamma_drift: Optional[dict]) -> list:
    """The notes of ``results.json``: how the points were measured, and what the ladder's gammas (from
    :func:`ladder_gamma` and :func:`drift_gamma`) say."""
    out = ["Every point is measured on the held-out set (its own initial noises and Brownian paths); the "
           "learned probabilities were fitted on a separate selection set.",
           "The Poisson (continuous-time) solver does not apply here: the DDPM/DDIM updates are defined on "
           "their own non-uniform step grid with step-dependent coefficients, not as an SDE evaluated at "
           "arbitrary times."]
    if gamma is not None and not math.isfinite(gamma["gamma"]):
        out.append(f"No gamma: {gamma.get('problem', 'too few networks')}. The theory strategy was skipped.")
    elif gamma is not None and gamma["gamma"] <= 2:
        out.append(f"The ladder's measured gamma is {gamma['gamma']:.2f} (interval {gamma['interval'][0]:.2f}–"
                   f"{gamma['interval'][1]:.2f}), not above 2: the networks are not 'harder than Monte Carlo' "
                   "over this range, so ML-EM's polynomial speedup does not apply; what remains is a constant "
                   "factor, limited by how much the adjacent networks differ.")
    if gamma_drift is not None and math.isfinite(gamma_drift["gamma"]):
        lo, hi = gamma_drift["interval"]
        out.append(f"From the drift itself ({gamma_drift['quantity']}): gamma = {gamma_drift['gamma']:.2f} "
                   f"(95% interval {lo:.2f}–{hi:.2f}).")
    elif gamma_drift is not None:
        out.append(f"From the drift itself: no gamma ({gamma_drift['problem']}).")
    return out


def unthresholded_notes(unthresholded: dict) -> list:
    """The best speedup of each curve over every MSE, threshold or not (so a threshold that leaves no
    overlap does not hide how far ML-EM is from EM)."""
    out = []
    for sampler, entry in unthresholded.items():
        parts = []
        for curve, by_cost in entry["curves"].items():
            best = by_cost["flops"]["all"]
            if math.isfinite(best["max"]):
                parts.append(f"{curve}: {best['max']:.2g}x at MSE {best['mse_at_max']:.2g}")
        if parts:
            out.append(f"{sampler.upper()}{UNTHRESHOLDED_NOTE} " + "; ".join(parts) + ".")
    return out


def rescore(out_dir) -> dict:
    """Recomputes the speedups of a finished experiment from the points in ``out_dir/results.json`` (after a
    change to how they are computed, :mod:`.frontier`) and rewrites ``results.json``, ``report.md`` and the
    figures; the measured points, thresholds and sample grids stay as they are."""
    from .frontier import summarise
    from .report import write_all

    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {os.fspath(out)!r}: rescore needs a finished experiment")
    results = read_json(path, "experiment results", "re-run the experiment with the same command: its measured "
                        "points are cached in points.jsonl and are reused")
    if not isinstance(results, dict) or not isinstance(results.get("points"), list):
        raise DamagedFileError(f"{os.fspath(path)!r} is not an experiment's results.json (no list of points); "
                               "re-run the experiment that wrote the folder")
    check_writable_folder(out, "experiment folder")  # before any work: it rewrites files there
    clean_stale_temporaries(out)
    points, thresholds = results["points"], results.get("thresholds") or {}
    results["summary"] = summarise(points, thresholds)
    results["summary_no_threshold"] = summarise(points, {sampler: 0.0 for sampler in thresholds})
    notes = [n for n in results.get("notes") or [] if UNTHRESHOLDED_NOTE not in n]
    results["notes"] = notes + unthresholded_notes(results["summary_no_threshold"])
    write_all(results, out)
    atomic_write_json(path, results, indent=1, default=float)
    return results
