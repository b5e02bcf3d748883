"""GaussianMixtureDiffusion and diffusion_ladder: the exact score, the reverse SDE / probability flow, the ladder.

The convention is the OU one of spec §1.2 (dY = -Y dt + sqrt(2) dW); the reverse process runs in solver time
s = T - t from the exact prior p_T down to t_min. For one Gaussian component every drift is affine, so the law
of the EM iterates is known exactly and gives the discretisation allowance of the sampling tests.
"""

import math

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, moment_within
from multilevel_sde.problems import GaussianMixtureDiffusion, diffusion_ladder



MEANS = [[-2.0, 0.5], [1.5, 1.0], [0.3, -1.2]]
STDS = [[0.5, 0.3], [0.8, 0.6], [0.4, 1.1]]  # diagonal, per component
WEIGHTS = [0.2, 0.5, 0.3]


def _mixture(**kwargs):
    return GaussianMixtureDiffusion(MEANS, STDS, WEIGHTS, **kwargs)


def _points(n, seed, spread=3.0):
    return spread * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- the score --------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.7, 4.0])
def test_score_is_the_gradient_of_the_closed_form_log_density(t):
    gm = _mixture()
    x = _points(64, 0).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(t, x).sum(), x)
    torch.testing.assert_close(gm.score(t, x.detach()), grad, rtol=1e-10, atol=1e-10)

    # log p_t is the density of the noised mixture sum_k w_k N(e^-t mu_k, diag(e^-2t s_k^2 + 1 - e^-2t))
    a = math.exp(-t)
    comps = torch.distributions.Independent(
        torch.distributions.Normal(a * torch.tensor(MEANS, dtype=DTYPE),
                                   torch.sqrt(a**2 * torch.tensor(STDS, dtype=DTYPE) ** 2 + 1 - a**2)), 1)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.tensor(WEIGHTS, dtype=DTYPE)), comps)
    torch.testing.assert_close(gm.log_prob(t, x.detach()), mix.log_prob(x.detach()), rtol=1e-12, atol=1e-12)


def test_log_density_solves_the_ou_fokker_planck_equation():
    """d/dt log p = d + x.s + div s + |s|^2 for dY = -Y dt + sqrt(2) dW (independent check of the convention)."""
    gm, h = _mixture(), 1e-5
    x = _points(16, 1, spread=1.5)
    for t in (0.05, 0.4, 1.5):
        dlogp = (gm.log_prob(t + h, x) - gm.log_prob(t - h, x)) / (2 * h)
        xr = x.clone().requires_grad_(True)
        s = gm.score(t, xr)
        div = sum(torch.autograd.grad(s[:, i].sum(), xr, retain_graph=True)[0][:, i] for i in range(gm.d))
        rhs = gm.d + (x * s).sum(1) + div + (s**2).sum(1)
        torch.testing.assert_close(dlogp, rhs.detach(), rtol=1e-6, atol=1e-6)


def test_score_is_stable_far_out_per_sample_in_time_and_keeps_the_dtype():
    gm = _mixture()
    far = torch.tensor([[1e3, -1e3], [5e2, 0.0], [-40.0, 40.0]], dtype=DTYPE)
    for t in (1e-3, 1.0):
        s = gm.score(t, far)
        assert torch.isfinite(s).all()
        # far out, the component with the largest variance along the way dominates: the score is finite, ~ -x/v
        assert (s * far).sum(1).lt(0).all()
    x, ts = _points(5, 2), torch.tensor([1e-3, 0.1, 0.5, 1.0, 3.0], dtype=DTYPE)
    per_sample = gm.score(ts, x)
    for i in range(5):
        torch.testing.assert_close(per_sample[i], gm.score(float(ts[i]), x[i:i + 1])[0], rtol=1e-14, atol=1e-14)
    x32 = x.float()
    assert gm.score(0.3, x32).dtype == torch.float32 and gm.reverse_drift(0.3, x32).dtype == torch.float32
    torch.testing.assert_close(gm.score(0.3, x32), gm.score(0.3, x32.double()).float(), rtol=1e-6, atol=1e-6)


