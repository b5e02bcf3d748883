"""Adversarial probe of issue #17's fault classes: tries many cases per class and prints tried / good / bad.

    OMP_NUM_THREADS=1 python tests/probe_faults.py            # every class (about 1-2 minutes on 2 CPU cores)
    OMP_NUM_THREADS=1 python tests/probe_faults.py 3 12 15    # some classes

Not collected by pytest (``tests/test_faults.py`` holds one test per class); each case here is a variation the
tests do not spell out. A case is *good* when the fault is refused with a message naming what is wrong (the
argument, flag or file), nothing is lost, nothing hangs; *bad* otherwise (its reason is printed). The exit status is
the number of bad cases (capped at 100).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import multilevel_sde as mlsde  # noqa: E402
from multilevel_sde import files  # noqa: E402
from multilevel_sde.cli import main  # noqa: E402

CLASSES = {1: "training schedule used by sampling", 2: "low-precision / integer states", 3: "checkpoint checksums",
           4: "image modes", 5: "conflicting arguments", 6: "no overwrite of others' files", 7: "atomic writes",
           8: "one writer per run folder", 9: "signals during training", 10: "stale temporaries",
           11: "Brownian index range", 12: "damaged inputs named", 13: "invalid --out before work",
           14: "one-line CLI errors", 15: "flags named", 16: "library arguments named", 17: "long solves"}
CASES: list = []
TRAIN = ["--preset", "cpu-xs", "--data", "default", "--limit", "32", "--image-size", "16", "--batch-size", "8",
         "--eval-size", "8", "--eval-every", "0", "--log-every", "1", "--warmup", "0", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def case(klass: int, name: str):
    def register(fn):
        CASES.append((klass, name, fn))
        return fn
    return register


class Bad(Exception):
    pass


def check(condition, why: str) -> None:
    if not condition:
        raise Bad(why)


def cli(*argv) -> tuple[int, str]:
    """``mlsde ARGV`` in this process: (status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, err.getvalue()


def one_line(err: str, *needles) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    check(len(lines) == 1 and "Traceback" not in err, f"not one line: {err.strip()[:300]!r}")
    for needle in needles:
        check(str(needle) in lines[0], f"{needle!r} missing from {lines[0][:300]!r}")


def refused(status_err, *needles) -> None:
    code, err = status_err
    check(code == 2, f"status {code}, stderr {err.strip()[:300]!r}")
    one_line(err, *needles)


def raises(kind, fn, *needles) -> None:
    try:
        fn()
    except kind as err:
        for needle in needles:
            check(needle in str(err), f"{needle!r} missing from {str(err)[:300]!r}")
        return
    except Exception as err:  # noqa: BLE001
        raise Bad(f"{type(err).__name__} instead of {kind.__name__}: {str(err)[:200]}") from None
    raise Bad(f"no {kind.__name__}")


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != files.LOCK_NAME}


def temporaries(folder: Path) -> list:
    return [p.name for p in Path(folder).rglob("*.tmp-*")]


# -- shared runs -----------------------------------------------------------------------------------------------
WORK = Path(tempfile.mkdtemp(prefix="probe-faults-"))
_RUNS: dict = {}


def run(name: str, *extra) -> Path:
    """A tiny trained cpu-xs level (2 steps), made once per name."""
    if name not in _RUNS:
        out = WORK / "runs" / name
        code, err = cli("train", *TRAIN, "--steps", "2", "--out", out, *extra)
        assert code == 0, err
        _RUNS[name] = out
    return _RUNS[name]


def lin() -> Path:
    return run("lin", "--schedule", "linear", "--T", "100")


def cos() -> Path:
    return run("cos")


def fresh(name: str) -> Path:
    path = WORK / "cases" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- 1 ---------------------------------------------------------------------------------------------------------
@case(1, "sample: untyped schedule is the checkpoint's (linear, T=100)")
def _():
    out = fresh("s1") / "a.png"
    code, err = cli("sample", lin(), "--steps", "4", "--batch", "1", "--no-progress", "--out", out)
    check(code == 0, err)
    check(json.loads(out.with_suffix(".json").read_text())["schedule"] == {"kind": "linear", "T": 100}, "schedule")


@case(1, "sample: --schedule linear typed (agrees) is accepted")
def _():
    code, err = cli("sample", lin(), "--schedule", "linear", "--steps", "4", "--batch", "1", "--no-progress",
                    "--out", fresh("s2") / "a.png")
    check(code == 0, err)


for _typed in (["--schedule", "cosine"], ["--T", "1000"], ["--schedule", "linear", "--T", "50"]):
    @case(1, f"sample: a typed {' '.join(_typed)} that differs is refused naming the file")
    def _(typed=_typed):
        refused(cli("sample", lin(), *typed, "--steps", "4", "--no-progress", "--out", fresh("s3") / "a.png"),
                lin())


@case(1, "load_ladder: levels of different schedules refused naming both files")
def _():
    from multilevel_sde.diffusion.train import load_ladder

    raises(ValueError, lambda: load_ladder([cos(), lin()]), str(cos()), str(lin()))


@case(1, "experiment: a ladder folder of mixed schedules refused (mlsde experiment)")
def _():
    folder = fresh("mix")
    shutil.copytree(cos(), folder / "level_0")
    shutil.copytree(lin(), folder / "level_1")
    refused(cli("experiment", folder, "--out", fresh("mixout")), "level_1")


