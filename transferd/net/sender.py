"""The sending side: jobs from the journal become uploads to a peer.

A job (path, destination) runs: hash the first batch, open the upload asking have/want for it in
the same request -> for each later batch: hash, ask have/want -> send the wanted chunks on the
peer's data channels -> signed manifest -> commit, sent as soon as the last chunk is handed to
the channels and answered by the receiver when that chunk lands (so the control plane costs a
job one round trip before its first chunk leaves and none after its last chunk lands; the later
batches' have/want overlap the sending). Each request and each
chunk retries transient errors within the retry budget (`peer_client.retrying`), noting in the
job what it retries and when; past that, a transient error sends the job to `waiting` (its
peer is unreachable, its link keeps failing) and it is attempted again after a capped
exponential delay (`protocol.backoff.job_retry_delay`), resuming from what the receiver has.
A job fails on a permanent error, or when its deadline (`send --timeout`) passes. Every body
the job puts on the wire, control or chunk, first send or again, is counted in its
`bytes_on_wire` as it starts going out. Hashing of the next batch overlaps the sending of the
previous one; a fresh file (the receiver holds nothing of it) is sent in one pass after its first
batch, its chunks hashed by the channel threads as they go, a probe hashed and offered every
ONE_PASS_PROBE_EVERY chunks (`_hash_and_offer`); each chunk is admitted by the peer's
`BulkGate` for the job's class (the class scheduler's weights and rate caps, and the adaptive
stream count). Policy is checked before a
byte is read. Jobs survive SIGKILL: the journal keeps them and a restarted daemon re-opens the
same upload id, so the receiver's answer to have/want says exactly which chunks are still
missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from netplan.plan import TrafficClass
from transferd.errors import (
    IntegrityError,
    PolicyViolation,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
)
from transferd.net.channels import LoopInbox, OutgoingChunk, PeerChannels
from transferd.net.loop_lag import work_seen
from transferd.net.peer_client import PeerLink, retrying
from transferd.net.pump import PeerTraffic
from transferd.net.routes import RELAY_RETRY_BUDGET_S, RouteBook, RouteDealer
from transferd.protocol.auth import Keys
from transferd.protocol.backoff import job_retry_delay
from transferd.protocol.channel import DataChannelAnswer, Receipt, ReceiptStatus
from transferd.protocol.chunks import blake3_hex, fixed_spans
from transferd.protocol.codec import SAMPLE_BYTES, CompressionPolicy, Encoded, zstd_compress
from transferd.protocol.local_api import Job, JobRoute, JobState
from transferd.protocol.manifest import (
    ChunkRef,
    CommitAnswer,
    HaveAnswer,
    HaveRequest,
    Manifest,
    OfferAnswer,
    OpenAnswer,
    UploadIntent,
)
from transferd.protocol.policy import check_may_leave_site, normalize_rel_path, traffic_class_for
from transferd.protocol.routes import Route, open_query
from transferd.protocol.upload import (
    ONE_PASS_PROBE_EVERY,
    OfferPlan,
    commit_path,
    offer_batches,
    offer_refused,
    one_pass_refused,
    open_request,
    plan_offer,
    resend,
    upload_id,
    upload_intent,
    upload_manifest,
)
from transferd.protocol.wire import (
    ABORT_ROUTE,
    COMMIT_ROUTE,
    DATA_CHANNEL_ROUTE,
    HAVE_ROUTE,
    UPLOADS_ROUTE,
    WireModel,
    parse_body,
)
from transferd.site.failures import source_changed_error
from transferd.site.journal import JobCounters, Journal
from transferd.site.metrics import Metrics
from transferd.site.source import SourceFile, chunk_spans
from transferd.site.storage import SiteStorage, Source

__all__ = ["Sender"]

A = TypeVar("A", bound=WireModel)
_S = TypeVar("_S")

# How long a route that refused an open carrying an offer gets bare opens before it is tried
# with the offer again (its peer may have been upgraded meanwhile).
BARE_OPEN_S = 600.0
log = logging.getLogger("transferd.sender")

HAVE_BATCH = 8  # chunks hashed and queried per round trip; bounds the fetched bodies held
FIRST_BATCH = 2  # a job's first batch: the first chunk leaves after hashing 16 MiB, not 64
ENSURE_EVERY_S = 1.0  # how often a chunk awaiting its receipt checks the channels are open
COMMIT_ROUNDS = 4
# A commit sent ahead of the last chunks is answered 409 by a receiver that saw none of them
# land for this long (a chunk damaged and sent again lands well within it); the commit
# rounds then follow the receipts.
COMMIT_AHEAD_IDLE_S = 10.0
ABORT_TIMEOUT_S = 5.0


@dataclass
class _FileState:
    path: str  # relative to data_dir: the job's path, or its path/member for a folder's file
    source: Source
    # (blake3, offset, length) per chunk in file order; a chunk going in one pass has "" until
    # its channel's sender thread hashed it (`pending` then has its digest).
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    pending: list[asyncio.Future[str]] = field(default_factory=list)
    # A one-pass chunk told two different digests (sent again in one pass after its first
    # send had hashed it: the file changed between the two reads): the job fails with it.
    conflict: IntegrityError | None = None
    # Offsets of the chunks the receiver said it holds (counted as skipped and done): one
    # its commit asks for after all is counted as sent instead (`Sender._commit`).
    skipped: set[int] = field(default_factory=set)

    def one_pass_chunk(self, loop: asyncio.AbstractEventLoop, offset: int, length: int
                       ) -> Callable[[str], bool]:
        """A chunk of this file that goes in one pass: its place in `chunks`, and the
        callback (on the loop) that fills it in once its digest is known. The first digest
        told stays: another one after it is not the chunk sent first (its bytes changed) and
        the callback returns False, leaving `conflict` for the job to raise
        (`_one_pass_digests`)."""
        at = len(self.chunks)
        self.chunks.append(("", offset, length))
        known: asyncio.Future[str] = loop.create_future()
        self.pending.append(known)

        def settle(digest: str) -> bool:
            first = self.chunks[at][0]
            if first and first != digest:
                if self.conflict is None:
                    self.conflict = source_changed_error(
                        self.path,
                        f"(chunk at offset {offset} read as {first[:16]}, then as {digest[:16]})")
                return False
            self.chunks[at] = (digest, offset, length)
            if not known.done():
                known.set_result(digest)
            return True

        return settle


class Sender:
    def __init__(
        self,
        *,
        site: str,
        storage: SiteStorage,
        journal: Journal,
        keys: Keys,
        metrics: Metrics,
        links: dict[str, PeerLink],
        chunk_size: int,
        compression: str | int,
        streams: int,
        clock: Callable[[], float],
        traffic: dict[str, PeerTraffic],
        channels: dict[str, PeerChannels],
        data_addresses: dict[str, tuple[str, int] | None] | None = None,
        retry_budget_s: float = 30.0,
        max_jobs: int = 4,
        residency: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.site = site
        self.storage = storage
        self.journal = journal
        self.keys = keys
        self.metrics = metrics
        self.links = links
        self.chunk_size = chunk_size
        self.streams = streams
        self.clock = clock
        self.traffic = traffic
        self.channels = channels
        # Where each peer's data listener is: from its config (`data_address`), else asked for
        # over the control plane (its host is the control URL's) and remembered.
        self._configured_addresses = {p: a for p, a in (data_addresses or {}).items() if a}
        self._data_addresses: dict[str, tuple[str, int]] = {}
        self.retry_budget_s = retry_budget_s
        self.max_jobs = max_jobs
        self.residency: dict[str, list[str]] = {}
        self.set_residency(residency or {})
        self.routes = RouteBook()
        self.compression = {
            # Compression runs on the chunk worker threads: as many in parallel as there are cores.
            peer: CompressionPolicy.from_setting(compression, workers=os.cpu_count() or 1)
            for peer in links
        }
        self._wake = asyncio.Event()
        # The channel threads' calls into the loop (`_ChunkPump._on_wire`, `_digest_known`,
        # receipts), every job's through one inbox: one wake-up carries all that is pending.
        self._inbox: LoopInbox | None = None
        self._running: set[str] = set()
        self._noted: set[str] = set()  # jobs whose note says what they are retrying
        self._stopping = False
        self._idle = asyncio.Event()
        self._ended = asyncio.Event()  # replaced by a fresh one each time a job ends
        # Per job: its commit sent ahead of the last chunks' receipts (`_commit_ahead`).
        self._ahead: dict[str, asyncio.Task[bool]] = {}
        # Routes (first hop, open path) whose receiver or relay refused an open carrying an
        # offer (a release before `OpenRequest`), and when: their opens go bare, the offer
        # asked on its own, until BARE_OPEN_S passed (the peer may have been upgraded).
        self.bare_opens: dict[tuple[str, str], float] = {}
        # Routes whose receiver refused an open asking which files go in one pass (a release
        # before `OpenRequest.one_pass`), and when: asked again after BARE_OPEN_S.
        self.hash_first_opens: dict[tuple[str, str], float] = {}
        # Spans hashed at once, all jobs together (`_hash_spans`): one per core.
        self._hashing = asyncio.Semaphore(os.cpu_count() or 1)

    # -- submitting ----------------------------------------------------------------------------
    def submit(
        self,
        path: str,
        dests: list[str],
        traffic_class: TrafficClass | None = None,
        timeout_s: float | None = None,
        via: Sequence[str] = (),
        routes: Sequence[JobRoute] = (),
        multipath: bool = False,
    ) -> list[str]:
        """Queue replication of `path` to each of `dests` on `traffic_class` (default: by tier,
        checkpoints/ on the checkpoint class, the rest on sync), failing a job still not
        committed `timeout_s` from now, through the relays `via` (or along `routes`, e.g. a
        plan's, main one first); policy is checked here, first."""
        try:
            rel = normalize_rel_path(path)
            check_may_leave_site(rel)
            self.storage.list_source(rel)  # exists, and no member leads out of data_dir
        except PolicyViolation:
            self.metrics.policy_refusals.labels("sender").inc()
            raise
        unknown = [d for d in dests if d not in self.links]
        if unknown or not dests:
            raise ProtocolError(f"unknown destination site(s): {', '.join(unknown) or '(none)'}")
        if via:
            # `multipath`: the relayed path and the direct one at once, even shares to start
            # (the measured rates take over).
            routes = [JobRoute(via=list(via), share=0.5 if multipath else 1.0)]
            routes += [JobRoute(via=[], share=0.5)] if multipath else []
        relays = [r for route in routes for r in route.via]
        if any(r not in self.links or r in dests or r == self.site for r in relays):
            bad = [r for r in relays if r not in self.links or r in dests or r == self.site]
            raise ProtocolError(f"relay(s) {', '.join(bad)}: not a peer of this site, or an end "
                                "of the transfer", field="via")
        ids = []
        now = self.clock()
        deadline = None if timeout_s is None else now + timeout_s
        for dest in dests:
            job_id = uuid.uuid4().hex
            cls = traffic_class or traffic_class_for(rel)
            self.journal.add_job(job_id, rel, dest, cls, now, deadline, routes)
            ids.append(job_id)
            log.info("job.queued", extra={"fields": {"job": job_id, "path": rel, "dest": dest}})
        self._wake.set()
        return ids

    # -- the job loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Run queued (and, after a restart, interrupted) jobs until cancelled or stopped."""
        slots = asyncio.Semaphore(self.max_jobs)
        async with asyncio.TaskGroup() as tg:
            while not self._stopping:
                self._wake.clear()
                sleep_s = 1.0
                for job in self.journal.active_jobs():
                    if job.id in self._running:
                        continue
                    now = self.clock()
                    if job.deadline is not None and now >= job.deadline:
                        self._give_up(job, None)
                        tg.create_task(self._abort(job))
                        continue
                    if job.state is JobState.WAITING and (job.next_attempt_at or 0) > now:
                        sleep_s = min(sleep_s, (job.next_attempt_at or now) - now)
                        continue
                    await slots.acquire()
                    if self._stopping:
                        slots.release()
                        break
                    self._running.add(job.id)
                    work_seen()  # the loop-lag probe ticks fast while jobs run
                    tg.create_task(self._run_job(job, slots))
                try:
                    async with asyncio.timeout(max(0.01, sleep_s)):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def drained(self) -> None:
        """Until no job is running (after stop(), in-flight chunks finish first)."""
        while self._running:
            self._idle.clear()
            await self._idle.wait()

    async def job_ended(self) -> None:
        """Until the next job ends."""
        await self._ended.wait()

    def stop(self) -> None:
        """Stop starting jobs; running ones are cancelled by the caller's task group and resume
        from the journal on the next start."""
        self._stopping = True
        self._wake.set()

    def note_retry(self, job_id: str, peer: str, exc: TransferdError, delay_s: float) -> None:
        """A request of the job is retried in `delay_s`: counted, and said in the job (and in
        the log, once per run of retries). A stopping daemon retries nothing: the job resumes
        from the journal at the next start."""
        if self._stopping:
            raise _Interrupted
        self.metrics.retries.labels(peer).inc()
        self.journal.add_job_counters(job_id, JobCounters(retries=1))
        self.journal.note_job(job_id, str(exc), self.clock() + delay_s)
        if job_id not in self._noted:
            self._noted.add(job_id)
            log.warning(
                "job.retrying",
                extra={"fields": {"job": job_id, "dest": peer, "kind": exc.kind,
                                  "error": str(exc)}},
            )

    def count_wire(
        self, job_id: str, peer: str, n: int, again: bool = False, meter: bool = True
    ) -> None:
        """`n` bytes of a body of the job start going out, a control request's or a chunk's
        (every attempt counts; `again`: sent once more by the HTTP client itself, or by the
        data channels after a channel broke: a retry). `meter`: count it in the bytes_sent
        metric too (the data channels count their own)."""
        if meter:
            self.metrics.bytes_sent.labels(peer).inc(n)
        if again:
            self.metrics.retries.labels(peer).inc()
        self.journal.add_job_counters(
            job_id, JobCounters(bytes_on_wire=n, retries=1 if again else 0)
        )

    def clear_note(self, job_id: str) -> None:
        """A request of the job went through: nothing is being retried any more."""
        if job_id in self._noted:
            self._noted.discard(job_id)
            self.journal.note_job(job_id, None, None)

    def _give_up(self, job: Job, exc: TransferdError | None) -> None:
        """The job's deadline passed: it fails, saying what it was waiting for."""
        waited = f"; last problem: {exc or job.note}" if (exc or job.note) else ""
        timeout_s = (job.deadline or 0) - job.created_at
        error = TransportError(
            f"not committed within its timeout of {timeout_s:g} s{waited}", peer=job.dest
        )
        self.journal.finish_job(job.id, self.clock(), error)
        log.error(
            "job.failed", extra={"fields": {"job": job.id, "kind": error.kind, "error": str(error)}}
        )

    async def _abort(self, job: Job) -> None:
        """Tell the receiver the job's upload is given up, so its staging goes now rather than
        at its next start (best effort: one try; age reclaims it otherwise)."""
        link = self.links.get(job.dest)
        if link is None:
            return
        path = ABORT_ROUTE.format(upload=upload_id(self.site, job.id))
        with contextlib.suppress(TransferdError, TimeoutError):
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await link.call(TrafficClass.CONTROL, "POST", path, body=b"", accept=(204,))

    def _retry_later(self, job: Job, exc: TransferdError) -> None:
        """A transient failure past the request retry budget: wait, then attempt again."""
        delay = job_retry_delay(job.attempts + 1)
        next_at = self.clock() + delay
        self.journal.wait_job(job.id, str(exc), next_at)
        self.metrics.retries.labels(job.dest).inc()
        log.warning(
            "job.waiting",
            extra={
                "fields": {
                    "job": job.id,
                    "dest": job.dest,
                    "error": str(exc),
                    "retry_in_s": round(delay, 3),
                    "attempt": job.attempts + 2,
                }
            },
        )
        self._wake.set()

    async def _run_job(self, job: Job, slots: asyncio.Semaphore) -> None:
        started = time.monotonic()
        try:
            self.journal.start_job(job.id, self.clock())
            log.info(
                "job.started", extra={"fields": {"job": job.id, "path": job.path, "dest": job.dest}}
            )
            left = None if job.deadline is None else job.deadline - self.clock()
            try:
                async with asyncio.timeout(left):
                    await self._replicate(job)
            except BaseExceptionGroup as group:
                # Errors from the upload task group: report the first of the package's own.
                raise _first_error(group) from group
        except _Interrupted:
            # Stopping: the job resumes on restart, and the receiver's have/want answer says
            # which chunks it still lacks.
            log.info("job.interrupted", extra={"fields": {"job": job.id}})
            return
        except TimeoutError:
            outcome = "failed"
            self._give_up(self.journal.job(job.id) or job, None)
            await self._abort(job)
        except TransferdError as exc:
            if exc.transient and not self._stopping:
                self._retry_later(self.journal.job(job.id) or job, exc)
                return
            if exc.transient and self._stopping:
                log.info("job.interrupted", extra={"fields": {"job": job.id}})
                return
            outcome = "failed"
            if isinstance(exc, PolicyViolation):
                self.metrics.policy_refusals.labels("sender").inc()
            self.journal.finish_job(job.id, self.clock(), exc)
            await self._abort(job)
            log.error(
                "job.failed", extra={"fields": {"job": job.id, "kind": exc.kind, "error": str(exc)}}
            )
        else:
            outcome = "committed"
            self.journal.finish_job(job.id, self.clock())
            log.info(
                "job.committed",
                extra={"fields": {"job": job.id, "path": job.path, "dest": job.dest}},
            )
        finally:
            self._running.discard(job.id)
            slots.release()
            self._idle.set()
            self._ended.set()
            self._ended = asyncio.Event()
        self.metrics.job_seconds.labels(outcome).observe(time.monotonic() - started)

    # -- one replication ------------------------------------------------------------------------
    def inbox(self, loop: asyncio.AbstractEventLoop) -> LoopInbox:
        """The channel threads' way into `loop` (a daemon run again in-process, on a new loop,
        gets a new one)."""
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = LoopInbox(loop)
        return self._inbox

    def busy(self) -> bool:
        """Jobs are running, not all of them waiting out a retry's backoff (`note_retry` until
        a request goes through): the loop-lag probe ticks fast while something moves."""
        return any(job_id not in self._noted for job_id in self._running)

    def flush_inbox(self) -> None:
        """On the loop: book what the channel threads left waiting (`LoopInbox.post_later`:
        sends that started). The loop-lag probe calls it on every tick, so a booking waits at
        most one tick when no receipt or digest comes first."""
        if self._inbox is not None:
            self._inbox.flush()

    def set_residency(self, residency: Mapping[str, Sequence[str]]) -> None:
        """Regions the data under each path prefix may be held in (site config and plan)."""
        self.residency = {p.rstrip("/"): sorted(r) for p, r in residency.items()}

    def residency_for(self, rel: str) -> list[str]:
        """The regions data at `rel` may be held in (the longest matching prefix; [] for
        anywhere)."""
        best = ""
        for prefix in self.residency:
            if (rel == prefix or rel.startswith(prefix + "/")) and len(prefix) > len(best):
                best = prefix
        return self.residency.get(best, []) if best else []

    async def _replicate(self, job: Job) -> None:
        rel = normalize_rel_path(job.path)
        check_may_leave_site(rel)
        if job.dest not in self.links:
            raise ProtocolError(f"destination {job.dest!r} is not a peer of this site")
        kind, members = await asyncio.to_thread(
            _from_source, rel, "listing", self.storage.list_source, rel)
        intent = upload_intent(
            upload_id(self.site, job.id),
            self.site,
            job.dest,
            rel,
            "file" if kind == "file" else "folder",
            members,
            self.residency_for(rel),
        )
        # Route by route (main first, direct last): a relay route that fails on a transient
        # error hands the job to the next at once; the destination's have/want answer then
        # says what it already has, so nothing it holds is sent again.
        routes = self.routes.routes_for(job)
        live = [r for r in routes if r.share > 0 and not self.routes.is_down(job.dest, r.via)]
        if len(job.routes) > 1 and len(live) > 1:
            # Multipath: every live route at once. Should the route carrying the control
            # requests fail, the job goes on route by route.
            try:
                await self._replicate_multi(job, live, rel, intent, members)
                return
            except (TransferdError, BaseExceptionGroup) as exc:
                err = _first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
                if (self._stopping or not isinstance(err, TransferdError) or not err.transient
                        or _source_side(err)):
                    raise
                self.routes.failed(job.id, job.dest, live[0].via, str(err))
                routes = self.routes.routes_for(job)
        for i, route in enumerate(routes):
            self.routes.started(job.id, job.dest, route.via)
            try:
                await self._replicate_on(job, route.via, rel, intent, members)
            except (TransferdError, BaseExceptionGroup) as exc:
                err = _first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
                if (i == len(routes) - 1 or not route.via or self._stopping
                        or not isinstance(err, TransferdError) or not err.transient
                        or _source_side(err)):
                    raise
                self.routes.failed(job.id, job.dest, route.via, str(err))
                continue
            self.routes.ended(job.id, job.dest, route.via)
            return

    async def _replicate_multi(
        self,
        job: Job,
        routes: list[Route],
        rel: str,
        intent: UploadIntent,
        members: list[tuple[str, int]],
    ) -> None:
        """The job over all of `routes` at once (`net.routes.RouteDealer` deals the chunks);
        the upload opens at each route's first hop, have/want and the commit go on the first."""
        hops: list[tuple[PeerLink, float, tuple[str, ...], asyncio.Task[OpenAnswer]]] = []
        for route in routes:
            first = route.via[0] if route.via else job.dest
            link = self.links.get(first)
            if link is None:
                raise ProtocolError(f"relay {first!r} is not a peer of this site")
            budget = (min(self.retry_budget_s, RELAY_RETRY_BUDGET_S) if route.via
                      else self.retry_budget_s)
            self.routes.started(job.id, job.dest, route.via)
            path = UPLOADS_ROUTE + (open_query(route.via[1:], job.traffic_class.value)
                                    if route.via else "")
            # Each route's open is answered before its chunks go: a relay must know the upload.
            opened = asyncio.create_task(
                self._control(job, link, path, intent, OpenAnswer, budget_s=budget)
            )
            hops.append((link, budget, route.via, opened))
        warm = [asyncio.create_task(self._warm(link)) for link, _b, _v, _o in hops]
        try:
            answers = await asyncio.gather(*(o for _l, _b, _v, o in hops))
            if any(a.committed for a in answers):
                return

            def dealer(sources: list[Source]) -> RouteDealer:
                pumps = [
                    _ChunkPump(self, job, link, job.traffic_class, intent, sources,
                               opened, via=via, budget_s=budget)
                    for link, budget, via, opened in hops
                ]
                return RouteDealer(self.routes, job, routes, pumps, control=pumps[0])

            await self._replicate_chunks(job, hops[0][0], rel, intent, members, "",
                                         make_pump=dealer)
        except (_AlreadyCommitted, BaseExceptionGroup) as exc:
            if not _already_committed(exc):
                raise
        finally:
            for task in [*warm, *(o for _l, _b, _v, o in hops)]:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransferdError):
                    await task
        for route in routes:
            self.routes.ended(job.id, job.dest, route.via)

    async def _replicate_on(
        self,
        job: Job,
        via: tuple[str, ...],
        rel: str,
        intent: UploadIntent,
        members: list[tuple[str, int]],
    ) -> None:
        """The job along one route: through the relays `via` (the first one's link and data
        channels; each relay passes it on), or direct."""
        first = via[0] if via else job.dest
        link = self.links.get(first)
        if link is None:
            raise ProtocolError(f"relay {first!r} is not a peer of this site")
        budget = min(self.retry_budget_s, RELAY_RETRY_BUDGET_S) if via else self.retry_budget_s
        path = UPLOADS_ROUTE + (open_query(via[1:], job.traffic_class.value) if via else "")
        # The data channels open (if they are not warm already) while the first chunks are
        # hashed; the upload opens with them (`_ChunkPump.offer`): the open's answer says
        # which of them to send, one round trip for both.
        warm = asyncio.create_task(self._warm(link))
        try:
            await self._replicate_chunks(job, link, rel, intent, members, path, via, budget)
        except (_AlreadyCommitted, BaseExceptionGroup) as exc:
            if not _already_committed(exc):
                raise
        finally:
            if not warm.done():
                warm.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransferdError):
                await warm

    async def _warm(self, link: PeerLink) -> None:
        if log.isEnabledFor(logging.DEBUG):  # what the channels start the job with
            from transferd.protocol.tcpinfo import parse_tcp_info

            infos = [parse_tcp_info(raw) for _c, raw in self.channels[link.peer].tcp_infos()]
            log.debug("job.channels", extra={"fields": {
                "peer": link.peer,
                "cwnd_segments": [i.cwnd_segments for i in infos if i is not None],
                "srtt_ms": [round(i.srtt_us / 1000, 1) for i in infos if i is not None]}})
        try:
            await self.channels[link.peer].ensure(
                self.traffic[link.peer].streams_wanted(), lambda: self.data_address(link)
            )
        except TransferdError:
            self.forget_data_address(link.peer)  # the chunks' own retries take over

    async def _replicate_chunks(
        self,
        job: Job,
        link: PeerLink,
        rel: str,
        intent: UploadIntent,
        members: list[tuple[str, int]],
        open_path: str,
        via: tuple[str, ...] = (),
        budget_s: float | None = None,
        make_pump: Callable[[list[Source]], RouteDealer] | None = None,
    ) -> None:
        """Hash, offer and send every chunk, then commit. The commit goes out as soon as the
        last chunk is handed to the channels (`_commit_ahead`): the receiver answers it when
        that chunk lands, not one round trip after its receipt. Should that not commit (a
        chunk damaged, an older receiver), the commit rounds follow the receipts as before."""
        files: list[_FileState] = []
        ahead: asyncio.Task[bool] | None = None
        try:
            for member, _size in members:
                member_rel = f"{rel}/{member}" if member else rel
                source = await asyncio.to_thread(
                    _from_source, member_rel, "opening", self.storage.open_source, member_rel)
                files.append(_FileState(member_rel, source))
                files[-1].spans = await asyncio.to_thread(
                    _from_source, source, "reading", self._spans, source)
            self.journal.size_job(
                job.id, sum(s for _, s in members), sum(len(f.spans) for f in files)
            )
            pump: _ChunkPump | RouteDealer = (
                make_pump([f.source for f in files]) if make_pump is not None else _ChunkPump(
                    self, job, link, job.traffic_class, intent,
                    [f.source for f in files], None, via=via, budget_s=budget_s,
                    open_path=open_path,
                )
            )
            async with asyncio.TaskGroup() as tg:
                await self._offer_all(pump, tg, files)
                if not self._stopping and not pump.deferred:
                    await pump.ready()  # a file of no chunks asked nothing yet
                    ahead = asyncio.create_task(self._commit_ahead(pump, intent, files))
                    self._ahead[job.id] = ahead
            if self._stopping:
                raise _Interrupted
            if ahead is None or not await ahead:
                if pump.deferred:
                    await self._offer_again(pump, files)
                await _one_pass_digests(files)
                manifest = upload_manifest(intent, self.clock(), [f.chunks for f in files])
                await pump.ready()  # a file of no chunks asked nothing yet
                await self._commit(pump, manifest, files)
            if isinstance(pump, _ChunkPump):
                await _late_digests(pump, files)
        finally:
            if self._ahead.get(job.id) is ahead:
                self._ahead.pop(job.id, None)
            if ahead is not None and not ahead.done():
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ahead
            if ahead is not None and not ahead.cancelled():
                ahead.exception()  # seen: the job raises its own error (a chunk's, first)
            for state in files:
                state.source.close()

    async def _offer_all(
        self, pump: _ChunkPump | RouteDealer, tg: asyncio.TaskGroup, files: list[_FileState]
    ) -> None:
        """Start a PUT for every wanted chunk of every file, as soon as a stream is free.

        A producer hashes and offers batch after batch (files in order) up to HAVE_BATCH
        wanted chunks ahead of the uploads; this loop hands them to free streams. Without the
        lookahead, each batch's hash and have/want round trip left freed streams idle: on a
        40 ms link, ~60 ms in every 64 MiB. Stops early (in-flight PUTs still complete) when
        the daemon begins stopping."""
        queue: asyncio.Queue[_Wanted | None] = asyncio.Queue()
        ahead = asyncio.Semaphore(HAVE_BATCH)

        async def produce() -> None:
            try:
                for index, state in enumerate(files):
                    if not await self._hash_and_offer(pump, queue, ahead, index, state):
                        return
            finally:
                queue.put_nowait(None)

        try:
            # The producer's errors (integrity, protocol) are the job's: its task group cancels
            # this loop and raises them.
            async with asyncio.TaskGroup() as offers:
                offers.create_task(produce())
                while (item := await queue.get()) is not None:
                    ahead.release()
                    if self._stopping:
                        # Start nothing new; keep draining so the producer reaches its next
                        # batch, sees the stop and ends.
                        continue
                    await pump.gate.acquire(item.length)
                    if item.settle is not None:
                        assert isinstance(pump, _ChunkPump)
                        pump.spawn(tg, item.digest, item.locations, item.length, item.body,
                                   item.settle)
                    else:
                        pump.spawn(tg, item.digest, item.locations, item.length, item.body)
        finally:
            while not queue.empty():
                queue.get_nowait()

    async def _hash_and_offer(
        self,
        pump: _ChunkPump | RouteDealer,
        queue: asyncio.Queue[_Wanted | None],
        ahead: asyncio.Semaphore,
        index: int,
        state: _FileState,
    ) -> bool:
        """Hash the file batch by batch, offer each batch, queue the wanted chunks (at most
        HAVE_BATCH ahead of the uploads). Returns False when the daemon began stopping.

        A file the receiver listed in `one_pass` (nothing of it there) whose first batch was
        wanted whole goes in one pass from there: its chunks are queued unhashed (the channel
        reads, hashes and sends each in one pass; `protocol.channel`'s trailer), but one chunk
        in ONE_PASS_PROBE_EVERY is still hashed and offered first; one the receiver holds turns
        the file back to hash-first."""
        spans = state.spans
        offering = _Offering(pump, queue, ahead, index, state)
        one_pass = False  # decided by the first batch's answer
        for start, stop in offer_batches(len(spans), FIRST_BATCH, HAVE_BATCH):
            if self._stopping:
                return False
            if one_pass:
                await self._probe_and_pass(offering, start)
                break
            plan = await self._offer_spans(offering, spans[start:stop])
            one_pass = (start == 0 and isinstance(pump, _ChunkPump)
                        and _all_new(plan, stop - start)
                        and pump.may_one_pass(index, state.source))
        return not self._stopping

    async def _probe_and_pass(self, offering: _Offering, start: int) -> None:
        """The rest of a one-pass file from chunk `start`: per ONE_PASS_PROBE_EVERY chunks, a
        probe hashed and offered, the others queued to go in one pass; from a probe the
        receiver holds on, hash-first batches as usual."""
        state = offering.state
        spans = state.spans
        loop = asyncio.get_running_loop()
        i = start
        while i < len(spans):
            if self._stopping:
                return
            plan = await self._offer_spans(offering, spans[i:i + 1])
            i += 1
            if not _all_new(plan, 1):
                log.info("job.one_pass_ends", extra={"fields": {
                    "job": offering.pump.job.id, "file": offering.index, "chunk": i - 1,
                    "reason": "a probe is held by the receiver or repeats a chunk"}})
                for at in range(i, len(spans), HAVE_BATCH):
                    if self._stopping:
                        return
                    await self._offer_spans(offering, spans[at:at + HAVE_BATCH])
                return
            for off, n in spans[i:i + ONE_PASS_PROBE_EVERY - 1]:
                settle = state.one_pass_chunk(loop, off, n)
                await offering.ahead.acquire()
                offering.queue.put_nowait(_Wanted("", [(offering.index, off)], n, None, settle))
            i += ONE_PASS_PROBE_EVERY - 1

    async def _offer_spans(self, offering: _Offering, batch: list[tuple[int, int]]
                           ) -> OfferPlan:
        """Hash `batch` (spans of the file), offer it, queue what the receiver wants."""
        pump, queue, ahead, index, state = (offering.pump, offering.queue, offering.ahead,
                                            offering.index, offering.state)
        hashes, bodies = await _hash_spans(state.source, batch, self._hashing)
        if _from_source(state.source, "checking", state.source.changed):
            raise source_changed_error(state.path, "since it was opened")
        refs = [
            ChunkRef(file=index, offset=off, length=n, hash=h)
            for (off, n), h in zip(batch, hashes, strict=True)
        ]
        state.chunks.extend((h, off, n) for (off, n), h in zip(batch, hashes, strict=True))
        # Same bytes already on their way (e.g. zero-filled chunks) are deferred: once that
        # PUT lands, the receiver copies them locally (offered again after the uploads).
        answer = await self._offer(pump, refs)
        want = set(answer.want)
        state.skipped.update(r.offset for i, r in enumerate(refs) if i not in want)
        plan = plan_offer(refs, answer, pump.started)
        pump.deferred += plan.deferred
        for up in plan.uploads:
            await ahead.acquire()
            queue.put_nowait(
                _Wanted(up.digest, up.locations, refs[up.first].length, bodies[up.first])
            )
        return plan

    async def _offer(self, pump: _ChunkPump | RouteDealer, refs: list[ChunkRef]) -> HaveAnswer:
        """Ask the receiver which of `refs` it still wants (have/want); the others are counted
        as skipped (metric and job)."""
        answer = await pump.offer(refs)
        skipped = len(refs) - len(set(answer.want))
        if skipped > 0:
            self.metrics.chunks_skipped.labels(pump.link.peer).inc(skipped)
            want = set(answer.want)
            self.journal.add_job_counters(
                pump.job.id,
                JobCounters(
                    chunks_skipped=skipped,
                    bytes_done=sum(r.length for i, r in enumerate(refs) if i not in want),
                ),
            )
        return answer

    async def _offer_again(self, pump: _ChunkPump | RouteDealer, files: list[_FileState]) -> None:
        """Offer the deferred duplicate chunks now that their first copy has landed."""
        refs, pump.deferred = pump.deferred, []
        for start in range(0, len(refs), 4096):
            batch = refs[start : start + 4096]
            answer = await self._offer(pump, batch)
            want = set(answer.want)
            for i, ref in enumerate(batch):
                if i not in want:
                    files[ref.file].skipped.add(ref.offset)
            async with asyncio.TaskGroup() as tg:
                for i in sorted(set(answer.want)):
                    ref = batch[i]
                    body = await _held_body(files[ref.file].source, ref.offset, ref.length)
                    await pump.gate.acquire(ref.length)
                    pump.spawn(tg, ref.hash, [(ref.file, ref.offset)], ref.length, body)

    async def _commit_ahead(
        self, pump: _ChunkPump | RouteDealer, intent: UploadIntent, files: list[_FileState]
    ) -> bool:
        """The commit, sent while the last chunks are still on the way (`?wait_ms=`): True
        when the receiver committed. False on a refusal naming missing chunks or a transient
        error: the receipts then settle what is missing and `_commit` goes on as usual. A
        permanent error (the receiver's storage failed the commit, the manifest refused) is
        the job's. Waits for the digests of the chunks sent in one pass (known as each one's
        body has gone out, before its receipt)."""
        await _one_pass_digests(files)
        manifest = upload_manifest(intent, self.clock(), [f.chunks for f in files])
        try:
            answer = await self._control(
                pump.job, pump.link, commit_path(pump.upload, COMMIT_AHEAD_IDLE_S),
                manifest.sign(self.keys), CommitAnswer, accept=(200, 409),
                budget_s=pump.budget_s,
            )
        except TransferdError as exc:
            if not exc.transient:
                raise
            return False
        return answer.committed

    async def committed_ahead(self, job_id: str) -> bool:
        """The job's commit sent ahead (if one is under way) committed the upload: a chunk
        refused meanwhile (sent once more after its channel broke, it found the upload
        committed) was delivered all the same."""
        ahead = self._ahead.get(job_id)
        if ahead is None:
            return False
        try:
            return await asyncio.shield(ahead)
        except (Exception, asyncio.CancelledError):
            if not ahead.done():
                raise  # this chunk's task is cancelled, not the commit
            return False

    async def _commit(
        self, pump: _ChunkPump | RouteDealer, manifest: Manifest, files: list[_FileState]
    ) -> None:
        signed = manifest.sign(self.keys)
        path = COMMIT_ROUTE.format(upload=pump.upload)
        peer = pump.link.peer
        for _round in range(COMMIT_ROUNDS):
            for state in files:  # a one-pass chunk told a second digest after the manifest
                if state.conflict is not None:
                    raise state.conflict
            answer = await self._control(
                pump.job, pump.link, path, signed, CommitAnswer, accept=(200, 409),
                budget_s=pump.budget_s,
            )
            if answer.committed:
                return
            again = resend(answer, [f.chunks for f in files])
            self.metrics.integrity_failures.labels(peer, "receiver").inc(len(again))
            # Each was counted done once already (skipped, or sent and found bad): it is
            # counted again as it goes, so the job's progress never passes its size.
            skipped_before = [(f, off) for f, (_h, off, _n) in again if off in files[f].skipped]
            for f, off in skipped_before:
                files[f].skipped.discard(off)
            self.journal.add_job_counters(
                pump.job.id, JobCounters(
                    integrity_failures=len(again),
                    bytes_done=-sum(n for _f, (_h, _off, n) in again),
                    chunks_skipped=-len(skipped_before),
                ),
            )
            async with asyncio.TaskGroup() as tg:
                for f, (digest, off, n) in again:
                    [got], [body] = await _hash_spans(files[f].source, [(off, n)],
                                                      self._hashing)
                    if got != digest:
                        raise source_changed_error(
                            files[f].path, f"(chunk at offset {off} reads differently now)")
                    await pump.gate.acquire(n)
                    pump.spawn(tg, digest, [(f, off)], n, body)
        raise IntegrityError(f"{peer} still rejects the upload after {COMMIT_ROUNDS} rounds")

    async def _control(
        self,
        job: Job,
        link: PeerLink,
        path: str,
        body: WireModel,
        answer: type[A],
        accept: tuple[int, ...] = (200,),
        budget_s: float | None = None,
    ) -> A:
        """A control request (POST) of `job`, retried while its error is transient (each
        attempt signed afresh) within the retry budget; retries count and show in the job."""
        t0 = time.monotonic()
        reply = await retrying(
            lambda: link.call(
                TrafficClass.CONTROL,
                "POST",
                path,
                body=body,
                accept=accept,
                on_wire=lambda n, again: self.count_wire(job.id, link.peer, n, again),
            ),
            budget_s=self.retry_budget_s if budget_s is None else budget_s,
            on_retry=lambda exc, delay: self.note_retry(job.id, link.peer, exc, delay),
        )
        self.clear_note(job.id)
        if log.isEnabledFor(logging.DEBUG):  # the job's timeline, phase by phase
            log.debug("job.control", extra={"fields": {
                "job": job.id, "route": path.rsplit("/", 1)[-1].split("?")[0],
                "seconds": round(time.monotonic() - t0, 4)}})
        return parse_body(answer, reply.body)

    async def data_address(self, link: PeerLink) -> tuple[str, int]:
        known = self._configured_addresses.get(link.peer) or self._data_addresses.get(link.peer)
        if known is None:
            reply = await link.call(TrafficClass.CONTROL, "GET", DATA_CHANNEL_ROUTE)
            port = parse_body(DataChannelAnswer, reply.body).port
            known = (link.host, port)
            self._data_addresses[link.peer] = known
        return known

    def forget_data_address(self, peer: str) -> None:
        """The peer may have restarted on another port: ask again next time."""
        self._data_addresses.pop(peer, None)

    def _spans(self, source: Source) -> list[tuple[int, int]]:
        if isinstance(source, SourceFile):
            return chunk_spans(source, self.chunk_size)
        return fixed_spans(source.size, self.chunk_size)

    def encode(self, peer: str, view: memoryview, ratio: float | None = None) -> Encoded:
        """Thread: the body to send for a chunk whose compression is worth trying (zstd when
        a sample says it pays; `ratio`: that sample's, probed already)."""
        policy = self.compression[peer]
        n = len(view)
        if not policy.pays(policy.probe_ratio(view) if ratio is None else ratio):
            return Encoded("identity", view, n)
        level = policy.compress_level()
        assert level is not None
        t0 = time.perf_counter()
        compressed = zstd_compress(view, level)
        policy.observe_compression(n, time.perf_counter() - t0, level)
        if len(compressed) > n * 0.95:
            return Encoded("identity", view, n)
        return Encoded("zstd", compressed, n)


