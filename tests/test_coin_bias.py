"""Path bias beside variance for every coin scheme (issue #19).

On a linear ladder (``perturbed_ladder`` over an OU drift, ``f^l(y) = A_l y + b_l``) with sigma = 0 and one
start for every path, E[X_N] over the coins must equal Euler with the top level, whose mean is known in closed
form (the recursion ``m <- m + dt (A_k m + b_k)``). Measured (d = 4, k = 3, dt = 0.02, p = (1, 0.2, 0.08),
20000 paths; bias = largest coordinate of |E X_N - Euler(f^k)|, RMS = coin spread of X_N, cost per step):

    independent   bias 1.5e-4 (|z| <= 1.1)   RMS 0.041   cost 3.70
    comonotone    bias 4.6e-4 (|z| <= 1.8)   RMS 0.049   cost 3.43
    stratified    bias 3.9e-4 (|z| up to 21) RMS 0.006   cost 3.70

With p = lambda dt (lambda = 10, 4) the stratified bias does not shrink with dt: largest coordinate 3.9e-4,
4.9e-4, 5.4e-4 at dt = 0.02, 0.005, 0.00125, while independent and comonotone coins stay within 2 standard
errors. Stratified coins are far less noisy (RMS 7x lower) but biased along the path; independent and
comonotone coins are unbiased. (This ladder's level errors are partly aligned, so comonotone coins are the
noisier here; on the HTMC ladders, whose errors are independent, they are the less noisy: last tests.)
"""

import math

import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, SharedPath
from multilevel_sde.problems import OrnsteinUhlenbeck, htmc_ladder, perturbed_ladder

D, K, T = 4, 3, 1.0
RATES = (10.0, 4.0)  # p = (1, lambda_2 dt, lambda_3 dt)


def _path_error(coins, dt, n, seed=1, ladder_seed=0):
    """``(X_N - Euler(f^k)) (n, D)`` over ``n`` ML-Euler paths from one start, and the realised cost per path
    and step."""
    ladder = perturbed_ladder(OrnsteinUhlenbeck(theta=1.0, sigma=0.0, d=D), K, kind="linear", seed=ladder_seed)
    p = [1.0] + [min(1.0, rate * dt) for rate in RATES]
    drift = ladder.drift(p, coupling="sample", coins=coins, seed=seed)
    steps = round(T / dt)
    x0 = torch.full((n, D), 0.5, dtype=DTYPE)
    grid = torch.linspace(0.0, T, steps + 1, dtype=DTYPE)
    xs, stats = mlsde.odeint(drift, x0, torch.tensor([0.0, T], dtype=DTYPE), options={"grid": grid},
                             return_stats=True)
    A, b = ladder.affine[-1]
    mean = x0[0].clone()
    for _ in range(steps):  # Euler with f^k: the exact mean of an unbiased ML-Euler path
        mean = mean + dt * (A @ mean + b)
    return xs[-1] - mean, stats.cost / (n * steps)


def _z(error):
    return error.mean(0) / (error.std(0) / math.sqrt(error.shape[0]))


@pytest.mark.parametrize("coins", ["independent", "comonotone"])
def test_independent_and_comonotone_coins_leave_the_path_unbiased(coins):
    error, _ = _path_error(coins, 0.02, 20000)
    z = _z(error)
    assert z.abs().max() < 4.5, z  # E[X_N] = Euler(f^k) within 4.5 standard errors, every coordinate
    assert error.std(0).max() > 0.01  # the coins do move the paths (the check is not vacuous)


def test_stratified_coins_bias_the_path_and_the_bias_does_not_vanish_as_dt_shrinks():
    error, _ = _path_error("stratified", 0.02, 20000)
    z = _z(error)
    assert z.abs().max() > 10, z  # measured: |z| up to 21
    fine, _ = _path_error("stratified", 0.005, 5000)
    # p = lambda dt: the per-step marginals are exact at every dt, yet the bias stays (here it even grows)
    bias, bias_fine = error.mean(0).abs().max(), fine.mean(0).abs().max()
    assert _z(fine).abs().max() > 6 and bias_fine > 0.5 * bias, (bias, bias_fine)
    # ... while the spread is far below independent coins' at the same cost
    independent, _ = _path_error("independent", 0.02, 20000)
    assert error.pow(2).sum(1).mean() < 0.1 * independent.pow(2).sum(1).mean()


