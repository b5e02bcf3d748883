"""Where a training run executes: its device, its processes under ``torchrun`` (DistributedDataParallel) and the
signals that stop it.

**Several processes** (``torchrun --nproc_per_node=K -m multilevel_sde.diffusion.train ...``): when ``WORLD_SIZE``
> 1 (or a process group is already initialised), training initialises the default process group (``gloo`` on the
CPU, ``nccl`` on CUDA, ``env://``) if needed and wraps the model in ``DistributedDataParallel``; rank ``r`` takes
the slice ``[r B/K, (r+1) B/K)`` of each global batch (see ``inputs.Batches``). On CUDA each rank uses
``cuda:LOCAL_RANK``. The process group is left initialised for further calls (the command line destroys it).

**Signals**: SIGINT and SIGTERM (main thread) let the step in progress finish; the loop then saves a checkpoint
and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import AUTOCAST

__all__ = ["TrainingInterrupted", "StopSignals", "distributed_context", "resolve_device", "autocast", "rank",
           "launch_rank", "mean_over_ranks", "ranks_in_sync"]


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (before the group exists), else 0."""
    r = rank()
    return r if r else int(os.environ.get("RANK", "0") or 0)


def distributed_context(config_device) -> tuple[int, int]:
    """``(rank, world size)``; initialises the default process group under torchrun (``WORLD_SIZE`` > 1)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    cuda = (config_device is not None and str(config_device).startswith("cuda")) or (
        config_device is None and torch.cuda.is_available())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def resolve_device(config_device, model: nn.Module, world: int) -> torch.device:
    """The training device: ``TrainConfig.device``, else where the model is (CUDA under torchrun when available);
    ``cuda`` without an index is ``cuda:LOCAL_RANK`` under torchrun, else the current CUDA device."""
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


def autocast(device: torch.device, name: Optional[str]):
    """The autocast context of ``TrainConfig.autocast`` (none: a null context)."""
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[name])


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``values`` over the ranks (``values`` itself with one process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    out = values.clone()
    dist.all_reduce(out)
    return out / world


def ranks_in_sync(model: nn.Module, world: int) -> tuple[Optional[bool], list]:
    """Whether every rank ends with the same weights (None with one process), and each rank's signature (sum, sum
    of squares, max |w|); waits until every rank is there (the final checkpoint is on disk for all)."""
    if world == 1:
        return None, []
    import torch.distributed as dist

    vec = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])
    sig = torch.stack([vec.sum(), (vec * vec).sum(), vec.abs().max()])
    gathered = [torch.empty_like(sig) for _ in range(world)]
    dist.all_gather(gathered, sig)
    dist.barrier()
    return all(torch.equal(g, gathered[0]) for g in gathered), [g.tolist() for g in gathered]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint: ``signum``, ``step``, ``steps``,
    ``checkpoint`` (the path); run the same training again to resume it."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Union[str, os.PathLike]):
        self.signum, self.step, self.steps, self.checkpoint = int(signum), int(step), int(steps), Path(checkpoint)
        self.signame = signal.Signals(self.signum).name
        super().__init__(f"training interrupted by {self.signame} at step {step} of {steps}; checkpoint saved to "
                         f"{os.fspath(checkpoint)!r}: run the same training again to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class StopSignals:
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

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self.restore()

    def requested(self, world: int, device) -> bool:
        """Whether a signal came (on any rank: every rank stops at the same step)."""
        if world == 1:
            return self.signum is not None
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())