def test_single_gaussian_score_denoiser_and_drifts_are_analytic():
    mu, s = torch.tensor([1.0, -0.5], dtype=DTYPE), torch.tensor([0.6, 0.9], dtype=DTYPE)
    gm = GaussianMixtureDiffusion(mu.unsqueeze(0), s.unsqueeze(0), T=3.0, t_min=1e-2)
    x = _points(32, 3)
    for t in (1e-2, 0.3, 2.0):
        a = math.exp(-t)
        v = a**2 * s**2 + 1 - a**2
        score = -(x - a * mu) / v
        torch.testing.assert_close(gm.score(t, x), score, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(gm.denoiser(t, x), mu + a * s**2 / v * (x - a * mu), rtol=1e-12, atol=1e-12)
        sv = 3.0 - t  # solver time
        torch.testing.assert_close(gm.reverse_drift(sv, x), x + 2 * score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gm.flow_drift(sv, x), x + score, rtol=1e-12, atol=1e-12)
    # an isotropic std given as a number and the (K,) form agree with the (K, d) form
    iso = GaussianMixtureDiffusion(MEANS, 0.7)
    torch.testing.assert_close(iso.stds, torch.full((3, 2), 0.7, dtype=DTYPE))
    torch.testing.assert_close(GaussianMixtureDiffusion(MEANS, [0.7] * 3).score(0.2, x), iso.score(0.2, x))


def test_exact_moments_and_samplers():
    gm, n = _mixture(T=3.0), 40000
    gen = torch.Generator().manual_seed(4)
    for xs, mean, cov in ((gm.sample_data(n, gen), gm.data_mean(), gm.data_covariance()),
                          (gm.sample_prior(n, gen), gm.marginal_mean(3.0), gm.marginal_covariance(3.0)),
                          (gm.sample_marginal(0.4, n, gen), gm.marginal_mean(0.4), gm.marginal_covariance(0.4))):
        moment_within(xs, mean)
        centred = xs - mean
        moment_within((centred.unsqueeze(2) * centred.unsqueeze(1)).flatten(1), cov.flatten())
    standard = gm.sample_prior(n, gen, exact=False)
    moment_within(standard, torch.zeros(2, dtype=DTYPE))
    moment_within(standard**2, torch.ones(2, dtype=DTYPE))
    # the marginal moments are those of the mixture's closed form and tend to N(0, I)
    torch.testing.assert_close(gm.marginal_covariance(0.0), gm.data_covariance())
    torch.testing.assert_close(gm.marginal_covariance(40.0), torch.eye(2, dtype=DTYPE))
    assert gm.sample_data(3, torch.Generator().manual_seed(0), dtype=torch.float32).dtype == torch.float32


# -- sampling the reverse process -------------------------------------------------------------------
def _affine_em_law(mu, s, grid, T, sde=True):
    """Exact mean and variance (per coordinate) of (stochastic) Euler iterates of the reverse process of one
    Gaussian component N(mu, diag(s^2)), started from the exact p_T: every drift is c(t) x + e(t)."""
    mu, s2 = mu.numpy(), s.numpy() ** 2
    a = math.exp(-T)
    m, V = a * mu, a**2 * s2 + 1 - a**2
    w = 2.0 if sde else 1.0
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h, a = s1 - s0, math.exp(-(T - s0))
        v = a**2 * s2 + 1 - a**2
        c, e = 1 - w / v, w * a * mu / v
        m = m + h * (c * m + e)
        V = (1 + h * c) ** 2 * V + (2 * h if sde else 0.0)
    return torch.as_tensor(m), torch.as_tensor(V)


def _within(measured, expected, se, allowance, what, n_se=5.0):
    err = (measured - expected).abs()
    bound = n_se * se + allowance
    assert (err <= bound).all(), f"{what}: off by {err.tolist()}, allowed {bound.tolist()}"


@pytest.mark.parametrize("sde", [True, False], ids=["reverse_sde", "probability_flow"])
def test_em_of_the_exact_reverse_process_reproduces_the_data_moments(sde):
    mu, s = torch.tensor([1.0, -0.5], dtype=DTYPE), torch.tensor([0.6, 0.9], dtype=DTYPE)
    T, t_min, n, steps = 4.0, 1e-3, 20000, 400
    gm = GaussianMixtureDiffusion(mu.unsqueeze(0), s.unsqueeze(0), T=T, t_min=t_min)
    grid = torch.linspace(0.0, gm.s_end, steps + 1, dtype=DTYPE)
    x0 = gm.sample_prior(n, torch.Generator().manual_seed(5))
    if sde:
        xs = mlsde.sdeint(gm.sde(), x0, gm.solver_times(), grid=grid, seed=6)[-1]
    else:
        xs = mlsde.odeint(gm.flow_drift, x0, gm.solver_times(), options={"grid": grid})[-1]

    # (1) the samples have the exact law of the EM iterates (within standard errors only)
    m_em, V_em = _affine_em_law(mu, s, grid.tolist(), T, sde)
    moment_within(xs, m_em)
    moment_within((xs - m_em) ** 2, V_em)
    moment_within((xs[:, 0] - m_em[0]) * (xs[:, 1] - m_em[1]), torch.zeros((), dtype=DTYPE))

    # (2) the EM law is first-order close to the exact one: as dt -> 0 it converges to p_{t_min} (error ~ dt)
    m_ex, V_ex = gm.marginal_mean(t_min), gm.marginal_covariance(t_min).diagonal()
    errs = []
    for refine in (1, 2, 4):
        m_r, V_r = _affine_em_law(mu, s, np.linspace(0.0, gm.s_end, steps * refine + 1).tolist(), T, sde)
        errs.append(float(torch.cat([(m_r - m_ex).abs(), (V_r - V_ex).abs()]).max()))
    assert errs[0] < 0.03 and 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3, errs

    # (3) so the samples reproduce the *data* mean and covariance within a few standard errors plus the
    # known allowance |EM law - p_{t_min}| + |p_{t_min} - data| (both exact numbers here)
    m_data, V_data = gm.data_mean(), gm.data_covariance().diagonal()
    allow_m = (m_em - m_ex).abs() + (m_ex - m_data).abs()
    allow_V = (V_em - V_ex).abs() + (V_ex - V_data).abs()
    assert float(allow_m.max()) < 0.01 and float(allow_V.max()) < 0.03
    _within(xs.mean(0), m_data, xs.std(0) / math.sqrt(n), allow_m, "mean")
    sq = (xs - xs.mean(0)) ** 2
    _within(sq.mean(0), V_data, sq.std(0) / math.sqrt(n), allow_V, "variance")


# -- the ladder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ode,scale", [(False, 0.5), (False, 2.0), (True, 0.5)])
def test_ladder_errors_are_bounded_by_eps(ode, scale):
    gm, k = _mixture(), 5
    ladder = diffusion_ladder(gm, k=k, gamma=3.0, c=1.5, seed=7, scale=scale, ode=ode)
    nominal = [2.0**-l for l in range(1, k + 1)]
    weight = 1.0 if ode else 2.0
    assert ladder.eps == pytest.approx([weight * scale * e for e in nominal])
    assert ladder.costs == pytest.approx([(1.5 / e) ** 3.0 for e in nominal])
    true = gm.flow_drift if ode else gm.reverse_drift
    x = torch.cat([_points(2000, 8), _points(200, 9, spread=50.0)])
    s = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(10), dtype=DTYPE) * gm.s_end
    previous = torch.zeros_like(x)
    for l, level in enumerate(ladder.levels):
        f_l = level(s, x)
        gap = torch.linalg.vector_norm(f_l - true(s, x), dim=1)
        assert float(gap.max()) <= ladder.eps[l] * (1 + 1e-12)
        assert float(gap.max()) >= 0.5 * ladder.eps[l]  # the bound is nearly attained: not vacuous
        torch.testing.assert_close(f_l - true(s, x), weight * level.score_error(x), rtol=1e-10, atol=1e-12)
        if l > 0:  # ||Delta_l|| <= eps_l + eps_{l-1}
            dl = torch.linalg.vector_norm(f_l - previous, dim=1)
            assert float(dl.max()) <= (ladder.eps[l] + ladder.eps[l - 1]) * (1 + 1e-12)
        previous = f_l
    # same seed, same ladder; another seed, another one
    again = diffusion_ladder(gm, k=k, gamma=3.0, c=1.5, seed=7, scale=scale, ode=ode)
    other = diffusion_ladder(gm, k=k, gamma=3.0, c=1.5, seed=8, scale=scale, ode=ode)
    assert torch.equal(again.levels[2](0.5, x), ladder.levels[2](0.5, x))
    assert not torch.equal(other.levels[2](0.5, x), ladder.levels[2](0.5, x))


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_ml_em_with_certain_coins_is_em_with_the_top_level_bitwise(coupling):
    gm, k, n = _mixture(T=2.0, t_min=1e-2), 4, 64
    ladder = diffusion_ladder(gm, k=k, gamma=3.0)
    x0 = gm.sample_prior(n, torch.Generator().manual_seed(11))
    ts = torch.tensor([0.0, 1.0, gm.s_end], dtype=DTYPE)
    em = mlsde.sdeint(gm.sde(ladder.levels[-1], dt=0.01), x0, ts, seed=12)
    ml = ladder.drift([1.0] * k, coupling=coupling, seed=3)
    out, stats = mlsde.sdeint(gm.sde(ml, dt=0.01), x0, ts, seed=12, return_stats=True)
    assert torch.equal(out, em)
    assert stats.evaluations[:-1] == [0] * (k - 1)  # only f^k ran
    flow = diffusion_ladder(gm, k=k, gamma=3.0, ode=True)
    ones = flow.drift([1.0] * k, coupling=coupling)
    assert torch.equal(mlsde.odeint(ones, x0, ts, options={"step_size": 0.01}),
                       mlsde.odeint(flow.levels[-1], x0, ts, options={"step_size": 0.01}))


