"""The bodies of the local API, between a site's CLI and its own daemon: replication jobs and
their states, `send`, `jobs` and `status`.

A job replicates one path to one destination: queued -> running -> committed | failed (a
running job whose daemon stopped is running again after the restart, from the journal). A
running job whose peer cannot be reached, or whose link keeps failing, past the retry budget of
its requests waits: running -> waiting -> running again at `next_attempt_at` (capped
exponential backoff), resuming from what the receiver already has; `note` says why. It fails
only on a permanent error, or when its `deadline` (`send --timeout`) passes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from netplan.ids import TrafficClass
from transferd.protocol.wire import WireModel

__all__ = [
    "Job",
    "JobRoute",
    "RouteStatus",
    "JobState",
    "JobStatus",
    "JobsAnswer",
    "MessageSocketAnswer",
    "PeerStatus",
    "SendAnswer",
    "SendRequest",
    "SiteStatus",
]

MAX_JOBS_PER_QUERY = 1000
MAX_JOBS_WAIT_MS = 60_000  # the longest a jobs query may wait for one of them to end


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # for its peer or link: tried again at next_attempt_at
    COMMITTED = "committed"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING, JobState.WAITING)


SiteName = Annotated[str, Field(min_length=1, max_length=64)]


class JobRoute(WireModel):
    """One path of a job: the relays in order (empty: direct) and the share of its chunks."""

    via: Annotated[list[SiteName], Field(max_length=8)] = []
    share: Annotated[float, Field(ge=0, le=1)] = 1.0


class Job(WireModel):
    id: str
    path: str
    dest: str
    traffic_class: TrafficClass
    state: JobState
    error: str | None
    error_kind: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    bytes_logical: int
    bytes_done: int
    bytes_on_wire: int
    chunks: int
    chunks_skipped: int
    chunks_sent: int
    retries: int
    integrity_failures: int
    # The last problem that is being retried (peer unreachable, link failing), when; the time
    # of the next attempt while waiting; attempts after the first; when the job gives up.
    note: str | None = None
    next_attempt_at: float | None = None
    attempts: int = 0
    deadline: float | None = None
    # The paths the job takes, main one first (the plan's routes, or `send --via`); empty:
    # direct. A relay that fails hands its chunks to the next, the direct path last.
    routes: list[JobRoute] = []


class SendRequest(WireModel):
    """Replicate `path` (relative to data_dir) to each site in `to`; with `timeout_s`, a job
    not committed that long after it was queued fails (whatever it is waiting for)."""

    path: str
    to: Annotated[list[str], Field(min_length=1, max_length=1000)]
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    via: Annotated[list[SiteName], Field(max_length=8)] = []  # relays, in order (`--via`)
    multipath: bool = False  # the relayed path and the direct one at once (`--multipath`)


class SendAnswer(WireModel):
    jobs: list[str]  # one job id per destination, in `to` order


class JobsAnswer(WireModel):
    jobs: list[Job]


class RouteStatus(WireModel):
    """What one route of a job carried: chunks and bytes acknowledged by the destination, its
    rate while it carried them, and whether it is in use, done, or down (failed over)."""

    route: str  # `R>B`: the relays then the destination
    state: str
    chunks: int
    bytes: int
    rate_bytes_per_s: float | None
    # Chunks this route sent that had gone on the wire before (here or on another route of the
    # job) without a receipt: what a broken channel or a lost relay cost.
    chunks_resent: int = 0
    error: str | None = None  # why the route went down


class JobStatus(Job):
    rate_bytes_per_s: float | None = None  # while running: bytes done / seconds since start
    route_status: list[RouteStatus] = []  # per route, as this daemon saw it since it started


class PeerStatus(WireModel):
    url: str
    bytes_sent: float
    bytes_received: float
    chunks_sent: float
    chunks_skipped: float
    retries: float
    link_bytes_per_s: float | None  # measured goodput of chunk bodies (None: nothing sent yet)
    streams: dict[TrafficClass, int]  # parallel uploads per bulk class


class SiteStatus(WireModel):
    site: str
    listen: str
    jobs: list[JobStatus]
    peers: dict[str, PeerStatus]


class MessageSocketAnswer(WireModel):
    """`GET /v1/local/message-socket`: where this daemon's message socket listens (a unix
    socket path, reachable from this host only; `protocol.message_socket`)."""

    path: str