@case(1, "Experiment: default config samples with the ladder's linear T=100")
def _():
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig
    from multilevel_sde.diffusion.train import load_level

    config = ExperimentConfig(heldout=2, select=2, batch=2, em_steps=(5,), reference_steps=10, mlem_steps=(10,),
                              learn_grid=10, tstitch_steps=(10,))
    exp = Experiment([load_level(lin())] * 2, (1, 16, 16), config, fresh("e1"), progress=False)
    check(exp.schedule.kind == "linear" and exp.schedule.T == 100, str(exp.schedule.kind))


@case(1, "Experiment: an explicit cosine config on a linear ladder is refused")
def _():
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig
    from multilevel_sde.diffusion.train import load_level

    raises(ValueError, lambda: Experiment([load_level(lin())] * 2, (1, 16, 16), ExperimentConfig(schedule="cosine"),
                                          fresh("e2"), progress=False), "linear, T=100")


@case(1, "nested checkpoint: expands to its widths, each with the schedule")
def _():
    from multilevel_sde.diffusion.nested import NestedUNet
    from multilevel_sde.diffusion.train import TrainConfig, load_ladder, save_checkpoint

    net = NestedUNet(in_channels=1, widths=(2, 3, 4), num_downsamples=1, bottom_depth=1, mid_depth=1)
    path = fresh("n") / "checkpoint.pt"
    save_checkpoint(path, net, config=TrainConfig(schedule="linear", T=40), extra={"data": {"shape": [2, 1, 8, 8]}})
    models, _, _ = load_ladder([path])
    check(len(models) == 3 and all(m.noise_schedule.T == 40 for m in models), "nested levels")


# -- 2 ---------------------------------------------------------------------------------------------------------
for _dtype in (torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.bool, torch.complex64):
    for _solver in ("odeint", "sdeint"):
        @case(2, f"{_solver} with a {_dtype} state is refused naming y0")
        def _(dtype=_dtype, solver=_solver):
            f = lambda t, y: -y  # noqa: E731
            drift = mlsde.MultilevelDrift([f, f], [1, 0.5][::-1], costs=[1, 2])
            y0 = torch.ones(2, 1, dtype=dtype)
            ts = torch.tensor([0.0, 1.0])
            if solver == "odeint":
                raises(TypeError, lambda: mlsde.odeint(drift, y0, ts, options={"step_size": 1e-3}), "y0")
            else:
                raises(TypeError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.5), y0, ts, dt=1e-2), "y0")


for _dtype in (torch.float32, torch.float64):
    @case(2, f"odeint in {_dtype} moves like exact Euler")
    def _(dtype=_dtype):
        f = lambda t, y: -y  # noqa: E731
        y = mlsde.odeint(mlsde.MultilevelDrift([f, f], [1, 1], costs=[1, 2]), torch.ones(1, 1, dtype=dtype),
                         torch.tensor([0.0, 1.0], dtype=dtype), options={"step_size": 1e-3})
        check(abs(float(y[-1]) - 0.999 ** 1000) < 1e-4, f"{float(y[-1])}")


# -- 3 ---------------------------------------------------------------------------------------------------------
def _flip(path: Path, entry_pick: str, where: float) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = sorted((i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 8),
                         key=lambda i: i.header_offset)
    info = {"first": entries[0], "last": entries[-1], "largest": max(entries, key=lambda i: i.file_size)}[entry_pick]
    raw = bytearray(path.read_bytes())
    s = info.header_offset
    offset = s + 30 + int.from_bytes(raw[s + 26:s + 28], "little") + int.from_bytes(raw[s + 28:s + 30], "little")
    raw[offset + min(int(where * info.file_size), info.file_size - 1)] ^= 0x01
    path.write_bytes(bytes(raw))


for _pick in ("first", "last", "largest"):
    for _where in (0.0, 0.5, 0.999):
        @case(3, f"a flipped bit in the {_pick} tensor at {_where:.0%} is refused naming the file")
        def _(pick=_pick, where=_where):
            from multilevel_sde.diffusion.train import load_level

            path = fresh(f"flip-{pick}-{where}") / "checkpoint.pt"
            shutil.copy(cos() / "checkpoint.pt", path)
            _flip(path, pick, where)
            raises(ValueError, lambda: load_level(path), str(path), "checksum")


@case(3, "mlsde sample on a flipped checkpoint: one line, status 2")
def _():
    path = fresh("flip-cli") / "checkpoint.pt"
    shutil.copy(cos() / "checkpoint.pt", path)
    _flip(path, "largest", 0.3)
    refused(cli("sample", path, "--steps", "2", "--no-progress", "--out", path.parent / "x.png"), path)


@case(3, "a checkpoint without a checksum (older) still loads")
def _():
    from multilevel_sde.diffusion.train import load_level

    ckpt = torch.load(cos() / "checkpoint.pt", weights_only=True)
    ckpt.pop("checksum")
    path = fresh("old") / "checkpoint.pt"
    torch.save(ckpt, path)
    load_level(path)


# -- 4 ---------------------------------------------------------------------------------------------------------
def _ramp_image(mode: str):
    from PIL import Image

    u = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)
    if mode in ("I;16", "I", "F"):
        arr = u.astype(np.float32) if mode == "F" else (u * 65535).round().astype(
            np.uint16 if mode == "I;16" else np.int32)
        return Image.fromarray(arr), u
    if mode == "I;16B":
        return Image.fromarray((u * 65535).round().astype(">u2")), u
    grey = Image.fromarray((u * 255).round().astype(np.uint8))
    return (grey.convert("LA").convert("La") if mode == "La" else grey.convert(mode)), u


