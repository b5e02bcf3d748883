"""The pretrained ladder shipped inside the package: its record, its hash, its shape as a ladder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multilevel_sde.diffusion.nested import NestedUNet
from multilevel_sde.diffusion.pretrained import (DEFAULT_LADDER, PRETRAINED_DIR, available, export_pretrained,
                                                 load_pretrained, sha256_of)
from multilevel_sde.diffusion.sample import sample
from multilevel_sde.diffusion.train import TrainConfig, load_level, train_level
from multilevel_sde.diffusion.unet import unet_flops


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(DEFAULT_LADDER)


def test_the_shipped_ladder_is_recorded_and_small(shipped):
    net, record = shipped
    assert DEFAULT_LADDER in available()
    assert isinstance(net, NestedUNet) and not net.training
    weights = PRETRAINED_DIR / f"{DEFAULT_LADDER}.safetensors"
    assert weights.stat().st_size < 4 * 2**20  # a few MB at most
    assert record["sha256"] == sha256_of(weights)
    assert record["command"].startswith("mlsde train --nested") and record["data"]["name"]
    assert record["schedule"] == "cosine" and record["T"] == 1000 and record["image_shape"] == [1, 16, 16]
    from multilevel_sde.diffusion.levels import declared_schedule

    schedule = declared_schedule(net.levels())  # every width carries the schedule it was trained with
    assert (schedule.kind, schedule.T) == (record["schedule"], record["T"])
    assert len(record["heldout_eps_mse"]) == len(net.widths) >= 4
    flops = [unet_flops(level, 16, 1) for level in net.levels()]
    assert all(1.5 < b / a < 4 for a, b in zip(flops, flops[1:]))


def test_shipped_samples_approach_the_top_width_along_the_ladder(shipped):
    """Sample distance to the top width falls strictly along the rungs (same noise and path for every width)."""
    net, _ = shipped
    runs = [sample([level], (1, 16, 16), batch=16, method="ddim", steps=20, seed=3, progress=False).images
            for level in net.levels()]
    mse = [float((r - runs[-1]).pow(2).mean()) for r in runs[:-1]]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
    assert mse[-1] > 0


def test_a_damaged_or_missing_file_is_refused_by_name(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(PRETRAINED_DIR / f"{DEFAULT_LADDER}{suffix}", tmp_path / f"copy{suffix}")
    net, _ = load_pretrained(tmp_path / "copy.json")
    assert isinstance(net, NestedUNet)
    data = bytearray((tmp_path / "copy.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a flipped byte inside a tensor
    (tmp_path / "copy.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="copy.safetensors.*sha256"):
        load_pretrained(tmp_path / "copy.json")
    (tmp_path / "copy.json").write_text("{ not json")
    with pytest.raises(ValueError, match="copy.json"):
        load_pretrained(tmp_path / "copy.json")
    (tmp_path / "copy.json").unlink()
    with pytest.raises(FileNotFoundError, match="copy.json"):
        load_pretrained(tmp_path / "copy.safetensors")
    with pytest.raises(ValueError, match="no-such-ladder"):
        load_pretrained("no-such-ladder")


def test_export_round_trips_the_ema_weights(tmp_path):
    net = NestedUNet(in_channels=1, widths=(2, 4, 6), num_downsamples=2, bottom_depth=1, mid_depth=1)
    images = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    config = TrainConfig(steps=4, batch_size=8, eval_size=8, eval_every=4, log_every=2, checkpoint_every=None)
    train_level(net, images[:16], images[16:], config, tmp_path / "run")
    record = export_pretrained(tmp_path / "run", tmp_path / "out" / "tiny", command="mlsde train ...",
                               data={"name": "noise"})
    assert json.loads((tmp_path / "out" / "tiny.json").read_text()) == record
    loaded, _ = load_pretrained(tmp_path / "out" / "tiny.json")
    ema = load_level(tmp_path / "run")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900])
    for a, b in zip(loaded.levels(), ema.levels()):
        assert torch.equal(a(x, t), b(x, t))
    assert record["steps"] == 4 and len(record["heldout_eps_mse"]) == 3
