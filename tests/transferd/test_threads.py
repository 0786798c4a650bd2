"""Bulk chunk threads run at a lower CPU priority than the event loop's thread (Linux)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE per thread is Linux's")
def test_the_bulk_priority_log_line_says_what_is_in_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bulk.priority` says idle only where SCHED_IDLE is allowed; where a sandbox refuses it,
    the nice fallback the bulk threads really run at, and why."""
    try:
        assert set_bulk_priority("idle").startswith("idle (SCHED_IDLE")
        real = os.sched_setscheduler

        def refuse(pid: int, policy: int, param: os.sched_param) -> None:
            if policy == os.SCHED_IDLE:
                raise PermissionError(1, "Operation not permitted")
            real(pid, policy, param)

        monkeypatch.setattr(os, "sched_setscheduler", refuse)
        said = set_bulk_priority("idle")
    finally:
        set_bulk_priority("nice")
    assert said == (f"nice (+{BULK_THREAD_NICENESS}: bulk_priority idle asked, but SCHED_IDLE "
                    "is refused here: Operation not permitted)")
