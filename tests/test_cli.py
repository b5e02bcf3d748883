"""The ``mlsde`` command end to end on a tiny setting."""

import json
import subprocess
import sys

import pytest

from multilevel_sde import __version__
from multilevel_sde.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0 and "demo" in capsys.readouterr().out


def test_toy_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["toy", "--k", "3", "--paths", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ML-EM" in printed and "EM, top level" in printed
    rows = json.loads(out.read_text())
    assert {r["method"].split(",")[0] for r in rows} == {"EM", "ML-EM"}
    assert all(r["rms_error"] > 0 and r["cost"] > 0 for r in rows)


def test_toy_rejects_bad_arguments(capsys):
    assert main(["toy", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


def test_console_script_module_entry():
    done = subprocess.run([sys.executable, "-m", "multilevel_sde.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout


def test_train_then_sample_end_to_end(tmp_path, capsys):
    """mlsde train (two tiny levels on the built-in data) then mlsde sample with EM and ML-EM."""
    out = tmp_path / "ladder"
    assert main(["train", "--preset", "cpu-xs", "--preset", "cpu-s", "--data", "default", "--image-size", "16",
                 "--limit", "64", "--steps", "4", "--batch-size", "8", "--eval-size", "8", "--eval-every", "0",
                 "--log-every", "2", "--out", str(out), "--no-progress"]) == 0
    levels = sorted(str(p) for p in out.glob("level_*"))
    assert len(levels) == 2 and all((out / p / "checkpoint.pt").exists() for p in levels)
    png = tmp_path / "ml.png"
    assert main(["sample", *levels, "--probs", "1,0.3", "--steps", "10", "--batch", "4", "--no-progress",
                 "--out", str(png)]) == 0
    record = json.loads(png.with_suffix(".json").read_text())
    assert png.exists() and record["settings"]["multilevel"] and len(record["evaluations"]) == 2
    assert record["evaluations"][1] < record["evaluations"][0] == 40
    assert main(["sample", levels[-1], "--method", "ddim", "--steps", "5", "--batch", "2", "--no-progress",
                 "--out", str(tmp_path / "em.png")]) == 0
    assert main(["sample", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_reports_bad_data_clearly(tmp_path, capsys):
    assert main(["train", "--preset", "cpu-xs", "--data", f"folder:{tmp_path / 'nowhere'}", "--out",
                 str(tmp_path / "o"), "--steps", "1", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--preset", "cpu-xs", "--data", f"folder:{tmp_path / 'empty'}", "--out",
                 str(tmp_path / "o"), "--steps", "1", "--no-progress"]) == 2
    assert "no images" in capsys.readouterr().err


def _parsers():
    """``(command, parser)`` for ``mlsde`` and each subcommand."""
    import argparse

    from multilevel_sde.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("mlsde", parser)] + [(f"mlsde {name}", p) for name, p in sub.choices.items()], sub


def test_every_option_has_a_help_text_with_its_default():
    import argparse

    parsers, sub = _parsers()
    assert {name for name, _ in parsers} >= {f"mlsde {c}" for c in ("demo", "toy", "experiment", "rescore", "train",
                                                                      "sample")}
    assert all((choice.help or "").strip() for choice in sub._choices_actions), "a subcommand without help"
    missing, no_default = [], []
    for command, parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            label = f"{command} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(label)
            elif action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = formatter._expand_help(action)
                if "default" not in shown.lower():
                    no_default.append(label)
                elif "%(default)" in formatter._get_help_string(action):
                    assert str(action.default) in shown, label  # the default shown is the option's own
    assert not missing, f"options without a help text: {missing}"
    assert not no_default, f"options whose help does not show their default: {no_default}"


def test_train_help_names_mlsde_train(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: mlsde train")


def test_train_options_are_train_configs_fields():
    """mlsde train has one option per TrainConfig field, with the field's help and default (the progress bar is on
    from the command line); an option's 'off' value (--grad-clip 0) is the field's None."""
    import dataclasses

    from multilevel_sde.cli import dataclass_values
    from multilevel_sde.diffusion.train import TrainConfig

    parsers, _ = _parsers()
    train = dict(parsers)["mlsde train"]
    options = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(TrainConfig):
        action = options[field.name]
        assert "--" + field.name.replace("_", "-") in action.option_strings
        assert action.help == field.metadata["help"]
        assert action.default == (True if field.name == "progress" else field.default), field.name
    args = train.parse_args(["--out", "o", "--grad-clip", "0", "--eval-every", "0", "--no-ema-warmup"])
    config = TrainConfig(**dataclass_values(args, TrainConfig))
    assert config.grad_clip is None and config.eval_every is None and config.ema_warmup is False
    assert config.checkpoint_every == TrainConfig().checkpoint_every



def test_experiment_options_are_experiment_configs_fields(tmp_path, monkeypatch, capsys):
    """mlsde experiment has one option per ExperimentConfig field with a help (so a new field cannot be forgotten),
    with that help and the field's default (a tuple as its comma-separated items); a command line gives the config
    it says (lists, None, choices, --no-stratified, thresholds), and a bad list is refused naming its flag."""
    import dataclasses

    import multilevel_sde.diffusion.experiment as experiment
    import multilevel_sde.diffusion.train as train
    from multilevel_sde.diffusion.experiment import ExperimentConfig

    parsers, _ = _parsers()
    options = {s: a for a in dict(parsers)["mlsde experiment"]._actions for s in a.option_strings}
    fields = [f for f in dataclasses.fields(ExperimentConfig) if "help" in f.metadata]
    assert len(fields) >= 20
    for field in fields:
        action = options["--" + field.name.replace("_", "-")]
        assert action.dest == field.name and action.help == field.metadata["help"], field.name
        default = field.default
        assert action.default == (",".join(map(str, default)) if isinstance(default, tuple) else default), field.name

    class Captured(Exception):
        """Raised by the stand-in Experiment with the config mlsde experiment built."""

    def capture(models, shape, config, out, **kwargs):
        raise Captured(config)

    monkeypatch.setattr(train, "load_ladder", lambda *args, **kwargs: ([], [], (1, 8, 8)))
    monkeypatch.setattr(experiment, "Experiment", capture)
    command = ["experiment", "LADDER", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(Captured) as captured:
        main([*command, "--em-steps", "10,25,50", "--p-top", "0.5,0.1", "--deltas=-1,0,1", "--mlem-networks", "0,2,4",
              "--samplers", "ddim", "--strategies", "inverse-cost,adaptive", "--no-stratified", "--comonotone",
              "theory,", "--coupling", "batch", "--learn-grid", "50", "--threshold-ddim", "0.02", "--seed", "3"])
    assert captured.value.args[0] == dataclasses.replace(
        ExperimentConfig(), em_steps=(10, 25, 50), p_top=(0.5, 0.1), deltas=(-1.0, 0.0, 1.0), mlem_networks=(0, 2, 4),
        samplers=("ddim",), strategies=("inverse-cost", "adaptive"), stratified=(), comonotone=("theory",),
        coupling="batch", learn_grid=50, threshold={"ddim": 0.02}, seed=3)
    with pytest.raises(Captured) as captured:
        main([*command, "--mlem-networks", "", "--stratified", "theory,learned"])
    assert captured.value.args[0] == dataclasses.replace(ExperimentConfig(), stratified=("theory", "learned"))
    for flag, value, needle in [("--em-steps", "10,x", "--em-steps must be comma-separated integers, got '10,x'"),
                                ("--p-top", "0.5,nan", "--p-top must hold finite numbers"),
                                ("--samplers", "ddpm,", "--samplers must be a non-empty subset")]:
        assert main([*command, flag, value]) == 2
        assert needle in capsys.readouterr().err
