"""Capped exponential backoff, shared by the daemon's async retries and the CLI's sync ones."""

from __future__ import annotations

import time
from collections.abc import Iterator

__all__ = ["backoff_delays"]


def backoff_delays(
    budget_s: float, *, first_s: float = 0.1, cap_s: float = 2.0
) -> Iterator[float]:
    """Delays before each retry (first_s, doubling, at most cap_s), for as long as waiting the
    next one still ends within `budget_s` of this call; then the iterator is exhausted."""
    deadline = time.monotonic() + budget_s
    delay = first_s
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(delay * 2, cap_s)