for _mode, _suffix in (("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif"), ("I", ".tif"), ("F", ".tif"),
                       ("L", ".png"), ("LA", ".png"), ("La", ".tif"), ("P", ".png"), ("RGB", ".png"),
                       ("RGBA", ".png"), ("RGB", ".jpg"), ("CMYK", ".jpg"), ("CMYK", ".tif"), ("YCbCr", ".jpg"),
                       ("LAB", ".tif"), ("HSV", ".tif"), ("1", ".png")):
    for _channels in (1, 3):
        @case(4, f"a {_mode} ramp saved as {_suffix} loads over its full range ({_channels} channel(s))")
        def _(mode=_mode, suffix=_suffix, channels=_channels):
            from multilevel_sde.diffusion.images import decode_files

            im, u = _ramp_image(mode)
            path = fresh(f"img-{mode.replace(';', '_')}{suffix}-{channels}") / f"ramp{suffix}"
            try:
                im.save(path)
            except (OSError, ValueError, KeyError) as err:  # PIL cannot write this mode in this format
                raise Bad(f"SKIP (PIL cannot save {mode} as {suffix}: {err})") from None
            decoded, _ = decode_files([str(path)], 32, "center", channels, strict=True, progress=False, workers=1,
                                      desc="")
            arr = decoded[0].astype(np.float64) / 255
            check(arr.shape == (32, 32, channels), f"shape {arr.shape}")
            got = arr.mean(-1)
            if mode == "1":
                check(got.min() == 0 and got.max() == 1 and 0.3 < got.mean() < 0.7, "bilevel")
                return
            tolerance = 0.06 if suffix == ".jpg" or mode in ("CMYK", "LAB", "HSV", "P", "YCbCr") else 0.02
            err = float(np.abs(got - u)[2:-2, 2:-2].mean())
            check(err <= tolerance and (got >= 0.995).mean() < 0.05, f"mean error {err:.3f}, "
                                                                     f"{(got >= 0.995).mean():.0%} at +1")


# -- 5 ---------------------------------------------------------------------------------------------------------
for _extra in ({"t0": 0.0}, {"t1": 5.0}, {"dt": 0.1}, {"t0": 0, "t1": 5, "dt": 0.1}, {"t0": 0.0, "t1": 1.0}):
    @case(5, f"GridBrownian(times=..., {', '.join(_extra)}) refused")
    def _(extra=_extra):
        raises(ValueError, lambda: mlsde.GridBrownian(times=[0.0, 0.5, 1.0], size=(1, 1), **extra), "not both")


for _missing in ({"t0": 0.0, "t1": 1.0}, {"t1": 1.0, "dt": 0.1}, {}):
    @case(5, f"GridBrownian with only {sorted(_missing) or 'nothing'} refused")
    def _(missing=_missing):
        raises(ValueError, lambda: mlsde.GridBrownian(size=(1, 1), **missing), "t0=, t1=, dt=")


@case(5, "sdeint dt and grid together refused")
def _():
    raises(ValueError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(lambda t, y: -y, 1.0), torch.ones(1, 1),
                                            torch.tensor([0.0, 1.0]), dt=0.1, grid=[0.0, 0.5, 1.0]), "not both")


@case(5, "odeint step_size and grid together refused")
def _():
    raises(ValueError, lambda: mlsde.odeint(lambda t, y: -y, torch.ones(1, 1), torch.tensor([0.0, 1.0]),
                                            options={"step_size": 0.1, "grid": [0.0, 1.0]}), "not both")


# -- 6 ---------------------------------------------------------------------------------------------------------
def _foreign_run() -> Path:
    folder = fresh("foreign")
    for name in ("log.json", "log.csv", "summary.json", "results.json", "notes.json", "report.png"):
        (folder / name).write_text('{"mine": true}\n')
    return folder


for _name in ("log", "summary", "results", "notes"):
    @case(6, f"mlsde sample --out RUN/{_name}.png keeps RUN/{_name}.json")
    def _(name=_name):
        folder = _foreign_run()
        before = snapshot(folder)
        refused(cli("sample", cos(), "--steps", "2", "--no-progress", "--out", folder / f"{name}.png"), f"{name}.json")
        check(snapshot(folder) == before, "changed")


@case(6, "mlsde sample --out an existing image it did not write is kept")
def _():
    folder = _foreign_run()
    before = snapshot(folder)
    refused(cli("sample", cos(), "--steps", "2", "--no-progress", "--out", folder / "report.png"), "report.png")
    check(snapshot(folder) == before, "changed")


for _name in ("log.json", "notes.json", "results.json"):
    @case(6, f"mlsde toy --json RUN/{_name} is refused")
    def _(name=_name):
        folder = _foreign_run()
        before = snapshot(folder)
        refused(cli("toy", "--k", "2", "--paths", "4", "--json", folder / name), name)
        check(snapshot(folder) == before, "changed")


@case(6, "mlsde train --out a folder with foreign logs is refused")
def _():
    folder = _foreign_run()
    before = snapshot(folder)
    refused(cli("train", *TRAIN, "--steps", "1", "--out", folder), "not written by training")
    check(snapshot(folder) == before, "changed")


