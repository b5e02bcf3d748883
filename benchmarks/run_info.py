"""What a benchmark result was measured on: commit, whether the library had uncommitted changes, versions, machine
and load (shared by the benchmark scripts, which record it beside their figures)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import multilevel_sde as mlsde


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(**versions) -> dict:
    """The run's environment; ``versions`` adds the versions of other libraries it measured (e.g. torchsde)."""
    commit, changes = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--", "../multilevel_sde")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit or None,
            "library_uncommitted_changes": None if changes is None else bool(changes),
            "torch": torch.__version__, **versions, "multilevel_sde": mlsde.__version__,
            "multilevel_sde_path": str(Path(mlsde.__file__).parent),  # another checkout's library via PYTHONPATH
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
