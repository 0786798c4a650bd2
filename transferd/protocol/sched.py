"""The per-peer class scheduler: which queued send goes next, and when to ask again.

Theory of operation (sans-I/O; every call takes `now`, `next_deadline()` says when to call back):
- control: strict priority, FIFO; charged to the total cap but never held by it.
- interactive: earliest deadline first. An item whose deadline cannot be met is reported as a
  `BudgetMiss` with the reason (arrived after its deadline; the bytes queued ahead of it at the
  expected service rate; its rate cap holds it past the deadline; still queued at the deadline).
  It is flagged `late` and still sent: a miss is reported, never a silent drop.
- checkpoint and sync share what is left by weight (default 3:1) with start-time fair queueing
  by bytes (Goyal, Vin & Cheng 1996): a class's next chunk starts at virtual time
  max(V, its last finish tag) and finishes size/weight later; the eligible class with the
  smallest start tag goes next and V moves to that start. A class that was idle or held by its
  cap restarts at V, with no credit banked, and a capped class goes as soon as its bucket lets
  it (no tokens overflow while it waits its turn). Work-conserving: a class alone gets everything.
- rate caps (`PeerRateLimiter`) gate every class but control. A class held by its own cap lets the
  others pass; a total cap is offered to the higher class first.
The asyncio adapter that sleeps until `next_deadline()` is `net.pump.SchedulerPump`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from netplan.plan import BULK_CLASSES, TrafficClass
from transferd.protocol.ratelimit import PeerRateLimiter

__all__ = [
    "DEFAULT_BULK_WEIGHTS",
    "BudgetMiss",
    "ClassScheduler",
    "ScheduledItem",
]

P = TypeVar("P")

# Checkpoints before background sync, 3:1 (issue 4); the site config may override it.
DEFAULT_BULK_WEIGHTS: Mapping[TrafficClass, float] = {
    TrafficClass.CHECKPOINT: 3.0,
    TrafficClass.SYNC: 1.0,
}
_PRIORITY = (TrafficClass.CONTROL, TrafficClass.INTERACTIVE, *BULK_CLASSES)


@dataclass(eq=False)
class ScheduledItem(Generic[P]):
    """One queued send. `deadline` is on the scheduler's clock; `late` once it cannot meet it."""

    traffic_class: TrafficClass
    size_bytes: int
    payload: P
    enqueued_at: float
    deadline: float | None = None
    seq: int = 0
    late: bool = False
    miss_reason: str | None = None
    sent_at: float | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BudgetMiss:
    """An interactive item that cannot meet its deadline, with why (for a log line and a metric)."""

    item: ScheduledItem[object]
    at: float
    kind: str  # arrived_late | queue_ahead | rate_cap | expired_in_queue (a metric label)
    reason: str


def _ms(seconds: float) -> str:
    """A non-negative duration in ms (a deadline met to the nanosecond is "0.0 ms", not "-0.0")."""
    return f"{max(0.0, seconds) * 1000:.1f} ms"


