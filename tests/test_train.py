"""Training the diffusion levels: eps loss with Adam + EMA, distillation, atomic weights-only checkpoints, exact
resumption, held-out logs, ladders with cache reuse, and DDP (2 CPU processes, gloo, through torchrun)."""

import csv
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from multilevel_sde.diffusion.schedule import NoiseSchedule
from multilevel_sde.diffusion.train import (TrainConfig, learning_rate, load_checkpoint, level_differences,
                                            load_level, save_checkpoint, train_ladder, train_level)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
class TinyEps(nn.Module):
    """A small MLP eps-model on flattened images with sinusoidal time features; weights from a generator."""

    def __init__(self, shape=(1, 4, 4), width=32, seed=0):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self._config = dict(shape=list(shape), width=int(width), seed=int(seed))
        self.shape = shape
        dim = math.prod(shape)
        with torch.device("meta"):
            self.net = nn.Sequential(nn.Linear(dim + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                     nn.Linear(width, dim))
        self.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                bound = 1 / math.sqrt(p.shape[-1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)

    @property
    def config(self):
        return dict(self._config)

    @classmethod
    def from_config(cls, config):
        return cls(tuple(config["shape"]), config["width"], config["seed"])

    def forward(self, x, t):
        freqs = torch.arange(1, 5, device=x.device, dtype=torch.float32)
        s = t.to(torch.float32)[:, None] / 1000.0 * freqs * math.pi
        h = torch.cat([x.reshape(x.shape[0], -1), torch.sin(s), torch.cos(s)], dim=1)
        return self.net(h).reshape(x.shape)


class Images:
    """A TensorDataset-like object with ``.images``."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def toy_data(n=160, seed=0):
    """Noisy copies of 4 fixed 1x4x4 patterns in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.sign(torch.randn(4, 1, 4, 4, generator=gen)) * 0.8
    pick = torch.randint(0, 4, (n,), generator=gen)
    images = (protos[pick] + 0.1 * torch.randn(n, 1, 4, 4, generator=gen)).clamp(-1, 1)
    return Images(images[: n - 32]), Images(images[n - 32:])


def small_config(**kw):
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup=2, ema_decay=0.9, log_every=3, eval_every=6,
                eval_size=32, checkpoint_every=6, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ training
def test_loss_decreases_and_logs(tmp_path):
    train, held = toy_data()
    cfg = small_config(steps=150, log_every=25, eval_every=50, checkpoint_every=None)
    s = train_level(TinyEps(width=64), train, held, cfg, tmp_path)
    rows = read_csv(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == [25, 50, 75, 100, 125, 150]
    assert float(rows[-1]["loss"]) < 0.7 * float(rows[0]["loss"])
    held_losses = [h for _, h in s["heldout_history"]]
    assert [st for st, _ in s["heldout_history"]] == [50, 100, 150]
    assert held_losses[-1] < held_losses[0] and s["final_heldout_loss"] == held_losses[-1]
    assert rows[1]["heldout_loss"] and not rows[0]["heldout_loss"]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["rows"][-1]["step"] == 150 and log["model_config"]["width"] == 64
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == s["final_loss"]
    assert s["seconds"] > 0 and not s["skipped"] and s["start_step"] == 0


def test_ema_differs_from_raw_and_load_level_returns_it(tmp_path):
    train, held = toy_data()
    model = TinyEps()
    train_level(model, train, held, small_config(), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    for k, v in model.state_dict().items():  # the model passed in ends with the raw weights
        assert torch.equal(v, ckpt["model"][k])
    loaded = load_level(tmp_path, model_factory=TinyEps)
    assert isinstance(loaded, TinyEps) and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k])
    with pytest.raises(ValueError, match="model_factory"):
        load_level(tmp_path / "checkpoint.pt")  # not a SeparableUNet: needs a factory


def test_checkpoint_is_weights_only_and_pickle_is_refused(tmp_path):
    train, held = toy_data()
    train_level(TinyEps(), train, held, small_config(steps=3), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["train_config"]["steps"] == 3 and ckpt["model_config"]["width"] == 32
    assert ckpt["rng"]["noise"].dtype == torch.uint8 and ckpt["rng"]["time"].dtype == torch.uint8
    assert ckpt["optimizer"]["state"] and ckpt["finished"]
    json.dumps(ckpt["train_config"]), json.dumps(ckpt["model_config"]), json.dumps(ckpt["log"])

    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt["format"], "payload": Images(torch.zeros(1))}, evil)  # an arbitrary object
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = TinyEps()
    path = save_checkpoint(tmp_path / "c.pt", model, step=1)
    before = path.read_bytes()

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def _ckpt_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if key in ("seconds", "eval_seconds", "torch_version"):
            continue
        if key == "log":
            assert [{k: v for k, v in r.items() if k != "seconds"} for r in va] == \
                   [{k: v for k, v in r.items() if k != "seconds"} for r in vb]
        elif key == "train_config":
            assert {k: v for k, v in va.items() if k != "steps"} == {k: v for k, v in vb.items() if k != "steps"}
        else:
            _deep_equal(va, vb, key)


def _deep_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _deep_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _deep_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_interrupted_run_resumes_bit_identically(tmp_path):
    train, held = toy_data()
    cfg = small_config(steps=12, checkpoint_every=4, log_every=3, eval_every=6)
    full = train_level(TinyEps(seed=0), train, held, cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 6:  # after the checkpoint of step 4, mid log window, before the eval of step 6 is saved
            raise Killed

    with pytest.raises(Killed):
        train_level(TinyEps(seed=0), train, held, cfg, tmp_path / "cut", callback=kill_at)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 4
    # a fresh process: another initialisation, the weights must come from the checkpoint
    resumed = train_level(TinyEps(seed=99), train, held, cfg, tmp_path / "cut")
    assert resumed["start_step"] == 4
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    _ckpt_equal(a, b)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(read_csv(tmp_path / "full" / "log.csv")) == drop(read_csv(tmp_path / "cut" / "log.csv"))
    assert full["heldout_history"] == resumed["heldout_history"]

    # a run that ended at 6 steps and is extended to 12 equals the 12-step run too (aligned logs/evals)
    train_level(TinyEps(seed=0), train, held, cfg.replace(steps=6), tmp_path / "ext")
    again = train_level(TinyEps(seed=5), train, held, cfg.replace(steps=6), tmp_path / "ext")
    assert again["skipped"] and again["start_step"] == 6  # finished: reused, not retrained
    train_level(TinyEps(seed=5), train, held, cfg, tmp_path / "ext")
    _ckpt_equal(a, torch.load(tmp_path / "ext" / "checkpoint.pt", weights_only=True))


def test_learning_rate_warms_up_holds_and_decays_towards_zero(tmp_path):
    cfg = small_config(steps=20, lr=1e-2, warmup=4, decay=5)
    lrs = [learning_rate(cfg, step) for step in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4:15] == pytest.approx([1e-2] * 11)
    assert lrs[15:] == pytest.approx([1e-2 * k / 6 for k in (5, 4, 3, 2, 1)])  # each of the last 5 lower, none 0
    assert learning_rate(cfg.replace(decay=0), 19) == 1e-2

    train, held = toy_data()  # the optimiser runs with these rates (the log holds each row's last one)
    train_level(TinyEps(), train, held, cfg.replace(log_every=5, eval_every=None, checkpoint_every=None), tmp_path)
    logged = [float(r["lr"]) for r in read_csv(tmp_path / "log.csv")]
    assert logged == pytest.approx([lrs[4], lrs[9], lrs[14], lrs[19]])


def test_lambda_lr_and_averaged_model_give_the_documented_numbers_exactly():
    """The optimiser's rate is learning_rate's float, also where warm-up and decay overlap (a factor times lr
    would round differently there), and the AveragedModel EMA is the documented lerp, bit for bit."""
    from torch.optim.swa_utils import AveragedModel

    from multilevel_sde.diffusion.train.loop import ema_model, lr_scheduler

    cfg = small_config(steps=12, lr=3e-3, warmup=8, decay=8, ema_decay=0.9)
    model = TinyEps()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for start in (0, 5):  # a fresh run and one resumed at step 5
        scheduler = lr_scheduler(optimizer, cfg, start)
        rates = []
        for _ in range(start, cfg.steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert rates == [learning_rate(cfg, n) for n in range(start, cfg.steps)]

    ema = ema_model(model, cfg)
    assert isinstance(ema, AveragedModel) and not ema.training
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        ema.update_parameters(model)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        expected = [torch.lerp(e, p.detach(), 1.0 - decay) for e, p in zip(expected, model.parameters())]
        assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), expected)), step