@case(6, "mlsde experiment --out a folder with a foreign results.json is refused")
def _():
    folder = _foreign_run()
    before = snapshot(folder)
    ladder = fresh("lad")
    shutil.copytree(cos(), ladder / "level_0")
    shutil.copytree(cos(), ladder / "level_1")
    code, err = cli("experiment", ladder, "--out", folder, "--heldout", "2", "--select", "2", "--batch", "2",
                    "--no-progress")
    check(code == 2 and "results.json" in err, err[-300:])
    check(snapshot(folder) == before, "changed")


@case(6, "a second mlsde sample to its own --out replaces its own files")
def _():
    out = fresh("own") / "a.png"
    for _ in range(2):
        code, err = cli("sample", cos(), "--steps", "2", "--batch", "1", "--no-progress", "--out", out)
        check(code == 0, err)


# -- 7 ---------------------------------------------------------------------------------------------------------
def _killed_before_rename(argv, folder: Path) -> None:
    before = snapshot(folder)
    real = os.replace

    def replace(*a, **k):
        raise KeyboardInterrupt

    os.replace = replace
    try:
        code, err = cli(*argv)
    finally:
        os.replace = real
    check(code == 130, f"status {code}: {err[-300:]}")
    check(snapshot(folder) == before, "files changed")
    check(not temporaries(folder), f"temporaries {temporaries(folder)}")


@case(7, "train (resume): checkpoint, logs, summary intact after a kill at the rename")
def _():
    folder = fresh("a-train")
    shutil.copytree(cos(), folder / "run")
    _killed_before_rename(["train", *TRAIN, "--steps", "3", "--out", folder / "run"], folder)


@case(7, "train (ladder): ladder.json and levels intact")
def _():
    folder = fresh("a-ladder")
    code, err = cli("train", *TRAIN, "--preset", "cpu-xs", "--steps", "1", "--out", folder / "lad")
    check(code == 0, err)
    _killed_before_rename(["train", *TRAIN, "--preset", "cpu-xs", "--steps", "2", "--out", folder / "lad"], folder)


@case(7, "sample: image and statistics intact")
def _():
    folder = fresh("a-sample")
    code, err = cli("sample", cos(), "--steps", "2", "--batch", "1", "--no-progress", "--out", folder / "s.png")
    check(code == 0, err)
    _killed_before_rename(["sample", cos(), "--steps", "3", "--batch", "1", "--no-progress",
                           "--out", folder / "s.png"], folder)


@case(7, "toy --json intact")
def _():
    folder = fresh("a-toy")
    check(cli("toy", "--k", "2", "--paths", "4", "--json", folder / "t.json")[0] == 0, "toy")
    _killed_before_rename(["toy", "--k", "2", "--paths", "8", "--json", folder / "t.json"], folder)


@case(7, "rescore: results.json and report.md intact")
def _():
    folder = fresh("a-rescore")
    (folder / "results.json").write_text(json.dumps({"title": "t", "points": [], "thresholds": {}, "notes": []}))
    check(cli("rescore", folder)[0] == 0, "rescore")
    _killed_before_rename(["rescore", folder], folder)


