"""EM, DDIM and ML-EM samples from a trained ladder, side by side, with their compute.

Every method starts from the same x_T and uses the same Brownian path (on the fine 1000-step grid). The
reference is DDPM with the top network at 1000 steps; each method's error is the MSE to it, averaged over
images. Writes a PNG grid (reference | EM | ML-EM rows) and a JSON with every number.

    mlsde train --preset cpu-xs --preset cpu-m --preset cpu-xl --data default --image-size 16 \\
        --steps 800 --batch-size 64 --lr 1e-3 --out runs/digits16
    python benchmarks/diffusion_samples.py runs/digits16 --out benchmarks/results/diffusion_digits16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import multilevel_sde as mlsde
from multilevel_sde.diffusion import load_level, sample
from multilevel_sde.diffusion.data import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ladder", type=Path, help="folder with level_0, level_1, ... (cheapest first)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diffusion_samples"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    levels = sorted(args.ladder.glob("level_*"), key=lambda p: int(p.name.split("_")[1]))
    if not levels:
        raise SystemExit(f"no level_* folders in {args.ladder}")
    models = [load_level(p) for p in levels]
    channels = models[-1].config["in_channels"]
    shape = (channels, args.image_size, args.image_size)
    flops = [mlsde.diffusion.unet_flops(m, args.image_size) for m in models]
    common = dict(image_shape=shape, batch=args.batch, seed=args.seed, costs=None)
    reference = {}

    def run(name, chosen, **kw):
        ladder = chosen if isinstance(chosen, list) else [chosen]
        costs = [flops[models.index(m)] for m in ladder]
        if "probabilities" not in kw:
            costs = costs[-1:]
        start = time.perf_counter()
        res = sample(ladder, **{**common, "costs": costs}, **kw)
        seconds = time.perf_counter() - start
        row = {"name": name, "flops_per_image": res.stats.cost / args.batch, "seconds": seconds,
               "evaluations": res.stats.evaluations, "calls": res.stats.calls, **kw}
        row = {k: (v.extra_repr() if hasattr(v, "extra_repr") else v) for k, v in row.items()}
        if "images" in reference:  # the error of every method against the reference
            row["mse_to_reference"] = float(((res.images - reference["images"]) ** 2).flatten(1).mean(1).mean())
        print(f"{name:<60} {row['flops_per_image']:.3g} FLOPs/image  {seconds:6.1f} s  calls {res.stats.calls}  "
              f"MSE {row.get('mse_to_reference', 0.0):.4g}", flush=True)
        return res.images, row

    ref, ref_row = run("DDPM top network, 1000 steps (reference)", models[-1], steps=1000)
    rows, grids = [ref_row], {"reference": ref}
    reference["images"] = ref

    for steps in (250, 100):
        img, row = run(f"DDPM top network, {steps} steps", models[-1], steps=steps)
        rows.append(row), grids.setdefault("em", img)
    for c in (3e6, 1e6):
        img, row = run(f"ML-EM {len(models)} levels, InverseCost(c={c:.0e}), 1000 steps", models,
                       steps=1000, probabilities=mlsde.InverseCost(c), coupling="batch")
        rows.append(row), grids.setdefault("mlem", img)
    img, row = run("ML-EM, InverseCost(c=1e6), stratified coins", models, steps=1000,
                   probabilities=mlsde.InverseCost(1e6), coins="stratified")
    rows.append(row)
    img, row = run("DDIM top network, 100 steps", models[-1], steps=100, method="ddim")
    rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat([grids["reference"][:8], grids["em"][:8], grids["mlem"][:8]]), args.out / "grid.png",
                    nrow=8, scale=6)
    record = {"command": "python benchmarks/diffusion_samples.py " + str(args.ladder), "flops_per_level": flops,
              "levels": [str(p) for p in levels], "batch": args.batch, "seed": args.seed, "rows": rows,
              "grid_rows": ["reference (DDPM 1000, top)", "DDPM 250, top", "ML-EM InverseCost(3e6)"]}
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
