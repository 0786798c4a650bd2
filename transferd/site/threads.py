"""Threads for bulk chunk work (hashing, zstd, decompression, pwrite) at a lower CPU priority.

On a host with few cores, bulk chunk work can take every core and the event loop thread that
serves control and interactive messages waits for one, and so do the host's other processes
(an application sending interactive messages through the daemon, among them). Linux keeps a
scheduling policy per thread, so these threads yield the CPU to the loop and to whatever else
the host must keep responsive (`traffic.bulk_priority`).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

__all__ = [
    "BULK_THREAD_NICENESS",
    "LOOP_RT_PRIORITY",
    "BulkPriority",
    "bulk_executor",
    "base_nice",
    "lower_thread_priority",
    "raise_loop_priority",
    "restore_base_priority",
    "set_bulk_priority",
]

BulkPriority = Literal["idle", "nice"]

BULK_THREAD_NICENESS = 10
LOOP_RT_PRIORITY = 1  # the lowest real-time priority: above every normal thread, below the rest

# The policy of bulk threads started from now on in this process: `transferd serve` sets it from
# `traffic.bulk_priority` before the daemon starts; a daemon run inside another program (tests,
# embedding) keeps the milder nice +10 unless that program asks.
_bulk_priority: BulkPriority = "nice"
# The nice value the operator gave the daemon (`nice -n 10 transferd serve`), read before the
# loop thread turns real-time: every thread the loop starts then begins at nice 0
# (SCHED_RESET_ON_FORK resets a real-time parent's children to the defaults).
_base_nice: int | None = None


def base_nice() -> int:
    """The process's nice value as it started, recorded on first use (`raise_loop_priority`
    records it before the loop turns real-time)."""
    global _base_nice
    if _base_nice is None:
        _base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    return _base_nice


def set_bulk_priority(policy: BulkPriority) -> str:
    """Set the policy of the bulk threads this process starts from now on; returns it as the
    daemon's `bulk.priority` log line says it."""
    global _bulk_priority
    base_nice()
    _bulk_priority = policy
    if not sys.platform.startswith("linux"):
        return f"normal ({policy} not applied: per-thread priority is Linux-only here)"
    if policy == "idle":
        refused = _idle_refused()
        if refused is None:
            return "idle (SCHED_IDLE: bulk threads run when nothing else on the host wants a CPU)"
        return (f"nice (+{BULK_THREAD_NICENESS}: bulk_priority idle asked, but SCHED_IDLE is "
                f"refused here: {refused})")
    return f"nice (+{BULK_THREAD_NICENESS})"


def _idle_refused() -> str | None:
    """Why this host refuses SCHED_IDLE (tried on a throwaway thread), or None."""
    out: list[str | None] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            out.append(None)
        except OSError as exc:  # a seccomp sandbox, a container without the syscall
            out.append(exc.strerror or str(exc))

    thread = threading.Thread(target=probe, name="probe-sched-idle", daemon=True)
    thread.start()
    thread.join()
    return out[0] if out else "the probe thread failed"


def raise_loop_priority(wanted: str = "realtime") -> str:
    """Put the calling thread (the event loop's) at SCHED_RR priority 1 when `wanted` is
    "realtime" and the host allows it; returns the policy in effect ("realtime" or "normal")
    and why, for the daemon's log line.

    Measured on interactive-during-bulk (benchmarks/README.md, issue 11 round 3): the loop's
    stalls were the loop thread waiting for a CPU, not for the GIL (its run-queue delay during
    each stall was the stall; it ran 0-6 ms of it). A normal thread competes for a core with
    every other process, and with autogroup scheduling the daemon's own bulk threads spend its
    session's share; the loop itself needs ~1 % of a core. SCHED_RESET_ON_FORK: no thread or
    child this thread starts inherits the policy (the bulk threads stay normal, at nice 10),
    and the kernel's real-time throttling still leaves other processes 5 % of each core should
    the loop ever spin."""
    if wanted != "realtime":
        return "normal (loop_priority: normal)"
    if not sys.platform.startswith("linux"):
        return "normal (real-time scheduling is Linux-only here)"
    base_nice()  # before the switch: the loop's threads start at nice 0, not the operator's
    try:
        os.sched_setscheduler(
            0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(LOOP_RT_PRIORITY)
        )
    except OSError as exc:  # no CAP_SYS_NICE and no RLIMIT_RTPRIO: the loop stays normal
        return f"normal ({exc.strerror or exc}: needs CAP_SYS_NICE or RLIMIT_RTPRIO >= 1)"
    return f"realtime (SCHED_RR {LOOP_RT_PRIORITY})"


def lower_thread_priority(policy: BulkPriority | None = None,
                          niceness: int = BULK_THREAD_NICENESS) -> None:
    """Thread initializer for bulk work (Linux; elsewhere nothing changes): give the thread its
    Python name in the kernel too (`top -H`, /proc/<pid>/task/*/comm show where the CPU goes)
    and lower its priority by `policy` (default: the process's, `set_bulk_priority`).

    "nice": the thread's nice value becomes the process's (`base_nice`) plus `niceness`, at
    most 19, whichever thread started it (a lowered one, or the real-time loop whose threads
    start at nice 0). That orders the daemon's own threads,
    but with autogroup scheduling (most desktop and server kernels) each session competes for
    the CPU as one entity whatever the nice values inside it, so it does not make the bulk give
    way to another process. "idle": SCHED_IDLE, the lowest weight the kernel has, and a thread
    that any normal thread waking on its CPU preempts at once and that the kernel counts as an
    idle CPU when it places a waking thread, across sessions and cgroups: an application's
    request, the TCP stack's softirq work, the loop, all run the moment they are runnable.
    Where SCHED_IDLE is refused, the thread falls back to `niceness`."""
    if not sys.platform.startswith("linux"):
        return
    _name_native_thread(threading.current_thread().name)
    if (policy or _bulk_priority) == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass  # a sandbox that forbids it: nice below still lowers the thread
    _set_nice(min(19, base_nice() + niceness))


def restore_base_priority() -> None:
    """Thread initializer for a thread that is not bulk work but may be started by the
    real-time loop (whose threads start at nice 0): the process's own nice value (`nice -n`),
    and its Python name in the kernel."""
    if not sys.platform.startswith("linux"):
        return
    _name_native_thread(threading.current_thread().name)
    _set_nice(base_nice())


def _set_nice(value: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:
        pass  # a sandbox may forbid it (or lowering a nice value needs CAP_SYS_NICE)


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


class ThreadSchedstat:
    """The opening thread's time on a CPU and time waiting in the run queue for one, in ns
    (Linux /proc/thread-self/schedstat), read again and again through one descriptor
    (`pread` at 0 regenerates the file): the loop-lag probe reads it every tick, and an
    open and close each time was a tenth of an idle loop's work. None elsewhere."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> tuple[int, int] | None:
        if self._fd is None:
            return None
        try:
            ran, waited = os.pread(self._fd, 128, 0).split()[:2]
        except (OSError, ValueError):
            return None
        return int(ran), int(waited)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
