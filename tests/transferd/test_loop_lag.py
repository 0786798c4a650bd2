"""The loop-lag probe (`net.loop_lag`) on a loop whose clock is virtual (time passes only when
the loop would sleep): 10 ms ticks while work moves, a few a second when the daemon is idle,
fast again at once on a sign of work or after a stall. Ticks are counted, not timed."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

from transferd.net.loop_lag import (
    LAG_HOLD_S,
    LAG_IDLE_TICK_S,
    LAG_TICK_S,
    LagPace,
    Stall,
    loop_waited,
    stall_of,
    watch_lag,
    work_seen,
)
from transferd.net.relay import RelayService
from transferd.net.sender import Sender


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A loop whose clock moves only where it would block: a wait of t seconds costs none."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.now = 1000.0
        self.wakes = 0  # times the loop slept and woke (time passed)
        real_select = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> Any:
            events = real_select(0)
            if not events and timeout:
                self.now += timeout
                self.wakes += 1
            return events

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now


Ticks = list[tuple[float, float | None]]


def run_probe(seconds: float, *, working: Callable[[], bool] = lambda: False,
              cpu_s: Callable[[], float] = lambda: 0.0, pace: LagPace | None = None,
              meanwhile: Callable[[VirtualTimeLoop], Coroutine[Any, Any, None]] | None = None,
              wakes: list[int] | None = None) -> tuple[Ticks, float]:
    """The probe's ticks (when, lag) over `seconds` of virtual time, and when it started;
    the loop's wake-ups appended to `wakes`."""
    loop = VirtualTimeLoop()
    ticks: Ticks = []

    async def main() -> float:
        start = loop.time()
        def on_tick(lag: float | None) -> bool:
            ticks.append((loop.time(), lag))
            return lag is not None and lag >= 0.02  # a stall (the daemon: the loop's own)

        probe = asyncio.create_task(watch_lag(on_tick, working=working, pace=pace, cpu_s=cpu_s))
        if meanwhile is not None:
            await meanwhile(loop)
        await asyncio.sleep(start + seconds - loop.time())
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        return start

    try:
        start = loop.run_until_complete(main())
    finally:
        loop.close()
    if wakes is not None:
        wakes.append(loop.wakes)
    return ticks, start


def test_an_idle_probe_wakes_the_loop_a_few_times_a_second_not_a_hundred() -> None:
    ticks, _ = run_probe(30.0)
    # A fixed 10 ms tick: 3000 wake-ups in 30 s (22-32 ms of CPU a second on the bench VM).
    assert 30 / LAG_IDLE_TICK_S - 2 <= len(ticks) <= 30 / LAG_IDLE_TICK_S + 1
    assert len(ticks) <= 5 * 30
    assert all(lag == 0.0 for _, lag in ticks)


def test_the_probe_ticks_every_10_ms_while_work_moves() -> None:
    ticks, _ = run_probe(2.0, working=lambda: True)
    assert 2 / LAG_TICK_S - 2 <= len(ticks) <= 2 / LAG_TICK_S + 1
    gaps = [b - a for (a, _), (b, _) in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) == pytest.approx(LAG_TICK_S)


def test_work_seen_wakes_an_idle_probe_at_once_and_holds_it_fast() -> None:
    async def message_at_10_1(loop: VirtualTimeLoop) -> None:
        await asyncio.sleep(10.1)
        work_seen()

    ticks, start = run_probe(20.0, meanwhile=message_at_10_1)
    seen = start + 10.1
    after = [(t, lag) for t, lag in ticks if t >= seen]
    # The idle wait it was in is cut short (it measured nothing), then 10 ms ticks at once.
    assert after[0] == (pytest.approx(seen), None)
    fast = [t for t, _ in after if t <= seen + LAG_HOLD_S]
    assert len(fast) >= LAG_HOLD_S / LAG_TICK_S - 2
    # Once the hold is over with nothing moving: idle ticks again.
    late = [t for t, _ in after if t > seen + LAG_HOLD_S + LAG_IDLE_TICK_S]
    assert len(late) <= (20.0 - 10.1 - LAG_HOLD_S) / LAG_IDLE_TICK_S + 1


