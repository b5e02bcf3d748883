"""problems: exact laws vs Monte Carlo of the strong solutions, EM strong orders, ladders (spec §11, §12.3-4)."""

import math

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, mean_within, moment_within
from multilevel_sde.problems import GeometricBrownianMotion, LinearSDE, OrnsteinUhlenbeck, perturbed_ladder

A = torch.tensor([[-1.0, 2.0], [-1.5, -0.5]], dtype=DTYPE)  # non-normal, complex eigenvalues
B = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.7, 0.3]], dtype=DTYPE)  # d = 2, m = 3
b = torch.tensor([0.3, -0.2], dtype=DTYPE)


def _problems():
    return {
        "ou": OrnsteinUhlenbeck(theta=1.5, mu=0.5, sigma=0.8, d=2),
        "gbm": GeometricBrownianMotion(mu=0.4, sigma=0.6, d=2),
        "linear": LinearSDE(A, b, B),
    }


def _bm(problem, n, seed, dt=2.0**-8, t1=1.0):
    return mlsde.GridBrownian(t0=0.0, t1=t1, dt=dt, size=(n, problem.noise_channels), seed=seed, dtype=DTYPE)


def _y0(n, d=2):
    return torch.tensor([[0.7, -0.4]], dtype=DTYPE)[:, :d].expand(n, d).clone()


def _check_law(problem, xs, y0, t):
    """Mean and covariance entries of samples ``xs`` (n, d) vs the exact law, within 5 standard errors."""
    mean, cov = problem.mean(y0, t)[0], problem.covariance(y0, t)
    cov = cov[0] if cov.dim() == 3 else cov
    mean_within(xs, mean, cov.diagonal().sqrt())
    centred = xs - mean
    products = (centred.unsqueeze(-1) * centred.unsqueeze(-2)).flatten(1)  # (n, d*d)
    moment_within(products, cov.flatten())


# -- exact laws ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ou", "linear", "gbm"])
def test_strong_solution_has_the_exact_law(name):
    problem, n = _problems()[name], 20000
    y0 = _y0(n)
    xs = problem.strong_solution(y0, [0.0, 0.25, 1.0], _bm(problem, n, seed=11, dt=2.0**-6))
    assert xs.shape == (3, n, 2) and xs.dtype == DTYPE
    assert torch.equal(xs[0], y0)
    for x, t in zip(xs[1:], (0.25, 1.0)):
        _check_law(problem, x, y0, t)


