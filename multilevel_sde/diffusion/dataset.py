"""The in-memory image data set every loader returns, and its seeded random train/held-out split."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["ImageTensorDataset", "split_dataset"]


class ImageTensorDataset(Dataset):
    """An in-memory image data set: ``images`` is a float32 ``(N, C, H, W)`` tensor in ``[-1, 1]``.

    ``dataset[i]`` is the ``(C, H, W)`` tensor of image ``i`` (no label). ``name`` is a short label for logs
    and file names; ``info`` is a dict with at least ``source``, ``count``, ``skipped``, ``crop`` and ``size``.
    """

    def __init__(self, images: torch.Tensor, name: str = "images", info: Optional[dict] = None):
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
        if images.dtype != torch.float32:
            images = images.to(torch.float32)
        self.images = images
        self.name = str(name)
        info = dict(info or {})
        info.setdefault("source", self.name)
        info.setdefault("skipped", 0)
        info.setdefault("crop", None)
        info.setdefault("size", tuple(images.shape[-2:]))
        info["count"] = int(images.shape[0])
        self.info = info

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index):
        return self.images[index]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """The height (= width for every loader here)."""
        return int(self.images.shape[-2])

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The shape of one image, ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def subset(self, indices, name: Optional[str] = None, **info) -> "ImageTensorDataset":
        """A new data set holding ``images[indices]`` (a copy), with ``info`` updated by the keywords."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(self.images[idx].clone(), name or self.name, {**self.info, **info})

    def __repr__(self) -> str:
        return f"ImageTensorDataset(name={self.name!r}, count={len(self)}, shape={self.shape})"


def split_dataset(dataset: Dataset, holdout: Union[float, int], seed: int = 0):
    """``(train, heldout)``: a random split, the same for the same ``seed`` and size.

    ``holdout``: a fraction in (0, 1) (rounded, at least one image each side) or a count in
    ``[1, len - 1]``. An :class:`ImageTensorDataset` gives two ``ImageTensorDataset`` copies (each keeps its
    images in their original order; ``info`` records ``part``, ``split_seed``, ``holdout`` and
    ``parent_count``); any other data set gives two ``torch.utils.data.Subset``.
    """
    n = len(dataset)
    if n < 2:
        raise ValueError(f"cannot split a data set of {n} item(s)")
    if isinstance(holdout, bool):
        raise ValueError(f"holdout must be a fraction in (0, 1) or a count; got {holdout!r}")
    if isinstance(holdout, (int, np.integer)):
        k = int(holdout)
        if not 1 <= k <= n - 1:
            raise ValueError(f"holdout count must be in [1, {n - 1}] for {n} items; got {k}")
    elif isinstance(holdout, (float, np.floating)):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1); got {holdout!r}")
        k = min(max(int(round(holdout * n)), 1), n - 1)
    else:
        raise ValueError(f"holdout must be a fraction in (0, 1) or a count; got {holdout!r}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    held = perm[:k].sort().values
    train = perm[k:].sort().values
    if isinstance(dataset, ImageTensorDataset):
        common = {"split_seed": int(seed), "holdout": k, "parent_count": n}
        return (dataset.subset(train, f"{dataset.name}-train", part="train", **common),
                dataset.subset(held, f"{dataset.name}-heldout", part="heldout", **common))
    return Subset(dataset, train.tolist()), Subset(dataset, held.tolist())