def test_a_stall_is_measured_and_the_ticks_after_it_are_fast() -> None:
    async def stall_at_3(loop: VirtualTimeLoop) -> None:
        await asyncio.sleep(3.0 - 0.001)
        loop.now += 0.3  # a callback that held the loop 300 ms

    ticks, start = run_probe(6.0, meanwhile=stall_at_3)
    lags = [lag for _, lag in ticks if lag]
    # A stall over an idle tick's due time is measured whole (one between two ticks is not).
    assert lags
    assert max(lags) >= 0.05
    after = [t for t, _ in ticks if start + 3.3 < t < start + 6.0]
    assert len(after) >= (6.0 - 3.3) / LAG_TICK_S - 2


def test_a_process_busy_on_its_threads_counts_as_work() -> None:
    # A receiver: its channel threads take 40 % of a core, nothing on the loop says so.
    def cpu_s() -> float:
        return 0.4 * (asyncio.get_running_loop().time() - 1000.0)

    ticks, start = run_probe(3.0, cpu_s=cpu_s)
    # One idle window to notice it, then 10 ms ticks.
    fast = [t for t, _ in ticks if t > start + 2 * LAG_IDLE_TICK_S]
    assert len(fast) >= (3.0 - 2 * LAG_IDLE_TICK_S) / LAG_TICK_S - 2


def test_pace_alone() -> None:
    pace = LagPace()
    assert pace.next_tick_s(0.0, 0.0) == LAG_IDLE_TICK_S
    assert pace.next_tick_s(0.25, 0.001) == LAG_IDLE_TICK_S  # 0.4 % of a core: idle
    assert pace.next_tick_s(0.5, 0.1) == LAG_TICK_S  # 40 %: busy
    assert pace.next_tick_s(0.5 + LAG_HOLD_S + 0.3, 0.1) == LAG_IDLE_TICK_S
    assert pace.next_tick_s(10.0, 0.1, working=True) == LAG_TICK_S


@pytest.mark.parametrize("batches", [True, False])
def test_batches_the_loop_runs_anyway_are_samples_and_keep_the_timer_quiet(
    batches: bool,
) -> None:
    """A sender's channel threads wake the loop every 5 ms (a batch of receipts): each batch
    reports its wait (`loop_waited`) and the probe's timer, re-armed a tick later, never has
    to wake the loop itself. Without the batches' samples it would, 100 times a second."""
    async def batches_every_5_ms(loop: VirtualTimeLoop) -> None:
        async def run() -> None:
            await asyncio.sleep(0.003)  # out of step with the probe's own ticks
            for i in range(400):  # the last at 1.998 s: the task ends before the loop does
                if i:
                    await asyncio.sleep(0.005)
                if batches:
                    loop_waited(0.0002)

        asyncio.get_running_loop().create_task(run())

    wakes: list[int] = []
    ticks, _ = run_probe(2.0, working=lambda: True, meanwhile=batches_every_5_ms, wakes=wakes)
    if batches:
        assert wakes[0] <= 400 + 5  # the batches' own wake-ups, hardly one of the probe's
        assert sum(1 for _, lag in ticks if lag == pytest.approx(0.0002)) == 400
    else:
        assert wakes[0] >= 400 + 190  # the probe's timer: 100 more a second


@pytest.mark.parametrize("timer_first", [True, False], ids=["uvloop-order", "asyncio-order"])
def test_a_stall_a_batch_sat_behind_too_is_one_sample_of_its_whole_length(
    timer_first: bool,
) -> None:
    """A 100 ms stall while work moves; a batch of thread calls posted 42 ms before it ends
    runs right after it. uvloop runs the due timer first, then the batch; stdlib asyncio the
    batch first, the timer due. Either way one sample, the stall's length: not two (a stall
    logged twice, the second split over an empty window and charged as a GIL wait) and not
    the batch's 42 ms (the overdue timer cancelled unseen)."""
    async def stall_at_1(loop: VirtualTimeLoop) -> None:
        await asyncio.sleep(1.0 - 0.001)

        def stall() -> None:
            loop.now += 0.1
            if timer_first:  # after the probe's timer, due earlier, in the same iteration
                loop.call_at(loop.now, loop_waited, 0.042)
            else:
                loop.call_soon(loop_waited, 0.042)

        loop.call_soon(stall)

    ticks, start = run_probe(2.0, working=lambda: True, meanwhile=stall_at_1)
    during = [lag for t, lag in ticks if start + 1.0 <= t <= start + 1.1 + LAG_TICK_S / 2]
    assert len(during) == 1, during
    assert during[0] is not None
    assert during[0] >= 0.09


