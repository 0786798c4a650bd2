"""The sender's view of its routes: which path a job tries next, which relays failed lately,
and what each route of each job carried (for `status`).

A route that fails (a relay unreachable, its channels broken, a chunk it could not pass on) is
down for ROUTE_DOWN_S: jobs try the others first meanwhile, the direct path last
(`protocol.routes.fallback_order`). Rates are the destination's acknowledgements over the time
the route carried the job, so a route that waited or failed shows what it really moved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transferd.protocol.local_api import Job, RouteStatus
from transferd.protocol.routes import Route, fallback_order, route_label

__all__ = ["ROUTE_DOWN_S", "RELAY_RETRY_BUDGET_S", "RouteBook"]

log = logging.getLogger("transferd.sender")

ROUTE_DOWN_S = 60.0  # a failed route is tried again after this (or when no other is left)
# How long a chunk or request on a relay route keeps retrying before the job moves to its next
# route: short, since another path exists (the direct one at least), unlike a direct peer.
RELAY_RETRY_BUDGET_S = 3.0


@dataclass
class _RouteStat:
    label: str
    state: str = "active"
    chunks: int = 0
    bytes: int = 0
    first_at: float | None = None
    last_at: float | None = None


class RouteBook:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._down_until: dict[tuple[str, tuple[str, ...]], float] = {}
        self._stats: dict[str, dict[str, _RouteStat]] = {}

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
        per_job = self._stats.setdefault(job_id, {})
        if label not in per_job:
            per_job[label] = _RouteStat(label)
        return per_job[label]

    def started(self, job_id: str, dest: str, via: Sequence[str]) -> None:
        stat = self._stat(job_id, dest, via)
        stat.state = "active"

    def failed(self, job_id: str, dest: str, via: Sequence[str], error: str) -> None:
        self._down_until[(dest, tuple(via))] = self.clock() + ROUTE_DOWN_S
        self._stat(job_id, dest, via).state = "down"
        log.warning("route.failed", extra={"fields": {
            "job": job_id, "route": route_label(dest, via), "error": error[:300]}})

    def ended(self, job_id: str, dest: str, via: Sequence[str]) -> None:
        stat = self._stat(job_id, dest, via)
        if stat.state == "active":
            stat.state = "done"

    def acked(self, job_id: str, dest: str, via: Sequence[str], nbytes: int) -> None:
        stat = self._stat(job_id, dest, via)
        now = self.clock()
        if stat.first_at is None:
            stat.first_at = now
        stat.last_at = now
        stat.chunks += 1
        stat.bytes += nbytes

    def sent_since(self, job_id: str, dest: str, via: Sequence[str]) -> float | None:
        """The route's rate for this job so far (bytes/s), None before two acknowledgements."""
        stat = self._stats.get(job_id, {}).get(route_label(dest, via))
        if stat is None or stat.first_at is None or stat.last_at is None:
            return None
        span = stat.last_at - stat.first_at
        return stat.bytes / span if span > 0 and stat.chunks > 1 else None

    def status(self, job_id: str) -> list[RouteStatus]:
        out = []
        for stat in self._stats.get(job_id, {}).values():
            rate = None
            if stat.first_at is not None and stat.last_at is not None and stat.chunks > 1:
                span = stat.last_at - stat.first_at
                rate = stat.bytes * (stat.chunks - 1) / stat.chunks / span if span > 0 else None
            out.append(RouteStatus(route=stat.label, state=stat.state, chunks=stat.chunks,
                                   bytes=stat.bytes, rate_bytes_per_s=rate))
        return out
