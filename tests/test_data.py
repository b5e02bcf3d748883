"""Data loaders (multilevel_sde/diffusion/data.py, decoding in images.py). Every image here is generated in
tmp_path; no CelebA."""

import importlib.util
import os
import threading
import warnings

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from multilevel_sde.diffusion import data as D  # noqa: E402

BLUE, RED, GREEN = (0, 0, 255), (255, 0, 0), (0, 255, 0)


def _celeba_like(width, height):
    """A CelebA-shaped test card: blue outside the centre140 box, red inside, green in the box's middle half.

    On 89x109 the box has half-pixel edges (9.5, 19.5, 79.5, 89.5); the red covers the whole-pixel hull."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:] = BLUE
    l, t, r, b = D.crop_box(width, height, "center140")
    a[int(np.floor(t)):int(np.ceil(b)), int(np.floor(l)):int(np.ceil(r))] = RED
    q = (r - l) / 4
    a[int(round(t + q)):int(round(b - q)), int(round(l + q)):int(round(r - q))] = GREEN
    return a


def _make_celeba(root, width, height, n=12, partition=None, nested=True):
    folder = root / "img_align_celeba" if nested else root
    folder.mkdir(parents=True)
    card = _celeba_like(width, height)
    for i in range(1, n + 1):
        Image.fromarray(card).save(folder / f"{i:06d}.jpg", quality=95)
    if partition is not None:
        lines = [f"{i:06d}.jpg {partition(i)}" for i in range(1, n + 1)]
        (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return folder


def _rgb(x):
    """(C, H, W) in [-1, 1] -> uint8-ish (H, W, C) numpy."""
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5)


def _assert_close_colour(pixels, colour, tol=40):
    diff = np.abs(pixels.reshape(-1, 3) - np.array(colour, float)).max()
    assert diff < tol, f"max channel error {diff:.0f} vs {colour}"


def _assert_range(ds):
    assert ds.images.dtype == torch.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


# ---------------------------------------------------------------------------------------------- CelebA


@pytest.mark.parametrize("width,height", [(178, 218), (89, 109)])
@pytest.mark.parametrize("size", [16, 32])
def test_celeba_center140_crop_geometry(tmp_path, width, height, size):
    _make_celeba(tmp_path, width, height, n=3)
    ds = D.celeba_dataset(tmp_path, image_size=size)
    assert isinstance(ds, D.ImageTensorDataset) and len(ds) == 3 and ds.shape == (3, size, size)
    assert ds.images.shape == (3, 3, size, size) and ds[0].shape == (3, size, size)
    _assert_range(ds)
    img = _rgb(ds[0])
    # The crop is the red box: no blue inside, and the edge pixels stay red (the blue border outside the
    # crop does not bleed in through the resampling filter; JPEG chroma smearing leaves a little) ...
    assert img[1:-1, 1:-1, 2].max() < 60
    edges = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    assert (edges[:, 0] - edges[:, 2]).min() > 100
    # ... and its middle half is green, in the right place.
    m = size // 4
    _assert_close_colour(img[m + 2:size - m - 2, m + 2:size - m - 2], GREEN)
    for corner in (img[:2, :2], img[:2, -2:], img[-2:, :2], img[-2:, -2:]):
        _assert_close_colour(corner, RED, tol=90)
    assert ds.info["crop"] == "center140" and ds.info["size"] == (size, size)
    assert ds.info["count"] == 3 and ds.info["skipped"] == 0 and ds.info["source"] == "celeba"


def _gradient(width, height):
    """A smooth card in relative coordinates: the same picture at every resolution."""
    v, u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return (np.stack([u, v, (1 - u) * v], -1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("crop", ["center140", "center108", "ddim128", "full-width", "none"])
def test_celeba_same_crop_at_both_resolutions(tmp_path, crop):
    sets = []
    for w, h in [(178, 218), (89, 109)]:
        folder = tmp_path / f"{w}" / "img_align_celeba"
        folder.mkdir(parents=True)
        Image.fromarray(_gradient(w, h)).save(folder / "000001.jpg", quality=95)
        sets.append(D.celeba_dataset(folder, 16, crop=crop).images)
    assert (sets[0] - sets[1]).abs().max() < 0.05  # same region, up to JPEG/resampling noise
    # and the region is the one asked for: the red ramp gives x / width, the green one y / height; within
    # 0.012 = about 2 px of 178.
    left, top, right, bottom = D.crop_box(178, 218, crop)
    centres = (torch.arange(16) + 0.5) / 16
    for images in sets:
        red, green = (images[0, 0, 8] + 1) / 2, (images[0, 1, :, 8] + 1) / 2
        assert (red - (left + (right - left) * centres) / 178).abs().max() < 0.012
        assert (green - (top + (bottom - top) * centres) / 218).abs().max() < 0.012


def test_celeba_full_width_crop_keeps_the_background(tmp_path):
    _make_celeba(tmp_path, 89, 109, n=1)
    ds = D.celeba_dataset(tmp_path, 32, crop="full-width")
    img = _rgb(ds[0])
    _assert_close_colour(img[:2, :2], BLUE)  # a 89x89 square shows the blue border around the red box
    _assert_close_colour(img[14:18, 14:18], GREEN)
    assert torch.equal(ds.images, D.celeba_dataset(tmp_path, 32, crop="center178").images)


@pytest.mark.parametrize("root_kind", ["parent", "images", "torchvision"])
def test_celeba_root_forms(tmp_path, root_kind):
    base = tmp_path / "celeba" if root_kind == "torchvision" else tmp_path
    folder = _make_celeba(base, 89, 109, n=4)
    root = {"parent": tmp_path, "images": folder, "torchvision": tmp_path}[root_kind]
    assert len(D.celeba_dataset(root, 16)) == 4


def test_celeba_splits_and_limit(tmp_path):
    _make_celeba(tmp_path, 89, 109, n=12, partition=lambda i: 0 if i <= 6 else (1 if i <= 9 else 2))
    assert len(D.celeba_dataset(tmp_path, 16)) == 12
    assert len(D.celeba_dataset(tmp_path, 16, split="train")) == 6
    valid = D.celeba_dataset(tmp_path, 16, split="val")  # alias
    assert len(valid) == 3 and valid.info["split"] == "valid"
    assert valid.info["partition_file"].endswith("list_eval_partition.txt")
    assert len(D.celeba_dataset(tmp_path, 16, split="test")) == 3
    assert len(D.celeba_dataset(tmp_path, 16, split="train", limit=4)) == 4
    assert len(D.celeba_dataset(tmp_path, 16, limit=100)) == 12
    with pytest.raises(ValueError, match="split"):
        D.celeba_dataset(tmp_path, 16, split="holdout")


def test_celeba_partial_copy_with_full_partition_file(tmp_path):
    # A subset of the images with a partition file listing more files (like the 10k copy + the real list).
    folder = _make_celeba(tmp_path, 89, 109, n=5)
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {i % 3}\n" for i in range(1, 100)))
    ds = D.celeba_dataset(folder, 16, split="train")  # root = img_align_celeba itself; file one level up
    assert len(ds) == 1  # only 000003.jpg is present and in partition 0


def test_celeba_kaggle_layout(tmp_path):
    _make_celeba(tmp_path / "img_align_celeba", 89, 109, n=4)  # img_align_celeba/img_align_celeba/*.jpg
    (tmp_path / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{i:06d}.jpg,{int(i > 3)}\n" for i in range(1, 5)))
    assert len(D.celeba_dataset(tmp_path, 16)) == 4
    assert len(D.celeba_dataset(tmp_path / "img_align_celeba", 16, split="valid")) == 1


def test_celeba_split_without_partition_file(tmp_path):
    _make_celeba(tmp_path, 89, 109, n=2)
    with pytest.raises(FileNotFoundError, match="list_eval_partition"):
        D.celeba_dataset(tmp_path, 16, split="train")


def test_celeba_missing_and_empty(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.celeba_dataset(missing)
    (tmp_path / "empty" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(ValueError, match="img_align_celeba"):
        D.celeba_dataset(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        D.celeba_dataset(tmp_path / "other")


def test_celeba_cache(tmp_path):
    _make_celeba(tmp_path / "data", 89, 109, n=4)
    cache = tmp_path / "cache"
    first = D.celeba_dataset(tmp_path / "data", 16, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and first.info["cache_file"] == str(files[0])
    second = D.celeba_dataset(tmp_path / "data", 16, cache_dir=cache)
    assert torch.equal(first.images, second.images) and second.info["cache_file"] == first.info["cache_file"]
    D.celeba_dataset(tmp_path / "data", 16, cache_dir=cache, crop="center108")  # different key
    D.celeba_dataset(tmp_path / "data", 16, cache_dir=cache, limit=2)
    assert len(list(cache.glob("*.npz"))) == 3
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(D.__file__))))
    if os.path.exists(os.path.join(repo, "pyproject.toml")):  # a source checkout: refuse a cache inside it
        inside = os.path.join(repo, "multilevel_sde", "cache")
        with pytest.raises(ValueError, match="repository"):
            D.celeba_dataset(tmp_path / "data", 16, cache_dir=inside)
        assert not os.path.exists(inside)


def test_threaded_decoding_keeps_order_and_skips(tmp_path, monkeypatch, capsys):
    """With workers > 1, a folder of 256 files or more decodes in threads (documented in ``decode_files``),
    giving what one thread gives: the same images in the same order, the same file skipped."""
    root = tmp_path / "many"
    root.mkdir()
    n = 300
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), (7 * i) % 256, np.uint8)).save(root / f"{i:03d}.png")
    (root / "004.png").write_bytes(b"broken")
    on_main = []  # per file opened: whether on the main thread
    opened = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: on_main.append(threading.current_thread()
                                                                       is threading.main_thread()) or opened(*a, **k))
    with pytest.warns(UserWarning, match="skipped 1"):
        threaded = D.folder_dataset(root, 4, workers=2, progress=True)
    assert len(on_main) == n and not any(on_main)
    on_main.clear()
    with pytest.warns(UserWarning, match="skipped 1"):
        serial = D.folder_dataset(root, 4, workers=1)
    assert len(on_main) == n and all(on_main)
    assert torch.equal(threaded.images, serial.images) and len(serial) == n - 1
    levels = ((serial.images[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert levels == [(7 * i) % 256 for i in range(n) if i != 4]
    assert threaded.info["skipped_files"][0].endswith("004.png")


# ---------------------------------------------------------------------------------------------- folders


def _mixed_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(root / "b.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), "L").save(root / "c.bmp")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "d.webp")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P").save(root / "e.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_folder_mixed_formats_and_corrupt_file(tmp_path):
    root = _mixed_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = D.folder_dataset(root, 16)
    assert ds.images.shape == (5, 3, 16, 16)
    _assert_range(ds)
    assert ds.info["skipped"] == 1 and ds.info["skipped_files"][0].endswith("broken.jpg")
    assert ds.info["files"] == 6 and ds.info["count"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gray = D.folder_dataset(root, 8, channels=1, crop="none")
    assert gray.images.shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="broken.jpg"):
        D.folder_dataset(root, 16, strict=True)


def test_folder_cache_keeps_skips_and_strict_still_fails(tmp_path):
    root = _mixed_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="broken.jpg"):
        first = D.folder_dataset(root, 16, cache_dir=cache)
    with pytest.warns(UserWarning, match="skipped 1"):
        again = D.folder_dataset(root, 16, cache_dir=cache)
    assert again.info["cache_file"] == first.info["cache_file"] and again.info["skipped"] == 1
    assert torch.equal(first.images, again.images)
    with pytest.raises(ValueError, match="broken.jpg"):
        D.folder_dataset(root, 16, cache_dir=cache, strict=True)


def test_folder_truncated_jpeg_is_skipped(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "good.jpg")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "cut.jpg")
    raw = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    with pytest.warns(UserWarning):
        ds = D.folder_dataset(root, 16)
    assert len(ds) == 1 and ds.info["skipped"] == 1


def test_folder_recursive_limit_and_center_crop(tmp_path):
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = BLUE
    wide[:, 20:40] = GREEN
    wide[:, 40:] = BLUE
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(wide).save(root / "sub" / "inner.png")
    ds = D.folder_dataset(root, 8)
    assert len(ds) == 1
    _assert_close_colour(_rgb(ds[0]), GREEN, tol=5)  # the largest centred square is the green band
    assert len(D.folder_dataset(root, 8, recursive=True)) == 2
    assert len(D.folder_dataset(root, 8, recursive=True, limit=1)) == 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        D.folder_dataset(tmp_path / "missing_dir", 16)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_dir"):
        D.folder_dataset(empty, 16)
    bad = tmp_path / "all_bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could be read.*x.jpg"):
            D.folder_dataset(bad, 16)
    with pytest.raises(NotADirectoryError):
        D.folder_dataset(bad / "x.jpg", 16)


@pytest.mark.parametrize("size", [0, -16, 12.0, True, "16"])
def test_bad_image_size(tmp_path, size):
    with pytest.raises(ValueError, match="image_size"):
        D.folder_dataset(tmp_path, size)


def test_multiple_of(tmp_path):
    _make_celeba(tmp_path, 89, 109, n=1)
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        D.celeba_dataset(tmp_path, 24, multiple_of=16)
    assert D.celeba_dataset(tmp_path, 32, multiple_of=16).image_size == 32
    with pytest.raises(ValueError, match="image_size"):
        D.default_dataset(24, multiple_of=16)


def test_unknown_crop(tmp_path):
    with pytest.raises(ValueError, match="unknown crop"):
        D.folder_dataset(tmp_path, 16, crop="left")


def test_crop_box_scales_with_image():
    assert D.crop_box(178, 218, "center140") == (19.0, 39.0, 159.0, 179.0)
    assert D.crop_box(89, 109, "center140") == (9.5, 19.5, 79.5, 89.5)
    assert D.crop_box(178, 218, "full-width") == (0.0, 20.0, 178.0, 198.0)
    assert D.crop_box(178, 218, "none") == (0.0, 0.0, 178.0, 218.0)
    assert D.crop_box(60, 20, "center") == (20.0, 0.0, 40.0, 20.0)
    assert D.crop_box(178, 218, "ddim128") == (25.0, 57.0, 153.0, 185.0)  # DDIM's Crop(57, 185, 25, 153)
    assert D.crop_box(89, 109, "ddim128") == (12.5, 28.5, 76.5, 92.5)
    assert D.crop_box(200, 100, "center140") == (50.0, 0.0, 150.0, 100.0)  # capped at the image


# ---------------------------------------------------------------------------------------------- default


def test_default_dataset():
    pytest.importorskip("sklearn")
    ds = D.default_dataset()
    assert ds.images.shape == (1797, 1, 16, 16) and ds.name == "digits" and ds.info["source"] == "digits"
    _assert_range(ds)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.info["native_size"] == (8, 8) and ds.info["count"] == 1797
    rgb = D.default_dataset(32, channels=3, limit=10)
    assert rgb.images.shape == (10, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    native = D.default_dataset(8, limit=5)
    from sklearn.datasets import load_digits

    expected = torch.from_numpy(load_digits().images[:5] / 8.0 - 1.0).float()
    assert torch.allclose(native.images[:, 0], expected)
    with pytest.raises(ValueError, match="channels"):
        D.default_dataset(16, channels=2)
    with pytest.raises(ValueError, match="source"):
        D.default_dataset(16, source="mnist")


def test_default_lfw_faces():
    pytest.importorskip("skimage")
    ds = D.default_dataset(32, source="lfw_faces")
    assert ds.images.shape == (100, 1, 32, 32)
    _assert_range(ds)


# ---------------------------------------------------------------------------------------------- dispatch


def test_load_dataset_dispatch(tmp_path):
    _make_celeba(tmp_path / "celeb", 89, 109, n=3)
    _mixed_folder(tmp_path / "imgs")
    assert D.load_dataset(f"celeba:{tmp_path / 'celeb'}", 16).info["source"] == "celeba"
    assert D.load_dataset(str(tmp_path / "celeb"), 16).info["crop"] == "center140"  # auto-detected
    assert D.load_dataset(str(tmp_path / "celeb" / "img_align_celeba"), 16).info["source"] == "celeba"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = D.load_dataset(f"folder:{tmp_path / 'imgs'}", 16, channels=1)
        assert ds.info["source"] == "folder" and ds.channels == 1 and ds.info["crop"] == "center"
        assert D.load_dataset(str(tmp_path / "imgs"), 16).info["source"] == "folder"
        with pytest.raises(ValueError, match="split"):
            D.load_dataset(str(tmp_path / "imgs"), 16, split="train")
    with pytest.raises(FileNotFoundError, match="no_such"):
        D.load_dataset(str(tmp_path / "no_such"), 16)
    with pytest.raises(FileNotFoundError, match="no_such"):
        D.load_dataset(f"celeba:{tmp_path / 'no_such'}", 16)
    with pytest.raises(ValueError):
        D.load_dataset(f"celeba:{tmp_path / 'celeb'}", 16, channels=1)
    if importlib.util.find_spec("sklearn") is not None:
        assert D.load_dataset("default", 16, limit=7, cache_dir=tmp_path).images.shape == (7, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- splitting


def test_split_dataset_deterministic():
    images = torch.linspace(-1, 1, 50 * 4).reshape(50, 1, 2, 2)
    ds = D.ImageTensorDataset(images, "toy")
    train, held = D.split_dataset(ds, 0.2, seed=3)
    assert len(train) == 40 and len(held) == 10
    again_train, again_held = D.split_dataset(ds, 0.2, seed=3)
    assert torch.equal(held.images, again_held.images) and torch.equal(train.images, again_train.images)
    _, other = D.split_dataset(ds, 0.2, seed=4)
    assert not torch.equal(held.images, other.images)
    # Disjoint and complete.
    key = lambda d: {float(x[0, 0, 0]) for x in d.images}  # noqa: E731
    assert key(train).isdisjoint(key(held)) and len(key(train) | key(held)) == 50
    assert held.info["part"] == "heldout" and held.info["split_seed"] == 3
    tr, he = D.split_dataset(ds, 7, seed=0)
    assert (len(tr), len(he)) == (43, 7)
    for bad in (0, 50, 0.0, 1.0, True):
        with pytest.raises(ValueError):
            D.split_dataset(ds, bad)
    sub_train, sub_held = D.split_dataset(torch.utils.data.TensorDataset(images), 5, seed=1)
    assert len(sub_held) == 5 and sorted(sub_train.indices + sub_held.indices) == list(range(50))


def test_image_grid_and_save(tmp_path):
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    grid = D.image_grid(x, nrow=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    D.save_image_grid(x, tmp_path / "g.png", nrow=3, scale=2)
    assert Image.open(tmp_path / "g.png").size == (32, 22)
