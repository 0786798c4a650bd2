"""Capped exponential backoff, shared by the daemon's async retries (`net.peer_client.retrying`:
control requests, chunk PUTs, messages) and the CLI's first call to a daemon that is starting.

The clock is a parameter (monotonic seconds by default): the retry loop sleeps, this only says
how long, so it is tested on a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

__all__ = ["backoff_delays"]


def backoff_delays(
    budget_s: float,
    *,
    first_s: float = 0.1,
    cap_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[float]:
    """Delays before each retry (first_s, doubling, at most cap_s), for as long as waiting the
    next one still ends within `budget_s` of this call; then the iterator is exhausted."""
    deadline = clock() + budget_s
    delay = first_s
    while clock() + delay <= deadline:
        yield delay
        delay = min(delay * 2, cap_s)
