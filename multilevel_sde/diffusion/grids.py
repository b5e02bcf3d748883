"""Image grids for viewing: a batch of ``(N, C, H, W)`` images in ``[-1, 1]`` as one uint8 picture or PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ["image_grid", "save_image_grid"]

PathLike = Union[str, os.PathLike]


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 1) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` grid of ``(N, C, H, W)`` images in [-1, 1] (``nrow`` images per row)."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x[None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(3, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = (x[i, :3].clamp(-1, 1) + 1) / 2
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_image_grid(images: torch.Tensor, path: PathLike, nrow: int = 8, scale: int = 1, padding: int = 1):
    """Save a grid of images in [-1, 1] as a PNG (``scale``: nearest-neighbour enlargement for viewing)."""
    from PIL import Image

    from ..files import atomic_write

    im = Image.fromarray(image_grid(images, nrow, padding))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda fh: im.save(fh, format=fmt))  # never half an image
    return path
