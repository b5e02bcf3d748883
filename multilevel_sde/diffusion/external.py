"""Models from diffusers and k-diffusion as levels, sampled with their own conventions.

Each ecosystem asks its networks a different question about the same noise level:

- **This library** (its own networks, ``train.py``): ``model(x_t, t) -> eps`` with ``t = 1..T`` and
  ``x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) eps``, ``alpha_bar[0] = 1``.
- **diffusers** (``UNet2DModel`` with a ``DDPMScheduler``/``DDIMScheduler``): timesteps ``0..T-1``, the same noise
  level one index earlier (diffusers' ``alphas_cumprod[k - 1]`` is the library's ``alpha_bar[k]``); the schedule
  and what the network predicts (``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample``) live in the
  scheduler's config, not in the network.
- **k-diffusion**: a denoiser ``D(x, sigma) -> x0`` in the variance-exploding variables ``x = x_t / sqrt(alpha_bar)``,
  ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.

:class:`DiffusersModel` and :class:`KDiffusionModel` are *adapters*: they take the library's ``(x_t, t)``, ask their
network its own question, and answer in the library's convention -- ``predict_x0(x_t, t)`` (used by the levels,
exact for every prediction type) and ``forward(x_t, t) -> eps``. Each declares the ``noise_schedule`` its network
was trained on: :func:`~multilevel_sde.diffusion.sample` samples on it when no schedule is given, and a level
refuses a sampler on another schedule, or a ladder whose networks declare different ones.

    unet = UNet2DModel.from_pretrained("path/to/unet")
    level = DiffusersModel(unet, DDPMScheduler.from_pretrained("path/to/scheduler"))
    # or, for a folder written by save_pretrained (a pipeline, or a UNet with its scheduler_config.json):
    level = load_diffusers_level("path/to/folder")
    sample([small, medium, large], level.image_shape, method="ddim", steps=50, ...)

diffusers and k-diffusion are optional (``pip install "multilevel-sde[diffusers]"``); nothing here imports them
until a folder is loaded.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .levels import unwrap_output
from .schedule import NoiseSchedule, same_schedule

__all__ = ["DiffusersModel", "KDiffusionModel", "diffusers_schedule", "is_diffusers_folder", "load_diffusers_level",
           "DIFFUSERS_PREDICTIONS"]

PathLike = Union[str, os.PathLike]

# diffusers' prediction_type -> the library's prediction kind
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

# the defaults of diffusers' DDPMScheduler / DDIMScheduler, for configs that leave a key out
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                           trained_betas=None, prediction_type="epsilon", rescale_betas_zero_snr=False)


def _config_dict(scheduler) -> dict:
    """A scheduler config as a plain dict: from a scheduler object (``.config``), a dict, or a JSON file/folder."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, (str, os.PathLike)):
        path = Path(scheduler)
        if path.is_dir():
            path = path / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no scheduler config at {os.fspath(path)!r}")
        return json.loads(path.read_text())
    config = getattr(scheduler, "config", scheduler)
    try:
        return dict(config)
    except (TypeError, ValueError) as err:
        raise TypeError(f"scheduler must be a diffusers scheduler, its config (a dict) or a path to "
                        f"scheduler_config.json, got {type(scheduler).__name__}") from err


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``squaredcos_cap_v2`` (``betas_for_alpha_bar``), in float64."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=np.float64)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, algorithm 1), in float64."""
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    return 1 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


def _scheduler_sampling(config: dict) -> dict:
    """What a scheduler's config says about sampling, as ``sample()``'s arguments: ``clip`` (from ``clip_sample``
    and ``clip_sample_range``) and DDPM's ``variance`` (from ``variance_type``), where the config says it."""
    out = {}
    if "clip_sample" in config:
        out["clip"] = float(config.get("clip_sample_range") or 1.0) if config["clip_sample"] else None
    variance = {"fixed_small": "posterior", "fixed_large": "beta"}.get(config.get("variance_type"))
    if variance is not None:
        out["variance"] = variance
    if config.get("thresholding"):
        warnings.warn("the scheduler uses dynamic thresholding, which sample() does not implement: it clips x0 to "
                      "[-clip, clip] instead", stacklevel=4)
    return out


