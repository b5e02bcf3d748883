"""Seeds, generators and the named random streams: every random stream of the library comes from here, never
from global state.

A stream is a child of a seed, ``derive_seed(seed, STREAM, ...)`` (counter-based: any child on demand, the same
for the same path). The stream ids below keep the streams of one seed apart; they are part of every recorded
result (a changed id changes the numbers), so they never change and a new stream takes a new id, distinct from
every other id of its namespace (the seeds it is derived from).

The module-level ids share one namespace (a run's seed, a sample chunk's seed, a solve's seed: sampling derives
``level_differences`` and the samplers' streams from the same chunk seed):

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

Seeds of their own, whose ids are ``IntEnum`` members (``derive_seed`` takes them as the integers they are):

- ``LearningStream`` (``learning``): the seed of one gradient estimate (one fit step): ``COINS`` 0,
  ``DIRECTIONS`` 1, ``MINIBATCH`` 2;
- ``TrueErrorStream`` (``true_error``): a true-error panel's seed: ``PRIOR`` 0, ``BROWNIAN`` 1, ``LADDER`` 2,
  ``COINS`` 3 (``derive_seed(seed, COINS, j)`` per target ``eps = 2^-j``);
- ``ToyDemoSeed`` (``demo``): offsets added to the toy demo's seed, not ``derive_seed`` ids: ``PATH`` 0 (the
  Brownian path and the ladder), ``SOLVES`` 1 (the ML-EM solves' ``solve_seeds``).

Indices are children of their own seeds, not named streams: a Brownian path's chunks (``derive_seed(seed, j)``),
a fit's steps, ``best_of_n``'s draws and an experiment's held-out chunks (far below ``EXPERIMENT_SELECTION``).
"""

from __future__ import annotations

from enum import IntEnum, unique
from typing import Optional

import numpy as np
import torch

__all__ = ["fresh_seed", "check_seed", "derive_seed", "make_generator", "solve_seeds", "STREAM_COINS",
           "STREAM_BROWNIAN", "SAMPLE_INITIAL_NOISE", "SAMPLE_BROWNIAN_PATH", "SAMPLE_COINS", "TRAIN_BATCH_ORDER",
           "TRAIN_TIMES", "TRAIN_NOISE", "TRAIN_HELDOUT", "LEVEL_DIFFERENCES", "EXPERIMENT_SELECTION", "LearningStream",
           "TrueErrorStream", "ToyDemoSeed"]

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


@unique
class LearningStream(IntEnum):
    """``learning``: the streams of one gradient estimate's seed (one step of a fit)."""

    COINS = 0  # the ML-EM coins of the estimate's solve (``path_jvp``)
    DIRECTIONS = 1  # the Gaussian directions of the forward-mode term
    MINIBATCH = 2  # the step's minibatch of paths (``fit_probabilities``)


@unique
class TrueErrorStream(IntEnum):
    """``true_error``: the streams of a true-error panel's seed."""

    PRIOR = 0  # the prior draw ``y0`` every solve shares
    BROWNIAN = 1  # the Brownian path every solve shares
    LADDER = 2  # the synthetic ladder's perturbations
    COINS = 3  # ML-EM's coins and solve, per target: ``derive_seed(seed, COINS, j)``


@unique
class ToyDemoSeed(IntEnum):
    """``demo`` (``run_toy_demo``): offsets added to the demo's seed (not ``derive_seed`` ids)."""

    PATH = 0  # the shared Brownian path and the ladder's phases: the seed itself
    SOLVES = 1  # the ML-EM solves (``sdeint(seed=seed + SOLVES)``, whose ``solve_seeds`` derive the coins)


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
