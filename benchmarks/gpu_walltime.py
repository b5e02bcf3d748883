"""Does ML-EM's FLOP saving survive as wall-clock time? EM against ML-EM (batch-shared coins, the paper's GPU
batching) on one nested UNet, side by side in one run, at several batch sizes and top probabilities.

Wall time does not depend on the weights, so the network is untrained (no data needed): this measures what a
trained ladder of the same shape would cost per sample. For each batch size it prints the wall time of one call
of every width and, for each ``p_top`` of the inverse-cost strategy, the ratio of EM's FLOPs and wall time to
ML-EM's for the same number of DDPM steps.

    python benchmarks/gpu_walltime.py                                  # on a GPU: nested-paper at 64x64
    python benchmarks/gpu_walltime.py --quick                          # CPU smoke: nested-cpu at 16x16

Writes ``--out`` (default benchmarks/results/gpu_walltime.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import multilevel_sde as mlsde
from multilevel_sde.diffusion.experiment import fixed_probabilities
from multilevel_sde.diffusion.nested import build_nested
from multilevel_sde.diffusion.sample import sample
from multilevel_sde.diffusion.unet import unet_flops


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list:
    return [float(v) for v in text.split(",")]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: nested-cpu at 16x16, small batches")
    parser.add_argument("--preset", default="nested-paper")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--networks", type=_ints, default=[0, 2, 5], help="ML-EM widths (indices), cheapest first")
    parser.add_argument("--batches", type=_ints, default=[64, 256])
    parser.add_argument("--steps", type=int, default=50, help="DDPM steps of EM and ML-EM")
    parser.add_argument("--p-top", type=_floats, default=[0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", default="bf16", help="bf16, fp16 or none (CPU: none)")
    parser.add_argument("--out", default="benchmarks/results/gpu_walltime.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.size, args.networks, args.batches, args.steps = "nested-cpu", 16, [0, 2, 4], [8], 10
        args.p_top, args.repeats = [0.5, 0.1], 1
        args.out = args.out.replace(".json", "_quick.json")
    device = torch.device(args.device)
    autocast = None if args.autocast == "none" or device.type == "cpu" else args.autocast
    torch.manual_seed(0)
    net = build_nested(args.preset, 3, args.size, autocast=autocast).to(device).eval()
    levels = net.levels()
    flops = [unet_flops(level, args.size) for level in levels]
    chosen = [levels[i] for i in args.networks]
    costs = [flops[i] for i in args.networks]
    shape = (3, args.size, args.size)
    result = dict(command="python benchmarks/gpu_walltime.py" + (" --quick" if args.quick else ""),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  preset=args.preset, size=args.size, widths=list(net.widths), flops=flops,
                  networks=args.networks, steps=args.steps, autocast=autocast, batches=[])
    for batch in args.batches:
        x = torch.randn(batch, *shape, device=device)
        t = torch.full((batch,), 500, device=device)
        with torch.no_grad():
            per_call = [median_seconds(lambda level=level: level(x, t), device, args.repeats) for level in levels]
        em = {}

        def run_em():
            em["result"] = sample(levels[-1], shape, batch=batch, steps=args.steps, costs=flops[-1:], seed=0,
                                  device=device)
        em_seconds = median_seconds(run_em, device, args.repeats)
        rows = []
        for p_top in args.p_top:
            p = fixed_probabilities(costs, p_top)
            out = {}

            def run_mlem(p=p):
                out["result"] = sample(chosen, shape, batch=batch, steps=args.steps, probabilities=mlsde.Constant(p),
                                       costs=costs, coupling="batch", seed=1, device=device)
            seconds = median_seconds(run_mlem, device, args.repeats)
            flop_ratio = em["result"].stats.cost / out["result"].stats.cost  # costs given in FLOPs
            rows.append(dict(p_top=p_top, probabilities=p, seconds=seconds, flop_ratio=flop_ratio,
                             wall_ratio=em_seconds / seconds))
            print(f"batch {batch:4d}  p_top {p_top:<5g} EM/ML-EM: FLOPs {flop_ratio:5.2f}x  wall {em_seconds / seconds:5.2f}x")
        result["batches"].append(dict(batch=batch, call_seconds=per_call, em_seconds=em_seconds, mlem=rows))
        print(f"batch {batch:4d}  one call per width (ms): " + ", ".join(f"{1e3 * s:.2f}" for s in per_call)
              + f"  (FLOPs ratio to the top: " + ", ".join(f"{f / flops[-1]:.3f}" for f in flops) + ")")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
