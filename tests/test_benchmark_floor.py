"""The overhead benchmark's floor (``benchmarks/overhead.py``): replaying a solve's coins with every decision
precomputed must make the library's very level calls and give its very estimate, or it is no floor of the
same work."""

import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, affine_ladder, load_benchmark


@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("probabilities", [[1.0, 1.0, 1.0], [1.0, 0.5, 0.25]])
def test_minimal_step_replays_the_solve_exactly(coupling, probabilities):
    overhead = load_benchmark("overhead")
    levels, _, _ = affine_ladder(3, 4, 0)
    drift = mlsde.MultilevelDrift(levels, probabilities, costs=[1, 2, 4], coupling=coupling, seed=0)
    sde = mlsde.MultilevelSDE(drift, 0.5, dt=0.05)
    y0 = torch.randn(6, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([0.0, 1.0], dtype=DTYPE)
    drift.record_coins(True)
    calls = overhead.record_calls(drift, lambda: mlsde.sdeint(sde, y0, ts, seed=3))
    expected = mlsde.sdeint(sde, y0, ts, seed=3)
    plan = overhead.minimal_plan(drift.recorded, calls, y0.shape[0], y0.dtype)
    floor = overhead.MinimalMLDrift(drift.levels, plan)
    got = mlsde.sdeint(mlsde.MultilevelSDE(floor, 0.5, dt=0.05), y0, ts, seed=3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert floor.n == len(calls) == 20 and floor.level_s <= floor.inside_s
    if probabilities[1] < 1:
        assert any(len(step) > 1 for step in calls)  # several levels ran in some steps
    with pytest.raises(RuntimeError, match="differ"):  # a plan must make the library's calls
        overhead.minimal_plan(drift.recorded, [step[:-1] for step in calls], y0.shape[0], y0.dtype)
