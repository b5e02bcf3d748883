"""Real diffusers and k-diffusion models as levels, against their own samplers (issue #21).

A tiny random-init ``UNet2DModel`` (offline) is sampled by the library and by diffusers' schedulers, and a
k-diffusion denoiser by the library and by k-diffusion's ``sample_euler``, from the same starting noise (and, for
DDPM, the same noise at every step): they agree to float32 rounding. The tests that need diffusers skip without
it (``pip install "multilevel-sde[diffusers]"``); k-diffusion's own code is used when it is installed (``pip
install --no-deps k-diffusion`` suffices), else a faithful copy (``kdiffusion_reference.py``).
"""

import json
import warnings

import numpy as np
import pytest
import torch

import kdiffusion_reference
from multilevel_sde.diffusion import DenoiserLevel, NoiseSchedule, StepGrid, respaced_timesteps, sample
from multilevel_sde.diffusion.external import (DiffusersModel, KDiffusionModel, diffusers_schedule,
                                               is_diffusers_folder, load_diffusers_level)
from multilevel_sde.diffusion.sample import brownian_path, initial_noise

SHAPE = (1, 8, 8)
BATCH = 2


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet(diffusers):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                  block_out_channels=(8, 16), norm_num_groups=4,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    return model.eval()


def noise(seed=0, shape=(BATCH, *SHAPE)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def gap(a, b) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- diffusers: DDIM

def diffusers_ddim(unet, scheduler, steps, x, clipped_eps=True):
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clipped_eps).prev_sample
    return x


@pytest.mark.parametrize("steps, tol", [(1000, 5e-5), (50, 1e-5)])
def test_ddim_matches_diffusers_ddim_scheduler(diffusers, unet, steps, tol):
    """Cosine (squaredcos_cap_v2), eta = 0, clip, trailing spacing, set_alpha_to_one: the same sampler."""
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True,
                                        timestep_spacing="trailing")
    level = DiffusersModel(unet, scheduler)
    assert level.noise_schedule.kind == "cosine" and level.prediction == "eps"
    x_T = noise()
    ours = sample(level, SHAPE, batch=BATCH, method="ddim", steps=steps, x_T=x_T, seed=0, costs=[1.0]).images
    theirs = diffusers_ddim(unet, scheduler, steps, x_T.clone())
    assert gap(ours, theirs) < tol
    assert ours.abs().max() <= 1.0


@pytest.mark.parametrize("prediction_type, beta_schedule", [("v_prediction", "linear"), ("sample", "scaled_linear")])
def test_ddim_reads_prediction_type_and_schedule_from_the_scheduler(diffusers, unet, prediction_type, beta_schedule):
    scheduler = diffusers.DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                                        beta_start=0.00085 if beta_schedule == "scaled_linear" else 0.0001,
                                        beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02,
                                        clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    level = DiffusersModel(unet, scheduler)
    schedule = level.noise_schedule
    # diffusers' alphas_cumprod[k - 1] is the library's alpha_bar[k]
    assert np.allclose(schedule.alpha_bar[1:], scheduler.alphas_cumprod.double().numpy(), rtol=1e-5, atol=0)
    x_T = noise(1)
    ours = sample(level, SHAPE, batch=BATCH, method="ddim", steps=50, x_T=x_T, seed=0, costs=[1.0]).images
    assert gap(ours, diffusers_ddim(unet, scheduler, 50, x_T.clone())) < 1e-5
    # the adapter's eps agrees with the scheduler's own conversion
    x, t = noise(2), torch.full((BATCH,), 500)
    ab = scheduler.alphas_cumprod[499]
    out = unet(x, 499).sample
    eps = ab.sqrt() * out + (1 - ab).sqrt() * x if prediction_type == "v_prediction" else \
        (x - ab.sqrt() * out) / (1 - ab).sqrt()
    with torch.no_grad():
        assert gap(level(x, t), eps) < 1e-5


