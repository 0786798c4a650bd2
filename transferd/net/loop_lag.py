"""The event loop's lag probe: a timer armed again and again; how late it fires is how long
anything queued on the loop (a message, a control request, a chunk's receipt) waited for it.

Theory of operation. Each tick costs a wake-up of the loop (110-230 us of CPU on the benchmark
VM, round 12): at a fixed 10 ms tick an idle daemon burnt 22-32 ms of CPU a second on it. The
lag matters while something waits on the loop, so the tick is `LAG_TICK_S` while work moves
and `LAG_IDLE_TICK_S` when the daemon is idle (`LagPace`, sans-IO: time and CPU are
parameters). Work moves while the caller says so (jobs running); for `LAG_HOLD_S` after a sign
of it (`work_seen`: a message, a job starting, an upload opened here; a batch of calls from
the channel threads; a stall the caller counts as the loop's own, not the host's run queue:
on a loaded host an idle loop is often late by a CPU wait alone); and while the process's
threads other than the loop's spend `LAG_BUSY_CPU_SHARE` of a core or more, over windows of
at least `LAG_IDLE_TICK_S` (the loop's own CPU is left out: the fast ticks' cost must not keep
them fast). A sign of work wakes an idle probe at once: fast ticks start with the work.

While work moves, the wakes the loop makes anyway carry the samples: a batch of calls from
the channel threads (`loop_waited`) reports how long it waited for the loop, and re-arms the
probe's timer a tick later, so the timer wakes the loop only in gaps of more than a tick.

What the metric means, then: `transferd_event_loop_lag_seconds` has one sample per tick (the
timer's lateness) and one per batch of thread calls (the batch's wait for the loop, from the
call that asked for the wake to the batch being taken): at least one per 10 ms while work
moves, one per `LAG_IDLE_TICK_S` otherwise, so its counts are mostly the busy times' (a share
of late samples is a share of those). A stall that both the timer and a batch sat behind is
one sample, the larger of the two lags. An idle daemon's stall is seen only when it covers a
tick's due time: one that starts and ends between two idle ticks is missed. A stall is split
(`stall_of`) by the loop thread's run and run-queue times since the sample before it: a
window that may be longer than the stall (its GIL wait then reads low, never high), or
shorter (no GIL wait is then charged).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "LAG_BUSY_CPU_SHARE",
    "LAG_HOLD_S",
    "LAG_IDLE_TICK_S",
    "LAG_TICK_S",
    "LagPace",
    "Stall",
    "loop_waited",
    "stall_of",
    "watch_lag",
    "work_seen",
]

LAG_TICK_S = 0.01  # the probe's timer while work moves (the stall resolution kept)
LAG_IDLE_TICK_S = 0.25  # and while the daemon is idle: 4 wake-ups a second instead of 100
# Fast ticks go on this long after the last sign of work: a job's gaps (between chunks, a
# commit's round trip) and the stalls that follow one another stay at full resolution.
LAG_HOLD_S = 5.0
# CPU of the process's threads other than the loop's, as a share of one core, above which the
# daemon counts as working (an idle daemon's: ~0; a receiving one's channel threads: tens of %).
LAG_BUSY_CPU_SHARE = 0.05


class LagPace:
    """When the lag probe fires next (sans-IO). `next_tick_s(now, cpu_s, working)` after each
    tick: the interval to the next one; `work_seen(now)` on a sign of work."""

    def __init__(self, tick_s: float = LAG_TICK_S, idle_tick_s: float = LAG_IDLE_TICK_S,
                 hold_s: float = LAG_HOLD_S, busy_cpu_share: float = LAG_BUSY_CPU_SHARE) -> None:
        self.tick_s = tick_s
        self.idle_tick_s = idle_tick_s
        self.hold_s = hold_s
        self.busy_cpu_share = busy_cpu_share
        self._busy_until = -math.inf
        self._window: tuple[float, float] | None = None  # (start, process CPU-s then)

    def work_seen(self, now: float) -> None:
        self._busy_until = max(self._busy_until, now + self.hold_s)

    def fast(self, now: float) -> bool:
        return now < self._busy_until

    def next_tick_s(self, now: float, cpu_s: float, working: bool = False) -> float:
        if working:
            self.work_seen(now)
        if self._window is None:
            self._window = (now, cpu_s)
        else:
            start, cpu0 = self._window
            if now - start >= self.idle_tick_s:
                if (cpu_s - cpu0) / (now - start) >= self.busy_cpu_share:
                    self.work_seen(now)
                self._window = (now, cpu_s)
        return self.tick_s if self.fast(now) else self.idle_tick_s


class Stall(NamedTuple):
    """What a late sample's wait was (`stall_of`), in seconds."""

    lag_s: float
    ran_s: float | None  # the loop thread on a CPU, over the window (None: no schedstat)
    cpu_wait_s: float | None  # in the host's run queue for one
    gil_wait_s: float  # neither, inside the stall: asleep, waiting for the GIL (0: unknown)
    loops_own: bool  # ran or waited for the GIL, not mostly the host's: fast ticks after it


def stall_of(lag_s: float, window_s: float, ran_s: float | None,
             cpu_wait_s: float | None) -> Stall:
    """A stall of `lag_s` split by the loop thread's run and run-queue times (schedstat) over a
    window of `window_s` ending now, since the sample before. The window may be longer than
    the stall (the GIL wait then reads low, never high); when it is shorter (the sample
    before was taken inside this one's wait), the part before it is unknown: no GIL wait is
    charged from it, and whose stall it was is judged on the window alone."""
    if ran_s is None or cpu_wait_s is None:
        return Stall(lag_s, None, None, 0.0, True)
    if window_s >= lag_s:
        gil_wait_s = max(0.0, lag_s - ran_s - cpu_wait_s)
        return Stall(lag_s, ran_s, cpu_wait_s, gil_wait_s, cpu_wait_s < lag_s / 2)
    return Stall(lag_s, ran_s, cpu_wait_s, 0.0, cpu_wait_s < window_s / 2)


