"""This site as a relay: uploads from one peer to another passed on, chunk by chunk, as they
arrive (A -> here -> B), holding nothing once the next hop has it.

Control: an upload opened here whose destination is another site is checked (the relay
settings name the peers and destinations it relays for; this site's region must lie inside the
upload's residency) before anything is held, then opened at the next hop with this site's own
link (its pair key); have/want, commit and abort of that upload are passed on the same way and
the next hop's answers (or errors: a refusal names the hop) come back as they are. The next hop
is the destination, or the next relay the sender named (`?via=`, signed with the request).

Chunks: `RoutingInbound` stands in front of the site's own `InboundUploads` as the data
listener's sink, and takes a relayed chunk at its header (`cut_through`): room for its body is
held in the relay window (memory up to `relay.memory_mib`; while the next hop is slower, spill
files up to `relay.spill_mib`; beyond both the channel's thread waits, the receive buffers
fill, and TCP pushes back on the sender), the chunk is queued on this site's data channels to
the next hop at once, and its bytes go on as they arrive (cut-through: a chunk is not held
whole before it is passed on, so a relay lost mid-transfer has at most the one chunk each
channel was carrying half-way). The relay does not check the body: the destination verifies
every chunk's blake3 before writing it and answers DAMAGED otherwise, and the sender sends it
again. The sender's receipt is the next hop's, sent when it arrives (so a receipt always means
the destination staged the chunk). A chunk that stops arriving, or whose next hop moves none
of it (no byte acknowledged, no receipt) for `relay.forward_timeout_s`, or that cannot be
reached, is answered UNREACHABLE: the sender takes another route. The manifest stays the
source's, signed end to end: a relay that altered a byte would see the destination refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netplan.plan import TrafficClass
from transferd.config import BulkWeights, RelaySettings
from transferd.errors import PolicyViolation, ProtocolError, TransferdError, TransportError
from transferd.net.channels import ArrivingBody, OutgoingChunk, PeerChannels, on_loop
from transferd.net.inbound import InboundUploads
from transferd.net.loop_lag import work_seen
from transferd.net.peer_client import PeerLink
from transferd.net.pump import BulkGate, PeerTraffic
from transferd.protocol import channel as ch
from transferd.protocol.manifest import (
    CommitAnswer,
    HaveAnswer,
    HaveRequest,
    OfferAnswer,
    OpenAnswer,
    OpenRequest,
    SignedManifest,
    UploadIntent,
)
from transferd.protocol.policy import traffic_class_for
from transferd.protocol.routes import check_residency, open_query
from transferd.protocol.upload import commit_path
from transferd.protocol.wire import (
    ABORT_ROUTE,
    HAVE_ROUTE,
    UPLOADS_ROUTE,
    parse_body,
)
from transferd.site.journal import Journal, RelayedUpload
from transferd.site.metrics import Metrics

__all__ = ["RelayService", "RelayWindow", "RoutingInbound"]

log = logging.getLogger("transferd.relay")
MiB = 1 << 20
WATCH_EVERY_S = 0.5
# A relayed body is received (and so passed on) in parts of this size: small enough that the
# next hop's copy lags the previous hop's by little, large enough that a part is one system
# call with the GIL released (256 KiB: 2 ms at 1 Gbit/s).
SLICE = 256 * 1024
# A relayed upload not committed or aborted this long after it opened is forgotten at the next
# start (its sender finished by another route, or gave up): as long as a job may wait for a peer.
RELAYED_KEEP_S = 7 * 86400.0


class RelayWindow:
    """The bytes a relay holds at once: chunk bodies in memory up to `memory_bytes`, then in
    spill files up to `spill_bytes`; `hold` waits (a channel's thread) while both are full."""

    def __init__(self, memory_bytes: int, spill_bytes: int, spill_dir: Path) -> None:
        self.memory_bytes = memory_bytes
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir
        self.in_memory = 0
        self.spilled = 0
        self.peak_memory = 0
        self.peak_spilled = 0
        self.spills = 0  # chunks that waited on disk
        self._cond = threading.Condition()

    def hold(self, n: int, timeout_s: float) -> _Held:
        """Room for a body of `n` bytes, to be received into (`_Held.view`)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                # One chunk always fits an empty window, whatever its size.
                if self.in_memory + n <= self.memory_bytes or self.in_memory == 0:
                    self.in_memory += n
                    self.peak_memory = max(self.peak_memory, self.in_memory)
                    kind = "memory"
                    break
                if self.spilled + n <= self.spill_bytes:
                    self.spilled += n
                    self.peak_spilled = max(self.peak_spilled, self.spilled)
                    self.spills += 1
                    kind = "spill"
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise TransportError("relay window full: the next hop is not taking chunks")
        try:
            if kind == "memory":
                return _Held(self, n, memoryview(bytearray(n)), None)
            return _Held(self, n, *self._spill(n))
        except BaseException:
            self._give_back(kind, n)
            raise

    def check_spill_dir(self) -> None:
        """At start-up: the spill directory can be made and written (OSError otherwise), so a
        relay that would spill learns of a bad `spill_dir` before its first chunk does."""
        if self.spill_bytes <= 0:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.spill_dir, prefix="check-")
        os.close(fd)
        os.unlink(name)

    def _spill(self, n: int) -> tuple[memoryview, mmap.mmap]:
        """A file of its own for the body (unlinked at once: nothing is left behind if the
        relay dies), mapped to receive into and send from."""
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.spill_dir, prefix="chunk-")
        try:
            os.unlink(name)
            # Blocks allocated now, not on first touch: a sparse file on a disk that filled
            # meanwhile would turn the receive into an unbacked page into SIGBUS (the relay
            # dies); allocated, a full disk is ENOSPC here and the chunk is answered STORAGE.
            os.posix_fallocate(fd, 0, n)
            mapping = mmap.mmap(fd, n)
        finally:
            os.close(fd)
        return memoryview(mapping), mapping

    def _give_back(self, kind: str, n: int) -> None:
        with self._cond:
            if kind == "memory":
                self.in_memory -= n
            else:
                self.spilled -= n
            self._cond.notify_all()


@dataclass
class _Held:
    window: RelayWindow
    length: int
    view: memoryview
    mapping: mmap.mmap | None
    released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        # A chunk given up on (the next hop timed out) may still be in a channel's send: its
        # buffer then goes with the last reference instead.
        with contextlib.suppress(BufferError):
            self.view.release()
            if self.mapping is not None:
                self.mapping.close()
        self.window._give_back("memory" if self.mapping is None else "spill", self.length)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


@dataclass
class _Relayed:
    """An upload passing through: who sends it here and where it goes next."""

    upload: str
    source: str  # the peer that sends it here
    next_hop: str
    dest: str
    via: tuple[str, ...]  # the relays after the next hop
    traffic_class: TrafficClass = TrafficClass.SYNC  # the job's: the gate its chunks go through
    chunks: int = 0
    bytes: int = 0


@dataclass(eq=False)
class _Forward:
    """One relayed chunk as it passes (the data listener's `PassingChunk`): its body is
    received into `held` and sent on from there as it arrives; or, when it cannot be passed
    on (`failed`), read off the channel and answered with `status`."""

    relay: RelayService
    relayed: _Relayed | None
    length: int
    failed: str = ""
    status: ch.ReceiptStatus = ch.ReceiptStatus.UNREACHABLE
    item: OutgoingChunk | None = None
    held: _Held | None = None
    body: ArrivingBody | None = None
    received_at: float = 0.0  # when its last byte arrived (0: still arriving)
    gate: BulkGate | None = None  # its slot on the next hop's gate, until it is answered
    upstream: socket.socket | None = None  # the previous hop's channel, while it arrives

    def receive(self, sock: socket.socket) -> None:
        """Channel thread: the body off the channel, passed on part by part as it arrives.
        A previous hop that stops sending mid-body (paused, not closed) ends the chunk after
        `forward_timeout_s` without a byte: its window room, gate slot and the next hop's
        channel do not wait on it for good."""
        flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
        body = self.body
        view = body.view if body is not None else memoryview(bytearray(min(self.length, SLICE)))
        got = 0
        self.upstream = sock
        timeout_s = self.relay.settings.forward_timeout_s
        # SO_RCVTIMEO, not settimeout(): the socket stays blocking (one recv with the GIL
        # released per part); a wait past it ends in EAGAIN, or a short count if bytes came.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout_s))
        try:
            while got < self.length:
                part = min(SLICE, self.length - got)
                started = time.monotonic()
                try:
                    n = (sock.recv_into(view[got:got + part], part, flags) if body is not None
                         else sock.recv_into(view[:part], part, flags))
                except (BlockingIOError, ssl.SSLWantReadError) as exc:
                    raise TimeoutError(
                        f"no byte of the chunk for {time.monotonic() - started:.0f} s "
                        f"(forward_timeout_s {timeout_s:g})") from exc
                if n == 0:
                    raise ConnectionError("data channel closed mid-chunk")
                got += n
                if body is not None:
                    body.grow(n)
        except BaseException as exc:
            self.relay._abandon(self, exc)
            raise
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0.0))
            self.upstream = None
        self.received_at = time.monotonic()

    def answer_later(self, answer: Callable[[ch.ReceiptStatus, str], None]) -> None:
        """The sender's receipt, once the next hop answers (or at once if it cannot)."""
        if self.item is None:
            answer(self.status, self.failed or "relay: nothing to forward")
            return

        def done(future: Any) -> None:
            try:
                receipt: ch.Receipt = future.result()
            except BaseException as exc:  # the next hop is gone, or did not answer in time
                self.relay._settled(self)
                answer(ch.ReceiptStatus.UNREACHABLE, f"relay {self.relay.site}: {exc}"[:500])
                return
            # Nothing kept once the next hop answered.
            self.relay._settled(self, self.length if receipt.status is ch.ReceiptStatus.OK
                                else 0)
            if receipt.status is ch.ReceiptStatus.OK and self.relayed is not None:
                m = self.relay.metrics
                m.relayed_chunks.labels(self.relayed.source, self.relayed.next_hop).inc()
                m.relayed_bytes.labels(self.relayed.source, self.relayed.next_hop).inc(
                    self.length)
            answer(receipt.status, receipt.reason)

        self.item.done.add_done_callback(done)


class RelayService:
    def __init__(
        self,
        *,
        site: str,
        region: str | None,
        settings: RelaySettings,
        spill_dir: Path,
        links: dict[str, PeerLink],
        channels: dict[str, PeerChannels],
        traffic: dict[str, PeerTraffic],
        data_address: Callable[[PeerLink], Coroutine[Any, Any, tuple[str, int]]],
        metrics: Metrics,
        journal: Journal,
        clock: Callable[[], float] = time.time,
        weights: BulkWeights | None = None,
    ) -> None:
        self.site = site
        # This site's bulk class weights (`traffic.weights`): a sender's class is taken only
        # if it weighs no more here than its data's (`class_for`).
        w = weights or BulkWeights()
        self.class_weights = {TrafficClass.CHECKPOINT: w.checkpoint, TrafficClass.SYNC: w.sync}
        self.region = region
        self.settings = settings
        self.links = links
        self.channels = channels
        self.traffic = traffic
        self.data_address = data_address
        self.metrics = metrics
        self.window = RelayWindow(
            settings.memory_mib * MiB, settings.spill_mib * MiB, spill_dir
        )
        self.journal = journal
        self.clock = clock
        # The uploads passed on here, kept in the journal: a relay restarted mid-transfer
        # (a supervisor's restart) goes on passing them on.
        # Each is checked again as if opened now (the relay settings, peers or this site's
        # region may have changed since): one no longer allowed is forgotten, with a log line.
        self.uploads: dict[str, _Relayed] = {}
        for row in journal.relayed(since=clock() - RELAYED_KEEP_S):
            try:
                if row.residency is None:
                    raise PolicyViolation("its residency was not recorded", hop=site)
                self._allowed(row.source, row.next_hop, row.residency)
            except PolicyViolation as exc:
                journal.drop_relayed(row.upload)
                log.warning("relay.forgotten", extra={"fields": {
                    "upload": row.upload, "from": row.source, "to": row.dest,
                    "error": exc.message}})
                continue
            self.uploads[row.upload] = _Relayed(row.upload, row.source, row.next_hop, row.dest,
                                                row.via, TrafficClass(row.traffic_class))
        self.loop: asyncio.AbstractEventLoop | None = None  # set when it runs
        self._pending: set[_Forward] = set()
        self._pending_lock = threading.Lock()

    # -- control ---------------------------------------------------------------------------
    def relays(self, upload: str) -> bool:
        return upload in self.uploads

    def check(self, intent: UploadIntent, peer: str, via: tuple[str, ...]) -> str:
        """May this site pass the upload on (PolicyViolation naming this hop otherwise)?
        Returns the next hop."""
        next_hop = via[0] if via else intent.dest_site
        try:
            known = self.uploads.get(intent.upload)
            if known is not None and known.source != peer:
                # An upload id is bound to the peer that opened it here: another peer may
                # not re-open (and so redirect or take over) an upload passing through.
                raise PolicyViolation(
                    f"upload {intent.upload[:128]!r} is relayed here for {known.source}, "
                    f"not {peer}", hop=self.site)
            self._allowed(peer, next_hop, intent.residency)
        except PolicyViolation as exc:
            self.metrics.policy_refusals.labels("relay").inc()
            log.warning("relay.refused", extra={"fields": {
                "upload": intent.upload, "from": peer, "to": intent.dest_site,
                "error": exc.message}})
            raise
        return next_hop

    def class_for(self, intent: UploadIntent, peer: str, claimed: TrafficClass) -> TrafficClass:
        """The class this site schedules the upload's chunks in toward the next hop. The
        sender's `?class=` is its job's (a plan may set it); a relay takes it when it is the
        one the path's rule gives (`traffic_class_for`: checkpoints/ on checkpoint, the rest
        on sync) or weighs no more here than that one (a job may yield, never take a larger
        share of this site's links than its data is due)."""
        derived = traffic_class_for(intent.root)
        weights = self.class_weights
        if claimed == derived or weights.get(claimed, 0.0) <= weights.get(derived, 0.0):
            return claimed
        log.warning("relay.class_refused", extra={"fields": {
            "upload": intent.upload, "from": peer, "asked": claimed.value,
            "using": derived.value, "path": intent.root[:128]}})
        return derived

    def _allowed(self, peer: str, next_hop: str, residency: Sequence[str]) -> None:
        """PolicyViolation (naming this hop) unless this site relays for `peer` to
        `next_hop` and lies inside `residency`."""
        s = self.settings
        if peer not in s.for_peers:
            raise PolicyViolation(f"relay {self.site} does not relay for {peer}", hop=self.site)
        if next_hop not in s.destinations or next_hop not in self.links:
            raise PolicyViolation(f"relay {self.site} does not relay to {next_hop}",
                                  hop=self.site)
        check_residency(self.site, self.region, residency, "relay")

    async def open(self, request: UploadIntent, peer: str, via: tuple[str, ...],
                   traffic_class: TrafficClass = TrafficClass.SYNC) -> OpenAnswer:
        """Check, then open at the next hop in the same shape: an `OpenRequest`'s offer (the
        first chunks' have/want) goes on with it and its `OfferAnswer` comes back."""
        self.loop = asyncio.get_running_loop()
        work_seen()  # the loop-lag probe ticks fast while relayed uploads move
        offered = isinstance(request, OpenRequest) and request.offered
        intent = request.intent() if isinstance(request, OpenRequest) else request
        next_hop = self.check(intent, peer, via)
        traffic_class = self.class_for(intent, peer, traffic_class)
        query = open_query(via[1:], traffic_class.value) if len(via) > 1 else ""
        reply = await self.links[next_hop].call(
            TrafficClass.CONTROL, "POST", UPLOADS_ROUTE + query,
            body=request if offered else intent,
        )
        answer = parse_body(OfferAnswer if offered else OpenAnswer, reply.body)
        if intent.upload not in self.uploads:
            log.info("relay.opened", extra={"fields": {
                "upload": intent.upload, "from": peer, "next": next_hop,
                "to": intent.dest_site}})
        self.uploads[intent.upload] = _Relayed(
            intent.upload, peer, next_hop, intent.dest_site, tuple(via[1:]), traffic_class
        )
        self.journal.add_relayed(RelayedUpload(intent.upload, peer, next_hop, intent.dest_site,
                                               tuple(via[1:]), self.clock(),
                                               traffic_class.value, tuple(intent.residency)))
        return answer

    def _relayed(self, upload: str, peer: str) -> _Relayed:
        r = self.uploads.get(upload)
        if r is None or r.source != peer:
            raise ProtocolError(f"upload {upload[:128]!r} is not relayed here for {peer}")
        return r

    async def have(self, upload: str, peer: str, request: HaveRequest) -> HaveAnswer:
        r = self._relayed(upload, peer)
        reply = await self.links[r.next_hop].call(
            TrafficClass.CONTROL, "POST", HAVE_ROUTE.format(upload=upload), body=request
        )
        return parse_body(HaveAnswer, reply.body)

    async def commit(self, upload: str, peer: str, signed: SignedManifest,
                     wait_s: float = 0.0) -> CommitAnswer:
        """Passed on, with its wait for the last chunks (`?wait_ms=`): they pass here on
        their way, and the destination waits for them."""
        r = self._relayed(upload, peer)
        reply = await self.links[r.next_hop].call(
            TrafficClass.CONTROL, "POST", commit_path(upload, wait_s), body=signed,
            accept=(200, 409),
        )
        answer = parse_body(CommitAnswer, reply.body)
        if answer.committed:
            self.uploads.pop(upload, None)
            self.journal.drop_relayed(upload)
            log.info("relay.done", extra={"fields": {
                "upload": upload, "to": r.dest, "chunks": r.chunks, "bytes": r.bytes}})
        return answer

    async def abort(self, upload: str, peer: str) -> None:
        r = self._relayed(upload, peer)
        self.uploads.pop(upload, None)
        self.journal.drop_relayed(upload)
        with contextlib.suppress(TransferdError):
            await self.links[r.next_hop].call(
                TrafficClass.CONTROL, "POST", ABORT_ROUTE.format(upload=upload), body=b"",
                accept=(204,),
            )

    # -- chunks ----------------------------------------------------------------------------
    def begin(self, head: ch.ChunkHead, peer: str) -> _Forward:
        """Channel thread, at a relayed chunk's header: room for its body in the window, and
        the chunk queued to the next hop (its channels open) before its first byte arrives;
        or why it cannot be passed on (its body is then read and dropped)."""
        failed = functools.partial(_Forward, self, None, head.body_length)
        if self.loop is None:
            return failed(failed=f"relay {self.site}: not serving yet")
        try:
            r = on_loop(self.loop, self._ready(head, peer))
        except (ProtocolError, PolicyViolation) as exc:
            return failed(failed=exc.message, status=ch.ReceiptStatus.REFUSED)
        except TransferdError as exc:
            return failed(failed=f"relay {self.site}: {exc.message}")
        # This site's own scheduling of the next hop: the chunk waits for its class's turn
        # and the rate caps (TCP pushes back on the sender meanwhile), and feeds the stream
        # controller of the channels to the next hop.
        gate = self.traffic[r.next_hop].gates[r.traffic_class]
        try:
            on_loop(self.loop, gate.acquire(head.body_length))
        except TransferdError as exc:
            return failed(failed=f"relay {self.site}: {exc.message}")
        try:
            return self._forward(head, r, gate)
        except (TransferdError, OSError) as exc:
            # Nothing of the chunk is held past here: its slot goes back, the sender is
            # answered (a full spill disk is STORAGE: another route, or later) instead of
            # the channel ending on a raw OSError with the slot taken for good.
            self.loop.call_soon_threadsafe(gate.release, 0, 1)
            if isinstance(exc, OSError):
                reason = f"relay {self.site}: spill file: {exc.strerror or exc}"
                status = ch.ReceiptStatus.STORAGE
            else:
                reason, status = f"relay {self.site}: {exc.message}", ch.ReceiptStatus.UNREACHABLE
            log.warning("relay.chunk_refused", extra={"fields": {
                "upload": head.upload[:128], "from": peer, "next": r.next_hop,
                "error": reason[:200]}})
            return failed(failed=reason, status=status)

    def _forward(self, head: ch.ChunkHead, r: _Relayed, gate: BulkGate) -> _Forward:
        """Room for the body (memory or spill), and the chunk queued to the next hop."""
        held = self.window.hold(head.body_length, self.settings.forward_timeout_s)
        body = ArrivingBody(held.view)
        item = OutgoingChunk(
            upload=head.upload, digest=head.address, locations=tuple(head.locations),
            raw_length=head.raw_length, encoding=head.encoding,
            body_blake3=head.body_blake3.hex(), body=body,
        )  # fmt: skip
        fwd = _Forward(self, r, head.body_length, item=item, held=held, body=body, gate=gate)
        with self._pending_lock:
            self._pending.add(fwd)
        r.chunks += 1
        r.bytes += head.body_length
        try:
            self.channels[r.next_hop].submit(item)
        except TransferdError as exc:
            item.finish(error=exc)
        return fwd

    async def _ready(self, head: ch.ChunkHead, peer: str) -> _Relayed:
        """On the loop: the relayed upload, its next hop's channels open. A chunk passing is
        work for the loop-lag probe (a relay's loop gets no receipts or digests of its own)."""
        work_seen()
        r = self._relayed(head.upload, peer)
        await self._ensure(r.next_hop)
        return r

    async def _ensure(self, peer: str) -> None:
        link = self.links[peer]
        await self.channels[peer].ensure(
            self.traffic[peer].streams_wanted(), lambda: self.data_address(link)
        )

    def _abandon(self, fwd: _Forward, exc: BaseException) -> None:
        """Channel thread: the previous hop's channel broke mid-chunk. The chunk ends (its
        send to the next hop stops mid-frame: that channel goes); the sender sends it again."""
        if fwd.item is not None:
            fwd.item.finish(error=TransportError(f"relay {self.site}: the chunk's sender went "
                                                 f"away mid-chunk: {exc}"))
        if fwd.body is not None:
            fwd.body.fail(exc)
        self._settled(fwd)

    def _settled(self, fwd: _Forward, acked: int = 0) -> None:
        with self._pending_lock:
            self._pending.discard(fwd)
        if fwd.held is not None:
            fwd.held.release()
        gate, fwd.gate = fwd.gate, None
        if gate is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone
                self.loop.call_soon_threadsafe(gate.release, acked, 0 if acked else 1)

    async def run(self) -> None:
        """Keep the channels to next hops with chunks waiting open, and answer UNREACHABLE
        for chunks that made no progress for the forward timeout (`_stalled`)."""
        self.loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            with self._pending_lock:
                pending = list(self._pending)
            hops = {f.relayed.next_hop for f in pending if f.relayed is not None}
            for hop in hops:
                with contextlib.suppress(TransferdError):
                    await self._ensure(hop)
            now = time.monotonic()
            for f in pending:
                if f.item is None or f.relayed is None or f.item.done.done():
                    continue
                quiet_s = self._stalled(f, now)
                if quiet_s is None:
                    continue
                hop = f.relayed.next_hop
                if not f.received_at:
                    # Still arriving: the previous hop's channel is shut, which ends the
                    # receive (and through it the chunk, `_abandon`); the sender sends it again.
                    upstream = f.upstream
                    if upstream is not None:
                        with contextlib.suppress(OSError):
                            upstream.shutdown(socket.SHUT_RDWR)
                    continue
                # Its channel to the next hop (if it is on one) is broken: the send stops
                # before the chunk's room and gate slot are given back.
                self.channels[hop].expire(f.item, TransportError(
                    f"relay {self.site}: {hop} took none of the chunk for {quiet_s:.0f} s "
                    f"(forward_timeout_s {self.settings.forward_timeout_s:g})", peer=hop))

    def _stalled(self, f: _Forward, now: float) -> float | None:
        """How long `f` has made no progress, if longer than the forward timeout; else None.
        Progress is its bytes arriving, then the next hop taking it: the channel carrying it
        moving (bytes acknowledged, a receipt), or while it waits in the queue any channel to
        that hop moving (the queue drains). Time spent queued behind a slow but healthy next
        hop is not a timeout: only silence is."""
        assert f.relayed is not None
        assert f.item is not None
        if not f.received_at:
            # The receive's own timeout ends a body that stops arriving; this is a backstop
            # (twice as long: the receive notes bytes only at the end of each part).
            last = f.body.grown_at if f.body is not None else now
            quiet_s = now - last
            return quiet_s if quiet_s > 2 * self.settings.forward_timeout_s else None
        pc = self.channels[f.relayed.next_hop]
        moved = pc.moved_at(f.item)
        if moved is None:
            moved = pc.last_moved()
        last = max(f.received_at, moved or 0.0)
        quiet_s = now - last
        return quiet_s if quiet_s > self.settings.forward_timeout_s else None


class RoutingInbound:
    """The data listener's sink and the server's uploads: relayed uploads to the relay, the
    site's own to `InboundUploads`."""

    def __init__(self, inbound: InboundUploads, relay: RelayService, site: str) -> None:
        self.inbound = inbound
        self.relay = relay
        self.site = site

    @property
    def workers(self) -> Any:
        return self.inbound.workers

    async def aclose(self) -> None:
        await self.inbound.aclose()

    async def open(self, request: UploadIntent, peer: str, via: tuple[str, ...] = (),
                   traffic_class: TrafficClass = TrafficClass.SYNC) -> OpenAnswer:
        if request.dest_site != self.site or via:
            return await self.relay.open(request, peer, via, traffic_class)
        return await self.inbound.open(request, peer)

    async def have(self, upload: str, peer: str, request: HaveRequest) -> HaveAnswer:
        if self.relay.relays(upload):
            return await self.relay.have(upload, peer, request)
        return await self.inbound.have(upload, peer, request)

    async def commit(self, upload: str, peer: str, signed: SignedManifest,
                     wait_s: float = 0.0) -> CommitAnswer:
        if self.relay.relays(upload):
            return await self.relay.commit(upload, peer, signed, wait_s)
        return await self.inbound.commit(upload, peer, signed, wait_s)

    async def abort(self, upload: str, peer: str) -> None:
        if self.relay.relays(upload):
            await self.relay.abort(upload, peer)
            return
        await self.inbound.abort(upload, peer)

    def cut_through(self, head: ch.ChunkHead, peer: str) -> _Forward | None:
        """Channel thread: a relayed chunk is passed on as it arrives; the site's own are
        received whole (None)."""
        return self.relay.begin(head, peer) if self.relay.relays(head.upload) else None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inbound.bind(loop)

    def chunk_targets(self, head: ch.ChunkHead, peer: str) -> Any:
        return self.inbound.chunk_targets(head, peer)

    def verify_and_write(self, head: ch.ChunkHead, body: memoryview, targets: Any,
                         body_blake3: str | None = None) -> None:
        self.inbound.verify_and_write(head, body, targets, body_blake3)

    def chunk_landed(self, head: ch.ChunkHead, peer: str, targets: Any) -> None:
        if isinstance(targets, _Forward):
            if targets.item is not None:
                self.relay.metrics.bytes_received.labels(peer).inc(head.body_length)
            return
        self.inbound.chunk_landed(head, peer, targets)
