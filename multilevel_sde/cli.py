"""The ``mlsde`` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .diffusion.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=args.progress)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (``main``'s argv), for the records it writes."""
    return " ".join(["mlsde", *map(shlex.quote, getattr(args, "argv", []))])


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _experiment(args: argparse.Namespace) -> int:
    from .diffusion.experiment import ExperimentConfig, run_experiment
    from .diffusion.train import load_ladder

    models, names, shape = load_ladder(args.ladder, device=args.device)
    thresholds = {k: v for k, v in (("ddpm", args.threshold_ddpm), ("ddim", args.threshold_ddim)) if v is not None}
    config = ExperimentConfig(
        heldout=args.heldout, select=args.select, batch=args.batch, samplers=tuple(args.samplers.split(",")),
        em_steps=_ints(args.em_steps), reference_steps=args.reference_steps,
        mlem_networks=_ints(args.mlem_networks) if args.mlem_networks else None, mlem_steps=_ints(args.mlem_steps),
        p_top=_floats(args.p_top), strategies=tuple(args.strategies.split(",")),
        stratified=tuple(filter(None, args.stratified.split(","))), coupling=args.coupling, learn_steps=args.learn_steps, learn_batch=args.learn_batch,
        learn_grid=args.learn_grid, deltas=_floats(args.deltas), tstitch_fractions=_floats(args.tstitch_fractions),
        tstitch_steps=_ints(args.tstitch_steps), threshold=thresholds or None, seed=args.seed)
    results = run_experiment(models, shape, args.out, config, names=names, device=args.device,
                             progress=args.progress, title=args.title, command=_command_line(args))
    from .diffusion.demo import format_speedups

    print(format_speedups(results))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    from .diffusion.demo import format_speedups
    from .diffusion.experiment import rescore

    for folder in args.folders:
        print(f"{folder}:")
        print(format_speedups(rescore(folder)))
    return 0