# The probes running in this process (a test may run two daemons in one), for `work_seen` and
# `loop_waited`.
_probes: weakref.WeakSet[_Probe] = weakref.WeakSet()


class _Probe:
    """One loop's probe: its timer (re-armed by `loop_waited`), the coroutine's wait it wakes.

    One stall gives one sample. A timer that fired leaves its lag in `fired` for the coroutine
    (woken through `wait`); a `loop_waited` that runs first (uvloop runs due timers before the
    ready queue, so the batch queued during the stall runs after the timer, before the
    coroutine) takes it instead: one sample, the larger lag. A timer due but not yet run
    (stdlib asyncio runs the ready queue first) is cancelled the same way, its lateness
    counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pace: LagPace,
                 on_tick: Callable[[float | None], bool], working: Callable[[], bool],
                 cpu_s: Callable[[], float]) -> None:
        self.loop = loop
        self.pace = pace
        self.on_tick = on_tick
        self.working = working
        self.cpu_s = cpu_s
        self.interval = 0.0
        self.due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.fired: float | None = None  # the timer's lag, not yet reported
        self.cut = False  # an idle wait cut short by `work_seen`, not yet reported
        self.wait: asyncio.Future[None] | None = None  # the coroutine's
        self.ticks = 0  # the probe's own wake-ups (its timer fired)

    def arm(self) -> None:
        now = self.loop.time()
        self.interval = self.pace.next_tick_s(now, self.cpu_s(), self.working())
        self.due = now + self.interval
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(self.due, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.ticks += 1
        self.fired = max(0.0, self.loop.time() - self.due)
        self._wake()

    def _wake(self) -> None:
        if self.wait is not None and not self.wait.done():
            self.wait.set_result(None)

    def pending(self) -> bool:
        return self.fired is not None or self.cut

    def report_pending(self) -> None:
        """In the coroutine: the timer's sample, or an idle wait cut short (None)."""
        if self.fired is not None:
            lag, self.fired, self.cut = self.fired, None, False
            self.tick(lag)
        elif self.cut:
            self.cut = False
            self.tick(None)

    def sample(self, lag_s: float) -> None:
        """A sample from a wake the loop made anyway; a timer fired or due now measured the
        same wait (a stall both sat behind): one sample of the two, the larger."""
        now = self.loop.time()
        if self.fired is not None:
            lag_s = max(lag_s, self.fired)
        elif self.timer is not None and now >= self.due:
            lag_s = max(lag_s, now - self.due)  # `arm` cancels it
        self.fired, self.cut = None, False
        self.pace.work_seen(now)  # chunks move
        self.tick(lag_s)

    def tick(self, lag: float | None) -> None:
        if self.on_tick(lag):
            self.pace.work_seen(self.loop.time())
        self.arm()

    def poke(self) -> None:
        self.pace.work_seen(self.loop.time())
        if self.interval > self.pace.tick_s and self.timer is not None and not self.pending():
            self.cut = True
            self._wake()


def work_seen() -> None:
    """On a loop: work starts (a message, a job): every probe on this loop ticks fast from now
    for `LAG_HOLD_S`, an idle one woken at once."""
    loop = asyncio.get_running_loop()
    for probe in list(_probes):
        if probe.loop is loop:
            probe.poke()


def loop_waited(lag_s: float) -> None:
    """On a loop, from a wake-up it made anyway (a batch of calls from threads, `LoopInbox`,
    `LoopBatches`): the calls waited `lag_s` between asking for the wake and running. That
    is a sample of the same lag the probe's timer measures: it is reported as a tick (one
    with the timer's, when that fired or is due too: the same stall), and the probe's timer
    is re-armed a tick from now, so while such wakes come at least every tick the probe's
    timer never has to wake the loop itself."""
    loop = asyncio.get_running_loop()
    for probe in list(_probes):
        if probe.loop is loop:
            probe.sample(lag_s)


async def watch_lag(
    on_tick: Callable[[float | None], bool],
    working: Callable[[], bool] = lambda: False,
    pace: LagPace | None = None,
    cpu_s: Callable[[], float] | None = None,
) -> None:
    """Run the probe on the running loop until cancelled: `on_tick(lag_s)` after every tick,
    its timer's or a `loop_waited` sample (None for an idle wait cut short by `work_seen`:
    it measured nothing), True when that lag counts as work seen (a stall of the loop's own:
    stalls tend to follow one another); `working()` asked after each: work is moving."""
    loop = asyncio.get_running_loop()
    probe = _Probe(loop, pace or LagPace(), on_tick, working, cpu_s or _other_threads_cpu_s)
    _probes.add(probe)
    try:
        probe.arm()
        while True:
            if not probe.pending():
                probe.wait = loop.create_future()
                await probe.wait
                probe.wait = None
            probe.report_pending()  # nothing when a `loop_waited` took it first
    finally:
        _probes.discard(probe)
        if probe.timer is not None:
            probe.timer.cancel()


def _other_threads_cpu_s() -> float:
    """On the loop's thread: the process's CPU-s but this thread's."""
    return time.process_time() - time.thread_time()