@case(7, "a real SIGKILL while rescore writes leaves a readable results.json")
def _():
    folder = fresh("a-kill")
    big = {"title": "t", "points": [], "thresholds": {}, "notes": ["x" * 1000] * 20000}
    (folder / "results.json").write_text(json.dumps(big))
    before = (folder / "results.json").read_bytes()
    for delay in (0.3, 0.6, 0.9, 1.2):
        proc = subprocess.Popen([sys.executable, "-m", "multilevel_sde.cli", "rescore", str(folder)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        text = (folder / "results.json").read_bytes()
        json.loads(text)  # never half a file
        check(text == before or json.loads(text)["points"] == [], "content")


# -- 8 ---------------------------------------------------------------------------------------------------------
def _spawn_train(out: Path, steps: int = 100000) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "multilevel_sde.cli", "train", *TRAIN, "--steps", str(steps),
                             "--checkpoint-every", "0", "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise Bad(f"training did not start: {proc.communicate()[1][-300:]}")
        time.sleep(0.05)


@case(8, "a second mlsde train on a running --out is refused (in-process), and after it ends is allowed")
def _():
    out = fresh("lock") / "run"
    proc = _spawn_train(out)
    try:
        _wait(out / "log.csv", proc)
        refused(cli("train", *TRAIN, "--steps", "2", "--out", out), "in use by another run", f"pid {proc.pid}")
        refused(cli("train", *TRAIN, "--preset", "cpu-xs", "--steps", "2", "--out", out), "in use")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    code, err = cli("train", *TRAIN, "--steps", "2", "--out", out)
    check(code == 0 or "finished" in err, err[-300:])


@case(8, "two mlsde train processes started together: exactly one writes")
def _():
    out = fresh("lock2") / "run"
    procs = [_spawn_train(out, steps=30) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    check(codes == [0, 2], f"statuses {codes}: {[r[1][-200:] for r in results]}")


@case(8, "a second holder of the lock (other process) is refused while the first lives")
def _():
    folder = fresh("lock3")
    with files.FolderLock(folder, "probe"):
        code = ("import sys; from multilevel_sde.files import FolderLock, FolderLockedError\n"
                f"try: FolderLock({str(folder)!r}).acquire()\nexcept FolderLockedError: sys.exit(3)\n")
        check(subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 3, "not refused")


# -- 9 ---------------------------------------------------------------------------------------------------------
for _sig in (signal.SIGINT, signal.SIGTERM):
    @case(9, f"{_sig.name} during mlsde train: checkpoint saved, resume told, status {128 + _sig}")
    def _(sig=_sig):
        from multilevel_sde.diffusion.train import load_checkpoint

        out = fresh(f"sig-{sig.name}") / "run"
        proc = _spawn_train(out)
        _wait(out / "log.csv", proc)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        check(proc.returncode == 128 + sig, f"status {proc.returncode}: {err[-300:]}")
        one_line(err, sig.name, "resume with")
        ckpt = load_checkpoint(out / "checkpoint.pt")
        check(ckpt["step"] >= 1 and not ckpt["finished"], "checkpoint")
        code, err = cli("train", *TRAIN, "--steps", str(ckpt["step"] + 1), "--out", out)
        check(code == 0, err[-300:])


@case(9, "SIGINT twice stops at once (no hang), status non-zero, checkpoint readable or absent")
def _():
    from multilevel_sde.diffusion.train import load_checkpoint

    out = fresh("sig2") / "run"
    proc = _spawn_train(out)
    _wait(out / "log.csv", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    check(proc.returncode != 0, "status 0")
    if (out / "checkpoint.pt").exists():
        load_checkpoint(out / "checkpoint.pt")
    check(not temporaries(out), "temporaries")


# -- 10 --------------------------------------------------------------------------------------------------------
def _kill_mid_save(folder: Path, name: str) -> Path:
    code = ("import time; from multilevel_sde.files import atomic_write\n"
            f"atomic_write({str(folder / name)!r}, lambda fh: (fh.write(b'x'), fh.flush(), time.sleep(60)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    tmp = folder / f".{name}.tmp-{proc.pid}"
    end = time.monotonic() + 60
    while not tmp.exists() and time.monotonic() < end:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    check(tmp.exists(), "no temporary was left")
    return tmp


for _name in ("checkpoint.pt", "log.json", "summary.json"):
    @case(10, f"a SIGKILL mid-save of {_name}: the next mlsde train removes the temporary")
    def _(name=_name):
        folder = fresh(f"stale-{name}")
        tmp = _kill_mid_save(folder, name)
        code, err = cli("train", *TRAIN, "--steps", "1", "--out", folder)
        check(code == 0 and not tmp.exists(), err[-300:])


@case(10, "a SIGKILL mid-save of results.json: the next rescore removes it")
def _():
    folder = fresh("stale-results")
    (folder / "results.json").write_text(json.dumps({"title": "t", "points": [], "thresholds": {}, "notes": []}))
    tmp = _kill_mid_save(folder, "results.json")
    check(cli("rescore", folder)[0] == 0 and not tmp.exists(), "kept")


@case(10, "a live process's temporary is kept")
def _():
    folder = fresh("live")
    tmp = folder / f".x.tmp-{os.getpid()}"
    tmp.write_bytes(b"x")
    files.clean_stale_temporaries(folder)
    check(tmp.exists(), "removed a live process's temporary")


# -- 11 --------------------------------------------------------------------------------------------------------
def _within(seconds: float, fn) -> None:
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            box["err"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    check(not thread.is_alive(), "hangs")
    if "err" in box:
        raise box["err"]


for _span in ("past end", "far past end", (-1, 3), (-3, -1), (4, 2), (0.5, 3), (0, "3"), (2, 2.0)):
    @case(11, f"GridBrownian.increments{_span} fails at once naming the range")
    def _(span=_span):
        bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.1, size=(2, 1), seed=0)
        n = bm.num_steps
        args = {"past end": (0, n + 1), "far past end": (3, 10 ** 9)}.get(span, span)
        _within(5, lambda: raises(IndexError, lambda: bm.increments(*args), str(n)))


# -- 12 --------------------------------------------------------------------------------------------------------
for _damage in ("empty", "1 byte", "cut at 10%", "cut at 50%", "cut at 99%", "zeros", "random", "text"):
    @case(12, f"checkpoint {_damage}: load, sample and resume name the file and the remedy")
    def _(damage=_damage):
        from multilevel_sde.diffusion.train import load_level

        data = (cos() / "checkpoint.pt").read_bytes()
        cut = {"cut at 10%": 0.1, "cut at 50%": 0.5, "cut at 99%": 0.99}
        body = (b"" if damage == "empty" else data[:1] if damage == "1 byte" else
                data[:int(len(data) * cut[damage])] if damage in cut else bytes(len(data)) if damage == "zeros" else
                os.urandom(len(data)) if damage == "random" else b"hello, not a checkpoint\n")
        folder = fresh(f"dmg-{damage}")
        path = folder / "checkpoint.pt"
        path.write_bytes(body)
        raises(ValueError, lambda: load_level(folder), str(path), "re-run the training")
        refused(cli("sample", path, "--steps", "2", "--no-progress", "--out", folder / "x.png"), path)
        refused(cli("train", *TRAIN, "--steps", "3", "--out", folder), path)
        check(path.read_bytes() == body, "the damaged file was changed")


for _content in ("", "{", '{"points": [', "null", "[]", '{"title": 1}', "\x00\x01"):
    @case(12, f"results.json {_content[:12]!r}: rescore names it and says re-run")
    def _(content=_content):
        folder = fresh("dmg-results")
        (folder / "results.json").write_text(content)
        refused(cli("rescore", folder), folder / "results.json", "re-run")


for _content in ("", '{"a": [1', "[]", '{"a": 1}'):
    @case(12, f"learned_ddpm.json {_content[:10]!r}: re-fitted, not fatal")
    def _(content=_content):
        from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig
        from multilevel_sde.diffusion.train import load_level

        folder = fresh("dmg-learned")
        config = ExperimentConfig(heldout=2, select=2, batch=2, deltas=())  # no sweep after the fit
        exp = Experiment([load_level(cos())] * 2, (1, 16, 16), config, folder, progress=False)
        (folder / "learned_ddpm.json").write_text(content)
        fit = dict(a=[0.0, 0.0], b=[0.0, 0.0], floor=0.01, time_scale=1.0, config_key=exp.key)
        exp.fit = lambda sampler: dict(fit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(exp.learned("ddpm", None) == fit, "not refitted")
        check(json.loads((folder / "learned_ddpm.json").read_text()) == fit, "not rewritten")


@case(12, "points.jsonl with a cut last line: the rest is reused")
def _():
    from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig
    from multilevel_sde.diffusion.train import load_level

    folder = fresh("dmg-points")
    config = ExperimentConfig(heldout=2, select=2, batch=2)
    exp = Experiment([load_level(cos())] * 2, (1, 16, 16), config, folder, progress=False)
    row = json.dumps({"sampler": "ddpm", "label": "x", "config_key": exp.key})
    (folder / "points.jsonl").write_text(row + "\n" + row[:15])
    again = Experiment([load_level(cos())] * 2, (1, 16, 16), config, folder, progress=False)
    check(again.cached_points == 1, f"{again.cached_points} points reused, not 1")


@case(12, "a damaged image in a folder data set is skipped, named in a warning")
def _():
    from multilevel_sde.diffusion.data import folder_dataset

    folder = fresh("dmg-img")
    for i in range(3):
        _ramp_image("L")[0].save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = folder_dataset(folder, 16, channels=1)
    check(len(data) == 3 and any("bad.png" in str(w.message) or "1 " in str(w.message) for w in caught)
          or len(data) == 3, "not skipped")


# -- 13 --------------------------------------------------------------------------------------------------------
def _quick_refusal(argv, *needles) -> None:
    start = time.perf_counter()
    refused(cli(*argv), *needles)
    check(time.perf_counter() - start < 5, f"took {time.perf_counter() - start:.1f} s")


def _a_file() -> Path:
    path = fresh("outs") / "a-file"
    path.write_text("x")
    return path


for _label, _argv, _needle in [
        ("train --out FILE", lambda f: ["train", *TRAIN, "--steps", "300", "--out", f], "is a file"),
        ("train --out FILE/sub", lambda f: ["train", *TRAIN, "--steps", "300", "--out", f / "sub"], "cannot write"),
        ("train ladder --out FILE", lambda f: ["train", *TRAIN, "--preset", "cpu-s", "--out", f], "is a file"),
        ("sample --out without extension", lambda f: ["sample", cos(), "--out", f.parent / "noext"], "image file"),
        ("sample --out .txt", lambda f: ["sample", cos(), "--out", f.parent / "x.txt"], "image file"),
        ("sample --out FILE/x.png", lambda f: ["sample", cos(), "--out", f / "x.png"], "is a file"),
        ("sample --out a folder", lambda f: ["sample", cos(), "--out", f.parent], "image file"),
        ("experiment --out FILE", lambda f: ["experiment", cos(), "--out", f], "is a file"),
        ("experiment --out FILE/sub", lambda f: ["experiment", cos(), "--out", f / "sub"], "cannot write"),
        ("toy --json FILE/x.json", lambda f: ["toy", "--json", f / "x.json"], "is a file"),
        ("rescore on a file", lambda f: ["rescore", f], "results.json")]:
    @case(13, f"{_label}: refused before any work")
    def _(argv=_argv, needle=_needle):
        _quick_refusal(argv(_a_file()), needle)


@case(13, "a read-only --out folder (skipped as root)")
def _():
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        raise Bad("SKIP (root writes into read-only folders)")
    folder = fresh("ro")
    folder.chmod(0o500)
    try:
        _quick_refusal(["train", *TRAIN, "--steps", "300", "--out", folder], "cannot write")
    finally:
        folder.chmod(0o700)


# -- 14 --------------------------------------------------------------------------------------------------------
def _data_cases():
    root = fresh("data")
    image = root / "img.png"
    _ramp_image("L")[0].save(image)
    one = root / "one"
    one.mkdir()
    _ramp_image("L")[0].save(one / "a.png")
    empty = root / "empty"
    empty.mkdir()
    return {"folder:FILE": (f"folder:{image}", str(image)), "one image": (f"folder:{one}", "only 1 image"),
            "missing folder": (f"folder:{root / 'nowhere'}", "nowhere"),
            "empty folder": (f"folder:{empty}", "no images"),
            "celeba:missing": (f"celeba:{root / 'nowhere'}", "nowhere"), "bare FILE": (str(image), str(image))}


for _key in ("folder:FILE", "one image", "missing folder", "empty folder", "celeba:missing", "bare FILE"):
    @case(14, f"mlsde train --data {_key}: one line, status 2")
    def _(key=_key):
        spec, needle = _data_cases()[key]
        refused(cli("train", "--preset", "cpu-xs", "--data", spec, "--image-size", "16", "--steps", "1",
                    "--no-progress", "--out", fresh("dout") / "o"), needle)


for _argv, _needle in [(["train", "--out", "X"], "--preset"), (["train", "--preset", "nope", "--out", "X"], "nope"),
                       (["train", "--family", "zzz", "--out", "X"], "zzz"), (["train", "--preset", "cpu-xs"], "--out"),
                       (["train", "--preset", "cpu-xs", "--preset", "cpu-s", "--init-from", "x", "--out", "X"],
                        "--init-from"),
                       (["train", "--steps", "abc", "--out", "X"], "--steps"), (["sample"], "levels"),
                       (["sample", "X", "--method", "q"], "--method"), (["bogus"], "bogus"),
                       (["experiment", "X"], "--out"), (["sample", "nowhere.pt", "--no-progress"], "not found"),
                       (["experiment", "nowhere", "--out", "X"], "nowhere"), (["rescore", "nowhere"], "nowhere")]:
    @case(14, f"mlsde {' '.join(_argv)}: one line, status 2")
    def _(argv=_argv, needle=_needle):
        out = fresh("u")
        refused(cli(*[str(out / a) if a == "X" else a for a in argv]), needle)


# -- 15 --------------------------------------------------------------------------------------------------------
_FLAGS = [(["sample", "RUN", "--probs", "1,abc"], "--probs"), (["sample", "RUN", "--probs", "1,nan"], "--probs"),
          (["sample", "RUN", "--steps", "0"], "--steps"), (["sample", "RUN", "--batch", "0"], "--batch"),
          (["sample", "RUN", "--image-size", "0"], "--image-size"), (["sample", "RUN", "--T", "0"], "--T"),
          (["experiment", "RUN", "--em-steps", "10,abc"], "--em-steps"),
          (["experiment", "RUN", "--mlem-steps", "x"], "--mlem-steps"),
          (["experiment", "RUN", "--em-steps", "0"], "--em-steps"),
          (["experiment", "RUN", "--p-top", "abc"], "--p-top"), (["experiment", "RUN", "--p-top", "2"], "--p-top"),
          (["experiment", "RUN", "--deltas", "1,b"], "--deltas"),
          (["experiment", "RUN", "--tstitch-fractions", "1.5"], "--tstitch-fractions"),
          (["experiment", "RUN", "--heldout", "0"], "--heldout"), (["experiment", "RUN", "--batch", "-1"], "--batch"),
          (["experiment", "RUN", "--learn-grid", "0"], "--learn-grid"),
          (["experiment", "RUN", "--strategies", "magic"], "--strategies"),
          (["experiment", "RUN", "--mlem-networks", "2,1"], "--mlem-networks"),
          (["toy", "--d", "0"], "--d"), (["toy", "--k", "0"], "--k"), (["toy", "--paths", "-3"], "--paths"),
          (["toy", "--gamma", "-1"], "--gamma"), (["toy", "--gamma", "nan"], "--gamma"),
          (["toy", "--seed", "-1"], "--seed"),
          (["train", "--batch-size", "0"], "--batch-size"), (["train", "--lr", "0"], "--lr"),
          (["train", "--ema-decay", "2"], "--ema-decay"), (["train", "--T", "0"], "--T"),
          (["train", "--steps", "0"], "--steps"),
          (["train", "--decay", "-1"], "--decay"), (["train", "--distill-mix", "0"], "--distill-mix"),
          (["train", "--seed", "-2"], "--seed")]

for _argv, _flag in _FLAGS:
    @case(15, f"mlsde {' '.join(_argv)} names {_flag}")
    def _(argv=_argv, flag=_flag):
        out = fresh("flags")
        argv = [str(cos()) if a == "RUN" else a for a in argv]
        if argv[0] == "sample":
            argv += ["--no-progress", "--out", str(out / "s.png")]
        elif argv[0] == "experiment":
            argv += ["--out", str(out / "e"), "--no-progress"]
        elif argv[0] == "train":
            argv = ["train", *TRAIN, *argv[1:], "--out", str(out / "t")]
        refused(cli(*argv), flag)


# -- 16 --------------------------------------------------------------------------------------------------------
def _f(t, y):
    return -y


_TS = torch.tensor([0.0, 1.0])
_LIB = [
    ("sdeint integer y0", TypeError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(mlsde.MultilevelDrift(
        [_f, _f], [0.5, 1.0], costs=[1, 2]), 1.0), torch.ones(2, 2, dtype=torch.long), _TS, dt=0.1), "y0"),
    ("sdeint diffusion (3,2,5) for diagonal", ValueError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(
        _f, lambda t, y: torch.ones(3, 2, 5)), torch.ones(3, 2), _TS, dt=0.1), "diffusion"),
    ("sdeint diffusion (3,1,1) for diagonal", ValueError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(
        _f, lambda t, y: torch.ones(3, 1, 1)), torch.ones(3, 2), _TS, dt=0.1), "diffusion"),
    ("sdeint diffusion (3,2) for general", ValueError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(
        _f, lambda t, y: torch.ones(3, 2), noise_type="general"), torch.ones(3, 2), _TS, dt=0.1,
        bm=mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.1, size=(3, 2))), "diffusion"),
    ("sdeint sigma(t) of shape (5,)", ValueError, lambda: mlsde.sdeint(mlsde.MultilevelSDE(
        _f, lambda t: torch.ones(5)), torch.ones(3, 2), _TS, dt=0.1), "diffusion"),
    ("odeint options=[1, 2]", TypeError, lambda: mlsde.odeint(_f, torch.ones(1, 1), _TS, options=[1, 2]), "options"),
    ("odeint options='step_size'", TypeError, lambda: mlsde.odeint(_f, torch.ones(1, 1), _TS, options="step_size"),
     "options"),
    ("odeint options={'dt': 1}", ValueError, lambda: mlsde.odeint(_f, torch.ones(1, 1), _TS, options={"dt": 1}),
     "options"),
]
for _t, _kind in (("a", TypeError), (float("nan"), ValueError), (float("inf"), ValueError), (None, TypeError),
                  (torch.zeros(3), ValueError), (torch.zeros(2, 2), ValueError), (np.zeros(5), ValueError),
                  (torch.tensor(float("nan")), ValueError), ([0.1, 0.2], TypeError), (True, TypeError)):
    for _coupling in ("sample", "batch"):
        _LIB.append((f"MultilevelDrift.sample(t={_t!r}) coupling={_coupling}", _kind,
                     lambda t=_t, c=_coupling: _fresh_drift(c).sample(t, torch.ones(4, 2), 0.1), "t "))
        _LIB.append((f"MultilevelDrift.sample(t={_t!r}) coupling={_coupling} after the steady path", _kind,
                     lambda t=_t, c=_coupling: _after_steady(c, t), "t "))


def _fresh_drift(coupling):
    return mlsde.MultilevelDrift([_f, _f], [0.5, 1.0], costs=[1, 2], coupling=coupling)


def _after_steady(coupling, t):
    drift = _fresh_drift(coupling)
    y = torch.ones(4, 2)
    for _ in range(3):
        drift.sample(0.5, y, 0.1)
    drift.sample(t, y, 0.1)


for _label, _kind, _fn, _needle in _LIB:
    @case(16, f"{_label}: {_kind.__name__} naming {_needle.strip()!r}")
    def _(kind=_kind, fn=_fn, needle=_needle):
        raises(kind, fn, needle)


# -- 17 --------------------------------------------------------------------------------------------------------
for _solver, _n in (("sdeint", 1e12), ("odeint", 1e12), ("sdeint", 1e11)):
    @case(17, f"{_solver} with {_n:.0e} steps refused at once, with the memory it would need")
    def _(solver=_solver, n=_n):
        start = time.perf_counter()
        if solver == "sdeint":
            fn = lambda: mlsde.sdeint(mlsde.MultilevelSDE(_f, 1.0), torch.ones(1, 1), _TS, dt=1 / n)  # noqa: E731
        else:
            fn = lambda: mlsde.odeint(_f, torch.ones(1, 1), _TS, options={"step_size": 1 / n})  # noqa: E731
        raises(ValueError, fn, "GiB")
        check(time.perf_counter() - start < 2, "slow")


for _solver in ("sdeint", "odeint"):
    @case(17, f"{_solver} with 2e6 steps warns with memory and time before the set-up")
    def _(solver=_solver):
        class Stop(Exception):
            pass

        def stop(*a):
            raise Stop

        seen = {}

        def on_warning(message, *a, **k):
            seen.setdefault("at", time.perf_counter())
            seen["text"] = str(message)

        start = time.perf_counter()
        old = warnings.showwarning
        warnings.showwarning = on_warning
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = on_warning
                try:
                    if solver == "sdeint":
                        mlsde.sdeint(mlsde.MultilevelSDE(_f, 1.0), torch.ones(1, 1), _TS, dt=5e-7, callback=stop)
                    else:
                        mlsde.odeint(_f, torch.ones(1, 1), _TS, options={"step_size": 5e-7}, callback=stop)
                except Stop:
                    pass
        finally:
            warnings.showwarning = old
        check("GiB" in seen.get("text", ""), f"no warning: {seen}")
        check(seen["at"] - start < 0.5, f"warned {seen['at'] - start:.1f} s late")


# -- runner ------------------------------------------------------------------------------------------------------
def main_probe(selected) -> int:
    tally: dict = {k: [0, 0, 0] for k in CLASSES}
    bad_cases, skipped_cases = [], []
    started = time.perf_counter()
    for klass, name, fn in CASES:
        if selected and klass not in selected:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            tally[klass][1] += 1
        except Bad as err:
            if str(err).startswith("SKIP"):
                tally[klass][2] += 1
                skipped_cases.append((klass, name, str(err)[5:]))
                continue
            bad_cases.append((klass, name, str(err)))
        except Exception as err:  # noqa: BLE001
            bad_cases.append((klass, name, f"{type(err).__name__}: {str(err)[:300]}"
                              + ("\n" + traceback.format_exc()[-600:] if os.environ.get("PROBE_TRACE") else "")))
        tally[klass][0] += 1
    print(f"{'class':<44} {'tried':>6} {'good':>6} {'bad':>5}")
    for klass, (tried, good, skipped) in tally.items():
        if tried:
            label = f"{klass:>2}. {CLASSES[klass]}"
            print(f"{label:<44} {tried:>6} {good:>6} {tried - good:>5}" + (f"  ({skipped} skipped)" if skipped else ""))
    tried, good = sum(t[0] for t in tally.values()), sum(t[1] for t in tally.values())
    print(f"{'total':<44} {tried:>6} {good:>6} {tried - good:>5}   ({time.perf_counter() - started:.0f} s)")
    for klass, name, why in skipped_cases:
        print(f"skipped [{klass}] {name}: {why}")
    for klass, name, why in bad_cases:
        print(f"BAD [{klass}] {name}: {why}")
    shutil.rmtree(WORK, ignore_errors=True)
    return min(len(bad_cases), 100)


if __name__ == "__main__":
    sys.exit(main_probe({int(a) for a in sys.argv[1:]}))
