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

Decoding: PIL, with ``Image.draft`` so a JPEG is decoded directly at a reduced scale (1/2, 1/4, 1/8) when the
target is much smaller, keeping at least twice the target resolution (PIL's own ``thumbnail`` rule) before
the final LANCZOS resize. The crop box is fractional, so the same named crop selects the same face region at
every resolution; the image is cut to the box's whole-pixel hull before resizing, so nothing outside the crop
(beyond a sub-pixel sliver) leaks into the edges. Files are decoded in a few threads (PIL releases the GIL).

Cache: optional (``cache_dir``; off by default), never inside the repository -- CelebA and arrays derived from
it must not be committed, so a cache folder inside the source checkout is refused. It stores the decoded uint8
array as ``.npz``, keyed by the path, the file list, the size, the crop, the channels, the split and the limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = [
    "ImageTensorDataset",
    "IMAGE_EXTENSIONS",
    "CROPS",
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: CelebA's aligned images are 178x218; ``"center<N>"`` crops are given in pixels of that width.
CELEBA_WIDTH, CELEBA_HEIGHT = 178, 218

#: Named crops. Every box is computed from the image's *actual* size, so a crop means the same region on
#: CelebA's 178x218 originals and on a 89x109 half-resolution copy.
CROPS = {
    "center140": "square of side 140/178 of the width, centred (CelebA: 140x140 at (19, 39) on 178x218, "
    "70x70 on 89x109) -- the usual CelebA-64 crop (NCSN, NCSNv2, score_sde): the face, little background",
    "center108": "square of side 108/178 of the width, centred -- the tighter DCGAN-style CelebA crop",
    "ddim128": "square of side 128/178 of the width centred at (89, 121) of 178x218, i.e. 12 px below the "
    "centre -- the CelebA-64 crop of DDIM, D2C and U-ViT (alias 'd2c128')",
    "center<N>": "square of side N/178 of the width, centred (any N; CelebA pixels at full resolution)",
    "center": "largest centred square (side min(W, H)); on CelebA this is 'full-width' = 'center178'",
    "full-width": "same as 'center': a square as wide as the image, centred vertically",
    "none": "no crop: the whole image resized to a square (the aspect ratio is not kept)",
}

CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid", "training": "train"}

DEFAULT_SOURCES = ("digits", "lfw_faces")

_CACHE_VERSION = 1
_MAX_LISTED_SKIPS = 100
_THREAD_MIN_FILES = 256  # below this, decoding in one thread is faster than starting a pool


# ----------------------------------------------------------------------------------------------- dataset


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


def _parse_crop(crop: str) -> Tuple[str, Optional[float], float]:
    """``(kind, side as a fraction of the width, vertical centre as a fraction of the height)``: kind is
    ``'square'`` (side ``None`` = the largest square) or ``'none'``."""
    if not isinstance(crop, str):
        raise ValueError(f"crop must be a string such as 'center140'; got {crop!r}")
    key = crop.strip().lower().replace("_", "-")
    if key in ("center", "centre", "full-width", "fullwidth", "square"):
        return "square", None, 0.5
    if key in ("none", "resize", "stretch"):
        return "none", None, 0.5
    if key in ("ddim128", "d2c128"):
        return "square", 128 / CELEBA_WIDTH, 121 / CELEBA_HEIGHT
    m = re.fullmatch(r"cent(?:er|re)-?(\d+(?:\.\d+)?)", key)
    if m and float(m.group(1)) > 0:
        return "square", float(m.group(1)) / CELEBA_WIDTH, 0.5
    raise ValueError(f"unknown crop {crop!r}; known crops: " + "; ".join(f"{k}: {v}" for k, v in CROPS.items()))


def crop_box(width: float, height: float, crop: str) -> Tuple[float, float, float, float]:
    """The fractional crop box ``(left, top, right, bottom)`` of a named crop on a ``width x height`` image.

    ``"center<N>"`` is a centred square of side ``N / 178 * width`` (capped at the image), so ``center140``
    is ``(19, 39, 159, 179)`` on 178x218 and ``(9.5, 19.5, 79.5, 89.5)`` on 89x109 -- the same region.
    """
    kind, frac, yc = _parse_crop(crop)
    if kind == "none":
        return (0.0, 0.0, float(width), float(height))
    side = min(width, height) if frac is None else min(frac * width, width, height)
    side = round(side, 6)  # 140 / 178 * 178 is not exactly 140 in floating point
    left = (width - side) / 2
    top = min(max(round(yc * height, 6) - side / 2, 0.0), height - side)  # kept inside the image
    return (left, top, left + side, top + side)


# ----------------------------------------------------------------------------------------------- decoding


#: PIL modes with more than 8 bits per pixel; ``convert("L")`` would clip them at 255
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _high_depth_to_l(im):
    """An 8-bit "L" image of a 16-bit, 32-bit integer or float one, scaled from its full range: ``I;16*`` from
    0..65535; ``I`` from 0..65535 when its values fit (16-bit PNGs and TIFFs), else from 0..2^31-1; ``F`` from
    [0, 1] when its values lie there, else 0..255, 0..65535, or 0..its maximum."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    high = float(finite.max()) if finite.size else 0.0
    if im.mode.startswith("I;16"):
        full = 65535.0
    elif im.mode == "I":
        full = 65535.0 if high <= 65535 else 2.0 ** 31 - 1
    else:
        full = next((r for r in (1.0, 255.0, 65535.0) if high <= r), high)
    scaled = np.nan_to_num(arr / full * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def _to_mode(im, mode: str):
    """``im`` as an 8-bit ``mode`` ("L" or "RGB") image, from any PIL mode: high bit depths are scaled, not
    clipped; palette and alpha modes go through RGBA (alpha dropped); modes PIL cannot convert directly
    (``La``, ``LAB`` to ``L``) go through ``LA``/``RGB``."""
    if im.mode in _HIGH_DEPTH_MODES:
        im = _high_depth_to_l(im)
    if im.mode == "La":
        im = im.convert("LA")
    if im.mode == "P" or (im.mode in ("LA", "PA", "RGBA") and mode == "RGB"):
        im = im.convert("RGBA")
    if im.mode == mode:
        return im
    try:
        return im.convert(mode)
    except ValueError:  # no direct conversion (e.g. LAB to L): through RGB
        return im.convert("RGB").convert(mode)


def _load_one(path: str, image_size: int, crop: str, mode: str, exif: bool = False):
    """Decode, crop and resize one file to a uint8 ``(H, W, C)`` array. Raises on an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        content = None  # the full image's extent in decoded pixels (fractional after a JPEG draft)
        if im.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when the crop would still be >= 2x the target (like thumbnail()).
            l, t, r, b = crop_box(im.width, im.height, crop)
            want = (int(np.ceil(2 * image_size / max(r - l, 1e-9) * im.width)),
                    int(np.ceil(2 * image_size / max(b - t, 1e-9) * im.height)))
            if want[0] < im.width and want[1] < im.height:
                drafted = im.draft(mode, want)
                if drafted is not None:  # (mode, (0, 0, width / scale, height / scale))
                    content = drafted[1][2:]
        im.load()
        if exif:
            transposed = ImageOps.exif_transpose(im)
            if transposed.size != im.size:
                content = None if content is None else content[::-1]
            im = transposed
        im = _to_mode(im, mode)
        l, t, r, b = crop_box(*(content or im.size), crop)
        # Crop to the whole-pixel hull first: resize(box=...) alone lets the filter read pixels outside the
        # box (LANCZOS reaches ~3 output pixels out), which would bleed the discarded border into the edges.
        hull = (int(np.floor(l)), int(np.floor(t)),
                min(int(np.ceil(r)), im.width), min(int(np.ceil(b)), im.height))
        if hull != (0, 0, im.width, im.height):
            im = im.crop(hull)
        box = (l - hull[0], t - hull[1], min(r - hull[0], im.width), min(b - hull[1], im.height))
        out = im.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)
        arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _decode_files(
    files: Sequence[str],
    image_size: int,
    crop: str,
    channels: int,
    *,
    exif: bool = False,
    strict: bool,
    progress: bool,
    workers: int,
    desc: str,
):
    """Decode ``files``; returns ``(uint8 array (N, H, W, C), [(skipped path, reason), ...])``."""
    from tqdm.auto import tqdm

    mode = "RGB" if channels == 3 else "L"

    def work(path):
        try:
            return _load_one(path, image_size, crop, mode, exif), None
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, EOFError... for bad files
            if strict:
                raise ValueError(f"cannot read image {path!r}: {type(err).__name__}: {err}") from err
            return None, f"{type(err).__name__}: {err}"

    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    skipped: List[Tuple[str, str]] = []  # (path, reason)

    def store(i, arr, reason):
        if reason is None:
            out[i], ok[i] = arr, True
        else:
            skipped.append((files[i], reason))
        bar.update(1)

    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress, mininterval=0.5)
    try:
        if workers > 1 and len(files) >= _THREAD_MIN_FILES:
            pool = ThreadPoolExecutor(workers)  # PIL releases the GIL while decoding and resizing
            try:
                for i, (arr, reason) in enumerate(pool.map(work, files, chunksize=64)):
                    store(i, arr, reason)
            finally:  # on an error (strict=True, Ctrl-C) do not decode the rest
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for i, path in enumerate(files):
                store(i, *work(path))
    finally:
        bar.close()
    if skipped:
        out = out[ok]
    return out, skipped


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def _list_images(folder: Path, recursive: bool, extensions: Iterable[str]) -> List[str]:
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts) and f[0] != ".")
    else:
        with os.scandir(folder) as it:
            found = [e.path for e in it if e.name.lower().endswith(exts) and e.name[0] != "." and e.is_file()]
    return sorted(found)


