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
    the next `put`, whichever is first. Budget misses go to `on_budget_miss` as they are found."""

    def __init__(
        self,
        scheduler: ClassScheduler[P],
        on_budget_miss: Callable[[BudgetMiss], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.on_budget_miss = on_budget_miss
        self._changed = asyncio.Condition()
        self._waiting: dict[TrafficClass, int] = dict.fromkeys(TrafficClass, 0)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _report(self) -> None:
        for miss in self.scheduler.pop_budget_misses():
            if self.on_budget_miss is not None:
                self.on_budget_miss(miss)

    async def put(
        self,
        traffic_class: TrafficClass,
        size_bytes: int,
        payload: P,
        deadline: float | None = None,
    ) -> ScheduledItem[P]:
        """Queue a send; `deadline` is on the event loop's clock (`self.now()`)."""
        async with self._changed:
            item = self.scheduler.enqueue(traffic_class, size_bytes, payload, self.now(), deadline)
            self._report()
            self._changed.notify_all()
        return item

    async def get(self, classes: Collection[TrafficClass] | None = None) -> ScheduledItem[P]:
        mine = tuple(TrafficClass if classes is None else classes)
        async with self._changed:
            for cls in mine:
                self._waiting[cls] += 1
            try:
                return await self._get(mine)
            finally:
                for cls in mine:
                    self._waiting[cls] -= 1

    async def _get(self, classes: tuple[TrafficClass, ...]) -> ScheduledItem[P]:
        while True:
            now = self.now()
            ready = [cls for cls, waiting in self._waiting.items() if waiting]
            item = self.scheduler.dequeue(now, classes, ready)
            self._report()
            if item is not None:
                # Another worker may be able to take the next item right away.
                self._changed.notify_all()
                return item
            if self.scheduler.handoff is not None:
                self._changed.notify_all()  # the next item is another pool's waiting worker's
            wake = self.scheduler.next_deadline()
            delay = None if wake is None else max(wake - now, 0.0)
            try:
                async with asyncio.timeout(delay):
                    await self._changed.wait()
            except TimeoutError:
                pass


class BulkGate:
    """Admission of chunk uploads for one (peer, bulk class), for senders that own their upload
    tasks: `await acquire(n)` returns once a stream is free (in flight < the controller's target)
    and the peer's scheduler releases n bytes of this class (rate caps, weights); `release(acked,
    errors)` ends the upload and feeds the controller. Synchronous release, so it is safe in
    `finally` blocks of cancelled tasks."""

    EARLY_RELEASE_CAP = 16  # uploads in flight beyond which sent() keeps the stream busy

    def __init__(
        self,
        peer: str,
        pump: SchedulerPump[None],
        traffic_class: TrafficClass,
        controller: StreamController,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.peer = peer
        self.clock = clock or pump.now  # the controller's clock (tests pass a fake one)
        self.pump = pump
        self.traffic_class = traffic_class
        self.controller = controller
        self.metrics = metrics
        self.in_flight = 0
        self.awaiting = 0  # uploads whose body is sent, waiting for the answer (sent())
        self._waiters: deque[asyncio.Future[None]] = deque()
        if metrics is not None:
            metrics.streams_target.labels(peer, traffic_class.value).set(
                controller.target_streams
            )

    async def acquire(self, size_bytes: int) -> None:
        if self.in_flight >= self.controller.target_streams or self._waiters:
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

    def release(self, acked_bytes: int, errors: int = 0, *, slot: bool = True) -> None:
        """The upload ended: feed the controller, and free its stream unless `sent()` already
        did (`slot=False`)."""
        self.controller.on_sample(self.clock(), acked_bytes, errors)
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
        if slot:
            self._release_slot()
        else:
            self.awaiting -= 1

    def sent(self) -> bool:
        """The upload's body is on the wire and it only awaits the peer's answer: its stream is
        free for the next chunk (returns True; then `release(..., slot=False)` ends it). Without
        this, every stream idles one RTT (plus the peer's verify and write) per chunk - on a
        40 ms link with 8 MiB chunks, ~13 % of the link. At most one upload per stream awaits,
        and uploads in flight (sending plus awaiting) stay within max(target, EARLY_RELEASE_CAP),
        so the chunks held in memory do not double at high stream counts."""
        target = self.controller.target_streams
        if self.awaiting >= target or self.in_flight + self.awaiting >= max(
            target, self.EARLY_RELEASE_CAP
        ):
            return False
        self.awaiting += 1
        self._release_slot()
        return True

    def _release_slot(self) -> None:
        self.in_flight -= 1
        while self._waiters and self.in_flight < self.controller.target_streams:
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
    ) -> PeerTraffic:
        if now is None:
            now = asyncio.get_running_loop().time()
        limiter = None
        if class_caps_bytes_per_s or total_cap_bytes_per_s is not None:
            limiter = PeerRateLimiter(
                now,
                class_caps={
                    c: RateCap.from_rate(rate) for c, rate in (class_caps_bytes_per_s or {}).items()
                },
                total_cap=(
                    None
                    if total_cap_bytes_per_s is None
                    else RateCap.from_rate(total_cap_bytes_per_s)
                ),
            )
        interactive_rate = None
        if limiter is not None:
            rate = limiter.rate_bytes_per_s(TrafficClass.INTERACTIVE)
            interactive_rate = None if math.isinf(rate) else rate
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
            gates[bulk] = BulkGate(peer, pump, bulk, controller, metrics)
        return cls(peer, pump, gates)
