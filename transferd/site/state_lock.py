"""One daemon per state_dir: an exclusive lock on `<state_dir>/daemon.lock`, held while it runs.

Two daemons on one state_dir (the same data_dir started twice with another listen port, or
by hand beside systemd's) shared a journal and staging: the second one's start reclaimed
staging the first was receiving into, took over its message socket, and resumed its jobs.
The lock is `flock`: the kernel drops it when the process dies, so kill -9 leaves no stale
lock behind. The file holds the holder's pid, for the message the next one prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from pathlib import Path

from transferd.errors import ConfigError

__all__ = ["LOCK_NAME", "StateDirLock"]

LOCK_NAME = "daemon.lock"


class StateDirLock:
    """The lock of `state_dir`, taken at once or ConfigError naming the daemon that holds it."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / LOCK_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot open {path}: {exc.strerror or exc}",
                              field="state_dir") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"state_dir: cannot lock {path}: {exc.strerror or exc}",
                                  field="state_dir") from exc
            raise ConfigError(
                f"state_dir: another transferd daemon{holder} is running on {state_dir}; stop "
                "it first, or give this one its own data_dir (or state_dir)",
                field="state_dir") from None
        with contextlib.suppress(OSError):  # the pid is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # Released with the daemon object too, should it never serve (its set-up failed).
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._finalizer()


def _holder(fd: int) -> str:
    """' (pid N)' from the lock file, or '' when it says nothing useful."""
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
