"""Bulk chunk threads run at a lower CPU priority than the event loop's thread (Linux)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from transferd.site.threads import BULK_THREAD_NICENESS, bulk_executor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_bulk_threads_are_nicer_than_the_calling_thread() -> None:
    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_nice()
    with bulk_executor(2, "test-bulk") as pool:
        worker_nice = pool.submit(own_nice).result(timeout=10)
    assert worker_nice == min(before + BULK_THREAD_NICENESS, 19)
    assert own_nice() == before  # the loop's thread keeps its priority