class ClassScheduler(Generic[P]):
    """Queues for the four classes to one peer; `dequeue(now)` returns the next item allowed now."""

    def __init__(
        self,
        now: float,
        *,
        bulk_weights: Mapping[TrafficClass, float] | None = None,
        limiter: PeerRateLimiter | None = None,
        service_rate_bytes_per_s: float | None = None,
    ) -> None:
        weights = dict(DEFAULT_BULK_WEIGHTS if bulk_weights is None else bulk_weights)
        for cls, weight in weights.items():
            if cls not in BULK_CLASSES:
                raise ValueError(f"bulk_weights: {cls} is not a bulk class")
            if not weight > 0:
                raise ValueError(f"bulk_weights.{cls}: must be > 0, got {weight}")
        self.bulk_weights = {cls: float(weights.get(cls, 1.0)) for cls in BULK_CLASSES}
        self.limiter = limiter
        # Expected rate at which this peer drains interactive bytes (the link or the class cap);
        # None = unknown: only deadlines already passed count as misses.
        self.service_rate_bytes_per_s = service_rate_bytes_per_s
        self._seq = itertools.count()
        self._control: deque[ScheduledItem[P]] = deque()
        self._interactive: list[tuple[float, int, ScheduledItem[P]]] = []
        self._interactive_bytes = 0
        self._bulk: dict[TrafficClass, deque[ScheduledItem[P]]] = {c: deque() for c in BULK_CLASSES}
        self._finish_tag = {cls: 0.0 for cls in BULK_CLASSES}
        self._virtual_time = 0.0
        self._blocked_until: dict[TrafficClass, float] = {}
        self._misses: list[BudgetMiss] = []
        self._now = now
        # Set by `dequeue` when it answered None because the item is another class's to take.
        self.handoff: TrafficClass | None = None

    # -- input --------------------------------------------------------------------------------

    def enqueue(
        self,
        traffic_class: TrafficClass,
        size_bytes: int,
        payload: P,
        now: float,
        deadline: float | None = None,
    ) -> ScheduledItem[P]:
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
        self._now = max(self._now, now)
        item = ScheduledItem(
            traffic_class, size_bytes, payload, now, deadline=deadline, seq=next(self._seq)
        )
        if traffic_class is TrafficClass.CONTROL:
            self._control.append(item)
        elif traffic_class is TrafficClass.INTERACTIVE:
            key = math.inf if deadline is None else deadline
            self._check_feasible(item, now)
            heapq.heappush(self._interactive, (key, item.seq, item))
            self._interactive_bytes += size_bytes
        else:
            self._bulk[traffic_class].append(item)
        return item

    def _miss(self, item: ScheduledItem[P], now: float, kind: str, reason: str) -> None:
        if item.miss_reason is not None:
            return
        item.late = True
        item.miss_reason = reason
        self._misses.append(BudgetMiss(item, now, kind, reason))  # type: ignore[arg-type]

    def _check_feasible(self, item: ScheduledItem[P], now: float) -> None:
        if item.deadline is None:
            return
        budget = item.deadline - now
        if budget <= 0:
            self._miss(item, now, "arrived_late", f"arrived {_ms(-budget)} after its deadline")
            return
        # Control goes first, then interactive items due no later than this one (EDF order).
        ahead = sum(i.size_bytes for i in self._control) + sum(
            i.size_bytes for key, _, i in self._interactive if key <= item.deadline
        )
        backlog = ahead + item.size_bytes
        needed, bottleneck = 0.0, ""
        if self.service_rate_bytes_per_s is not None:
            needed = backlog / self.service_rate_bytes_per_s
            bottleneck = f" at {self.service_rate_bytes_per_s:.0f} B/s"
        if self.limiter is not None:
            capped = self.limiter.time_to_pass(TrafficClass.INTERACTIVE, backlog, now)
            if capped > needed:
                needed, bottleneck = capped, " under the rate cap"
        if needed > budget:
            self._miss(
                item,
                now,
                "queue_ahead" if bottleneck != " under the rate cap" else "rate_cap",
                f"needs ~{_ms(needed)} ({ahead} bytes queued ahead, {item.size_bytes} bytes"
                f"{bottleneck}) but its deadline is in {_ms(budget)}",
            )

    def handle_timer(self, now: float) -> None:
        """Report interactive items still queued at their deadline."""
        self._now = max(self._now, now)
        for key, _, item in self._interactive:
            if key <= now and item.miss_reason is None:
                self._miss(
                    item,
                    now,
                    "expired_in_queue",
                    f"still queued {_ms(now - key)} after its deadline",
                )

    # -- output -------------------------------------------------------------------------------

    def dequeue(
        self,
        now: float,
        classes: Collection[TrafficClass] | None = None,
        ready: Collection[TrafficClass] | None = None,
    ) -> ScheduledItem[P] | None:
        """The next item allowed to go at `now` (charged to the caps), or None.

        `classes` restricts the answer to the classes the caller's connection pool carries;
        `ready` names the other bulk classes whose pools have a worker waiting right now (default:
        all). When the weights say a ready class other than the caller's goes next, the answer is
        None and that class's worker gets the item when it asks; a class with no worker waiting
        is passed over, so a busy pool never idles the others.
        """
        self._now = max(self._now, now)
        self.handle_timer(now)
        wanted = set(_PRIORITY if classes is None else classes)
        item: ScheduledItem[P] | None = None
        if TrafficClass.CONTROL in wanted and self._control:
            item = self._control.popleft()
            if self.limiter is not None:
                self.limiter.charge(TrafficClass.CONTROL, item.size_bytes, now)
        if item is None and TrafficClass.INTERACTIVE in wanted:
            item = self._dequeue_interactive(now)
        self.handoff = None
        takers = wanted | set(_PRIORITY if ready is None else ready)
        if item is None and wanted.intersection(BULK_CLASSES):
            higher = self._higher_class_wants_total(now, takers)
            if higher is not None:
                self.handoff = higher
            else:
                item = self._dequeue_bulk(now, wanted, takers)
        if item is not None:
            item.sent_at = now
            self._blocked_until.pop(item.traffic_class, None)
        return item

    def _allowed(self, cls: TrafficClass, size: int, now: float) -> bool:
        if self.limiter is None:
            return True
        release = self.limiter.delay_until(cls, size, now)
        if release > now:
            self._blocked_until[cls] = release
            return False
        return True

    def _dequeue_interactive(self, now: float) -> ScheduledItem[P] | None:
        if not self._interactive:
            return None
        key, _, head = self._interactive[0]
        if not self._allowed(TrafficClass.INTERACTIVE, head.size_bytes, now):
            release = self._blocked_until[TrafficClass.INTERACTIVE]
            if release > key:
                self._miss(
                    head,
                    now,
                    "rate_cap",
                    f"rate cap holds it until {_ms(release - now)} from now, "
                    f"past its deadline in {_ms(key - now)}",
                )
            return None
        heapq.heappop(self._interactive)
        self._interactive_bytes -= head.size_bytes
        if self.limiter is not None:
            self.limiter.consume(TrafficClass.INTERACTIVE, head.size_bytes, now)
        return head

    def _higher_class_wants_total(
        self, now: float, takers: Collection[TrafficClass]
    ) -> TrafficClass | None:
        """The higher class whose queued item (and waiting worker) could use the total cap's
        tokens now, if any: bulk must leave them to it."""
        if self.limiter is None or self.limiter.total_bucket is None:
            return None
        if self._control and TrafficClass.CONTROL in takers:
            return TrafficClass.CONTROL
        if self._interactive and TrafficClass.INTERACTIVE in takers:
            head = self._interactive[0][2]
            own = self.limiter.class_buckets.get(TrafficClass.INTERACTIVE)
            if own is None or own.can_consume(head.size_bytes, now):
                return TrafficClass.INTERACTIVE
        return None

    def _dequeue_bulk(
        self, now: float, wanted: Collection[TrafficClass], takers: Collection[TrafficClass]
    ) -> ScheduledItem[P] | None:
        eligible = [
            c
            for c in BULK_CLASSES
            if c in takers and self._bulk[c] and self._allowed(c, self._bulk[c][0].size_bytes, now)
        ]
        if not eligible:
            return None
        cls = min(eligible, key=self._start_tag)  # ties: checkpoint before sync (BULK_CLASSES)
        if cls not in wanted:
            # Its turn, but another pool carries it: that pool's next call picks the same class,
            # as nothing changed in between.
            self.handoff = cls
            return None
        head = self._bulk[cls].popleft()
        start = self._start_tag(cls)
        self._virtual_time = start
        self._finish_tag[cls] = start + head.size_bytes / self.bulk_weights[cls]
        if self.limiter is not None:
            self.limiter.consume(cls, head.size_bytes, now)
        return head

    def _start_tag(self, cls: TrafficClass) -> float:
        return max(self._virtual_time, self._finish_tag[cls])

    def next_deadline(self) -> float | None:
        """When to call `dequeue`/`handle_timer` again if nothing else happens (None: never)."""
        times = [
            release
            for cls, release in self._blocked_until.items()
            if self._queued(cls) and release > self._now
        ]
        times.extend(
            key
            for key, _, item in self._interactive
            if item.miss_reason is None and not math.isinf(key)
        )
        return min(times, default=None)

    def _queued(self, cls: TrafficClass) -> bool:
        if cls is TrafficClass.CONTROL:
            return bool(self._control)
        if cls is TrafficClass.INTERACTIVE:
            return bool(self._interactive)
        return bool(self._bulk[cls])

    def discard(self, item: ScheduledItem[P]) -> bool:
        """Take a queued item back (its sender gave up); False when it is no longer queued."""
        cls = item.traffic_class
        if cls is TrafficClass.INTERACTIVE:
            for i, (_, _, queued) in enumerate(self._interactive):
                if queued is item:
                    self._interactive.pop(i)
                    heapq.heapify(self._interactive)
                    self._interactive_bytes -= item.size_bytes
                    return True
            return False
        queue = self._control if cls is TrafficClass.CONTROL else self._bulk[cls]
        try:
            queue.remove(item)
        except ValueError:
            return False
        return True

    def discard_newest(self, cls: TrafficClass) -> bool:
        """Take back the most recently queued bulk or control item of `cls`, if any."""
        queue = self._control if cls is TrafficClass.CONTROL else self._bulk.get(cls)
        if not queue:
            return False
        queue.pop()
        return True

    def pop_budget_misses(self) -> list[BudgetMiss]:
        misses, self._misses = self._misses, []
        return misses

    def queued_bytes(self, cls: TrafficClass) -> int:
        if cls is TrafficClass.CONTROL:
            return sum(i.size_bytes for i in self._control)
        if cls is TrafficClass.INTERACTIVE:
            return self._interactive_bytes
        return sum(i.size_bytes for i in self._bulk[cls])

    def __len__(self) -> int:
        return len(self._control) + len(self._interactive) + sum(map(len, self._bulk.values()))
