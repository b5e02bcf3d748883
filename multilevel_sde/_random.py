"""Seeds and generators: every random stream of the library comes from here, never from global state."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["fresh_seed", "derive_seed", "make_generator"]


def fresh_seed() -> int:
    """A new 63-bit seed from the operating system's entropy (recorded by callers so runs can be replayed)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_seed(seed, name: str = "seed") -> Optional[int]:
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
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


# Stream identifiers, so that coins and Brownian increments never share a stream.
STREAM_COINS = 0
STREAM_BROWNIAN = 1


def solve_seeds(seed: Optional[int]) -> tuple[int, int, int]:
    """``(seed, coin_seed, brownian_seed)`` for one solve; a fresh seed when ``seed`` is None."""
    seed = fresh_seed() if seed is None else seed
    return seed, derive_seed(seed, STREAM_COINS), derive_seed(seed, STREAM_BROWNIAN)

