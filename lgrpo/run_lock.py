"""One owner per run folder: an exclusive lock taken at start-up, its holder named in the refusal."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC
from pathlib import Path

from . import distributed as D
from .checkpoint import CheckpointError

LOCK_FILE = "run.lock"


class RunFolderBusy(CheckpointError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run folder>/run.lock``, held for the life of the process.

    Two trainers in one folder would replace each other's ``metrics.jsonl`` and delete each other's
    ``step_N.tmp`` (a requeued job started while the old one still runs). The kernel drops a flock
    when its holder dies, however it dies, so a lock that can be taken is never a live owner's; the
    file's contents (host, PID, since when) only name the holder in the refusal, and when a taken lock
    still names someone, that holder died without releasing it: taken over with a warning.
    """

    def __init__(self, run_dir: str | os.PathLike):
        import fcntl
        import socket
        from datetime import datetime

        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self._fd)
            os.close(self._fd)
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by {holder} (lock {self.path}): wait for that run "
                "to end or stop it, or start this one under another --run.name") from None
        except OSError as err:  # a file system without locks (some network mounts): say so, go on
            print(f"[warn] cannot lock {self.path} ({err.strerror}): this file system does not support "
                  "locks, so nothing stops a second run from using the folder at the same time", flush=True)
            self.taken_over = None
        else:
            self.taken_over = _lock_holder(self._fd, default=None)
        if self.taken_over is not None:
            print(f"[warn] {self.path}: taking over the lock of {self.taken_over}, which ended without "
                  "releasing it (killed or crashed)", flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the file (a clean end: the next owner has nothing to warn about), then unlock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None


def _lock_holder(fd: int, default: str | None = "another process") -> str | None:
    """"PID 1234 on host h since 2026-12-07 11:40:03 UTC" from the lock file, or ``default`` when empty."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"PID {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return default


_HELD: dict[str, RunLock] = {}  # run folder (real path) -> this process's lock on it


def lock_run_folder(run_dir: str | os.PathLike, dist: D.Dist) -> RunLock | None:
    """Rank 0 takes the run folder's :class:`RunLock` (released at exit); every rank raises the same
    :class:`RunFolderBusy` when it is held, so no rank waits in a collective for one that gave up."""
    import atexit

    lock, refusal = None, None
    if dist.is_main:
        key = os.path.realpath(run_dir)
        lock = _HELD.get(key)
        if lock is None or lock._fd is None:  # this process already owns it: a second main() in one process
            try:
                lock = _HELD[key] = RunLock(run_dir)
                atexit.register(lock.release)
            except RunFolderBusy as err:
                refusal = str(err)
    refusal = D.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderBusy(refusal)
    return lock
