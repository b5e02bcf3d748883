"""Coin schemes: independent and stratified (systematic in time) coins keep every step's marginal."""

import torch

import multilevel_sde as mlsde
from helpers import DTYPE, SharedPath, affine_ladder, moment_within

D = 2


def test_stratified_coins_keep_each_steps_marginal_and_spread_evaluations():
    levels, _, _ = affine_ladder(3, D, 0)
    schedule = mlsde.Sigmoid(a=[1.0, -1.0, -2.5], b=[0.0, 1.0, -0.5], floor=0.01)  # time-dependent p
    drift = mlsde.MultilevelDrift(levels, schedule, costs=[1, 2, 4], coupling="sample", coins="stratified", seed=1)
    drift.record_coins()
    x = torch.zeros(5000, D, dtype=DTYPE)
    times = torch.linspace(0, 2, 40, dtype=DTYPE)
    with torch.no_grad():
        for t in times:
            drift.sample(t, x, 0.05)
    coins = drift.recorded_coins().double()  # (steps, k, batch)
    p = torch.stack([schedule(t, 0.05, None).detach() for t in times])  # (steps, k)
    for n in (0, 7, 39):  # the marginal at any step is p_l(t_n): Bernoulli over the uniform offsets
        moment_within(coins[n].T, p[n])
    # systematic sampling: each sample's count over all steps is within one of sum_n p_l(t_n)
    totals, expected = coins.sum(0), p.sum(0).unsqueeze(-1)
    assert ((totals - expected).abs() < 1 + 1e-9).all()


def test_stratified_batch_coins_repeat_with_the_seed():
    levels, _, _ = affine_ladder(2, D, 1)
    x = torch.randn(4, D, dtype=DTYPE)
    runs = []
    for seed in (3, 3, 4):
        drift = mlsde.MultilevelDrift(levels, [0.5, 0.3], costs=[1, 2], coins="stratified", seed=seed)
        runs.append(torch.stack([drift.sample(0.0, x, 0.1) for _ in range(30)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # the top difference came up 30 * 0.3 = 9 times, give or take one
    assert abs(drift.stats.evaluations[1] / 4 - 9) <= 1


def test_stratified_coins_reduce_final_state_variance_at_equal_cost():
    """On a linear ladder the spread of X_T caused by the coins (same noise for every sample) is smaller
    with stratified coins than with independent ones, at the same expected cost."""
    levels, _, _ = affine_ladder(3, D, 4, scale=0.5)
    x0 = torch.full((4000, D), 0.5, dtype=DTYPE)
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.02, size=(1, D), seed=0, dtype=DTYPE)

    spread, cost = {}, {}
    for coins in ("independent", "stratified"):
        drift = mlsde.MultilevelDrift(levels, [0.6, 0.2, 0.05], costs=[1, 2, 4], coupling="sample", coins=coins)
        X, st = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.5, dt=0.02), x0, [0.0, 1.0], bm=SharedPath(bm, 4000), seed=0,
                             return_stats=True)
        spread[coins], cost[coins] = float(X[-1].var(0).sum()), st.expected_cost
    assert cost["independent"] == cost["stratified"]
    assert spread["stratified"] < 0.8 * spread["independent"]