async def _hash_spans(
    source: Source, spans: list[tuple[int, int]], slots: asyncio.Semaphore
) -> tuple[list[str], list[memoryview | None]]:
    """The spans' chunk hashes, in parallel threads (the reads and blake3 release the GIL),
    and the bytes a chunk is sent from when they had to be fetched (None for a local file:
    hashed through a small buffer, sent with `sendfile`, mapped only if it is compressed).
    This is the only pass over the bytes: the file's digest is the Merkle root over these
    hashes (`file_digest`). At most `slots` spans are hashed at once (one per core): a batch
    of 8 took every thread of the loop's pool, and the chunks about to be sent (their
    compression probe runs there too) waited for the hashing of the next batch (25-45 ms
    per batch in a 40 ms-RTT job's timeline). A fetched source's reads take no slot."""

    async def bounded(work: Callable[[], str]) -> str:
        async with slots:
            return await asyncio.to_thread(work)

    if isinstance(source, SourceFile):
        hashes = await asyncio.gather(*(
            bounded(functools.partial(_from_source, source, "reading", source.hash_span, off, n))
            for off, n in spans))
        return list(hashes), [None] * len(spans)

    def read() -> list[memoryview]:
        return [memoryview(_from_source(source, "reading", source.read, off, n))
                for off, n in spans]

    # The fetch (an object store's GET: mostly waiting on the network) holds no hashing slot;
    # only the blake3 calls are bounded.
    bodies = await asyncio.to_thread(read)
    hashes = await asyncio.gather(*(bounded(functools.partial(blake3_hex, b)) for b in bodies))
    return list(hashes), list[memoryview | None](bodies)


