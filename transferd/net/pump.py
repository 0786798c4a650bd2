"""The asyncio adapters of the per-peer traffic cores: `SchedulerPump` feeds the event loop's
clock into a `ClassScheduler` and sleeps until its next deadline; `BulkGate` admits each chunk
upload of one bulk class (a free stream, then the scheduler's turn); `PeerTraffic` bundles a
peer's pump and gates for the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from netplan.plan import BULK_CLASSES, TrafficClass
from transferd.protocol.ratelimit import PeerRateLimiter, RateCap
from transferd.protocol.sched import BudgetMiss, ClassScheduler, ScheduledItem
from transferd.protocol.streams import StreamController
from transferd.site.metrics import Metrics

__all__ = ["BulkGate", "PeerTraffic", "SchedulerPump"]

P = TypeVar("P")
log = logging.getLogger("transferd.streams")


class SchedulerPump(Generic[P]):
    """The asyncio adapter: `put` from any task, `await get(classes)` from each connection pool's
    workers. It feeds the event loop's clock in and sleeps until the scheduler's next deadline or
    the next `put`, whichever is first. Budget misses go to `on_budget_miss` as they are found.

    Wake-ups are targeted: a `put` wakes the longest-waiting worker of that class, not every
    worker of every pool (with 32 interactive workers idle, waking them all cost ~270 us of the
    event loop per message); after a worker takes an item, one worker per class with items
    still queued is woken, and a handoff wakes one of the class the scheduler named."""

    def __init__(
        self,
        scheduler: ClassScheduler[P],
        on_budget_miss: Callable[[BudgetMiss], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.on_budget_miss = on_budget_miss
        self._sleepers: list[tuple[tuple[TrafficClass, ...], asyncio.Future[None]]] = []
        self._waiting: dict[TrafficClass, int] = dict.fromkeys(TrafficClass, 0)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _report(self) -> None:
        for miss in self.scheduler.pop_budget_misses():
            if self.on_budget_miss is not None:
                self.on_budget_miss(miss)

    def _wake(self, cls: TrafficClass | None) -> None:
        """Wake the longest-sleeping worker that takes `cls` (None: every sleeping worker)."""
        for classes, woken in self._sleepers:
            if not woken.done() and (cls is None or cls in classes):
                woken.set_result(None)
                if cls is not None:
                    return

    async def put(
        self,
        traffic_class: TrafficClass,
        size_bytes: int,
        payload: P,
        deadline: float | None = None,
    ) -> ScheduledItem[P]:
        """Queue a send; `deadline` is on the event loop's clock (`self.now()`)."""
        item = self.scheduler.enqueue(traffic_class, size_bytes, payload, self.now(), deadline)
        self._report()
        self._wake(traffic_class)
        return item

    async def get(self, classes: Collection[TrafficClass] | None = None) -> ScheduledItem[P]:
        mine = tuple(TrafficClass if classes is None else classes)
        for cls in mine:
            self._waiting[cls] += 1
        try:
            return await self._get(mine)
        finally:
            for cls in mine:
                self._waiting[cls] -= 1

    async def _get(self, classes: tuple[TrafficClass, ...]) -> ScheduledItem[P]:
        loop = asyncio.get_running_loop()
        while True:
            now = self.now()
            ready = [cls for cls, waiting in self._waiting.items() if waiting]
            item = self.scheduler.dequeue(now, classes, ready)
            self._report()
            if item is not None:
                # Another worker may be able to take the next item right away.
                for cls in TrafficClass:
                    if self.scheduler.queued_bytes(cls):
                        self._wake(cls)
                return item
            if self.scheduler.handoff is not None:
                self._wake(self.scheduler.handoff)  # the next item is another pool's
            wake = self.scheduler.next_deadline()
            delay = None if wake is None else max(wake - now, 0.0)
            entry = (classes, loop.create_future())
            self._sleepers.append(entry)
            try:
                async with asyncio.timeout(delay):
                    await entry[1]
            except TimeoutError:
                pass
            except BaseException:
                if entry[1].done() and not entry[1].cancelled():
                    self._wake(None)  # woken, then cancelled: pass the wake-up on
                raise
            finally:
                self._sleepers.remove(entry)