def test_random_streams_keep_their_recorded_ids():
    """Every recorded result depends on these ids: they never change (multilevel_sde.random_streams)."""
    from multilevel_sde import random_streams as rs

    ids = {name: getattr(rs, name) for name in rs.__all__ if name.isupper()}
    assert ids == {"STREAM_COINS": 0, "STREAM_BROWNIAN": 1, "SAMPLE_INITIAL_NOISE": 10, "SAMPLE_BROWNIAN_PATH": 11,
                   "SAMPLE_COINS": 12, "TRAIN_BATCH_ORDER": 20, "TRAIN_TIMES": 21, "TRAIN_NOISE": 22,
                   "TRAIN_HELDOUT": 23, "LEVEL_DIFFERENCES": 24, "EXPERIMENT_SELECTION": 1_000_003}
    assert len(set(ids.values())) == len(ids)


def test_resuming_a_checkpoint_written_before_decay_existed_warns_of_nothing(tmp_path):
    train, held = toy_data()
    train_level(TinyEps(), train, held, small_config(steps=3), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["train_config"]["decay"]  # as written by an older version
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_level(TinyEps(), train, held, small_config(steps=6), tmp_path)
    with pytest.warns(UserWarning, match=r"'decay': \(0, 3\)"):
        train_level(TinyEps(), train, held, small_config(steps=9, decay=3), tmp_path)


def test_architecture_mismatch_and_changed_seed_are_clear_errors(tmp_path):
    train, held = toy_data()
    train_level(TinyEps(width=32), train, held, small_config(steps=3), tmp_path)
    with pytest.raises(ValueError, match=r"architecture mismatch.*'width': 32.*'width': 48.*differing: \['width'\]"):
        train_level(TinyEps(width=48), train, held, small_config(steps=6), tmp_path)
    with pytest.raises(ValueError, match="'width': 32"):
        load_checkpoint(tmp_path / "checkpoint.pt", TinyEps(width=16))
    with pytest.raises(ValueError, match="seed"):
        train_level(TinyEps(width=32), train, held, small_config(steps=6, seed=4), tmp_path)
    model = TinyEps(width=32, seed=7)  # another init seed is the same architecture
    load_checkpoint(tmp_path / "checkpoint.pt", model, ema=True)


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("batch_size", 0), ("ema_decay", 1.0), ("steps", 2.5),
                                         ("grad_clip", 0), ("autocast", "fp8"), ("distill_mix", 0.0),
                                         ("eval_every", 0), ("schedule", "quadratic"), ("seed", -3),
                                         ("decay", -1), ("decay", 5000)])
