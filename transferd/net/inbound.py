"""The asyncio side of receiving uploads: the site's blocking `Receiver` steps run on worker
threads at a lower CPU priority, commits run one at a time per upload, and the journal is only
touched from the event loop's thread. Decisions stay in `protocol.upload`; the HTTP handlers
in `net.server` parse, call one method here, and answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, TypeVar

from transferd.errors import StorageError, TransferdError, TransportError
from transferd.net.channels import LoopBatches, on_loop
from transferd.net.loop_lag import work_seen
from transferd.protocol.channel import ChunkHead
from transferd.protocol.manifest import (
    CommitAnswer,
    HaveAnswer,
    HaveRequest,
    Manifest,
    OfferAnswer,
    OpenAnswer,
    OpenRequest,
    SignedManifest,
    UploadIntent,
)
from transferd.protocol.upload import (
    COMMIT_WAIT_MAX_S,
    ChunkTarget,
    one_pass_files,
    refused,
    wanted,
)
from transferd.site.journal import UploadState
from transferd.site.metrics import Metrics
from transferd.site.receiver import Receiver
from transferd.site.threads import bulk_executor

__all__ = ["InboundUploads"]

log = logging.getLogger("transferd.server")
T = TypeVar("T")


class _Landed(NamedTuple):
    """A chunk staged by a worker, to book: its journal row, and what the metrics count."""

    row: tuple[str, list[ChunkTarget], str]  # upload, targets, digest
    peer: str
    body_length: int


# At most this many commits of one peer held for their last chunks at once; beyond it a commit
# sent ahead is answered at once (409 with what is missing, as without `?wait_ms=`).
COMMITS_WAITING_PER_PEER = 64


class _Waiting:
    """A commit held for its upload's last chunks: the chunks still missing (as booked chunks
    land, without reading the journal again) and the future its chunks' bookings wake."""

    def __init__(self, missing: list[tuple[int, int]]) -> None:
        self.missing = set(missing)
        self.landed = asyncio.get_running_loop().create_future()
        self.progress = False
        self.chunk_failed = False  # a chunk of the upload failed in storage: answer now

    def wake(self) -> None:
        if not self.landed.done():
            self.landed.set_result(None)


