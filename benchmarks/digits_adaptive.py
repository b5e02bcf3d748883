"""The main job's experiment (``mlsde demo``: the shipped digits ladder, widths 3, 10, 24) with the adaptive strategy
added beside inverse cost, theory and learned p (issue #19): ``mlsde.Adaptive``'s variance-optimal probabilities,
from a pilot on the selection set, scaled to the inverse-cost points' nominal costs.

The demo's measured points (``benchmarks/results/demo-digits16/three-widths/results.json``) seed the cache: a point
is reused only under the same settings and weights (the experiment's key), so only the adaptive points are
measured (their wall times come from this run, the others' from the demo's).

    python benchmarks/digits_adaptive.py --out benchmarks/results/demo-digits16/adaptive   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from multilevel_sde.diffusion.demo import FULL
from multilevel_sde.diffusion.experiment import Experiment
from multilevel_sde.diffusion.pretrained import DEFAULT_LADDER, load_pretrained

DEMO_RESULTS = Path(__file__).parent / "results" / "demo-digits16" / "three-widths" / "results.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/demo-digits16/adaptive")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "points.jsonl").exists():
        points = json.loads(DEMO_RESULTS.read_text())["points"]
        (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    config = replace(FULL.experiment, strategies=FULL.experiment.strategies + ("adaptive",),
                     comonotone=FULL.experiment.comonotone + ("adaptive",))
    net, record = load_pretrained(DEFAULT_LADDER)
    experiment = Experiment(net.levels(), record["image_shape"], config, out,
                            names=[f"width {w}" for w in net.widths], progress=False)
    print(f"reusing {experiment.cached_points} points of the demo's run")
    return experiment.run(title="mlsde demo's experiment + the adaptive strategy (digits16-nested, widths 3, 10, 24)",
                          command=f"python benchmarks/digits_adaptive.py --out {args.out}")


if __name__ == "__main__":
    main()
