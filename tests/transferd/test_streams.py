"""The stream controller against a fluid model of a long fat pipe, on a fake clock.

Model: each TCP stream carries min(window/RTT, Mathis rate) (Mathis et al. 1997:
MSS/RTT * 1.22/sqrt(p)); streams together are capped by the link; oversubscribing the link
overflows its queue and costs retransmissions (goodput falls by 10 % of the overload); +-2 %
seeded measurement noise.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

import pytest

from transferd import TrafficClass
from transferd.net.pump import BulkGate, PeerTraffic, SchedulerPump
from transferd.protocol.sched import ClassScheduler
from transferd.protocol.streams import PathSample, StreamController

GBIT = 125_000_000  # bytes/s


@dataclass
class FluidLink:
    capacity_bytes_per_s: float = GBIT
    rtt_s: float = 0.040
    loss: float = 1e-5
    window_bytes: float = 16 << 20
    mss_bytes: int = 1448
    noise: float = 0.02
    seed: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def per_stream(self) -> float:
        mathis = self.mss_bytes / self.rtt_s * 1.22 / math.sqrt(self.loss)
        return min(self.window_bytes / self.rtt_s, mathis)

    def goodput(self, streams: int) -> float:
        offered = streams * self.per_stream()
        overload = max(0.0, offered - self.capacity_bytes_per_s) / self.capacity_bytes_per_s
        carried = min(offered, self.capacity_bytes_per_s) * (1 - 0.1 * overload)
        return max(carried, 0.0) * (1 + self.rng.uniform(-self.noise, self.noise))


def _run(
    ctl: StreamController, link: FluidLink, start: float, seconds: float, dt: float = 0.1
) -> list[tuple[float, int, float]]:
    """Feed the controller one sample per dt; returns (time, streams, goodput) per sample."""
    trace = []
    now = start
    while now < start + seconds - 1e-9:
        streams = ctl.target_streams
        rate = link.goodput(streams)
        now += dt
        ctl.on_sample(now, int(rate * dt), 0)
        trace.append((now, streams, rate))
    return trace


def test_grows_to_fill_a_high_bdp_link_and_then_holds_steady() -> None:
    link = FluidLink()
    single = link.per_stream()
    assert single < 0.15 * link.capacity_bytes_per_s  # one stream is far from the link rate
    ctl = StreamController(0.0)
    trace = _run(ctl, link, 0.0, 120.0)
    tail = [rate for t, _, rate in trace if t > 60.0]
    mean = sum(tail) / len(tail)
    assert mean >= 0.90 * link.capacity_bytes_per_s, mean / link.capacity_bytes_per_s
    # Hysteresis: after converging it probes ever more rarely instead of oscillating.
    tail_changes = [c for c in ctl.changes if c.at > 60.0]
    assert len(tail_changes) <= 4, tail_changes
    assert {n for t, n, _ in trace if t > 60.0} <= {9, 10}
    reasons = [c.reason for c in ctl.changes]
    assert any(r.startswith("probing") for r in reasons)
    assert any(r.startswith("no gain") for r in reasons)
    assert all(1 <= c.to_streams <= 32 for c in ctl.changes)


def test_backs_off_multiplicatively_on_errors_then_recovers() -> None:
    link = FluidLink()
    ctl = StreamController(0.0)
    _run(ctl, link, 0.0, 40.0)
    before = ctl.target_streams
    assert before >= 8
    ctl.pop_changes()
    ctl.on_sample(40.05, int(link.goodput(before) * 0.05), errors=3)
    ctl.on_sample(ctl.next_deadline(), int(link.goodput(before) * 0.5), errors=2)
    [change] = ctl.pop_changes()
    assert change.to_streams == before // 2
    assert change.reason == "5 errors in 1 s window"
    # Errors gone: it climbs back (additively) to fill the link again.
    trace = _run(ctl, link, 41.0, 60.0)
    assert trace[-1][1] >= 8
    assert all(not c.reason.endswith("window") for c in ctl.pop_changes())


def test_shrinks_when_goodput_falls_and_never_below_one() -> None:
    link = FluidLink()
    ctl = StreamController(0.0)
    _run(ctl, link, 0.0, 40.0)
    before = ctl.target_streams
    # The path degrades: competing traffic leaves a third of the link, so goodput falls.
    link.capacity_bytes_per_s = GBIT / 3
    _run(ctl, link, 40.0, 5.0)
    shrink = [c for c in ctl.changes if c.at > 40.0]
    assert shrink
    assert shrink[0].reason.startswith("goodput fell to")
    assert ctl.target_streams < before
    # Persistent errors drive it to the floor, and it stays there.
    now = 45.0
    for _ in range(10):
        now += 1.0
        ctl.on_sample(now, 1000, errors=5)
    assert ctl.target_streams == 1


def test_stays_within_the_configured_ceiling() -> None:
    link = FluidLink(capacity_bytes_per_s=100 * GBIT)  # a link no number of streams can fill
    ctl = StreamController(0.0, max_streams=12)
    trace = _run(ctl, link, 0.0, 30.0)
    assert max(n for _, n, _ in trace) == 12
    assert ctl.target_streams == 12


def test_idle_windows_change_nothing() -> None:
    ctl = StreamController(0.0)
    for second in range(1, 30):
        assert ctl.on_sample(float(second), 0, 0) == 2
    assert not ctl.changes
    assert ctl.next_deadline() == 29.0 + 1.0


def test_rejects_bounds_that_do_not_nest() -> None:
    with pytest.raises(ValueError, match="min_streams"):
        StreamController(0.0, initial_streams=40, max_streams=32)


async def _settle() -> None:
    for _ in range(20):  # let woken tasks run; no time passes on the scheduler's clock
        await asyncio.sleep(0)


async def test_bulk_gate_admits_at_most_target_streams_and_shrinks_on_errors() -> None:
    clock = [0.0]
    pump: SchedulerPump[None] = SchedulerPump(ClassScheduler(0.0))
    controller = StreamController(0.0, initial_streams=4, max_streams=8)
    gate = BulkGate("B", pump, TrafficClass.CHECKPOINT, controller, clock=lambda: clock[0])
    tasks = [asyncio.create_task(gate.acquire(1 << 20)) for _ in range(10)]
    await _settle()
    assert sum(t.done() for t in tasks) == 4
    assert gate.in_flight == 4
    gate.release(1 << 20)
    await _settle()
    assert sum(t.done() for t in tasks) == 5
    assert gate.in_flight == 4
    # A window full of errors halves the target: releases then admit nobody until below it.
    clock[0] = 1.0  # the controller's window closes with this release
    gate.release(0, errors=3)
    assert gate.controller.target_streams == 2
    await _settle()
    assert gate.in_flight == 3
    assert sum(t.done() for t in tasks) == 5
    gate.release(1 << 20)
    gate.release(1 << 20)
    await _settle()
    assert gate.in_flight == 2
    assert sum(t.done() for t in tasks) == 6
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancelled_acquire_leaves_no_slot_and_no_queued_marker() -> None:
    traffic = PeerTraffic.build("B", initial_streams=1, max_streams=1)
    gate = traffic.gates[TrafficClass.SYNC]
    await gate.acquire(100)
    waiting = asyncio.create_task(gate.acquire(100))
    await _settle()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert gate.in_flight == 1
    gate.release(100)
    assert gate.in_flight == 0
    assert len(traffic.pump.scheduler) == 0
    async with asyncio.timeout(5):  # the slot is free again
        await gate.acquire(100)
    assert gate.in_flight == 1


async def test_each_stream_keeps_a_window_of_chunks_in_flight() -> None:
    # Two channels with a window of two chunks each: four chunks may await their receipts; the
    # fifth waits for one of them, and the limit follows the controller's target.
    traffic = PeerTraffic.build("B", initial_streams=2, max_streams=8, per_stream=2)
    gate = traffic.gates[TrafficClass.CHECKPOINT]
    for _ in range(4):
        await gate.acquire(100)
    fifth = asyncio.create_task(gate.acquire(100))
    await _settle()
    assert not fifth.done()
    gate.release(100)  # a receipt
    await _settle()
    assert fifth.done()
    assert gate.in_flight == 4
    gate.controller.target_streams = 3
    sixth = asyncio.create_task(gate.acquire(100))
    await _settle()
    assert sixth.done()  # three channels: room for six
    assert gate.in_flight == 5
    assert traffic.streams_wanted() == 3


def test_one_low_window_of_whole_chunks_is_not_a_fall() -> None:
    # 8 MiB acknowledgements at ~110 MB/s: a 1 s window holds 13 or 14 of them, or 11 when a few
    # land just after it closes. The controller keeps its streams through one such window and
    # backs off only when goodput stays low.
    chunk = 8 << 20
    ctl = StreamController(0.0, initial_streams=8, max_streams=8)
    now = 0.0

    def window(chunks: int) -> None:
        nonlocal now
        for i in range(chunks):
            ctl.on_sample(now + (i + 1) / (chunks + 1), chunk)
        now += 1.0
        ctl.on_sample(now, 0)

    for _ in range(4):
        window(14)
    window(11)  # -21 %: one chunk-quantized dip
    assert ctl.target_streams == 8
    window(14)
    window(9)
    window(9)  # two windows at -35 %: a real fall
    assert ctl.target_streams < 8


def _run_with_path(
    ctl: StreamController, link: FluidLink, start: float, seconds: float, *, bbr: bool
) -> list[tuple[float, int, float]]:
    """As `_run`, and once per window what the sockets report: the link's loss rate on the
    segments sent (TCP_INFO), its RTT and MSS. A bbr stream is not held at the Mathis bound:
    it carries its share of the link whatever the loss."""
    trace = []
    now = start
    dt = 0.1
    while now < start + seconds - 1e-9:
        streams = ctl.target_streams
        rate = (min(link.capacity_bytes_per_s, streams * link.capacity_bytes_per_s)
                if bbr else link.goodput(streams))
        now += dt
        if now >= ctl.next_deadline():
            segs = int(rate / link.mss_bytes)
            ctl.on_path(PathSample(segs_out=segs, retrans=int(segs * link.loss),
                                   rtt_s=link.rtt_s, mss=link.mss_bytes))
        ctl.on_sample(now, int(rate * dt), 0)
        trace.append((now, streams, rate))
    return trace


def test_loss_limited_cubic_streams_double_until_the_link_is_full() -> None:
    # 0.5 % loss at 40 ms: one cubic stream's ceiling is ~5 Mbit/s (Mathis); the controller
    # sees each stream at that ceiling and keeps doubling, where the path-blind one would
    # have settled at +1 steps.
    link = FluidLink(loss=0.005, capacity_bytes_per_s=GBIT / 10)
    ctl = StreamController(0.0, initial_streams=2, max_streams=32)
    _run_with_path(ctl, link, 0.0, 30.0, bbr=False)
    grown = [c for c in ctl.changes if c.to_streams > c.from_streams]
    assert grown
    assert all("loss-limited" in c.reason for c in grown)
    assert all(c.to_streams == 2 * c.from_streams or c.to_streams == 32 for c in grown)
    assert ctl.target_streams >= 16


def test_capacity_limited_bbr_streams_are_not_multiplied() -> None:
    # bbr on the same lossy link: each stream far above the Mathis bound, the link full with
    # two streams: the controller holds at two (more streams would only compete and lose).
    link = FluidLink(loss=0.005)
    ctl = StreamController(0.0, initial_streams=2, max_streams=32)
    _run_with_path(ctl, link, 0.0, 30.0, bbr=True)
    assert ctl.target_streams == 2
    assert not ctl.changes
    assert ctl.loss_limited(GBIT) is False


def test_without_loss_the_controller_still_probes_for_what_else_holds_a_stream_back() -> None:
    # No loss: TCP_INFO says nothing about why a stream is not faster (a window, a receiver's
    # disk), so a probe decides, as without path samples.
    link = FluidLink(loss=1e-9)
    ctl = StreamController(0.0, initial_streams=2, max_streams=32)
    ctl.on_path(PathSample(segs_out=100_000, retrans=0, rtt_s=0.04, mss=1448))
    assert ctl.loss_limited(GBIT) is None
    _run(ctl, link, 0.0, 20.0)
    assert any(c.reason.startswith("probing") for c in ctl.changes)


def test_without_loss_streams_the_path_paces_hold_and_window_held_ones_still_probe() -> None:
    # TCP_INFO's busy and window-limited times: streams with data in flight all the window and
    # never held by the receive window or the send buffer are paced by the path (bbr on a full
    # clean link): another stream would only compete, so the count holds.
    link = FluidLink(loss=1e-9)
    paced = StreamController(0.0, initial_streams=2, max_streams=32)
    paced.on_path(PathSample(segs_out=100_000, retrans=0, rtt_s=0.01, mss=1448,
                             busy_s=1.98, held_s=0.0, span_s=2.0))
    assert paced.loss_limited(GBIT) is False
    _run(paced, link, 0.0, 20.0)
    assert paced.target_streams == 2
    assert not paced.changes
    # The same streams held back by the receiver's window for a third of their time (a slow
    # disk at the receiver), or idle half the window: what holds them back is not the path.
    for busy, held in ((1.98, 0.66), (1.0, 0.0)):
        held_back = StreamController(0.0, initial_streams=2, max_streams=32)
        held_back.on_path(PathSample(segs_out=100_000, retrans=0, rtt_s=0.01, mss=1448,
                                     busy_s=busy, held_s=held, span_s=2.0))
        assert held_back.loss_limited(GBIT) is None
        _run(held_back, link, 0.0, 20.0)
        assert any(c.reason.startswith("probing") for c in held_back.changes)