def test_ml_em_sampler_error_against_the_exact_data_moments():
    """ML-EM (Theorem 1 probabilities, per-sample coins) on one Gaussian: its sample mean misses the data mean
    by no more than the SEs + the EM allowance + the ladder's bias bound eps_k (T - t_min) (the reverse drift
    of a component with s^2 < 2 contracts, so the drift error is not amplified), at a fraction of EM's cost."""
    mu, s = torch.tensor([1.0, -0.5], dtype=DTYPE), torch.tensor([0.6, 0.9], dtype=DTYPE)
    T, n, steps, eps, gamma = 3.0, 4000, 300, 2.0**-4, 3.0
    gm = GaussianMixtureDiffusion(mu.unsqueeze(0), s.unsqueeze(0), T=T, t_min=1e-2)
    schedule = mlsde.Theorem1(eps=eps, gamma=gamma)
    ladder = diffusion_ladder(gm, k=schedule.k, gamma=gamma)
    grid = torch.linspace(0.0, gm.s_end, steps + 1, dtype=DTYPE)
    x0 = gm.sample_prior(n, torch.Generator().manual_seed(13))
    drift = ladder.drift(schedule, coupling="sample", seed=14)
    ys, stats = mlsde.sdeint(gm.sde(drift), x0, gm.solver_times(), grid=grid, seed=15, return_stats=True)
    xs = ys[-1]
    m_em, _ = _affine_em_law(mu, s, grid.tolist(), T)
    allowance = (m_em - gm.data_mean()).abs() + ladder.eps[-1] * gm.s_end
    _within(xs.mean(0), gm.data_mean(), xs.std(0) / math.sqrt(n), allowance, "ML-EM mean")
    em_cost = steps * ladder.costs[-1] * n
    assert stats.expected_cost < 0.5 * em_cost
