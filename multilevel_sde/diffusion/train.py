"""Training the levels of a diffusion ladder: eps-prediction with Adam and an EMA (the paper's way), or
distillation from a larger level; resumable checkpoints, held-out losses, ``torchrun``/DDP.

One level (:func:`train_level`)::

    summary = train_level(model, train, heldout, TrainConfig(steps=2000, batch_size=64), "runs/cpu-s")
    model_ema = load_level("runs/cpu-s/checkpoint.pt")          # the EMA weights, what sampling uses

A ladder (:func:`train_ladder`), each level in ``out_dir/level_{i}/``, finished levels reused::

    summaries = train_ladder(["cpu-xs", "cpu-s", "cpu-m"], dataset, config, "runs/ladder", distill=True)

**Objective.** ``t ~ Uniform{1, ..., T}`` per sample, ``noise ~ N(0, I)``,
``x_t = q_sample(x0, t, noise)`` and the loss is ``MSE(model(x_t, t), target)`` (mean over every element):

- plain training: ``target = noise`` (DDPM's "simple" loss);
- distillation (``teacher`` / ``TrainConfig.distill_from``): ``target = mix * teacher(x_t, t) + (1 - mix) * noise``
  with ``mix = TrainConfig.distill_mix`` (default 1: pure distillation). The teacher runs without gradients, in
  eval mode; a checkpoint path loads its EMA weights. For any ``mix`` this is, up to a constant,
  ``mix * ||f - teacher||^2 + (1 - mix) * ||f - noise||^2``. Regressing a small level on the larger one shrinks
  ``f^l - f^{l-1}``, which drives ML-EM's variance (:func:`level_differences` measures it). The log's
  ``eps_loss`` is always the plain loss against the true noise, so both ways are comparable.

**Optimiser.** Adam (``lr``, betas 0.9/0.999, optional ``weight_decay``), linear learning-rate warm-up over
``warmup`` steps and an optional linear decay over the last ``decay`` steps, gradient-norm clipping
(``grad_clip``), optional bf16 autocast (``autocast="bf16"``; the loss is taken in float32). EMA of every
parameter (buffers copied): ``ema <- d ema + (1 - d) w`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` after
``n`` updates when ``ema_warmup`` (so short runs are not dominated by the initial weights), else
``d = ema_decay``. Sampling uses the EMA weights (:func:`load_level`).

**Randomness** (never the global RNG): the batch order is a fresh permutation per epoch from
``derive_seed(seed, STREAM_DATA, epoch)`` (counter-based: the order at any step is known from the step alone),
batches are consecutive slices of it (the last partial batch of an epoch is dropped); ``t`` and ``noise`` come
from two persistent generators seeded by ``derive_seed(seed, STREAM_TIME)`` / ``derive_seed(seed, STREAM_NOISE)``
(on the training device), drawn for the whole global batch each step. Their states are saved in checkpoints, so a
resumed run draws exactly the batches, times and noise of an uninterrupted one, and (on the CPU, or on a GPU with
deterministic kernels) ends with bit-identical weights, EMA, optimiser state and log (except the wall-clock
columns). The held-out set (``eval_size`` images, their ``t`` and noise) is drawn once from
``derive_seed(seed, STREAM_EVAL)``: the same for every step and, with one seed, for every level of a ladder.

**Checkpoints** (``out_dir/checkpoint.pt``, every ``checkpoint_every`` steps and at the end) hold only tensors
and plain containers -- weights, EMA weights, optimiser state, step, generator states (uint8 tensors), the model's
class name and config, the :class:`TrainConfig`, the log so far, the data's shape -- so
``torch.load(path, weights_only=True)`` reads them; every load here uses ``weights_only=True`` (no arbitrary
pickle). They are written atomically (temporary file in the same folder, fsync, ``os.replace``): a crash leaves
the previous checkpoint intact. They carry the sha256 of their tensors, which every load verifies (a damaged file
is a ``files.DamagedFileError`` naming it; older checkpoints without one load unverified). A run holds its folder's
lock (a second writer is refused), removes temporaries left by killed saves, and on SIGINT/SIGTERM saves a
checkpoint and raises :class:`TrainingInterrupted` (docs/architecture.md, "Guarantees"). Calling :func:`train_level` again on the same ``out_dir`` resumes from it (and a
finished one with ``steps`` raised continues training); the seed, batch size, schedule and distillation settings
must match (``ValueError`` otherwise), the architecture too (``ValueError`` naming both configs).

**Logs**: ``out_dir/log.csv`` and ``out_dir/log.json`` (rows: ``step``, ``loss`` -- the training objective
averaged since the previous row --, ``eps_loss``, ``grad_norm``, ``lr``, ``heldout_loss`` of the EMA weights,
``heldout_loss_raw`` of the raw weights, ``heldout_distill`` (MSE of the EMA student against the teacher on the
held-out set, when distilling), ``seconds`` since the start of training, all segments together), and
``out_dir/summary.json``.

**Several processes** (``torchrun --nproc_per_node=K -m multilevel_sde.diffusion.train ...``): when ``WORLD_SIZE``
> 1 (or a process group is already initialised), :func:`train_level` initialises the default process group
(``gloo`` on the CPU, ``nccl`` on CUDA, ``env://``) if needed, wraps the model in ``DistributedDataParallel``
and gives rank ``r`` the slice ``[r B/K, (r+1) B/K)`` of each global batch of ``B = batch_size`` images (and of
its ``t`` and noise), so the result equals a one-process run with the same global batch up to floating-point
summation order -- and a run may be resumed with another number of processes. ``batch_size`` must be divisible
by ``K``. Only rank 0 evaluates and writes files; the training losses in the log are averaged over the ranks; at
the end the ranks check that their weights are identical (``summary["ranks_in_sync"]``). On CUDA each rank uses
``cuda:LOCAL_RANK``. The process group is left initialised for further calls (:func:`main` destroys it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._random import check_seed, derive_seed, make_generator
from ..files import (DamagedFileError, FolderLock, FolderLockedError, atomic_write, atomic_write_json,
                     check_writable_folder, clean_stale_temporaries)
from .levels import _unwrap, declared_schedule
from .nested import NestedUNet, nested_loss
from .schedule import NoiseSchedule

__all__ = ["TrainConfig", "train_level", "train_ladder", "save_checkpoint", "load_checkpoint", "load_level", "load_ladder",
           "level_differences", "check_architecture", "main", "CHECKPOINT_NAME", "AUTOCAST", "trained_schedule",
           "checkpoint_schedule", "checkpoint_checksum", "TrainingInterrupted", "DamagedFileError"]

PathLike = Union[str, os.PathLike]
CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_KEY = "checksum"
FORMAT = "multilevel_sde.diffusion.train/1"
AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Random streams of training (sample.py uses 10-12).
STREAM_DATA, STREAM_TIME, STREAM_NOISE, STREAM_EVAL, STREAM_DIFF = 20, 21, 22, 23, 24
# Config keys that do not change the weights' shapes (ignored by the architecture check).
_NON_ARCHITECTURE_KEYS = ("seed", "autocast")
# TrainConfig fields that fix the random streams and the objective: a resumed run must keep them.
_RESUME_KEYS = ("seed", "batch_size", "schedule", "T", "distill_mix", "nested_target", "rung_weight")
_LOG_COLUMNS = ("step", "loss", "eps_loss", "grad_norm", "lr", "heldout_loss", "heldout_loss_raw",
                "heldout_distill", "seconds")


# ------------------------------------------------------------------------------------------------ config
def _bad(name: str, value, what: str) -> ValueError:
    return ValueError(f"TrainConfig.{name} must be {what}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Hyper-parameters of one level's training (validated on creation and again by :func:`train_level`).

    Attributes:
        steps: total optimiser steps (a resumed run continues up to this number).
        batch_size: global batch (split over the ranks under DDP).
        lr: Adam's learning rate (after warm-up). ``weight_decay``: Adam's L2 weight decay.
        ema_decay: EMA decay in [0, 1) (0.999 for short runs, 0.9999 for long ones); ``ema_warmup``: use
            ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates.
        warmup: steps of linear learning-rate warm-up (0: none).
        decay: the last ``decay`` steps of the run lower the learning rate linearly towards 0 (step ``n`` of
            ``steps`` uses ``lr * (steps - n) / (decay + 1)``; warmup-stable-decay; 0: constant after warm-up).
            A run resumed to more ``steps`` moves its decay window to its new end.
        grad_clip: max gradient norm (None: no clipping).
        seed: seeds every stream of the run (batch order, ``t``, noise, held-out set).
        log_every: a log row every this many steps (and at the end).
        eval_every: held-out losses every this many steps (None: only at the end); rounded to log rows.
        eval_size: held-out images evaluated (0: no held-out loss).
        checkpoint_every: a checkpoint every this many steps (None: only at the end).
        device: "cpu", "cuda", "cuda:1", ... (None: where the model is; ``cuda:LOCAL_RANK`` under DDP on CUDA).
        autocast: None or "bf16" (bfloat16 autocast for the forward passes).
        progress: a tqdm progress bar (rank 0 only).
        distill_from: None, a checkpoint path or a model: the teacher of distillation (``train_level``'s
            ``teacher`` argument overrides it).
        distill_mix: weight of the teacher in the target, in (0, 1] (see the module docstring).
        schedule, T: the noise schedule ("cosine" or "linear") and its number of steps.
        nested_target, rung_weight: for a ``NestedUNet`` (every width trained at each step, see
            ``nested.nested_loss``): what the smaller widths regress ("top": the top width's eps, "next": the
            next larger width's) and the weight of their losses beside the top width's; ``distill_mix`` mixes the
            true noise into their target as for distillation.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    ema_decay: float = 0.999
    ema_warmup: bool = True
    warmup: int = 100
    decay: int = 0
    grad_clip: Optional[float] = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 50
    eval_every: Optional[int] = 500
    eval_size: int = 256
    checkpoint_every: Optional[int] = 1000
    device: Optional[str] = None
    autocast: Optional[str] = None
    progress: bool = False
    distill_from: Any = None
    distill_mix: float = 1.0
    schedule: str = "cosine"
    T: int = 1000
    nested_target: str = "top"
    rung_weight: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "log_every", "T"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _bad(name, v, "a positive integer")
        for name in ("warmup", "decay", "eval_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise _bad(name, v, "a non-negative integer")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise _bad(name, v, "a positive integer or None")
        if self.decay > self.steps:
            raise _bad("decay", self.decay, f"at most steps ({self.steps})")
        if not _is_num(self.lr) or self.lr <= 0:
            raise _bad("lr", self.lr, "a positive finite number")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "a non-negative number")
        if not _is_num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise _bad("ema_decay", self.ema_decay, "a number in [0, 1)")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip <= 0):
            raise _bad("grad_clip", self.grad_clip, "a positive number or None")
        if not _is_num(self.distill_mix) or not 0 < self.distill_mix <= 1:
            raise _bad("distill_mix", self.distill_mix, "a number in (0, 1]")
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed, "a non-negative integer")
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise _bad("autocast", self.autocast, f"None or one of {sorted(AUTOCAST)}")
        if self.nested_target not in ("top", "next"):
            raise _bad("nested_target", self.nested_target, "'top' or 'next'")
        if not _is_num(self.rung_weight) or self.rung_weight < 0:
            raise _bad("rung_weight", self.rung_weight, "a non-negative number")
        if self.schedule not in ("cosine", "linear"):
            raise _bad("schedule", self.schedule, "'cosine' or 'linear'")
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise _bad("device", self.device, "a device string such as 'cpu' or 'cuda:0', or None")
        for name in ("progress", "ema_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.distill_from is not None and not isinstance(self.distill_from, (str, os.PathLike, nn.Module)):
            raise _bad("distill_from", self.distill_from, "None, a checkpoint path or a model")
        return self

    def to_dict(self) -> dict:
        """Plain JSON-able values (a teacher model is described by its class and config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["device"] = None if self.device is None else str(self.device)
        out["distill_from"] = _describe_teacher(self.distill_from)
        return _plain(out)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _describe_teacher(teacher) -> Optional[str]:
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        return str(teacher)
    return f"<{type(teacher).__name__} {_model_config(teacher)}>"


def _plain(value):
    """Python scalars, strings, lists and dicts only (what ``weights_only`` loads and JSON writes)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)  # also str subclasses (torch.__version__), which weights_only refuses
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (os.PathLike, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


# ------------------------------------------------------------------------------------------------ models
def _model_config(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if callable(cfg):
        cfg = cfg()
    return _plain(dict(cfg)) if isinstance(cfg, dict) else None


def _model_class(model: nn.Module) -> str:
    return type(model).__name__


def _shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_architecture(model: nn.Module, checkpoint: dict, path: PathLike = "checkpoint") -> None:
    """``ValueError`` naming both configs unless ``model`` has the class and architecture of the checkpoint.

    Compared: the class name and the config (``model.config``) without the keys that do not change the
    weights' shapes (``seed``, ``autocast``); for a model without a ``config``, the parameter names and shapes.
    """
    model = _unwrap_model(model)
    saved_cls, cls = checkpoint.get("model_class"), _model_class(model)
    saved_cfg, cfg = checkpoint.get("model_config"), _model_config(model)
    if saved_cfg is not None or cfg is not None:
        a = {k: v for k, v in (saved_cfg or {}).items() if k not in _NON_ARCHITECTURE_KEYS}
        b = {k: v for k, v in (cfg or {}).items() if k not in _NON_ARCHITECTURE_KEYS}
        if saved_cls != cls or a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
            raise ValueError(
                f"architecture mismatch: {os.fspath(path)!r} holds a {saved_cls} with config {saved_cfg}, but the "
                f"model is a {cls} with config {cfg}" + (f" (differing: {keys})" if keys else "")
                + "; use another output folder or a model of the checkpoint's config")
        return
    saved_shapes = checkpoint.get("param_shapes") or _shapes(checkpoint["model"])
    shapes = _shapes(model.state_dict())
    if saved_cls != cls or saved_shapes != shapes:
        diff = {k: (saved_shapes.get(k), shapes.get(k)) for k in set(saved_shapes) | set(shapes)
                if saved_shapes.get(k) != shapes.get(k)}
        raise ValueError(f"architecture mismatch: {os.fspath(path)!r} holds a {saved_cls}, the model is a {cls}; "
                         f"parameter shapes (checkpoint, model) differ: {dict(sorted(diff.items())[:10])}")


# ------------------------------------------------------------------------------------------------ files


def save_checkpoint(path: PathLike, model: nn.Module, ema: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, step: int = 0,
                    generators: Optional[dict] = None, config: Optional[TrainConfig] = None,
                    extra: Optional[dict] = None, model_config: Optional[dict] = None) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns the path.

    ``generators``: ``{name: torch.Generator}``, saved as uint8 state tensors (and the device type of each).
    ``extra``: further plain values (the log, accumulators, ...). ``model_config``: record this config instead of
    ``model.config`` (a resumed run keeps the one of its first segment, e.g. the initialisation seed). Only tensors
    and plain containers are written, so ``torch.load(path, weights_only=True)`` loads the file.
    """
    model = _unwrap_model(model)
    generators = generators or {}
    state = {
        "format": FORMAT,
        "model_class": _model_class(model),
        "model_config": _plain(model_config) if model_config is not None else _model_config(model),
        "param_shapes": _shapes(model.state_dict()),
        "model": model.state_dict(),
        "ema": (ema if ema is not None else model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": {name: g.get_state() for name, g in generators.items()},
        "rng_device": {name: g.device.type for name, g in generators.items()},
        "train_config": config.to_dict() if config is not None else None,
        "torch_version": str(torch.__version__),
    }
    for key, value in (extra or {}).items():
        state[key] = value if isinstance(value, torch.Tensor) else _plain_or_tensors(value)
    state[CHECKSUM_KEY] = {"algorithm": "sha256", "value": checkpoint_checksum(state)}
    return atomic_write(path, lambda fh: torch.save(state, fh))


def _digest(value, h, where: str = "") -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"{where}:{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for k, v in value.items():
            _digest(v, h, f"{where}/{k!r}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _digest(v, h, f"{where}[{i}]")


def checkpoint_checksum(state: dict) -> str:
    """sha256 of a checkpoint's tensors (weights, EMA, optimiser state, generator states, ...): each one's place,
    dtype, shape and bytes, in the order saved. ``save_checkpoint`` records it; every load verifies it. (Plain
    values such as the wall-clock seconds are left out: a resumed run's tensors, and so its checksum, equal an
    uninterrupted run's.)"""
    import hashlib

    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM_KEY}, h)
    return h.hexdigest()


def _damaged(path: Path, detail: str) -> DamagedFileError:
    return DamagedFileError(
        f"checkpoint {os.fspath(path)!r} is damaged or incomplete ({detail}); it cannot be used: restore it from a "
        "copy, or move it away and re-run the training that wrote it (mlsde train resumes from a checkpoint, or "
        "starts afresh in a folder without one)")


def _plain_or_tensors(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {str(k): _plain_or_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_or_tensors(v) for v in value]
    return _plain(value)


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None, map_location="cpu",
                    ema: bool = False) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (never arbitrary pickle) and return it.

    With ``model``: check the architecture (``ValueError`` naming both configs) and load the raw weights
    (``ema=True``: the EMA weights) into it. A missing file raises ``FileNotFoundError``; an empty, truncated or
    altered file (its tensors' checksum, when it records one) or one holding anything but tensors and plain
    containers raises ``files.DamagedFileError`` (a ``ValueError``) naming it and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    if path.stat().st_size == 0:
        raise _damaged(path, "the file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # a malicious pickle or a damaged file: refused either way
        text = str(err)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text.strip() else ""
        raise DamagedFileError(
            f"{os.fspath(path)!r} is not a weights-only checkpoint: it is damaged, or holds objects other than "
            f"tensors and plain containers, which are never unpickled ({detail or type(err).__name__}); restore it "
            "from a copy, or move it away and re-run the training that wrote it") from err
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError) as err:  # truncated, cut or altered: torch's zip reader and unpickler fail
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise _damaged(path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} checkpoint")
    recorded = ckpt.get(CHECKSUM_KEY)
    if recorded is not None:  # checkpoints written before checksums have none to verify
        value = recorded.get("value") if isinstance(recorded, dict) else None
        if value != checkpoint_checksum(ckpt):
            raise _damaged(path, "its contents do not match the sha256 checksum recorded when it was saved")
    if model is not None:
        check_architecture(model, ckpt, path)
        _unwrap_model(model).load_state_dict(ckpt["ema" if ema else "model"])
    return ckpt


def load_level(path: PathLike, device=None, model_factory: Optional[Callable] = None) -> nn.Module:
    """The model of a checkpoint (a file, or a folder holding ``checkpoint.pt``) with its **EMA** weights, in
    eval mode, on ``device``.

    The model is rebuilt from the saved config: a ``SeparableUNet`` or ``NestedUNet`` by its ``from_config``; any
    other class needs ``model_factory`` -- a class with ``from_config(config)`` or a callable ``config -> model``.
    The model carries how it was trained: ``model.noise_schedule`` (the ``NoiseSchedule`` of the checkpoint's
    ``train_config``, None if it records none; sample with it, see :func:`trained_schedule`) and
    ``model.checkpoint_path``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    return _level_from(load_checkpoint(path), path, device, model_factory)


def _level_from(ckpt: dict, path: Path, device=None, model_factory: Optional[Callable] = None) -> nn.Module:
    cls, cfg = ckpt["model_class"], ckpt["model_config"]
    if model_factory is None and cls == "NestedUNet":
        model_factory = NestedUNet
    if model_factory is None:
        if cls != "SeparableUNet":
            raise ValueError(f"{os.fspath(path)!r} holds a {cls}; pass model_factory (a class with from_config, "
                             "or a callable config -> model) to rebuild it")
        from .unet import SeparableUNet

        model_factory = SeparableUNet
    if cfg is None:
        raise ValueError(f"{os.fspath(path)!r} holds a {cls} without a config: build the model yourself and use "
                         "load_checkpoint(path, model, ema=True)")
    build = getattr(model_factory, "from_config", model_factory)
    model = build(dict(cfg))
    check_architecture(model, ckpt, path)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    if device is not None:
        model.to(device)
    # how it was trained travels with it: sampling must use this schedule (trained_schedule, mlsde sample)
    model.noise_schedule = checkpoint_schedule(ckpt)
    model.checkpoint_path = os.fspath(path)
    return model


def checkpoint_schedule(ckpt: dict) -> Optional[NoiseSchedule]:
    """The noise schedule a checkpoint's network was trained with (its ``train_config``'s ``schedule`` and
    ``T``), None when it records none."""
    config = ckpt.get("train_config")
    if not isinstance(config, dict) or config.get("schedule") is None:
        return None
    return NoiseSchedule.named(config["schedule"], int(config.get("T") or 1000))


#: The noise schedule the networks were trained with (``load_level`` records it as ``model.noise_schedule``, from
#: the checkpoint's ``train_config``), None when none records one; a ``ValueError`` naming the checkpoint files when
#: they were trained with different schedules. One lookup for every sampler: ``levels.declared_schedule``.
trained_schedule = declared_schedule


def load_ladder(paths: Union[PathLike, Sequence[PathLike]], device=None) -> tuple[list, list, tuple]:
    """The EMA models of a ladder, cheapest first: ``(models, names, image_shape)``.

    ``paths``: a ladder folder written by :func:`train_ladder` (its ``level_0``, ``level_1``, ... in index
    order), or checkpoint files / folders in ladder order. A checkpoint of a ``NestedUNet`` gives all its widths
    (``NestedLevel`` views, smallest first). ``image_shape`` ``(C, H, W)`` is read from the data shape the
    checkpoints were trained on; ``names`` are ``"level_i (d=base channels)"`` (``"width d"`` for nested levels).
    Every model carries its ``noise_schedule`` (see :func:`load_level`); a ladder whose checkpoints were trained with
    different schedules is refused (``ValueError`` naming the files).
    """
    from .external import is_diffusers_folder

    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if (len(paths) == 1 and paths[0].is_dir() and not (paths[0] / CHECKPOINT_NAME).exists()
            and not is_diffusers_folder(paths[0])):
        levels = sorted(paths[0].glob("level_*"), key=lambda p: int(p.name.split("_")[-1]) if
                        p.name.split("_")[-1].isdigit() else -1)
        if not levels:
            raise FileNotFoundError(f"{os.fspath(paths[0])!r} holds no checkpoint.pt and no level_* folders")
        paths = levels
    models, names, shapes = [], [], set()
    for path in paths:
        external = _external_levels(path, device)
        if external is not None:  # a diffusers folder, or a shipped/exported pretrained ladder
            levels, level_names, shape = external
            models += levels
            names += level_names
            shapes.add(shape)
            continue
        file = path / CHECKPOINT_NAME if path.is_dir() else path
        ckpt = load_checkpoint(file)
        model = _level_from(ckpt, file, device=device)
        shape = (ckpt.get("data") or {}).get("shape")
        if shape:
            shapes.add(tuple(int(s) for s in shape[1:]))
        if isinstance(model, NestedUNet):  # its widths, which read its schedule and file (declared_schedule)
            models += model.levels()
            names += [f"width {w}" for w in model.widths]
            continue
        models.append(model)
        width = (ckpt.get("model_config") or {}).get("base_channels")
        names.append(f"{file.parent.name} (d={width})" if width else file.parent.name)
    if len(shapes) != 1:
        raise ValueError(f"the checkpoints were trained on different or unknown image shapes {sorted(shapes)}; "
                         "give the image shape yourself")
    trained_schedule(models)  # refuses a ladder whose levels were trained with different schedules
    return models, names, shapes.pop()


def _external_levels(path: Path, device) -> Optional[tuple[list, list, tuple]]:
    """``(levels, names, image_shape)`` of a diffusers ``save_pretrained`` folder or of a pretrained ladder's
    ``.json``/``.safetensors`` pair (``pretrained.load_pretrained``); None for anything else."""
    from .external import is_diffusers_folder, load_diffusers_level

    if path.is_dir() and is_diffusers_folder(path):
        model = load_diffusers_level(path, device=device)
        if model.image_shape is None:
            raise ValueError(f"{os.fspath(path)!r}: the diffusers config gives no sample size; its image shape is "
                             "unknown")
        return [model], [path.name], tuple(int(s) for s in model.image_shape)
    if path.suffix in (".json", ".safetensors") and path.is_file():
        from .pretrained import load_pretrained

        net, record = load_pretrained(path, device=device)
        return net.levels(), [f"width {w}" for w in net.widths], tuple(int(s) for s in record["image_shape"])
    return None


def _write_logs(out_dir: Path, rows: list, meta: dict) -> None:
    def csv_bytes(fh):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(_LOG_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _LOG_COLUMNS})
        fh.write(text.getvalue().encode())

    atomic_write(out_dir / "log.csv", csv_bytes)
    atomic_write_json(out_dir / "log.json", {**meta, "rows": rows}, indent=1)


# ------------------------------------------------------------------------------------------------ data
def _as_images(data, name: str, allow_none: bool = False) -> Optional[torch.Tensor]:
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


def _split(images: torch.Tensor, holdout, seed: int, name: str = "the data"):
    """``(train, heldout)`` as :func:`data.split_dataset` draws them (same permutation, same sizes)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"{name} holds only {n} image{'' if n == 1 else 's'}: training needs at least 2 (one to "
                         "train on, one held out)")
    if isinstance(holdout, float):
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1) or a count; got {holdout!r}")
        k = min(max(int(round(holdout * n)), 1), n - 1)
    elif _is_int(holdout) and 1 <= holdout <= n - 1:
        k = int(holdout)
    else:
        raise ValueError(f"holdout must be a fraction in (0, 1) or a count in [1, {n - 1}]; got {holdout!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return images[perm[k:].sort().values], images[perm[:k].sort().values]


# ------------------------------------------------------------------------------------------------ devices, DDP
def _dist_context(device_hint):
    """``(rank, world, initialised_here)``; initialises the default process group under torchrun."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    backend = "nccl" if device_hint == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _resolve_device(config_device, model: nn.Module, world: int) -> torch.device:
    if config_device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        if world > 1 and torch.cuda.is_available():
            device = torch.device("cuda")
    else:
        try:
            device = torch.device(config_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"TrainConfig.device: unknown device {config_device!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={str(config_device)!r} asks for CUDA, which is not available here")
        if world > 1 and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _autocast(device: torch.device, name: Optional[str]):
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[name])


def _forward(model, x, t):
    return _unwrap(model(x, t))


# ------------------------------------------------------------------------------------------------ training
def _load_teacher(teacher, device, model_factory) -> Optional[nn.Module]:
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_level(teacher, device=device, model_factory=model_factory)
    elif not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be None, a checkpoint path or a model; got {type(teacher).__name__}")
    else:
        teacher = copy.deepcopy(_unwrap_model(teacher)).to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _check_resume(ckpt: dict, config: TrainConfig, distilled: bool, images: torch.Tensor, path: Path) -> None:
    defaults = TrainConfig().to_dict()  # a setting added after the checkpoint was written had its default
    saved = {**defaults, **(ckpt.get("train_config") or {})}
    now = config.to_dict()
    bad = {k: (saved.get(k), now.get(k)) for k in _RESUME_KEYS if saved.get(k) != now.get(k)}
    if bool(ckpt.get("distilled")) != distilled:
        bad["distilled"] = (bool(ckpt.get("distilled")), distilled)
    if bad:
        raise ValueError(f"cannot resume {os.fspath(path)!r}: settings that fix the run's random streams or "
                         f"objective differ (checkpoint, now): {bad}; use another output folder")
    changed = {k: (saved.get(k, defaults[k]), now[k]) for k in ("lr", "ema_decay", "ema_warmup", "warmup", "decay",
                                                                "grad_clip", "weight_decay", "autocast")
               if saved.get(k, defaults[k]) != now[k]}
    if changed:
        warnings.warn(f"resuming {os.fspath(path)!r} with changed settings (checkpoint, now): {changed}",
                      stacklevel=3)
    data = ckpt.get("data") or {}
    shape = [int(s) for s in images.shape]
    if data.get("shape") is not None and data["shape"] != shape:
        raise ValueError(f"cannot resume {os.fspath(path)!r}: it was trained on data of shape {data['shape']}, "
                         f"now {shape}")
    checksum = float(images.sum(dtype=torch.float64))
    if data.get("checksum") is not None and not math.isclose(data["checksum"], checksum, rel_tol=1e-9,
                                                             abs_tol=1e-6):
        warnings.warn(f"resuming {os.fspath(path)!r} on data whose checksum differs from the checkpoint's "
                      f"({data['checksum']} vs {checksum}): the batches will not be the same", stacklevel=3)


def _summary_from(rows: list, **extra) -> dict:
    def last(key):
        for row in reversed(rows):
            if row.get(key) is not None:
                return row[key]
        return None

    return {
        "final_loss": last("loss"),
        "final_eps_loss": last("eps_loss"),
        "final_heldout_loss": last("heldout_loss"),
        "final_heldout_distill": last("heldout_distill"),
        "heldout_history": [[r["step"], r["heldout_loss"]] for r in rows if r.get("heldout_loss") is not None],
        "loss_history": [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None],
        **extra,
    }


def train_level(model: nn.Module, train_data, heldout_data=None, config: Optional[TrainConfig] = None,
                out_dir: Optional[PathLike] = None, teacher=None, *, model_factory: Optional[Callable] = None,
                callback: Optional[Callable[[int], None]] = None, resume: bool = True) -> dict:
    """Train one level (in place: ``model`` ends with the raw weights; the EMA is in the checkpoint).

    Args:
        model: an eps-predictor ``model(x_t, t) -> eps`` (``t`` integer timesteps ``(B,)``), ideally with a
            ``config`` dict (recorded and checked on resume; ``SeparableUNet`` has one).
        train_data, heldout_data: data sets with ``.images`` (N, C, H, W), tensors, or sequences of images;
            ``heldout_data=None`` skips the held-out losses.
        config: a :class:`TrainConfig` (default: its defaults).
        out_dir: folder of ``checkpoint.pt``, ``log.csv``, ``log.json``, ``summary.json`` (required). If it holds
            a checkpoint (and ``resume``), training continues from it.
        teacher: distil from this model or checkpoint path (overrides ``config.distill_from``).
        model_factory: rebuilds a teacher given as a checkpoint of a class other than ``SeparableUNet``.
        callback: ``callback(step)`` after each step (after any checkpoint of that step).

    Returns a summary dict: ``final_loss``, ``final_eps_loss``, ``final_heldout_loss``, ``heldout_history``
    (``[step, loss]`` pairs), ``loss_history``, ``seconds`` (training wall time, all segments), ``steps``,
    ``start_step``, ``skipped`` (the checkpoint was already finished), ``checkpoint``, ``out_dir``,
    ``distilled``, ``world_size``, ``ranks_in_sync``, ``num_parameters``, ``model_class``, ``model_config``.

    Files (docs/architecture.md, "Guarantees"): the first process takes ``out_dir``'s lock (a second writer gets
    ``files.FolderLockedError``) and removes temporaries left by killed saves; every file is written atomically.
    On SIGINT/SIGTERM (main thread) the step in progress finishes, a checkpoint is saved and
    :class:`TrainingInterrupted` is raised (a ``KeyboardInterrupt``); calling again resumes bit-identically.
    """
    config = (config or TrainConfig()).validate()
    if out_dir is None:
        raise ValueError("out_dir is required (the checkpoint and the logs are written there)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    out_dir = Path(out_dir)
    if _launch_rank() != 0:  # only the first process writes files
        return _train_level(model, train_data, heldout_data, config, out_dir, teacher, model_factory, callback,
                            resume)
    check_writable_folder(out_dir, "output folder")
    with FolderLock(out_dir, f"training {type(model).__name__}"):
        clean_stale_temporaries(out_dir)
        _refuse_foreign_files(out_dir)
        return _train_level(model, train_data, heldout_data, config, out_dir, teacher, model_factory, callback,
                            resume)


def _ours(path: Path) -> bool:
    """Whether ``path`` (a log or summary name of a run folder) holds what training writes there."""
    try:
        if path.name == "log.csv":
            with open(path, encoding="utf-8") as fh:
                return fh.readline().startswith("step,loss")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("rows", "train_config") if path.name == "log.json" else ("final_loss", "checkpoint")
    return isinstance(value, dict) and all(k in value for k in keys)


def _refuse_foreign_files(out_dir: Path) -> None:
    """Training replaces its own logs and summary only: a ``log.json``, ``log.csv`` or ``summary.json`` that
    something else wrote is never overwritten (a ``ValueError`` naming it)."""
    for name in ("log.csv", "log.json", "summary.json"):
        path = out_dir / name
        if path.exists() and not _ours(path):
            raise ValueError(f"{os.fspath(path)!r} was not written by training and would be overwritten; give "
                             "another output folder (or move the file away)")


def _launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (before the group exists), else 0."""
    rank = _rank()
    return rank if rank else int(os.environ.get("RANK", "0") or 0)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint: ``signum``, ``step``, ``steps``,
    ``checkpoint`` (the path); run the same training again to resume it."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: PathLike):
        import signal

        self.signum, self.step, self.steps, self.checkpoint = int(signum), int(step), int(steps), Path(checkpoint)
        self.signame = signal.Signals(self.signum).name
        super().__init__(f"training interrupted by {self.signame} at step {step} of {steps}; checkpoint saved to "
                         f"{os.fspath(checkpoint)!r}: run the same training again to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class _StopSignals:
    """SIGINT and SIGTERM set ``signum`` instead of stopping the process (the loop saves and stops between
    steps); a second signal restores the old handlers and interrupts at once. Only in the main thread."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self.restore()

    def requested(self, world: int, device) -> bool:
        if world == 1:
            return self.signum is not None
        import torch.distributed as dist  # every rank stops at the same step

        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


def _train_level(model: nn.Module, train_data, heldout_data, config: TrainConfig, out_dir: Path, teacher,
                 model_factory: Optional[Callable], callback: Optional[Callable[[int], None]], resume: bool) -> dict:
    """:func:`train_level` once its folder is locked (first process) or without files (the others)."""
    ckpt_path = out_dir / CHECKPOINT_NAME
    images = _as_images(train_data, "train_data")
    held = _as_images(heldout_data, "heldout_data", allow_none=True)
    if held is not None and tuple(held.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"heldout_data images have shape {tuple(held.shape[1:])}, train_data "
                         f"{tuple(images.shape[1:])}")
    n_train = images.shape[0]
    B = config.batch_size
    if B > n_train:
        raise ValueError(f"TrainConfig.batch_size={B} is larger than the training set ({n_train} images)")

    hint = "cuda" if (config.device is not None and str(config.device).startswith("cuda")) or (
        config.device is None and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1) \
        else "cpu"
    rank, world, _ = _dist_context(hint)
    if B % world:
        raise ValueError(f"TrainConfig.batch_size={B} is not divisible by the number of processes ({world})")
    device = _resolve_device(config.device, model, world)
    model.to(device)
    raw = model
    teacher = teacher if teacher is not None else config.distill_from
    distilled = teacher is not None
    nested = isinstance(raw, NestedUNet)
    if nested and distilled:
        raise ValueError("a NestedUNet distils its smaller widths from its own top width; it takes no teacher "
                         f"(got {_describe_teacher(teacher)!r})")
    teacher_desc = _describe_teacher(teacher)
    teacher = _load_teacher(teacher, device, model_factory)
    schedule = NoiseSchedule.named(config.schedule, config.T)
    alpha_bar = torch.as_tensor(schedule.alpha_bar, dtype=torch.float64, device=device)

    ema = copy.deepcopy(raw)
    ema.eval()
    ema.requires_grad_(False)
    params = [p for p in raw.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    gen_t = make_generator(derive_seed(config.seed, STREAM_TIME), gen_device)
    gen_noise = make_generator(derive_seed(config.seed, STREAM_NOISE), gen_device)
    generators = {"time": gen_t, "noise": gen_noise}

    # ---- resume
    start_step, rows, seconds_before, eval_seconds = 0, [], 0.0, 0.0
    model_config = _model_config(raw)
    accum = torch.zeros(3, dtype=torch.float64, device=device)  # loss, eps_loss, grad_norm sums
    accum_count = 0
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_architecture(raw, ckpt, ckpt_path)
        _check_resume(ckpt, config, distilled, images, ckpt_path)
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        model_config = ckpt.get("model_config") or model_config
        for name, gen in generators.items():
            if ckpt["rng_device"].get(name) == gen.device.type:
                gen.set_state(ckpt["rng"][name].cpu())  # states are CPU byte tensors, even for CUDA generators
            else:
                warnings.warn(f"resuming on {gen.device.type} a run saved on {ckpt['rng_device'].get(name)}: the "
                              f"'{name}' stream is reseeded from step {start_step}, so the draws differ from an "
                              "uninterrupted run", stacklevel=2)
                gen.manual_seed(derive_seed(config.seed, STREAM_TIME if name == "time" else STREAM_NOISE,
                                            start_step))
        rows = list(ckpt.get("log") or [])
        seconds_before = float(ckpt.get("seconds", 0.0))
        eval_seconds = float(ckpt.get("eval_seconds", 0.0))
        acc = ckpt.get("accum") or {}
        if acc:
            accum = acc["sums"].to(device=device, dtype=torch.float64).clone()
            accum_count = int(acc["count"])
    elif resume and rank == 0:
        stale = out_dir / "log.csv"
        if stale.exists():  # logs without a checkpoint: from a run killed before its first checkpoint
            warnings.warn(f"{os.fspath(out_dir)!r} holds logs but no checkpoint; starting afresh", stacklevel=2)

    net: nn.Module = raw
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- data
    data_on_device = device.type == "cuda" and images.numel() * images.element_size() < 2 ** 31
    train_images = images.to(device) if data_on_device else images
    b_local = B // world
    lo, hi = rank * b_local, (rank + 1) * b_local
    per_epoch = n_train // B
    perm_cache: dict = {}

    def batch_indices(step: int) -> torch.Tensor:
        epoch, j = divmod(step, per_epoch)
        if epoch not in perm_cache:
            perm_cache.clear()
            perm_cache[epoch] = torch.randperm(n_train, generator=make_generator(
                derive_seed(config.seed, STREAM_DATA, epoch)))
        return perm_cache[epoch][j * B + lo: j * B + hi]

    # ---- held-out set
    eval_set = None
    if held is not None and config.eval_size > 0:
        g = make_generator(derive_seed(config.seed, STREAM_EVAL))
        m = min(config.eval_size, held.shape[0])
        idx = torch.randperm(held.shape[0], generator=g)[:m].sort().values
        e_t = torch.randint(1, config.T + 1, (m,), generator=g)
        e_noise = torch.randn((m, *held.shape[1:]), generator=g, dtype=torch.float32)
        x0 = held[idx].to(torch.float32)
        e_x = _q_sample(alpha_bar.cpu(), x0, e_t, e_noise)
        eval_set = [e_x.to(device), e_t.to(device), e_noise.to(device), None]
        if teacher is not None and rank == 0:
            with torch.no_grad(), _autocast(device, config.autocast):
                eval_set[3] = torch.cat([_forward(teacher, xb, tb).float() for xb, tb in
                                         zip(eval_set[0].split(B), eval_set[1].split(B))])

    def evaluate(m: nn.Module) -> tuple[float, Optional[float]]:
        x_e, t_e, n_e, teach_e = eval_set
        was = m.training
        m.eval()
        sq, sq_t = 0.0, 0.0
        with torch.no_grad(), _autocast(device, config.autocast):
            for k, (xb, tb) in enumerate(zip(x_e.split(B), t_e.split(B))):
                pred = _forward(m, xb, tb).float()
                sq += float(((pred - n_e.split(B)[k]) ** 2).sum(dtype=torch.float64))
                if teach_e is not None:
                    sq_t += float(((pred - teach_e.split(B)[k]) ** 2).sum(dtype=torch.float64))
        m.train(was)
        count = n_e.numel()
        return sq / count, (sq_t / count if teach_e is not None else None)

    meta = {"model_class": _model_class(raw), "model_config": model_config,
            "train_config": config.to_dict(), "teacher": teacher_desc, "distilled": distilled, "world_size": world}

    def reduced(acc: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return acc
        import torch.distributed as dist

        out = acc.clone()
        dist.all_reduce(out)
        return out / world

    def save(step: int, acc: torch.Tensor, count: int, seconds: float) -> None:
        save_checkpoint(ckpt_path, raw, ema, optimizer, step, generators, config, model_config=model_config, extra={
            "log": rows, "seconds": seconds, "eval_seconds": eval_seconds,
            "accum": {"sums": acc.detach().cpu(), "count": count},
            "distilled": distilled, "teacher": teacher_desc,
            "data": {"shape": [int(s) for s in images.shape],
                     "checksum": float(images.sum(dtype=torch.float64))},
            "finished": step >= config.steps,
        })

    base_summary = dict(out_dir=os.fspath(out_dir), checkpoint=os.fspath(ckpt_path), steps=config.steps,
                        start_step=start_step, distilled=distilled, teacher=teacher_desc, world_size=world,
                        num_parameters=sum(p.numel() for p in raw.parameters()), model_class=_model_class(raw),
                        model_config=model_config)
    if start_step >= config.steps:  # finished already: reuse
        return _summary_from(rows, seconds=seconds_before, eval_seconds=eval_seconds, seconds_this_run=0.0,
                             skipped=True, ranks_in_sync=None, **base_summary)

    # ---- loop
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start_step, disable=not config.progress or rank != 0,
               desc=f"train {out_dir.name} ({_model_class(raw)})", dynamic_ncols=True)
    ema_params = [p for p in ema.parameters()]
    raw_params = [p for p in raw.parameters()]
    ema_buffers, raw_buffers = list(ema.buffers()), list(raw.buffers())
    clip = config.grad_clip if config.grad_clip is not None else float("inf")
    eval_every = config.eval_every
    ckpt_every = config.checkpoint_every
    net.train()
    t_start = time.perf_counter()
    step = start_step
    stop = _StopSignals()
    try:
        stop.__enter__()
        while step < config.steps:
            idx = batch_indices(step)
            x0 = train_images[idx.to(train_images.device)].to(device, non_blocking=True)
            t_all = torch.randint(1, config.T + 1, (B,), generator=gen_t, device=gen_device)
            noise_all = torch.randn((B, *images.shape[1:]), generator=gen_noise, device=gen_device,
                                    dtype=torch.float32)
            t = t_all[lo:hi].to(device)
            noise = noise_all[lo:hi].to(device)
            x_t = _q_sample(alpha_bar, x0.to(torch.float32), t, noise)
            with _autocast(device, config.autocast):
                if nested:  # every width on the same batch; the smaller ones regress the larger (nested.py)
                    outputs = net(x_t, t, width="all")
                    pred = outputs[-1]
                else:
                    pred = _forward(net, x_t, t)
                    target = noise
                    if teacher is not None:
                        with torch.no_grad():
                            target = _forward(teacher, x_t, t).float()
                        if config.distill_mix < 1:
                            target = config.distill_mix * target + (1 - config.distill_mix) * noise
            pred = pred.float()
            if pred.shape != noise.shape:
                raise ValueError(f"the model returned shape {tuple(pred.shape)} for inputs of shape "
                                 f"{tuple(x_t.shape)}; an eps-predictor must return the input's shape")
            if nested:
                loss, _ = nested_loss(outputs, noise, config.nested_target, config.distill_mix, config.rung_weight)
            else:
                loss = F.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            decay = config.ema_decay
            if config.ema_warmup:
                decay = min(decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, raw_params, 1.0 - decay)
                for eb, rb in zip(ema_buffers, raw_buffers):
                    eb.copy_(rb)
            eps_loss = loss.detach() if teacher is None and not nested else F.mse_loss(pred.detach(), noise)
            accum += torch.stack([loss.detach(), eps_loss, grad_norm.detach()]).to(torch.float64)
            accum_count += 1
            step += 1
            bar.update(1)

            final = step == config.steps
            do_eval = eval_set is not None and (final or (eval_every is not None and step % eval_every == 0))
            if final or step % config.log_every == 0 or do_eval:
                means = (reduced(accum) / max(accum_count, 1)).tolist()
                if not all(math.isfinite(v) for v in means):
                    raise FloatingPointError(f"training diverged at step {step} (mean loss {means[0]}); lower "
                                             f"TrainConfig.lr (now {config.lr}) or set grad_clip")
                row = {"step": step, "loss": means[0], "eps_loss": means[1], "grad_norm": means[2], "lr": lr,
                       "heldout_loss": None, "heldout_loss_raw": None, "heldout_distill": None}
                if do_eval and rank == 0:
                    e0 = time.perf_counter()
                    row["heldout_loss"], row["heldout_distill"] = evaluate(ema)
                    row["heldout_loss_raw"], _ = evaluate(raw)
                    if nested:
                        row["heldout_levels"] = [evaluate(level)[0] for level in ema.levels()]
                    eval_seconds += time.perf_counter() - e0
                row["seconds"] = seconds_before + time.perf_counter() - t_start
                rows.append(row)
                accum.zero_()
                accum_count = 0
                if rank == 0:
                    _write_logs(out_dir, rows, meta)
                    bar.set_postfix(loss=f"{means[0]:.4g}", **({} if row["heldout_loss"] is None else
                                                               {"heldout": f"{row['heldout_loss']:.4g}"}))
            if final or (ckpt_every is not None and step % ckpt_every == 0):
                acc_now = reduced(accum)
                if rank == 0:
                    save(step, acc_now, accum_count, seconds_before + time.perf_counter() - t_start)
            if callback is not None:
                callback(step)
            if step < config.steps and stop.requested(world, device):  # save where we are, then stop
                acc_now = reduced(accum)
                if rank == 0:
                    save(step, acc_now, accum_count, seconds_before + time.perf_counter() - t_start)
                raise TrainingInterrupted(stop.signum, step, config.steps, ckpt_path)
    finally:
        stop.restore()
        bar.close()
    seconds_run = time.perf_counter() - t_start

    in_sync = None
    if world > 1:
        import torch.distributed as dist

        vec = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in raw.parameters()])
        sig = torch.stack([vec.sum(), (vec * vec).sum(), vec.abs().max()])
        gathered = [torch.empty_like(sig) for _ in range(world)]
        dist.all_gather(gathered, sig)
        in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
        dist.barrier()  # the final checkpoint is on disk for every rank
        if not in_sync:
            warnings.warn(f"DDP ranks ended with different weights: {[g.tolist() for g in gathered]}",
                          stacklevel=2)
    summary = _summary_from(rows, seconds=seconds_before + seconds_run, eval_seconds=eval_seconds,
                            seconds_this_run=seconds_run, skipped=False, ranks_in_sync=in_sync, **base_summary)
    if rank == 0:
        atomic_write_json(out_dir / "summary.json", _plain(summary), indent=1)
    if stop.signum is not None:  # the signal came during the last step: the run is complete, but stop here
        raise TrainingInterrupted(stop.signum, step, config.steps, ckpt_path)
    return summary


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0): linear warm-up over ``warmup`` steps, constant,
    then a linear decay over the last ``decay`` steps (factor ``(steps - step) / (decay + 1)``: each one lower,
    none 0)."""
    lr = config.lr
    if config.warmup:
        lr *= min(1.0, (step + 1) / config.warmup)
    if config.decay:
        lr *= min(1.0, (config.steps - step) / (config.decay + 1))
    return lr


def _q_sample(alpha_bar: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``NoiseSchedule.q_sample`` with the float64 ``alpha_bar`` already on the device (same arithmetic)."""
    ab = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# ------------------------------------------------------------------------------------------------ ladders
@torch.no_grad()
def level_differences(models: Sequence, data, schedule: Optional[NoiseSchedule] = None,
                      timesteps: Optional[Sequence[int]] = None, n: int = 256, seed: int = 0, *,
                      batch_size: int = 256, device=None, model_factory: Optional[Callable] = None) -> dict:
    """``||f^l - f^{l-1}||`` of a ladder (cheapest first), per level and timestep, on noised data.

    For each ``t`` in ``timesteps`` (default: 5 spread over ``1..T``), ``n`` images of ``data`` (a random subset
    drawn from ``seed``) are noised to ``x_t`` with noise from ``derive_seed(seed, STREAM_DIFF, t)`` (the same for
    every model), and every model's eps-prediction is taken. ``models`` may hold modules or checkpoint paths
    (loaded with their EMA weights).

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
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    seed = check_seed(seed)
    models = [load_level(m, device, model_factory) if isinstance(m, (str, os.PathLike)) else m for m in models]
    if not models:
        raise ValueError("models must hold at least one model")
    images = _as_images(data, "data")
    if device is None:
        param = next(iter(models[-1].parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if n < images.shape[0]:
        pick = torch.randperm(images.shape[0], generator=make_generator(derive_seed(seed, STREAM_DIFF)))[:n]
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
            g = make_generator(derive_seed(seed, STREAM_DIFF, t))
            noise = torch.randn(tuple(x0.shape), generator=g, dtype=torch.float32).to(device)
            tt = torch.full((m,), t, dtype=torch.long, device=device)
            x_t = _q_sample(alpha_bar, x0, tt, noise)
            eps = [torch.cat([_forward(mod, xb, tb).float() for xb, tb in
                              zip(x_t.split(batch_size), tt.split(batch_size))]) for mod in models]
            for l in range(k):
                prev = eps[l - 1] if l else torch.zeros_like(eps[l])
                rms[l][j] = float((eps[l] - prev).double().pow(2).mean().sqrt())
                to_top[l][j] = float((eps[l] - eps[-1]).double().pow(2).mean().sqrt())
                mse[l][j] = float((eps[l] - noise).double().pow(2).mean())
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
            ``data`` is held out, drawn from ``config.seed`` like ``data.split_dataset``).
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
    images = _as_images(data, "data")
    held = _as_images(heldout, "heldout", allow_none=True)
    if held is None:
        images, held = _split(images, holdout, config.seed)
    built = []
    for m in models:
        if isinstance(m, str):
            from .unet import build_unet

            m = build_unet(m, in_channels=in_channels or int(images.shape[1]),
                           image_size=image_size or (int(images.shape[-2]), int(images.shape[-1])),
                           seed=config.seed)
        elif not isinstance(m, nn.Module):
            raise ValueError(f"models must be modules or preset names; got {type(m).__name__}")
        built.append(m)
    out_dir = Path(out_dir)
    k = len(built)
    order = list(reversed(range(k))) if distill else list(range(k))
    summaries: list = [None] * k
    for i in order:
        teacher = None
        if distill and i < k - 1:
            j = i + 1 if distill_target == "next" else k - 1
            teacher = out_dir / f"level_{j}" / CHECKPOINT_NAME
        factory = model_factory
        if teacher is not None and factory is None and not isinstance(built[j], _unet_class()):
            factory = type(built[j]) if hasattr(type(built[j]), "from_config") else None
        # no ladder teacher (largest level, or distill=False): config.distill_from, if any, is the teacher
        summary = train_level(built[i], images, held, config, out_dir / f"level_{i}", teacher=teacher,
                              model_factory=factory)
        summary["level"] = i
        summaries[i] = summary
    rank = _rank()
    if report and held is not None:
        def factory_for(i):
            if model_factory is not None or isinstance(built[i], _unet_class()):
                return model_factory
            return type(built[i]) if hasattr(type(built[i]), "from_config") else None

        emas = [load_level(out_dir / f"level_{i}" / CHECKPOINT_NAME, model_factory=factory_for(i))
                for i in range(k)]
        diffs = level_differences(emas, held, NoiseSchedule.named(config.schedule, config.T), report_timesteps,
                                  report_n, config.seed)
        for i, s in enumerate(summaries):
            s["rms_to_previous"] = diffs["rms_mean"][i]
            s["rms_to_top"] = diffs["rms_to_top_mean"][i]
        if rank == 0:
            body = {"distill": distill, "distill_target": distill_target if distill else None,
                    "train_config": config.to_dict(), "levels": summaries, "differences": diffs}
            atomic_write_json(out_dir / "ladder.json", _plain(body), indent=1)
    return summaries


def _unet_class():
    try:
        from .unet import SeparableUNet
    except ImportError:  # pragma: no cover
        return ()
    return SeparableUNet


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ------------------------------------------------------------------------------------------------ command line
def _parser(prog: str = "python -m multilevel_sde.diffusion.train") -> argparse.ArgumentParser:
    from ..cli import HelpFormatter, Parser  # shows each option's default; one-line errors

    d = TrainConfig()
    p = Parser(
        prog=prog, formatter_class=HelpFormatter,
        description="Train one SeparableUNet level (or a ladder of them, or one NestedUNet whose widths are the "
                    "levels) on the eps-prediction loss, with an EMA, resumable checkpoints and held-out losses. "
                    "Runs under torchrun for several processes (DistributedDataParallel): "
                    "torchrun --nproc_per_node=2 -m multilevel_sde.diffusion.train ...")
    p.add_argument("--preset", action="append", default=None,
                   help="UNet preset(s) (e.g. cpu-s); several (repeated or comma-separated) train a ladder")
    p.add_argument("--family", default=None, help="train the whole ladder of a preset family ('cpu', 'paper')")
    p.add_argument("--data", default="default",
                   help="data spec: default (the built-in digits), celeba:PATH, folder:PATH or a bare PATH")
    p.add_argument("--image-size", type=int, default=16, help="image height and width the data are resized to")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: the data's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction (< 1) or count (>= 1)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a checkpoint)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="total optimiser steps (a resumed run continues up to this number)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size (split over the processes under torchrun)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (after the warm-up)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="decay of the EMA of the weights, in [0, 1) (the EMA weights are the ones sampled with)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear learning-rate warm-up (0: none)")
    p.add_argument("--decay", type=int, default=d.decay,
                   help="lower the learning rate linearly towards 0 over the run's last DECAY steps (0: constant)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: no clipping)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam's L2 weight decay")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the initial weights, the held-out split and every stream of the run (batch order, "
                        "t, noise)")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="a log row every this many steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="held-out losses every this many steps (0: only at the end)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out images evaluated (0: no held-out loss)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="a checkpoint every this many steps (0: only at the end)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cpu; cuda:LOCAL_RANK under torchrun when CUDA is available)")
    p.add_argument("--autocast", choices=["bf16"], default=None,
                   help="bf16: bfloat16 autocast for the forward passes (default: none, float32)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (first process only)")
    p.add_argument("--channels-last", action="store_true",
                   help="store the weights and run the UNet(s) in the channels_last memory format")
    p.add_argument("--distill", action="store_true", help="ladder: distil each level from a larger one")
    p.add_argument("--distill-target", choices=["next", "top"], default="next",
                   help="with --distill: each level's teacher is the next larger level or the top one")
    p.add_argument("--distill-from", default=None, help="one level: distil from this checkpoint")
    p.add_argument("--distill-mix", type=float, default=d.distill_mix,
                   help="distillation target: MIX * teacher's eps + (1 - MIX) * true noise, MIX in (0, 1]")
    p.add_argument("--init-from", default=None,
                   help="one level: start from evenly spaced channels and the first blocks of this (larger) "
                        "checkpoint's EMA weights (weight selection) instead of a random initialisation")
    p.add_argument("--nested", default=None, metavar="PRESET",
                   help="train one NestedUNet whose widths are the ladder's levels (e.g. nested-cpu; see "
                        "multilevel_sde.diffusion.nested) instead of separate presets")
    p.add_argument("--widths", default=None, help="with --nested: the base widths, e.g. 4,8,12,16,24")
    p.add_argument("--nested-target", choices=["top", "next"], default=d.nested_target,
                   help="with --nested: what the smaller widths regress (default: %(default)s)")
    p.add_argument("--rung-weight", type=float, default=d.rung_weight,
                   help="with --nested: weight of the smaller widths' losses (default: %(default)s)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default=d.schedule, help="noise schedule")
    p.add_argument("--T", type=int, default=d.T, help="number of steps of the noise schedule")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, quiet: bool = False) -> int:
    """Command-line entry (``python -m multilevel_sde.diffusion.train --help``); works under ``torchrun``.
    ``prog``: the command's name in usage and error messages (``mlsde train`` from ``mlsde``); ``quiet``: do not
    print the summary (it is in the output folder's ``summary.json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m multilevel_sde.diffusion.train"
    args = _parser(prog).parse_args(argv)
    try:
        return _main(args, prog, quiet)
    except TrainingInterrupted as stop:
        print(f"{prog}: {stop.signame} at step {stop.step} of {stop.steps}: saved {os.fspath(stop.checkpoint)!r}; "
              f"resume with: {prog} {' '.join(map(_quote, argv))}", file=sys.stderr)
        return stop.exit_code
    except ValueError as err:  # name the flags, not the config fields
        text = _flag_names(str(err))
        if text == str(err):
            raise
        raise type(err)(text) if type(err) in (ValueError, DamagedFileError) else ValueError(text) from err


class UsageError(SystemExit):
    """A command-line mistake: its message is printed as one line and the process exits with status 2
    (``str(error)`` is the message)."""

    def __init__(self, prog: str, message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _flag_names(text: str) -> str:
    """``TrainConfig.batch_size`` in a message becomes ``--batch-size`` (the flag the user typed)."""
    import re

    return re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def _main(args: argparse.Namespace, prog: str, quiet: bool) -> int:
    from .data import load_dataset
    from .unet import build_unet, ladder_presets

    presets = [p for entry in (args.preset or []) for p in entry.split(",") if p]
    if args.family:
        presets += ladder_presets(args.family)
    if not presets and not args.nested:
        raise UsageError(prog, "give --preset NAME (or several, or --family cpu, or --nested nested-cpu)")
    if presets and args.nested:
        raise UsageError(prog, "give --preset/--family or --nested, not both")
    if (args.distill_from or args.init_from) and len(presets) > 1:
        raise UsageError(prog, "--distill-from and --init-from train one level; for a ladder use --distill")
    holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, warmup=args.warmup,
        decay=args.decay,
        grad_clip=args.grad_clip if args.grad_clip and args.grad_clip > 0 else None,
        weight_decay=args.weight_decay, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every or None, eval_size=args.eval_size, checkpoint_every=args.checkpoint_every or None,
        device=args.device, autocast=args.autocast, progress=args.progress, distill_from=args.distill_from,
        distill_mix=args.distill_mix, schedule=args.schedule, T=args.T, nested_target=args.nested_target,
        rung_weight=args.rung_weight)
    rank = _launch_rank()
    lock = FolderLock(args.out, prog)
    if rank == 0:  # before any work: an unwritable --out, or one another run writes into, fails now
        check_writable_folder(args.out, "--out")
        lock.acquire()
    try:
        return _run(args, presets, holdout, config, quiet, load_dataset, build_unet)
    finally:
        lock.release()


def _run(args, presets, holdout, config, quiet, load_dataset, build_unet) -> int:
    dataset = load_dataset(args.data, args.image_size, channels=args.channels, limit=args.limit)
    images = _as_images(dataset, f"data {args.data!r}")
    train, held = _split(images, holdout, args.seed, f"data {args.data!r}")
    import torch.distributed as dist

    initialised_before = dist.is_available() and dist.is_initialized()
    try:
        if args.nested:
            from .nested import build_nested

            overrides = {"widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}
            model = build_nested(args.nested, in_channels=int(images.shape[1]), image_size=args.image_size,
                                 seed=args.seed, **overrides)
            result = train_level(model, train, held, config, args.out)
        elif len(presets) == 1:
            model = build_unet(presets[0], in_channels=int(images.shape[1]), image_size=args.image_size,
                               seed=args.seed, channels_last=args.channels_last)
            if args.init_from:  # a resumed run continues from its checkpoint's weights instead
                from .weight_selection import select_weights

                select_weights(model, load_level(args.init_from))
            result = train_level(model, train, held, config, args.out)
            result["init_from"] = args.init_from
        else:
            result = train_ladder(presets, train, config, args.out, distill=args.distill, heldout=held,
                                  distill_target=args.distill_target, image_size=args.image_size)
        if _rank() == 0 and not quiet:
            print(json.dumps(_plain(result), indent=1))
    finally:
        if not initialised_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except (ValueError, TypeError, OSError, FolderLockedError) as _err:  # one line, status 2, as mlsde's
        print(f"python -m multilevel_sde.diffusion.train: error: {_err}", file=sys.stderr)
        sys.exit(2)
