"""The loop-lag probe's schedstat reader: one descriptor read again and again must still
show the thread's CPU time moving (a /proc file read at offset 0 is regenerated), and it
reads the opening thread's figures, not the reader's."""

import sys
import threading
import time

import pytest

from transferd.daemon import _ThreadSchedstat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_same_descriptor_sees_the_threads_cpu_time_grow() -> None:
    stat = _ThreadSchedstat()
    try:
        first = stat.read()
        assert first is not None
        _burn(0.05)
        second = stat.read()
        assert second is not None
        assert second[0] - first[0] >= 40_000_000  # ns on a CPU: at least most of the 50 ms
    finally:
        stat.close()
    assert stat.read() is None


def test_it_reads_the_thread_that_opened_it() -> None:
    stat = _ThreadSchedstat()  # this thread's file; this thread now sleeps
    try:
        before = stat.read()
        assert before is not None
        worker = threading.Thread(target=_burn, args=(0.1,))
        worker.start()
        worker.join()
        after = stat.read()
        assert after is not None
        assert after[0] - before[0] < 50_000_000  # the worker's 100 ms are not ours
    finally:
        stat.close()