def test_the_timestep_shift_matters(diffusers, unet):
    """Asking the network about the library's t (one step off) gives a visibly different sample."""
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    x_T = noise()
    right = sample(DiffusersModel(unet, scheduler), SHAPE, batch=BATCH, method="ddim", steps=50, x_T=x_T,
                   costs=[1.0], seed=0).images
    off_by_one = Plain(lambda x, t: unet(x, t).sample)  # what the old adapter did: the library's t, unshifted
    wrong = sample(off_by_one, SHAPE, batch=BATCH, method="ddim", steps=50, x_T=x_T, costs=[1.0], seed=0).images
    assert gap(right, wrong) > 1e-2


class Plain(torch.nn.Module):
    """A plain network in the library's convention, from a function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


# ---------------------------------------------------------------------------------------------- diffusers: DDPM

@pytest.mark.parametrize("float32_alphas", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_step_mean_and_variance_match_ddpm_scheduler(diffusers, unet, variance_type, steps, float32_alphas):
    """Each step's mean and standard deviation. diffusers adds no noise at its t = 0 (the library's last step
    at 1000 steps: ``final_noise=False``); on a respaced grid its last t is > 0 and fixed_large adds noise there.

    diffusers keeps ``alphas_cumprod`` in float32 and forms ``beta' = 1 - a_t / a_prev`` in float32: near t = 0,
    where beta' ~ 5e-5, that rounding moves its mean by ~2e-5. On the scheduler's own float32 ``alphas_cumprod``
    the library agrees to that; on the float64 schedule recomputed from the config (the adapter's default, which
    is the more accurate) the float32 storage of ``alphas_cumprod`` itself shows, by ~2e-4 at t = 1."""
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type,
                                        clip_sample=True)
    own = NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod) if float32_alphas else None
    level = DiffusersModel(unet, scheduler, schedule=own)
    ts = respaced_timesteps(1000, steps)
    scheduler.set_timesteps(timesteps=(ts[:-1] - 1).tolist())
    variance = "posterior" if variance_type == "fixed_small" else "beta"
    grid = StepGrid(level.noise_schedule, ts, "ddpm", variance, final_noise=steps < 1000)
    drift = DenoiserLevel(level, grid, SHAPE)
    worst_mean = worst_std = 0.0
    for n in sorted({0, 1, steps // 2, steps - 2, steps - 1}):
        x = noise(10 + n)
        t = int(ts[n]) - 1
        with torch.no_grad():
            mean = x + float(grid.h[n]) * drift(torch.tensor(grid.times[n]), x.reshape(BATCH, -1)).reshape(x.shape)
            out = scheduler.step(unet(x, t).sample, t, x, generator=torch.Generator().manual_seed(n)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(n))
        std = float(scheduler._get_variance(t) ** 0.5) if t > 0 else 0.0
        worst_mean = max(worst_mean, gap(mean, out - std * z))
        worst_std = max(worst_std, abs(std - grid.sigma[n]))
        assert gap(mean + grid.sigma[n] * z, out) < (5e-5 if float32_alphas else 5e-4)
    assert worst_mean < (5e-5 if float32_alphas else 5e-4) and worst_std < (1e-6 if float32_alphas else 2e-6)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_sampler_matches_ddpm_scheduler_on_shared_noise(diffusers, unet, variance_type, monkeypatch):
    """50 steps of ``sample()`` against diffusers' loop fed the library's own per-step noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type)
    level = DiffusersModel(unet, scheduler)
    variance = "posterior" if variance_type == "fixed_small" else "beta"
    steps, seed = 50, 4
    ours = sample(level, SHAPE, batch=BATCH, method="ddpm", steps=steps, seed=seed, costs=[1.0], variance=variance)
    ts = respaced_timesteps(1000, steps)
    grid = StepGrid(level.noise_schedule, ts, "ddpm", variance)
    bm = brownian_path(grid, BATCH, int(np.prod(SHAPE)), seed)
    zs = iter([(bm(grid.times[n], grid.times[n + 1]) / np.sqrt(grid.h[n])).reshape(BATCH, *SHAPE)
               for n in range(steps)])
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, **kwargs: next(zs))
    scheduler.set_timesteps(timesteps=(ts[:-1] - 1).tolist())
    x = initial_noise((BATCH, *SHAPE), seed)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert gap(ours.images, x) < 5e-5


