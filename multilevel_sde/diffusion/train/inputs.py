"""What a training run reads: the images, the held-out split, each step's batch and the held-out set.

**Randomness** (never the global RNG): the batch order is a fresh permutation per epoch from
``derive_seed(seed, TRAIN_BATCH_ORDER, epoch)`` (counter-based: the order at any step is known from the step
alone), batches are consecutive slices of it (the last partial batch of an epoch is dropped); ``t`` and ``noise``
come from two persistent generators seeded by ``derive_seed(seed, TRAIN_TIMES)`` / ``derive_seed(seed,
TRAIN_NOISE)`` (on the training device), drawn for the whole global batch each step, of which rank ``r`` of ``K``
takes the slice ``[r B/K, (r+1) B/K)``. Checkpoints hold the generators' states, so a resumed run draws exactly
the batches, times and noise of an uninterrupted one. The held-out set (``eval_size`` images, their ``t`` and
noise) is drawn once from ``derive_seed(seed, TRAIN_HELDOUT)``: the same for every step and, with one seed, for
every level of a ladder.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ...random_streams import TRAIN_BATCH_ORDER, TRAIN_HELDOUT, TRAIN_NOISE, TRAIN_TIMES, derive_seed, make_generator
from ..data import split_dataset
from ..levels import unwrap_output
from .config import TrainConfig
from .processes import autocast

__all__ = ["as_images", "split_images", "q_sample", "eps", "Batches", "HeldOut"]


def as_images(data, name: str, allow_none: bool = False) -> Optional[torch.Tensor]:
    """An ``(N, ...)`` float tensor of the data set (``.images``, a tensor, or a map-style data set)."""
    if data is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is missing (None): pass a data set with .images, a tensor (N, C, H, W) or a "
                         "sequence of image tensors")
    if isinstance(data, torch.Tensor):
        images = data
    elif isinstance(getattr(data, "images", None), torch.Tensor):
        images = data.images
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        if len(data) == 0:
            raise ValueError(f"{name} is empty (0 images)")
        items = [data[i] for i in range(len(data))]
        items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        images = torch.stack([torch.as_tensor(it) for it in items])
    else:
        raise ValueError(f"{name} must be a data set with .images, a tensor (N, C, H, W) or a sequence of image "
                         f"tensors; got {type(data).__name__}")
    if images.dim() < 2:
        raise ValueError(f"{name} must hold images (N, C, H, W); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 images)")
    if not images.is_floating_point():
        images = images.float()
    return images


def split_images(images: torch.Tensor, holdout, seed: int, name: str = "the data"):
    """``(train, heldout)`` images, split by :func:`data.split_dataset` (``holdout``: a fraction or a count)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"{name} holds only {n} image{'' if n == 1 else 's'}: training needs at least 2 (one to "
                         "train on, one held out)")
    train, held = split_dataset(images, holdout, seed)  # Subsets of the tensor: their indices
    return images[torch.as_tensor(train.indices)], images[torch.as_tensor(held.indices)]


