"""Diffusion schedules and samplers as (ML-)EM (spec §9–§10, §12 items 15–17)."""

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde
from multilevel_sde.diffusion import (DenoiserLevel, LinearPart, NoiseSchedule, StepGrid, respaced_timesteps,
                                      sample)
from multilevel_sde.diffusion.sample import initial_noise
from helpers import moment_within

SHAPE = (1, 4, 4)


class ToyEps(torch.nn.Module):
    """A smooth eps-predictor; ``a`` plays the network's size (close values: close levels)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t):
        return self.a * torch.tanh(x) * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)


LADDER = [ToyEps(0.5), ToyEps(0.55), ToyEps(0.56)]


def test_cosine_schedule_properties():
    sched = NoiseSchedule.cosine()
    ab, betas = sched.alpha_bar, sched.betas
    assert sched.T == 1000 and ab[0] == 1.0 and (np.diff(ab) < 0).all()
    assert (betas > 0).all() and (betas <= 0.999).all() and betas.max() == pytest.approx(0.999)
    # sqrt(alpha_bar_t) ~ exp(-tau_t) with tau = sum beta/2: the gap is bounded by sum beta^2 (item 15)
    gap = np.abs(0.5 * np.log(ab) + sched.tau)
    bound = np.concatenate([[0.0], np.cumsum(betas**2)])
    assert (gap[:900] <= bound[:900]).all() and gap[500] < 1e-3
    lin = NoiseSchedule.linear()
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)


def test_respacing_uses_a_subset_and_unit_variance_noise():
    sched = NoiseSchedule.cosine()
    ts = respaced_timesteps(1000, 250)
    assert ts[0] == 1000 and ts[-1] == 0 and len(ts) == 251 and set(ts) <= set(range(1001))
    grid = StepGrid(sched, ts)
    fine = StepGrid(sched, respaced_timesteps(1000, 1000))
    assert set(np.round(grid.times, 12)) <= set(np.round(fine.times, 12))  # coarse points are fine points
    # a coarse step's z = (sum of fine increments) / sqrt(span) is standard normal (item 17)
    bm = mlsde.GridBrownian(grid.fine_grid(), size=(20000, 1), seed=0, dtype=torch.float64)
    for n in (0, 100, 249):
        z = bm(grid.times[n], grid.times[n + 1]) / np.sqrt(grid.h[n])
        moment_within(z**2, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_steps_are_em_up_to_beta_squared(method):
    """DDPM (DDIM) minus EM (Euler) of the OU reverse SDE (flow ODE) with eta = beta/2 is O(beta^2) (item 15)."""
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    eps = torch.sin(x)
    gaps = []
    for beta in (1e-2, 5e-3, 2.5e-3):
        sched = NoiseSchedule(np.array([1.0, 0.6, 0.6 * (1 - beta)]))
        g = StepGrid(sched, [2, 1, 0], method)
        a_t = 0.6 * (1 - beta)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        update = g.A[0] * x0 + g.B[0] * x
        score = -eps / np.sqrt(1 - a_t)
        h = beta / 2
        assert g.h[0] == pytest.approx(h, rel=1e-9)
        em = x + h * (x + (2 if method == "ddpm" else 1) * score)
        gaps.append(float((update - em).abs().max()))
        if method == "ddpm":  # the textbook DDPM mean, exactly
            textbook = (x - beta / np.sqrt(1 - a_t) * eps) / np.sqrt(1 - beta)
            assert torch.allclose(update, textbook, atol=1e-12)
            assert g.sigma[0] == pytest.approx(np.sqrt(beta))
    assert 3.5 < gaps[0] / gaps[1] < 4.5 and 3.5 < gaps[1] / gaps[2] < 4.5


def test_em_on_a_respaced_grid_uses_the_summed_fine_noise():
    """The sampler equals a hand-written respaced DDPM loop whose z_n = (sum of fine increments)/sqrt(span)."""
    sched = NoiseSchedule.cosine(T=100)
    res = sample(LADDER[-1], SHAPE, batch=4, steps=25, schedule=sched, seed=3, dtype=torch.float64, costs=[1.0])
    grid = StepGrid(sched, respaced_timesteps(100, 25))
    x = initial_noise((4, *SHAPE), 3, dtype=torch.float64)
    from multilevel_sde.random_streams import SAMPLE_BROWNIAN_PATH, derive_seed

    bm = mlsde.GridBrownian(grid.fine_grid(), size=(4, 16), seed=derive_seed(3, SAMPLE_BROWNIAN_PATH),
                            dtype=torch.float64)
    for n in range(grid.num_steps):
        t = torch.full((4,), int(grid.t_from[n]))
        x0 = ((x - grid.sqrt_1m_ab[n] * LADDER[-1](x, t)) / grid.sqrt_ab[n]).clamp(-1, 1)
        z = bm(grid.times[n], grid.times[n + 1]).reshape(x.shape) / np.sqrt(grid.h[n])
        x = grid.A[n] * x0 + grid.B[n] * x + grid.sigma[n] * z
    assert torch.allclose(res.images, x, atol=1e-10)
    assert res.stats.evaluations == [4 * 25] and res.stats.calls == [25]


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_ml_em_with_every_p_one_is_em_with_the_top_level(method, coupling):
    em = sample(LADDER[-1], SHAPE, batch=6, method=method, steps=50, seed=1, costs=[4.0])
    ml = sample(LADDER, SHAPE, batch=6, method=method, steps=50, seed=1, probabilities=[1.0, 1.0, 1.0],
                costs=[1, 2, 4], coupling=coupling)
    assert torch.equal(em.images, ml.images)
    thin = sample(LADDER, SHAPE, batch=6, method=method, steps=50, seed=1, probabilities=[1.0, 0.3, 0.1],
                  costs=[1, 2, 4], coupling=coupling)
    assert thin.stats.cost < ml.stats.cost and not torch.equal(thin.images, em.images)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("base", ["zero", "linear"])
def test_both_couplings_and_bases_are_unbiased(coupling, base):
    """One step's ML estimate of the DDPM drift averages to the top network's (5 standard errors)."""
    sched = NoiseSchedule.cosine(T=100)
    grid = StepGrid(sched, respaced_timesteps(100, 20))
    levels = [DenoiserLevel(m, grid, SHAPE) for m in LADDER]
    drift = mlsde.MultilevelDrift(levels, [0.7, 0.4, 0.2], costs=[1, 2, 4], coupling=coupling, seed=0,
                                  base=LinearPart(grid) if base == "linear" else None)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    s = torch.tensor(grid.times[5], dtype=torch.float64)
    top = levels[-1](s, x)[0]
    if coupling == "sample":
        draws = drift.sample(s, x.expand(20000, 16), float(grid.h[5]))
    else:
        draws = torch.cat([drift.sample(s, x, float(grid.h[5])) for _ in range(3000)])
    moment_within(draws.double(), top.double())


class DiffusersLike(torch.nn.Module):
    """Returns an object with ``.sample`` like diffusers' UNet2DModel."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return type("Out", (), {"sample": self.inner(x, t)})()


