"""The event loop's side of `traffic.bulk_priority: adaptive` (the theory is in `site.threads`):
the message service reports messages here, the loop-lag probe its GIL waits, and this switches
the process's bulk threads between SCHED_IDLE and nice when `InteractiveWindow`'s answer
changes, re-arming one timer at the window's next deadline. Nothing happens under the other
policies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from transferd.site.threads import (
    BulkThreads,
    InteractiveWindow,
    bulk_priority_in_effect,
    bulk_threads,
)

__all__ = ["AdaptiveSwitch", "interactive_seen", "interactive_traffic", "loop_waited_for_the_gil"]

log = logging.getLogger("transferd.daemon")


class AdaptiveSwitch:
    """The loop's side of `adaptive`: feeds the window, switches `BulkThreads` when its answer
    changes and re-arms one timer at the window's next deadline (the aioquic pattern)."""

    def __init__(self, threads: BulkThreads, window: InteractiveWindow) -> None:
        self.threads = threads
        self.window = window
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def update(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
        now = loop.time()
        self.threads.set_idle(self.window.yield_to_interactive(now), why)
        # One timer at a time: one that fires early re-arms itself at the deadline then due.
        deadline = self.window.next_deadline(now)
        if self._timer is not None and self._timer_loop is not loop:
            self._timer = None  # armed on a loop that has ended (a daemon run again in-process)
        if deadline is not None and self._timer is None:
            self._timer = loop.call_at(deadline, self._expired, loop)
            self._timer_loop = loop

    def _expired(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self.update(loop, "no message for the hold time")


_switch = AdaptiveSwitch(bulk_threads(), InteractiveWindow())


@contextlib.contextmanager
def interactive_traffic() -> Iterator[None]:
    """Around a message's handling on the event loop (a send until its receipt, a receive):
    under `adaptive`, the bulk threads run at SCHED_IDLE from its start until `INTERACTIVE_HOLD_S`
    after its end. Nothing under the other policies."""
    if bulk_priority_in_effect() != "adaptive":
        yield
        return
    loop = asyncio.get_running_loop()
    _switch.window.started(loop.time())
    _switch.update(loop, "message")
    try:
        yield
    finally:
        _switch.window.finished(loop.time())
        _switch.update(loop, "message")


def interactive_seen() -> None:
    """A message arrived or was queued (on the event loop): under `adaptive`, the bulk threads
    run at SCHED_IDLE until `INTERACTIVE_HOLD_S` from now."""
    if bulk_priority_in_effect() == "adaptive":
        loop = asyncio.get_running_loop()
        _switch.window.seen(loop.time())
        _switch.update(loop, "message")


def loop_waited_for_the_gil(gil_wait_s: float) -> None:
    """The loop-lag probe's report of a stall's GIL wait (on the loop): under `adaptive`, while
    the bulk runs idle, it counts against the GIL-wait budget; once that is spent the bulk runs
    at nice for `GIL_BACKOFF_S` (twice the last one after that, half after a clean stretch at
    idle as long as it), logged."""
    if bulk_priority_in_effect() != "adaptive" or not _switch.threads.idle or gil_wait_s <= 0:
        return
    loop = asyncio.get_running_loop()
    if _switch.window.gil_waited(loop.time(), gil_wait_s):
        log.warning("bulk.priority_backoff", extra={"fields": {
            "gil_wait_ms": round(gil_wait_s * 1e3, 1),
            "nice_for_s": _switch.window.suspended_for_s}})
        _switch.update(loop, "the loop waited for the GIL behind idle bulk threads")
