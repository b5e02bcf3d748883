"""FLOP speedup of each experiment's best ML-EM curves over every EM point at fixed MSEs, unbiased coins
(independent, comonotone) and stratified ones (biased path) apart; prints a table and saves JSON.

    python benchmarks/fixed_mse.py benchmarks/results/celeba16-cpu/ddpm-nested-3 \
        benchmarks/results/celeba16-cpu/ddpm-nested benchmarks/results/celeba16-cpu/ddpm-selected-12k-xs12k \
        --mse 0.03,0.02,0.01 --out benchmarks/results/celeba16-cpu/fixed_mse.json

It reads each folder's ``results.json`` (the measured points) and calls ``frontier.speedup_at``, the rule every
report uses (log-log interpolation of the EM frontier and of the curve; NaN where either does not reach the MSE).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from multilevel_sde.diffusion.frontier import speedup_at
from multilevel_sde.files import atomic_write_json


def best_at(points: list, mse: float, biased: bool, sampler: str = "ddpm") -> dict:
    """The best curve of one kind of coins at ``mse``: ``{"curve", "speedup"}`` (speedup None if none reaches it)."""
    points = [p for p in points if p["sampler"] == sampler]
    em = [p for p in points if p["family"] == "em"]
    curves = defaultdict(list)
    for p in points:
        if p["family"] == "mlem" and ("stratified" in p["curve"]) == biased:
            curves[p["curve"]].append(p)
    scored = [(speedup_at(em, c, "flops", mse), name) for name, c in curves.items()]
    scored = [(s, name) for s, name in scored if math.isfinite(s)]
    if not scored:
        return {"curve": None, "speedup": None}
    speedup, name = max(scored)
    return {"curve": name, "speedup": speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="experiment folders holding results.json")
    parser.add_argument("--mse", default="0.03,0.02,0.01", help="comma-separated MSEs (default: %(default)s)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    mses = [float(v) for v in args.mse.split(",")]
    table = {}
    for folder in args.folders:
        points = json.loads((Path(folder) / "results.json").read_text())["points"]
        table[folder] = {str(mse): {"unbiased": best_at(points, mse, False), "stratified": best_at(points, mse, True)}
                         for mse in mses}
        print(folder)
        for mse, entry in table[folder].items():
            cells = [f"{kind} {e['speedup']:.2f}x ({e['curve']})" if e["speedup"] else f"{kind} -"
                     for kind, e in entry.items()]
            print(f"  MSE {mse}: " + "; ".join(cells))
    atomic_write_json(args.out, {"command": "python benchmarks/fixed_mse.py " + " ".join(args.folders)
                                 + f" --mse {args.mse} --out {args.out}", "speedups": table}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
