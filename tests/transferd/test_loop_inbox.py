"""`LoopInbox`: the sending channel threads' calls into the event loop (a send starts, a
one-pass digest, a receipt) run in the order posted, one wake-up of the loop for all that is
pending; a send's start (`post_later`) wakes nothing and rides with the next call."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest

from transferd.net import channels
from transferd.net.channels import LoopBatches, LoopInbox
from transferd.net.loop_lag import LagPace, watch_lag


async def test_calls_posted_while_the_loop_is_busy_run_in_order_in_one_wake() -> None:
    loop = asyncio.get_running_loop()
    inbox = LoopInbox(loop)
    ran: list[tuple[str, int]] = []
    posted = threading.Event()

    def channel_thread() -> None:
        for i in range(4):
            inbox.post_later(ran.append, ("on_wire", i))
            inbox.post(ran.append, ("digest", i))
            inbox.post(ran.append, ("receipt", i))
        posted.set()

    def busy_loop() -> None:  # the loop runs a callback meanwhile: nothing of it runs yet
        assert posted.wait(10)

    loop.call_soon(busy_loop)
    await asyncio.to_thread(channel_thread)
    await asyncio.sleep(0)
    assert ran == [(kind, i) for i in range(4) for kind in ("on_wire", "digest", "receipt")]
    assert inbox.wakes == 1  # a call_soon_threadsafe each: 8 wakes (12 with the sends' starts)


async def test_a_send_start_wakes_nothing_and_rides_with_the_next_call_or_flush() -> None:
    loop = asyncio.get_running_loop()
    inbox = LoopInbox(loop)
    ran: list[str] = []
    await asyncio.to_thread(inbox.post_later, ran.append, "on_wire 1")
    await asyncio.sleep(0.05)
    assert ran == []
    assert inbox.wakes == 0
    inbox.flush()  # the loop-lag probe's tick
    assert ran == ["on_wire 1"]
    await asyncio.to_thread(inbox.post_later, ran.append, "on_wire 2")
    await asyncio.to_thread(inbox.post, ran.append, "receipt 2")
    await asyncio.sleep(0)
    assert ran == ["on_wire 1", "on_wire 2", "receipt 2"]
    assert inbox.wakes == 1


async def test_a_failing_call_is_reported_and_the_rest_of_its_batch_runs() -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        inbox = LoopInbox(loop)
        ran: list[int] = []

        def broken() -> None:
            raise ValueError("bad booking")

        inbox.post_later(broken)
        await asyncio.to_thread(inbox.post, ran.append, 1)
        await asyncio.sleep(0)
        assert ran == [1]
        assert isinstance(seen[0]["exception"], ValueError)
    finally:
        loop.set_exception_handler(None)


def test_a_closed_loop_drops_the_calls_without_raising_in_the_channel_thread() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    inbox = LoopInbox(loop)
    inbox.post(time.sleep, 0)  # the daemon is gone: nothing to book, nothing raised
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(time.sleep, 0)


@contextlib.asynccontextmanager
async def _batch_probe() -> AsyncIterator[list[float | None]]:
    """The lag probe with ticks an hour long, so every sample it takes while the test runs is
    a batch's (`loop_waited`), not the timer's: the samples, in order."""
    samples: list[float | None] = []

    def on_tick(lag: float | None) -> bool:
        samples.append(lag)
        return False

    probe = asyncio.create_task(watch_lag(
        on_tick, pace=LagPace(tick_s=3600.0, idle_tick_s=3600.0)))
    await asyncio.sleep(0)
    try:
        yield samples
    finally:
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe


async def test_a_batch_reports_its_wait_for_the_loop_to_the_lag_probe() -> None:
    """The wake a batch makes anyway is a lag sample (`loop_waited`): the calls' wait from
    asking for the wake to running, for `LoopInbox` (sender) and `LoopBatches` (receiver)."""
    loop = asyncio.get_running_loop()
    async with _batch_probe() as samples:
        inbox = LoopInbox(loop)
        ran: list[int] = []
        posted = threading.Event()

        def channel_thread() -> None:
            inbox.post(ran.append, 1)
            posted.set()

        def busy_loop() -> None:  # the loop runs a callback 30 ms long after the post
            assert posted.wait(10)
            time.sleep(0.03)

        loop.call_soon(busy_loop)
        await asyncio.to_thread(channel_thread)
        await asyncio.sleep(0)
        assert ran == [1]
        assert len(samples) == 1
        assert samples[0] is not None
        assert samples[0] >= 0.03  # at least the busy callback it waited behind
        batches: LoopBatches[int] = LoopBatches(lambda items: None)
        await asyncio.to_thread(batches.run, loop, 1)
        assert len(samples) == 2


class _Clock:
    """`time` for `net.channels` with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


