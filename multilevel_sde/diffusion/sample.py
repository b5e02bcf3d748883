"""Samplers: DDPM (EM), DDIM (Euler) and their multilevel versions, on the core's solvers.

Every method shares, for one ``seed``, the initial noise ``x_T`` and one Brownian path on the fine
T-step solver-time grid (``GridBrownian``, counter-based: nothing is stored); a respaced method's step reads
the sum of the fine increments it spans. Coins come from the drift's own stream.

    images, stats = sample([small, medium, large], (3, 32, 32), batch=16, method="ddpm", steps=250,
                           probabilities=mlsde.InverseCost(c=...), seed=0)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..random_streams import (SAMPLE_BROWNIAN_PATH, SAMPLE_COINS, SAMPLE_INITIAL_NOISE, check_seed, derive_seed,
                              fresh_seed, make_generator)
from ..brownian import GridBrownian
from ..drift import MultilevelDrift
from ..integrate import odeint, sdeint
from ..sde import MultilevelSDE
from ..stats import Stats
from .levels import DenoiserLevel, LinearPart, declared_schedule, per_level_predictions
from .schedule import NoiseSchedule, StepGrid, respaced_timesteps

__all__ = ["sample", "SampleResult", "initial_noise", "brownian_path", "BASES"]

BASES = ("zero", "linear")


@dataclass
class SampleResult:
    """Images ``(B, C, H, W)`` and what they cost: ``stats`` (evaluations, calls, wall time per level; cost in
    the ladder's unit, FLOPs when measured), ``flops`` (total), ``seconds`` (wall time of the solve)."""

    images: torch.Tensor
    stats: Stats
    flops: float
    seconds: float
    settings: dict = field(default_factory=dict)


def initial_noise(shape: Sequence[int], seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``x_T ~ N(0, I)`` of ``shape`` from the stream of ``seed`` shared by every method."""
    gen = make_generator(derive_seed(seed, SAMPLE_INITIAL_NOISE), device or "cpu")
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)


def brownian_path(grid: StepGrid, batch: int, dim: int, seed: int, device=None,
                  dtype=torch.float32) -> GridBrownian:
    """The fine Brownian path of ``seed``'s stream on ``grid``'s fine grid, shape ``(batch, dim)``: the path
    every method sampled with ``seed`` shares (``initial_noise`` gives the matching ``x_T``)."""
    return GridBrownian(grid.fine_grid(), size=(batch, dim), seed=derive_seed(seed, SAMPLE_BROWNIAN_PATH),
                        dtype=dtype, device=device or "cpu")


def diffusion_of(grid: StepGrid, device):
    """``g(s) = sigma_n / sqrt(h_n)`` on step ``n``, so that ``g dW = sigma_n z`` with ``z = dW / sqrt(h_n)``."""
    g = torch.as_tensor(grid.sigma / np.sqrt(grid.h), dtype=torch.float64, device=device)
    mids = torch.as_tensor((grid.times[:-1] + grid.times[1:]) / 2, dtype=torch.float64, device=device)

    def sigma(s):
        n = torch.searchsorted(mids, torch.as_tensor(s, dtype=torch.float64, device=device)).clamp(max=len(g) - 1)
        return g[n]

    return sigma


def sample(
    models: Union[nn.Module, Sequence[nn.Module]],
    image_shape: Sequence[int],
    batch: int = 16,
    method: str = "ddpm",
    steps: int = 1000,
    schedule: Optional[NoiseSchedule] = None,
    probabilities=None,
    costs: Optional[Sequence[float]] = None,
    coupling: str = "batch",
    coins="independent",
    base: str = "zero",
    prediction: Union[None, str, Sequence[Optional[str]]] = None,
    clip: Optional[float] = 1.0,
    variance: str = "beta",
    final_noise: bool = True,
    seed: Optional[int] = None,
    x_T: Optional[torch.Tensor] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    drift: Optional[MultilevelDrift] = None,
) -> SampleResult:
    """Samples ``batch`` images with DDPM (EM) or DDIM (Euler), single-level or multilevel.

    Args:
        models: one network (plain EM/DDIM) or a ladder, cheapest first (ML-EM when ``probabilities`` is
            given; with a ladder and no probabilities only the top network is used).
        image_shape: ``(C, H, W)``.
        method: "ddpm" (ancestral, stochastic) or "ddim" (eta = 0).
        steps: number of steps, respaced from the schedule's T (e.g. 1000, 250).
        schedule: the noise schedule (default: the one the networks declare -- an adapter of a diffusers model
            carries its scheduler's -- else cosine with T = 1000).
        probabilities: an ML-EM schedule (``mlsde.Constant``, ``InverseCost``, ``Sigmoid``, ...).
        costs: per-sample cost of each network (default: FLOPs measured by the flop counter).
        coupling, coins: as in ``MultilevelDrift`` ("batch" coins run each network on the whole batch).
        base: "zero" (the paper's ``f^0 = 0``) or "linear" (``f^0`` = the drift with ``x0 = 0``).
        prediction: what each plain network predicts, "eps" (default), "x0", "v" or "k-diffusion" -- one kind,
            or one per network for a ladder that mixes them; adapters (``external.DiffusersModel``,
            ``KDiffusionModel``) know their own. See ``levels.DenoiserLevel``.
        clip: clip each level's ``x0`` to ``[-clip, clip]`` (None: no clipping).
        variance: DDPM's noise, "beta" (``sigma^2 = beta'``, diffusers' ``fixed_large``) or "posterior"
            (``beta~'``, diffusers' ``fixed_small``).
        final_noise: DDPM only: whether the last step adds noise (default True). False is the reference rule
            (Ho et al., improved-diffusion, diffusers): the last step returns its mean, the clipped ``x0``
            estimate, so the images lie in ``[-clip, clip]``. The default keeps the noise because it couples:
            every method sampled with one seed shares the fine Brownian path, so the last step's noise is the
            same sum of fine increments that a finer run spreads over its last steps, and the error to a fine
            reference is smaller (see docs/diffusion.md).
        seed: seeds ``x_T``, the Brownian path and the coins, a given ``drift``'s included (None: fresh; kept in
            ``settings``).
        x_T: initial noise ``(batch, C, H, W)`` (default: from ``seed``).
        dtype: of the images and the solve (default: ``x_T``'s, else float32); an ``x_T`` of another dtype is an
            error, not a cast.
        callback: ``callback(n, x)`` after each step with the images ``(B, C, H, W)``.
        drift: a ready drift (e.g. a ``MultilevelDrift``) over ``DenoiserLevel``s built for this method, grid and
            schedule, used as given: a level built for another grid, or any of ``probabilities``, ``costs``,
            ``coupling``, ``coins``, ``base``, ``prediction``, ``clip`` away from its default, is an error.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError("models must hold at least one network")
    schedule = schedule or declared_schedule(models) or NoiseSchedule.cosine()
    seed = check_seed(seed)
    seed = fresh_seed() if seed is None else seed
    device = torch.device(device) if device is not None else _device_of(models[-1])
    grid = StepGrid(schedule, respaced_timesteps(schedule.T, steps), method, variance, final_noise)
    _warn_if_unlike_the_schedulers(models, method, dict(clip=clip, variance=variance))
    shape = (batch, *image_shape)
    if x_T is not None and dtype is not None and x_T.dtype != dtype:
        raise ValueError(f"x_T is {x_T.dtype} but dtype={dtype}: give one dtype (dtype defaults to x_T's)")
    dtype = dtype or (x_T.dtype if x_T is not None else torch.float32)
    if x_T is None:
        x_T = initial_noise(shape, seed, device, dtype)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    y0 = x_T.reshape(batch, -1).to(device=device, dtype=dtype)

    built = drift is None
    if built:
        drift = build_drift(models, grid, image_shape, probabilities, costs, coupling, coins, base, prediction,
                            clip, device, seed)
    else:
        _check_given_drift(drift, grid, dict(probabilities=probabilities, costs=costs, coupling=coupling,
                                             coins=coins, base=base, prediction=prediction, clip=clip))
        if isinstance(drift, MultilevelDrift):
            drift.reseed(derive_seed(seed, SAMPLE_COINS))  # the coins a built drift would draw with this seed
    ts = torch.tensor([grid.times[0], grid.times[-1]], dtype=torch.float64, device=device)
    times = torch.as_tensor(grid.times, dtype=torch.float64)
    step_callback = None if callback is None else (lambda n, t, y: callback(n, y.reshape(shape)))
    _synchronize(device)  # wall time of this solve only (CUDA runs asynchronously)
    start = time.perf_counter()
    with torch.no_grad():
        if method == "ddim":
            out, stats = odeint(drift, y0, ts, options={"grid": times}, return_stats=True, progress=progress,
                                callback=step_callback)
        else:
            bm = brownian_path(grid, batch, y0.shape[1], seed, device, dtype)
            sde = MultilevelSDE(drift, diffusion_of(grid, device))
            out, stats = sdeint(sde, y0, ts, bm=bm, grid=times, return_stats=True, progress=progress,
                                callback=step_callback)
    _synchronize(device)
    seconds = time.perf_counter() - start
    flops = stats.cost if stats.cost_unit == "flops" else float("nan")
    multilevel = isinstance(drift, MultilevelDrift)
    settings = dict(method=method, steps=steps, batch=batch, seed=seed, multilevel=multilevel, schedule=schedule.kind,
                    clip=clip if built else "as the given drift's levels",
                    coupling=drift.coupling if multilevel else coupling,
                    base=("zero" if drift.base is None else "linear") if multilevel else base)
    if method == "ddpm":
        settings.update(variance=variance, final_noise=bool(final_noise))
    return SampleResult(out[-1].reshape(shape), stats, flops, seconds, settings)


def build_drift(models, grid: StepGrid, image_shape, probabilities=None, costs=None, coupling="batch",
                coins="independent", base="zero", prediction=None, clip=1.0, device=None, seed=0):
    """The drift of the sampling SDE: the top network alone (a ``DenoiserLevel``, counted like a one-level
    ladder with p = 1) or a ``MultilevelDrift`` over every network. ``prediction``: one kind, or one per
    network."""
    predictions = per_level_predictions(prediction, len(models))
    levels = [DenoiserLevel(m, grid, image_shape, kind, clip, device) for m, kind in zip(models, predictions)]
    if probabilities is None:
        levels, probabilities = levels[-1:], [1.0]
        costs = None if costs is None else list(costs)[-1:]
    return MultilevelDrift(levels, probabilities, costs=costs, coupling=coupling, coins=coins,
                           base=LinearPart(grid, device) if base == "linear" else None,
                           seed=derive_seed(seed, SAMPLE_COINS))


def _warn_if_unlike_the_schedulers(models, method: str, used: dict) -> None:
    """A warning where an adapted network's scheduler samples with another ``clip`` or (DDPM) ``variance``."""
    for model in models:
        for name, wanted in getattr(model, "scheduler_sampling", {}).items():
            if used[name] != wanted and (name == "clip" or method == "ddpm"):
                warnings.warn(f"{type(model).__name__}'s scheduler samples with {name}={wanted!r}, this sample() with "
                              f"{name}={used[name]!r}: pass {name}={wanted!r} to sample as the scheduler does",
                              stacklevel=3)


_DRIFT_DEFAULTS = dict(probabilities=None, costs=None, coupling="batch", coins="independent", base="zero",
                       prediction=None, clip=1.0)


def _check_given_drift(drift, grid: StepGrid, options: dict) -> None:
    """A drift given to ``sample`` must be built for ``grid``, and the options that build one left alone."""
    given = [name for name, value in options.items() if not _same(value, _DRIFT_DEFAULTS[name])]
    if given:
        raise ValueError(f"sample(drift=...) uses the drift as given, so {', '.join(given)} would be ignored: build "
                         "the drift with them (build_drift) or leave drift=None")
    for module in drift.modules() if isinstance(drift, nn.Module) else ():
        if isinstance(module, DenoiserLevel) and not module.built_for(grid):
            raise ValueError(f"drift has a level built for another grid than this sample's (method={grid.method!r}, "
                             f"{len(grid.h)} steps, its schedule and variance): build the drift for this grid")


def _same(value, default) -> bool:
    return value is default or (isinstance(value, (str, float, int)) and value == default)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
