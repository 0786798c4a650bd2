"""Bulk chunk threads run at a lower CPU priority than the event loop's thread (Linux)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from transferd.net import bulk_priority
from transferd.site import threads
from transferd.site.threads import (
    BULK_THREAD_NICENESS,
    LOOP_RT_PRIORITY,
    BulkPriority,
    bulk_executor,
    lower_thread_priority,
    raise_loop_priority,
    restore_base_priority,
    set_bulk_priority,
)

T = TypeVar("T")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_bulk_threads_are_nicer_than_the_calling_thread() -> None:
    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_nice()
    with bulk_executor(2, "test-bulk") as pool:
        worker_nice = pool.submit(own_nice).result(timeout=10)
    assert worker_nice == min(before + BULK_THREAD_NICENESS, 19)
    assert own_nice() == before  # the loop's thread keeps its priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_bulk_priority_idle_puts_bulk_threads_at_sched_idle() -> None:
    set_bulk_priority("idle")
    try:
        with bulk_executor(2, "test-bulk") as pool:
            policy = pool.submit(os.sched_getscheduler, 0).result(timeout=10)
    finally:
        set_bulk_priority("nice")
    assert policy == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is left alone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_an_explicit_policy_wins_over_the_process_default() -> None:
    got: list[tuple[int, int]] = []

    def bulk(policy: BulkPriority) -> None:
        lower_thread_priority(policy)
        tid = threading.get_native_id()
        got.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, tid)))

    policies: tuple[BulkPriority, ...] = ("idle", "nice")
    for policy in policies:
        thread = threading.Thread(target=bulk, args=(policy,))
        thread.start()
        thread.join()
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert got[0][0] == os.SCHED_IDLE
    assert got[1] == (os.SCHED_OTHER, min(before + BULK_THREAD_NICENESS, 19))


def _in_a_thread(wanted: str) -> tuple[str, int, int]:
    """raise_loop_priority in a throwaway thread (the policy is per thread): what it said, the
    thread's policy after it, and the policy of a thread that thread then starts."""
    out: list[tuple[str, int, int]] = []

    def loop_thread() -> None:
        said = raise_loop_priority(wanted)
        child: list[int] = []
        worker = threading.Thread(target=lambda: child.append(os.sched_getscheduler(0)))
        worker.start()
        worker.join()
        out.append((said, os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, child[0]))

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_RR per thread is Linux's")
def test_the_loop_thread_runs_realtime_and_its_threads_do_not() -> None:
    said, policy, child = _in_a_thread("realtime")
    if said.startswith("normal"):
        # No CAP_SYS_NICE or RLIMIT_RTPRIO here: the daemon says why and keeps running.
        assert "CAP_SYS_NICE" in said
        assert policy == os.SCHED_OTHER
    else:
        assert said == f"realtime (SCHED_RR {LOOP_RT_PRIORITY})"
        assert policy == os.SCHED_RR
    # Bulk threads started from the loop never inherit it (SCHED_RESET_ON_FORK).
    assert child == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only the calling thread changed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_RR per thread is Linux's")
def test_loop_priority_normal_leaves_the_thread_alone() -> None:
    said, policy, child = _in_a_thread("normal")
    assert said == "normal (loop_priority: normal)"
    assert policy == child == os.SCHED_OTHER


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _in_thread(fn: Callable[[], T]) -> T:
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_threads_of_a_realtime_loop_keep_the_operators_nice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`nice -n 5 transferd serve`: the loop's threads start at nice 0 (SCHED_RESET_ON_FORK),
    yet bulk threads run at 5 + 10 and other threads the loop starts back at 5."""
    monkeypatch.setattr(threads, "_base_nice", None)  # recorded by the "daemon" below
    operator = min(_nice() + 5, 19)

    def daemon() -> tuple[str, int, int, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), operator)
        said = raise_loop_priority("realtime")

        def other() -> int:
            restore_base_priority()
            return _nice()

        with bulk_executor(1, "test-bulk") as pool:
            bulk = pool.submit(_nice).result(timeout=10)
        return said, _in_thread(_nice), bulk, _in_thread(other)

    said, plain, bulk, other = _in_thread(daemon)
    if said.startswith("realtime"):
        assert plain == 0  # what the kernel gives the loop's threads: why the fix is needed
    assert bulk == min(operator + BULK_THREAD_NICENESS, 19)
    assert other == operator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_a_bulk_thread_started_by_a_bulk_thread_is_lowered_once() -> None:
    """Data channels' threads are started from a chunk worker (already at +10): they run at
    +10 too, not +20."""
    base = threads.base_nice()

    def nested() -> int:
        lower_thread_priority("nice")
        return _in_thread(lambda: (lower_thread_priority("nice"), _nice())[1])

    assert _in_thread(nested) == min(base + BULK_THREAD_NICENESS, 19)


def _refuse_policy(monkeypatch: pytest.MonkeyPatch, refused: int) -> None:
    """sched_setscheduler refuses `refused` from now on, as a sandbox or a missing capability."""
    real = os.sched_setscheduler

    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        if policy == refused:
            raise PermissionError(1, "Operation not permitted")
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", refuse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_the_bulk_priority_log_line_says_what_is_in_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bulk.priority` says idle only where SCHED_IDLE is allowed; where a sandbox refuses it,
    the nice fallback the bulk threads really run at, and why."""
    try:
        assert set_bulk_priority("idle").startswith("idle (SCHED_IDLE")
        _refuse_policy(monkeypatch, os.SCHED_IDLE)
        said = set_bulk_priority("idle")
    finally:
        set_bulk_priority("nice")
    assert said == (f"nice (+{BULK_THREAD_NICENESS}: bulk_priority idle asked, but SCHED_IDLE "
                    "is refused here: Operation not permitted)")


