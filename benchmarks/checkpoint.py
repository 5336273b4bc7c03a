"""The trainer's run directory and checkpoint files: one writer per directory, durable atomic writes, safe loads.

- ``lock_run_dir(directory)`` takes an exclusive ``fcntl.flock`` on ``<directory>/.lock`` for the life of the
  process (the operating system releases it when the process exits or crashes) and writes the holder's pid and host
  into it; a second run on the same directory is refused with the holder named.
- ``save_checkpoint(path, state)`` accepts only tensors, numbers, strings, ``None``, dtypes/devices and
  lists/tuples/dicts of those (what ``torch.load(weights_only=True)`` reads back); it writes ``<path>.tmp``, fsyncs
  it, renames it over ``path`` and fsyncs the directory, so ``path`` is always the old or the new checkpoint, never
  a torn one. A failed write (a full disk) removes the temporary file and raises ``CheckpointError`` naming the
  file and the free space.
- ``load_checkpoint(path, required)`` loads with ``weights_only=True`` (a crafted file cannot run code) and turns
  every way a file can be wrong (empty, truncated, not a checkpoint, a pickle of arbitrary objects, missing keys)
  into a ``CheckpointError`` that names the file and what is wrong.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

import torch

LOCK_NAME = ".lock"
_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file, the problem and the fix."""


class RunDirectoryError(RuntimeError):
    """A run directory that this run may not use (locked by another run, or holding a run it would overwrite)."""


class RunLock:
    """An exclusive lock on a run directory, held until ``release()`` or the end of the process.

    Only ``fcntl.flock`` on the open lock file guards the directory; the pid and host written into the file only
    name the holder in the refusal message. A crashed holder leaves the file but no lock.
    """

    def __init__(self, directory: Path) -> None:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_NAME
        # held open for the life of the run; O_NOFOLLOW: a symbolic link put there is refused, not written through
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self._file = os.fdopen(fd, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunDirectoryError(
                f"fastasam: {directory} is in use by another run ({holder}; lock {self.path}); two runs writing "
                "one directory would overwrite each other's checkpoints. Wait for it to end, or give this run "
                "another --ckpt-dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        """Close the lock file (which releases the lock); idempotent."""
        if not self._file.closed:
            self._file.close()


def lock_run_dir(directory: str | Path) -> RunLock:
    """Lock ``directory`` (created if missing) for this process; ``RunDirectoryError`` names the holder."""
    return RunLock(Path(directory))


def _check_plain(obj: object, where: str) -> int:
    """Raise ``TypeError`` at the first value ``torch.load(weights_only=True)`` would refuse; return tensor bytes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, _PLAIN):
        return 0
    if isinstance(obj, dict):
        return sum(_check_plain(v, f"{where}[{k!r}]") for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_check_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"fastasam: checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}; a "
                    "checkpoint holds only tensors, numbers, strings and lists/dicts of them (so that it loads with "
                    "weights_only=True): convert it (a Path to str, a numpy array to a tensor, a random state to "
                    "a tensor or list)")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC/EDQUOT (torch.save reports a failed write as
    ``RuntimeError: ... unexpected pos``, with the ``OSError`` only as its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` durably and atomically.

    ``state`` is not modified. The temporary file ``<path>.tmp`` is fsynced and renamed over ``path``, then the
    directory is fsynced: after a crash ``path`` holds the previous or the new checkpoint, whole.
    Raises ``TypeError`` (before writing) for a value that would not load with ``weights_only=True``, and
    ``CheckpointError`` when the write fails; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    nbytes = _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a link left there is removed; the file is made anew (O_EXCL), never followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if _disk_full(e):
            raise CheckpointError(
                f"fastasam: could not write the checkpoint {path}: the disk is full ({free / 2**20:.1f} MiB free "
                f"on {path.parent}, the checkpoint needs about {nbytes / 2**20:.1f} MiB). The temporary file was "
                f"removed and {path.name} is unchanged; free space or point --ckpt-dir at a larger disk") from e
        raise CheckpointError(f"fastasam: could not write the checkpoint {path} ({free / 2**20:.1f} MiB free on "
                              f"{path.parent}): {type(e).__name__}: {e}. The temporary file was removed and "
                              f"{path.name} is unchanged") from e


def load_checkpoint(path: str | Path, required: Iterable[str], map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` with ``weights_only=True``; tensors go to ``map_location``.

    Raises ``FileNotFoundError`` if ``path`` is missing and ``CheckpointError`` naming ``path`` if it is empty,
    truncated or not a torch checkpoint, holds objects other than tensors and plain data (refused unexecuted), or
    is not a dict with every key in ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastasam: no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"fastasam: the checkpoint {path} is empty (0 bytes): it was not written by this "
                              "trainer, or its write was cut off; restore it from a copy or start a new run")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
        raise CheckpointError(f"fastasam: {path} ({size} bytes) is not a torch checkpoint (it starts with "
                              f"{magic!r}); point --ckpt-dir at a run this trainer wrote")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is not None:
            raise CheckpointError(
                f"fastasam: refusing to load {path}: it holds objects other than tensors and plain data, which "
                f"unpickling would construct by running code (weights_only=True refused {refused[1]}). Use a "
                "checkpoint written by this trainer") from None
        detail = next((s for s in lines if "Unsupported" in s), lines[0] if lines else "")
        raise CheckpointError(f"fastasam: {path} ({size} bytes) is truncated or not a torch checkpoint ({detail}); "
                              "restore it from a copy or start a new run") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in the unpickler (IndexError, ...)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"fastasam: {path} ({size} bytes) is truncated or not a torch checkpoint "
                              f"({type(e).__name__}: {detail}); restore it from a copy or start a new run") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"fastasam: {path} is not a checkpoint of this trainer: it lacks {missing} "
                              f"(it has {found}); point --ckpt-dir at a run this trainer wrote")
    return state
