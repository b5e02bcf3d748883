"""Pretrained ladders shipped inside the package: safetensors weights plus a JSON record of how they were made.

Each ladder ``NAME`` is two files in ``multilevel_sde/diffusion/pretrained/``:

- ``NAME.safetensors`` -- the EMA weights of one :class:`~multilevel_sde.diffusion.nested.NestedUNet` (float32);
- ``NAME.json`` -- its ``model_class`` and ``model_config``, the ``image_shape`` ``(C, H, W)``, the noise
  ``schedule`` and ``T`` it was trained with, the ``data`` it was trained on, the ``command`` that reproduces it,
  its training config, time and held-out losses per width, and the ``sha256`` of the weights file.

:func:`load_pretrained` verifies the hash before loading (a damaged file is an error naming it, never a silently
different model) and returns the network in eval mode with its record::

    net, record = load_pretrained("digits16-nested")
    levels = net.levels()                 # the ladder, cheapest first
    net.noise_schedule                    # its training schedule (record["schedule"], record["T"]): samplers adopt it

:func:`export_pretrained` writes the pair from a training checkpoint (``mlsde demo --train`` does).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union


from .nested import NestedUNet
from .schedule import NoiseSchedule

__all__ = ["PRETRAINED_DIR", "DEFAULT_LADDER", "available", "load_pretrained", "export_pretrained", "sha256_of"]

PRETRAINED_DIR = Path(__file__).with_name("pretrained")
DEFAULT_LADDER = "digits16-nested"
PathLike = Union[str, os.PathLike]


def available() -> list[str]:
    """Names of the ladders shipped with the package."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.json"))


def sha256_of(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(name_or_path: PathLike) -> tuple[Path, Path]:
    """``(weights, record)`` of a shipped name, or of a path to either file of a pair."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".safetensors"):
        stem = path.with_suffix("")
    elif (PRETRAINED_DIR / f"{path}.json").exists():
        stem = PRETRAINED_DIR / str(path)
    else:
        raise ValueError(f"unknown pretrained ladder {os.fspath(name_or_path)!r}; shipped: {available()} "
                         "(or give the path of a .safetensors/.json pair)")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def load_pretrained(name: PathLike = DEFAULT_LADDER, device=None) -> tuple[NestedUNet, dict]:
    """The shipped ladder ``name`` (or a ``.safetensors``/``.json`` pair at a path), checked against its sha256."""
    from safetensors.torch import load_file

    weights, record_path = _files(name)
    for file in (weights, record_path):
        if not file.is_file():
            raise FileNotFoundError(f"pretrained ladder file {os.fspath(file)!r} is missing")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(record_path)!r} is not valid JSON ({err}); reinstall the package or re-run "
                         "`mlsde demo --train`") from err
    actual = sha256_of(weights)
    if actual != record.get("sha256"):
        raise ValueError(f"{os.fspath(weights)!r} does not match its record (sha256 {actual}, recorded "
                         f"{record.get('sha256')}): the file is damaged or not the one described; reinstall the "
                         "package or re-run `mlsde demo --train`")
    if record.get("model_class") != "NestedUNet":
        raise ValueError(f"{os.fspath(record_path)!r} describes a {record.get('model_class')}, not a NestedUNet")
    net = NestedUNet.from_config(record["model_config"])
    net.load_state_dict(load_file(os.fspath(weights)))
    net.eval()
    # how it was trained travels with it, as for load_level: samplers adopt this schedule (declared_schedule)
    net.noise_schedule = NoiseSchedule.named(record["schedule"], int(record["T"]))
    net.checkpoint_path = os.fspath(weights)
    if device is not None:
        net.to(device)
    return net, record


def export_pretrained(checkpoint: PathLike, out: PathLike, *, command: str, data: dict,
                      extra: Optional[dict] = None) -> dict:
    """Write ``out.safetensors`` (the checkpoint's EMA weights) and ``out.json`` (the record); returns the record.

    ``command``: the command line that reproduces the checkpoint; ``data``: what it was trained on.
    """
    from safetensors.torch import save

    from ..files import atomic_write
    from .train import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint) / "checkpoint.pt" if Path(checkpoint).is_dir() else checkpoint)
    if ckpt.get("model_class") != "NestedUNet":
        raise ValueError(f"{os.fspath(checkpoint)!r} holds a {ckpt.get('model_class')}; only NestedUNet ladders "
                         "are shipped")
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = out.with_suffix(".safetensors")
    tensors = {k: v.contiguous() for k, v in ckpt["ema"].items()}
    atomic_write(weights, save(tensors))
    rows = ckpt.get("log") or []
    last = next((r for r in reversed(rows) if r.get("heldout_levels")), {})
    train_config = ckpt.get("train_config") or {}
    record = {
        "name": out.name,
        "model_class": "NestedUNet",
        "model_config": ckpt["model_config"],
        "image_shape": [int(s) for s in ckpt["data"]["shape"][1:]],
        "schedule": train_config.get("schedule", "cosine"),
        "T": int(train_config.get("T", 1000)),
        "data": data,
        "command": command,
        "train_config": train_config,
        "steps": int(ckpt["step"]),
        "train_seconds": float(ckpt.get("seconds", 0.0)),
        "heldout_eps_mse": last.get("heldout_levels"),
        "torch_version": ckpt.get("torch_version"),
        "sha256": sha256_of(weights),
        **(extra or {}),
    }
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=1).encode())
    return record