# -- adaptive: SCHED_IDLE while interactive traffic is live, nice otherwise ----------------------


def test_the_window_is_live_from_a_message_until_the_hold_after_it() -> None:
    window = threads.InteractiveWindow(hold_s=1.0, backoff_s=10.0)
    assert not window.yield_to_interactive(100.0)  # no message yet: the bulk runs at nice
    assert window.next_deadline(100.0) is None
    window.seen(100.0)
    assert window.yield_to_interactive(100.5)
    assert window.next_deadline(100.5) == 101.0
    assert not window.yield_to_interactive(101.0)
    assert window.next_deadline(101.0) is None


def test_a_message_in_flight_keeps_the_window_live_past_the_hold() -> None:
    window = threads.InteractiveWindow(hold_s=1.0, backoff_s=10.0)
    window.started(100.0)
    assert window.yield_to_interactive(105.0)  # a slow peer: still waiting for its answer
    assert window.next_deadline(105.0) is None  # only its end changes that
    window.finished(105.0)
    assert window.yield_to_interactive(105.9)
    assert not window.yield_to_interactive(106.0)


def test_gil_waits_back_off_once_they_spend_the_budget_then_for_the_backoff_messages_or_not(
) -> None:
    window = threads.InteractiveWindow(hold_s=1.0, backoff_s=10.0)
    window.started(90.0)
    # One 30 ms wait now and then (a loaded host) never spends it: it drains in between.
    assert not any(window.gil_waited(90.0 + i, 0.03) for i in range(10))
    # Waits of a starved idle bulk thread holding the GIL spend it within the second.
    assert not window.gil_waited(100.0, 0.05)
    assert not window.gil_waited(100.3, 0.05)
    assert window.gil_waited(100.6, 0.05)
    assert not window.yield_to_interactive(105.0)
    assert window.next_deadline(105.0) == 110.6
    assert window.yield_to_interactive(110.6)  # the message is still in flight


def _busy_host(window: threads.InteractiveWindow, period_s: float, until: float,
               start: float = 0.0) -> list[float]:
    """A host whose cores are busy all the time, on the window's fake clock: a message every
    `period_s`; each time it puts the bulk at SCHED_IDLE, the loop's GIL waits spend the
    budget 0.4 s later. The lengths of the backoffs that follow."""
    lengths = []
    now = start
    while now < until:
        window.seen(now)
        if window.yield_to_interactive(now) and window.gil_waited(now + 0.4, 0.15):
            lengths.append(window.suspended_for_s)
            assert window.next_deadline(now + 0.4) == now + 0.4 + lengths[-1]
        now += period_s
    return lengths


@pytest.mark.parametrize("period_s", [0.5, 25.0, 60.0])
def test_backoffs_on_a_busy_host_double_whether_messages_are_dense_or_sparse(
        period_s: float) -> None:
    """Each backoff lasts twice the last (up to the cap) however far apart the messages are:
    the time between them, the bulk at nice, says nothing about the host. (Reset after a
    quiet stretch, a message every 25 s paid a 10 s backoff, and its stall, every time.)"""
    window = threads.InteractiveWindow(hold_s=1.0, backoff_s=10.0, backoff_max_s=80.0)
    lengths = _busy_host(window, period_s, until=1000.0)
    assert lengths[:5] == [10.0, 20.0, 40.0, 80.0, 80.0]
    assert len(lengths) <= 5 + 1000 // 80