async def _held_body(source: Source, offset: int, length: int) -> memoryview | None:
    """The bytes a chunk is sent from: None for a local file (read from it when sent), the
    fetched bytes otherwise."""
    if isinstance(source, SourceFile):
        return None
    return memoryview(await asyncio.to_thread(_from_source, source, "reading", source.read,
                                              offset, length))


def _from_source(source: object, action: str, work: Callable[..., _S], *args: object) -> _S:
    """Thread or loop: `work(*args)` on a job's source, whose failures must be the job's. The
    sources classify the failures they know (`site.failures.storage_failure`); anything else
    that escapes one (a backend library's own kind, a bug) would otherwise leave the job's
    task group as a foreign exception and take `Sender.run` down with it. Such a failure, and
    one a source marked `unclassified`, becomes a StorageError of the source's side: transient
    the first time its kind fails at its path (the job waits its backoff and is tried again,
    `Sender._retry_later`), not transient when it does again (the job fails); the daemon goes
    on either way. Logged with the exception's type and traceback."""
    try:
        return work(*args)
    except TransferdError as exc:
        kind = exc.fields.get("unclassified")
        if kind is None:
            raise
        raise _unclassified(source, action, exc, str(kind)) from exc
    except Exception as exc:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        raise _unclassified(source, action, exc, kind) from exc