class InboundUploads:
    def __init__(
        self,
        receiver: Receiver,
        metrics: Metrics,
        clock: Callable[[], float],
        workers: int,
    ) -> None:
        self.receiver = receiver
        self.metrics = metrics
        self.clock = clock
        self._workers = bulk_executor(workers, "transferd-chunk")
        self._commit_locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bookings: LoopBatches[_Landed] = LoopBatches(self._book)
        # (upload, file, offset) -> copies of that chunk being staged or staged and not yet
        # booked (a chunk is sent again after its channel broke): a failed copy is not the
        # chunk's failure while another copy may still land (`_chunk_failed`).
        self._copies: dict[tuple[str, int, int], int] = {}
        self._copies_lock = threading.Lock()
        # The commits held for their last chunks (`_until_staged`), by upload: woken only by
        # the bookings of their own upload's chunks; counted by peer (capped).
        self._waiting: dict[str, list[_Waiting]] = {}
        self._waiting_by_peer: dict[str, int] = {}
        # Per upload: the places whose chunk failed in storage and has not landed since. A
        # commit that comes later missing one of them is answered at once (`_until_staged`).
        self._failed_places: dict[str, set[tuple[int, int]]] = {}
        self._stopping = False
        self.commits_waiting = 0  # commits sent ahead, waiting for their last chunks now

    def stopping(self) -> None:
        """The daemon stops: a commit held for its last chunks is answered now (503, the
        sender asks again later) rather than holding the stop for its grace period."""
        self._stopping = True
        for waiters in self._waiting.values():
            for waiter in waiters:
                waiter.wake()

    @property
    def workers(self) -> concurrent.futures.Executor:
        """The threads (lower CPU priority) that verify and stage chunk bodies."""
        return self._workers

    async def aclose(self) -> None:
        """Off the loop: a worker may be waiting for the loop to book its chunk."""
        await asyncio.to_thread(self._workers.shutdown, True)
        self.receiver.close()

    @contextlib.asynccontextmanager
    async def _commit_lock(self, upload: str) -> AsyncIterator[None]:
        lock = self._commit_locks.setdefault(upload, asyncio.Lock())
        async with lock:
            yield
        if not lock.locked():
            self._commit_locks.pop(upload, None)

    def _fail_if_full(self, upload: str, exc: StorageError) -> bool:
        """Out of space: the upload fails here at once and its staging is given back (the
        sender's job fails on the same error; a retry once space is freed starts clean).
        True when it did."""
        if exc.fields.get("errno") not in (errno.ENOSPC, errno.EDQUOT):
            return False
        self._failed_places.pop(upload, None)
        self.receiver.fail(upload, self.clock(), exc)
        log.warning("upload.failed", extra={"fields": {"upload": upload, "error": str(exc)}})
        return True

    async def abort(self, upload: str, peer: str) -> None:
        """The sender gave the upload up (its job failed): give back its staging."""
        self._failed_places.pop(upload, None)
        if self.receiver.abort(upload, peer, self.clock()):
            log.info("upload.aborted", extra={"fields": {"upload": upload, "by": peer}})

    async def open(self, request: UploadIntent, peer: str) -> OpenAnswer:
        """Stage the upload; an `OpenRequest` with an offer is also answered which of its
        chunks to send (have/want in the same round trip)."""
        work_seen()  # the loop-lag probe ticks fast while an upload comes in
        offered = isinstance(request, OpenRequest) and request.offered
        intent = request.intent() if isinstance(request, OpenRequest) else request
        # The destinations' sizes the open's space check lists: which files are fresh.
        listed: dict[int, int | None] = {}
        committed = self.receiver.open(intent, peer, self.clock(), listed)
        if not offered:
            return OpenAnswer(upload=intent.upload, committed=committed)
        assert isinstance(request, OpenRequest)
        fresh: list[int] = []
        if request.one_pass and not committed:
            # Before have/want: what it copies or keeps in place is staged by then.
            unstaged = self.receiver.unstaged_destinations(intent.upload, peer)
            fresh = self.receiver.fresh_files(unstaged, listed)
        want = [] if committed or not request.offer else (
            await self.have(intent.upload, peer, request.have())).want
        return OfferAnswer(upload=intent.upload, committed=committed, want=want,
                           one_pass=one_pass_files(fresh, request.offer, want))

    async def have(self, upload: str, peer: str, request: HaveRequest) -> HaveAnswer:
        try:
            decision = self.receiver.have(upload, peer, request)
        except StorageError as exc:
            self._fail_if_full(upload, exc)
            raise
        for digest, targets in decision.in_place.items():
            self.receiver.record(upload, targets, digest, in_place=True)
        not_filled: list[str] = []
        for digest, targets in decision.copies.items():
            try:
                filled = await asyncio.to_thread(self.receiver.fill_local, upload, digest, targets)
            except StorageError as exc:
                self._fail_if_full(upload, exc)
                raise
            if filled:
                self.receiver.record(upload, targets, digest)
            else:
                not_filled.append(digest)
        return wanted(decision, request, not_filled)

    # -- chunks from the data channels (net.channels.ChunkSink) ------------------------------

    def chunk_targets(self, head: ChunkHead, peer: str) -> list[ChunkTarget]:
        """In a channel worker: where the chunk goes (the upload must be open, from this peer,
        and the locations inside its files). From the upload's row remembered by the receiver;
        the first chunk of an upload (or one the receiver no longer holds open) asks the loop,
        where the journal lives."""
        got = self.receiver.chunk_targets(head.upload, peer, head.raw_length, head.locations)
        if got is not None:
            return got
        return on_loop(self._loop_now(), self._targets(head, peer))

    async def _targets(self, head: ChunkHead, peer: str) -> list[ChunkTarget]:
        return self.receiver.targets(head.upload, peer, head.raw_length, head.locations)

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StorageError("receiver not started")
        return self._loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that owns the journal (the data listener's workers book on it)."""
        self._loop = loop

    def verify_and_write(
        self, head: ChunkHead, body: memoryview, targets: list[ChunkTarget],
        body_blake3: str | None = None,
    ) -> None:
        """In a channel worker: verify and stage the body. Out of space, the upload fails at
        once (on the loop, where the journal lives). The copy counts as on its way from now
        until it is booked (`_book`) or fails here."""
        self._count_copies(head.upload, targets, 1)
        try:
            self.receiver.verify_and_write(
                head.upload, head.address, body, head.body_blake3.hex(), head.encoding,
                head.raw_length, targets, body_blake3,
            )  # fmt: skip
        except BaseException as exc:
            self._count_copies(head.upload, targets, -1)
            if isinstance(exc, StorageError) and self._loop is not None:
                places = frozenset((t.file, t.offset) for t in targets)
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    self._loop.call_soon_threadsafe(self._chunk_failed, head.upload, places, exc)
            raise

    def _count_copies(self, upload: str, targets: list[ChunkTarget], step: int) -> None:
        with self._copies_lock:
            for t in targets:
                key = (upload, t.file, t.offset)
                n = self._copies.get(key, 0) + step
                if n > 0:
                    self._copies[key] = n
                else:
                    self._copies.pop(key, None)

    def _chunk_failed(
        self, upload: str, places: frozenset[tuple[int, int]], exc: StorageError
    ) -> None:
        """On the loop: a chunk of `upload` could not be staged at `places` (its
        receipt says STORAGE). A commit held for it is answered now (409 naming what is
        missing, or the upload's failure): the chunk will not land, and the sender, which
        waits for that answer before it reports the chunk, would otherwise wait the commit's
        whole idle time. The places are remembered until they land, for a commit that comes
        after the failure (`_until_staged`). A place another copy of the chunk landed at (in
        the journal), or another copy is on its way to (staged, its booking queued), is not
        failed: a commit waiting for it waits on, as the upload does unless it failed."""
        if self._fail_if_full(upload, exc):
            for waiter in self._waiting.get(upload, ()):
                waiter.chunk_failed = True
                waiter.wake()
            return
        known = self.receiver.journal.upload(upload)
        if known is None or known.state is not UploadState.OPEN:
            return  # failed, aborted or committed meanwhile: nothing would forget its places
        received = self.receiver.journal.received(upload)
        with self._copies_lock:
            failed = {p for p in places
                      if p not in received and (upload, *p) not in self._copies}
        if not failed:
            return
        self._failed_places.setdefault(upload, set()).update(failed)
        for waiter in self._waiting.get(upload, ()):
            if not waiter.missing.isdisjoint(failed):
                waiter.chunk_failed = True
                waiter.wake()

    def chunk_landed(self, head: ChunkHead, peer: str, targets: list[ChunkTarget]) -> None:
        """In a channel worker: journal the staged chunk and count it; returns once its row
        is committed (then its receipt may go). The chunks that land while the loop is busy
        are booked together, in one transaction and one wake-up of the loop."""
        self._bookings.run(self._loop_now(), _Landed(
            (head.upload, targets, head.address), peer, head.body_length))

    def _book(self, batch: list[_Landed]) -> None:
        """On the loop: one journal transaction for the chunks that landed since it last
        woke. A booking that fails (the journal's disk full) fails its chunks as staging
        would (`_chunk_failed`): held commits answer now, a full disk fails the upload."""
        try:
            try:
                self.receiver.record_many([landed.row for landed in batch])
            finally:  # booked, or failed: no longer on their way
                for landed in batch:
                    upload, targets, _digest = landed.row
                    self._count_copies(upload, targets, -1)
        except StorageError as exc:
            places: dict[str, set[tuple[int, int]]] = {}
            for landed in batch:
                upload, targets, _digest = landed.row
                places.setdefault(upload, set()).update((t.file, t.offset) for t in targets)
            for upload, at in places.items():
                self._chunk_failed(upload, frozenset(at), exc)
            raise
        for landed in batch:
            self.metrics.bytes_received.labels(landed.peer).inc(landed.body_length)
            self.metrics.chunks_received.labels(landed.peer).inc()
            upload, targets, _digest = landed.row
            failed = self._failed_places.get(upload)
            if failed is not None:
                failed.difference_update((t.file, t.offset) for t in targets)
                if not failed:
                    del self._failed_places[upload]
        if not self._waiting:
            return
        woken: list[_Waiting] = []
        for landed in batch:
            upload, targets, _digest = landed.row
            for waiter in self._waiting.get(upload, ()):
                waiter.missing.difference_update((t.file, t.offset) for t in targets)
                if not waiter.progress:
                    waiter.progress = True
                    woken.append(waiter)
        for waiter in woken:  # each once per batch
            waiter.wake()

    async def commit(
        self, upload: str, peer: str, signed: SignedManifest, wait_s: float = 0.0
    ) -> CommitAnswer:
        """Commit the upload once every chunk of the manifest is staged. `wait_s` > 0: the
        sender sent the commit with its last chunks still on the way; chunks missing now are
        waited for while they keep landing (none for `wait_s`: answered 409 with what is
        missing, as at once without it), so the commit is answered when the last chunk
        lands instead of one round trip after its receipt."""
        if self.receiver.committed(upload, peer):
            return CommitAnswer(committed=True)  # a retry whose first answer was lost
        manifest = self.receiver.check_manifest(upload, peer, signed)
        if wait_s > 0 and self._waiting_by_peer.get(peer, 0) < COMMITS_WAITING_PER_PEER:
            self.commits_waiting += 1
            self._waiting_by_peer[peer] = self._waiting_by_peer.get(peer, 0) + 1
            try:
                await self._until_staged(upload, manifest, wait_s)
            finally:
                self.commits_waiting -= 1
                left = self._waiting_by_peer.pop(peer) - 1
                if left:
                    self._waiting_by_peer[peer] = left
        async with self._commit_lock(upload):
            if self.receiver.committed(upload, peer):
                return CommitAnswer(committed=True)  # a twin commit (a retry) did it meanwhile
            self.receiver.check_open(upload, peer)  # not failed or aborted meanwhile
            missing = self.receiver.missing(upload, manifest)
            if missing:
                return refused(missing)
            in_place = self.receiver.in_place(upload)
            bad = await asyncio.to_thread(self.receiver.verify_files, upload, manifest, in_place)
            if bad:
                self.receiver.forget(upload, bad)
                self.metrics.integrity_failures.labels(peer, "receiver").inc(len(bad))
                log.warning(
                    "commit.refetch", extra={"fields": {"upload": upload, "chunks": len(bad)}}
                )
                return refused(bad)
            try:
                await asyncio.to_thread(self.receiver.commit_files, upload, manifest, in_place)
            except TransferdError as exc:
                if not exc.transient:
                    cause = exc if isinstance(exc, StorageError) else None
                    self._failed_places.pop(upload, None)
                    self.receiver.fail(upload, self.clock(), cause)
                raise
            self.receiver.after_commit(upload, manifest, self.clock())
            self._failed_places.pop(upload, None)
        log.info(
            "upload.committed",
            extra={"fields": {"upload": upload, "root": manifest.root, "from": peer}},
        )
        return CommitAnswer(committed=True)

    async def _until_staged(self, upload: str, manifest: Manifest, idle_s: float) -> None:
        """Until no chunk of the manifest is missing, no more of them landed for `idle_s`,
        a chunk it misses failed in storage (`_chunk_failed`: before the commit came, or
        while it waits), or COMMIT_WAIT_MAX_S passed (the sender's HTTP read timeout lies
        beyond it). The journal is read once; the chunks of this upload booked meanwhile
        are struck off (the check under the commit lock reads it again). TransportError
        (503) when the daemon stops meanwhile."""
        loop = asyncio.get_running_loop()
        end = loop.time() + COMMIT_WAIT_MAX_S
        waiter = _Waiting(self.receiver.missing(upload, manifest))
        with self._copies_lock:  # a failed place another copy is on its way to: wait for it
            failed = {p for p in self._failed_places.get(upload, ())
                      if (upload, *p) not in self._copies}  # fmt: skip
        if not waiter.missing.isdisjoint(failed):
            waiter.chunk_failed = True  # a chunk it misses failed before the commit came
        waiters = self._waiting.setdefault(upload, [])
        waiters.append(waiter)
        try:
            quiet_until = loop.time() + idle_s
            while waiter.missing and not waiter.chunk_failed:
                if self._stopping:
                    exc = TransportError("the receiver is stopping; commit again later")
                    exc.http_status = 503
                    raise exc
                left = min(quiet_until, end) - loop.time()
                if left <= 0:
                    return
                try:
                    async with asyncio.timeout(left):
                        await waiter.landed
                except TimeoutError:
                    return
                waiter.landed = loop.create_future()
                if waiter.progress:
                    waiter.progress = False
                    quiet_until = loop.time() + idle_s
        finally:
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[upload]