def q_sample(alpha_bar: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``NoiseSchedule.q_sample`` with the float64 ``alpha_bar`` already on the device (same arithmetic)."""
    ab = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps-prediction of ``model`` at ``(x, t)``: its output, or the ``.sample`` of a diffusers output or the
    first tensor of a tuple."""
    return unwrap_output(model(x, t))


class Batches:
    """The batches of a run (module docstring): ``draw(step)`` is this rank's ``(x0, t, noise)`` of step ``step``.
    ``generators`` (``time``, ``noise``) are what a checkpoint saves; :meth:`restore` sets them back."""

    def __init__(self, images: torch.Tensor, config: TrainConfig, rank: int, world: int, device: torch.device):
        self.config, self.device = config, device
        on_device = device.type == "cuda" and images.numel() * images.element_size() < 2 ** 31
        self.images = images.to(device) if on_device else images
        self.n, self.shape = images.shape[0], tuple(images.shape[1:])
        size = config.batch_size // world
        self.lo, self.hi = rank * size, (rank + 1) * size
        self.per_epoch = self.n // config.batch_size
        self.gen_device = device if device.type == "cuda" else torch.device("cpu")
        self.generators = {name: make_generator(derive_seed(config.seed, stream), self.gen_device)
                           for name, stream in (("time", TRAIN_TIMES), ("noise", TRAIN_NOISE))}
        self._order: dict = {}  # epoch -> permutation (the current epoch only)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's image indices of step ``step``."""
        epoch, j = divmod(step, self.per_epoch)
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(self.n, generator=make_generator(
                derive_seed(self.config.seed, TRAIN_BATCH_ORDER, epoch)))}
        start = j * self.config.batch_size
        return self._order[epoch][start + self.lo: start + self.hi]

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, t, noise)`` of step ``step`` on the device (``t`` and ``noise`` are drawn for the global batch,
        so the generators advance alike on every rank)."""
        cfg, dev = self.config, self.device
        x0 = self.images[self.indices(step).to(self.images.device)].to(dev, non_blocking=True)
        t = torch.randint(1, cfg.T + 1, (cfg.batch_size,), generator=self.generators["time"],
                          device=self.gen_device)
        noise = torch.randn((cfg.batch_size, *self.shape), generator=self.generators["noise"],
                            device=self.gen_device, dtype=torch.float32)
        return x0, t[self.lo:self.hi].to(dev), noise[self.lo:self.hi].to(dev)

    def restore(self, states: dict, devices: dict, step: int) -> None:
        """Set the generators to a checkpoint's ``rng`` states (saved on ``rng_device``); a state saved on another
        device type cannot be used: that stream is reseeded from ``step`` (with a warning)."""
        streams = {"time": TRAIN_TIMES, "noise": TRAIN_NOISE}
        for name, gen in self.generators.items():
            if devices.get(name) == gen.device.type:
                gen.set_state(states[name].cpu())  # states are CPU byte tensors, even for CUDA generators
            else:
                warnings.warn(f"resuming on {gen.device.type} a run saved on {devices.get(name)}: the '{name}' "
                              f"stream is reseeded from step {step}, so the draws differ from an uninterrupted run",
                              stacklevel=3)
                gen.manual_seed(derive_seed(self.config.seed, streams[name], step))


class HeldOut:
    """The held-out set (module docstring) and the losses of a model on it: :meth:`losses` gives the eps-MSE
    against the true noise and, with a teacher, the MSE against the teacher's eps (else None)."""

    def __init__(self, held: torch.Tensor, config: TrainConfig, alpha_bar: torch.Tensor, device: torch.device,
                 teacher: Optional[nn.Module] = None):
        self.config, self.device = config, device
        g = make_generator(derive_seed(config.seed, TRAIN_HELDOUT))
        m = min(config.eval_size, held.shape[0])
        idx = torch.randperm(held.shape[0], generator=g)[:m].sort().values
        t = torch.randint(1, config.T + 1, (m,), generator=g)
        noise = torch.randn((m, *held.shape[1:]), generator=g, dtype=torch.float32)
        x = q_sample(alpha_bar.cpu(), held[idx].to(torch.float32), t, noise)
        self.x, self.t, self.noise = x.to(device), t.to(device), noise.to(device)
        self.teacher_eps = None
        if teacher is not None:
            with torch.no_grad(), autocast(device, config.autocast):
                self.teacher_eps = torch.cat([eps(teacher, xb, tb).float() for xb, tb in self._chunks()])

    def _chunks(self):
        B = self.config.batch_size
        return zip(self.x.split(B), self.t.split(B))

    def losses(self, model: nn.Module) -> tuple[float, Optional[float]]:
        B = self.config.batch_size
        was = model.training
        model.eval()
        sq, sq_teacher = 0.0, 0.0
        with torch.no_grad(), autocast(self.device, self.config.autocast):
            for k, (xb, tb) in enumerate(self._chunks()):
                pred = eps(model, xb, tb).float()
                sq += float(((pred - self.noise.split(B)[k]) ** 2).sum(dtype=torch.float64))
                if self.teacher_eps is not None:
                    sq_teacher += float(((pred - self.teacher_eps.split(B)[k]) ** 2).sum(dtype=torch.float64))
        model.train(was)
        count = self.noise.numel()
        return sq / count, (sq_teacher / count if self.teacher_eps is not None else None)
