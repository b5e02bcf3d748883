"""Would a stale level difference make a good control variate? How fast ML-EM's level differences change.

ML-EM estimates each level difference ``D_n = f^l - f^{l-1}`` at step ``n`` by ``(B/p) D_n``; its coin variance
is ``(1/p - 1) |D_n|^2``. Keeping the last evaluated difference ``S`` (from step ``n - j``) and estimating
``S + (B/p)(D_n - S)`` stays unbiased with independent coins (``S`` is known before the coin; stratified coins
depend on the past ones, so there it would bias) and has variance ``(1/p - 1)|D_n - S|^2``: it pays only if ``r_j = E|D_n - D_{n-j}|^2 / E|D_n|^2`` is well below 1 at the typical age ``j ~ 1/p``.

This script measures ``r_j`` along the top network's DDPM trajectory (the states ML-EM visits), for each pair
of adjacent networks, both for the drift the solver sees and for the clipped ``x0`` estimates inside it.

    python benchmarks/difference_correlation.py XS_CKPT M_CKPT XL_CKPT --steps 25,50 \\
        --out benchmarks/results/celeba16-cpu/difference_correlation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from multilevel_sde.diffusion.levels import DenoiserLevel
from multilevel_sde.diffusion.sample import initial_noise, sample
from multilevel_sde.diffusion.schedule import NoiseSchedule, StepGrid, respaced_timesteps
from multilevel_sde.diffusion.train import load_ladder


def differences_along_trajectory(models, image_shape, steps: int, batch: int, seed: int) -> dict:
    """Level differences at the start of every step of the top network's DDPM trajectory: for ``"drift"`` and
    ``"x0"``, a list over adjacent pairs of tensors ``(steps, batch, C*H*W)``."""
    schedule = NoiseSchedule.cosine()
    grid = StepGrid(schedule, respaced_timesteps(schedule.T, steps), "ddpm")
    states = [initial_noise((batch, *image_shape), seed)]
    sample(models[-1], image_shape, batch=batch, steps=steps, schedule=schedule, seed=seed,
           callback=lambda n, x: states.append(x.clone()))
    levels = [DenoiserLevel(m, grid, image_shape) for m in models]
    drift, x0 = [], []
    with torch.no_grad():
        for n in range(steps):
            s = torch.as_tensor(grid.times[n], dtype=torch.float64)
            x = states[n]
            drift.append([lvl(s, x.reshape(batch, -1)) for lvl in levels])
            x0.append([lvl.denoised(s, x).reshape(batch, -1) for lvl in levels])
    out = {}
    for name, values in (("drift", drift), ("x0", x0)):
        out[name] = [torch.stack([v[l + 1] - v[l] for v in values]) for l in range(len(models) - 1)]
    return out


def relative_change(d: torch.Tensor, lag: int) -> float:
    """``r_lag = E|D_n - D_{n-lag}|^2 / E|D_n|^2`` over steps ``n >= lag`` and samples; ``d``: ``(steps, batch,
    dim)``."""
    change = (d[lag:] - d[:-lag]).pow(2).sum(-1).mean()
    return float(change / d[lag:].pow(2).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="the ladder's checkpoints (files or folders), cheapest first")
    parser.add_argument("--steps", default="25,50", help="DDPM step counts (comma-separated)")
    parser.add_argument("--lags", default="1,2,4,8", help="ages j of the stale difference (comma-separated)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/difference_correlation.json"))
    args = parser.parse_args()
    steps_list = [int(s) for s in args.steps.split(",")]
    lags = [int(j) for j in args.lags.split(",")]
    models, names, image_shape = load_ladder(args.checkpoints)
    pairs = [f"{a} -> {b}" for a, b in zip(names, names[1:])]
    started = time.perf_counter()
    rows = []
    for steps in steps_list:
        diffs = differences_along_trajectory(models, image_shape, steps, args.batch, args.seed)
        for space, per_pair in diffs.items():
            for pair, d in zip(pairs, per_pair):
                ratios = {str(j): relative_change(d, j) for j in lags if j < steps}
                rows.append(dict(steps=steps, space=space, pair=pair, r=ratios))
                print(f"{steps:4d} steps  {space:5s}  {pair:40s}  "
                      + "  ".join(f"r_{j}={r:.3f}" for j, r in ratios.items()))
    result = dict(benchmark="difference_correlation", command=" ".join(["python", *sys.argv]),
                  networks=names, image_shape=list(image_shape), batch=args.batch, seed=args.seed,
                  quantity="r_j = E|D_n - D_(n-j)|^2 / E|D_n|^2 along the top network's DDPM trajectory",
                  rows=rows, seconds=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
