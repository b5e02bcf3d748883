"""Reliability (issue #17): no silent wrong result, no lost file, no hang -- one class of fault per section.

Every file the commands write is written atomically (a kill leaves the old file and no temporary that outlives
the next start), run folders are locked against a second writer, SIGINT/SIGTERM during training save a
checkpoint and exit 130/143, damaged inputs of every kind are refused (or rebuilt) with a message naming the
file, and every command-line error is one line with status 2. ``tests/probe_faults.py`` tries more cases of
each class and prints a tally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde
from multilevel_sde import files
from multilevel_sde.cli import main

from multilevel_sde.diffusion.train import (DamagedFileError, load_checkpoint, load_ladder, load_level,
                                            save_checkpoint, trained_schedule)

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "cpu-xs", "--data", "default", "--limit", "32", "--image-size", "16", "--batch-size", "8",
         "--eval-size", "8", "--eval-every", "0", "--log-every", "1", "--warmup", "0", "--no-progress"]


def _train(out, *extra) -> int:
    return main(["train", *TRAIN, "--steps", "2", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained levels: ``lin`` (linear schedule, T = 100) and ``cos`` (the default cosine, T = 1000)."""
    root = tmp_path_factory.mktemp("runs")
    assert _train(root / "lin", "--schedule", "linear", "--T", "100") == 0
    assert _train(root / "cos") == 0
    return root


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in Path(folder).rglob("*.tmp-*")]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != files.LOCK_NAME}


# -- 1. sampling uses the schedule the networks were trained with ---------------------------------------
def test_loaded_levels_carry_their_training_schedule(runs):
    model = load_level(runs / "lin")
    assert model.noise_schedule.kind == "linear" and model.noise_schedule.T == 100
    assert trained_schedule([model]).T == 100
    with pytest.raises(ValueError, match=r"mixes noise schedules.*lin.*linear \(T=100\).*cos.*cosine \(T=1000\)"):
        load_ladder([runs / "lin", runs / "cos"])
    from multilevel_sde.diffusion.sample import sample

    result = sample(model, (1, 8, 8), batch=2, steps=5, seed=0, progress=False)  # Python: no schedule given
    assert result.settings["schedule"] == "linear"


