"""Checkpoints of training, and the trained networks they hold.

A checkpoint (``out_dir/checkpoint.pt``) holds only tensors and plain containers -- weights, EMA weights,
optimiser state, step, generator states (uint8 tensors), the model's class name and config, the ``TrainConfig``,
the log so far, the data's shape -- so ``torch.load(path, weights_only=True)`` reads it; every load here uses
``weights_only=True`` (no arbitrary pickle). It is written atomically (``files.atomic_write``): a crash leaves the
previous checkpoint intact. It carries the sha256 of its tensors, which every load verifies (a damaged file is a
``files.DamagedFileError`` naming it; older checkpoints without one load unverified).

:func:`load_level` rebuilds a checkpoint's network with its EMA weights (what sampling uses); :func:`load_ladder`
a whole ladder (a ``train_ladder`` folder, checkpoint files, a nested checkpoint's widths, a diffusers folder or
a shipped ``.json``/``.safetensors`` ladder).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ...files import DamagedFileError, atomic_write
from ..levels import declared_schedule
from ..nested import NestedUNet
from ..schedule import NoiseSchedule
from .config import TrainConfig, plain, unwrap_ddp
from .config import model_config as network_config  # save_checkpoint has an argument model_config

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_checksum", "check_architecture", "load_level",
           "load_ladder", "checkpoint_schedule", "trained_schedule", "CHECKPOINT_NAME", "FORMAT"]

PathLike = Union[str, os.PathLike]
CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "multilevel_sde.diffusion.train/1"
_CHECKSUM_KEY = "checksum"
# Config keys that do not change the weights' shapes (ignored by the architecture check).
_NON_ARCHITECTURE_KEYS = ("seed", "autocast")


def _shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _network(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper or an ``AveragedModel`` (the EMA)."""
    model = unwrap_ddp(model)
    return model.module if isinstance(model, AveragedModel) else model


def check_architecture(model: nn.Module, checkpoint: dict, path: PathLike = "checkpoint") -> None:
    """``ValueError`` naming both configs unless ``model`` has the class and architecture of the checkpoint.

    Compared: the class name and the config (``model.config``) without the keys that do not change the
    weights' shapes (``seed``, ``autocast``); for a model without a ``config``, the parameter names and shapes.
    """
    model = _network(model)
    saved_cls, cls = checkpoint.get("model_class"), type(model).__name__
    saved_cfg, cfg = checkpoint.get("model_config"), network_config(model)
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


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(path: PathLike, model: nn.Module, ema: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, step: int = 0,
                    generators: Optional[dict] = None, config: Optional[TrainConfig] = None,
                    extra: Optional[dict] = None, model_config: Optional[dict] = None) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns the path.

    ``ema``: the EMA network (or its ``AveragedModel``), saved as a plain state dict beside the raw weights.
    ``generators``: ``{name: torch.Generator}``, saved as uint8 state tensors (and the device type of each).
    ``extra``: further plain values (the log, accumulators, ...). ``model_config``: record this config instead of
    ``model.config`` (a resumed run keeps the one of its first segment, e.g. the initialisation seed). Only tensors
    and plain containers are written, so ``torch.load(path, weights_only=True)`` loads the file.
    """
    model = _network(model)
    generators = generators or {}
    state = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "model_config": plain(model_config) if model_config is not None else network_config(model),
        "param_shapes": _shapes(model.state_dict()),
        "model": model.state_dict(),
        "ema": _network(ema if ema is not None else model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": {name: g.get_state() for name, g in generators.items()},
        "rng_device": {name: g.device.type for name, g in generators.items()},
        "train_config": config.to_dict() if config is not None else None,
        "torch_version": str(torch.__version__),
    }
    for key, value in (extra or {}).items():
        state[key] = value if isinstance(value, torch.Tensor) else _plain_or_tensors(value)
    state[_CHECKSUM_KEY] = {"algorithm": "sha256", "value": checkpoint_checksum(state)}
    return atomic_write(path, lambda fh: torch.save(state, fh))


def _plain_or_tensors(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {str(k): _plain_or_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_or_tensors(v) for v in value]
    return plain(value)


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
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != _CHECKSUM_KEY}, h)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ load
def _damaged(path: Path, detail: str) -> DamagedFileError:
    return DamagedFileError(
        f"checkpoint {os.fspath(path)!r} is damaged or incomplete ({detail}); it cannot be used: restore it from a "
        "copy, or move it away and re-run the training that wrote it (mlsde train resumes from a checkpoint, or "
        "starts afresh in a folder without one)")


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
    recorded = ckpt.get(_CHECKSUM_KEY)
    if recorded is not None:  # checkpoints written before checksums have none to verify
        value = recorded.get("value") if isinstance(recorded, dict) else None
        if value != checkpoint_checksum(ckpt):
            raise _damaged(path, "its contents do not match the sha256 checksum recorded when it was saved")
    if model is not None:
        check_architecture(model, ckpt, path)
        _network(model).load_state_dict(ckpt["ema" if ema else "model"])
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
        from ..unet import SeparableUNet

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

    ``paths``: a ladder folder written by ``train_ladder`` (its ``level_0``, ``level_1``, ... in index
    order), or checkpoint files / folders in ladder order. A checkpoint of a ``NestedUNet`` gives all its widths
    (``NestedLevel`` views, smallest first). ``image_shape`` ``(C, H, W)`` is read from the data shape the
    checkpoints were trained on; ``names`` are ``"level_i (d=base channels)"`` (``"width d"`` for nested levels).
    Every model carries its ``noise_schedule`` (see :func:`load_level`); a ladder whose checkpoints were trained with
    different schedules is refused (``ValueError`` naming the files).
    """
    from ..external import is_diffusers_folder

    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if (len(paths) == 1 and paths[0].is_dir() and not (paths[0] / CHECKPOINT_NAME).exists()
            and not is_diffusers_folder(paths[0])):
        numbered = {int(p.name[6:]): p for p in paths[0].glob("level_*") if p.name[6:].isdigit()}
        if not numbered:
            raise FileNotFoundError(f"{os.fspath(paths[0])!r} holds no checkpoint.pt and no level_<i> folders")
        if sorted(numbered) != list(range(len(numbered))):
            raise ValueError(f"{os.fspath(paths[0])!r} holds level folders {sorted(numbered)}, not "
                             f"0..{len(numbered) - 1}: a ladder is level_0, level_1, ... with none missing")
        paths = [numbered[i] for i in range(len(numbered))]  # other names (a level_2.bak copy) are not levels
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
    from ..external import is_diffusers_folder, load_diffusers_level

    if path.is_dir() and is_diffusers_folder(path):
        model = load_diffusers_level(path, device=device)
        if model.image_shape is None:
            raise ValueError(f"{os.fspath(path)!r}: the diffusers config gives no sample size; its image shape is "
                             "unknown")
        return [model], [path.name], tuple(int(s) for s in model.image_shape)
    if path.suffix in (".json", ".safetensors") and path.is_file():
        from ..pretrained import load_pretrained

        net, record = load_pretrained(path, device=device)
        return net.levels(), [f"width {w}" for w in net.widths], tuple(int(s) for s in record["image_shape"])
    return None