def test_linear_sde_reduces_to_ou():
    ou = OrnsteinUhlenbeck(theta=1.3, mu=-0.4, sigma=0.7, d=3)
    eye = torch.eye(3, dtype=DTYPE)
    lin = LinearSDE(-1.3 * eye, torch.full((3,), 1.3 * -0.4, dtype=DTYPE), 0.7 * eye)
    y0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    for t in (0.0, 0.3, 2.0):
        torch.testing.assert_close(lin.mean(y0, t), ou.mean(y0, t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.covariance(y0, t), ou.covariance(y0, t), rtol=1e-12, atol=1e-12)
    bm = _bm(ou, 5, seed=3, dt=0.01)  # non-dyadic grid: step sizes differ by rounding
    ts = torch.tensor([0.5, 0.1, 1.0], dtype=DTYPE)
    torch.testing.assert_close(lin.strong_solution(y0, ts, bm), ou.strong_solution(y0, ts, bm), rtol=1e-10, atol=1e-10)


def test_van_loan_covariance_matches_quadrature():
    problem, t = LinearSDE(A, b, B), 1.3
    s = torch.linspace(0, t, 4001, dtype=DTYPE)
    E = torch.linalg.matrix_exp(A * s[:, None, None])  # (n, d, d)
    integrand = E @ (B @ B.T) @ E.transpose(1, 2)
    simpson = torch.ones(len(s), dtype=DTYPE)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    expected = (simpson[:, None, None] * integrand).sum(0) * (s[1] - s[0]) / 3
    torch.testing.assert_close(problem.covariance(_y0(1), t), expected, rtol=1e-10, atol=1e-12)
    h = 1e-6  # the mean solves m' = A m + b
    y0 = _y0(1)
    derivative = (problem.mean(y0, t + h) - problem.mean(y0, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, problem.drift(t, problem.mean(y0, t)), rtol=1e-7, atol=1e-8)


def test_gbm_mean_closed_form():
    problem, n, t = GeometricBrownianMotion(mu=0.4, sigma=0.6, d=2), 20000, 1.0
    y0 = _y0(n)
    mean = y0[0] * math.exp(0.4 * t)
    torch.testing.assert_close(problem.mean(y0, t)[0], mean)
    var = y0[0] ** 2 * math.exp(0.8 * t) * math.expm1(0.36 * t)
    torch.testing.assert_close(problem.covariance(y0, t)[0], torch.diag(var))
    xs = problem.strong_solution(y0, [t], _bm(problem, n, seed=5, dt=0.25))[0]
    mean_within(xs, mean, var.sqrt())


# -- strong order of EM against the strong solutions -------------------------------------------------
def _strong_slope(problem, n=1000, seed=0):
    y0 = _y0(n)
    bm = _bm(problem, n, seed, dt=2.0**-10)
    exact = problem.strong_solution(y0, [1.0], bm)[0]
    dts = [2.0**-j for j in range(3, 8)]
    errors = []
    for dt in dts:  # EM on a coarse grid: each step sums the fine increments of the same path
        ys = mlsde.sdeint(problem.sde(), y0, torch.tensor([0.0, 1.0], dtype=DTYPE), bm=bm, dt=dt)
        errors.append(float(((ys[-1] - exact) ** 2).sum(-1).mean().sqrt()))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    return np.polyfit(np.log(dts), np.log(errors), 1)[0]


@pytest.mark.parametrize(
    "problem,low,high",
    [
        (GeometricBrownianMotion(mu=0.5, sigma=0.8, d=2), 0.35, 0.7),
        (OrnsteinUhlenbeck(theta=2.0, mu=0.5, sigma=1.0, d=2), 0.8, 1.25),
        (LinearSDE(A, b, B), 0.8, 1.25),
    ],
    ids=["gbm", "ou", "linear"],
)
def test_em_strong_order(problem, low, high):
    assert low <= _strong_slope(problem) <= high


# -- ladders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ou", "gbm", "linear"])
@pytest.mark.parametrize("kind", ["linear", "sine"])
def test_ladder_levels_within_eps(name, kind):
    problem = _problems()[name]
    ladder = perturbed_ladder(problem, 5, kind=kind, seed=3)
    assert ladder.eps == [2.0**-l for l in range(1, 6)] and ladder.costs == [2.0**l for l in range(1, 6)]
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(4000, 2, generator=gen, dtype=DTYPE)
    if kind == "linear":  # the bound holds on the ball ||y|| <= radius = 1
        y = y / y.norm(dim=1, keepdim=True) * torch.rand(4000, 1, generator=gen, dtype=DTYPE)
    else:
        y = 10 * y
    f = problem.drift(0.0, y)
    for level, eps in zip(ladder.levels, ladder.eps):
        gap = (level(0.0, y) - f).norm(dim=1)
        assert gap.max() <= eps * (1 + 1e-12)
        assert gap.max() >= 0.2 * eps  # a genuine perturbation
    if kind == "linear":
        for level, (A_l, b_l) in zip(ladder.levels, ladder.affine):
            torch.testing.assert_close(level(0.0, y), y @ A_l.T + b_l, rtol=1e-12, atol=1e-12)
    else:
        assert ladder.affine is None


def test_ladder_options_and_seeds():
    ou = OrnsteinUhlenbeck(d=2)
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    same = [perturbed_ladder(ou, 3, kind="sine", seed=7) for _ in range(2)]
    other = perturbed_ladder(ou, 3, kind="sine", seed=8)
    assert torch.equal(same[0].levels[2](0.0, y), same[1].levels[2](0.0, y))
    assert not torch.equal(same[0].levels[2](0.0, y), other.levels[2](0.0, y))
    ladder = perturbed_ladder(ou, 3, eps=[0.3, 0.1, 0.0], costs=[1, 5, 30], radius=4.0)
    assert ladder.eps == [0.3, 0.1, 0.0] and ladder.costs == [1.0, 5.0, 30.0]
    torch.testing.assert_close(ladder.levels[2](0.0, y), ou.drift(0.0, y))
    y = 4 * y / y.norm(dim=1, keepdim=True)
    assert (ladder.levels[0](0.0, y) - ou.drift(0.0, y)).norm(dim=1).max() <= 0.3 * (1 + 1e-12)
    assert perturbed_ladder(ou, 4, cost_base=4.0).costs == [4.0, 16.0, 64.0, 256.0]
    drift = ladder.drift(mlsde.Constant([1.0, 0.5, 0.25]), seed=0)
    assert isinstance(drift, mlsde.MultilevelDrift) and drift.costs.tolist() == [1.0, 5.0, 30.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must"),
        (dict(k=2.0), "k must"),
        (dict(kind="cubic"), "kind must"),
        (dict(eps=[0.5]), "eps must have one entry per level"),
        (dict(eps=[0.5, -0.1]), "eps must be finite and >= 0"),
        (dict(costs=[1.0, 0.0]), "costs must be finite and > 0"),
        (dict(costs=[1.0, float("inf")]), "costs must be finite"),
        (dict(cost_base=-2.0), "cost_base must"),
        (dict(radius=0.0), "radius must"),
        (dict(seed=-1), "seed must"),
    ],
)
def test_ladder_bad_inputs(kwargs, match):
    args = dict(k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        perturbed_ladder(OrnsteinUhlenbeck(), **args)


def test_problem_bad_inputs():
    for make, match in [
        (lambda: OrnsteinUhlenbeck(theta=0.0), "theta must be > 0"),
        (lambda: OrnsteinUhlenbeck(sigma=-1.0), "sigma must be >= 0"),
        (lambda: OrnsteinUhlenbeck(d=0), "d must"),
        (lambda: GeometricBrownianMotion(mu=float("nan")), "mu must be a finite"),
        (lambda: LinearSDE(torch.ones(2, 3), None, torch.eye(2)), "A must be square"),
        (lambda: LinearSDE(A, torch.ones(3), B), "b must have shape"),
        (lambda: LinearSDE(A, b, torch.ones(3, 2)), "B must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    ou, y0 = OrnsteinUhlenbeck(d=2), _y0(4)
    bm = _bm(ou, 4, seed=0, dt=0.25)
    with pytest.raises(ValueError, match="not on its grid|must lie on bm's grid"):
        ou.strong_solution(y0, [0.1], bm)
    with pytest.raises(ValueError, match="bm must have shape"):
        ou.strong_solution(_y0(3), [0.5], bm)
    with pytest.raises(ValueError, match="y0 must have shape"):
        ou.mean(torch.zeros(4, 3, dtype=DTYPE), 1.0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        ou.covariance(y0, -1.0)


# -- ML-EM on the ladders --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ou", "gbm", "linear"])
@pytest.mark.parametrize("kind", ["linear", "sine"])
def test_mlem_with_certain_coins_is_em_with_the_top_level(name, kind):
    problem, n, k = _problems()[name], 16, 4
    ladder = perturbed_ladder(problem, k, kind=kind, seed=2)
    y0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)
    bm = _bm(problem, n, seed=9, dt=2.0**-9)
    drift = ladder.drift(mlsde.Constant([1.0] * k), seed=0)
    ml, stats = mlsde.sdeint(problem.sde(drift, dt=2.0**-5), y0, ts, bm=bm, return_stats=True)
    em = mlsde.sdeint(problem.sde(ladder.levels[-1], dt=2.0**-5), y0, ts, bm=bm)
    assert torch.equal(ml, em)
    assert stats.evaluations[:-1] == [0] * (k - 1)


def test_mlem_moments_follow_the_affine_recursion():
    """Spec §11: with an affine ladder, E[X_n] is EM with f^k and Cov[X_n] obeys the exact recursion."""
    problem, n, k, h, steps = LinearSDE(A, b, B), 40000, 3, 0.1, 10
    ladder = perturbed_ladder(problem, k, kind="linear", seed=5)
    p = torch.tensor([1.0, 0.5, 0.25], dtype=DTYPE)
    drift = ladder.drift(mlsde.Constant(p.tolist()), coupling="sample", seed=0)
    y0 = _y0(n)
    xs = mlsde.sdeint(problem.sde(drift, dt=h), y0, torch.tensor([0.0, h * steps], dtype=DTYPE), seed=1)[-1]

    mats = [(torch.zeros(2, 2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE))] + ladder.affine
    diffs = [(mats[l][0] - mats[l - 1][0], mats[l][1] - mats[l - 1][1]) for l in range(1, k + 1)]
    A_k, b_k = ladder.affine[-1]
    step = torch.eye(2, dtype=DTYPE) + h * A_k
    m, S = y0[0].clone(), torch.zeros(2, 2, dtype=DTYPE)
    for _ in range(steps):
        second = S + torch.outer(m, m)  # E[x x^T]
        coin_var = sum(
            (1 / p_l - 1) * (D @ second @ D.T + torch.outer(D @ m, e) + torch.outer(e, D @ m) + torch.outer(e, e))
            for p_l, (D, e) in zip(p.tolist(), diffs)
        )
        S = step @ S @ step.T + h**2 * coin_var + h * B @ B.T
        m = step @ m + h * b_k
    mean_within(xs, m, S.diagonal().sqrt())
    centred = xs - m
    moment_within((centred.unsqueeze(-1) * centred.unsqueeze(-2)).flatten(1), S.flatten())