def test_mlsde_sample_uses_the_training_schedule_and_refuses_another(runs, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", str(runs / "lin"), "--steps", "5", "--batch", "2", "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["schedule"] == {"kind": "linear", "T": 100} and record["settings"]["schedule"] == "linear"
    # untyped --steps is capped at the schedule's T
    assert main(["sample", str(runs / "lin"), "--batch", "1", "--no-progress", "--out", str(tmp_path / "t.png")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["settings"]["steps"] == 100
    capsys.readouterr()
    assert main(["sample", str(runs / "lin"), "--schedule", "cosine", "--steps", "5", "--no-progress",
                 "--out", str(tmp_path / "u.png")]) == 2
    _one_error_line(capsys.readouterr().err, "--schedule cosine", "linear, T=100", str(runs / "lin"))
    assert main(["sample", str(runs / "lin"), "--T", "1000", "--steps", "5", "--no-progress",
                 "--out", str(tmp_path / "u.png")]) == 2
    assert not (tmp_path / "u.png").exists()


def test_experiment_samples_with_the_training_schedule(runs, tmp_path):
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig

    models = [load_level(runs / "lin"), load_level(runs / "lin")]
    small = dict(heldout=2, select=2, batch=2, em_steps=(5,), reference_steps=10, mlem_steps=(10,), p_top=(0.5,),
                 learn_grid=10, tstitch_steps=(10,))
    exp = Experiment(models, (1, 16, 16), ExperimentConfig(**small), tmp_path / "e", progress=False)
    assert exp.schedule.kind == "linear" and exp.schedule.T == 100
    assert exp.config.schedule == "linear" and exp.config.T == 100
    with pytest.raises(ValueError, match=r"not the one the networks were trained with \(linear, T=100\)"):
        Experiment(models, (1, 16, 16), ExperimentConfig(schedule="cosine", **small), tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match=r"reference_steps=1000 exceeds the 100 steps"):
        Experiment(models, (1, 16, 16), ExperimentConfig(heldout=2, select=2, batch=2), tmp_path / "g",
                   progress=False)


def test_a_nested_checkpoint_still_expands_and_carries_its_schedule(tmp_path):
    from multilevel_sde.diffusion.nested import NestedUNet
    from multilevel_sde.diffusion.train import TrainConfig

    net = NestedUNet(in_channels=1, widths=(2, 4), num_downsamples=1, bottom_depth=1, mid_depth=1)
    save_checkpoint(tmp_path / "n.pt", net, config=TrainConfig(schedule="linear", T=50),
                    extra={"data": {"shape": [4, 1, 8, 8]}})
    models, names, shape = load_ladder([tmp_path / "n.pt"])
    assert len(models) == 2 and shape == (1, 8, 8) and names == ["width 2", "width 4"]
    assert all(m.noise_schedule.T == 50 for m in models) and trained_schedule(models).kind == "linear"


# -- 2. low-precision and integer states are refused, not silently frozen -----------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_low_precision_or_integer_states_are_refused(dtype):
    f = lambda t, y: -y  # noqa: E731
    drift = mlsde.MultilevelDrift([f, f], [1, 1], costs=[1, 2])
    with pytest.raises(TypeError, match=rf"y0 .*{dtype}"):
        mlsde.odeint(drift, torch.ones(1, 1, dtype=dtype), torch.tensor([0.0, 1.0]), options={"step_size": 1e-3})
    with pytest.raises(TypeError, match=rf"y0 .*{dtype}"):
        mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0), torch.ones(1, 1, dtype=dtype), torch.tensor([0.0, 1.0]),
                     dt=1e-2)
    # float32 moves as exact Euler does
    y = mlsde.odeint(drift, torch.ones(1, 1), torch.tensor([0.0, 1.0]), options={"step_size": 1e-3})
    assert abs(float(y[-1]) - 0.999 ** 1000) < 1e-4


# -- 3. checksums: a flipped byte inside a tensor is caught on load -----------------------------------
def _flip_inside_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset
    name_len, extra_len = int.from_bytes(raw[start + 26:start + 28], "little"), int.from_bytes(
        raw[start + 28:start + 30], "little")
    offset = start + 30 + name_len + extra_len + info.file_size // 2
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_tensor_is_refused_naming_the_file(runs, tmp_path, capsys):
    path = tmp_path / "c.pt"
    path.write_bytes((runs / "cos" / "checkpoint.pt").read_bytes())
    assert load_checkpoint(path)["checksum"]["algorithm"] == "sha256"
    _flip_inside_largest_tensor(path)
    with pytest.raises(DamagedFileError, match=rf"{path.name}.*checksum"):
        load_level(path)
    assert main(["sample", str(path), "--steps", "2", "--no-progress", "--out", str(tmp_path / "x.png")]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "damaged")


def test_a_checkpoint_without_a_checksum_still_loads(runs, tmp_path):
    ckpt = torch.load(runs / "cos" / "checkpoint.pt", weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_level(tmp_path / "old.pt").noise_schedule.kind == "cosine"


# -- 4. images of every PIL mode convert over their full range ----------------------------------------
def _ramp(mode: str):
    from PIL import Image

    u = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
    if mode in ("I;16", "I", "F"):
        im = Image.fromarray(u.astype(np.float32) if mode == "F" else
                             (u * 65535).round().astype(np.uint16 if mode == "I;16" else np.int32))
        assert im.mode == mode
        return im, u
    grey = Image.fromarray((u * 255).round().astype(np.uint8))
    if mode == "La":
        return grey.convert("LA").convert("La"), u
    return grey.convert(mode), u


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "LA", "La", "1", "P", "RGB", "RGBA", "CMYK", "LAB"])
def test_every_image_mode_converts_without_clipping(mode, tmp_path, monkeypatch):
    """A file in any PIL mode decodes to 8-bit grey over its full range (16/32-bit and float scaled, not
    clipped). Each ramp is saved as a lossless TIFF; "La", which no PIL writer takes, is handed to the decoder
    by ``Image.open`` as it would be by a plugin that decodes to it."""
    from PIL import Image

    from multilevel_sde.diffusion.images import decode_files

    im, u = _ramp(mode)
    path = tmp_path / "ramp.tif"
    if mode == "La":
        opened = Image.open
        monkeypatch.setattr(Image, "open", lambda fp, *a, **k: im.copy() if str(fp) == str(path) else
                            opened(fp, *a, **k))
        path.write_bytes(b"")
    else:
        im.save(path)
        with Image.open(path) as back:
            assert back.mode == mode
    decoded, skipped = decode_files([str(path)], 16, "none", 1, strict=True, progress=False, workers=1, desc="")
    assert skipped == [] and decoded.shape == (1, *u.shape, 1)
    got = decoded[0, :, :, 0].astype(np.float64) / 255.0
    if mode == "1":  # one bit: dark and light halves
        assert got.min() == 0.0 and got.max() == 1.0 and 0.3 < got.mean() < 0.7
    else:
        tolerance = 0.03 if mode in ("CMYK", "LAB") else 1.5 / 255
        assert np.abs(got - u).max() <= tolerance, (mode, np.abs(got - u).max())