# A source's unclassified failure is remembered (path, kind) this long: the same again within
# it fails the job; a repeat after it counts as a first. At most this many are remembered.
_UNCLASSIFIED_AGAIN_S = 3600.0
_UNCLASSIFIED_KEPT = 1024
_unclassified_seen: dict[tuple[str, str], float] = {}


def _unclassified(source: object, action: str, exc: Exception, kind: str) -> StorageError:
    """The job's error for a source failure of a kind nobody classifies: transient the first
    time (`_from_source`). Plain dict operations (atomic under the GIL): hashing threads and
    the loop share the record."""
    path = str(getattr(source, "path", source))
    now = time.monotonic()
    seen = _unclassified_seen.pop((path, kind), None)
    again = seen is not None and now - seen < _UNCLASSIFIED_AGAIN_S
    if not again:
        if len(_unclassified_seen) >= _UNCLASSIFIED_KEPT:
            _unclassified_seen.clear()
        _unclassified_seen[(path, kind)] = now
    log.warning("job.source_error", exc_info=exc, extra={"fields": {
        "path": path, "action": action, "type": kind, "error": str(exc)[:200],
        "outcome": "failed" if again else "tried again"}})
    reason = exc.message if isinstance(exc, TransferdError) else (
        f"{action} {path} failed: {type(exc).__name__}: {exc}")
    return StorageError(reason, path=path, side="source", transient=not again,
                        unclassified=kind)