def test_a_clean_stretch_at_idle_halves_the_backoff_and_a_quiet_one_does_not() -> None:
    window = threads.InteractiveWindow(hold_s=1.0, backoff_s=10.0, backoff_max_s=80.0)
    assert _busy_host(window, 0.5, until=60.0) == [10.0, 20.0, 40.0]  # the last ends 71.4
    # 230 s with no message: the bulk at nice, nothing learnt about the host.
    assert _busy_host(window, 0.5, start=300.0, until=300.5) == [80.0]  # ends 380.4
    # Then messages every 0.5 s for 100 s with the budget never spent: clean at idle.
    for k in range(200):
        window.seen(390.0 + k * 0.5)
        assert window.yield_to_interactive(390.0 + k * 0.5)
    assert window.clean_idle_s == pytest.approx(99.5)
    # The host busy again: half of 80 s (the clean stretch covered it), not back to 10 s.
    assert _busy_host(window, 0.5, start=540.0, until=540.5) == [40.0]  # ends 580.4
    # A message in flight is live too: 40 s of it, clean, then the budget spent.
    window.started(581.0)
    window.finished(621.0)
    assert window.gil_waited(621.0, 0.15)
    assert window.suspended_for_s == 20.0
    # Clean for 20 + 10 s and more: halved down to the first length, never below it.
    for k in range(100):
        window.seen(642.0 + k * 0.5)
    assert window.gil_waited(692.0, 0.15)
    assert window.suspended_for_s == 10.0


