"""The settings of one level's training (:class:`TrainConfig`) and the plain values they, the models' configs and
the logs are written as (JSON, and checkpoints that ``torch.load(weights_only=True)`` reads).

Every field carries its command-line help (``metadata["help"]``) and, where the command line differs from the
field, its argparse settings (``metadata["cli"]``); ``mlsde train`` builds its options from them
(``cli.add_dataclass_options``), so a new field is a new option with its help and default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["TrainConfig", "AUTOCAST", "RESUME_KEYS", "plain", "model_config", "describe_teacher", "unwrap_ddp",
           "is_int"]

AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
#: TrainConfig fields that fix the random streams and the objective: a resumed run must keep them.
RESUME_KEYS = ("seed", "batch_size", "schedule", "T", "distill_mix", "nested_target", "rung_weight")


def _option(value, help: str, **cli):
    """A dataclass field (default ``value``) with its command-line help and argparse settings (``cli``: e.g. the
    option's own ``default``; ``off``: the option's value that means None, e.g. ``--grad-clip 0``)."""
    return dataclasses.field(default=value, metadata={"help": help, "cli": cli})


@dataclass
class TrainConfig:
    """Hyper-parameters of one level's training (validated on creation and again by ``train_level``); each
    field's help is its ``metadata["help"]`` (also ``mlsde train --help``).

    The learning rate of step ``n`` (from 0) is ``lr * min(1, (n + 1) / warmup) * min(1, (steps - n) / (decay +
    1))`` (linear warm-up, constant, linear decay over the last ``decay`` steps, each one lower, none 0: warmup-
    stable-decay; a run resumed to more ``steps`` moves its decay window to its new end). The EMA decay after
    ``n`` updates is ``min(ema_decay, (1 + n) / (10 + n))`` with ``ema_warmup``, else ``ema_decay``.
    ``distill_from`` may also be a model (from Python); ``train_level``'s ``teacher`` argument overrides it.
    ``nested_target`` and ``rung_weight`` apply to a ``NestedUNet`` (every width trained at each step, see
    ``nested.nested_loss``); ``distill_mix`` mixes the true noise into its smaller widths' target as for
    distillation.
    """

    steps: int = _option(2000, "total optimiser steps (a resumed run continues up to this number)")
    batch_size: int = _option(64, "global batch size (split over the processes under torchrun)")
    lr: float = _option(2e-4, "Adam's learning rate (after the warm-up)")
    ema_decay: float = _option(0.999, "decay of the EMA of the weights, in [0, 1) (the EMA weights are the ones "
                                      "sampled with; 0.999 for short runs, 0.9999 for long ones)")
    ema_warmup: bool = _option(True, "EMA decay min(EMA_DECAY, (1 + n) / (10 + n)) after n updates, so that short "
                                     "runs are not dominated by the initial weights")
    warmup: int = _option(100, "steps of linear learning-rate warm-up (0: none)")
    decay: int = _option(0, "lower the learning rate linearly towards 0 over the run's last DECAY steps (0: "
                            "constant after the warm-up)")
    grad_clip: Optional[float] = _option(1.0, "max gradient norm (0: no clipping)", type=float, off=0)
    weight_decay: float = _option(0.0, "Adam's L2 weight decay")
    seed: int = _option(0, "seeds the initial weights, the held-out split and every stream of the run (batch "
                           "order, t, noise, held-out set)")
    log_every: int = _option(50, "a log row every this many steps (and at the end)")
    eval_every: Optional[int] = _option(500, "held-out losses every this many steps, rounded to log rows (0: only "
                                             "at the end)", type=int, off=0)
    eval_size: int = _option(256, "held-out images evaluated (0: no held-out loss)")
    checkpoint_every: Optional[int] = _option(1000, "a checkpoint every this many steps (0: only at the end)",
                                              type=int, off=0)
    device: Optional[str] = _option(None, "cpu, cuda, cuda:1, ... (default: where the model is, the cpu from the "
                                          "command line; cuda:LOCAL_RANK under torchrun when CUDA is available)")
    autocast: Optional[str] = _option(None, "bf16: bfloat16 autocast for the forward passes (default: none, "
                                            "float32)", choices=["bf16"])
    progress: bool = _option(False, "show a progress bar (first process only)", default=True)
    distill_from: Any = _option(None, "one level: distil from this checkpoint (the EMA weights of its network)")
    distill_mix: float = _option(1.0, "distillation target: MIX * teacher's eps + (1 - MIX) * true noise, MIX in "
                                      "(0, 1]")
    schedule: str = _option("cosine", "noise schedule", choices=["cosine", "linear"])
    T: int = _option(1000, "number of steps of the noise schedule")
    nested_target: str = _option("top", "with --nested: what the smaller widths regress, the top width's eps or "
                                        "the next larger width's", choices=["top", "next"])
    rung_weight: float = _option(1.0, "with --nested: weight of the smaller widths' losses beside the top width's")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "log_every", "T"):
            self._check(name, is_int, "a positive integer", low=1)
        for name in ("warmup", "decay", "eval_size"):
            self._check(name, is_int, "a non-negative integer", low=0)
        for name in ("eval_every", "checkpoint_every"):
            self._check(name, is_int, "a positive integer or None", low=1, none=True)
        if self.decay > self.steps:
            raise _bad("decay", self.decay, f"at most steps ({self.steps})")
        if not _is_num(self.lr) or self.lr <= 0:
            raise _bad("lr", self.lr, "a positive finite number")
        self._check("weight_decay", _is_num, "a non-negative number", low=0)
        if not _is_num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise _bad("ema_decay", self.ema_decay, "a number in [0, 1)")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip <= 0):
            raise _bad("grad_clip", self.grad_clip, "a positive number or None")
        if not _is_num(self.distill_mix) or not 0 < self.distill_mix <= 1:
            raise _bad("distill_mix", self.distill_mix, "a number in (0, 1]")
        self._check("seed", is_int, "a non-negative integer", low=0)
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise _bad("autocast", self.autocast, f"None or one of {sorted(AUTOCAST)}")
        if self.nested_target not in ("top", "next"):
            raise _bad("nested_target", self.nested_target, "'top' or 'next'")
        self._check("rung_weight", _is_num, "a non-negative number", low=0)
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

    def _check(self, name: str, kind, what: str, low, none: bool = False) -> None:
        value = getattr(self, name)
        if none and value is None:
            return
        if not kind(value) or value < low:
            raise _bad(name, value, what)

    def to_dict(self) -> dict:
        """Plain JSON-able values (a teacher model is described by its class and config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["device"] = None if self.device is None else str(self.device)
        out["distill_from"] = describe_teacher(self.distill_from)
        return plain(out)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _bad(name: str, value, what: str) -> ValueError:
    return ValueError(f"TrainConfig.{name} must be {what}, got {value!r}")


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ plain values
def plain(value):
    """Python scalars, strings, lists and dicts only (what ``weights_only`` loads and JSON writes)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
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


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (any other module as it is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_config(model: nn.Module) -> Optional[dict]:
    """The model's ``config`` (an attribute or a method) as plain values; None when it has none."""
    cfg = getattr(model, "config", None)
    if callable(cfg):
        cfg = cfg()
    return plain(dict(cfg)) if isinstance(cfg, dict) else None


def describe_teacher(teacher) -> Optional[str]:
    """How logs and checkpoints record a teacher: its path, or its class and config."""
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        return str(teacher)
    return f"<{type(teacher).__name__} {model_config(teacher)}>"
