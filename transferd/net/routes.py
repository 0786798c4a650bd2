"""The sender's view of its routes: which path a job tries next, which relays failed lately,
and what each route of each job carried (for `status`).

A route that fails (a relay unreachable, its channels broken, a chunk it could not pass on) is
down for ROUTE_DOWN_S: jobs try the others first meanwhile, the direct path last
(`protocol.routes.fallback_order`). Rates are the destination's acknowledgements over the time
the route carried the job, so a route that waited or failed shows what it really moved.

A relay that hangs (stopped, not dead: its sockets stay open and nothing fails) is noticed by
its receipts: a chunk on a relayed route whose receipt has not come, while the route gave no
receipt at all and the relay's TCP took none of its bytes, for RECEIPT_SLACK times what the
route's measured rate says the chunks in flight need (`receipt_timeout`, never below
RECEIPT_FLOOR_S) fails the route like a kill.

Re-sent chunks are counted here, per route, from the sender's own sends: a send of a chunk
that went on the wire before (on this route or another) without a receipt since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transferd.errors import TransferdError, TransportError
from transferd.protocol.local_api import Job, RouteStatus
from transferd.protocol.routes import Route, fallback_order, route_label

__all__ = ["ROUTE_DOWN_S", "RELAY_RETRY_BUDGET_S", "RouteBook", "RouteDealer"]

log = logging.getLogger("transferd.sender")

ROUTE_DOWN_S = 60.0  # a failed route is tried again after this (or when no other is left)
# A relayed chunk's receipt may take RECEIPT_SLACK times what the route's measured rate says,
# never less than RECEIPT_FLOOR_S, and RECEIPT_UNMEASURED_S before the route has a rate.
# The floor rides out what a healthy route does now and then: a destination pausing a few
# seconds (an fsync of staged chunks, a SQLite checkpoint on a busy disk), or R -> B in TCP's
# retransmission backoff after a loss burst (RTOs from 0.2 s doubling: five in a row are
# 0.2 + 0.4 + 0.8 + 1.6 + 3.2 = 6.2 s). 3 s took such a route down (and a job whose only route
# it was finished on the slow direct path); 10 s still notices a hung relay well before the
# channels' 30 s stall detection.
RECEIPT_SLACK = 4.0
RECEIPT_FLOOR_S = 10.0
RECEIPT_UNMEASURED_S = 10.0
# How long a chunk or request on a relay route keeps retrying before the job moves to its next
# route: short, since another path exists (the direct one at least), unlike a direct peer.
RELAY_RETRY_BUDGET_S = 3.0
KEEP_JOBS = 1000  # jobs whose per-route figures `status` can show


@dataclass
class _RouteStat:
    label: str
    state: str = "active"
    chunks: int = 0
    bytes: int = 0
    started_at: float | None = None  # when the route began carrying the job (this time)
    last_at: float | None = None
    resent: int = 0  # sends of chunks that were on the wire before without a receipt
    error: str | None = None  # why it went down


class RouteBook:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._down_until: dict[tuple[str, tuple[str, ...]], float] = {}
        self._stats: dict[str, dict[str, _RouteStat]] = {}
        # Per job: chunks on the wire (any route) with no receipt yet.
        self._unacked: dict[str, set[str]] = {}
        self._rates: dict[tuple[str, tuple[str, ...]], float] = {}  # each route's latest rate

    def routes_for(self, job: Job) -> list[Route]:
        """The job's routes in the order to try: its own (main first), then direct; routes
        down lately go last (in their order)."""
        order = fallback_order(Route(tuple(r.via), r.share) for r in job.routes)
        now = self.clock()
        up = [r for r in order if self._down_until.get((job.dest, r.via), 0.0) <= now]
        return up + [r for r in order if r not in up]

    def is_down(self, dest: str, via: Sequence[str]) -> bool:
        return self._down_until.get((dest, tuple(via)), 0.0) > self.clock()

    def _stat(self, job_id: str, dest: str, via: Sequence[str]) -> _RouteStat:
        label = route_label(dest, via)
        if job_id not in self._stats and len(self._stats) >= KEEP_JOBS:
            oldest = next(iter(self._stats))  # dicts keep order
            del self._stats[oldest]
            self._unacked.pop(oldest, None)
        per_job = self._stats.setdefault(job_id, {})
        if label not in per_job:
            per_job[label] = _RouteStat(label)
        return per_job[label]

    def started(self, job_id: str, dest: str, via: Sequence[str]) -> None:
        stat = self._stat(job_id, dest, via)
        stat.state, stat.error = "active", None
        if stat.started_at is None:
            stat.started_at = self.clock()

    def failed(self, job_id: str, dest: str, via: Sequence[str], error: str) -> None:
        self._down_until[(dest, tuple(via))] = self.clock() + ROUTE_DOWN_S
        stat = self._stat(job_id, dest, via)
        stat.state, stat.error = "down", error[:300]
        log.warning("route.failed", extra={"fields": {
            "job": job_id, "route": route_label(dest, via), "error": error[:300]}})

    def ended(self, job_id: str, dest: str, via: Sequence[str]) -> None:
        stat = self._stat(job_id, dest, via)
        if stat.state == "active":
            stat.state = "done"

    def on_wire(self, job_id: str, dest: str, via: Sequence[str], digest: str) -> None:
        """A send of one of the job's chunks starts on this route."""
        stat = self._stat(job_id, dest, via)
        unacked = self._unacked.setdefault(job_id, set())
        if digest in unacked:
            stat.resent += 1
        unacked.add(digest)

    def acked(self, job_id: str, dest: str, via: Sequence[str], nbytes: int,
              digest: str | None = None) -> None:
        stat = self._stat(job_id, dest, via)
        now = self.clock()
        if stat.started_at is None:
            stat.started_at = now
        stat.last_at = now
        stat.chunks += 1
        stat.bytes += nbytes
        if digest is not None:
            self._unacked.get(job_id, set()).discard(digest)
        rate = self._rate(stat)
        if rate:
            self._rates[(dest, tuple(via))] = rate

    def last_receipt(self, job_id: str, dest: str, via: Sequence[str]) -> float | None:
        """When the route last delivered a receipt for the job (None: never)."""
        stat = self._stats.get(job_id, {}).get(route_label(dest, via))
        return None if stat is None else stat.last_at

    def receipt_timeout(self, dest: str, via: Sequence[str], wire_bytes: int,
                        in_flight: int) -> float:
        """How long a chunk of `wire_bytes` may wait for its receipt on the route, with
        `in_flight` chunks sharing it, while the route gives no receipt at all."""
        rate = self._rates.get((dest, tuple(via)))
        if not rate:
            return RECEIPT_UNMEASURED_S
        return max(RECEIPT_FLOOR_S, RECEIPT_SLACK * wire_bytes * max(1, in_flight) / rate)

    @staticmethod
    def _rate(stat: _RouteStat) -> float | None:
        """Acknowledged bytes over the time since the route began carrying the job (its start
        counts: a route is as fast as what it delivered since it was given the job)."""
        if stat.started_at is None or stat.last_at is None or not stat.chunks:
            return None
        span = stat.last_at - stat.started_at
        return stat.bytes / span if span > 0 else None

    def sent_since(self, job_id: str, dest: str, via: Sequence[str]) -> float | None:
        """The route's rate for this job so far (bytes/s); None before its first chunk."""
        stat = self._stats.get(job_id, {}).get(route_label(dest, via))
        return None if stat is None else self._rate(stat)

    def status(self, job_id: str) -> list[RouteStatus]:
        return [RouteStatus(route=s.label, state=s.state, chunks=s.chunks, bytes=s.bytes,
                            rate_bytes_per_s=self._rate(s), chunks_resent=s.resent,
                            error=s.error)
                for s in self._stats.get(job_id, {}).values()]


