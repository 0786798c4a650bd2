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
    "lower_thread_priority",
    "raise_loop_priority",
    "set_bulk_priority",
]

BulkPriority = Literal["idle", "nice"]

BULK_THREAD_NICENESS = 10
LOOP_RT_PRIORITY = 1  # the lowest real-time priority: above every normal thread, below the rest

# The policy of bulk threads started from now on in this process: `transferd serve` sets it from
# `traffic.bulk_priority` before the daemon starts; a daemon run inside another program (tests,
# embedding) keeps the milder nice +10 unless that program asks.
_bulk_priority: BulkPriority = "nice"


def set_bulk_priority(policy: BulkPriority) -> str:
    """Set the policy of the bulk threads this process starts from now on; returns it as the
    daemon's `bulk.priority` log line says it."""
    global _bulk_priority
    _bulk_priority = policy
    if policy == "idle":
        return "idle (SCHED_IDLE: bulk threads run when nothing else on the host wants a CPU)"
    return f"nice (+{BULK_THREAD_NICENESS})"


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

    "nice": add `niceness` to the thread's nice value. That orders the daemon's own threads,
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
