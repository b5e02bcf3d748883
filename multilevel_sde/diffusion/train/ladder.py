"""A ladder of levels: training every level (:func:`train_ladder`, each in ``out_dir/level_{i}/``, finished levels
reused, smaller levels optionally distilled from larger ones) and measuring how close the rungs are
(:func:`level_differences`, ``||f^l - f^{l-1}||``: what ML-EM's variance pays for)::

    summaries = train_ladder(["cpu-xs", "cpu-s", "cpu-m"], dataset, config, "runs/ladder", distill=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ...files import atomic_write_json
from ...random_streams import LEVEL_DIFFERENCES, check_seed, derive_seed, make_generator
from ..schedule import NoiseSchedule
from . import processes
from .checkpoint import CHECKPOINT_NAME, load_level
from .config import TrainConfig, is_int, plain
from .inputs import as_images, eps, q_sample, split_images
from .loop import train_level

__all__ = ["train_ladder", "level_differences"]

PathLike = Union[str, os.PathLike]


@torch.no_grad()
def level_differences(models: Sequence, data, schedule: Optional[NoiseSchedule] = None,
                      timesteps: Optional[Sequence[int]] = None, n: int = 256, seed: int = 0, *,
                      batch_size: int = 256, device=None, model_factory: Optional[Callable] = None) -> dict:
    """``||f^l - f^{l-1}||`` of a ladder (cheapest first), per level and timestep, on noised data.

    For each ``t`` in ``timesteps`` (default: 5 spread over ``1..T``), ``n`` images of ``data`` (a random subset
    drawn from ``derive_seed(seed, LEVEL_DIFFERENCES)``) are noised to ``x_t`` with noise from ``derive_seed(seed,
    LEVEL_DIFFERENCES, t)`` (the same for every model), and every model's eps-prediction is taken. ``models`` may
    hold modules or checkpoint paths (loaded with their EMA weights).

    Returns a dict of plain lists (``l`` indexes levels, ``j`` timesteps):
        ``rms[l][j]``: RMS over images and pixels of ``eps^l - eps^{l-1}`` (``eps^{-1} = 0``, the paper's base
        ``f^0 = 0``, so ``rms[0]`` is the size of level 0's output); ``rms_mean[l]``: the RMS over all timesteps;
        ``rms_to_top[l][j]`` / ``rms_to_top_mean[l]``: against the last (largest) level; ``eps_mse[l][j]``: the
        denoising loss against the true noise; ``timesteps``, ``n``.
    The drift difference of an ML-EM step is ``A_t sqrt(1 - alpha_bar_t) / (sqrt(alpha_bar_t) h)`` times the
    eps difference (before clipping), so per timestep these are ``||f^l - f^{l-1}||`` up to a known factor.
    """
    schedule = schedule or NoiseSchedule.cosine()
    T = schedule.T
    if timesteps is None:
        timesteps = sorted({max(1, int(round(T * q))) for q in (0.05, 0.25, 0.5, 0.75, 0.95)})
    timesteps = [int(t) for t in timesteps]
    if any(not 1 <= t <= T for t in timesteps):
        raise ValueError(f"timesteps must lie in [1, {T}], got {timesteps}")
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    seed = check_seed(seed)
    models = [load_level(m, device, model_factory) if isinstance(m, (str, os.PathLike)) else m for m in models]
    if not models:
        raise ValueError("models must hold at least one model")
    images = as_images(data, "data")
    if device is None:
        param = next(iter(models[-1].parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if n < images.shape[0]:
        pick = torch.randperm(images.shape[0], generator=make_generator(derive_seed(seed, LEVEL_DIFFERENCES)))[:n]
        images = images[pick.sort().values]
    x0 = images.to(device=device, dtype=torch.float32)
    m = x0.shape[0]
    alpha_bar = torch.as_tensor(schedule.alpha_bar, dtype=torch.float64, device=device)
    k = len(models)
    modes = [mod.training for mod in models]
    for mod in models:
        mod.eval()
    rms = [[0.0] * len(timesteps) for _ in range(k)]
    to_top = [[0.0] * len(timesteps) for _ in range(k)]
    mse = [[0.0] * len(timesteps) for _ in range(k)]
    try:
        for j, t in enumerate(timesteps):
            g = make_generator(derive_seed(seed, LEVEL_DIFFERENCES, t))
            noise = torch.randn(tuple(x0.shape), generator=g, dtype=torch.float32).to(device)
            tt = torch.full((m,), t, dtype=torch.long, device=device)
            x_t = q_sample(alpha_bar, x0, tt, noise)
            out = [torch.cat([eps(mod, xb, tb).float() for xb, tb in
                              zip(x_t.split(batch_size), tt.split(batch_size))]) for mod in models]
            for l in range(k):
                prev = out[l - 1] if l else torch.zeros_like(out[l])
                rms[l][j] = float((out[l] - prev).double().pow(2).mean().sqrt())
                to_top[l][j] = float((out[l] - out[-1]).double().pow(2).mean().sqrt())
                mse[l][j] = float((out[l] - noise).double().pow(2).mean())
    finally:
        for mod, was in zip(models, modes):
            mod.train(was)

    def mean_rms(table):
        return [float(np.sqrt(np.mean(np.square(row)))) for row in table]

    return {"timesteps": timesteps, "n": m, "rms": rms, "rms_mean": mean_rms(rms), "rms_to_top": to_top,
            "rms_to_top_mean": mean_rms(to_top), "eps_mse": mse}


def train_ladder(models: Sequence, data, config: Optional[TrainConfig] = None, out_dir: PathLike = "runs/ladder",
                 distill: bool = False, *, heldout=None, holdout: Union[float, int] = 0.05,
                 distill_target: str = "next", image_size: Optional[int] = None, in_channels: Optional[int] = None,
                 model_factory: Optional[Callable] = None, report: bool = True,
                 report_timesteps: Optional[Sequence[int]] = None, report_n: int = 256) -> list:
    """Train every level of a ladder (cheapest first in ``models``), each in ``out_dir/level_{i}/``.

    Args:
        models: modules or ``SeparableUNet`` preset names (built by ``build_unet`` for the data's channels and
            size, ``seed=config.seed``).
        data: the training data; ``heldout`` the held-out data (None: ``holdout`` -- a fraction or a count -- of
            ``data`` is held out by ``data.split_dataset`` with ``config.seed``).
        distill: train the largest level on the eps loss, then each smaller one, largest first, by distillation
            from the EMA weights of the next larger level (``distill_target="next"``) or of the largest
            (``"top"``); otherwise every level is trained independently on the eps loss.
        model_factory: rebuilds a teacher from its checkpoint when the models are not ``SeparableUNet``\\ s
            (default: the class of the teacher module, when it has ``from_config``).
        report: write ``out_dir/ladder.json`` with the summaries and :func:`level_differences` of the trained
            EMA models on the held-out data (``report_timesteps``, ``report_n``), rank 0 only.

    A level whose checkpoint is already finished is reused, not retrained (``summary["skipped"]``); an
    unfinished one resumes. Returns one summary per level, in ladder order, with ``level``, and (with
    ``report``) ``rms_to_previous`` and ``rms_to_top`` (means over the report's timesteps).
    """
    config = (config or TrainConfig()).validate()
    if distill_target not in ("next", "top"):
        raise ValueError(f"distill_target must be 'next' or 'top', got {distill_target!r}")
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one model or preset name")
    images = as_images(data, "data")
    held = as_images(heldout, "heldout", allow_none=True)
    if held is None:
        images, held = split_images(images, holdout, config.seed)
    built = [_build(m, images, config.seed, image_size, in_channels) for m in models]
    out_dir = Path(out_dir)
    k = len(built)
    summaries: list = [None] * k
    for i in (reversed(range(k)) if distill else range(k)):  # distillation: the teachers first
        teacher, factory = None, model_factory
        if distill and i < k - 1:
            j = i + 1 if distill_target == "next" else k - 1
            teacher = out_dir / f"level_{j}" / CHECKPOINT_NAME
            factory = _factory(built[j], model_factory)
        # no ladder teacher (largest level, or distill=False): config.distill_from, if any, is the teacher
        summary = train_level(built[i], images, held, config, out_dir / f"level_{i}", teacher=teacher,
                              model_factory=factory)
        summary["level"] = i
        summaries[i] = summary
    if report and held is not None:
        emas = [load_level(out_dir / f"level_{i}" / CHECKPOINT_NAME, model_factory=_factory(built[i], model_factory))
                for i in range(k)]
        diffs = level_differences(emas, held, NoiseSchedule.named(config.schedule, config.T), report_timesteps,
                                  report_n, config.seed)
        for i, s in enumerate(summaries):
            s["rms_to_previous"] = diffs["rms_mean"][i]
            s["rms_to_top"] = diffs["rms_to_top_mean"][i]
        if processes.rank() == 0:
            body = {"distill": distill, "distill_target": distill_target if distill else None,
                    "train_config": config.to_dict(), "levels": summaries, "differences": diffs}
            atomic_write_json(out_dir / "ladder.json", plain(body), indent=1)
    return summaries


def _build(model, images: torch.Tensor, seed: int, image_size, in_channels) -> nn.Module:
    """A module as it is; a preset name built by ``build_unet`` for the images (or the sizes given)."""
    if isinstance(model, str):
        from ..unet import build_unet

        return build_unet(model, in_channels=in_channels or int(images.shape[1]),
                          image_size=image_size or (int(images.shape[-2]), int(images.shape[-1])), seed=seed)
    if not isinstance(model, nn.Module):
        raise ValueError(f"models must be modules or preset names; got {type(model).__name__}")
    return model


def _factory(model: nn.Module, model_factory: Optional[Callable]) -> Optional[Callable]:
    """What rebuilds ``model`` from its checkpoint: ``model_factory``, else nothing for a ``SeparableUNet``
    (``load_level`` knows it), else its class when it has ``from_config``."""
    from ..unet import SeparableUNet

    if model_factory is not None or isinstance(model, SeparableUNet):
        return model_factory
    return type(model) if hasattr(type(model), "from_config") else None
