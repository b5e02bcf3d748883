"""Image data for the diffusion experiments: in-memory data sets of float32 ``(C, H, W)`` tensors in ``[-1, 1]``.

Sources (``load_dataset`` dispatches on a string):

- ``"default"`` -- :func:`default_dataset`: scikit-learn's handwritten digits, which ship inside the
  scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``, 57 kB), so the demo and the tests run offline on
  a fresh machine. 1,797 grayscale images of 8x8 pixels (17 grey levels), upsampled (bicubic) to
  ``image_size`` (16 by default, the smallest size a UNet that halves the size four times accepts). Blurry,
  but legible, loaded in a fraction of a second, and small enough (1,797 x 256 pixels) for a small UNet to
  fit on two CPU cores in minutes, with enough images that a ladder of models differs visibly in quality.
  The alternative that ships in a wheel, scikit-image's ``lfw_subset``, holds only 100 faces
  (25x25 grayscale; its other 100 images are non-face crops): far too few to train a generative model on
  without memorising them, so it is available as ``"lfw_faces"`` (needs scikit-image) but is not the default.
- ``"celeba:PATH"`` -- :func:`celeba_dataset`: CelebA's aligned images ``img_align_celeba/*.jpg`` at any
  resolution (178x218 originals or scaled copies such as 89x109), with a named crop scaled to the actual image
  size and an optional ``list_eval_partition.txt`` split. No checksums: any copy of the folder works.
- ``"folder:PATH"`` -- :func:`folder_dataset`: any folder of jpg/jpeg/png/bmp/webp images.
- a bare path: CelebA if it is (or contains) an ``img_align_celeba`` folder, else a plain folder.

Every loader returns an :class:`ImageTensorDataset` whose ``.images`` is one ``(N, C, H, W)`` float32 tensor
(memory: ``N*C*H*W*4`` bytes -- all of CelebA at 64x64 is 9.9 GB, at 32x32 2.5 GB; use ``limit`` or a
smaller size) and whose ``.info`` records the source, the image count, the unreadable files skipped, the crop
and the size.

Errors: a missing path raises ``FileNotFoundError`` naming it; a folder without images (or a split with no
images) raises ``ValueError`` naming it; an unreadable or truncated image is **skipped and counted**
(``info["skipped"]``, the paths in ``info["skipped_files"]``) with a warning, or raises ``ValueError`` naming
the file with ``strict=True``; a bad ``image_size`` raises ``ValueError`` naming it.

Decoding, named crops and the optional on-disk cache (``cache_dir``, never inside the repository) are in
:mod:`multilevel_sde.diffusion.images`, the data set class and :func:`split_dataset` in
:mod:`multilevel_sde.diffusion.dataset`, image grids in :mod:`multilevel_sde.diffusion.grids`; their public
names are re-exported here.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .dataset import ImageTensorDataset, split_dataset
from .grids import image_grid, save_image_grid
from .images import (CELEBA_HEIGHT, CELEBA_WIDTH, CROPS, IMAGE_EXTENSIONS, cached_decode, crop_box, decode_files,
                     list_images, parse_crop)

__all__ = [
    "ImageTensorDataset",
    "IMAGE_EXTENSIONS",
    "CROPS",
    "CELEBA_WIDTH",
    "CELEBA_HEIGHT",
    "CELEBA_SPLITS",
    "DEFAULT_SOURCES",
    "default_dataset",
    "celeba_dataset",
    "folder_dataset",
    "load_dataset",
    "split_dataset",
    "crop_box",
    "image_grid",
    "save_image_grid",
]

PathLike = Union[str, os.PathLike]

CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid", "training": "train"}

DEFAULT_SOURCES = ("digits", "lfw_faces")

_MAX_LISTED_SKIPS = 100


# ----------------------------------------------------------------------------------------------- checks


def _check_size(image_size, multiple_of: int = 1) -> int:
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, (int, np.integer)) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive integer; got {multiple_of!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size!r}")
    if image_size % multiple_of:
        raise ValueError(f"image_size must be a multiple of {multiple_of} (multiple_of={multiple_of}: "
                         f"e.g. 16 for a network that halves the size four times); got {image_size}")
    return int(image_size)


def _check_channels(channels, allow_none: bool = False) -> Optional[int]:
    if channels is None and allow_none:
        return None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3{' or None' if allow_none else ''}; got {channels!r}")
    return int(channels)


def _existing_dir(root: PathLike, what: str) -> Path:
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.exists():
        raise FileNotFoundError(f"{what} path does not exist: {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path is not a folder: {str(path)!r}")
    return path


def _default_workers(workers: Optional[int]) -> int:
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers!r}")
    return int(workers)


def _check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    return None if limit is None else int(limit)


# ----------------------------------------------------------------------------------------------- results


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def _finish(arr, skipped, files, *, name, source, root, crop, image_size, channels, strict, extra,
            cache_file, seconds) -> ImageTensorDataset:
    if skipped and strict:  # only reached from a cache built without strict=True
        path, reason = skipped[0]
        raise ValueError(f"cannot read image {path!r}: {reason} ({len(skipped)} unreadable in {root!r})")
    if len(arr) == 0:
        raise ValueError(f"none of the {len(files)} image file(s) in {root!r} could be read; the first: "
                         f"{skipped[0][0]!r}: {skipped[0][1]}")
    if skipped:
        shown = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(files)} in {root!r}: {shown}"
                      + (" ..." if len(skipped) > 3 else ""), stacklevel=3)
    info = {
        "source": source,
        "root": root,
        "count": int(len(arr)),
        "files": len(files),
        "skipped": len(skipped),
        "skipped_files": [p for p, _ in skipped[:_MAX_LISTED_SKIPS]],
        "skip_reasons": [why for _, why in skipped[:_MAX_LISTED_SKIPS]],
        "crop": crop,
        "size": (image_size, image_size),
        "channels": channels,
        "cache_file": cache_file,
        "load_seconds": round(seconds, 3),
        **extra,
    }
    return ImageTensorDataset(_to_tensor(arr), name, info)


# ----------------------------------------------------------------------------------------------- default data


def _resize_unit_images(x: np.ndarray, image_size: int) -> torch.Tensor:
    """float ``(N, H, W)`` in [0, 1] -> float32 ``(N, 1, S, S)`` in [-1, 1] (bicubic up, antialiased down)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    if t.shape[-1] != image_size or t.shape[-2] != image_size:
        down = image_size < t.shape[-1]
        t = torch.nn.functional.interpolate(t, size=(image_size, image_size), mode="bicubic",
                                            align_corners=False, antialias=down)
    return t.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def default_dataset(image_size: int = 16, channels: Optional[int] = None, *, source: str = "digits",
                    limit: Optional[int] = None, multiple_of: int = 1) -> ImageTensorDataset:
    """The built-in offline data set: scikit-learn's 1,797 digits (8x8, grayscale) resized to ``image_size``.

    ``channels``: ``None`` keeps the native single channel; 3 repeats it (for an RGB network). ``source``
    ``"lfw_faces"`` gives scikit-image's 100 LFW faces (25x25 grayscale) instead -- too few to train on
    without memorising, kept for quick looks. Loading the digits takes about a second (mostly importing
    scikit-learn). Pixels are scaled from [0, 16] (digits) or [0, 1] (faces) to [-1, 1]; upsampling is bicubic
    (clamped), so a 16x16 digit is a smooth version of the 8x8 one.
    """
    image_size = _check_size(image_size, multiple_of)
    channels = _check_channels(channels, allow_none=True)
    limit = _check_limit(limit)
    t0 = time.perf_counter()
    if source == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the default data set needs scikit-learn: pip install scikit-learn") from err
        raw = load_digits().images / 16.0  # (1797, 8, 8), values 0..16
        origin = "scikit-learn load_digits (UCI optical digits, 8x8, 17 grey levels)"
    elif source in ("lfw_faces", "lfw"):
        try:
            from skimage.data import lfw_subset
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("source='lfw_faces' needs scikit-image: pip install scikit-image") from err
        raw = lfw_subset()[:100]  # the first 100 of the 200 are faces, the rest non-faces
        origin = "scikit-image lfw_subset (first 100 images: faces, 25x25)"
        source = "lfw_faces"
    else:
        raise ValueError(f"unknown default source {source!r}; choose one of {DEFAULT_SOURCES}")
    if limit is not None:
        raw = raw[:limit]
    images = _resize_unit_images(raw, image_size)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    info = {
        "source": source,
        "origin": origin,
        "root": None,
        "native_size": tuple(raw.shape[-2:]),
        "skipped": 0,
        "skipped_files": [],
        "crop": None,
        "size": (image_size, image_size),
        "channels": int(images.shape[1]),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return ImageTensorDataset(images, source, info)


# ----------------------------------------------------------------------------------------------- CelebA


def _find_celeba_folder(root: Path) -> Tuple[Path, Path]:
    """``(image folder, base folder)`` for ``root`` = the ``img_align_celeba`` folder, its parent, or a
    torchvision-style root holding ``celeba/img_align_celeba``; Kaggle's doubly nested
    ``img_align_celeba/img_align_celeba`` is followed too."""
    found = None
    if root.name == "img_align_celeba":
        found = root, root.parent
    else:
        for base in (root, root / "celeba"):
            if (base / "img_align_celeba").is_dir():
                found = base / "img_align_celeba", base
                break
    if found is None:
        if any(root.glob("*.jpg")):  # a folder of CelebA-like jpgs under another name
            return root, root.parent
        raise FileNotFoundError(f"no 'img_align_celeba' folder (and no .jpg files) in CelebA path {str(root)!r}")
    folder, base = found
    if (folder / "img_align_celeba").is_dir() and not any(folder.glob("*.jpg")):
        folder = folder / "img_align_celeba"
    return folder, base


def _read_partition(base: Path, images: Path) -> Tuple[Optional[Path], Dict[str, int]]:
    for folder in (base, images):
        for fname in ("list_eval_partition.txt", "list_eval_partition.csv"):
            path = folder / fname
            if path.is_file():
                table: Dict[str, int] = {}
                with open(path, encoding="utf-8") as fh:
                    for line in fh:
                        parts = line.replace(",", " ").split()
                        if len(parts) >= 2 and parts[1].isdigit():  # skips a csv header 'image_id,partition'
                            table[parts[0]] = int(parts[1])
                if not table:
                    raise ValueError(f"no '<file> <0|1|2>' lines in CelebA partition file {str(path)!r}")
                return path, table
    return None, {}


def _normalise_split(split: Optional[str]) -> Optional[str]:
    if split is None:
        return None
    key = str(split).strip().lower()
    if key in ("all", ""):
        return None
    key = _SPLIT_ALIASES.get(key, key)
    if key not in CELEBA_SPLITS:
        raise ValueError(f"unknown CelebA split {split!r}; choose one of {tuple(CELEBA_SPLITS)} or None")
    return key


def celeba_dataset(
    root: PathLike,
    image_size: int = 64,
    split: Optional[str] = None,
    crop: str = "center140",
    limit: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
    *,
    strict: bool = False,
    multiple_of: int = 1,
    workers: Optional[int] = None,
) -> ImageTensorDataset:
    """CelebA's aligned faces, RGB, cropped (``crop``, scaled to each image's size) and resized to ``image_size``.

    ``root``: the ``img_align_celeba`` folder itself, the folder containing it (where
    ``list_eval_partition.txt`` usually lies), a torchvision root with ``celeba/img_align_celeba``, or
    Kaggle's layout (``img_align_celeba/img_align_celeba`` with ``list_eval_partition.csv``).
    Works at any resolution: 178x218 originals and scaled copies (e.g. 89x109) give the same crop.

    ``split``: ``None`` (all files) or ``'train'`` / ``'valid'`` / ``'test'``, read from
    ``list_eval_partition.txt`` (or Kaggle's ``.csv``) next to or inside the image folder; asking for a split
    without that file raises ``FileNotFoundError``. Files not listed in the partition are left out of every
    split; listed files that are absent are ignored (a partial copy works). ``limit``: the first ``limit``
    files (sorted by name) of the selection. Files are checked only by decoding them: no MD5s.
    """
    image_size = _check_size(image_size, multiple_of)
    parse_crop(crop)
    limit = _check_limit(limit)
    split = _normalise_split(split)
    folder, base = _find_celeba_folder(_existing_dir(root, "CelebA"))
    files = list_images(folder, recursive=False, extensions=(".jpg", ".jpeg", ".png"))
    if not files:
        raise ValueError(f"no images in CelebA folder {str(folder)!r}")
    partition_file = None
    if split is not None:
        partition_file, table = _read_partition(base, folder)
        if partition_file is None:
            raise FileNotFoundError(
                f"split={split!r} needs list_eval_partition.txt in {str(base)!r} or {str(folder)!r}; "
                "it is missing (use split=None for all images)"
            )
        want = CELEBA_SPLITS[split]
        files = [f for f in files if table.get(os.path.basename(f)) == want]
        if not files:
            raise ValueError(f"no images of split {split!r} (per {str(partition_file)!r}) in {str(folder)!r}")
    if limit is not None:
        files = files[:limit]
    workers = _default_workers(workers)
    key = {"kind": "celeba", "root": str(folder.resolve()), "image_size": image_size, "crop": crop,
           "channels": 3, "split": split, "limit": limit}
    t0 = time.perf_counter()
    arr, skipped, cache_file = cached_decode(
        cache_dir, "celeba", key, files,
        lambda: decode_files(files, image_size, crop, 3, strict=strict, progress=progress, workers=workers,
                              desc=f"CelebA {image_size}px"),
    )
    extra = {"split": split, "partition_file": None if partition_file is None else str(partition_file),
             "limit": limit}
    return _finish(arr, skipped, files, name="celeba", source="celeba", root=str(folder), crop=crop,
                   image_size=image_size, channels=3, strict=strict, extra=extra, cache_file=cache_file,
                   seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- any folder


def folder_dataset(
    root: PathLike,
    image_size: int,
    crop: str = "center",
    channels: int = 3,
    *,
    recursive: bool = False,
    limit: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
    strict: bool = False,
    multiple_of: int = 1,
    workers: Optional[int] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageTensorDataset:
    """Every image in ``root`` (jpg/jpeg/png/bmp/webp; subfolders too with ``recursive=True``), sorted by path,
    cropped (``crop``, default the largest centred square) and resized to ``image_size`` x ``image_size``.

    ``channels`` 3 converts to RGB (alpha dropped), 1 to grayscale; EXIF orientation is applied. Other files
    (and hidden ones) are ignored; unreadable images are skipped and counted (or raise with ``strict=True``).
    """
    image_size = _check_size(image_size, multiple_of)
    channels = _check_channels(channels)
    parse_crop(crop)
    limit = _check_limit(limit)
    folder = _existing_dir(root, "image folder")
    files = list_images(folder, recursive, extensions)
    if not files:
        raise ValueError(
            f"no images ({'/'.join(e.lstrip('.') for e in extensions)}) in folder {str(folder)!r}"
            + ("" if recursive else " (subfolders are not searched; pass recursive=True)")
        )
    if limit is not None:
        files = files[:limit]
    workers = _default_workers(workers)
    key = {"kind": "folder", "root": str(folder.resolve()), "image_size": image_size, "crop": crop,
           "channels": channels, "recursive": bool(recursive), "limit": limit}
    t0 = time.perf_counter()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", folder.resolve().name) or "folder"
    arr, skipped, cache_file = cached_decode(
        cache_dir, name, key, files,
        lambda: decode_files(files, image_size, crop, channels, exif=True, strict=strict, progress=progress,
                              workers=workers, desc=f"{name} {image_size}px"),
    )
    return _finish(arr, skipped, files, name=name, source="folder", root=str(folder), crop=crop,
                   image_size=image_size, channels=channels, strict=strict,
                   extra={"recursive": bool(recursive), "limit": limit}, cache_file=cache_file,
                   seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- dispatch


def _looks_like_celeba(path: Path) -> bool:
    return path.name == "img_align_celeba" or (path / "img_align_celeba").is_dir() or \
        (path / "celeba" / "img_align_celeba").is_dir()


def load_dataset(
    spec: str,
    image_size: int = 16,
    *,
    channels: Optional[int] = None,
    crop: Optional[str] = None,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
    strict: bool = False,
    recursive: bool = False,
    multiple_of: int = 1,
    workers: Optional[int] = None,
) -> ImageTensorDataset:
    """Load a data set from a spec string.

    - ``"default"`` (or ``"digits"``, ``"lfw_faces"``): :func:`default_dataset`.
    - ``"celeba:PATH"``: :func:`celeba_dataset` (``crop`` defaults to ``center140``; channels must be 3/None).
    - ``"folder:PATH"``: :func:`folder_dataset` (``crop`` defaults to ``center``; ``channels`` to 3).
    - a bare ``PATH``: CelebA when it is or contains ``img_align_celeba``, else a folder.

    ``split`` is only meaningful for CelebA (a ValueError elsewhere); ``crop``, ``cache_dir``, ``strict``,
    ``recursive`` and ``workers`` are ignored by the built-in default.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind in ("default", "digits", "lfw_faces", "lfw") and not rest:
        if split is not None:
            raise ValueError(f"split={split!r} only applies to CelebA, not to {spec!r}")
        return default_dataset(image_size, channels, source="digits" if kind == "default" else kind,
                               limit=limit, multiple_of=multiple_of)
    if kind in ("celeba", "folder") and rest:
        path = rest
    else:
        kind, path = "", spec
    if not kind:
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise FileNotFoundError(f"data path does not exist: {str(p)!r} (or use 'default', 'celeba:PATH', "
                                    "'folder:PATH')")
        kind = "celeba" if p.is_dir() and _looks_like_celeba(p) else "folder"
    if kind == "celeba":
        if channels not in (None, 3):
            raise ValueError(f"CelebA is RGB: channels must be 3 or None; got {channels!r}")
        return celeba_dataset(path, image_size, split=split, crop=crop or "center140", limit=limit,
                              cache_dir=cache_dir, progress=progress, strict=strict, multiple_of=multiple_of,
                              workers=workers)
    if split is not None:
        raise ValueError(f"split={split!r} only applies to CelebA, not to the folder {path!r}")
    return folder_dataset(path, image_size, crop=crop or "center", channels=3 if channels is None else channels,
                          recursive=recursive, limit=limit, cache_dir=cache_dir, progress=progress,
                          strict=strict, multiple_of=multiple_of, workers=workers)