# ----------------------------------------------------------------------------------------------- cache


def _project_root() -> Optional[Path]:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


def _cache_path(cache_dir: PathLike, name: str, key: dict) -> Path:
    cache = Path(os.path.expanduser(os.fspath(cache_dir))).resolve()
    repo = _project_root()
    if repo is not None and (cache == repo or repo in cache.parents):
        raise ValueError(
            f"cache_dir {str(cache)!r} is inside the repository {str(repo)!r}; decoded data (CelebA in "
            "particular) must never be stored in the repository -- give a folder outside it"
        )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{name}-{key['image_size']}px-{re.sub(r'[^A-Za-z0-9.-]', '_', key['crop'])}-{digest}.npz"


def _cached_decode(cache_dir, name: str, key: dict, files: Sequence[str], decode):
    """``decode()`` -> (array, skipped), read from / written to ``cache_dir`` when one is given."""
    if cache_dir is None:
        arr, skipped = decode()
        return arr, skipped, None
    key = {**key, "version": _CACHE_VERSION, "n_files": len(files),
           "files": hashlib.sha256("\n".join(files).encode()).hexdigest()}
    path = _cache_path(cache_dir, name, key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("key") == key:
                    return z["images"], [tuple(x) for x in meta.get("skipped", [])], str(path)
        except Exception as err:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache file {str(path)!r}: {err}", stacklevel=3)
    arr, skipped = decode()
    if len(arr) == 0:  # nothing to keep; _finish raises
        return arr, skipped, None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=arr, meta=np.array(json.dumps({"key": key, "skipped": skipped})))
    os.replace(tmp, path)
    return arr, skipped, str(path)


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
    _parse_crop(crop)
    limit = _check_limit(limit)
    split = _normalise_split(split)
    folder, base = _find_celeba_folder(_existing_dir(root, "CelebA"))
    files = _list_images(folder, recursive=False, extensions=(".jpg", ".jpeg", ".png"))
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
    arr, skipped, cache_file = _cached_decode(
        cache_dir, "celeba", key, files,
        lambda: _decode_files(files, image_size, crop, 3, strict=strict, progress=progress, workers=workers,
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
    _parse_crop(crop)
    limit = _check_limit(limit)
    folder = _existing_dir(root, "image folder")
    files = _list_images(folder, recursive, extensions)
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
    arr, skipped, cache_file = _cached_decode(
        cache_dir, name, key, files,
        lambda: _decode_files(files, image_size, crop, channels, exif=True, strict=strict, progress=progress,
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


# ----------------------------------------------------------------------------------------------- splitting


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


# ----------------------------------------------------------------------------------------------- viewing


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
