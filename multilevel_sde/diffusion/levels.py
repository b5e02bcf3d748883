"""Denoising networks as drifts: one rung of the ladder is ``F = (A_n x0 + (B_n - 1) x) / h_n`` (schedule.py).

The network's prediction is turned into a clipped ``x0`` *inside* the level, before any difference is taken
(spec §4.5), so ML-EM's telescoping acts on clipped ``x0`` estimates and stays unbiased. Levels see the
flattened state ``(B, C*H*W)`` that the core solvers use, and solver time ``s`` (a 0-d tensor, or ``(n,)``
per-sample times); the step index is found on the device, so no host synchronisation happens.

The library's convention (its own networks, trained by ``train.py``): ``model(x_t, t)`` with the timestep index
``t = 1..T`` of ``x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) eps`` (``alpha_bar[0] = 1``).

Prediction kinds of a plain network (duck typing, no hard dependency):
- ``"eps"``: ``model(x_t, t) -> eps`` (``t`` integer timesteps ``(B,)``, the library's ``1..T``). An output
  with a ``.sample`` attribute is unwrapped.
- ``"x0"``: ``model(x_t, t) -> x0``.
- ``"v"``: ``model(x_t, t) -> v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``.
- ``"k-diffusion"``: a k-diffusion denoiser ``model(x, sigma) -> x0`` in the variance-exploding
  parametrisation: ``x = x_t / sqrt(alpha_bar_t)``, ``sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; it is
  asked about the sampler's own noise levels, whatever schedule that is.

An *adapter* speaks for itself: a model with ``predict_x0(x_t, t)`` (the library's timesteps) and a
``noise_schedule`` (a ``NoiseSchedule``, or None) -- ``external.DiffusersModel`` for diffusers models (their
timesteps are ``0..T-1``, their schedule and ``prediction_type`` live in their scheduler config) and
``external.KDiffusionModel`` for k-diffusion denoisers. Its ``forward`` returns ``eps`` in the library's
convention, so it also fits every place that treats a level as an eps-model. A level refuses a model whose
declared schedule is not the sampler's, and a bare diffusers or k-diffusion model that would be asked the wrong
question (a diffusers UNet called with the library's ``t``, a k-diffusion denoiser called with a timestep as
``sigma``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .schedule import NoiseSchedule, StepGrid, same_schedule

__all__ = ["DenoiserLevel", "LinearPart", "PREDICTIONS", "declared_schedule", "per_level_predictions"]

PREDICTIONS = ("eps", "x0", "v", "k-diffusion")


def _name(model) -> str:
    return type(model).__name__


def _is_adapter(model) -> bool:
    return callable(getattr(model, "predict_x0", None))


def declared_schedule(models) -> Optional[NoiseSchedule]:
    """The noise schedule the models declare -- an adapter's ``noise_schedule``, or the one ``load_level`` /
    ``load_pretrained`` record from a checkpoint (a nested width reads its network's) --, None when none declares
    one.

    Raises ValueError naming the models (their checkpoint files when known) when two declare different schedules:
    such a ladder cannot share one sampler."""
    found = None
    for i, model in enumerate(models):
        own = getattr(model, "noise_schedule", None)  # (a NestedLevel reads its network's)
        if own is None:
            continue
        path = getattr(model, "checkpoint_path", None)
        source = repr(path) if path else f"network {i} ({_name(model)})"
        if found is not None and not same_schedule(found[0], own):
            raise ValueError(f"the ladder mixes noise schedules: {found[1]} was trained with {found[0].kind} "
                             f"(T={found[0].T}) and {source} with {own.kind} (T={own.T}); one sampler cannot serve "
                             "both: use levels trained with the same --schedule and --T")
        found = found or (own, source)
    return None if found is None else found[0]


def per_level_predictions(prediction, count: int) -> list:
    """``prediction`` (None, one kind, or one per network) as a list of ``count`` entries."""
    if prediction is None or isinstance(prediction, str):
        return [prediction] * count
    predictions = list(prediction)
    if len(predictions) != count:
        raise ValueError(f"prediction must be one kind or one per network ({count}), got {predictions!r}")
    return predictions


def _check_model(model, prediction: Optional[str], grid: StepGrid) -> Optional[str]:
    """The prediction kind of a plain ``model`` (None for an adapter), after refusing mismatched conventions."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or None), got {prediction!r}")
    if _is_adapter(model):
        if prediction not in (None, "eps"):
            raise ValueError(f"{_name(model)} is an adapter that speaks the library's convention (predict_x0, eps "
                             f"from forward); leave prediction unset for it, got {prediction!r}")
        own = getattr(model, "noise_schedule", None)
        if own is not None and not same_schedule(own, grid.schedule):
            raise ValueError(f"{_name(model)} was trained on its own noise schedule ({own.kind}, T={own.T}) but the "
                             f"sampler runs on {grid.schedule.kind} (T={grid.schedule.T}): sample with "
                             "schedule=model.noise_schedule (sample() and `mlsde sample` pick it when no schedule "
                             "is given)")
        return None
    module = type(model).__module__ or ""
    if module.split(".")[0] == "diffusers":
        raise ValueError(f"a bare diffusers {_name(model)} cannot be a level: it takes timesteps 0..T-1 and its "
                         "noise schedule and prediction_type live in its scheduler config; wrap it with "
                         "multilevel_sde.diffusion.external.DiffusersModel(model, scheduler), or load a saved "
                         "folder with load_diffusers_level(path)")
    if module.split(".")[0] == "k_diffusion" and prediction != "k-diffusion":
        raise ValueError(f"{_name(model)} is a k-diffusion denoiser model(x, sigma) -> x0: pass "
                         "prediction='k-diffusion', or wrap it with multilevel_sde.diffusion.external."
                         "KDiffusionModel(denoiser)")
    return prediction or "eps"


