"""Threads for bulk chunk work (hashing, zstd, decompression, pwrite) at a lower CPU priority.

On a host with few cores, bulk chunk work can take every core and the event loop thread that
serves control and interactive messages waits for one. Linux keeps a nice value per thread, so
these threads yield the CPU to the loop (and to whatever else the host must keep responsive).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["BULK_THREAD_NICENESS", "bulk_executor", "lower_thread_priority"]

BULK_THREAD_NICENESS = 10


def lower_thread_priority(niceness: int = BULK_THREAD_NICENESS) -> None:
    """Thread initializer: add `niceness` to the calling thread's nice value (Linux; elsewhere
    a nice value is per process, so nothing changes), and give the thread its Python name in
    the kernel too (`top -H`, /proc/<pid>/task/*/comm show where the CPU goes)."""
    if not sys.platform.startswith("linux"):
        return
    _name_native_thread(threading.current_thread().name)
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except OSError:
        pass  # a sandbox may forbid it; the work still runs, only without the priority hint


def _name_native_thread(name: str) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def bulk_executor(max_workers: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix=name, initializer=lower_thread_priority
    )