def _all_new(plan: OfferPlan, offered: int) -> bool:
    """Every one of `offered` chunks is wanted and none repeats another of the upload: what a
    file must show (its first batch, then each probe) to go on in one pass. A chunk the
    receiver holds means shared bytes (delta), a repeat means repeating content (zero-filled
    regions): both are cheaper hash-first, where the receiver copies them."""
    return (not plan.skipped and not plan.deferred and len(plan.uploads) == offered
            and all(len(up.locations) == 1 for up in plan.uploads))


async def _one_pass_digests(files: list[_FileState]) -> None:
    """Until every chunk sent in one pass has its digest in its file's `chunks`; then the files
    sent so must be as they were opened: a chunk read while its file was written to was hashed
    and sent as read, consistently, but is not the file the job was asked to send."""
    for state in files:
        if not state.pending:
            continue
        await asyncio.gather(*state.pending)
        if state.conflict is not None:
            raise state.conflict
        if _from_source(state.source, "checking", state.source.changed):
            raise source_changed_error(state.path, "since it was opened")


async def _late_digests(pump: _ChunkPump, files: list[_FileState]) -> None:
    """The upload is committed; a one-pass send that an attempt gave up on while its channel
    held it unread (`_ChunkPump.strays`: the retry went in one pass as well) may still read
    and hash its chunk. One that told its digest already has nothing more to tell; one still
    queued has read nothing and is withdrawn. Until each other has ended (bounded by its
    channels' `stall_s`, after which a channel whose chunks have not moved is broken anyway;
    then it is expired), a second digest it tells is a source that changed while being
    sent: the job fails with it, as with one told before the manifest, though the receiver
    holds the bytes read first."""
    told = bool(pump.strays)
    strays = [item for item in pump.strays if not item.done.done() and not item.digest]
    pump.strays.clear()
    for item in strays:
        pump.channels.withdraw(item.upload, only=item,
                               reason="withdrawn: its upload is committed")
    strays = [item for item in strays if not item.done.done()]
    if strays:
        ends = [asyncio.wrap_future(item.done) for item in strays]
        for end in ends:
            end.add_done_callback(_retrieved)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pump.channels.stall_s):
                await asyncio.wait(ends)
        for item in strays:
            if not item.done.done():
                pump.channels.expire(item, TransportError(
                    f"{pump.link.peer}: a chunk's send given up on", peer=pump.link.peer))
    if told:
        await asyncio.sleep(0)  # a digest a channel told just before settles
    for state in files:
        if state.conflict is not None:
            raise state.conflict