def test_a_16_bit_png_folder_loads_its_full_range(tmp_path):
    from multilevel_sde.diffusion.data import folder_dataset

    for i in range(2):
        _ramp("I;16")[0].save(tmp_path / f"r{i}.png")
    images = folder_dataset(tmp_path, image_size=16, progress=False).images
    assert (images >= 0.99).float().mean() < 0.05 and abs(float(images.mean())) < 0.05


# -- 5. conflicting arguments -----------------------------------------------------------------------
def test_gridbrownian_refuses_times_with_t0_t1_dt():
    with pytest.raises(ValueError, match=r"either times= or t0=, t1=, dt=, not both.*t0=0, t1=5, dt=0\.1"):
        mlsde.GridBrownian(times=[0.0, 1.0], size=(1, 1), t0=0, t1=5, dt=0.1)


# -- 6. no command overwrites a file it did not write ---------------------------------------------------
def test_no_command_overwrites_a_file_it_did_not_write(runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("log.json", "log.csv", "summary.json", "results.json", "mine.json"):
        (run / name).write_text('{"mine": 1}\n')
    before = _snapshot(run)
    assert main(["sample", str(runs / "cos"), "--steps", "2", "--no-progress", "--out", str(run / "log.png")]) == 2
    _one_error_line(capsys.readouterr().err, "log.json", "not written by this command")
    assert main(["toy", "--k", "2", "--paths", "4", "--json", str(run / "mine.json")]) == 2
    _one_error_line(capsys.readouterr().err, "mine.json")
    assert _train(run) == 2
    _one_error_line(capsys.readouterr().err, "log.csv", "not written by training")
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig

    with pytest.raises(ValueError, match="results.json.*not an experiment"):
        Experiment([load_level(runs / "cos")] * 2, (1, 16, 16), ExperimentConfig(), run, progress=False)
    assert _snapshot(run) == before
    # a command's own earlier output is replaced
    out = tmp_path / "again.png"
    for _ in range(2):
        assert main(["sample", str(runs / "cos"), "--steps", "2", "--batch", "1", "--no-progress",
                     "--out", str(out)]) == 0
    assert main(["toy", "--k", "2", "--paths", "4", "--json", str(tmp_path / "t.json")]) == 0
    assert main(["toy", "--k", "2", "--paths", "4", "--json", str(tmp_path / "t.json")]) == 0


# -- 7. atomic writes: a kill at the worst moment (just before the rename) loses nothing -----------------
def _die_before_rename(monkeypatch):
    def replace(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill between writing the temporary and renaming it leaves behind

    monkeypatch.setattr(files.os, "replace", replace)


def test_a_kill_during_any_write_of_the_commands_leaves_the_old_files(runs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    run = work / "run"
    assert _train(run) == 0
    assert main(["sample", str(run), "--steps", "2", "--batch", "1", "--no-progress",
                 "--out", str(work / "s.png")]) == 0
    assert main(["toy", "--k", "2", "--paths", "4", "--json", str(work / "toy.json")]) == 0
    exp = work / "exp"
    exp.mkdir()
    (exp / "results.json").write_text(json.dumps({"title": "t", "points": [], "thresholds": {}, "notes": []}))
    assert main(["rescore", str(exp)]) == 0
    before = _snapshot(work)
    commands = [["train", *TRAIN, "--steps", "4", "--out", str(run)],  # checkpoint, logs, summary
                ["sample", str(run), "--steps", "2", "--batch", "1", "--no-progress", "--out", str(work / "s.png")],
                ["toy", "--k", "2", "--paths", "4", "--json", str(work / "toy.json")],
                ["rescore", str(exp)]]  # results.json, report.md
    for command in commands:
        with monkeypatch.context() as m:
            _die_before_rename(m)
            assert main(command) == 130, command
        assert _snapshot(work) == before, command
        _no_temporaries(work)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2


def test_atomic_write_keeps_the_old_file_on_any_failure(tmp_path):
    path = tmp_path / "f.json"
    files.atomic_write_json(path, {"a": 1})

    def half(fh):
        fh.write(b'{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, half)
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    _no_temporaries(tmp_path)


# -- 8. one writer per run folder -----------------------------------------------------------------------
def _start_training(out: Path, steps: int = 100000) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "multilevel_sde.cli", "train", *TRAIN, "--steps", str(steps),
                             "--checkpoint-every", "0", "--out", str(out)], env=env, cwd=out.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"training did not start: {out[-2000:]} {err[-2000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_second_writer_refused_and_signals_save_a_resumable_checkpoint(signum, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start_training(out)
    try:
        _wait_for(out / "log.csv", proc)
        if signum == signal.SIGINT:  # a second `mlsde train` on the same --out is refused, touching nothing
            capsys.readouterr()
            assert _train(out) == 2
            _one_error_line(capsys.readouterr().err, "in use by another run", f"pid {proc.pid}")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    _one_error_line(stderr, signal.Signals(signum).name, "saved", "resume with: mlsde train")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    step = ckpt["step"]
    assert step >= 1 and not ckpt["finished"]
    _no_temporaries(out)
    if signum == signal.SIGINT:  # resuming continues from it, bit-identically to an uninterrupted run
        assert main(["train", *TRAIN, "--steps", str(step + 2), "--out", str(out)]) == 0
        assert main(["train", *TRAIN, "--steps", str(step + 2), "--out", str(tmp_path / "straight")]) == 0
        a = load_checkpoint(out / "checkpoint.pt")
        b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
        assert a["checksum"] == b["checksum"]
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_the_lock_is_per_folder_and_reentrant_in_one_process(tmp_path):
    with files.FolderLock(tmp_path / "a", "test"):
        with files.FolderLock(tmp_path / "a", "nested"):  # the same process may take its own lock again
            pass
        code = ("import sys; from multilevel_sde.files import FolderLock, FolderLockedError\n"
                f"try:\n FolderLock({str(tmp_path / 'a')!r}).acquire()\nexcept FolderLockedError as e:\n"
                " print(e); sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 3 and "in use by another run" in done.stdout
        files.FolderLock(tmp_path / "b").acquire().release()
    files.FolderLock(tmp_path / "a").acquire().release()  # released with its holder


# -- 10. a kill mid-save leaves a temporary that the next start removes ----------------------------------
def test_a_sigkill_mid_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = ("import time; from multilevel_sde.files import atomic_write\n"
            f"atomic_write({str(out / 'checkpoint.pt')!r}, lambda fh: (fh.write(b'x' * 100), fh.flush(), "
            "time.sleep(120)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    tmp = out / f".checkpoint.pt.tmp-{proc.pid}"
    try:
        _wait_for(tmp, proc, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert tmp.exists() and not (out / "checkpoint.pt").exists()
    assert _train(out) == 0
    _no_temporaries(out)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


# -- 11. out-of-range Brownian queries fail at once ----------------------------------------------------
@pytest.mark.parametrize("span", ["past the end", (-1, 3), (5, 2), (0.5, 3)])
def test_gridbrownian_increments_out_of_range_fail_fast(span):
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.1, size=(1, 1), seed=0)
    n = bm.num_steps
    span = (0, n + 1) if span == "past the end" else span
    with pytest.raises(IndexError, match=rf"increments\(.*0 <= start <= stop <= {n}"):
        bm.increments(*span)
    assert bm.increments(0, n).shape == (1, 1)


# -- 12. damaged inputs are named, with what to do --------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoints_name_the_file_and_the_remedy(damage, runs, tmp_path, capsys):
    data = (runs / "cos" / "checkpoint.pt").read_bytes()
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096)}[damage])
    damaged = path.read_bytes()
    with pytest.raises(DamagedFileError, match=rf"{path.name}.*damaged.*re-run the training"):
        load_checkpoint(path)
    assert main(["sample", str(path), "--steps", "2", "--no-progress", "--out", str(tmp_path / "x.png")]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "damaged")
    assert _train(path.parent) == 2  # resuming from it: the same message, nothing overwritten
    _one_error_line(capsys.readouterr().err, str(path), "damaged")
    assert path.read_bytes() == damaged


@pytest.mark.parametrize("content", ["", '{"title": "t", "points": [{"sampler"'])
def test_a_damaged_results_json_names_the_file_and_says_rerun(content, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content)
    assert main(["rescore", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "results.json"), "re-run the experiment")


def test_a_damaged_learned_file_is_refitted_not_fatal(runs, tmp_path, monkeypatch):
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig(heldout=2, select=2, batch=2, deltas=())  # no sweep after the fit: nothing to sample
    exp = Experiment([load_level(runs / "cos")] * 2, (1, 16, 16), config, tmp_path, progress=False)
    (tmp_path / "learned_ddpm.json").write_text('{"a": [0.1, ')
    fit = dict(a=[0.0, 0.0], b=[0.0, 0.0], floor=0.01, time_scale=1.0, config_key=exp.key)
    monkeypatch.setattr(exp, "fit", lambda sampler: dict(fit))
    with pytest.warns(UserWarning, match=r"learned_ddpm\.json.*damaged.*fitting the probabilities again"):
        assert exp.learned("ddpm", None)["config_key"] == exp.key
    assert json.loads((tmp_path / "learned_ddpm.json").read_text()) == fit


def test_a_cut_line_of_points_jsonl_is_measured_again(runs, tmp_path):
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig(heldout=2, select=2, batch=2)
    exp = Experiment([load_level(runs / "cos")] * 2, (1, 16, 16), config, tmp_path, progress=False)
    good = [json.dumps({"sampler": "ddpm", "label": label, "config_key": exp.key}) for label in ("x", "y")]
    (tmp_path / "points.jsonl").write_text("\n".join(good) + "\n" + good[0][:20])
    again = Experiment([load_level(runs / "cos")] * 2, (1, 16, 16), config, tmp_path, progress=False)
    assert again.cached_points == 2  # the two whole lines are reused; the cut one is measured again


# -- 13. an invalid --out fails before any work -----------------------------------------------------------
def test_an_invalid_out_fails_before_any_work(runs, tmp_path, monkeypatch, capsys):
    import multilevel_sde.diffusion.data as data
    import multilevel_sde.diffusion.train as train

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(data, "load_dataset", no_work)
    monkeypatch.setattr(train, "load_level", no_work)
    monkeypatch.setattr(train, "load_ladder", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["train", *TRAIN, "--steps", "300", "--out", str(a_file)], "is a file"),
             (["train", *TRAIN, "--steps", "300", "--out", str(a_file / "sub")], "cannot write into --out"),
             (["sample", str(runs / "cos"), "--out", str(tmp_path / "noext")], "must name an image file"),
             (["sample", str(runs / "cos"), "--out", str(a_file / "x.png")], "is a file"),
             (["experiment", str(runs / "cos"), "--out", str(a_file)], "is a file"),
             (["toy", "--json", str(a_file / "t.json")], "is a file")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        _one_error_line(capsys.readouterr().err, needle)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_fails_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert _train(out) == 2
        _one_error_line(capsys.readouterr().err, "cannot write into --out")
    finally:
        out.chmod(0o700)


# -- 14. every command-line error is one line with status 2 ----------------------------------------------
def test_bad_data_specs_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "img.png"
    _ramp("L")[0].save(a_file)
    assert main(["train", "--preset", "cpu-xs", "--data", f"folder:{a_file}", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, str(a_file))
    one = tmp_path / "one"
    one.mkdir()
    _ramp("L")[0].save(one / "a.png")
    assert main(["train", "--preset", "cpu-xs", "--data", f"folder:{one}", "--image-size", "16", "--steps", "1",
                 "--no-progress", "--out", str(tmp_path / "o2")]) == 2
    _one_error_line(capsys.readouterr().err, "only 1 image")


def test_usage_errors_of_train_are_one_line_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, "give --preset")


# -- 15. messages name the flag ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["sample", "RUN", "--probs", "1,abc"], "--probs"),
    (["experiment", "RUN", "--out", "OUT", "--em-steps", "10,abc"], "--em-steps"),
    (["experiment", "RUN", "--out", "OUT", "--heldout", "0"], "--heldout"),
    (["experiment", "RUN", "--out", "OUT", "--p-top", "0.5,2"], "--p-top"),
    (["toy", "--d", "0"], "--d"),
    (["toy", "--paths", "0"], "--paths"),
    (["train", *TRAIN, "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    (["train", *TRAIN, "--out", "OUT", "--lr", "-1"], "--lr"),
    (["sample", "RUN", "--steps", "0"], "--steps"),
])
def test_bad_values_name_their_flag(argv, flag, runs, tmp_path, capsys):
    argv = [str(runs / "cos") if a == "RUN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    if argv[0] == "sample":
        argv += ["--no-progress", "--out", str(tmp_path / "s.png")]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, flag)


# -- 16. library argument errors name the argument ------------------------------------------------------------
def test_solver_argument_errors_name_the_argument():
    f = lambda t, y: -y  # noqa: E731
    ts = torch.tensor([0.0, 1.0])
    with pytest.raises(TypeError, match="options must be a dict"):
        mlsde.odeint(f, torch.ones(1, 1), ts, options=[1, 2])
    sde = mlsde.MultilevelSDE(mlsde.MultilevelDrift([f, f], [0.5, 1.0], costs=[1, 2]), lambda t, y: torch.ones(3, 2, 5))
    with pytest.raises(ValueError, match=r"diffusion g\(t, y\) must return shape \(3, 2\)"):
        mlsde.sdeint(sde, torch.ones(3, 2), ts, dt=0.1)
    sde = mlsde.MultilevelSDE(f, lambda t, y: torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match="diffusion"):
        mlsde.sdeint(sde, torch.ones(3, 2), ts, dt=0.1)
    drift = mlsde.MultilevelDrift([f, f], [0.5, 1.0], costs=[1, 2], coupling="sample")
    y = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"\(batch,\) tensor of per-sample times \(batch 4\), got shape \(3,\)"):
        drift.sample(torch.zeros(3), y, 0.1)
    with pytest.raises(TypeError, match="t must be a number"):
        drift.sample("a", y, 0.1)
    drift.sample(0.5, y, 0.1), drift.sample(0.5, y, 0.1)  # the steady (fast) path refuses them too
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="t must be a finite number"):
            drift.sample(bad, y, 0.1)
    for bad in (torch.tensor(float("nan")), torch.tensor(float("-inf"))):  # 0-d tensors too, on the steady path
        with pytest.raises(ValueError, match="t must be finite"):
            drift.sample(bad, y, 0.1)