class BulkGate:
    """Admission of chunks for one (peer, bulk class), for senders that own their chunk tasks:
    `await acquire(n)` returns once the class may have another chunk in flight (fewer than the
    controller's streams x `per_stream`: each data channel keeps a window of chunks in flight
    across the round trip) and the peer's scheduler releases n bytes of this class (rate caps,
    weights); `release(acked, errors)` ends the chunk at its receipt and feeds the controller.
    Synchronous release, so it is safe in `finally` blocks of cancelled tasks."""

    def __init__(
        self,
        peer: str,
        pump: SchedulerPump[None],
        traffic_class: TrafficClass,
        controller: StreamController,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
        per_stream: int = 1,
    ) -> None:
        self.peer = peer
        self.clock = clock or pump.now  # the controller's clock (tests pass a fake one)
        self.pump = pump
        self.traffic_class = traffic_class
        self.controller = controller
        self.metrics = metrics
        self.per_stream = per_stream
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        if metrics is not None:
            metrics.streams_target.labels(peer, traffic_class.value).set(
                controller.target_streams
            )

    @property
    def limit(self) -> int:
        return self.controller.target_streams * self.per_stream

    async def acquire(self, size_bytes: int) -> None:
        if self.in_flight >= self.limit or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # the releaser counted us in already
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        else:
            self.in_flight += 1
        item = None
        try:
            item = await self.pump.put(self.traffic_class, size_bytes, None)
            await self.pump.get([self.traffic_class])
        except BaseException:
            # Given up before sending: take one marker back so the queue stays balanced (any
            # marker will do: they are interchangeable).
            scheduler = self.pump.scheduler
            if item is not None and not scheduler.discard(item):
                scheduler.discard_newest(self.traffic_class)
            self._release_slot()
            raise

    def release(self, acked_bytes: int, errors: int = 0) -> None:
        """The chunk ended (its receipt came, or it failed): feed the controller, free its
        slot."""
        self.controller.on_sample(self.clock(), acked_bytes, errors)
        if self.metrics is not None and acked_bytes:
            self.metrics.class_bytes_acked.labels(self.peer, self.traffic_class.value).inc(
                acked_bytes)
        for change in self.controller.pop_changes():
            if self.metrics is not None:
                self.metrics.count_stream_change(self.peer, self.traffic_class, change)
            log.info(
                "streams.change",
                extra={
                    "fields": {
                        "peer": self.peer,
                        "class": self.traffic_class.value,
                        "from": change.from_streams,
                        "to": change.to_streams,
                        "goodput_mbps": round(change.goodput_bytes_per_s * 8 / 1e6, 1),
                        "reason": change.reason,
                    }
                },
            )
        self._release_slot()

    def _release_slot(self) -> None:
        self.in_flight -= 1
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)


@dataclass
class PeerTraffic:
    """What the daemon schedules toward one peer: its scheduler (behind a pump shared by the
    message service and the bulk path) and one `BulkGate` per bulk class."""

    peer: str
    pump: SchedulerPump[Any]
    gates: dict[TrafficClass, BulkGate]

    def streams_wanted(self) -> int:
        """Data channels to keep open to the peer: the most any bulk class's controller wants
        (the classes share the channels; each class's gate bounds its own chunks in flight)."""
        return max(gate.controller.target_streams for gate in self.gates.values())

    @classmethod
    def build(
        cls,
        peer: str,
        *,
        now: float | None = None,
        bulk_weights: Mapping[TrafficClass, float] | None = None,
        class_caps_bytes_per_s: Mapping[TrafficClass, float] | None = None,
        total_cap_bytes_per_s: float | None = None,
        initial_streams: int = 2,
        min_streams: int = 1,
        max_streams: int = 32,
        adaptive: bool = True,
        metrics: Metrics | None = None,
        per_stream: int = 1,
    ) -> PeerTraffic:
        if now is None:
            now = asyncio.get_running_loop().time()
        limiter = _rate_limiter(now, class_caps_bytes_per_s, total_cap_bytes_per_s)
        interactive_rate = _interactive_rate(limiter)
        scheduler: ClassScheduler[Any] = ClassScheduler(
            now,
            bulk_weights=bulk_weights,
            limiter=limiter,
            service_rate_bytes_per_s=interactive_rate,
        )
        pump: SchedulerPump[Any] = SchedulerPump(scheduler)
        gates = {}
        for bulk in BULK_CLASSES:
            if adaptive:
                controller = StreamController(
                    now,
                    initial_streams=initial_streams,
                    min_streams=min_streams,
                    max_streams=max_streams,
                )
            else:  # a fixed count: bounds pinned to it
                controller = StreamController(
                    now,
                    initial_streams=initial_streams,
                    min_streams=initial_streams,
                    max_streams=initial_streams,
                )
            gates[bulk] = BulkGate(peer, pump, bulk, controller, metrics, per_stream=per_stream)
        return cls(peer, pump, gates)

    def reconfigure(
        self,
        now: float,
        *,
        bulk_weights: Mapping[TrafficClass, float],
        class_caps_bytes_per_s: Mapping[TrafficClass, float],
        total_cap_bytes_per_s: float | None,
    ) -> None:
        """New weights and rate caps (a reloaded config or plan) from `now` on: what is queued
        or in flight stays where it is; sends still waiting for their turn are reconsidered at
        once under the new caps (fresh buckets, full)."""
        scheduler = self.pump.scheduler
        scheduler.bulk_weights = {c: float(bulk_weights.get(c, 1.0)) for c in BULK_CLASSES}
        scheduler.limiter = _rate_limiter(now, class_caps_bytes_per_s, total_cap_bytes_per_s)
        scheduler.service_rate_bytes_per_s = _interactive_rate(scheduler.limiter)
        self.pump._wake(None)


def _rate_limiter(now: float, class_caps_bytes_per_s: Mapping[TrafficClass, float] | None,
                  total_cap_bytes_per_s: float | None) -> PeerRateLimiter | None:
    if not class_caps_bytes_per_s and total_cap_bytes_per_s is None:
        return None
    return PeerRateLimiter(
        now,
        class_caps={c: RateCap.from_rate(rate)
                    for c, rate in (class_caps_bytes_per_s or {}).items()},
        total_cap=(None if total_cap_bytes_per_s is None
                   else RateCap.from_rate(total_cap_bytes_per_s)),
    )


def _interactive_rate(limiter: PeerRateLimiter | None) -> float | None:
    """The rate interactive bytes drain at under the caps (None: uncapped, unknown)."""
    if limiter is None:
        return None
    rate = limiter.rate_bytes_per_s(TrafficClass.INTERACTIVE)
    return None if math.isinf(rate) else rate