class RouteDealer:
    """The chunks of one job dealt over several routes at once (multipath). It stands where
    the sender's single pump stands: `gate.acquire(n)` picks the route for the next chunk and
    takes a slot on that route's own gate, `spawn` sends it there.

    Theory of operation: the next chunk goes to the route, among those with room on their gate,
    that would finish it earliest: ETA_r = (bytes in flight on r + n) / rate_r. rate_r is the
    route's measured rate for this job (acknowledged bytes per second) once it has one; before
    that, its planned share scaled by the measured routes' rate per share (or the share alone
    while none is measured), and it carries one chunk at a time (a probe) unless it is the main
    route (the largest share). So chunks start in the plan's shares and then follow the
    measured rates, and every route finishes together within about a chunk's time. A chunk
    whose route fails (a transient error past that route's retry budget) is sent again on
    another route, and the failed route takes no more chunks."""

    def __init__(self, book: RouteBook, job: Job, routes: Sequence[Route],
                 pumps: Sequence[Any], control: Any) -> None:
        self.book = book
        self.job = job
        self.routes = list(routes)
        self.pumps = list(pumps)
        self.control = control  # the pump whose link carries have/want and the commit
        self.link = control.link
        self.upload = control.upload
        self.budget_s = control.budget_s
        self.started: set[str] = set()
        self.deferred: list[Any] = []
        self.inflight = [0] * len(pumps)
        self.down: set[int] = set()
        self._chosen: list[int] = []
        self.gate = self  # `await dealer.gate.acquire(n)` as with one pump

    async def ready(self) -> None:
        """Until the upload is open (at every route's first hop: each open was answered before
        the dealer was made); a committed upload ends the job."""
        await self.control.ready()

    async def offer(self, refs: list[Any]) -> Any:
        """Have/want on the control route (its first offer opens the upload there)."""
        return await self.control.offer(refs)

    def _rates(self) -> list[float]:
        measured = [self.book.sent_since(self.job.id, self.job.dest, r.via) for r in self.routes]
        known = [(m, r.share) for m, r in zip(measured, self.routes, strict=True) if m]
        per_share = (sum(m for m, _ in known) / max(1e-9, sum(s for _, s in known))
                     if known else 1.0)
        return [m if m else max(r.share, 1e-3) * per_share
                for m, r in zip(measured, self.routes, strict=True)]

    def pick(self, n: int) -> int:
        live = [i for i in range(len(self.pumps)) if i not in self.down]
        if not live:
            raise TransportError("every route of the job failed", peer=self.job.dest)
        rates = self._rates()
        measured = {i for i in live if self.book.sent_since(self.job.id, self.job.dest,
                                                             self.routes[i].via)}
        main = max(live, key=lambda i: (self.routes[i].share, -i))

        def has_room(i: int) -> bool:
            # A route whose rate is not known yet carries one chunk at a time (a probe), but
            # the main route (largest share) goes ahead by its share: a slow path must not be
            # dealt a pile of chunks that the job then waits for.
            return i in measured or i == main or self.inflight[i] == 0

        # The earliest finish wins even when its gate is full: `acquire` then waits for room
        # there (a full fast route still beats an idle slow one; its backlog is in the ETA).
        return min([i for i in live if has_room(i)] or [main],
                   key=lambda i: ((self.inflight[i] + n) / rates[i], i))

    async def acquire(self, n: int) -> None:
        i = self.pick(n)
        await self.pumps[i].gate.acquire(n)
        self.inflight[i] += n
        self._chosen.append(i)

    def fail(self, i: int, error: str) -> None:
        if i not in self.down:
            self.down.add(i)
            self.book.failed(self.job.id, self.job.dest, self.routes[i].via, error)

    def spawn(self, tg: Any, digest: str, locations: list[tuple[int, int]], length: int,
              body: memoryview | None) -> None:
        """Send the chunk on the route `acquire` chose (its slot is taken); on that route's
        failure, on another."""
        on = [self._chosen.pop()]  # the route the chunk is on now
        n = length
        began = False

        async def run() -> None:
            nonlocal began
            began = True
            while True:
                try:
                    await self.pumps[on[0]].put(digest, locations, length, body)
                    return
                except TransferdError as exc:
                    if not exc.transient or len(self.pumps) - len(self.down) <= 1:
                        raise
                    self.fail(on[0], str(exc))
                    # `put` gave its slot back: another route's slot.
                    self.inflight[on[0]] -= n
                    on[0] = self.pick(n)
                    self.inflight[on[0]] += n
                    await self.pumps[on[0]].gate.acquire(n)

        def settle(_task: Any) -> None:
            self.inflight[on[0]] -= n
            if not began:  # cancelled before it ran: its slot goes back here
                self.pumps[on[0]].gate.release(0, 0)

        tg.create_task(run()).add_done_callback(settle)
