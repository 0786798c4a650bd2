"""Capped exponential backoff, shared by the daemon's async retries (`net.peer_client.retrying`:
control requests, chunk PUTs, messages), the CLI's first call to a daemon that is starting, and
(`job_retry_delay`) a job waiting for its peer between attempts.

The clock is a parameter (monotonic seconds by default): the retry loop sleeps, this only says
how long, so it is tested on a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

__all__ = ["backoff_delays", "job_retry_delay"]


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


def job_retry_delay(attempt: int, *, first_s: float = 1.0, cap_s: float = 60.0) -> float:
    """How long a job waits before its `attempt`-th new attempt (1, 2, 4, ... at most cap_s):
    a peer that is down for an hour costs about 60 attempts, and one that comes back is
    noticed within a minute."""
    return min(cap_s, first_s * 2.0 ** max(0, min(attempt - 1, 32)))