async def test_a_batch_s_wait_ends_when_it_is_taken_not_after_it_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait a batch reports is from its wake's request to the batch being taken: not its
    own calls' run (a second here), and not from the wake a call posted meanwhile asks for."""
    clock = _Clock()
    monkeypatch.setattr(channels, "time", clock)
    async with _batch_probe() as samples:
        inbox = LoopInbox(asyncio.get_running_loop())
        ran: list[int] = []

        def slow_call() -> None:  # a second on the loop, a post half way through
            clock.now += 0.5
            inbox.post(ran.append, 2)
            clock.now += 0.5

        await asyncio.to_thread(inbox.post, slow_call)
        for _ in range(3):
            await asyncio.sleep(0)
        assert ran == [2]
        assert samples == [0.0, 0.5]


class _SlowWake:
    """A loop whose first `call_soon_threadsafe` is held until `go`: the thread that asked for
    the wake paused between its post and the wake reaching the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.entered = threading.Event()
        self.go = threading.Event()

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> object:
        if not self.entered.is_set():
            self.entered.set()
            assert self.go.wait(10)
        return self.loop.call_soon_threadsafe(callback, *args)


async def test_a_call_that_joins_a_batch_runs_before_what_its_thread_hands_the_loop_next() -> None:
    """Channel thread 1 posts and asks for the wake; channel thread 2 posts a one-pass digest
    into the same batch, then its chunk's end reaches the loop another way (a stray's
    `asyncio.wrap_future`, which `_late_digests` awaits, then checks the digests). The digest
    must run first, or a second digest (a source that changed) is missed. Before, thread 2
    returned at once and its end overtook the wake thread 1 had not made yet."""
    loop = asyncio.get_running_loop()
    slow = _SlowWake(loop)
    inbox = LoopInbox(cast(asyncio.AbstractEventLoop, slow))
    ran: list[str] = []
    second_done = threading.Event()

    def first() -> None:
        inbox.post(ran.append, "receipt 1")

    def second() -> None:
        assert slow.entered.wait(10)
        inbox.post(ran.append, "digest 2")
        loop.call_soon_threadsafe(ran.append, "end 2")
        second_done.set()

    def release() -> None:  # thread 1 goes on once thread 2 is done or held
        second_done.wait(0.5)
        slow.go.set()

    await asyncio.gather(asyncio.to_thread(first), asyncio.to_thread(second),
                         asyncio.to_thread(release))
    for _ in range(3):
        await asyncio.sleep(0)
    assert ran == ["receipt 1", "digest 2", "end 2"]


class _Interrupt(BaseException):
    pass


def test_a_call_that_raises_a_base_exception_lets_the_rest_of_its_batch_run() -> None:
    """A KeyboardInterrupt-like exception out of one call is raised after the calls taken with
    it ran: each was a loop callback of its own before, and a booking lost here is a send
    bytes_on_wire never counts."""
    loop = asyncio.new_event_loop()
    try:
        inbox = LoopInbox(loop)
        ran: list[int] = []

        def interrupted() -> None:
            raise _Interrupt

        inbox.post_later(ran.append, 1)
        inbox.post_later(interrupted)
        inbox.post_later(ran.append, 2)
        with pytest.raises(_Interrupt):
            inbox.flush()
        assert ran == [1, 2]
    finally:
        loop.close()
