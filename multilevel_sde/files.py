"""The files the project writes and reads, handled one way everywhere (docs/architecture.md, "Guarantees").

- :func:`atomic_write` (and ``atomic_write_text`` / ``atomic_write_json``): a temporary file in the target's
  folder (``.NAME.tmp-PID``), flushed and fsync'ed, then ``os.replace`` d over the target and the folder fsync'ed.
  A reader sees the old file or the new one, never half of one; a kill leaves at most the temporary.
- :func:`clean_stale_temporaries`: removes the temporaries of processes that no longer run (a SIGKILL mid-save).
- :class:`FolderLock`: an exclusive ``flock`` on ``FOLDER/.lock`` for as long as a run writes into the folder;
  a second writer is refused with the holder's pid and command, and the lock goes with its process.
- :func:`check_writable_folder`, :func:`check_new_file`: checks of an output before any work is done.
- :func:`read_json`: a JSON file, or a ``DamagedFileError`` naming the file and what to do about it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "append_line", "clean_stale_temporaries",
           "temporary_name", "FolderLock", "FolderLockedError", "DamagedFileError", "check_writable_folder",
           "check_new_file", "read_json", "LOCK_NAME"]

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".lock"
_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


class DamagedFileError(ValueError):
    """A file the project reads is truncated, empty or altered; the message names it and what to do."""


class FolderLockedError(RuntimeError):
    """Another process writes into the folder (it holds ``FOLDER/.lock``)."""


def temporary_name(path: PathLike) -> Path:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Union[bytes, Callable[[io.BufferedWriter], Any]]) -> Path:
    """Write ``path`` atomically: ``write(fh)`` (or the ``bytes`` given) into a temporary file in the same folder,
    fsync, ``os.replace``, fsync the folder. On any error (or a signal) the temporary is removed and ``path`` is
    untouched. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            if isinstance(write, (bytes, bytearray, memoryview)):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, value, **dumps) -> Path:
    """:func:`atomic_write` of ``json.dumps(value, **dumps)`` (serialised first: a value that cannot be
    written leaves the old file as it was)."""
    return atomic_write(path, json.dumps(value, **dumps).encode("utf-8"))


def append_line(path: PathLike, line: str) -> None:
    """Append one line (a JSONL record) and fsync: a kill leaves the earlier lines whole and at most a cut last
    line, which readers of the project skip."""
    if "\n" in line:
        raise ValueError("append_line writes one line; the text holds a newline")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(folder: PathLike, recursive: bool = False) -> list:
    """Remove the temporaries of :func:`atomic_write` (``.NAME.tmp-PID``) left in ``folder`` by processes that no
    longer run (a kill mid-save); those of live processes are kept. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in (folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")):
        match = _TMP.match(path.name)
        if match is None or not path.is_file() or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def check_writable_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that files can be created in it (a probe file is written and
    removed); a ``ValueError`` naming ``what`` and the path otherwise. Call it before any long work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {os.fspath(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write into {what} {os.fspath(folder)!r}: {err.strerror or err}") from err
    return folder


def check_new_file(path: PathLike, what: str, owned: Optional[Callable[[Path], bool]] = None) -> Path:
    """``path`` may be written: its folder is writable, and it does not exist or ``owned(path)`` says it is an
    earlier output of the same kind (which may be replaced); otherwise a ``ValueError`` naming ``what``."""
    path = Path(path)
    check_writable_folder(path.parent if str(path.parent) else Path("."), f"folder of {what}")
    if path.is_dir():
        raise ValueError(f"{what} {os.fspath(path)!r} is a folder; give a file name")
    if path.exists() and (owned is None or not owned(path)):
        raise ValueError(f"{what} {os.fspath(path)!r} already exists and was not written by this command; it will "
                         "not be overwritten: choose another name or remove it")
    return path


def read_json(path: PathLike, what: str = "", remedy: str = "") -> Any:
    """``json.loads`` of the file; an empty, truncated or invalid file is a :class:`DamagedFileError` naming it
    (``what`` describes it, ``remedy`` says what to do)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if not data.strip():
            raise ValueError("the file is empty")
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        label = f"{what} " if what else ""
        raise DamagedFileError(f"{label}{os.fspath(path)!r} is damaged or incomplete ({err})"
                               + (f"; {remedy}" if remedy else "")) from err


class FolderLock:
    """An exclusive lock on a run folder (``flock`` on ``FOLDER/.lock``), held while the run writes there.

    ``with FolderLock(folder, "mlsde train"):`` -- a second process (or a second lock in this one) asking for
    the same folder gets a :class:`FolderLockedError` naming the holder's pid and command. The lock file stays
    (removing it would race with a new holder); the kernel releases the lock when its holder exits, even on
    SIGKILL. Without ``fcntl`` (not POSIX) nothing is locked.
    """

    _held: dict = {}  # resolved folder -> [fd, count]: a process may take its own lock again (nested calls)

    def __init__(self, folder: PathLike, purpose: str = ""):
        self.folder = Path(folder)
        self.purpose = purpose or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        self._fd: Optional[int] = None
        self._key: Optional[str] = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return self
        if self._fd is not None:
            return self
        check_writable_folder(self.folder, "run folder")
        key = os.path.realpath(self.folder)
        entry = FolderLock._held.get(key)
        if entry is not None:  # this process holds it already
            entry[1] += 1
            self._fd, self._key = entry[0], key
            return self
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise FolderLockedError(
                f"{os.fspath(self.folder)!r} is in use by another run ({holder or 'unknown process'}); wait for it to "
                "finish or give another output folder") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.purpose}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd, self._key = fd, key
        FolderLock._held[key] = [fd, 1]
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, key, self._fd, self._key = self._fd, self._key, None, None
        entry = FolderLock._held.get(key)
        if entry is not None and entry[1] > 1:
            entry[1] -= 1
            return
        FolderLock._held.pop(key, None)
        import fcntl

        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
