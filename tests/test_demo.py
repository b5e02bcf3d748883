"""``mlsde demo --quick``: every stage of the main job runs (training, EM, ML-EM, learning, T-Stitch, report).

It asserts that the stages work, not a speedup (three tiny networks trained for 150 steps).
"""

from __future__ import annotations

import json
import math

import pytest

from multilevel_sde.cli import main
from multilevel_sde.diffusion.demo import QUICK


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_runs_every_stage(quick_demo, capsys):
    results = json.loads((quick_demo / "experiment" / "results.json").read_text())
    cfg = QUICK.experiment
    families = {(p["sampler"], p["family"]) for p in results["points"]}
    for sampler in cfg.samplers:
        assert {(sampler, f) for f in ("em", "mlem", "tstitch")} <= families
        assert results["learned"][sampler]["sgd_steps"] == cfg.learn_steps
        assert math.isfinite(results["thresholds"][sampler]) and results["thresholds"][sampler] > 0
    curves = {p["curve"] for p in results["points"]}
    assert {"ML-EM inverse-cost 100", "ML-EM inverse-cost stratified 100", "ML-EM learned 100"} <= curves
    assert len(results["networks"]) == len(QUICK.presets)
    assert results["level_differences"]["rms"] and results["gamma"]["flops"]
    report = (quick_demo / "experiment" / "report.md").read_text()
    assert "Speedups over EM" in report and "ML-EM learned 100" in report
    for name in ("error_flops_ddpm.png", "error_time_ddim.png", "samples_ddpm.png"):
        assert (quick_demo / "experiment" / name).stat().st_size > 0
    for level in range(len(QUICK.presets)):  # the cached checkpoints a second run reuses
        assert (quick_demo / "ladder" / f"level_{level}" / "checkpoint.pt").exists()


def test_experiment_command_on_the_demo_ladder(quick_demo, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", str(quick_demo / "ladder"), "--out", str(out), "--heldout", "4", "--select", "4",
            "--batch", "4", "--samplers", "ddim", "--em-steps", "10,20", "--reference-steps", "20",
            "--mlem-steps", "20", "--p-top", "0.5", "--strategies", "inverse-cost", "--no-stratified",
            "--tstitch-fractions", "0.5", "--tstitch-steps", "20", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ML-EM inverse-cost 20" in printed and "T-Stitch 20" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "mlsde " + " ".join(args)
    assert len(results["points"]) == 3 * 2 + 1 + 1  # EM 3 networks x 2 steps, ML-EM 1, T-Stitch 1


def test_experiment_command_rejects_a_missing_ladder(tmp_path, capsys):
    assert main(["experiment", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
