"""What a training run writes beside its checkpoint, and the checks before it writes or resumes.

**Logs**: ``out_dir/log.csv`` and ``out_dir/log.json`` (rows: ``step``, ``loss`` -- the training objective
averaged since the previous row --, ``eps_loss``, ``grad_norm``, ``lr``, ``heldout_loss`` of the EMA weights,
``heldout_loss_raw`` of the raw weights, ``heldout_distill`` (MSE of the EMA student against the teacher on the
held-out set, when distilling), ``seconds`` since the start of training, all segments together; a nested run's
rows add ``heldout_levels``, per width), and ``out_dir/summary.json``. Training replaces only files it wrote.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path

import torch

from ...files import atomic_write, atomic_write_json
from .config import RESUME_KEYS, TrainConfig

__all__ = ["write_logs", "summary_from", "refuse_foreign_files", "check_resume", "LOG_COLUMNS"]

LOG_COLUMNS = ("step", "loss", "eps_loss", "grad_norm", "lr", "heldout_loss", "heldout_loss_raw", "heldout_distill",
               "seconds")


def write_logs(out_dir: Path, rows: list, meta: dict) -> None:
    """Rewrite ``log.csv`` (the columns of :data:`LOG_COLUMNS`) and ``log.json`` (``meta`` and every row)."""
    def csv_bytes(fh):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
        fh.write(text.getvalue().encode())

    atomic_write(out_dir / "log.csv", csv_bytes)
    atomic_write_json(out_dir / "log.json", {**meta, "rows": rows}, indent=1)


def summary_from(rows: list, **extra) -> dict:
    """The summary of a run from its log rows: the last losses and their histories, with ``extra``."""
    def last(key):
        for row in reversed(rows):
            if row.get(key) is not None:
                return row[key]
        return None

    return {
        "final_loss": last("loss"),
        "final_eps_loss": last("eps_loss"),
        "final_heldout_loss": last("heldout_loss"),
        "final_heldout_distill": last("heldout_distill"),
        "heldout_history": [[r["step"], r["heldout_loss"]] for r in rows if r.get("heldout_loss") is not None],
        "loss_history": [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None],
        **extra,
    }


def _ours(path: Path) -> bool:
    """Whether ``path`` (a log or summary name of a run folder) holds what training writes there."""
    try:
        if path.name == "log.csv":
            with open(path, encoding="utf-8") as fh:
                return fh.readline().startswith("step,loss")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("rows", "train_config") if path.name == "log.json" else ("final_loss", "checkpoint")
    return isinstance(value, dict) and all(k in value for k in keys)


def refuse_foreign_files(out_dir: Path) -> None:
    """Training replaces its own logs and summary only: a ``log.json``, ``log.csv`` or ``summary.json`` that
    something else wrote is never overwritten (a ``ValueError`` naming it)."""
    for name in ("log.csv", "log.json", "summary.json"):
        path = out_dir / name
        if path.exists() and not _ours(path):
            raise ValueError(f"{os.fspath(path)!r} was not written by training and would be overwritten; give "
                             "another output folder (or move the file away)")


def check_resume(ckpt: dict, config: TrainConfig, distilled: bool, images: torch.Tensor, path: Path) -> None:
    """Refuse to resume ``ckpt`` with settings that change the run's random streams or objective (``ValueError``)
    or other data (its shape); warn of other changed settings and of data whose checksum differs."""
    defaults = TrainConfig().to_dict()  # a setting added after the checkpoint was written had its default
    saved = {**defaults, **(ckpt.get("train_config") or {})}
    now = config.to_dict()
    bad = {k: (saved.get(k), now.get(k)) for k in RESUME_KEYS if saved.get(k) != now.get(k)}
    if bool(ckpt.get("distilled")) != distilled:
        bad["distilled"] = (bool(ckpt.get("distilled")), distilled)
    if bad:
        raise ValueError(f"cannot resume {os.fspath(path)!r}: settings that fix the run's random streams or "
                         f"objective differ (checkpoint, now): {bad}; use another output folder")
    changed = {k: (saved.get(k, defaults[k]), now[k]) for k in ("lr", "ema_decay", "ema_warmup", "warmup", "decay",
                                                                "grad_clip", "weight_decay", "autocast")
               if saved.get(k, defaults[k]) != now[k]}
    if changed:
        warnings.warn(f"resuming {os.fspath(path)!r} with changed settings (checkpoint, now): {changed}",
                      stacklevel=4)
    data = ckpt.get("data") or {}
    shape = [int(s) for s in images.shape]
    if data.get("shape") is not None and data["shape"] != shape:
        raise ValueError(f"cannot resume {os.fspath(path)!r}: it was trained on data of shape {data['shape']}, "
                         f"now {shape}")
    checksum = float(images.sum(dtype=torch.float64))
    if data.get("checksum") is not None and not math.isclose(data["checksum"], checksum, rel_tol=1e-9,
                                                             abs_tol=1e-6):
        warnings.warn(f"resuming {os.fspath(path)!r} on data whose checksum differs from the checkpoint's "
                      f"({data['checksum']} vs {checksum}): the batches will not be the same", stacklevel=4)