def test_bad_hyperparameters_name_argument_and_value(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be .*got {value!r}"):
        TrainConfig(**{field: value})


def test_missing_or_bad_data_and_device(tmp_path):
    train, held = toy_data()
    with pytest.raises(ValueError, match="train_data is missing"):
        train_level(TinyEps(), None, held, small_config(), tmp_path)
    with pytest.raises(ValueError, match="train_data is empty"):
        train_level(TinyEps(), torch.zeros(0, 1, 4, 4), held, small_config(), tmp_path)
    with pytest.raises(ValueError, match="batch_size=16 is larger than the training set"):
        train_level(TinyEps(), train.images[:8], held, small_config(), tmp_path)
    with pytest.raises(ValueError, match="heldout_data images have shape"):
        train_level(TinyEps(), train, torch.zeros(4, 1, 2, 2), small_config(), tmp_path)
    with pytest.raises(ValueError, match="device"):
        train_level(TinyEps(), train, held, small_config(device="nonsense"), tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            train_level(TinyEps(), train, held, small_config(device="cuda"), tmp_path)
    with pytest.raises(ValueError, match="out_dir"):
        train_level(TinyEps(), train, held, small_config(), None)


def test_bf16_autocast_and_no_heldout(tmp_path):
    train, _ = toy_data()
    s = train_level(TinyEps(), train, None, small_config(steps=4, autocast="bf16", device="cpu", progress=True), tmp_path)
    assert math.isfinite(s["final_loss"]) and s["final_heldout_loss"] is None
    assert load_level(tmp_path, model_factory=TinyEps)(train.images[:2], torch.tensor([5, 500])).dtype == \
        torch.float32


# ------------------------------------------------------------------------------------------------ distillation
def test_distillation_shrinks_level_difference(tmp_path):
    train, held = toy_data()
    teacher_cfg = small_config(steps=300, lr=3e-3, log_every=100, eval_every=300, checkpoint_every=None)
    train_level(TinyEps(width=96, seed=1), train, held, teacher_cfg, tmp_path / "teacher")
    teacher = load_level(tmp_path / "teacher", model_factory=TinyEps)
    cfg = small_config(steps=200, lr=1e-2, log_every=50, eval_every=50, checkpoint_every=None)
    plain = train_level(TinyEps(width=48, seed=2), train, held, cfg, tmp_path / "plain")
    dist = train_level(TinyEps(width=48, seed=2), train, held, cfg, tmp_path / "dist",
                       teacher=tmp_path / "teacher" / "checkpoint.pt", model_factory=TinyEps)
    assert dist["distilled"] and not plain["distilled"]
    rows = json.loads((tmp_path / "dist" / "log.json").read_text())["rows"]
    distill_heldout = [r["heldout_distill"] for r in rows if r["heldout_distill"] is not None]
    assert distill_heldout[-1] < distill_heldout[0]  # the distillation loss goes down
    students = [load_level(tmp_path / d, model_factory=TinyEps) for d in ("plain", "dist")]
    diffs = [level_differences([s, teacher], held, NoiseSchedule.cosine(), [50, 250, 500, 750, 950], n=32, seed=0)
             for s in students]
    gap_plain, gap_dist = diffs[0]["rms_mean"][1], diffs[1]["rms_mean"][1]
    # seed 0: 0.185 vs 0.270 (ratio 0.68; 0.61-0.72 over data/model seeds 0-3)
    assert gap_dist < 0.85 * gap_plain, (gap_plain, gap_dist)
    # a resumed distillation must keep the teacher: dropping it is an error
    with pytest.raises(ValueError, match="distilled"):
        train_level(TinyEps(width=48), train, held, cfg.replace(steps=250), tmp_path / "dist")


def test_level_differences_shapes_and_zero_for_equal_models():
    _, held = toy_data()
    a, b = TinyEps(seed=1), TinyEps(seed=2)
    d = level_differences([a, a, b], held, NoiseSchedule.cosine(100), [10, 90], n=8, seed=1)
    assert d["timesteps"] == [10, 90] and d["n"] == 8 and len(d["rms"]) == 3 and len(d["rms"][0]) == 2
    assert d["rms"][1] == [0.0, 0.0] and d["rms"][2][0] > 0 and d["rms_to_top"][2] == [0.0, 0.0]
    assert d == level_differences([a, a, b], held, NoiseSchedule.cosine(100), [10, 90], n=8, seed=1)
    with pytest.raises(ValueError, match="timesteps"):
        level_differences([a], held, NoiseSchedule.cosine(100), [0])


def test_ladder_distills_largest_first_and_reuses_finished_levels(tmp_path):
    train, held = toy_data()
    models = [TinyEps(width=8, seed=1), TinyEps(width=16, seed=2), TinyEps(width=32, seed=3)]
    cfg = small_config(steps=6, checkpoint_every=None)
    out = train_ladder(models, train, cfg, tmp_path, distill=True, heldout=held, report_n=16,
                       report_timesteps=[100, 900])
    assert [s["level"] for s in out] == [0, 1, 2]
    assert [s["distilled"] for s in out] == [True, True, False]
    assert out[0]["teacher"].endswith(os.path.join("level_1", "checkpoint.pt"))
    order = [json.loads((tmp_path / f"level_{i}" / "summary.json").read_text()) for i in range(3)]
    mtimes = [(tmp_path / f"level_{i}" / "checkpoint.pt").stat().st_mtime_ns for i in range(3)]
    assert mtimes[2] < mtimes[1] < mtimes[0]  # largest first
    for i in range(3):
        assert (tmp_path / f"level_{i}" / "log.csv").exists() and order[i]["steps"] == 6
    report = json.loads((tmp_path / "ladder.json").read_text())
    assert len(report["differences"]["rms"]) == 3 and out[1]["rms_to_previous"] > 0
    again = train_ladder(models, train, cfg, tmp_path, distill=True, heldout=held, report=False)
    assert all(s["skipped"] for s in again)
    assert [(tmp_path / f"level_{i}" / "checkpoint.pt").stat().st_mtime_ns for i in range(3)] == mtimes
    with pytest.raises(ValueError, match="distilled"):  # the same folders trained the other way: refused
        train_ladder(models, train, cfg.replace(steps=9), tmp_path, distill=False, heldout=held)


# ------------------------------------------------------------------------------------------------ real UNet + data
def test_unet_on_default_data_trains_loads_and_samples(tmp_path):
    from multilevel_sde.diffusion import sample
    from multilevel_sde.diffusion.data import default_dataset, split_dataset
    from multilevel_sde.diffusion.unet import SeparableUNet, build_unet

    train, held = split_dataset(default_dataset(16, limit=96), 16, seed=0)
    model = build_unet("cpu-xs", in_channels=1, image_size=16)
    s = train_level(model, train, held, small_config(steps=4, batch_size=8, eval_size=16), tmp_path)
    assert s["model_class"] == "SeparableUNet" and math.isfinite(s["final_heldout_loss"])
    ema = load_level(tmp_path)
    assert isinstance(ema, SeparableUNet) and ema.config == model.config
    result = sample(ema, (1, 16, 16), batch=2, steps=4, seed=0)
    assert result.images.shape == (2, 1, 16, 16) and torch.isfinite(result.images).all()
    with pytest.raises(ValueError, match="architecture mismatch.*base_channels"):
        train_level(build_unet("cpu-s", in_channels=1, image_size=16), train, held, small_config(steps=8), tmp_path)


# ------------------------------------------------------------------------------------------------ DDP
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) runs the CLI entry; each rank takes half of every global batch;
    the result matches a one-process run with the same global batch, and the ranks end with equal weights."""
    from multilevel_sde.diffusion.train import main

    args = ["--preset", "cpu-xs", "--data", "default", "--limit", "64", "--image-size", "16", "--steps", "6",
            "--batch-size", "8", "--log-every", "3", "--eval-every", "3", "--eval-size", "16", "--warmup", "0",
            "--checkpoint-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval", "0.1", "-m", "multilevel_sde.diffusion.train", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["ranks_in_sync"] is True
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-6)
    for ra, rb in zip(a["log"], b["log"]):
        assert ra["step"] == rb["step"]
        for col in ("loss", "heldout_loss"):
            assert ra[col] == pytest.approx(rb[col], rel=1e-5)