# ------------------------------------------------------------------------------------------ the final DDPM step

class ToyEps(torch.nn.Module):
    def forward(self, x, t):
        return 0.5 * torch.tanh(x) * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)


def test_final_noise_false_returns_the_clipped_x0():
    sched = NoiseSchedule.cosine(T=100)
    paths = {True: [], False: []}
    runs = {final: sample(ToyEps(), SHAPE, batch=8, steps=20, schedule=sched, seed=5, costs=[1.0],
                          final_noise=final, callback=lambda n, x, final=final: paths[final].append(x.clone()))
            for final in (True, False)}
    noisy, clean = runs[True], runs[False]
    assert noisy.settings["final_noise"] and not clean.settings["final_noise"]
    assert noisy.images.abs().max() > 1 and clean.images.abs().max() <= 1  # the default's last noise leaves [-1, 1]
    assert all(torch.equal(a, b) for a, b in zip(paths[True][:-1], paths[False][:-1]))  # same path until then
    grid = StepGrid(sched, respaced_timesteps(100, 20))
    x = paths[False][-2]  # the images before the last step
    t = torch.full((8,), int(grid.t_from[-1]))
    x0 = ((x - grid.sqrt_1m_ab[-1] * ToyEps()(x, t)) / grid.sqrt_ab[-1]).clamp(-1, 1)
    assert gap(clean.images, x0) < 1e-6
    post = sample(ToyEps(), SHAPE, batch=8, steps=20, schedule=sched, seed=5, costs=[1.0], variance="posterior")
    assert post.images.abs().max() <= 1  # the posterior variance vanishes on the last step anyway


# ------------------------------------------------------------------------------------------------- k-diffusion

@pytest.fixture(scope="module")
def kd():
    return kdiffusion_reference.load()


LINEAR_ALPHAS = torch.as_tensor(NoiseSchedule.linear().alpha_bar[1:], dtype=torch.float32)  # diffusers' t = 0..T-1


