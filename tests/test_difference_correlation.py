"""The control-variate measurement (``benchmarks/difference_correlation.py``): ``r_j`` and the trajectory's
alignment of states with step times."""

import pytest
import torch

from multilevel_sde.diffusion import build_unet
from multilevel_sde.diffusion.levels import DenoiserLevel
from multilevel_sde.diffusion.sample import initial_noise
from multilevel_sde.diffusion.schedule import NoiseSchedule, StepGrid, respaced_timesteps

from helpers import load_benchmark

SHAPE = (1, 8, 8)


def test_relative_change_of_known_sequences():
    rc = load_benchmark("difference_correlation").relative_change
    base = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    assert rc(base.repeat(6, 1, 1), 1) == 0.0  # a difference that never changes: a perfect control variate
    alternating = base * torch.tensor([1.0, -1.0] * 3).reshape(6, 1, 1)
    assert rc(alternating, 1) == pytest.approx(4.0) and rc(alternating, 2) == 0.0
    growing = base * torch.tensor([2.0 ** n for n in range(6)]).reshape(6, 1, 1)  # D_n - D_{n-1} = D_n / 2
    assert rc(growing, 1) == pytest.approx(0.25)


def test_differences_start_at_the_initial_noise_with_one_row_per_step():
    module = load_benchmark("difference_correlation")
    models = [build_unet(p, in_channels=1, image_size=8, seed=i).eval() for i, p in enumerate(("cpu-xs", "cpu-s"))]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # untrained UNets have zero output layers: perturb them so the levels differ
        for m in models:
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    steps, batch = 4, 3
    out = module.differences_along_trajectory(models, SHAPE, steps, batch, seed=5)
    assert set(out) == {"drift", "x0"} and len(out["drift"]) == 1
    assert out["drift"][0].shape == (steps, batch, 64) and out["x0"][0].shape == (steps, batch, 64)
    schedule = NoiseSchedule.cosine()
    grid = StepGrid(schedule, respaced_timesteps(schedule.T, steps), "ddpm")
    levels = [DenoiserLevel(m, grid, SHAPE) for m in models]
    x_T = initial_noise((batch, *SHAPE), 5)
    s0 = torch.as_tensor(grid.times[0], dtype=torch.float64)
    with torch.no_grad():
        expected = levels[1](s0, x_T.reshape(batch, -1)) - levels[0](s0, x_T.reshape(batch, -1))
    torch.testing.assert_close(out["drift"][0][0], expected)
    assert out["drift"][0][1:].abs().sum() > 0 and not torch.equal(out["drift"][0][1], out["drift"][0][0])
