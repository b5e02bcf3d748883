"""``mlsde demo``: the shipped ladder through every stage (quick), the table it prints, and ``--train``.

The quick demo asserts that the stages work, not a speedup (that is the full demo's job, measured in
docs/experiments.md).
"""

from __future__ import annotations

import json
import math
import re

import pytest

from multilevel_sde.cli import main
from multilevel_sde.diffusion.demo import QUICK, DemoPlan, run_demo
from multilevel_sde.diffusion.experiment import ExperimentConfig
from multilevel_sde.diffusion.nested import NestedUNet
from multilevel_sde.diffusion.pretrained import load_pretrained, sha256_of


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_runs_every_stage(quick_demo):
    results = json.loads((quick_demo / "experiment-quick" / "results.json").read_text())
    cfg = QUICK.experiment
    families = {(p["sampler"], p["family"]) for p in results["points"]}
    for sampler in cfg.samplers:
        assert {(sampler, f) for f in ("em", "mlem", "tstitch")} <= families
        assert results["learned"][sampler]["sgd_steps"] == cfg.learn_steps
        assert math.isfinite(results["thresholds"][sampler]) and results["thresholds"][sampler] > 0
    names = [n["name"] for n in results["networks"]]
    assert names == ["width 3", "width 6", "width 10", "width 16", "width 24"]
    flops = [n["flops"] for n in results["networks"]]
    assert flops == sorted(flops)
    assert results["mlem_networks"] == names[:1] + names[2:3] + names[-1:]  # smallest, middle, largest
    report = (quick_demo / "experiment-quick" / "report.md").read_text()
    assert "Speedups over EM" in report
    for name in ("error_flops_ddpm.png", "speedup_ddpm.png", "samples_labelled.png"):
        assert (quick_demo / "experiment-quick" / name).stat().st_size > 0
    panel = json.loads((quick_demo / "true-error-quick" / "true_error.json").read_text())
    assert panel["fits"]["em"]["exponent"] > panel["fits"]["mlem"]["exponent"]
    assert (quick_demo / "true-error-quick" / "true_error.png").stat().st_size > 0


def test_quick_demo_prints_numbers_not_nan_and_reruns_in_the_same_folder(quick_demo, capsys):
    assert main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 0  # cached points reused
    printed = capsys.readouterr().out
    assert "shipped digits16-nested" in printed and "True-error panel" in printed
    assert re.search(r"reusing \d+ points measured by an earlier run", printed)
    assert not re.search(r"\bnan\b|\binf\b", printed, re.IGNORECASE), printed
    assert re.search(r"ML-EM inverse-cost 25 +\d", printed)
    assert "† stratified coins" in printed


def test_train_reproduces_a_ladder_with_its_record(tmp_path):
    """``run_demo(train=True)`` trains the plan's ladder (``mlsde train`` with its arguments), exports it with its
    record, and runs on it; a second run reuses the finished checkpoint (same weights: the points are reused)."""
    small = ExperimentConfig(heldout=4, select=4, batch=4, samplers=("ddim",), em_steps=(10, 20), reference_steps=20,
                             mlem_steps=(20,), p_top=(0.5,), strategies=("inverse-cost",), stratified=(),
                             tstitch_fractions=(0.5,), tstitch_steps=(20,))
    plan = DemoPlan(experiment=small, train_args=QUICK.train_args, true_error_quick=True, suffix="-quick")
    log = []
    results = run_demo(tmp_path, plan=plan, train=True, progress=False, log=log.append)
    assert any(line.startswith("ladder: mlsde train --nested nested-cpu") for line in log)
    assert [n["name"] for n in results["networks"]] == ["width 3", "width 6", "width 10"]
    folder = tmp_path / "ladder-quick"
    assert (folder / "checkpoint.pt").exists()
    net, record = load_pretrained(folder / "ladder.json")
    assert isinstance(net, NestedUNet) and net.widths == (3, 6, 10)
    assert record["sha256"] == sha256_of(folder / "ladder.safetensors")
    assert record["command"].startswith("mlsde train --nested nested-cpu") and record["steps"] == 40
    trained = (folder / "checkpoint.pt").stat().st_mtime_ns
    log.clear()
    run_demo(tmp_path, plan=plan, train=True, progress=False, log=log.append)  # finished: reused, not retrained
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == trained
    assert any(re.match(r"reusing 8 points measured by an earlier run with the same settings and weights", line)
               for line in log)
    again, _ = load_pretrained(folder / "ladder.json")
    assert all(a.equal(b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))

    out = tmp_path / "exp"  # a nested checkpoint is a whole ladder for `mlsde experiment`
    args = ["experiment", str(folder), "--out", str(out), "--heldout", "4", "--select", "4", "--batch", "4",
            "--samplers", "ddim", "--em-steps", "10,20", "--reference-steps", "20", "--mlem-steps", "20",
            "--p-top", "0.5", "--strategies", "inverse-cost", "--no-stratified", "--tstitch-fractions", "0.5",
            "--tstitch-steps", "20", "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 3 * 2 + 1 + 1  # EM 3 widths x 2 steps, ML-EM 1, T-Stitch 1


def test_experiment_command_rejects_a_missing_ladder(tmp_path, capsys):
    assert main(["experiment", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_demo_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(target), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err and target.read_text() == "keep me"
