"""Adaptive: probabilities p_l(t) = min(1, c dt sqrt(V_l(t) / C_l)) from a pilot solve (issue #19 item 3).

Measured on the HTMC ladders (benchmarks-style setup, 1024 paths, dt = eps/4): at the same sum p C as Theorem 1
scaled by 0.03 .. 1, Adaptive's RMS error is 0-7 % lower than Theorem 1's (lowest at the cheap end), for up to
8 % more realised cost: on a dyadic ladder the rule sqrt(V/C) reproduces Theorem 1's exponent 1 + gamma/2 (V_l ~ 4^-l,
C_l ~ 2^(gamma l)) without being told gamma or the accuracies. Its budget replaces the ad-hoc "x 0.1": the
predicted RMS coin noise of X_T, which is conservative on these contracting dynamics (measured 0.57-0.64 of
the predicted variance below).
"""

import math

import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, SharedPath
from multilevel_sde.problems import htmc_ladder

GAMMA, K, D, DT = 3.0, 5, 8, 2.0**-7


@pytest.fixture(scope="module")
def pilot():
    ladder = htmc_ladder(K, GAMMA, d=D, seed=0)
    schedule = mlsde.Adaptive.pilot(ladder.levels, torch.full((32, D), 0.3, dtype=DTYPE), 0.0, 1.0, DT, seed=3)
    return ladder, torch.tensor(ladder.costs, dtype=DTYPE), schedule


def test_pilot_rates_follow_the_variance_optimal_rule(pilot):
    ladder, costs, schedule = pilot
    assert schedule.variances.shape == (K, 128) and schedule.num_levels() == K
    rates = schedule.rates(0.5, costs)
    # dyadic differences (V_l ~ 4^-l) and costs 2^(gamma l): rates ~ 2^-(1 + gamma/2) l, Theorem 1's exponent
    slope = float(torch.log2(rates[-1] / rates[1])) / (K - 2)
    assert abs(slope + (1 + GAMMA / 2)) < 0.4, slope
    p = schedule(torch.tensor([0.0, 0.5, 0.99], dtype=DTYPE), DT, costs)  # per-sample times: (k, 3)
    assert p.shape == (K, 3) and ((p > 0) & (p <= 1)).all()


@pytest.mark.parametrize("rms", [0.02, 0.05])
def test_scaled_to_an_rms_budget_bounds_the_coin_noise(pilot, rms):
    ladder, costs, schedule = pilot
    adaptive = schedule.scaled(DT, costs, rms=rms)
    assert adaptive.predicted_variance(DT, costs) == pytest.approx(rms**2, rel=1e-6)
    n = 4000
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=DT, size=(1, D), seed=2, dtype=DTYPE)
    drift = ladder.drift(adaptive, coupling="sample", seed=4)
    xs, stats = mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0, dt=DT), torch.full((n, D), 0.3, dtype=DTYPE), [0.0, 1.0],
                             bm=SharedPath(bm, n), return_stats=True)
    variance = float(xs[-1].var(0).sum())  # only the coins spread the samples (one Brownian path, one start)
    assert 0.3 * rms**2 < variance < rms**2, (variance, rms**2)  # first-order model, conservative here (0.57-0.64)
    assert stats.theory_cost / n == pytest.approx(adaptive.predicted_cost(DT, costs), rel=1e-9)


def test_scaled_to_a_cost_budget_and_argument_checks(pilot):
    _, costs, schedule = pilot
    adaptive = schedule.scaled(DT, costs, cost=5e5)
    assert adaptive.predicted_cost(DT, costs) == pytest.approx(5e5, rel=1e-6)
    cheaper = schedule.scaled(DT, costs, cost=1e5)
    assert cheaper.predicted_variance(DT, costs) > adaptive.predicted_variance(DT, costs)
    with pytest.raises(ValueError, match="exactly one budget"):
        schedule.scaled(DT, costs)
    with pytest.raises(ValueError, match="variances must have shape"):
        mlsde.Adaptive([0.0, 0.5], torch.ones(2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        mlsde.Adaptive([0.5, 0.0], torch.ones(2, 2))
    # a level whose pilot variance is 0 keeps the floor, not 0
    flat = mlsde.Adaptive([0.0], torch.tensor([[1.0], [0.0]]), c=1.0, floor=1e-3)
    assert flat(0.3, 0.1, torch.tensor([1.0, 8.0], dtype=DTYPE)).tolist() == [0.1, 1e-3]
    assert math.isfinite(flat.predicted_variance(0.1, torch.tensor([1.0, 8.0], dtype=DTYPE)))


def test_budgets_on_a_non_uniform_grid(pilot):
    _, costs, schedule = pilot
    uniform = torch.arange(129, dtype=torch.float64) * DT
    assert schedule.predicted_cost(None, costs, grid=uniform) == pytest.approx(schedule.predicted_cost(DT, costs))
    assert schedule.predicted_variance(None, costs, grid=uniform) == pytest.approx(
        schedule.predicted_variance(DT, costs))
    grid = torch.linspace(0, 1, 41, dtype=torch.float64) ** 2  # fine steps first, coarse ones last
    scaled = schedule.scaled(None, costs, cost=3e4, grid=grid)
    assert scaled.predicted_cost(None, costs, grid=grid) == pytest.approx(3e4, rel=1e-6)
    p = scaled(grid[-2], float(grid[-1] - grid[-2]), costs)  # the rule at one step: c h sqrt(V / C), clipped
    expected = torch.clamp(scaled.rates(grid[-2], costs) * float(grid[-1] - grid[-2]), min=scaled.floor, max=1.0)
    assert torch.allclose(p, expected)
    with pytest.raises(ValueError, match="grid"):
        schedule.predicted_cost(None, costs, grid=[0.0, 0.5, 0.2])
