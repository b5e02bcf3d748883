"""The ``mlsde`` command."""

from __future__ import annotations

import argparse
import json
import sys
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
