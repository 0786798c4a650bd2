"""The class scheduler on a fake clock: priority, deadline order, weights, work conservation,
budget misses and caps. A simulated link drains one item at a time at a fixed rate."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transferd import BULK_CLASSES, TrafficClass
from transferd.protocol.ratelimit import PeerRateLimiter, RateCap
from transferd.protocol.sched import ClassScheduler, ScheduledItem

MB = 1_000_000
CP, SY, IA, CT = (
    TrafficClass.CHECKPOINT,
    TrafficClass.SYNC,
    TrafficClass.INTERACTIVE,
    TrafficClass.CONTROL,
)


def _drain(sched: ClassScheduler[str], now: float, limit: int = 1000) -> list[ScheduledItem[str]]:
    out = []
    for _ in range(limit):
        item = sched.dequeue(now)
        if item is None:
            break
        out.append(item)
    return out


def test_control_goes_before_everything_then_interactive_then_bulk() -> None:
    sched: ClassScheduler[str] = ClassScheduler(0.0)
    sched.enqueue(CP, 8 << 20, "cp", 0.0)
    sched.enqueue(SY, 8 << 20, "sync", 0.0)
    sched.enqueue(IA, 4096, "msg", 0.0, deadline=0.05)
    sched.enqueue(CT, 200, "manifest", 0.0)
    sched.enqueue(CT, 200, "commit", 0.0)
    order = [item.payload for item in _drain(sched, 0.0)]
    assert order[:3] == ["manifest", "commit", "msg"]
    assert sorted(order[3:]) == ["cp", "sync"]
    assert len(sched) == 0


def test_interactive_leaves_in_deadline_order_not_arrival_order() -> None:
    rng = random.Random(3)
    sched: ClassScheduler[str] = ClassScheduler(0.0)
    deadlines = [rng.uniform(0.01, 1.0) for _ in range(200)]
    for i, deadline in enumerate(deadlines):
        sched.enqueue(IA, 4096, f"m{i}", 0.0, deadline=deadline)
    out = _drain(sched, 0.0)
    assert [item.deadline for item in out] == sorted(deadlines)
    assert not sched.pop_budget_misses()


def _run_link(
    sched: ClassScheduler[str],
    rate: float,
    seconds: float,
    refill: dict[TrafficClass, int],
    sizes: list[int],
    rng: random.Random,
    start: float = 0.0,
) -> dict[TrafficClass, int]:
    """Serve the scheduler on a link of `rate` B/s, keeping `refill[c]` items queued per class."""
    sent = dict.fromkeys(TrafficClass, 0)
    queued = dict.fromkeys(TrafficClass, 0)
    now = start
    while now < start + seconds:
        for cls, depth in refill.items():
            while queued[cls] < depth:
                sched.enqueue(cls, rng.choice(sizes), cls.value, now)
                queued[cls] += 1
        item = sched.dequeue(now)
        if item is None:
            wake = sched.next_deadline()
            assert wake is not None
            assert wake > now
            now = wake
            continue
        queued[item.traffic_class] -= 1
        sent[item.traffic_class] += item.size_bytes
        now += item.size_bytes / rate
    return sent


@pytest.mark.parametrize("weights", [None, {CP: 1.0, SY: 1.0}, {CP: 5.0, SY: 1.0}])
def test_bulk_weights_hold_over_time(weights: dict[TrafficClass, float] | None) -> None:
    sched: ClassScheduler[str] = ClassScheduler(0.0, bulk_weights=weights)
    want = 3.0 / 4.0 if weights is None else weights[CP] / (weights[CP] + weights[SY])
    # Mixed chunk sizes (tail chunks are small) over 60 s of a 1 Gbit/s link.
    sizes = [8 << 20, 8 << 20, 8 << 20, 3 << 20, 100_000]
    sent = _run_link(sched, 125 * MB, 60.0, {CP: 4, SY: 4}, sizes, random.Random(11))
    share = sent[CP] / (sent[CP] + sent[SY])
    assert abs(share - want) <= 0.02, share


def test_work_conserving_sync_gets_the_whole_link_while_checkpoint_is_idle() -> None:
    rng = random.Random(5)
    sched: ClassScheduler[str] = ClassScheduler(0.0)
    alone = _run_link(sched, 100 * MB, 10.0, {SY: 4}, [1 << 20], rng)
    assert alone[SY] >= 100 * MB * 10 * 0.99
    # Then checkpoint work arrives: the 3:1 split takes over at once, and nothing starves.
    both = _run_link(sched, 100 * MB, 10.0, {CP: 4, SY: 4}, [1 << 20], rng, start=10.0)
    share = both[CP] / (both[CP] + both[SY])
    assert abs(share - 0.75) <= 0.02


def test_rate_capped_sync_leaves_the_rest_of_the_link_to_checkpoint() -> None:
    limiter = PeerRateLimiter(0.0, class_caps={SY: RateCap.from_rate(10 * MB)})
    sched: ClassScheduler[str] = ClassScheduler(0.0, limiter=limiter)
    sent = _run_link(sched, 100 * MB, 10.0, {CP: 4, SY: 4}, [1 << 20], random.Random(2))
    burst = 16 << 20  # the bucket starts full
    assert 10 * MB * 10 * 0.99 <= sent[SY] <= 10 * MB * 10 * 1.01 + burst
    assert sent[CP] + sent[SY] >= 100 * MB * 10 * 0.98


def test_total_cap_is_offered_to_interactive_before_bulk() -> None:
    limiter = PeerRateLimiter(0.0, total_cap=RateCap(rate_bytes_per_s=1 * MB, burst_bytes=8192))
    sched: ClassScheduler[str] = ClassScheduler(0.0, limiter=limiter)
    sched.enqueue(CP, 8192, "cp", 0.0)
    assert sched.dequeue(0.0) is not None  # bucket now empty
    sched.enqueue(CP, 4096, "cp2", 0.0)
    sched.enqueue(IA, 4096, "msg", 0.0, deadline=1.0)
    # A bulk-only worker must not take the tokens the interactive message is waiting for.
    wake = sched.next_deadline()
    assert wake is not None
    assert sched.dequeue(wake, classes=BULK_CLASSES) is None
    got = sched.dequeue(wake, classes=[IA])
    assert got is not None
    assert got.payload == "msg"


def test_control_is_charged_to_the_total_but_never_held() -> None:
    limiter = PeerRateLimiter(0.0, total_cap=RateCap(rate_bytes_per_s=1000, burst_bytes=1000))
    sched: ClassScheduler[str] = ClassScheduler(0.0, limiter=limiter)
    for i in range(5):
        sched.enqueue(CT, 1000, f"c{i}", 0.0)
    assert len(_drain(sched, 0.0)) == 5
    sched.enqueue(SY, 1000, "sync", 0.0)
    assert sched.dequeue(0.0) is None
    assert sched.next_deadline() == pytest.approx(5.0)  # 4000 bytes of debt + 1000 to fill


def test_budget_miss_reports_queue_ahead_and_item_is_still_sent_flagged_late() -> None:
    # 1 MB/s service rate: 4 KiB takes 4.1 ms; a 10th message due at 40 ms cannot make it.
    sched: ClassScheduler[str] = ClassScheduler(0.0, service_rate_bytes_per_s=1 * MB)
    for i in range(9):
        sched.enqueue(IA, 4096, f"m{i}", 0.0, deadline=0.040)
    assert sched.pop_budget_misses() == []
    sched.enqueue(IA, 4096, "late", 0.0, deadline=0.040)
    misses = sched.pop_budget_misses()
    assert len(misses) == 1
    assert misses[0].item.payload == "late"
    assert misses[0].kind == "queue_ahead"
    assert misses[0].reason == (
        "needs ~41.0 ms (36864 bytes queued ahead, 4096 bytes at 1000000 B/s)"
        " but its deadline is in 40.0 ms"
    )
    out = _drain(sched, 0.0)
    assert out[-1].payload == "late"
    assert out[-1].late
    assert not any(item.late for item in out[:-1])


def test_item_arriving_after_its_deadline_is_flagged_and_delivered() -> None:
    sched: ClassScheduler[str] = ClassScheduler(1.0)
    item = sched.enqueue(IA, 10, "stale", 1.0, deadline=0.990)
    [miss] = sched.pop_budget_misses()
    assert miss.item is item
    assert miss.reason == "arrived 10.0 ms after its deadline"
    assert sched.dequeue(1.0) is item
    assert item.late


def test_item_still_queued_at_its_deadline_is_reported_when_the_timer_fires() -> None:
    # The interactive cap admits one 4 KiB message every 40 ms, but the first one has used it.
    limiter = PeerRateLimiter(
        0.0, class_caps={IA: RateCap(rate_bytes_per_s=102_400, burst_bytes=4096)}
    )
    sched: ClassScheduler[str] = ClassScheduler(0.0, limiter=limiter)
    sched.enqueue(IA, 4096, "first", 0.0, deadline=0.1)
    assert sched.dequeue(0.0) is not None
    sched.enqueue(IA, 4096, "second", 0.0, deadline=0.02)
    misses = sched.pop_budget_misses()
    assert [m.item.payload for m in misses] == ["second"]
    assert "needs ~40.0 ms" in misses[0].reason
    assert misses[0].kind == "rate_cap"
    # An item with a feasible deadline that then waits past it is reported by the timer.
    sched2: ClassScheduler[str] = ClassScheduler(0.0)
    sched2.enqueue(IA, 100, "waits", 0.0, deadline=0.05)
    assert sched2.next_deadline() == 0.05
    sched2.handle_timer(0.06)
    [miss] = sched2.pop_budget_misses()
    assert miss.reason == "still queued 10.0 ms after its deadline"
    assert sched2.next_deadline() is None  # reported once, not again
    got = sched2.dequeue(0.06)
    assert got is not None
    assert got.late


def test_rate_cap_release_time_is_the_next_deadline() -> None:
    limiter = PeerRateLimiter(
        0.0, class_caps={CP: RateCap(rate_bytes_per_s=1000, burst_bytes=1000)}
    )
    sched: ClassScheduler[str] = ClassScheduler(0.0, limiter=limiter)
    sched.enqueue(CP, 1000, "a", 0.0)
    sched.enqueue(CP, 500, "b", 0.0)
    assert sched.dequeue(0.0) is not None
    assert sched.dequeue(0.0) is None
    assert sched.next_deadline() == pytest.approx(0.5)
    assert sched.dequeue(0.49) is None
    got = sched.dequeue(0.5)
    assert got is not None
    assert got.payload == "b"
    assert sched.next_deadline() is None


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match="bulk_weights.sync: must be > 0"):
        ClassScheduler(0.0, bulk_weights={CP: 3.0, SY: 0.0})
    with pytest.raises(ValueError, match="not a bulk class"):
        ClassScheduler(0.0, bulk_weights={IA: 1.0})


def test_separate_pools_still_share_by_weight_through_handoff() -> None:
    # Each bulk class has its own connection pool; a worker asks only for its class. When it is
    # the other class's turn the answer is None with `handoff` naming it, so weights still hold.
    sched: ClassScheduler[str] = ClassScheduler(0.0)
    for _ in range(400):
        sched.enqueue(CP, 1 << 20, "cp", 0.0)
        sched.enqueue(SY, 1 << 20, "sync", 0.0)
    served = []
    caller = CP
    for _ in range(200):
        item = sched.dequeue(0.0, classes=[caller], ready=[CP, SY])
        if item is None:
            assert sched.handoff is not None
            assert sched.handoff is not caller
            caller = sched.handoff
            continue
        served.append(item.traffic_class)
    assert abs(served.count(CP) / len(served) - 0.75) <= 0.01
    # A class whose pool has no worker waiting is passed over: checkpoint alone takes the link.
    taken = [sched.dequeue(0.0, classes=[CP], ready=[CP]) for _ in range(10)]
    assert all(item is not None and item.traffic_class is CP for item in taken)


def test_discarded_items_leave_the_queues() -> None:
    sched: ClassScheduler[str] = ClassScheduler(0.0)
    keep = sched.enqueue(SY, 10, "keep", 0.0)
    gone = sched.enqueue(SY, 10, "gone", 0.0)
    msg = sched.enqueue(IA, 10, "msg", 0.0, deadline=1.0)
    assert sched.discard(gone)
    assert sched.discard(msg)
    assert not sched.discard(msg)
    assert sched.queued_bytes(IA) == 0
    assert _drain(sched, 0.0) == [keep]


ops = st.lists(
    st.tuples(
        st.sampled_from(list(TrafficClass)),
        st.integers(min_value=0, max_value=4 << 20),  # size
        st.floats(min_value=0.0, max_value=0.5),  # deadline offset, seconds
        st.floats(min_value=0.0, max_value=0.05),  # clock step before the op
        st.booleans(),  # dequeue after it
    ),
    max_size=60,
)


@given(ops, st.booleans())
def test_every_item_leaves_exactly_once_in_class_order_and_misses_are_flagged(
    script: list[tuple[TrafficClass, int, float, float, bool]], capped: bool
) -> None:
    limiter = None
    if capped:
        limiter = PeerRateLimiter(
            0.0,
            class_caps={SY: RateCap(20 * MB, 1 * MB), IA: RateCap(5 * MB, 64 * 1024)},
            total_cap=RateCap(100 * MB, 4 * MB),
        )
    sched: ClassScheduler[int] = ClassScheduler(
        0.0, limiter=limiter, service_rate_bytes_per_s=50 * MB
    )
    now = 0.0
    sent: list[ScheduledItem[int]] = []
    pending: set[ScheduledItem[int]] = set()

    def take(at: float) -> bool:
        item = sched.dequeue(at)
        if item is None:
            return False
        if any(p.traffic_class is CT for p in pending):
            assert item.traffic_class is CT  # control goes before everything
        if item.traffic_class is IA:
            due = [p.deadline for p in pending if p.traffic_class is IA]
            assert item.deadline == min(d for d in due if d is not None)  # EDF
        pending.remove(item)
        sent.append(item)
        return True

    for i, (cls, size, offset, step, do_take) in enumerate(script):
        now += step
        deadline = now + offset if cls is IA else None
        pending.add(sched.enqueue(cls, size, i, now, deadline=deadline))
        if do_take:
            take(now)
    for _ in range(10_000):  # drain, moving the clock to each next deadline
        if take(now):
            continue
        wake = sched.next_deadline()
        if wake is None:
            break
        now = max(now, wake)
    assert len(sched) == 0
    assert sorted(item.payload for item in sent) == list(range(len(script)))
    # Every miss is reported once, on an item that is then sent flagged late.
    misses = sched.pop_budget_misses()
    assert len({id(m.item) for m in misses}) == len(misses)
    assert all(m.item.late and m.item.traffic_class is IA for m in misses)
    assert {id(m.item) for m in misses} == {id(i) for i in sent if i.late}


def test_item_arriving_exactly_at_its_deadline_is_not_minus_zero_late() -> None:
    sched: ClassScheduler[str] = ClassScheduler(1.0)
    sched.enqueue(IA, 10, "on the dot", 1.0, deadline=1.0)
    [miss] = sched.pop_budget_misses()
    assert miss.reason == "arrived 0.0 ms after its deadline"