def _copy_outcome(
    receipt: asyncio.Future[Receipt], done: concurrent.futures.Future[Receipt]
) -> None:
    """On the loop (through the inbox): a chunk's receipt or error, from its channel's future
    into the future its `_send` awaits (as `asyncio.wrap_future` would copy it)."""
    if receipt.done():
        return
    if done.cancelled():
        receipt.cancel()
    elif (exc := done.exception()) is not None:
        receipt.set_exception(exc)
    else:
        receipt.set_result(done.result())


def _retrieved(future: asyncio.Future[Receipt]) -> None:
    """Done callback: the future's error is seen (its awaiter may have moved on)."""
    if not future.cancelled():
        future.exception()


def _source_side(err: TransferdError) -> bool:
    """An error of the job's source (an object store's read failed or went unchecked), not of
    its route: the job is tried again later, on the same routes, none marked down."""
    return err.fields.get("side") == "source"


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first TransferdError (or _Interrupted) inside a (nested) exception group; anything
    else (CancelledError, a bug) propagates as it is."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if isinstance(exc, TransferdError | _Interrupted):
            return exc
    raise group


@dataclass
class _Wanted:
    """A chunk the receiver asked for, hashed, waiting for a free stream; `body` holds its
    bytes when they were fetched (None: a local file's span, read when it is sent). A chunk
    going in one pass has no digest yet (""): `settle` takes it once its channel hashed it."""

    digest: str
    locations: list[tuple[int, int]]
    length: int
    body: memoryview | None
    settle: Callable[[str], bool] | None = None


@dataclass
class _Offering:
    """One file being hashed and offered: where its wanted chunks are queued, at most
    HAVE_BATCH (`ahead`) before the uploads take them."""

    pump: _ChunkPump | RouteDealer
    queue: asyncio.Queue[_Wanted | None]
    ahead: asyncio.Semaphore
    index: int
    state: _FileState


class _Interrupted(Exception):
    """The daemon is stopping: finish in-flight chunks, start no new ones."""


class _RouteDown(Exception):
    """A relayed route stopped answering (`_ChunkPump._check_relay`): not a TransferdError, so
    `retrying` does not try it again on the same route; `put` raises `error` to the job."""

    def __init__(self, error: TransportError) -> None:
        super().__init__(error.message)
        self.error = error


class _AlreadyCommitted(Exception):
    """The receiver answered the upload's open with `committed`: nothing is left to send."""