class KDiffusionLike(torch.nn.Module):
    """``D(x, sigma) -> x0`` built from an eps-model in the VE parametrisation (x = x_t / sqrt(alpha_bar))."""

    def __init__(self, inner, schedule):
        super().__init__()
        self.inner, self.sigmas = inner, np.sqrt((1 - schedule.alpha_bar) / schedule.alpha_bar)

    def forward(self, x, sigma):
        t = torch.as_tensor(np.abs(self.sigmas[None, :] - sigma.numpy()[:, None]).argmin(1))
        ab = 1 / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
        x_t = x * ab.sqrt()
        return (x_t - (1 - ab).sqrt() * self.inner(x_t, t)) / ab.sqrt()


def test_level_adapters_agree():
    sched = NoiseSchedule.cosine(T=100)
    ref = sample(LADDER[-1], SHAPE, batch=3, steps=20, schedule=sched, seed=2, costs=[1.0], dtype=torch.float64)
    wrapped = sample(DiffusersLike(LADDER[-1]), SHAPE, batch=3, steps=20, schedule=sched, seed=2, costs=[1.0],
                     dtype=torch.float64)
    kdiff = sample(KDiffusionLike(LADDER[-1], sched), SHAPE, batch=3, steps=20, schedule=sched, seed=2,
                   costs=[1.0], prediction="k-diffusion", dtype=torch.float64)
    assert torch.equal(ref.images, wrapped.images)
    assert torch.allclose(ref.images, kdiff.images, atol=1e-8)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        sample(LADDER, SHAPE, method="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(LADDER, SHAPE, steps=0)
    with pytest.raises(ValueError, match="base"):
        sample(LADDER, SHAPE, base="quadratic")
    with pytest.raises(ValueError, match="x_T"):
        sample(LADDER, SHAPE, batch=2, x_T=torch.zeros(3, *SHAPE))
    x_T = initial_noise((2, *SHAPE), 0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x_T is torch.float64 but dtype=torch.float32"):
        sample(LADDER, SHAPE, batch=2, steps=5, x_T=x_T, dtype=torch.float32)
    assert sample(LADDER, SHAPE, batch=2, steps=5, x_T=x_T).images.dtype == torch.float64  # x_T's, not a cast


class NanBelow(torch.nn.Module):
    """An eps-predictor that breaks (NaN) at small timesteps, as an unstable network might."""

    def forward(self, x, t):
        return torch.tanh(x) + torch.where(t < 300, float("nan"), 0.0).to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_network_that_returns_nan_is_named_by_the_sampler(method):
    with pytest.raises(mlsde.NonFiniteError, match=r"^level 2 returned NaN or inf at t="):
        sample([LADDER[0], NanBelow()], SHAPE, batch=3, method=method, steps=40, seed=0,
               probabilities=[1.0, 0.5], costs=[1, 2])


def test_a_given_drift_is_seeded_checked_against_the_grid_and_recorded():
    """sample(drift=...) draws the coins a built drift would with the same seed, refuses a drift built for
    another grid and the options it would ignore, and records the drift's own coupling and base."""
    from multilevel_sde.diffusion import build_drift

    def drift_for(method, steps, coupling="sample"):
        grid = StepGrid(NoiseSchedule.cosine(), respaced_timesteps(1000, steps), method)
        return build_drift(LADDER, grid, SHAPE, mlsde.Constant([1.0, 0.3, 0.1]), [1.0, 2.0, 4.0], coupling=coupling,
                           base="linear", seed=99)

    built = sample(LADDER, SHAPE, batch=6, steps=20, probabilities=mlsde.Constant([1.0, 0.3, 0.1]),
                   costs=[1.0, 2.0, 4.0], coupling="sample", base="linear", seed=3)
    drift = drift_for("ddpm", 20)
    first = sample(LADDER, SHAPE, batch=6, steps=20, seed=3, drift=drift)
    again = sample(LADDER, SHAPE, batch=6, steps=20, seed=3, drift=drift)
    assert torch.equal(first.images, again.images) and torch.equal(first.images, built.images)
    assert first.settings["coupling"] == "sample" and first.settings["base"] == "linear"
    for method, steps in (("ddim", 20), ("ddpm", 50)):
        with pytest.raises(ValueError, match="built for another grid"):
            sample(LADDER, SHAPE, batch=6, steps=20, seed=3, drift=drift_for(method, steps))
    with pytest.raises(ValueError, match="probabilities, coupling would be ignored"):
        sample(LADDER, SHAPE, batch=6, steps=20, seed=3, drift=drift, probabilities=[1.0, 0.5, 0.5],
               coupling="sample")
