"""What ``mlsde train`` runs once its flags are parsed (``multilevel_sde.cli`` holds the parser): the data, the
network(s) and the training."""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from .. import data
from ..nested import build_nested
from ..unet import build_unet
from ..weight_selection import select_weights
from .checkpoint import load_level
from .config import TrainConfig, plain
from .inputs import as_images, split_images
from .ladder import train_ladder
from .loop import train_level
from .processes import rank

__all__ = ["train_command"]


def train_command(args: argparse.Namespace, presets: list, config: TrainConfig, quiet: bool = False) -> int:
    """Load and split ``--data``, build the network(s) and train them: one level (``presets`` holds one name), a
    ladder (several) or a nested network (``--nested``); prints the summary (first process, unless ``quiet``).
    ``args``: ``mlsde train``'s parsed flags (``cli.py``), ``config`` the ``TrainConfig`` of them. Destroys the
    process group if it initialised one (under torchrun)."""
    images = as_images(data.load_dataset(args.data, args.image_size, channels=args.channels, limit=args.limit),
                       f"data {args.data!r}")
    holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    train, held = split_images(images, holdout, args.seed, f"data {args.data!r}")
    initialised_before = dist.is_available() and dist.is_initialized()
    try:
        if args.nested:
            overrides = {"widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}
            model = build_nested(args.nested, in_channels=int(images.shape[1]), image_size=args.image_size,
                                 seed=args.seed, **overrides)
            result = train_level(model, train, held, config, args.out)
        elif len(presets) == 1:
            model = build_unet(presets[0], in_channels=int(images.shape[1]), image_size=args.image_size,
                               seed=args.seed, channels_last=args.channels_last)
            if args.init_from:  # a resumed run continues from its checkpoint's weights instead
                select_weights(model, load_level(args.init_from))
            result = train_level(model, train, held, config, args.out)
            result["init_from"] = args.init_from
        else:
            result = train_ladder(presets, train, config, args.out, distill=args.distill, heldout=held,
                                  distill_target=args.distill_target, image_size=args.image_size)
        if rank() == 0 and not quiet:
            print(json.dumps(plain(result), indent=1))
    finally:
        if not initialised_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