def _already_committed(exc: BaseException) -> bool:
    """`exc` is _AlreadyCommitted, or a task group's errors that are all that."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_already_committed(e) for e in exc.exceptions)
    return isinstance(exc, _AlreadyCommitted)


class _ChunkPump:
    """The chunks of one job on the peer's data channels: the peer's gate for the job's class
    admits each one (it bounds the chunks in flight, paces by caps and weights, adapts the
    stream count); each waits for its receipt while the channels keep the pipe full. A chunk
    whose channel broke is sent again by the channels themselves (counted: bytes on the wire
    as each send starts, and a retry); one the receiver found damaged is sent again here after
    a backoff (`retrying`), and counted; a peer that cannot be reached is retried with backoff
    within the retry budget, after which the job waits (`Sender._retry_later`)."""

    def __init__(
        self,
        sender: Sender,
        job: Job,
        link: PeerLink,
        bulk: TrafficClass,
        intent: UploadIntent,
        sources: list[Source],
        opened: asyncio.Future[OpenAnswer] | None,
        via: tuple[str, ...] = (),
        budget_s: float | None = None,
        open_path: str = UPLOADS_ROUTE,
    ) -> None:
        self.sender = sender
        # The upload's open: under way or answered (multipath: each route's, sent at once);
        # None until `offer` opens it with the first chunks (or `ready` with none).
        self.opened = opened
        self.intent = intent
        self.open_path = open_path
        self.via = via  # the relays this job's chunks go through (empty: direct)
        self.budget_s = sender.retry_budget_s if budget_s is None else budget_s
        self.job = job
        self.link = link
        self.bulk = bulk
        self.upload = intent.upload
        self.sources = sources
        self.traffic = sender.traffic[link.peer]
        self.gate = self.traffic.gates[bulk]
        self.channels = sender.channels[link.peer]
        self.started: set[str] = set()  # chunk hashes sent (or being sent) in this job
        self.deferred: list[ChunkRef] = []  # duplicates of those, to offer once they landed
        # Files the receiver said may go in one pass (`OfferAnswer.one_pass`); asked only on a
        # direct route whose upload this pump opens (not through relays, not multipath: their
        # chunks are passed on cut-through, dealt by hash).
        self.one_pass: frozenset[int] = frozenset()
        self.ask_one_pass = not via and opened is None
        # One-pass sends whose attempt gave up while they were still unhashed on a channel
        # (which sends them on): the job hears their digests before it ends (`_late_digests`).
        self.strays: list[OutgoingChunk] = []
        self.loop = asyncio.get_running_loop()
        self.inbox = sender.inbox(self.loop)

    def may_one_pass(self, index: int, source: Source) -> bool:
        """File `index` may go in one pass: the receiver listed it, and it is a local file
        (a fetched source's bytes are held whole anyway: hashing them costs no read)."""
        return index in self.one_pass and isinstance(source, SourceFile)

    async def ready(self) -> None:
        """Until the receiver has opened the upload (opening it, with no chunk offered, if
        nothing did yet); a receiver that has it committed already (a job run again after
        its commit) ends the job here."""
        if self.opened is None:
            await self._open([])
        elif (await asyncio.shield(self.opened)).committed:
            raise _AlreadyCommitted

    async def offer(self, refs: list[ChunkRef]) -> HaveAnswer:
        """Which of `refs` the receiver wants: the first offer opens the upload with them
        (one round trip: `OpenRequest`), later ones ask have/want."""
        if self.opened is None:
            return await self._open(refs)
        await self.ready()
        return await self._have(refs)

    async def _have(self, refs: list[ChunkRef]) -> HaveAnswer:
        """Ask the receiver, which has the upload open, which of `refs` it still wants."""
        return await self.sender._control(
            self.job, self.link, HAVE_ROUTE.format(upload=self.upload),
            HaveRequest(chunks=refs), HaveAnswer, budget_s=self.budget_s,
        )

    async def _open(self, refs: list[ChunkRef]) -> HaveAnswer:
        route = (self.link.peer, self.open_path)
        bare_since = self.sender.bare_opens.get(route)
        if bare_since is None or time.monotonic() - bare_since > BARE_OPEN_S:
            hash_first_since = self.sender.hash_first_opens.get(route)
            ask = self.ask_one_pass and (hash_first_since is None
                                         or time.monotonic() - hash_first_since > BARE_OPEN_S)
            try:
                try:
                    offered = await self.sender._control(
                        self.job, self.link, self.open_path,
                        open_request(self.intent, refs, one_pass=ask), OfferAnswer,
                        budget_s=self.budget_s,
                    )
                except ProtocolError as exc:
                    if not (ask and one_pass_refused(exc)):
                        raise
                    # A receiver before `one_pass`: every file goes hash-first.
                    self.sender.hash_first_opens[route] = time.monotonic()
                    offered = await self.sender._control(
                        self.job, self.link, self.open_path, open_request(self.intent, refs),
                        OfferAnswer, budget_s=self.budget_s,
                    )
                else:
                    if ask:
                        self.sender.hash_first_opens.pop(route, None)
            except ProtocolError as exc:
                if not offer_refused(exc):
                    raise
                self.sender.bare_opens[route] = time.monotonic()
                log.info("upload.open_bare", extra={"fields": {
                    "peer": self.link.peer, "path": self.open_path, "reason": exc.message}})
            else:
                self.sender.bare_opens.pop(route, None)
                self._opened(offered)
                self.one_pass = frozenset(offered.one_pass)
                return HaveAnswer(want=offered.want)
        # An older receiver (or relay): the bare intent, then have/want for the offer.
        opened = await self.sender._control(
            self.job, self.link, self.open_path, self.intent, OpenAnswer, budget_s=self.budget_s
        )
        self._opened(opened)
        if not refs:
            return HaveAnswer(want=[])
        return await self._have(refs)

    def _opened(self, answer: OpenAnswer) -> None:
        self.opened = self.loop.create_future()
        self.opened.set_result(answer)
        if answer.committed:
            raise _AlreadyCommitted

    def spawn(
        self,
        tg: asyncio.TaskGroup,
        digest: str,
        locations: list[tuple[int, int]],
        length: int,
        body: memoryview | None,
        settle: Callable[[str], bool] | None = None,
    ) -> None:
        """Run `put` in `tg` with the gate slot just acquired; a task cancelled before it ever
        ran (a sibling failed) hands its slot back, since `put`'s own cleanup never ran."""
        began = False

        async def run() -> None:
            nonlocal began
            began = True
            await self.put(digest, locations, length, body, settle)

        def settled(_task: asyncio.Task[None]) -> None:
            if not began:
                self.gate.release(0, 0)

        tg.create_task(run()).add_done_callback(settled)

    def _chunk(
        self, digest: str, locations: list[tuple[int, int]], encoded: Encoded, body_hash: str,
    ) -> OutgoingChunk:
        """What the channels send: a local file's raw chunk goes by `sendfile` from its own
        dup of the file descriptor (no copy, and no mapping held while it waits); compressed
        or fetched bytes go as they are."""
        f, offset = locations[0]
        source = self.sources[f]
        common = dict(
            upload=self.upload, digest=digest, locations=tuple(locations),
            raw_length=encoded.raw_length, encoding=encoded.encoding, body_blake3=body_hash,
        )  # fmt: skip
        # Through a relay, a chunk goes alone on its channel (`OutgoingChunk.alone`).
        common["alone"] = bool(self.via)
        if encoded.encoding == "identity" and isinstance(source, SourceFile):
            return OutgoingChunk(**common, fd=os.dup(source.fileno()), offset=offset,  # type: ignore[arg-type]
                                 path=source.path, dev=source.dev)
        return OutgoingChunk(**common, body=encoded.body)  # type: ignore[arg-type]

    async def _send(self, item: OutgoingChunk) -> Receipt:
        """Until the receipt: keeps the peer's channels open at the controller's count while
        it waits (a broken channel is replaced; its chunks are already queued again, and a
        channel that stopped moving is broken). A peer that cannot be reached takes the chunk
        out of the queue and raises TransportError: the caller's `retrying` sends it again
        after a backoff."""
        future = self.channels.submit(item)
        # One wrapper for every wait: a wait cut by its ENSURE_EVERY_S timeout leaves no wrapper
        # of its own behind, and the error of a chunk nobody awaits any more (withdrawn, its
        # send given up) counts as retrieved (no "Future exception was never retrieved"). The
        # receipt reaches the loop through the inbox, after this chunk's and any other chunk's
        # calls posted before it (`_on_wire`, `_digest_known`), in the same wake-up as theirs.
        receipt: asyncio.Future[Receipt] = self.loop.create_future()
        receipt.add_done_callback(_retrieved)
        future.add_done_callback(functools.partial(self.inbox.post, _copy_outcome, receipt))
        queued_at = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chunk.submitted", extra={"fields": {
                "job": self.job.id, "chunk": item.digest[:12], "bytes": item.raw_length}})
            future.add_done_callback(lambda _f: log.debug("chunk.receipt", extra={"fields": {
                "job": self.job.id, "chunk": item.digest[:12],
                "seconds": round(time.monotonic() - queued_at, 4)}}))
        try:
            while True:
                if not self.via:
                    await self._ensure()
                try:
                    async with asyncio.timeout(ENSURE_EVERY_S):
                        if self.via:  # a hung relay's channels must not hold up noticing it
                            await self._ensure()
                        return await asyncio.shield(receipt)
                except TimeoutError:
                    if self.via:
                        self._check_relay(item, queued_at)
        except TransferdError:
            if not future.done():
                self.channels.withdraw(self.upload, item)
            raise
        except BaseException:
            if not future.done():
                self.channels.withdraw(self.upload)
            raise

    def _check_relay(self, item: OutgoingChunk, queued_at: float) -> None:
        """A relayed chunk whose receipt is overdue while the route gave none at all (its relay
        hangs): every chunk of the job there ends and the route fails (`_RouteDown`)."""
        book, dest = self.sender.routes, self.job.dest
        # Quiet since: the chunk was queued, its send started, the route's last receipt, or
        # the relay's TCP last took bytes of it (a slow first chunk is not a hung relay).
        quiet_s = time.monotonic() - max(queued_at, item.sent_at or 0.0,
                                         book.last_receipt(self.job.id, dest, self.via) or 0.0,
                                         self.channels.moved_at(item) or 0.0)
        limit_s = book.receipt_timeout(dest, self.via, item.wire_length, self.gate.in_flight)
        if quiet_s <= limit_s:
            return
        relay = self.via[0]
        error = TransportError(
            f"relay {relay}: no receipt for {quiet_s:.1f} s (the route's rate allows "
            f"{limit_s:.1f} s): the relay does not answer", peer=relay)
        self.channels.give_up(self.upload, error)
        raise _RouteDown(error)

    async def _ensure(self) -> None:
        try:
            await self.channels.ensure(self.traffic.streams_wanted(), self._address)
        except TransportError:
            self.sender.forget_data_address(self.link.peer)
            raise

    async def _address(self) -> tuple[str, int]:
        return await self.sender.data_address(self.link)

    def _on_wire(self, digest: str, n: int, again: bool) -> None:
        """Channel thread: a send of one of this job's chunks starts (`again`: its channel
        broke under an earlier send). Booked on the loop, where the journal lives, without a
        wake-up of its own: it rides with the next digest or receipt (its own send's come
        after it, in order), or the loop-lag probe's next tick (`Sender.flush_inbox`)."""
        self.inbox.post_later(self._booked, digest, n, again)

    def _digest_known(self, settle: Callable[[str], bool], digest: str) -> None:
        """Channel thread: a chunk sent in one pass was hashed as it went (before its trailer
        and receipt); its digest goes to its file's chunk list, on the loop, at once (the
        commit sent ahead waits for the last one)."""
        self.inbox.post(settle, digest)

    def _booked(self, digest: str, n: int, again: bool) -> None:
        self.sender.count_wire(self.job.id, self.link.peer, n, again, False)
        self.sender.routes.on_wire(self.job.id, self.job.dest, self.via, digest)

    async def put(
        self,
        digest: str,
        locations: list[tuple[int, int]],
        length: int,
        body: memoryview | None,
        settle: Callable[[str], bool] | None = None,
    ) -> None:
        """Send one chunk until its receipt says it is staged. Each attempt is one send; a
        body the receiver found damaged (after checking our source did not change) and a peer
        that cannot be reached are retried by `retrying` while the budget lasts. `body`: the
        chunk's bytes when they were fetched; None for a local file's span, which goes by
        `sendfile` (or is mapped in a worker only while it is compressed).

        `digest` "" (a local file's chunk going in one pass): its channel reads, hashes and
        sends it in one pass and `settle` hears its digest as its body has gone; a send again
        after that is an ordinary chunk with that address, so a source that changed meanwhile
        is caught (DAMAGED, then the re-read differs: the job fails). One that compression
        pays for is hashed first instead (the header of a compressed chunk names both)."""
        s = self.sender
        peer = self.link.peer
        acked, errors = 0, 0  # for the stream controller: retries and integrity failures
        # What the route book knows the chunk by while it has no digest yet.
        key = digest or f"{locations[0][0]}:{locations[0][1]}"
        sent_before: OutgoingChunk | None = None  # the previous attempt's chunk
        # The digest is one a channel told as it read the chunk in one pass (the bytes B holds
        # under it may not be what the source holds now); else it was hashed from the source
        # before any of its bytes went, or is the address the job was given.
        one_passed = False

        def count_retry(exc: TransferdError, delay_s: float) -> None:
            nonlocal errors
            errors += 1
            s.note_retry(self.job.id, peer, exc, delay_s)

        async def reread() -> None:
            """The source must still hold the chunk's bytes (they are sent again from it)."""
            nonlocal body
            f, offset = locations[0]
            source = self.sources[f]
            if isinstance(source, SourceFile):
                got = await asyncio.to_thread(
                    _from_source, source, "reading", source.hash_span, offset, length)
            else:
                body = memoryview(await asyncio.to_thread(
                    _from_source, source, "reading", source.read, offset, length))
                got = await asyncio.to_thread(blake3_hex, body)
            if got != digest:
                raise source_changed_error(
                    self.job.path, f"(chunk at offset {offset} reads differently now)")

        async def attempt() -> tuple[Encoded, int]:
            nonlocal digest, sent_before, one_passed
            if not digest and sent_before is not None and sent_before.digest:
                # Its channel hashed it after that attempt had failed (the send went on): this
                # attempt goes by that address too.
                digest = sent_before.digest
                one_passed = True
            if not s.compression[peer].should_try():
                encoded = Encoded("identity", memoryview(b"") if body is None else body, length)
            elif body is None:
                encoded = await asyncio.to_thread(
                    _from_source, self.sources[locations[0][0]], "reading", self._encode_local,
                    locations[0], length)
            else:
                encoded = await asyncio.to_thread(s.encode, peer, body)
            if not digest and encoded.encoding != "identity":
                # Compressed: its header names both hashes, so this one is hashed first.
                f, offset = locations[0]
                source = self.sources[f]
                assert isinstance(source, SourceFile)  # one pass: local files only
                digest = await asyncio.to_thread(
                    _from_source, source, "reading", source.hash_span, offset, length)
                assert settle is not None
                if not settle(digest):
                    raise source_changed_error(self.job.path, "(a chunk read differently twice)")
            body_hash = (
                digest
                if encoded.encoding == "identity"
                else await asyncio.to_thread(blake3_hex, encoded.body)
            )
            item = self._chunk(digest, locations, encoded, body_hash)
            if not digest:
                assert settle is not None
                item.one_pass = True
                item.on_digest = functools.partial(self._digest_known, settle)
            item.on_wire = functools.partial(self._on_wire, key)
            wire = item.wire_length
            in_flight = self.gate.in_flight
            t0 = time.perf_counter()
            sent_before = item
            try:
                receipt = await self._send(item)
            finally:
                if not digest and item.digest:
                    # Hashed by its channel as it went; also when the send then failed (its
                    # body went, the peer became unreachable): a send again is an ordinary
                    # chunk with this address, never one pass under a new one.
                    digest = item.digest
                    one_passed = True
                elif item.one_pass and not item.digest and not item.done.done():
                    self.strays.append(item)  # given up on unhashed; its channel goes on
            if receipt.status is ReceiptStatus.DAMAGED:
                s.metrics.integrity_failures.labels(peer, "sender").inc()
                s.journal.add_job_counters(self.job.id, JobCounters(integrity_failures=1))
                await reread()
                raise IntegrityError(
                    f"{peer} received chunk {digest[:16]} damaged: {receipt.reason}",
                    transient=True,
                )
            if receipt.status in (ReceiptStatus.STORAGE, ReceiptStatus.REFUSED) and (
                await s.committed_ahead(self.job.id)
            ):
                # Sent again, it found its upload committed (sealed) with an earlier send's
                # bytes: delivered. Under an address a one-pass send told, only if the
                # source still holds those bytes; else (the file rewritten since) the job
                # fails "changed", as it does when the receiver answers DAMAGED before the
                # seal. A digest hashed before the chunk went (hash-first, fetched) is the
                # manifest's: B's copy matches it whatever the source holds now.
                if one_passed:
                    await reread()
                return encoded, wire
            if receipt.status is ReceiptStatus.STORAGE:
                raise StorageError(f"{peer}: {receipt.reason}")
            if receipt.status is ReceiptStatus.REFUSED:
                raise ProtocolError(f"{peer} refused a chunk: {receipt.reason}")
            if receipt.status is ReceiptStatus.UNREACHABLE:
                raise TransportError(f"{peer} could not pass a chunk on: {receipt.reason}",
                                     peer=peer)
            s.compression[peer].observe_link(wire * max(1, in_flight), time.perf_counter() - t0)
            return encoded, wire

        try:
            try:
                encoded, wire = await retrying(
                    attempt, budget_s=self.budget_s, on_retry=count_retry
                )
            except _RouteDown as down:  # not retried: the job takes its next route now
                raise down.error from None
            s.clear_note(self.job.id)
            if settle is not None and not settle(digest):
                raise source_changed_error(self.job.path, "(a chunk read differently twice)")
            s.routes.acked(self.job.id, self.job.dest, self.via, encoded.raw_length, key)
            acked = wire
            s.metrics.chunks_sent.labels(peer).inc()
            s.metrics.count_compression(peer, encoded.raw_length, wire)
            s.journal.add_job_counters(
                self.job.id,
                JobCounters(
                    chunks_sent=1,
                    bytes_done=encoded.raw_length * len(locations),
                    chunks_skipped=len(locations) - 1,
                ),
            )
        finally:
            if self.gate.clock() >= self.gate.controller.next_deadline():
                # The controller's window closes: tell it what the sockets saw of the path.
                sample = self.channels.path_sample()
                if sample is not None:
                    for gate in self.traffic.gates.values():
                        gate.controller.on_path(sample)
            self.gate.release(acked, errors)

    def _encode_local(self, location: tuple[int, int], length: int) -> Encoded:
        """Thread: a local file's chunk as it is to be sent, read into memory (pread, never
        mapped) only while compression is tried on it: compressed bytes, or raw (then sent
        from the file: no bytes held)."""
        f, offset = location
        source = self.sources[f]
        assert isinstance(source, SourceFile)
        # The sample first (the span `probe_ratio` takes, read alone): most chunks tried stop
        # there, and the chunk is read whole only to be compressed.
        policy = self.sender.compression[self.link.peer]
        start = max(0, length // 2 - SAMPLE_BYTES // 2)
        with source.mapped(offset + start, min(SAMPLE_BYTES, length - start)) as sample:
            ratio = policy.probe_ratio(sample)
        if not policy.pays(ratio):
            return Encoded("identity", memoryview(b""), length)
        with source.mapped(offset, length) as view:
            encoded = self.sender.encode(self.link.peer, view, ratio)
            if encoded.encoding == "identity":
                return Encoded("identity", memoryview(b""), length)
            return encoded