class EpsNet(torch.nn.Module):
    """About the exact eps of Gaussian data ``x0 ~ N(0, 0.25 I)`` on diffusers' timesteps ``0..T-1`` (a float t,
    as k-diffusion's unquantized wrapper passes, is interpolated), plus a nonlinear term."""

    def __init__(self, alphas_cumprod=LINEAR_ALPHAS):
        super().__init__()
        self.ac = alphas_cumprod.double()

    def forward(self, x, t):
        t = t.double().clamp(0, len(self.ac) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        a = ((hi - t) * self.ac[lo] + (1 - (hi - t)) * self.ac[hi]).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() / (0.25 * a + 1 - a) * x + 0.05 * torch.tanh(3 * x)


def test_euler_ode_matches_k_diffusion_sample_euler_on_the_models_sigmas(kd):
    """A discrete eps-model behind k-diffusion's DiscreteEpsDDPMDenoiser: the library's DDIM on the model's
    schedule (KDiffusionModel) is sample_euler on the same sigmas."""
    denoiser = kd.DiscreteEpsDDPMDenoiser(EpsNet(), LINEAR_ALPHAS, quantize=True)
    level = KDiffusionModel(denoiser)
    steps = 50
    ts = respaced_timesteps(1000, steps)
    sigmas = torch.cat([denoiser.sigmas[torch.as_tensor(ts[:-1] - 1)], torch.zeros(1)])
    x = noise(3) * sigmas[0]
    theirs = kd.sample_euler(denoiser, x.clone(), sigmas, disable=True)
    x_T = x / (1 + sigmas[0] ** 2).sqrt()  # the same start in the variance-preserving variables
    ours = sample(level, SHAPE, batch=BATCH, method="ddim", steps=steps, x_T=x_T, seed=0, costs=[1.0], clip=None)
    assert gap(ours.images, theirs) < 5e-6


def test_euler_ode_matches_k_diffusion_on_karras_sigmas(kd):
    """Karras sigmas as a schedule (NoiseSchedule.from_sigmas): DDIM with steps = n is sample_euler on them; the
    bare denoiser with prediction="k-diffusion" and the KDiffusionModel adapter agree."""
    denoiser = kd.DiscreteEpsDDPMDenoiser(EpsNet(), LINEAR_ALPHAS, quantize=False)
    sigmas = kd.get_sigmas_karras(15, 0.02, 80.0)
    schedule = NoiseSchedule.from_sigmas(sigmas)
    assert schedule.T == 15 and np.allclose(schedule.sigmas[::-1][:-1], sigmas[:-1].double().numpy(), rtol=1e-12)
    x = noise(4) * sigmas[0]
    theirs = kd.sample_euler(denoiser, x.clone(), sigmas, disable=True)
    x_T = x / (1 + sigmas[0] ** 2).sqrt()
    bare = sample(denoiser, SHAPE, batch=BATCH, method="ddim", steps=15, schedule=schedule, x_T=x_T, seed=0,
                  costs=[1.0], clip=None, prediction="k-diffusion")
    adapted = sample(KDiffusionModel(denoiser, schedule), SHAPE, batch=BATCH, method="ddim", steps=15, x_T=x_T,
                     seed=0, costs=[1.0], clip=None)
    assert gap(bare.images, theirs) < 5e-6 and gap(adapted.images, theirs) < 5e-6


def test_k_diffusion_denoiser_of_a_diffusers_unet_matches_the_diffusers_adapter(diffusers, unet, kd):
    """Two ecosystems' wrappers of one network, in one ladder: the same drift on the same schedule."""
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    level = DiffusersModel(unet, scheduler)
    denoiser = kd.DiscreteEpsDDPMDenoiser(lambda x, t: unet(x, t).sample, scheduler.alphas_cumprod, quantize=True)
    kd_level = KDiffusionModel(denoiser)
    x_T = noise(6)
    a = sample([kd_level, level], SHAPE, batch=BATCH, method="ddim", steps=20, x_T=x_T, seed=0, costs=[1, 1],
               probabilities=[1.0, 1.0])
    b = sample(kd_level, SHAPE, batch=BATCH, method="ddim", steps=20, x_T=x_T, seed=0, costs=[1.0])
    assert gap(a.images, b.images) < 1e-4


# ----------------------------------------------------------------------------------- conventions and refusals

def test_a_bare_diffusers_model_is_refused(unet):
    with pytest.raises(ValueError, match="bare diffusers UNet2DModel.*DiffusersModel"):
        sample(unet, SHAPE, batch=1, steps=5)


def test_a_bare_k_diffusion_denoiser_needs_its_prediction(kd):
    if not kd.real:
        pytest.skip("the refusal keys on k-diffusion's own classes")
    denoiser = kd.DiscreteEpsDDPMDenoiser(EpsNet(), LINEAR_ALPHAS, quantize=True)
    with pytest.raises(ValueError, match="prediction='k-diffusion'"):
        sample(denoiser, SHAPE, batch=1, steps=5, schedule=NoiseSchedule.cosine(100))


def test_schedules_are_taken_from_the_model_and_mismatches_refused(diffusers, unet):
    linear = DiffusersModel(unet, diffusers.DDPMScheduler(beta_schedule="linear"))
    cosine = DiffusersModel(unet, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    assert linear.noise_schedule.kind == "linear" and cosine.noise_schedule.kind == "cosine"
    res = sample(linear, SHAPE, batch=1, steps=5, seed=0, costs=[1.0])  # sampled on its own schedule
    assert res.settings["schedule"] == "linear"
    with pytest.raises(ValueError, match="trained on its own noise schedule"):
        sample(linear, SHAPE, batch=1, steps=5, schedule=NoiseSchedule.cosine(), costs=[1.0])
    with pytest.raises(ValueError, match="mixes noise schedules"):
        sample([linear, cosine], SHAPE, batch=1, steps=5, probabilities=[1.0, 0.5], costs=[1, 2])
    with pytest.raises(ValueError, match="leave prediction unset"):
        sample(cosine, SHAPE, batch=1, steps=5, prediction="x0", costs=[1.0])


def test_a_ladder_may_mix_the_library_and_diffusers_conventions(diffusers, unet):
    """A library eps-model (t = 1..T) below a diffusers network (t = 0..T-1): each is asked its own question."""
    level = DiffusersModel(unet, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    library_twin = Plain(lambda x, t: unet(x, t - 1).sample)  # the same network in the library's convention
    x_T = noise(7)
    mixed = sample([library_twin, level], SHAPE, batch=BATCH, method="ddim", steps=20, x_T=x_T, seed=0,
                   costs=[1, 2], probabilities=[1.0, 1.0])
    alone = sample(library_twin, SHAPE, batch=BATCH, method="ddim", steps=20, x_T=x_T, seed=0, costs=[1.0])
    assert gap(mixed.images, alone.images) < 1e-5
    per_level = sample([ToyEps(), library_twin], SHAPE, batch=BATCH, steps=10, seed=0, costs=[1, 2],
                       probabilities=[1.0, 0.5], prediction=["eps", "eps"])
    assert per_level.images.shape == (BATCH, *SHAPE)
    with pytest.raises(ValueError, match="one per network"):
        sample([ToyEps(), library_twin], SHAPE, batch=1, steps=5, prediction=["eps"], probabilities=[1, 1],
               costs=[1, 2])


# ---------------------------------------------------------------------------------------------- the loader, CLI

def test_diffusers_schedule_from_a_config_file(tmp_path, diffusers):
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path)
    schedule, prediction_type = diffusers_schedule(tmp_path / "scheduler_config.json")
    assert prediction_type == "v_prediction" and schedule.kind == "cosine"
    # float32 cumprod drifts by ~1e-5 (relative) over 1000 steps; the float64 schedule is the exact one
    assert np.allclose(schedule.alpha_bar[1:], scheduler.alphas_cumprod.double().numpy(), rtol=1e-4, atol=0)


def test_load_diffusers_level_from_save_pretrained_folders(tmp_path, diffusers, unet):
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    pipe_dir, flat_dir, bare_dir = tmp_path / "pipe", tmp_path / "flat", tmp_path / "bare"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pipe_dir)
    unet.save_pretrained(flat_dir)
    scheduler.save_pretrained(flat_dir)
    unet.save_pretrained(bare_dir)
    (tmp_path / "ckpt").mkdir()
    assert is_diffusers_folder(pipe_dir) and is_diffusers_folder(pipe_dir / "unet") and is_diffusers_folder(flat_dir)
    assert not is_diffusers_folder(tmp_path / "ckpt") and not is_diffusers_folder(tmp_path / "missing")
    x, t = noise(8), torch.full((BATCH,), 300)
    with torch.no_grad():
        expected = DiffusersModel(unet, scheduler)(x, t)
        for folder in (pipe_dir, pipe_dir / "unet", flat_dir):
            level = load_diffusers_level(folder)
            assert level.image_shape == SHAPE and level.noise_schedule.kind == "cosine"
            assert not level.training and torch.equal(level(x, t), expected)
    with pytest.raises(ValueError, match="no scheduler config"):
        load_diffusers_level(bare_dir)
    assert torch.equal(load_diffusers_level(bare_dir, scheduler=scheduler)(x, t), expected)
    with pytest.raises(ValueError, match="not a diffusers"):
        load_diffusers_level(tmp_path / "ckpt")


def test_mlsde_sample_takes_a_diffusers_folder(tmp_path, diffusers, unet):
    from multilevel_sde.cli import main

    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="linear")).save_pretrained(
        tmp_path / "pipe")
    out = tmp_path / "s.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sampled as the scheduler does (fixed_small, clip 1): nothing to warn
        assert main(["sample", str(tmp_path / "pipe"), "--steps", "4", "--batch", "2", "--no-progress",
                     "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.exists() and record["settings"]["schedule"] == "linear" and record["evaluations"] == [8]
    assert record["settings"]["variance"] == "posterior" and record["settings"]["clip"] == 1.0


def test_mlsde_experiment_takes_diffusers_folders_as_a_ladder(tmp_path, diffusers, unet):
    """Two diffusers models (the second a perturbed copy) as a two-level ladder, on their own schedule."""
    import copy

    from multilevel_sde.cli import main
    from multilevel_sde.diffusion.train import load_ladder

    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    other = copy.deepcopy(unet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    for name, model in (("small", unet), ("large", other)):
        diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp_path / name)
    models, names, shape = load_ladder([tmp_path / "small", tmp_path / "large"])
    assert names == ["small", "large"] and shape == SHAPE
    assert all(m.noise_schedule.kind == "cosine" for m in models)
    out = tmp_path / "exp"
    args = ["experiment", str(tmp_path / "small"), str(tmp_path / "large"), "--out", str(out), "--heldout", "2",
            "--select", "2", "--batch", "2", "--samplers", "ddim", "--em-steps", "4", "--reference-steps", "8",
            "--mlem-steps", "8", "--p-top", "0.5", "--strategies", "inverse-cost", "--no-stratified",
            "--tstitch-fractions", "0.5", "--tstitch-steps", "8", "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [n["name"] for n in results["networks"]] == ["small", "large"]
    assert any(p["family"] == "mlem" for p in results["points"])


def test_the_shipped_pretrained_ladder_is_a_ladder_for_load_ladder():
    from multilevel_sde.diffusion.pretrained import DEFAULT_LADDER, PRETRAINED_DIR
    from multilevel_sde.diffusion.train import load_ladder, trained_schedule

    models, names, shape = load_ladder(PRETRAINED_DIR / f"{DEFAULT_LADDER}.json")
    assert len(models) == 5 and names[0] == "width 3" and shape == (1, 16, 16)
    assert trained_schedule(models).kind == "cosine"


def test_sample_warns_where_the_scheduler_samples_otherwise(diffusers, unet):
    """clip_sample=False, variance_type and thresholding are read from the scheduler's config: sampling with
    other settings warns (naming the argument to pass), sampling as the scheduler does is silent."""
    import warnings

    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                        variance_type="fixed_small")
    level = DiffusersModel(unet, scheduler)
    assert level.scheduler_sampling == {"clip": None, "variance": "posterior"}
    with pytest.warns(UserWarning, match=r"clip=None.*clip=1\.0: pass clip=None") as caught:
        sample(level, SHAPE, batch=BATCH, method="ddpm", steps=5, seed=0, costs=[1.0])
    assert any("variance='posterior'" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(level, SHAPE, batch=BATCH, method="ddpm", steps=5, seed=0, costs=[1.0], clip=None,
               variance="posterior")
        sample(level, SHAPE, batch=BATCH, method="ddim", steps=5, seed=0, costs=[1.0], clip=None)
    with pytest.warns(UserWarning, match="dynamic thresholding"):
        DiffusersModel(unet, diffusers.DDPMScheduler(thresholding=True))
