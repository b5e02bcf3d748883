"""Initialise a smaller network from a larger trained one by *weight selection* (Xu et al., 2023): each
parameter of the student is an evenly spaced slice of the teacher's parameter of the same name.

For two ``SeparableUNet`` presets whose widths divide (e.g. ``cpu-m``, d = 12, from ``cpu-xl``, d = 24) every
channel axis keeps the teacher's channels ``0, r, 2r, ...`` (``r`` the width ratio), the same ones in a layer's
output and in the next layer's input, and the first residual blocks of each scale; the sinusoidal time
embedding of width ``D / r`` is exactly the teacher's embedding at those indices, so the time path carries
over too. The student starts near a thinned copy of the teacher instead of from noise, which is what a
distilled level of an ML-EM ladder wants: to end up close to the top network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["select_weights"]


def _even_indices(kept: int, total: int) -> torch.Tensor:
    """``kept`` indices spread evenly over ``range(total)``, starting at 0 (every ``r``-th when ``r`` divides)."""
    return torch.div(torch.arange(kept) * total, kept, rounding_mode="floor")


@torch.no_grad()
def select_weights(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """Overwrites every parameter and buffer of ``student`` with the evenly spaced slice of ``teacher``'s entry
    of the same name (all of an axis where the sizes agree), and returns ``student``.

    Raises ``ValueError`` naming the entry when the teacher lacks it, has another number of axes, or is smaller
    along an axis; nothing is written unless every entry fits.
    """
    source = teacher.state_dict()
    selected = {}
    for name, target in student.state_dict().items():
        if name not in source:
            raise ValueError(f"teacher has no {name!r}: the student ({type(student).__name__}) must be a thinner "
                             "or shallower network of the same layout")
        value = source[name]
        if value.dim() != target.dim() or any(s > t for s, t in zip(target.shape, value.shape)):
            raise ValueError(f"{name!r}: the student's shape {tuple(target.shape)} is not a selection of the "
                             f"teacher's {tuple(value.shape)}")
        for axis, (kept, total) in enumerate(zip(target.shape, value.shape)):
            if kept < total:
                value = value.index_select(axis, _even_indices(kept, total).to(value.device))
        selected[name] = value.to(device=target.device, dtype=target.dtype)
    student.load_state_dict(selected)
    return student