# -- 17. very long solves say what their set-up costs, or refuse at once -----------------------------------
def test_long_solves_warn_with_their_memory_or_refuse_before_allocating(monkeypatch):
    import multilevel_sde.integrate as integrate

    sde = mlsde.MultilevelSDE(lambda t, y: -y, 1.0)
    ts = torch.tensor([0.0, 1.0])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"sdeint: 1,000,000,000,000 steps would need about .* GiB"):
        mlsde.sdeint(sde, torch.ones(1, 1), ts, dt=1e-12)
    with pytest.raises(ValueError, match=r"odeint: .* steps would need"):
        mlsde.odeint(lambda t, y: -y, torch.ones(1, 1), ts, options={"step_size": 1e-12})
    assert time.perf_counter() - start < 5
    monkeypatch.setattr(integrate, "LONG_SOLVE_STEPS", 100)
    with pytest.warns(UserWarning, match=r"sdeint: 1,000 steps: setting up .* GiB and .* s before the first step"):
        mlsde.sdeint(sde, torch.ones(1, 1), ts, dt=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlsde.sdeint(sde, torch.ones(1, 1), ts, dt=0.1)


def test_a_ladder_folder_reads_level_0_to_n_only(runs, tmp_path):
    """A backup copy (level_2.bak) is not a level, and a missing level is an error, not a shorter ladder."""
    import shutil

    for i in range(3):
        shutil.copytree(runs / "cos", tmp_path / f"level_{i}")
    shutil.copytree(runs / "cos", tmp_path / "level_2.bak")
    models, names, _ = load_ladder(tmp_path)
    assert len(models) == 3 and [n.split()[0] for n in names] == ["level_0", "level_1", "level_2"]
    shutil.rmtree(tmp_path / "level_1")
    with pytest.raises(ValueError, match=r"level folders \[0, 2\], not 0..1"):
        load_ladder(tmp_path)