def _policy_and_nice(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_adaptive_switches_running_bulk_threads_and_back_to_their_nice() -> None:
    """Registered bulk threads move to SCHED_IDLE and back from the loop's thread, keep the
    bulk's nice across, and a thread that starts while idle starts idle."""
    if set_bulk_priority("adaptive").startswith("nice"):
        set_bulk_priority("nice")
        pytest.skip("this host refuses leaving SCHED_IDLE (no CAP_SYS_NICE or RLIMIT_NICE)")
    bulk = threads.BulkThreads()
    nice = min(threads.base_nice() + BULK_THREAD_NICENESS, 19)
    real = threads._bulk_threads
    threads._bulk_threads = bulk
    stop = threading.Event()
    tids: list[int] = []

    def worker() -> None:
        lower_thread_priority()
        tids.append(threading.get_native_id())
        stop.wait(30)

    started = [threading.Thread(target=worker) for _ in range(2)]
    try:
        for t in started:
            t.start()
        while len(tids) < 2:
            stop.wait(0.001)
        assert {_policy_and_nice(tid) for tid in tids} == {(os.SCHED_OTHER, nice)}
        bulk.set_idle(True, "test")
        late = threading.Thread(target=worker)
        late.start()
        started.append(late)
        while len(tids) < 3:
            stop.wait(0.001)
        assert {_policy_and_nice(tid) for tid in tids} == {(os.SCHED_IDLE, nice)}
        bulk.set_idle(False, "test")
        assert {_policy_and_nice(tid) for tid in tids} == {(os.SCHED_OTHER, nice)}
        assert bulk.switches == 2
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the switching thread is left alone
    finally:
        stop.set()
        for t in started:
            t.join()
        threads._bulk_threads = real
        set_bulk_priority("nice")
    bulk.set_idle(True, "test")  # the ended threads are dropped, not switched
    assert len(bulk) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_adaptive_is_nice_when_the_host_refuses_the_way_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without CAP_SYS_NICE (or an RLIMIT_NICE that allows it) a thread cannot leave
    SCHED_IDLE: adaptive would leave the bulk idle for good, so it is nice, and says why."""
    _refuse_policy(monkeypatch, os.SCHED_OTHER)
    try:
        said = set_bulk_priority("adaptive")
        in_effect = threads._bulk_priority
    finally:
        set_bulk_priority("nice")
    assert said.startswith(f"nice (+{BULK_THREAD_NICENESS}: bulk_priority adaptive asked, but "
                           "leaving SCHED_IDLE is refused here: Operation not permitted")
    assert in_effect == "nice"


def _adaptive(monkeypatch: pytest.MonkeyPatch, window: threads.InteractiveWindow,
              ) -> threads.BulkThreads:
    """`adaptive` in effect (the caller sets it back to nice), with a fresh thread registry and
    a loop switch on `window`; skips where the host refuses leaving SCHED_IDLE."""
    if set_bulk_priority("adaptive").startswith("nice"):
        set_bulk_priority("nice")
        pytest.skip("this host refuses leaving SCHED_IDLE (no CAP_SYS_NICE or RLIMIT_NICE)")
    bulk = threads.BulkThreads()
    monkeypatch.setattr(threads, "_bulk_threads", bulk)
    monkeypatch.setattr(bulk_priority, "_switch", bulk_priority.AdaptiveSwitch(bulk, window))
    return bulk


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
async def test_a_message_turns_the_bulk_idle_until_the_hold_after_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's side: `interactive_traffic` around a message switches a running bulk thread
    to SCHED_IDLE, the hold's timer brings it back to nice, and a GIL stall behind an idle
    bulk thread brings it back at once (logged)."""
    _adaptive(monkeypatch, threads.InteractiveWindow(hold_s=0.05, backoff_s=60.0))
    stop, ready = threading.Event(), threading.Event()
    tids: list[int] = []

    def worker() -> None:
        lower_thread_priority()
        tids.append(threading.get_native_id())
        ready.set()
        stop.wait(30)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert ready.wait(10)
        [tid] = tids
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        with bulk_priority.interactive_traffic():
            assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE  # for the hold after it
        for _ in range(1000):  # the hold's timer, on this loop
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                break
            await asyncio.sleep(0.01)
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        bulk_priority.loop_waited_for_the_gil(0.5)  # bulk at nice: nothing to back off from
        assert "bulk.priority_backoff" not in caplog.text
        bulk_priority.interactive_seen()
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        bulk_priority.loop_waited_for_the_gil(0.5)
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        assert "bulk.priority_backoff" in caplog.text
        bulk_priority.interactive_seen()  # within the backoff: stays nice
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(
            threads.base_nice() + BULK_THREAD_NICENESS, 19)
    finally:
        stop.set()
        thread.join()
        set_bulk_priority("nice")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_a_daemon_run_again_in_process_still_ends_its_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that ended with the hold's timer pending (a daemon stopped mid-burst) does not
    keep the next loop from arming its own: the bulk still returns to nice."""
    bulk = _adaptive(monkeypatch, threads.InteractiveWindow(hold_s=0.05))

    async def message() -> None:
        bulk_priority.interactive_seen()

    async def message_then_hold() -> bool:
        bulk_priority.interactive_seen()
        for _ in range(500):
            if not bulk.idle:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        asyncio.run(message())  # ends with its timer pending
        assert bulk.idle
        assert asyncio.run(message_then_hold())
    finally:
        set_bulk_priority("nice")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_a_bulk_thread_born_idle_registers_after_the_switch_back_at_nice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bulk thread started by a bulk thread while the bulk is idle (a data channel opened from
    a pool worker) is born at SCHED_IDLE; if the loop switched back to nice before the child
    registered (an idle thread on a busy host waits long for its first turn), the child still
    ends at nice, not idle for good."""
    if set_bulk_priority("adaptive").startswith("nice"):
        set_bulk_priority("nice")
        pytest.skip("this host refuses leaving SCHED_IDLE (no CAP_SYS_NICE or RLIMIT_NICE)")
    bulk = threads.BulkThreads()
    monkeypatch.setattr(threads, "_bulk_threads", bulk)
    parent_ready, switched, go, stop = (threading.Event() for _ in range(4))
    started: list[threading.Thread] = []
    child_tid: list[int] = []
    child_registered = threading.Event()

    def child() -> None:
        go.wait(10)
        lower_thread_priority()
        child_tid.append(threading.get_native_id())
        child_registered.set()
        stop.wait(30)

    def parent() -> None:
        lower_thread_priority()
        parent_ready.set()
        switched.wait(10)
        kid = threading.Thread(target=child)
        started.append(kid)
        kid.start()
        stop.wait(30)

    p = threading.Thread(target=parent)
    p.start()
    try:
        assert parent_ready.wait(10)
        bulk.set_idle(True, "message")
        switched.set()
        for _ in range(10000):
            if started:
                break
            stop.wait(0.001)
        bulk.set_idle(False, "no message for the hold time")
        go.set()
        assert child_registered.wait(10)
        assert os.sched_getscheduler(child_tid[0]) == os.SCHED_OTHER
    finally:
        stop.set()
        go.set()
        for t in [p, *started]:
            t.join()
        set_bulk_priority("nice")
