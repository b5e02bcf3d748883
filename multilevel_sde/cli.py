"""The ``mlsde`` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .files import FolderLock, FolderLockedError


def _demo(args: argparse.Namespace) -> int:
    from .diffusion.demo import run_demo

    run_demo(args.out, quick=args.quick, train=args.train, progress=args.progress)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (``main``'s argv), for the records it writes."""
    return " ".join(["mlsde", *map(shlex.quote, getattr(args, "argv", []))])


def _list(text: str, flag: str, kind: type, keep_empty: bool = False) -> tuple:
    """The comma-separated values of ``flag``; a ValueError naming the flag, the value and the bad item. Empty items
    are skipped; ``kind`` str: the names as typed, with the empty ones too if ``keep_empty``."""
    if kind is str:
        return tuple(item for item in str(text).split(",") if item or keep_empty)
    values = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        try:
            value = kind(item)
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated {'integers' if kind is int else 'numbers'}, got "
                             f"{text!r} ({item.strip()!r} is not one)") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{flag} must hold finite numbers, got {text!r}")
        values.append(value)
    return tuple(values)


def _floats(text: str, flag: str = "the list") -> tuple:
    return _list(text, flag, float)


def _at_least(flag: str, value, low: int = 1) -> None:
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")


#: what ``mlsde sample --out`` may be (the statistics go beside it as .json)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _written_by(command: str, keys: Sequence[str] = ()):
    """``owned(path)`` for ``files.check_new_file``: a JSON record an earlier ``command`` wrote (its
    ``written_by``, or a ``command`` that starts with it, or else all of ``keys``)."""
    def owned(path: Path) -> bool:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        rows = record if isinstance(record, list) else [record]
        if not rows or not all(isinstance(r, dict) for r in rows):
            return False
        first = rows[0]
        if first.get("written_by") == command or str(first.get("command", "")).startswith(command):
            return True
        return bool(keys) and all(all(k in r for k in keys) for r in rows)
    return owned


def _experiment_config(args: argparse.Namespace):
    """The ``ExperimentConfig`` of the flags, validated; every message names the flag (``--em-steps``)."""
    from .diffusion.experiment import ExperimentConfig

    thresholds = {k: v for k, v in (("ddpm", args.threshold_ddpm), ("ddim", args.threshold_ddim)) if v is not None}
    config = ExperimentConfig(**dataclass_values(args, ExperimentConfig), threshold=thresholds or None)
    _at_least("--learn-grid", args.learn_grid)
    try:
        return config.validate()
    except ValueError as err:  # the config's field names, as the flags the user typed
        raise ValueError(_as_flags(str(err))) from None


def _as_flags(text: str) -> str:
    """An ``ExperimentConfig`` message that starts with a field name (``em_steps must ...``, ``unknown
    strategies ...``) with the flag instead (``--em-steps``)."""
    import dataclasses
    import re

    from .diffusion.experiment import ExperimentConfig

    for field in sorted((f.name for f in dataclasses.fields(ExperimentConfig)), key=len, reverse=True):
        text = re.sub(rf"^(unknown )?{field}\b", lambda m: (m.group(1) or "") + "--" + field.replace("_", "-"),
                      text, count=1)
    return text


def _experiment(args: argparse.Namespace) -> int:
    from .diffusion.experiment import Experiment
    from .diffusion.train import load_ladder
    from .files import check_writable_folder

    config = _experiment_config(args)  # before any work: bad flags, an unwritable --out
    check_writable_folder(args.out, "--out")
    models, names, shape = load_ladder(args.ladder, device=args.device)
    with FolderLock(args.out, "mlsde experiment"):  # one experiment per folder at a time
        try:  # what the config says about this ladder (indices, steps against its schedule's T), as flags
            experiment = Experiment(models, shape, config, args.out, names=names, device=args.device,
                                    progress=args.progress)
        except ValueError as err:
            raise ValueError(_as_flags(str(err))) from None
        results = experiment.run(title=args.title, command=_command_line(args))
    from .diffusion.demo import format_speedups

    print(format_speedups(results))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    from .diffusion.demo import format_speedups
    from .diffusion.experiment import rescore

    for folder in args.folders:
        print(f"{folder}:")
        with FolderLock(folder, "mlsde rescore") if Path(folder).is_dir() else contextlib.nullcontext():
            print(format_speedups(rescore(folder)))
    return 0


