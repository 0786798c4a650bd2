"""The one backoff on a fake clock: delays double up to the cap and stop at the budget."""

from __future__ import annotations

from transferd.protocol.backoff import backoff_delays
from transferd.testing import FakeClock


def _waited(budget_s: float, **kwargs: float) -> list[float]:
    clock = FakeClock(start=0.0)
    out = []
    for delay in backoff_delays(budget_s, clock=clock, **kwargs):
        out.append(delay)
        clock.advance(delay + 0.01)  # the failed attempt itself takes a little time
    return out


def test_delays_double_up_to_the_cap_and_end_within_the_budget() -> None:
    delays = _waited(10.0, first_s=0.1, cap_s=2.0)
    assert delays[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert all(d == 2.0 for d in delays[5:])
    assert sum(delays) + 0.01 * len(delays) <= 10.0
    assert sum(delays) + 0.01 * len(delays) + 2.0 > 10.0  # one more would not fit


def test_no_budget_means_no_retry() -> None:
    assert _waited(0.05, first_s=0.1) == []


def test_a_waiting_job_tries_again_after_1_2_4_up_to_60_s() -> None:
    from transferd.protocol.backoff import job_retry_delay

    assert [job_retry_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert job_retry_delay(10_000) == 60