@pytest.mark.parametrize(
    ("ran_ms", "cpu_wait_ms", "gil_wait_ms", "loops_own"),
    [(40.0, 1.0, 9.0, True), (1.0, 1.0, 48.0, True), (1.0, 45.0, 4.0, False)],
    ids=["the-loop-ran", "gil-wait", "host-run-queue"],
)
def test_a_stall_holds_fast_ticks_unless_it_was_the_hosts_run_queue(
    ran_ms: float, cpu_wait_ms: float, gil_wait_ms: float, loops_own: bool
) -> None:
    """A 50 ms stall of an idle daemon: the loop's own (it ran, or waited for the GIL) keeps
    the probe at 10 ms for a while; one spent waiting for a CPU (a loaded host, where idle
    loops are late every second) does not, or the fast ticks would never end there."""
    stall = stall_of(0.05, 0.06, ran_ms / 1e3, cpu_wait_ms / 1e3)
    assert stall.loops_own is loops_own
    assert stall.gil_wait_s == pytest.approx(gil_wait_ms / 1e3)
    assert stall_of(0.05, 0.06, None, None) == Stall(0.05, None, None, 0.0, True)


def test_no_gil_wait_is_charged_from_a_window_shorter_than_the_stall() -> None:
    """The sample before was taken inside this stall (its schedstat window starts there): what
    the loop did before the window is unknown, not a GIL wait. A 91 ms lag over a window of
    0.1 ms read 91 ms of GIL wait, spending `adaptive`'s budget with no GIL wait at all."""
    stall = stall_of(0.091, 0.0001, 0.0001, 0.0)
    assert stall.gil_wait_s == 0.0
    assert stall.loops_own
    assert not stall_of(0.091, 0.01, 0.001, 0.008).loops_own  # the window: the host's


def test_a_chunk_passing_a_relay_wakes_its_idle_probe() -> None:
    """A relay's loop gets no receipts or digests of its own: a chunk it forwards (`_ready`,
    on the loop, at each chunk's header) is the sign of work that makes its probe tick fast."""
    relayed = SimpleNamespace(next_hop="B")

    async def ensure(peer: str) -> None:
        return None

    relay = SimpleNamespace(_relayed=lambda upload, peer: relayed, _ensure=ensure)

    async def chunk_at_10_1(loop: VirtualTimeLoop) -> None:
        await asyncio.sleep(10.1)
        head = SimpleNamespace(upload="u1")
        assert await RelayService._ready(relay, head, "A") is relayed  # type: ignore[arg-type]

    ticks, start = run_probe(12.0, meanwhile=chunk_at_10_1)
    after = [(t, lag) for t, lag in ticks if t >= start + 10.1]
    assert after[0] == (pytest.approx(start + 10.1), None)  # the idle wait cut short
    assert len(after) >= (12.0 - 10.1) / LAG_TICK_S - 2


def test_a_job_waiting_out_a_retry_is_not_work_moving() -> None:
    """`Sender.busy` (the probe's `working`): a job in a retry's backoff (noted, nothing gone
    through since) moves nothing; fast ticks for it were a daemon's idle cost for as long
    as a peer stays down."""
    assert Sender.busy(SimpleNamespace(_running={"j1"}, _noted=set()))  # type: ignore[arg-type]
    retrying = SimpleNamespace(_running={"j1"}, _noted={"j1"})
    assert not Sender.busy(retrying)  # type: ignore[arg-type]
    both = SimpleNamespace(_running={"j1", "j2"}, _noted={"j1"})
    assert Sender.busy(both)  # type: ignore[arg-type]