def _toy(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_toy_demo

    if args.k < 1 or args.paths < 1:
        print(f"mlsde toy: --k and --paths must be >= 1, got k={args.k}, paths={args.paths}", file=sys.stderr)
        return 2
    print(f"ML-EM vs EM on a synthetic ladder: k={args.k} levels, cost of level l = 2^({args.gamma} l), "
          f"d={args.d}, {args.paths} paths on [0, 1], one shared Brownian path per sample.")
    rows = run_toy_demo(k=args.k, gamma=args.gamma, d=args.d, paths=args.paths, seed=args.seed)
    print(format_rows(rows, args.paths))
    print("RMS error against fine-step EM of the true drift; cost in level units per path (exact rule).")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([row.__dict__ for row in rows], fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def _train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .diffusion.train import main as train_main

    return train_main(list(rest))


def _sample(args: argparse.Namespace) -> int:
    from .diffusion.data import save_image_grid
    from .diffusion.sample import sample
    from .diffusion.schedule import NoiseSchedule
    from .diffusion.train import load_level
    from .probabilities import InverseCost

    paths = [p for entry in args.levels for p in entry.split(",") if p]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"mlsde sample: checkpoint(s) not found: {missing}", file=sys.stderr)
        return 2
    models = [load_level(p, device=args.device) for p in paths]
    if args.probs and args.inverse_cost:
        print("mlsde sample: give --probs or --inverse-cost, not both", file=sys.stderr)
        return 2
    probabilities = None
    if args.probs:
        probabilities = [float(v) for v in args.probs.split(",")]
    elif args.inverse_cost:
        probabilities = InverseCost(args.inverse_cost)
    first = models[-1]
    config = getattr(first, "config", {})
    channels = int(config.get("in_channels", 3))
    shape = (channels, args.image_size, args.image_size)
    result = sample(models, shape, batch=args.batch, method=args.method, steps=args.steps,
                    schedule=NoiseSchedule.named(args.schedule), probabilities=probabilities,
                    coupling=args.coupling, coins=args.coins, base=args.base, seed=args.seed,
                    device=args.device, progress=args.progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(result.images, out, nrow=min(8, args.batch), scale=max(1, 128 // args.image_size))
    stats = result.stats.as_dict()
    record = {"levels": paths, "settings": result.settings, "flops": result.flops, "seconds": result.seconds,
              "network_calls": stats["calls"], "evaluations": stats["evaluations"], "stats": stats,
              "command": _command_line(args)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    print(f"{args.method} x {args.steps} steps, {len(models)} level(s): evaluations {stats['evaluations']}, "
          f"calls {stats['calls']}, {result.flops:.4g} FLOPs, {result.seconds:.2f} s")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .diffusion.experiment import ExperimentConfig

    parser = argparse.ArgumentParser(
        prog="mlsde",
        description="Multilevel Euler–Maruyama: solve SDEs whose drift is a ladder of approximators.",
    )
    parser.add_argument("--version", action="version", version=f"multilevel-sde {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the main job: train a small UNet ladder on the built-in digits and run "
                                       "the EM vs ML-EM experiment (<= 15 min on 2 CPU cores)")
    demo.add_argument("--out", default="runs/demo", help="checkpoints (cached) and report (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="the <= 3 min smoke version of every stage")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    demo.set_defaults(func=_demo)
    toy = sub.add_parser("toy", help="ML-EM against EM on a synthetic ladder whose cost grows like 2^(gamma l)")
    toy.add_argument("--k", type=int, default=6, help="number of levels (default 6)")
    toy.add_argument("--gamma", type=float, default=3.0, help="cost exponent: level l costs 2^(gamma l)")
    toy.add_argument("--d", type=int, default=4, help="state dimension")
    toy.add_argument("--paths", type=int, default=256, help="number of sample paths")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--json", help="also write the table to this JSON file")
    toy.set_defaults(func=_toy)
    exp = sub.add_parser("experiment", help="EM vs ML-EM (fixed, theory and learned probabilities, T-Stitch) on a "
                                            "trained ladder: results.json, report.md and figures")
    exp.add_argument("ladder", nargs="+", help="a ladder folder (level_0, level_1, ...) or checkpoints, cheapest "
                                               "first (>= 3 networks)")
    exp.add_argument("--out", required=True, help="output folder (points already measured there are reused)")
    d = ExperimentConfig()
    exp.add_argument("--title", default="EM vs ML-EM")
    exp.add_argument("--heldout", type=int, default=d.heldout, help="held-out images (every reported point)")
    exp.add_argument("--select", type=int, default=d.select, help="selection images (learning)")
    exp.add_argument("--batch", type=int, default=d.batch)
    exp.add_argument("--samplers", default=",".join(d.samplers))
    exp.add_argument("--em-steps", default=",".join(map(str, d.em_steps)))
    exp.add_argument("--reference-steps", type=int, default=d.reference_steps)
    exp.add_argument("--mlem-networks", default=None, help="three ladder indices, e.g. 0,2,4 (default: smallest, "
                                                           "middle, largest)")
    exp.add_argument("--mlem-steps", default=",".join(map(str, d.mlem_steps)))
    exp.add_argument("--p-top", default=",".join(map(str, d.p_top)), help="sweep of the fixed strategies")
    exp.add_argument("--strategies", default=",".join(d.strategies))
    exp.add_argument("--stratified", default=",".join(d.stratified),
                     help="strategies also run with stratified coins (default: %(default)s)")
    exp.add_argument("--no-stratified", dest="stratified", action="store_const", const="",
                     help="no stratified coins")
    exp.add_argument("--coupling", choices=["sample", "batch"], default=d.coupling)
    exp.add_argument("--learn-steps", type=int, default=d.learn_steps)
    exp.add_argument("--learn-batch", type=int, default=d.learn_batch)
    exp.add_argument("--learn-grid", type=int, default=d.learn_grid, help="steps of the grid learning runs on")
    exp.add_argument("--deltas", default=",".join(map(str, d.deltas)))
    exp.add_argument("--tstitch-fractions", default=",".join(map(str, d.tstitch_fractions)))
    exp.add_argument("--tstitch-steps", default=",".join(map(str, d.tstitch_steps)))
    exp.add_argument("--threshold-ddpm", type=float, default=None, help="default: MSE of the second-largest network")
    exp.add_argument("--threshold-ddim", type=float, default=None)
    exp.add_argument("--seed", type=int, default=d.seed)
    exp.add_argument("--device", default=None)
    exp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    exp.set_defaults(func=_experiment)
    rescore = sub.add_parser("rescore", help="recompute the speedups of finished experiments from their stored "
                                             "points and rewrite results.json, report.md and the figures")
    rescore.add_argument("folders", nargs="+", help="experiment output folders (holding results.json)")
    rescore.set_defaults(func=_rescore)
    sub.add_parser("train", help="train UNet level(s) of a diffusion ladder (see: mlsde train --help)",
                   add_help=False)
    smp = sub.add_parser("sample", help="sample images with EM, DDIM or ML-EM from trained levels")
    smp.add_argument("levels", nargs="+", help="checkpoints (files or folders), cheapest first")
    smp.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm")
    smp.add_argument("--steps", type=int, default=250)
    smp.add_argument("--image-size", type=int, default=16)
    smp.add_argument("--batch", type=int, default=16)
    smp.add_argument("--probs", default=None, help="ML-EM constant probabilities, e.g. 1,0.3,0.1")
    smp.add_argument("--inverse-cost", type=float, default=None, help="ML-EM with p_l = min(1, c / FLOPs_l)")
    smp.add_argument("--coupling", choices=["batch", "sample"], default="batch")
    smp.add_argument("--coins", choices=["independent", "stratified"], default="independent")
    smp.add_argument("--base", choices=["zero", "linear"], default="zero")
    smp.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--device", default=None)
    smp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    smp.add_argument("--out", default="samples.png", help="PNG grid (a JSON of stats is written beside it)")
    smp.set_defaults(func=_sample)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:  # its options belong to the training module's own parser
            return _train(argparse.Namespace(), argv[1:])
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad input: a clear message, no traceback
        print(f"mlsde: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
