"""Training the levels of a diffusion ladder: eps-prediction with Adam and an EMA (the paper's way), distillation
from a larger level, or one ``NestedUNet`` whose widths are the levels; resumable checkpoints, held-out losses,
``torchrun``/DDP.

One level::

    summary = train_level(model, train, heldout, TrainConfig(steps=2000, batch_size=64), "runs/cpu-s")
    model_ema = load_level("runs/cpu-s/checkpoint.pt")          # the EMA weights, what sampling uses

A ladder, each level in ``out_dir/level_{i}/``, finished levels reused::

    summaries = train_ladder(["cpu-xs", "cpu-s", "cpu-m"], dataset, config, "runs/ladder", distill=True)

One job per module:

- ``config``: :class:`TrainConfig` (every field with its command-line help) and the plain values it and the
  logs are written as;
- ``inputs``: the images, the held-out split (``data.split_dataset``), each step's batch and the held-out set, all
  from named random streams (``random_streams``);
- ``loop``: :func:`train_level` -- the objective, one optimiser step, the learning-rate schedule (``LambdaLR``) and
  the EMA (``AveragedModel``), log rows, resumption;
- ``checkpoint``: atomic, checksummed, weights-only checkpoints; :func:`load_level`, :func:`load_ladder`;
- ``records``: the logs and summary, and the checks before writing or resuming;
- ``processes``: the device, ``torchrun``/DDP, and the signals that stop a run (:class:`TrainingInterrupted`);
- ``ladder``: :func:`train_ladder` and :func:`level_differences`.

The command line is ``mlsde train`` (``multilevel_sde.cli``; ``python -m multilevel_sde.diffusion.train`` is the
same command, for ``torchrun --nproc_per_node=K -m multilevel_sde.diffusion.train ...``).
"""

from typing import Optional, Sequence

from ...files import DamagedFileError
from .checkpoint import (CHECKPOINT_NAME, check_architecture, checkpoint_checksum, checkpoint_schedule,
                         load_checkpoint, load_ladder, load_level, save_checkpoint, trained_schedule)
from .config import AUTOCAST, TrainConfig
from .ladder import level_differences, train_ladder
from .loop import learning_rate, train_level
from .processes import TrainingInterrupted

__all__ = ["TrainConfig", "train_level", "train_ladder", "save_checkpoint", "load_checkpoint", "load_level",
           "load_ladder", "level_differences", "check_architecture", "main", "CHECKPOINT_NAME", "AUTOCAST",
           "trained_schedule", "checkpoint_schedule", "checkpoint_checksum", "TrainingInterrupted",
           "DamagedFileError", "learning_rate"]


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, quiet: bool = False) -> int:
    """``mlsde train ARGV`` from Python (``multilevel_sde.cli.train_main``): errors are raised, not printed.
    ``prog``: the command's name in messages; ``quiet``: do not print the summary."""
    from ...cli import train_main

    return train_main(argv, prog=prog, quiet=quiet)