def diffusers_schedule(scheduler) -> tuple[NoiseSchedule, str]:
    """``(schedule, prediction_type)`` of a diffusers scheduler (object, config dict, or path to its JSON).

    The betas are recomputed in float64 from the config (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``,
    ``sigmoid``, ``trained_betas``, ``rescale_betas_zero_snr``), so they agree with diffusers' float32
    ``alphas_cumprod`` to its rounding; another ``beta_schedule`` is read from the object's ``alphas_cumprod``.
    The schedule's ``kind`` is "cosine" or "linear" where it equals the library's schedule of that name."""
    config = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in _config_dict(scheduler).items() if v is not None}}
    T = int(config["num_train_timesteps"])
    name = str(config["beta_schedule"])
    start, end = float(config["beta_start"]), float(config["beta_end"])
    if config.get("trained_betas") is not None:
        betas, name = np.asarray(config["trained_betas"], dtype=np.float64), "trained_betas"
    elif name == "linear":
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    elif name == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    elif name == "sigmoid":
        betas = 1 / (1 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64))) * (end - start) + start
    elif getattr(scheduler, "alphas_cumprod", None) is not None:
        betas = None
    else:
        raise ValueError(f"beta_schedule {name!r} is not known here; pass the scheduler object itself (its "
                         "alphas_cumprod is read) or a NoiseSchedule as schedule=")
    if betas is None:
        schedule = NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod, f"diffusers {name}")
    else:
        if config.get("rescale_betas_zero_snr"):
            betas = _rescale_zero_terminal_snr(betas)
        schedule = NoiseSchedule(np.concatenate([[1.0], np.cumprod(1 - betas)]), f"diffusers {name}")
    for kind in ("cosine", "linear"):
        if same_schedule(schedule, NoiseSchedule.named(kind, schedule.T), rtol=1e-9):
            schedule = NoiseSchedule(schedule.alpha_bar, kind)
    prediction_type = str(config["prediction_type"])
    if prediction_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {sorted(DIFFUSERS_PREDICTIONS)}, got {prediction_type!r}")
    return schedule, prediction_type


class _Adapter(nn.Module):
    """The schedule buffers and the eps <-> x0 conversions shared by the adapters."""

    def _set_schedule(self, schedule: NoiseSchedule) -> None:
        self.noise_schedule = schedule
        self.register_buffer("alpha_bar", torch.as_tensor(schedule.alpha_bar, dtype=torch.float64), persistent=False)

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar[t.to(self.alpha_bar.device).long()]
        shape = (-1, *([1] * (like.dim() - 1)))
        return (ab.sqrt().to(like.device, like.dtype).reshape(shape),
                (1 - ab).sqrt().to(like.device, like.dtype).reshape(shape))

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps`` in the library's convention (``t = 1..T``)."""
        sqrt_ab, sqrt_1m = self._coefs(t, x_t)
        return (x_t - sqrt_ab * self.predict_x0(x_t, t)) / sqrt_1m