def _toy(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_toy_demo

    for flag, value in (("--k", args.k), ("--d", args.d), ("--paths", args.paths)):
        if value < 1:
            print(f"mlsde toy: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if not (math.isfinite(args.gamma) and args.gamma > 0):
        print(f"mlsde toy: --gamma must be a finite number > 0, got {args.gamma}", file=sys.stderr)
        return 2
    if args.seed < 0:
        print(f"mlsde toy: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    if args.json:  # before any work; an existing file is replaced only if an earlier mlsde toy wrote it
        from .files import check_new_file

        check_new_file(args.json, "--json", owned=_written_by("mlsde toy", keys=("method", "rms_error", "cost")))
    print(f"ML-EM vs EM on a synthetic ladder: k={args.k} levels, cost of level l = 2^({args.gamma} l), "
          f"d={args.d}, {args.paths} paths on [0, 1], one shared Brownian path per sample.")
    rows = run_toy_demo(k=args.k, gamma=args.gamma, d=args.d, paths=args.paths, seed=args.seed)
    print(format_rows(rows, args.paths))
    print("RMS error against fine-step EM of the true drift; cost in level units per path (exact rule).")
    if args.json:
        from .files import atomic_write_json

        atomic_write_json(args.json, [row.__dict__ for row in rows], indent=2)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------- options from a dataclass (train, experiment)
#: ``metadata["cli"]`` keys that :func:`dataclass_values` reads, not argparse
_READ_BACK = ("off", "items", "keep_empty")


def _item_type(field: dataclasses.Field) -> Optional[type]:
    """The type of the items of a tuple ``field`` given as a comma-separated list (``metadata["cli"]["items"]``, else
    its default's first item's, else str); None for a field that is not a tuple."""
    cli = field.metadata.get("cli", {})
    if "items" in cli:
        return cli["items"]
    if isinstance(field.default, tuple):
        return type(field.default[0]) if field.default else str
    return None


def add_dataclass_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One option per field of the dataclass ``config_class`` that has a ``metadata["help"]``: ``--field-name``
    (``dest`` the field), with that help and the field's default and type; a bool is a ``--name/--no-name``
    switch; a tuple is a string of comma-separated items (default: the field's, joined), read back by
    :func:`dataclass_values`. ``metadata["cli"]`` overrides argparse settings (``default``, ``type``, ``choices``)
    and may name ``off`` (the option's value that means None), ``items`` (the type of a tuple's items, when its
    default does not show it) and ``keep_empty`` (a tuple of names keeps its empty items, for validation)."""
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata:
            continue
        settings = {k: v for k, v in field.metadata.get("cli", {}).items() if k not in _READ_BACK}
        settings.setdefault("default", field.default)
        default = settings["default"]
        if _item_type(field) is not None:
            if isinstance(default, tuple):
                settings["default"] = ",".join(map(str, default))
        elif isinstance(default, bool):
            settings["action"] = argparse.BooleanOptionalAction
        elif default is not None and "choices" not in settings:
            settings.setdefault("type", type(default))
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, help=field.metadata["help"],
                            **settings)


def dataclass_values(args: argparse.Namespace, config_class: type) -> dict:
    """The values of :func:`add_dataclass_options`' options, by field: an ``off`` value as None, a comma-separated
    list as a tuple (a ValueError names the flag and the bad item)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata:
            continue
        cli, value, kind = field.metadata.get("cli", {}), getattr(args, field.name), _item_type(field)
        if "off" in cli and value == cli["off"]:
            value = None
        elif kind is not None and isinstance(value, str):
            value = _list(value, "--" + field.name.replace("_", "-"), kind, cli.get("keep_empty", False))
        values[field.name] = value
    return values


# ------------------------------------------------------------------------------------------------ mlsde train
def _add_train_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .diffusion.train import TrainConfig

    p.description = ("Train one SeparableUNet level (or a ladder of them, or one NestedUNet whose widths are the "
                     "levels) on the eps-prediction loss, with an EMA, resumable checkpoints and held-out losses. "
                     "Runs under torchrun for several processes (DistributedDataParallel): "
                     "torchrun --nproc_per_node=2 -m multilevel_sde.diffusion.train ...")
    p.add_argument("--preset", action="append", default=None,
                   help="UNet preset(s) (e.g. cpu-s); several (repeated or comma-separated) train a ladder")
    p.add_argument("--family", default=None, help="train the whole ladder of a preset family ('cpu', 'paper')")
    p.add_argument("--nested", default=None, metavar="PRESET",
                   help="train one NestedUNet whose widths are the ladder's levels (e.g. nested-cpu; see "
                        "multilevel_sde.diffusion.nested) instead of separate presets")
    p.add_argument("--widths", default=None, help="with --nested: the base widths, e.g. 4,8,12,16,24")
    p.add_argument("--data", default="default",
                   help="data spec: default (the built-in digits), celeba:PATH, folder:PATH or a bare PATH")
    p.add_argument("--image-size", type=int, default=16, help="image height and width the data are resized to")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: the data's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction (< 1) or count (>= 1)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a checkpoint)")
    p.add_argument("--channels-last", action="store_true",
                   help="store the weights and run the UNet(s) in the channels_last memory format")
    p.add_argument("--distill", action="store_true", help="ladder: distil each level from a larger one")
    p.add_argument("--distill-target", choices=["next", "top"], default="next",
                   help="with --distill: each level's teacher is the next larger level or the top one")
    p.add_argument("--init-from", default=None,
                   help="one level: start from evenly spaced channels and the first blocks of this (larger) "
                        "checkpoint's EMA weights (weight selection) instead of a random initialisation")
    add_dataclass_options(p, TrainConfig)  # --steps, --lr, ... (TrainConfig's fields)
    p.set_defaults(func=_train)
    return p


def _train(args: argparse.Namespace) -> int:
    return _run_training(args, "mlsde train", quiet=False)


def train_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, quiet: bool = False) -> int:
    """``mlsde train ARGV`` from Python: errors are raised (a ``ValueError`` naming the flag), not printed; a
    command-line mistake exits with status 2. ``prog``: the command's name in usage and messages; ``quiet``: do
    not print the summary (it is in the output folder's ``summary.json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "mlsde train"
    args = _add_train_options(Parser(prog=prog, formatter_class=HelpFormatter)).parse_args(argv)
    args.argv = ["train", *argv]
    return _run_training(args, prog, quiet)


def _run_training(args: argparse.Namespace, prog: str, quiet: bool) -> int:
    """``mlsde train``: the flags checked, ``--out`` locked (first process), then ``train.command.train_command``.
    A signal that stopped training is one line saying how to resume (status 130/143); config errors name the
    flags."""
    import re

    from .diffusion.train import TrainConfig, TrainingInterrupted
    from .diffusion.train.command import train_command
    from .diffusion.train.processes import launch_rank
    from .files import DamagedFileError, check_writable_folder

    presets = [p for entry in (args.preset or []) for p in entry.split(",") if p]
    if args.family:
        from .diffusion.unet import ladder_presets

        presets += ladder_presets(args.family)
    if not presets and not args.nested:
        raise UsageError(prog, "give --preset NAME (or several, or --family cpu, or --nested nested-cpu)")
    if presets and args.nested:
        raise UsageError(prog, "give --preset/--family or --nested, not both")
    if (args.distill_from or args.init_from) and len(presets) > 1:
        raise UsageError(prog, "--distill-from and --init-from train one level; for a ladder use --distill")
    try:
        config = TrainConfig(**dataclass_values(args, TrainConfig))
        lock = FolderLock(args.out, prog)
        if launch_rank() == 0:  # before any work: an unwritable --out, or one another run writes into, fails now
            check_writable_folder(args.out, "--out")
            lock.acquire()
        try:
            return train_command(args, presets, config, quiet)
        finally:
            lock.release()
    except TrainingInterrupted as stop:
        print(f"{prog}: {stop.signame} at step {stop.step} of {stop.steps}: saved {str(stop.checkpoint)!r}; "
              f"resume with: {prog} {shlex.join(args.argv[1:])}", file=sys.stderr)
        return stop.exit_code
    except ValueError as err:  # name the flags, not the config fields: TrainConfig.batch_size -> --batch-size
        text = re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        if text == str(err):
            raise
        raise (type(err) if type(err) in (ValueError, DamagedFileError) else ValueError)(text) from err


def _sample_outputs(args: argparse.Namespace) -> Path:
    """``--out`` of ``mlsde sample``, checked with the numeric flags before anything is loaded: an image name in a
    writable folder, and neither it nor its ``.json`` a file that an earlier ``mlsde sample`` did not write."""
    from .files import check_new_file

    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--image-size", args.image_size),
                        ("--T", args.T)):
        _at_least(flag, value)
    if args.probs:
        _floats(args.probs, "--probs")
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--out {args.out!r} must name an image file ({', '.join(IMAGE_SUFFIXES)}); the statistics "
                         "are written beside it as .json")
    record = out.with_suffix(".json")
    owned = _written_by("mlsde sample")
    check_new_file(record, "--out's statistics file", owned=owned)
    check_new_file(out, "--out", owned=lambda path: record.exists() and owned(record))
    return out


def _trained_or_typed(trained, schedule, args: argparse.Namespace, given: set):
    """The schedule to sample with: the one the networks were trained with (None: unknown) unless --schedule or
    --T is typed; a typed one must be that one."""
    from .diffusion.schedule import NoiseSchedule, same_schedule

    typed = "--schedule" in given or "--T" in given
    if trained is None:
        return NoiseSchedule.named(args.schedule, args.T) if args.T else schedule
    if not typed:
        return trained
    wanted = NoiseSchedule.named(args.schedule if "--schedule" in given else trained.kind, args.T or trained.T)
    if not same_schedule(wanted, trained):
        raise ValueError(f"--schedule {wanted.kind} --T {wanted.T} is not the schedule the levels were trained with "
                         f"({trained.kind}, T={trained.T}; {', '.join(args.levels)}): leave --schedule and --T out "
                         "to sample with it")
    return trained


def _sample(args: argparse.Namespace) -> int:
    from .diffusion.data import save_image_grid
    from .diffusion.external import DiffusersModel, is_diffusers_folder, load_diffusers_level
    from .diffusion.sample import sample
    from .diffusion.schedule import NoiseSchedule
    from .diffusion.train import load_level, trained_schedule
    from .files import atomic_write_json
    from .probabilities import InverseCost

    paths = [p for entry in args.levels for p in entry.split(",") if p]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"mlsde sample: checkpoint(s) not found: {missing}", file=sys.stderr)
        return 2
    out = _sample_outputs(args)  # before any work: the flags, and files it may write
    # a diffusers save_pretrained folder is a level too, with its scheduler's schedule and prediction_type
    models = [load_diffusers_level(p, device=args.device) if is_diffusers_folder(p) else
              load_level(p, device=args.device) for p in paths]
    given = {a.split("=")[0] for a in getattr(args, "argv", [])}  # options typed, not defaulted
    if args.probs and args.inverse_cost:
        print("mlsde sample: give --probs or --inverse-cost, not both", file=sys.stderr)
        return 2
    probabilities = None
    if args.probs:
        probabilities = list(_floats(args.probs, "--probs"))
    elif args.inverse_cost:
        probabilities = InverseCost(args.inverse_cost)
    first = models[-1]
    config = getattr(first, "config", {})
    channels = int(config.get("in_channels", 3))
    shape = (channels, args.image_size, args.image_size)
    if isinstance(first, DiffusersModel) and first.image_shape and "--image-size" not in given:
        shape = first.image_shape  # the network's own sample_size
    schedule = NoiseSchedule.named(args.schedule)
    # our checkpoints record the schedule they were trained with (load_level), a diffusers folder its scheduler's:
    # sample with it, and refuse a --schedule/--T typed that differs (a mixed ladder is refused by
    # trained_schedule, naming the files)
    schedule = _trained_or_typed(trained_schedule(models), schedule, args, given)
    steps = args.steps if "--steps" in given else min(args.steps, schedule.T)
    as_scheduler = getattr(first, "scheduler_sampling", {})  # a diffusers network samples as its scheduler does
    result = sample(models, shape, batch=args.batch, method=args.method, steps=steps,
                    schedule=schedule, probabilities=probabilities,
                    coupling=args.coupling, coins=args.coins, base=args.base, seed=args.seed,
                    device=args.device, progress=args.progress, **as_scheduler)
    save_image_grid(result.images, out, nrow=min(8, args.batch), scale=max(1, 128 // shape[-1]))
    stats = result.stats.as_dict()
    record = {"levels": paths, "settings": result.settings, "flops": result.flops, "seconds": result.seconds,
              "network_calls": stats["calls"], "evaluations": stats["evaluations"], "stats": stats,
              "schedule": {"kind": schedule.kind, "T": schedule.T}, "command": _command_line(args),
              "written_by": "mlsde sample"}
    atomic_write_json(out.with_suffix(".json"), record, indent=1, default=str)
    print(f"{args.method} x {steps} steps, {len(models)} level(s): evaluations {stats['evaluations']}, "
          f"calls {stats['calls']}, {result.flops:.4g} FLOPs, {result.seconds:.2f} s")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


class UsageError(SystemExit):
    """A command-line mistake: ``PROG: error: MESSAGE (see PROG --help)`` on stderr, status 2; ``str(error)`` is the
    message."""

    def __init__(self, prog: str, message: str):
        self.message = " ".join(message.split())
        print(f"{prog}: error: {self.message} (see {prog} --help)", file=sys.stderr)
        super().__init__(2)

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (:class:`UsageError`, as every error of ``mlsde``)."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of ``mlsde`` and its subcommands: each option's default is appended to its help as
    ``(default: VALUE)``, read from the option itself, unless the help already states it (``(default...``) or
    the default is None or False (no value, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .diffusion.experiment import ExperimentConfig

    parser = Parser(
        prog="mlsde",
        description="Multilevel Euler–Maruyama: solve SDEs whose drift is a ladder of approximators.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"multilevel-sde {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the main job: EM vs ML-EM on the shipped pretrained nested ladder (built-in "
                                       "digits) and the exact-error panel (<= 5 min on 2 CPU cores)")
    demo.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo-quick with --quick)")
    demo.add_argument("--quick", action="store_true", help="the <= 2 min smoke version of every stage")
    demo.add_argument("--train", action="store_true",
                      help="retrain the ladder from scratch with its recorded command (3,000 steps: 53 min measured "
                           "on 2 busy CPU cores; about a minute with --quick) instead of loading the shipped one")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="progress bars (default: on)")
    demo.set_defaults(func=_demo)
    toy = sub.add_parser("toy", help="ML-EM against EM on a synthetic ladder whose cost grows like 2^(gamma l)")
    toy.add_argument("--k", type=int, default=6, help="number of levels of the synthetic ladder")
    toy.add_argument("--gamma", type=float, default=3.0, help="cost exponent: level l costs 2^(gamma l)")
    toy.add_argument("--d", type=int, default=4, help="state dimension")
    toy.add_argument("--paths", type=int, default=256, help="number of sample paths")
    toy.add_argument("--seed", type=int, default=0, help="seed of the ladder, the Brownian paths and the coins")
    toy.add_argument("--json", help="also write the table to this JSON file")
    toy.set_defaults(func=_toy)
    exp = sub.add_parser("experiment", help="EM vs ML-EM (fixed, theory and learned probabilities, T-Stitch) on a "
                                            "trained ladder: results.json, report.md and figures")
    exp.add_argument("ladder", nargs="+", help="a ladder folder (level_0, level_1, ...) or checkpoints, cheapest "
                                               "first (>= 3 networks)")
    exp.add_argument("--out", required=True, help="output folder (points already measured there are reused)")
    exp.add_argument("--title", default="EM vs ML-EM", help="title of report.md and results.json")
    add_dataclass_options(exp, ExperimentConfig)  # --heldout ... --seed (ExperimentConfig's fields)
    exp.add_argument("--no-stratified", dest="stratified", action="store_const", const="",
                     help="run no strategy with stratified coins")
    exp.add_argument("--threshold-ddpm", type=float, default=None,
                     help="DDPM speedups count only at MSEs above this (default: the MSE of the second-largest "
                          "network's samples at --reference-steps steps)")
    exp.add_argument("--threshold-ddim", type=float, default=None,
                     help="DDIM speedups count only at MSEs above this (default: as for --threshold-ddpm)")
    exp.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    exp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="show a progress bar")
    exp.set_defaults(func=_experiment)
    rescore = sub.add_parser("rescore", help="recompute the speedups of finished experiments from their stored "
                                             "points and rewrite results.json, report.md and the figures")
    rescore.add_argument("folders", nargs="+", help="experiment output folders (holding results.json)")
    rescore.set_defaults(func=_rescore)
    _add_train_options(sub.add_parser("train", help="train UNet level(s) of a diffusion ladder (see: mlsde train "
                                                    "--help)"))
    smp = sub.add_parser("sample", help="sample images with EM, DDIM or ML-EM from trained levels")
    smp.add_argument("levels", nargs="+", help="checkpoints (files or folders, also comma-separated), cheapest "
                                               "first; without --probs or --inverse-cost only the last one is "
                                               "used (plain EM/DDIM)")
    smp.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm",
                     help="ddpm (ancestral, stochastic) or ddim (deterministic, eta = 0)")
    smp.add_argument("--steps", type=int, default=250,
                     help="sampling steps, respaced from the noise schedule's T (untyped: at most T)")
    smp.add_argument("--image-size", type=int, default=16,
                     help="image height and width (the size the levels were trained at)")
    smp.add_argument("--batch", type=int, default=16, help="number of images")
    smp.add_argument("--probs", default=None,
                     help="ML-EM with constant probabilities, one per level, cheapest first, e.g. 1,0.3,0.1")
    smp.add_argument("--inverse-cost", type=float, default=None, metavar="C",
                     help="ML-EM with p_l = min(1, C / FLOPs_l)")
    smp.add_argument("--coupling", choices=["batch", "sample"], default="batch",
                     help="ML-EM coins shared by the whole batch, or drawn per sample")
    smp.add_argument("--coins", choices=["independent", "stratified"], default="independent",
                     help="ML-EM coin scheme: independent Bernoullis, or stratified in time (the same marginals)")
    smp.add_argument("--base", choices=["zero", "linear"], default="zero",
                     help="f^0 of the ML estimate: zero (the paper's) or the drift's linear part (x0 = 0)")
    smp.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                     help="noise schedule; untyped, the one the levels were trained with (recorded in their "
                          "checkpoints), else the default; typed, it must be that one")
    smp.add_argument("--T", type=int, default=None,
                     help="steps of the noise schedule (default: the levels' recorded T, else 1000)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the Brownian path and the coins")
    smp.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    smp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="show a progress bar")
    smp.add_argument("--out", default="samples.png", help="PNG grid (a JSON of stats is written beside it)")
    smp.set_defaults(func=_sample)
    for subparser in sub.choices.values():
        subparser.formatter_class = HelpFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except (OSError, ValueError, TypeError, FolderLockedError) as err:  # bad input: one line, no traceback
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"mlsde: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training's own handling (which saves and says how to resume)
        print("mlsde: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