def test_comonotone_step_variance_and_cost_follow_their_formulas():
    """At a fixed state: Var F = sum_l (1/p_l - 1)(|e_{l-1}|^2 - |e_l|^2) with e_l = f^l - f^k (p non-increasing),
    and f^m is paid with probability max(p_m, p_{m+1})."""
    ladder = htmc_ladder(4, 3.0, d=16, seed=3)
    p = torch.tensor([1.0, 0.6, 0.25, 0.1], dtype=DTYPE)
    x = torch.linspace(-1, 1, 16, dtype=DTYPE).reshape(1, 16)
    n = 40000
    drift = ladder.drift(p.tolist(), coupling="sample", coins="comonotone", seed=5)
    estimates = drift.sample(0.0, x.expand(n, -1), 0.01)
    values = [f(0.0, x)[0] for f in ladder.levels]
    top = values[-1]
    errors = [-top] + [v - top for v in values]  # e_0 = f^0 - f^k with f^0 = 0
    predicted = sum((1 / p[l] - 1) * (errors[l].pow(2).sum() - errors[l + 1].pow(2).sum()) for l in range(4))
    independent = sum((1 / p[l] - 1) * (errors[l] - errors[l + 1]).pow(2).sum() for l in range(4))
    deviation = (estimates - top).pow(2).sum(1)
    se = deviation.std() / math.sqrt(n)
    assert abs(float(estimates.mean(0).sub(top).abs().max())) < 5 * float(estimates.std(0).max()) / math.sqrt(n)
    assert abs(float(deviation.mean() - predicted)) < 4.5 * float(se), (deviation.mean(), predicted, se)
    assert predicted < 0.85 * independent  # independent errors (phases): less noisy (measured 0.77x)
    # cost: the realised evaluations match the max rule, which is below the union rule of independent coins
    expected = torch.cat([torch.maximum(p[:-1], p[1:]), p[-1:]])
    assert torch.allclose(drift.evaluation_probabilities(p), expected)
    counts = torch.tensor(drift.stats.evaluations, dtype=DTYPE) / n
    assert (counts - expected).abs().max() < 4.5 * math.sqrt(0.25 / n), (counts, expected)
    union = mlsde.MultilevelDrift(ladder.levels, p.tolist(), costs=ladder.costs).expected_cost(0.0, 0.01)
    assert drift.expected_cost(0.0, 0.01) < union


def test_comonotone_coins_are_less_noisy_and_cheaper_on_an_htmc_ladder():
    """Every path shares one Brownian path and start: only the coins spread X_T. Independent errors across
    levels (random phases, d = 8): comonotone coins give a lower spread at a lower expected cost."""
    ladder = htmc_ladder(5, 3.0, d=8, seed=0)
    schedule = mlsde.Theorem1(eps=2.0**-5, gamma=3.0, scale=0.1)
    n, dt = 4000, 2.0**-7
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=dt, size=(1, 8), seed=2, dtype=DTYPE)

    spread, cost = {}, {}
    for coins in ("independent", "comonotone"):
        drift = ladder.drift(schedule, coupling="sample", coins=coins, seed=4)
        x0 = torch.full((n, 8), 0.3, dtype=DTYPE)
        xs, stats = mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0, dt=dt), x0, [0.0, 1.0], bm=SharedPath(bm, n),
                                 return_stats=True)
        spread[coins], cost[coins] = float(xs[-1].var(0).sum()), stats.expected_cost
    assert cost["comonotone"] < cost["independent"]
    assert spread["comonotone"] < 0.85 * spread["independent"], spread


def test_comonotone_coins_with_one_coin_for_the_batch():
    levels = htmc_ladder(3, 3.0, d=2, seed=1).levels
    drift = mlsde.MultilevelDrift(levels, [1.0, 0.5, 0.2], costs=[1, 8, 64], coupling="batch", coins="comonotone",
                                  seed=0)
    drift.record_coins()
    x = torch.zeros(3, 2, dtype=DTYPE)
    for _ in range(2000):
        drift.sample(0.0, x, 0.1)
    coins = drift.recorded_coins().double()  # (steps, k): nested sets, each coin at its marginal
    assert ((coins[:, 2] <= coins[:, 1]) & (coins[:, 1] <= coins[:, 0])).all()
    assert abs(float(coins[:, 1].mean()) - 0.5) < 0.06 and abs(float(coins[:, 2].mean()) - 0.2) < 0.05