class DiffusersModel(_Adapter):
    """A diffusers network (``UNet2DModel``, or any ``model(sample, timestep) -> .sample``) as a level, with its
    scheduler's schedule and ``prediction_type``.

    Args:
        model: the diffusers network (unconditional; see ``class_labels``).
        scheduler: its scheduler, the scheduler's config (a dict) or a path to ``scheduler_config.json``: the
            schedule and ``prediction_type`` it was trained with. Not needed when ``schedule`` is given.
        prediction_type: overrides the scheduler's ("epsilon", "v_prediction" or "sample").
        schedule: a ``NoiseSchedule`` to use instead of the scheduler's.
        class_labels: for a class-conditional network, the labels to sample (an int, or a ``(B,)`` tensor).

    The network is called at diffusers' timestep ``t - 1`` for the library's ``t``; a network with twice the
    input channels (learned variance) contributes its first half, as in diffusers' schedulers.
    """

    def __init__(self, model: nn.Module, scheduler=None, *, prediction_type: Optional[str] = None,
                 schedule: Optional[NoiseSchedule] = None, class_labels=None):
        super().__init__()
        if isinstance(model, _Adapter):
            raise TypeError(f"model is already an adapter ({type(model).__name__})")
        if scheduler is None and schedule is None:
            raise ValueError("give the network's scheduler (or its config): a diffusers network's noise schedule and "
                             "prediction_type live there, not in the network")
        config_prediction = "epsilon"
        self.scheduler_sampling = _scheduler_sampling(_config_dict(scheduler)) if scheduler is not None else {}
        if scheduler is not None:
            own, config_prediction = diffusers_schedule(scheduler)
            schedule = schedule or own
        prediction_type = prediction_type or config_prediction
        if prediction_type not in DIFFUSERS_PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {sorted(DIFFUSERS_PREDICTIONS)}, got {prediction_type!r}")
        if prediction_type == "epsilon" and schedule.alpha_bar[-1] <= 0:
            raise ValueError("an epsilon-prediction network cannot be sampled from zero terminal SNR (alpha_bar_T = 0: "
                             "x0 = (x - eps) / 0); such schedules need v_prediction or sample")
        self.model = model
        self.prediction_type = prediction_type
        self.prediction = DIFFUSERS_PREDICTIONS[prediction_type]
        self.class_labels = class_labels
        self._set_schedule(schedule)
        self.train(bool(getattr(model, "training", False)))  # the network's mode (eval for a loaded one)

    @property
    def config(self):
        """The network's config (diffusers' ``in_channels``, ``sample_size``, ...)."""
        return getattr(self.model, "config", {})

    @property
    def image_shape(self) -> Optional[tuple]:
        """``(C, H, W)`` from the network's config (``in_channels``, ``sample_size``), None if it has none."""
        cfg = self.config
        size, channels = cfg.get("sample_size"), cfg.get("in_channels")
        if size is None or channels is None:
            return None
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(channels), int(h), int(w)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's own output at the library's timestep ``t`` (diffusers' ``t - 1``)."""
        kwargs = {}
        if self.class_labels is not None:
            labels = torch.as_tensor(self.class_labels, device=x_t.device)
            kwargs["class_labels"] = labels.expand(x_t.shape[0]) if labels.dim() == 0 else labels
        out = unwrap_output(self.model(x_t, t.to(x_t.device).long() - 1, **kwargs))
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance: the prediction is the first half
            out = out[:, : x_t.shape[1]]
        return out

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The (unclipped) ``x0`` estimate, computed as diffusers' schedulers do for this ``prediction_type``."""
        out = self.raw(x_t, t)
        if self.prediction == "x0":
            return out
        sqrt_ab, sqrt_1m = self._coefs(t, x_t)
        if self.prediction == "eps":
            return (x_t - sqrt_1m * out) / sqrt_ab
        return sqrt_ab * x_t - sqrt_1m * out  # v

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps`` in the library's convention (``t = 1..T``)."""
        out = self.raw(x_t, t)
        if self.prediction == "eps":
            return out
        sqrt_ab, sqrt_1m = self._coefs(t, x_t)
        if self.prediction == "v":
            return sqrt_ab * out + sqrt_1m * x_t
        return (x_t - sqrt_ab * out) / sqrt_1m  # x0

    def extra_repr(self) -> str:
        schedule = self.noise_schedule
        return f"prediction_type={self.prediction_type!r}, schedule={schedule.kind!r}, T={schedule.T}"


class KDiffusionModel(_Adapter):
    """A k-diffusion denoiser ``D(x, sigma) -> x0`` as a level.

    Args:
        denoiser: the denoiser (e.g. ``k_diffusion.external.DiscreteEpsDDPMDenoiser``, ``CompVisDenoiser``,
            ``layers.Denoiser``).
        schedule: the noise levels to ask it about. Default: a discrete denoiser's own ``sigmas``
            (``alpha_bar = 1 / (1 + sigma^2)``). A continuous denoiser takes any: give one, e.g.
            ``NoiseSchedule.from_sigmas(get_sigmas_karras(n, sigma_min, sigma_max))``.

    ``predict_x0(x_t, t) = D(x_t / sqrt(alpha_bar_t), sigma_t)``: DDIM on this schedule is k-diffusion's
    ``sample_euler`` on the same sigmas (the library works in the variance-preserving variables ``x_t``).
    Without an adapter, ``sample(..., prediction="k-diffusion")`` asks a denoiser about the sampler's schedule.
    """

    def __init__(self, denoiser: nn.Module, schedule: Optional[NoiseSchedule] = None):
        super().__init__()
        if isinstance(denoiser, _Adapter):
            raise TypeError(f"denoiser is already an adapter ({type(denoiser).__name__})")
        if schedule is None:
            sigmas = getattr(denoiser, "sigmas", None)
            if sigmas is None:
                raise ValueError(f"{type(denoiser).__name__} has no discrete sigmas: give the schedule to sample it on "
                                 "(NoiseSchedule.from_sigmas(...)), or sample it with prediction='k-diffusion'")
            schedule = NoiseSchedule.from_sigmas(sigmas)
        self.denoiser = denoiser
        self._set_schedule(schedule)
        self.train(bool(getattr(denoiser, "training", False)))

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t.to(self.alpha_bar.device).long()]
        sigma = ((1 - ab) / ab).sqrt().to(x_t.device, x_t.dtype)
        sqrt_ab = ab.sqrt().to(x_t.device, x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return unwrap_output(self.denoiser(x_t / sqrt_ab, sigma))


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _layout(path: PathLike) -> Optional[tuple[Path, Optional[Path]]]:
    """``(network folder, scheduler_config.json or None)`` of a diffusers ``save_pretrained`` folder, else None."""
    root = Path(path)
    if not root.is_dir():
        return None
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else None
    if index is not None:  # a pipeline: unet/ (or transformer/) and scheduler/
        for name in ("unet", "transformer"):
            if name in index and (root / name / "config.json").is_file():
                scheduler = root / "scheduler" / "scheduler_config.json"
                return root / name, scheduler if scheduler.is_file() else None
        return None
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else None
    if config is None or "_class_name" not in config or "_diffusers_version" not in config:
        return None
    for candidate in (root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json",
                      root.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return root, candidate
    return root, None


def is_diffusers_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder written by diffusers' ``save_pretrained``: a pipeline (``model_index.json``
    with ``unet/``) or a network (``config.json`` naming a diffusers class). Reads JSON only: diffusers need not
    be installed. A library checkpoint (``checkpoint.pt``) is not one."""
    return _layout(path) is not None


def load_diffusers_level(path: PathLike, scheduler=None, *, device=None, dtype: Optional[torch.dtype] = None,
                         class_labels=None) -> DiffusersModel:
    """The network of a diffusers ``save_pretrained`` folder as a level (a :class:`DiffusersModel` in eval mode).

    ``path``: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), a pipeline's ``unet/`` folder,
    or a network folder holding its ``scheduler_config.json`` (``scheduler.save_pretrained(folder)`` writes it
    beside the network's ``config.json``). ``scheduler``: the scheduler (object, config dict or path) when the
    folder has none. The schedule and ``prediction_type`` come from the scheduler config; ``image_shape`` from
    the network's ``in_channels`` and ``sample_size``. Nothing is downloaded."""
    layout = _layout(path)
    if layout is None:
        raise ValueError(f"{os.fspath(path)!r} is not a diffusers save_pretrained folder (no model_index.json with "
                         "unet/, nor a config.json written by diffusers)")
    model_dir, scheduler_file = layout
    if scheduler is None and scheduler_file is None:
        raise ValueError(f"{os.fspath(path)!r} holds a diffusers network but no scheduler config, which says its "
                         "noise schedule and prediction_type: save the scheduler beside it "
                         "(scheduler.save_pretrained(folder)) or pass scheduler=")
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("loading a diffusers folder needs diffusers: "
                          "pip install 'multilevel-sde[diffusers]'") from err
    class_name = (_read_json(model_dir / "config.json") or {}).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{os.fspath(model_dir)!r} holds a {class_name!r}, which diffusers "
                         f"{diffusers.__version__} does not provide")
    if "Condition" in class_name:
        raise ValueError(f"{os.fspath(model_dir)!r} holds a {class_name}, a text/image-conditioned network; "
                         "only unconditional (or class-conditional) networks can be levels here")
    model = cls.from_pretrained(os.fspath(model_dir), low_cpu_mem_usage=False)  # no accelerate needed
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    level = DiffusersModel(model, scheduler if scheduler is not None else scheduler_file, class_labels=class_labels)
    level.checkpoint_path = os.fspath(path)  # named by errors about the ladder (train.trained_schedule)
    if device is not None:
        level.to(device)
    return level.eval()