def unwrap_output(out) -> torch.Tensor:
    """A network's output as a tensor: itself, the ``.sample`` of a diffusers output, or a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):  # diffusers' UNet2DOutput
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor (or an object with .sample)")


class _GridLookup(nn.Module):
    """Per-step coefficients on the device and the step index of a solver time."""

    def __init__(self, grid: StepGrid, device=None):
        super().__init__()
        for name, value in grid.tensors(device).items():
            self.register_buffer(name, value, persistent=False)
        self.register_buffer("mids", (self.times[:-1] + self.times[1:]) / 2, persistent=False)

    def matches(self, grid: StepGrid) -> bool:
        """Whether these are ``grid``'s coefficients (its method, steps, schedule and variance)."""
        return all(torch.equal(getattr(self, name).cpu(), value) for name, value in grid.tensors("cpu").items())

    def index(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=self.times.dtype, device=self.times.device)
        return torch.searchsorted(self.mids, s).clamp(max=len(self.h) - 1)

    def coef(self, name: str, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        value = getattr(self, name)[n].to(like.dtype)
        return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


class DenoiserLevel(nn.Module):
    """A denoising network as the drift of the (DDPM or DDIM) sampling SDE on ``grid``.

    Args:
        model: the network (see the prediction kinds and adapters above).
        grid: the sampler's ``StepGrid``.
        image_shape: ``(C, H, W)``.
        prediction: "eps", "x0", "v" or "k-diffusion" for a plain network (None: "eps"); None (or "eps") for an
            adapter, which knows its own.
        clip: clip ``x0`` to ``[-clip, clip]`` (None: no clipping).
    """

    def __init__(self, model: nn.Module, grid: StepGrid, image_shape: Sequence[int], prediction: Optional[str] = None,
                 clip: Optional[float] = 1.0, device=None):
        super().__init__()
        kind = _check_model(model, prediction, grid)
        self.adapter = kind is None
        self.model, self.prediction, self.clip = model, kind or "eps", clip
        self.image_shape = tuple(int(s) for s in image_shape)
        self.lookup = _GridLookup(grid, device)

    def built_for(self, grid: StepGrid) -> bool:
        """Whether this level was built for ``grid`` (the same steps and coefficients)."""
        return self.lookup.matches(grid)

    def denoised(self, s, x: torch.Tensor) -> torch.Tensor:
        """The clipped ``x0`` estimate at solver time ``s`` for images ``x (B, C, H, W)``."""
        look = self.lookup
        n = look.index(s)
        steps = n.expand(x.shape[0]) if n.dim() == 0 else n
        if self.adapter:
            x0 = self.model.predict_x0(x, look.t_from[steps])
        elif self.prediction == "k-diffusion":
            sqrt_ab = look.coef("sqrt_ab", steps, x)
            x0 = unwrap_output(self.model(x / sqrt_ab, look.ve_sigma[steps].to(x.dtype)))
        else:
            out = unwrap_output(self.model(x, look.t_from[steps]))
            if self.prediction == "x0":
                x0 = out
            else:
                sqrt_ab, sqrt_1m = look.coef("sqrt_ab", steps, x), look.coef("sqrt_1m_ab", steps, x)
                x0 = (x - sqrt_1m * out) / sqrt_ab if self.prediction == "eps" else sqrt_ab * x - sqrt_1m * out
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0

    def forward(self, s, y: torch.Tensor) -> torch.Tensor:
        x = y.reshape(y.shape[0], *self.image_shape)
        n = self.lookup.index(s)
        steps = n.expand(x.shape[0]) if n.dim() == 0 else n
        A, B, h = (self.lookup.coef(k, steps, x) for k in ("A", "B", "h"))
        drift = (A * self.denoised(s, x) + (B - 1) * x) / h
        return drift.reshape(y.shape)


class LinearPart(nn.Module):
    """``f^0 = (B_n - 1) x / h_n``: the drift with ``x0 = 0``, exactly known (the alternative base of spec §4.5)."""

    def __init__(self, grid: StepGrid, device=None):
        super().__init__()
        self.lookup = _GridLookup(grid, device)

    def forward(self, s, y: torch.Tensor) -> torch.Tensor:
        n = self.lookup.index(s)
        steps = n.expand(y.shape[0]) if n.dim() == 0 else n
        B, h = self.lookup.coef("B", steps, y), self.lookup.coef("h", steps, y)
        return (B - 1) * y / h
