"""The Poisson-jump solver (method="poisson"): jump counts, moments, ML-EM's dt -> 0 limit (spec §7, items 6–7)."""

import pytest
import torch
from scipy import stats as scistats

import multilevel_sde as mlsde
from helpers import DTYPE, affine_ladder, mean_within, moment_within

D = 2


def _linear_moments(A, b, p_rates, sigma, x0, T, n=4000):
    """Mean and covariance of dX = sigma dW + sum_l Delta_l(X)/lambda_l dN^l for an affine ladder, by
    integrating the moment ODEs dm = (A_k m + b_k) dt and
    dS = (A_k S + S A_k^T + sigma^2 I + sum_l E[Delta_l Delta_l^T] / lambda_l) dt with fine steps."""
    k = A.shape[0]
    dA = [A[0]] + [A[l] - A[l - 1] for l in range(1, k)]
    db = [b[0]] + [b[l] - b[l - 1] for l in range(1, k)]
    m, S, h = x0.clone(), torch.zeros(D, D, dtype=DTYPE), T / n
    for _ in range(n):
        second = S + torch.outer(m, m)
        jumps = sum(
            (dA[l] @ second @ dA[l].T + torch.outer(dA[l] @ m, db[l]) + torch.outer(db[l], dA[l] @ m)
             + torch.outer(db[l], db[l])) / p_rates[l]
            for l in range(k)
        )
        dS = A[-1] @ S + S @ A[-1].T + sigma**2 * torch.eye(D, dtype=DTYPE) + jumps
        m, S = m + h * (A[-1] @ m + b[-1]), S + h * dS
    return m, S


@pytest.mark.parametrize("coupling", ["sample", "batch"])
def test_linear_sde_mean_and_covariance_match_the_closed_form(coupling):
    k, T, sigma = 3, 1.0, 0.5
    levels, A, b = affine_ladder(k, D, 21, scale=0.5)
    rates = torch.tensor([20.0, 8.0, 3.0], dtype=DTYPE)
    dt = 1e-3
    drift = mlsde.MultilevelDrift(levels, mlsde.Constant((rates * dt).tolist()), costs=[1, 4, 16], coupling=coupling)
    x0 = torch.tensor([0.7, -0.4], dtype=DTYPE)
    sde = mlsde.MultilevelSDE(drift, sigma, dt=dt)
    if coupling == "sample":
        X = mlsde.sdeint(sde, x0.expand(6000, D), [0.0, T], method="poisson", seed=3)[-1]
    else:  # one clock per batch: independent solves of batch 1
        X = torch.cat([mlsde.sdeint(sde, x0[None], [0.0, T], method="poisson", seed=s)[-1] for s in range(600)])
    m, S = _linear_moments(A, b, rates, sigma, x0, T)
    mean_within(X, m, S.diagonal().sqrt())
    c = X - m
    moment_within((c.unsqueeze(2) * c.unsqueeze(1)).reshape(len(X), -1), S.reshape(-1))


def test_jump_counts_are_poisson():
    """Per-sample clocks: the jumps of each level per sample over [0, T] are Poisson(int lambda_l)."""
    levels, _, _ = affine_ladder(2, D, 3)
    sigmoid = mlsde.Sigmoid(a=[0.0, -1.0], b=[1.0, 2.0], floor=0.0)  # time-dependent: thinning
    dt, T, batch = 0.05, 2.0, 2000
    drift = mlsde.MultilevelDrift(levels, sigmoid, costs=[1, 2], coupling="sample", seed=0)
    _, st = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.1, dt=dt), torch.zeros(batch, D, dtype=DTYPE), [0.0, T],
                         method="poisson", seed=1, return_stats=True)
    grid = torch.linspace(0, T, 20001, dtype=DTYPE)
    lam = sigmoid(grid, dt, None).detach() / dt
    integral = torch.trapezoid(lam, grid, dim=1)
    for l in range(2):
        # the total over independent samples is Poisson(batch * integral): a two-sided test at 1e-4
        p_value = 2 * min(scistats.poisson.cdf(st.jumps[l], batch * float(integral[l])),
                          scistats.poisson.sf(st.jumps[l] - 1, batch * float(integral[l])))
        assert p_value > 1e-4, (l, st.jumps[l], batch * float(integral[l]))
    assert st.evaluations[1] == st.jumps[1] and st.evaluations[0] == st.jumps[0] + st.jumps[1]


