"""Reading image files into uint8 arrays: named crops, PIL decoding, file listing and the on-disk decode cache.

Crops: a named crop (:data:`CROPS`) is a fractional box computed from each image's *actual* size
(:func:`crop_box`), so the same name selects the same face region on CelebA's 178x218 originals and on any
scaled copy.

Decoding: PIL, with ``Image.draft`` so a JPEG is decoded directly at a reduced scale (1/2, 1/4, 1/8) when the
target is much smaller, keeping at least twice the target resolution (PIL's own ``thumbnail`` rule) before
the final LANCZOS resize. The image is cut to the crop box's whole-pixel hull before resizing, so nothing
outside the crop (beyond a sub-pixel sliver) leaks into the edges. Any PIL mode is converted to 8-bit "L" or
"RGB" without clipping high bit depths. Files are decoded in a few threads (PIL releases the GIL); an
unreadable file is skipped and reported, or raises ``ValueError`` naming it with ``strict=True``.

Cache: optional (``cache_dir``; off by default), never inside the repository -- CelebA and arrays derived from
it must not be committed, so a cache folder inside the source checkout is refused. It stores the decoded uint8
array as ``.npz``, keyed by the path, the file list, the size, the crop, the channels, the split and the limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "CROPS",
    "CELEBA_WIDTH",
    "CELEBA_HEIGHT",
    "parse_crop",
    "crop_box",
    "list_images",
    "decode_files",
    "cached_decode",
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

_CACHE_VERSION = 1
_THREAD_MIN_FILES = 256  # below this, decoding in one thread is faster than starting a pool


# ----------------------------------------------------------------------------------------------- crops


def parse_crop(crop: str) -> Tuple[str, Optional[float], float]:
    """``(kind, side as a fraction of the width, vertical centre as a fraction of the height)``: kind is
    ``'square'`` (side ``None`` = the largest square) or ``'none'``. An unknown crop raises ``ValueError``
    listing the known ones."""
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
    kind, frac, yc = parse_crop(crop)
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


def decode_files(
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
) -> Tuple[np.ndarray, List[Tuple[str, str]]]:
    """Decode ``files``, cropped (``crop``) and resized to ``image_size``, with ``channels`` 3 (RGB) or 1 (L);
    returns ``(uint8 array (N, H, W, C), [(skipped path, reason), ...])`` in the order of ``files``.

    ``exif`` applies EXIF orientation; ``strict`` raises ``ValueError`` naming the first unreadable file
    instead of skipping it; ``workers`` > 1 decodes in threads (from 256 files); ``progress`` shows a bar
    labelled ``desc``.
    """
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


def list_images(folder: Path, recursive: bool, extensions: Iterable[str]) -> List[str]:
    """The sorted paths of the files in ``folder`` (and its subfolders with ``recursive``) whose names end in
    one of ``extensions`` (any case; hidden files left out)."""
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


def cached_decode(
    cache_dir: Optional[PathLike],
    name: str,
    key: dict,
    files: Sequence[str],
    decode: Callable[[], Tuple[np.ndarray, List[Tuple[str, str]]]],
) -> Tuple[np.ndarray, List[Tuple[str, str]], Optional[str]]:
    """``decode()`` -> (array, skipped), read from / written to ``cache_dir`` when one is given; returns
    ``(array, skipped, cache file or None)``. The file is named by ``name``, ``key["image_size"]``,
    ``key["crop"]`` and a hash of ``key`` and ``files``; a cache folder inside the repository is refused."""
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
    if len(arr) == 0:  # nothing to keep; the caller raises
        return arr, skipped, None
    meta = np.array(json.dumps({"key": key, "skipped": skipped}))
    atomic_write(path, lambda fh: np.savez(fh, images=arr, meta=meta))
    return arr, skipped, str(path)

