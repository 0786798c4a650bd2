"""Threads for bulk chunk work (hashing, zstd, decompression, pwrite) at a lower CPU priority.

On a host with few cores, bulk chunk work can take every core and the event loop thread that
serves control and interactive messages waits for one, and so do the host's other processes
(an application sending interactive messages through the daemon, among them). Linux keeps a
scheduling policy per thread, so these threads yield the CPU to the loop and to whatever else
the host must keep responsive (`traffic.bulk_priority`).

Theory of operation of `adaptive` (opt-in; `nice` is the default): SCHED_IDLE keeps a waking
application ahead of the bulk across sessions, where nice +10 does not (autogroup scheduling
weighs each session alike), but on a host whose cores are busy all the time it starves the bulk,
and a starved bulk thread holding the GIL holds up the loop. So the bulk threads run at
SCHED_IDLE only while interactive traffic is live (`InteractiveWindow`: a message sent, received
or in flight within the last `INTERACTIVE_HOLD_S`) and at nice +10 otherwise; with no message
there is nothing for SCHED_IDLE to protect. The loop (`net.bulk_priority`) switches every
registered bulk thread (`BulkThreads`) at the change, one `sched_setscheduler` per thread and
none in between: no check in the bulk code and no wait for a piece boundary (8 MiB is ~70 ms at
1 Gbit/s). A loop stall that was a GIL wait while the bulk ran idle counts against a budget
(`GIL_WAIT_BUDGET_S`, refilled at `GIL_WAIT_REFILL`): spent, it suspends idle for
`GIL_BACKOFF_S` the first time, and after that twice the last suspension (`GIL_BACKOFF_MAX_S`
at most) unless the bulk has since run at SCHED_IDLE, messages moving, for at least the last
suspension's length without spending the budget: each such clean stretch halves it instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

__all__ = [
    "BULK_THREAD_NICENESS",
    "GIL_BACKOFF_MAX_S",
    "GIL_BACKOFF_S",
    "GIL_WAIT_BUDGET_S",
    "INTERACTIVE_HOLD_S",
    "LOOP_RT_PRIORITY",
    "BulkPriority",
    "BulkThreads",
    "InteractiveWindow",
    "bulk_threads",
    "bulk_priority_in_effect",
    "bulk_executor",
    "base_nice",
    "lower_thread_priority",
    "raise_loop_priority",
    "restore_base_priority",
    "set_bulk_priority",
]

BulkPriority = Literal["adaptive", "idle", "nice"]

log = logging.getLogger("transferd.daemon")

BULK_THREAD_NICENESS = 10
LOOP_RT_PRIORITY = 1  # the lowest real-time priority: above every normal thread, below the rest
# How long after the last message the bulk stays at SCHED_IDLE: messages come in bursts (a
# request and its answers, an inference client's stream), and every first message of a burst
# waits behind the bulk until it switches; switching itself costs microseconds.
INTERACTIVE_HOLD_S = 1.0
# After a loop stall that was a wait for the GIL while the bulk ran idle (a starved idle thread
# held it), the bulk stays at nice for this long, messages or not ...
GIL_BACKOFF_S = 10.0
# ... and twice as long each time it backs off again, up to this, unless the bulk has run
# clean at SCHED_IDLE (messages moving, budget not spent) for the last suspension's length
# since it ended (then half as long): on a host busy all the time, a fixed 10 s put a stall of
# over 100 ms on the messages every ~10.4 s, each right after the suspension ended (the
# round-11 review, benchmarks/README.md); doubling makes that 6 stalls in 10 minutes instead of
# ~58. Time without messages does not count as clean: the bulk was not idle then, so it says
# nothing about the host (with a message every 25 s, resetting after a quiet stretch paid a
# 10 s backoff and its stall on every message; round-12 review).
GIL_BACKOFF_MAX_S = 320.0
# The loop's GIL waits behind idle bulk threads that trigger it: a leaky bucket of 100 ms that
# drains at 5 % of the loop's time. One 20-30 ms wait happens on a loaded 2-core host now and
# then (measured: benchmarks/README.md, round 11) and a 10 s backoff for it cost the messages
# the idle policy for the rest of their burst; the starved case (round 6's spoiled runs) waited
# 200-390 ms per run and spends it within a second or two.
GIL_WAIT_BUDGET_S = 0.1
GIL_WAIT_REFILL = 0.05

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
    if policy == "nice":
        return f"nice (+{BULK_THREAD_NICENESS})"
    refused = _idle_refused(leave=policy == "adaptive")
    if refused is not None:
        _bulk_priority = "nice"
        return (f"nice (+{BULK_THREAD_NICENESS}: bulk_priority {policy} asked, but {refused})")
    if policy == "idle":
        return "idle (SCHED_IDLE: bulk threads run when nothing else on the host wants a CPU)"
    return (f"adaptive (SCHED_IDLE while a message was sent or received in the last "
            f"{INTERACTIVE_HOLD_S:g} s, nice +{BULK_THREAD_NICENESS} otherwise)")


def _idle_refused(leave: bool = False) -> str | None:
    """Why this host refuses SCHED_IDLE (tried on a throwaway thread at the bulk's nice), or,
    with `leave`, refuses a bulk thread's way back from it (that needs CAP_SYS_NICE or an
    RLIMIT_NICE that allows the thread's nice value), or None."""
    out: list[str | None] = []

    def probe() -> None:
        _set_nice(min(19, base_nice() + BULK_THREAD_NICENESS))
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:  # a seccomp sandbox, a container without the syscall
            out.append(f"SCHED_IDLE is refused here: {exc.strerror or exc}")
            return
        if leave:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except OSError as exc:
                out.append(f"leaving SCHED_IDLE is refused here: {exc.strerror or exc} (needs "
                           "CAP_SYS_NICE or RLIMIT_NICE)")
                return
        out.append(None)

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
    Where SCHED_IDLE is refused, the thread falls back to `niceness`. "adaptive": "nice", and
    the thread joins `bulk_threads()`, which the loop switches to SCHED_IDLE and back as
    interactive traffic comes and goes."""
    if not sys.platform.startswith("linux"):
        return
    _name_native_thread(threading.current_thread().name)
    wanted = policy or _bulk_priority
    _set_nice(min(19, base_nice() + niceness))  # kept through SCHED_IDLE, for the way back
    if wanted == "adaptive":
        _bulk_threads.register()
    elif wanted == "idle":
        with contextlib.suppress(OSError):  # a sandbox that forbids it: the nice above holds
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


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


class InteractiveWindow:
    """Whether the bulk should give way now (sans-IO: every call takes `now`, a monotonic
    time): interactive traffic is live while a message is in flight or one was sent or
    received less than `hold_s` ago, unless a GIL stall suspended that (`backoff`)."""

    def __init__(self, hold_s: float = INTERACTIVE_HOLD_S,
                 backoff_s: float = GIL_BACKOFF_S,
                 backoff_max_s: float = GIL_BACKOFF_MAX_S) -> None:
        self.hold_s = hold_s
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_s, backoff_max_s)
        self.suspended_for_s = 0.0  # the last suspension's length (0: none yet)
        self.in_flight = 0
        self._last = -math.inf
        self._suspended_until = -math.inf
        self._gil_waited = 0.0  # the bucket's level, at `_gil_at`
        self._gil_at = -math.inf
        # Time the window has been live (the bulk at SCHED_IDLE) since the last suspension
        # ended, every second of it without the budget spent (a spent one backs off and
        # starts it again), counted up to `_clean_at`.
        self.clean_idle_s = 0.0
        self._clean_at = -math.inf

    def _count_clean(self, now: float) -> None:
        """Add the time the window was live from `_clean_at` to `now` (its state unchanged
        in between: called before every change)."""
        if self._clean_at == -math.inf:  # the first call: nothing live before it
            self._clean_at = now
            return
        since = max(self._clean_at, self._suspended_until)
        if now > since:
            until = now if self.in_flight > 0 else min(now, self._last + self.hold_s)
            self.clean_idle_s += max(0.0, until - since)
        self._clean_at = max(self._clean_at, now)

    def seen(self, now: float) -> None:
        self._count_clean(now)
        self._last = max(self._last, now)

    def started(self, now: float) -> None:
        self.seen(now)  # counts the clean time up to now, before the change
        self.in_flight += 1

    def finished(self, now: float) -> None:
        self.seen(now)
        self.in_flight = max(0, self.in_flight - 1)

    def backoff(self, now: float) -> None:
        """Suspend idle from `now`: for `backoff_s` the first time; after that for twice the
        last suspension (at most `backoff_max_s`), unless the window has been live since that
        one ended for at least its length without the budget spent: then half of it (at
        least `backoff_s`), and half again for each further such length."""
        self._count_clean(now)
        length = self.suspended_for_s
        if length == 0.0:
            length = self.backoff_s
        elif self.clean_idle_s < length:
            length = min(2 * length, self.backoff_max_s)
        else:
            clean = self.clean_idle_s
            while clean >= length and length > self.backoff_s:
                clean -= length
                length = max(self.backoff_s, length / 2)
        self.suspended_for_s = length
        self._suspended_until = now + length
        self._gil_waited = 0.0
        self.clean_idle_s = 0.0

    def gil_waited(self, now: float, wait_s: float) -> bool:
        """The loop waited `wait_s` for the GIL while the bulk ran idle: True (and backed off)
        once those waits spent the budget."""
        drained = (now - self._gil_at) * GIL_WAIT_REFILL if self._gil_at > -math.inf else 0.0
        self._gil_waited = max(0.0, self._gil_waited - drained) + wait_s
        self._gil_at = now
        if self._gil_waited < GIL_WAIT_BUDGET_S:
            return False
        self.backoff(now)
        return True

    def yield_to_interactive(self, now: float) -> bool:
        if now < self._suspended_until:
            return False
        return self.in_flight > 0 or now < self._last + self.hold_s

    def next_deadline(self, now: float) -> float | None:
        """When `yield_to_interactive` may next change by time alone (None: not by time)."""
        if now < self._suspended_until:
            return self._suspended_until
        if self.in_flight == 0 and now < self._last + self.hold_s:
            return self._last + self.hold_s
        return None


class BulkThreads:
    """The process's bulk threads under `adaptive`, and the policy they run at: the loop
    switches them all at once (`set_idle`), a thread that joins later starts at the current
    one (`register`). One lock orders the two; a syscall per thread only on a change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._prune_at = 64
        self.idle = False
        self.switches = 0
        self._logged: set[bool] = set()

    def register(self) -> None:
        """Called by the bulk thread itself, already at the bulk's nice."""
        with self._lock:
            if len(self._threads) >= self._prune_at:  # threads that came and went (channel-in)
                self._threads = {t: th for t, th in self._threads.items() if th.is_alive()}
                self._prune_at = 2 * len(self._threads) + 64
            self._threads[threading.get_native_id()] = threading.current_thread()
            # Always: a thread started by a bulk thread while the bulk was idle was born at
            # SCHED_IDLE, and a switch back made before it got here passed it by.
            _apply(0, idle=self.idle)

    def __len__(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads.values())

    def set_idle(self, idle: bool, why: str) -> None:
        with self._lock:
            if idle == self.idle:
                return
            self.idle = idle
            self.switches += 1
            for tid, thread in list(self._threads.items()):
                # A thread that ended leaves the set before its id can name another thread.
                if not thread.is_alive() or not _apply(tid, idle=idle):
                    del self._threads[tid]
            count = len(self._threads)
        if idle not in self._logged:  # each policy once, with the number of threads it moved
            self._logged.add(idle)
            log.info("bulk.priority_in_use", extra={"fields": {
                "policy": "idle" if idle else "nice", "threads": count, "why": why}})


def _apply(tid: int, *, idle: bool) -> bool:
    """Thread `tid` (0: the caller) to SCHED_IDLE or back to the normal policy; its nice value
    stays as set (the kernel keeps it across SCHED_IDLE). False if the thread is gone."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
    except ProcessLookupError:
        return False
    except OSError as exc:  # the probe at start-up makes this rare (a limit changed since)
        global _refusal_logged
        if not _refusal_logged:
            _refusal_logged = True
            log.warning("bulk.priority_refused", extra={"fields": {
                "to": "idle" if idle else "nice", "error": exc.strerror or str(exc)}})
    return True


_refusal_logged = False


_bulk_threads = BulkThreads()


def bulk_threads() -> BulkThreads:
    return _bulk_threads


def bulk_priority_in_effect() -> BulkPriority:
    """The policy `set_bulk_priority` put in effect ("nice" where the one asked is refused)."""
    return _bulk_priority


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