class _UnitJump(torch.nn.Module):
    """f^1 = 1: each jump adds 1 / rate, so X_T * rate counts the jumps."""

    def forward(self, t, y):
        return torch.ones_like(y)


def test_jump_count_dispersion_per_sample():
    """Per-sample jump counts have variance equal to their mean (Poisson), by a dispersion test."""
    dt, T, batch, rate = 0.01, 1.0, 4000, 3.0
    drift = mlsde.MultilevelDrift([_UnitJump()], [rate * dt], costs=[1.0], coupling="sample")
    X = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.0, dt=dt), torch.zeros(batch, 1, dtype=DTYPE), [0.0, T],
                     method="poisson", seed=0)[-1]
    n = (X[:, 0] * rate).round()
    assert (n >= 0).all() and torch.allclose(n, X[:, 0] * rate, atol=1e-9)
    moment_within(n, torch.tensor(rate * T, dtype=DTYPE))
    dispersion = float(((n - n.mean()) ** 2).sum() / n.mean())  # ~ chi2(batch - 1) for Poisson counts
    assert scistats.chi2.sf(dispersion, batch - 1) > 1e-4 and scistats.chi2.cdf(dispersion, batch - 1) > 1e-4


def test_expected_evaluations_do_not_depend_on_dt():
    """Poisson solver and ML-EM with dt-proportional probabilities: evaluations per level are flat in dt."""
    levels, _, _ = affine_ladder(3, D, 5)
    schedule = mlsde.InverseCost(c=20.0, per_unit_time=True)
    costs = [1.0, 4.0, 16.0]
    y0 = torch.zeros(4000, D, dtype=DTYPE)
    rates = torch.tensor([20.0 / c for c in costs], dtype=DTYPE)
    for method in ("poisson", "euler"):
        for dt in (1e-2, 2.5e-3):
            drift = mlsde.MultilevelDrift(levels, schedule, costs=costs, coupling="sample")
            _, st = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.3, dt=dt), y0, [0.0, 1.0], method=method, seed=2,
                                 return_stats=True)
            # the top level is evaluated exactly when its difference is drawn: Binomial/Poisson(4000 * rate)
            expected = 4000 * float(rates[-1])
            assert abs(st.evaluations[-1] - expected) <= 5 * expected**0.5
            if method == "poisson":  # each jump pays C_l + C_{l-1}
                pair = sum((costs[l] + (costs[l - 1] if l else 0)) * float(rates[l]) for l in range(3))
                assert st.expected_cost == pytest.approx(4000 * pair, rel=1e-9)


def test_ml_em_converges_to_the_poisson_law_as_dt_halves():
    """E and Var of X_T under ML-EM with p = lambda dt approach the jump solver's as dt -> 0 (item 7)."""
    levels, A, b = affine_ladder(2, D, 8, scale=0.5)
    rates = [8.0, 3.0]
    x0 = torch.tensor([0.5, 0.5], dtype=DTYPE)
    m, S = _linear_moments(A, b, torch.tensor(rates, dtype=DTYPE), 0.4, x0, 1.0)
    gaps = []
    for dt in (0.1, 0.05, 0.025):
        drift = mlsde.MultilevelDrift(levels, [r * dt for r in rates], costs=[1, 2], coupling="sample")
        X = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.4, dt=dt), x0.expand(8000, D), [0.0, 1.0], seed=4)[-1]
        gaps.append(float((torch.cov(X.T) - S).abs().max()))
    # the discretisation gap to the Poisson law shrinks as dt halves (O(dt)), down to Monte Carlo noise
    assert gaps[2] < 0.6 * gaps[0]


def test_poisson_refuses_state_dependent_noise_and_plain_drifts():
    levels, _, _ = affine_ladder(2, D, 1)
    drift = mlsde.MultilevelDrift(levels, [0.1, 0.05], costs=[1, 2])
    y0 = torch.zeros(3, D, dtype=DTYPE)
    with pytest.raises(ValueError, match="state-independent"):
        mlsde.sdeint(mlsde.MultilevelSDE(drift, lambda t, y: y, dt=0.1), y0, [0.0, 1.0], method="poisson")
    with pytest.raises(ValueError, match="MultilevelDrift"):
        mlsde.sdeint(mlsde.MultilevelSDE(levels[0], 1.0, dt=0.1), y0, [0.0, 1.0], method="poisson")


