"""The ``mlsde`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_toy_demo

    if args.k < 1 or args.paths < 1:
        print(f"mlsde demo: --k and --paths must be >= 1, got k={args.k}, paths={args.paths}", file=sys.stderr)
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
              "command": "mlsde sample " + " ".join(sys.argv[2:])}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    print(f"{args.method} x {args.steps} steps, {len(models)} level(s): evaluations {stats['evaluations']}, "
          f"calls {stats['calls']}, {result.flops:.4g} FLOPs, {result.seconds:.2f} s")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsde",
        description="Multilevel Euler–Maruyama: solve SDEs whose drift is a ladder of approximators.",
    )
    parser.add_argument("--version", action="version", version=f"multilevel-sde {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="ML-EM against EM on the built-in synthetic ladder")
    demo.add_argument("--k", type=int, default=6, help="number of levels (default 6)")
    demo.add_argument("--gamma", type=float, default=3.0, help="cost exponent: level l costs 2^(gamma l)")
    demo.add_argument("--d", type=int, default=4, help="state dimension")
    demo.add_argument("--paths", type=int, default=256, help="number of sample paths")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the table to this JSON file")
    demo.set_defaults(func=_demo)
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
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad input: a clear message, no traceback
        print(f"mlsde: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
