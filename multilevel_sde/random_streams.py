"""Seeds, generators and the named random streams: every random stream of the library comes from here, never
from global state.

A stream is a child of the run's seed, ``derive_seed(seed, STREAM, ...)`` (counter-based: any child on demand, the
same for the same path). The stream ids below keep the streams of one seed apart; they are part of every recorded
result (a changed id changes the numbers), so they never change and a new stream takes a new id.

==========================  =======  ============================================================================
name                        id       what it draws
==========================  =======  ============================================================================
``STREAM_COINS``            0        a solve's ML-EM coins (``solve_seeds``)
``STREAM_BROWNIAN``         1        a solve's Brownian increments (``solve_seeds``)
``SAMPLE_INITIAL_NOISE``    10       diffusion sampling: the initial noise ``x_T`` (``diffusion.sample``)
``SAMPLE_BROWNIAN_PATH``    11       diffusion sampling: the fine Brownian path every method shares
``SAMPLE_COINS``            12       diffusion sampling: the coins of an ML-EM sampler
``TRAIN_BATCH_ORDER``       20       training: the batch order, ``derive_seed(seed, TRAIN_BATCH_ORDER, epoch)``
``TRAIN_TIMES``             21       training: the timesteps ``t`` of each batch
``TRAIN_NOISE``             22       training: the noise of each batch
``TRAIN_HELDOUT``           23       training: the held-out images, their ``t`` and noise (drawn once)
``LEVEL_DIFFERENCES``       24       ``level_differences``: its image subset and, per ``t``, its noise
``EXPERIMENT_SELECTION``    1000003  an experiment's selection images (``derive_seed(seed, EXPERIMENT_SELECTION)``)
==========================  =======  ============================================================================
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["fresh_seed", "check_seed", "derive_seed", "make_generator", "solve_seeds", "STREAM_COINS",
           "STREAM_BROWNIAN", "SAMPLE_INITIAL_NOISE", "SAMPLE_BROWNIAN_PATH", "SAMPLE_COINS", "TRAIN_BATCH_ORDER",
           "TRAIN_TIMES", "TRAIN_NOISE", "TRAIN_HELDOUT", "LEVEL_DIFFERENCES", "EXPERIMENT_SELECTION"]

# One solve: coins and Brownian increments never share a stream.
STREAM_COINS = 0
STREAM_BROWNIAN = 1
# Diffusion sampling.
SAMPLE_INITIAL_NOISE = 10
SAMPLE_BROWNIAN_PATH = 11
SAMPLE_COINS = 12
# Diffusion training.
TRAIN_BATCH_ORDER = 20
TRAIN_TIMES = 21
TRAIN_NOISE = 22
TRAIN_HELDOUT = 23
LEVEL_DIFFERENCES = 24
# Experiments: the selection set (far from the held-out set's chunk seeds, which are small integers).
EXPERIMENT_SELECTION = 1_000_003


def fresh_seed() -> int:
    """A new 63-bit seed from the operating system's entropy (recorded by callers so runs can be replayed)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_seed(seed, name: str = "seed") -> Optional[int]:
    """``seed`` as an ``int`` (None stays None); a ``ValueError`` naming ``name`` unless it is a non-negative
    integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def derive_seed(seed: int, *path: int) -> int:
    """A child seed of ``seed`` for the stream named by ``path`` (counter-based: any child on demand)."""
    seq = np.random.SeedSequence(int(seed), spawn_key=tuple(int(p) for p in path))
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def solve_seeds(seed: Optional[int]) -> tuple[int, int, int]:
    """``(seed, coin_seed, brownian_seed)`` for one solve; a fresh seed when ``seed`` is None."""
    seed = fresh_seed() if seed is None else seed
    return seed, derive_seed(seed, STREAM_COINS), derive_seed(seed, STREAM_BROWNIAN)