@pytest.mark.parametrize("coins", ["comonotone", "stratified", torch.ones(4, 2, dtype=torch.bool)])
def test_poisson_refuses_coins_other_than_independent(coins):
    """The jump clocks are the dt -> 0 limit of independent coins only: another scheme is refused, not ignored."""
    levels, _, _ = affine_ladder(2, D, 1)
    drift = mlsde.MultilevelDrift(levels, [0.1, 0.05], costs=[1, 2], coins=coins, seed=0)
    with pytest.raises(ValueError, match="independent coins.*coins='independent'"):
        mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0, dt=0.1), torch.zeros(3, D, dtype=DTYPE), [0.0, 1.0],
                     method="poisson")


def test_shared_path_and_hybrid_levels():
    """A level with p = 1 at dt runs on the grid (hybrid); with every p = 1 and a shared GridBrownian the
    jump solver is EM with the top level on the same path."""
    levels, _, _ = affine_ladder(3, D, 2)
    y0 = torch.randn(5, D, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.05, size=(5, D), seed=0, dtype=DTYPE)
    em = mlsde.sdeint(mlsde.MultilevelSDE(levels[-1], 0.5, dt=0.05), y0, [0.0, 1.0], bm=bm)
    for coupling in ("batch", "sample"):
        ones = mlsde.MultilevelDrift(levels, [1.0, 1.0, 1.0], costs=[1, 2, 4], coupling=coupling)
        jump = mlsde.sdeint(mlsde.MultilevelSDE(ones, 0.5, dt=0.05), y0, [0.0, 1.0], method="poisson", bm=bm)
        # absolute tolerance only: the jump solver steps on the path's own accumulated grid times (0.05 * i
        # differs from them by ulps), so it reads whole increments and never bridges inside a cell
        torch.testing.assert_close(jump, em, atol=1e-12, rtol=0)
    hybrid = mlsde.MultilevelDrift(levels, [1.0, 0.2, 0.05], costs=[1, 2, 4], seed=0)
    _, st = mlsde.sdeint(mlsde.MultilevelSDE(hybrid, 0.5, dt=0.05), y0, [0.0, 1.0], method="poisson", bm=bm,
                         return_stats=True)
    assert st.jumps[0] == 0 and st.evaluations[0] >= 20  # level 1 on the grid, every step


def test_per_sample_clocks_read_the_shared_path_through_the_bridge():
    """Per-sample clocks on a shared GridBrownian: with a zero drift the state is sigma W(T) exactly,
    whatever the jump times (the bridge pieces add up to the path's own increments)."""
    zero = [lambda t, y: torch.zeros_like(y), lambda t, y: torch.zeros_like(y)]
    drift = mlsde.MultilevelDrift(zero, [0.3, 0.1], costs=[1, 2], coupling="sample", seed=0)
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.125, size=(64, D), seed=5, dtype=DTYPE)
    X, st = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.7, dt=0.125), torch.zeros(64, D, dtype=DTYPE), [0.0, 1.0],
                         method="poisson", bm=bm, seed=1, return_stats=True)
    assert sum(st.jumps) > 0
    assert torch.allclose(X[-1], 0.7 * bm(0.0, 1.0), atol=1e-12)


def test_poisson_runs_the_callback_and_refuses_a_matrix_sigma():
    levels, _, _ = affine_ladder(2, D, 1)
    drift = mlsde.MultilevelDrift(levels, [0.3, 0.1], costs=[1, 2], seed=0)
    y0 = torch.zeros(3, D, dtype=DTYPE)
    seen = []
    ys = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.5, dt=0.1), y0, [0.0, 1.0], method="poisson", seed=0,
                      callback=lambda n, t, y: seen.append((n, float(t))))
    assert seen and seen[-1][1] == pytest.approx(1.0) and [n for n, _ in seen] == list(range(len(seen)))
    matrix = torch.eye(D, dtype=DTYPE)[:, [0] * D]  # every coordinate driven by W_1
    for noise_type in ("general", "additive"):
        sde = mlsde.MultilevelSDE(drift, lambda t: matrix, noise_type=noise_type, dt=0.1)
        with pytest.raises(ValueError, match=rf"scalar sigma\(t\) with noise_type='{noise_type}'.*\({D}, {D}\)"):
            mlsde.sdeint(sde, y0, [0.0, 1.0], method="poisson")
    assert torch.isfinite(ys).all()
