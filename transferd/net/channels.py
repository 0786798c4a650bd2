"""The bulk data plane's sockets and threads: the listener that accepts data channels from
peers, and the channels this site keeps open to each peer. The bytes of a chunk never pass
through the event loop: threads move them (sendfile or sendall out, recv_into a page-aligned
buffer in, blake3 and pwrite in workers; all release the GIL, so both cores work), and the
event loop only books each chunk (the journal, which lives on its thread) and feeds the
stream controller. Framing, opening and the window are `protocol.channel`'s.

Sending: `PeerChannels.submit(chunk)` queues a chunk for a peer; every open channel's sender
thread takes the next one when its window has room, writes header and body, and its receipt
thread completes the chunk's future when the receipt arrives. A channel that breaks hands its
in-flight chunks back to the queue (another channel, or its replacement, sends them again);
so does one whose chunks in flight have not moved for `stall_s` (no receipt, nothing acked).
Each send of a chunk is reported as it starts (`OutgoingChunk.on_wire`: the job's
bytes_on_wire, re-sends included). A chunk marked `alone` (sent through a relay) goes only on a
channel with nothing else in flight and nothing follows it there before its receipt; a body
still arriving (`ArrivingBody`, a relay's cut-through) is sent part by part as it comes. A
chunk marked `one_pass` (a fresh upload's) is read into the thread's 1 MiB buffer, hashed and
sent piece by piece, its address in the trailer after the body (`protocol.channel`); one whose
channels broke under it ONE_PASS_SENDS times (a receiver that refuses the one-pass frame closes
the channel at its header) is hashed first on its next send and goes as an ordinary chunk, and so
do the peer's other one-pass chunks for ONE_PASS_OFF_S. A
source that ends inside a chunk or fails a read fails the chunk (`SourceEnded`, `_SourceFailed`):
it is not put back in the queue. A source whose filesystem refuses `sendfile` (EINVAL, ENOSYS,
EOPNOTSUPP) is read and sent instead, and read from then on (`SendfileRefusals`).

Receiving: `DataListener` accepts, runs the opening (and TLS when configured), then one thread
per channel reads each header, receives the body into a pooled aligned buffer (and a one-pass
chunk's trailer, whose MAC must chain to its header), and hands it to a worker that verifies,
stages and books it, and sends the receipt. A frame that fails its MAC
or its bounds closes the channel and is counted (auth failures, `channels_refused`); a body
that does not hash to its header is never written (a DAMAGED receipt); nothing a peer sends
can end the listener or the daemon. A sink that passes some chunks on as they arrive (a relay:
`cut_through`) takes those at their header, and receives their bodies itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import logging
import mmap
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import blake3

from transferd.config import CongestionControl
from transferd.errors import (
    AuthError,
    IntegrityError,
    PolicyViolation,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
)
from transferd.net.loop_lag import loop_waited
from transferd.protocol import channel as ch
from transferd.protocol import tcpinfo
from transferd.protocol.auth import Keys
from transferd.protocol.chunks import Encoding
from transferd.protocol.streams import PathSample
from transferd.site.buffers import AlignedBuffers
from transferd.site.failures import source_changed_error, storage_failure
from transferd.site.metrics import Metrics
from transferd.site.source import SourceEnded, file_pieces
from transferd.site.threads import lower_thread_priority, restore_base_priority

__all__ = [
    "ArrivingBody",
    "ChunkSink",
    "DataListener",
    "LoopBatches",
    "LoopInbox",
    "OutgoingChunk",
    "PassingChunk",
    "PeerChannels",
    "SendfileRefusals",
    "set_congestion",
]

log = logging.getLogger("transferd.channels")
T = TypeVar("T")

OPEN_TIMEOUT_S = 15.0  # an opening that has not finished by then is dropped
# A channel whose chunks in flight have not moved for this long (no receipt, no byte acked)
# is broken and its chunks sent again elsewhere: twice a 16 MiB chunk's time at 10 Mbit/s.
STALL_S = 30.0
STALL_CHECKS = 10  # times per `stall_s` the chunks' `ensure` looks for a stalled channel
KEEPALIVE_IDLE_S = 30  # a peer that vanished without a FIN is noticed (TCP keepalive)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# Unsent bytes a channel's socket may hold: a sender thread takes its next chunk only when its
# socket is nearly drained, so the chunks left near the end of a job stay in the shared queue
# for whichever channel is free first, instead of waiting behind one slow stream.
NOTSENT_LOWAT_BYTES = 1 << 20
MSG_MORE = getattr(socket, "MSG_MORE", 0)
ARRIVING_WAKE_S = 1.0  # a sender waiting on a relayed body looks at its channel this often
# A one-pass chunk is read, hashed and sent this much at a time: as RECEIVE_PIECE_BYTES, half
# the benchmark host's L2, so the send copies bytes the hash just left in cache.
ONE_PASS_PIECE_BYTES = 1 << 20
# Sends of a one-pass chunk that broke its channel before its body had gone (no digest yet)
# after which it is hashed first and sent as an ordinary chunk: a receiver refusing the
# one-pass frame would otherwise break channel after channel with it.
ONE_PASS_SENDS = 2
# Then, for this long, every one-pass chunk to that peer is hashed first on its channel (the
# receiver likely refuses the frame: each chunk would break ONE_PASS_SENDS channels first).
ONE_PASS_OFF_S = 600.0


class _SourceFailed(Exception):
    """A read of a chunk's source file (not its socket) failed on the channel thread: the
    chunk's own failure (`error`, as `failures.storage_failure` classifies it), not its
    channel's; sent again, it would fail again on every channel."""

    def __init__(self, error: TransferdError) -> None:
        super().__init__(str(error))
        self.error = error


# `sendfile` errors that are the source filesystem's refusal of it (a FUSE or network filesystem
# without splice, a /proc-like file), not a failure of the file or of the socket: the chunk is
# read and sent instead, and that filesystem is read from then on (`SendfileRefusals`).
SENDFILE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class SendfileRefusals:
    """The filesystems (st_dev) this daemon found refusing `sendfile`: chunks from them are
    read into the sender thread's buffer and sent (as under TLS) instead of trying `sendfile`
    again on every chunk; the first refusal of each is logged once. One per daemon, shared by
    its peers' channels; nothing is remembered across restarts (a remount may bring splice).
    Keyed by the device the source was opened on (`OutgoingChunk.dev`, from its open-time
    stat): no fstat in the channel thread, where an NFS or FUSE fstat failing (ESTALE,
    ENOTCONN) would be taken for the socket's error and break the channel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: frozenset[int] = frozenset()

    def refuses(self, dev: int | None) -> bool:
        """Whether the filesystem `dev` refused `sendfile` before (None: not known)."""
        return dev is not None and dev in self._devices

    def remember(self, dev: int | None, path: str, exc: OSError) -> None:
        """`sendfile` from the file at `path` on `dev` was refused with `exc`."""
        if dev is None:
            return
        with self._lock:
            if dev in self._devices:
                return
            self._devices = self._devices | {dev}
        log.warning("channel.sendfile_refused", extra={"fields": {
            "path": path, "device": dev, "errno": errno.errorcode.get(exc.errno or 0, ""),
            "error": str(exc)[:200]}})


def set_congestion(sock: socket.socket, wanted: CongestionControl) -> str:
    """Pin `wanted` on the socket (bbr by default: hosts default to cubic, which a lossy long
    link caps at a few Mbit/s per stream); if the kernel refuses, say so and keep the system
    default. Returns the algorithm in use."""
    if wanted != "system":
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, wanted.encode())
        except OSError as exc:
            log.warning(
                "channel.congestion_control",
                extra={"fields": {"wanted": wanted, "error": exc.strerror or str(exc),
                                  "using": "system default"}},
            )
    try:
        got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except OSError:
        return "unknown"
    return got.split(b"\0", 1)[0].decode(errors="replace")


def _tune(sock: socket.socket, cc: CongestionControl) -> str:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    return set_congestion(sock, cc)


def _tcp_info(sock: socket.socket, need: int) -> bytes | None:
    """The connection's struct tcp_info if the kernel gives at least `need` bytes of it."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, tcpinfo.INFO_BYTES)
    except (OSError, AttributeError):
        return None
    return info if len(info) >= need else None


def tcp_timeouts(sock: socket.socket) -> int:
    """How many retransmission timeouts in a row the connection has had without progress
    (tcpi_retransmits); 0 where the kernel does not say."""
    info = _tcp_info(sock, tcpinfo.RETRANSMITS + 1)
    return info[tcpinfo.RETRANSMITS] if info is not None else 0


def tcp_counters(sock: socket.socket) -> tuple[int, int, int, int, int | None, int | None] | None:
    """(data segments out, retransmitted, smoothed RTT in us, MSS, busy us, held us) of a
    connection, where held is the busy time the receive window or the send buffer held it
    back (None for both on kernels before 4.10); None where the kernel does not say."""
    info = _tcp_info(sock, tcpinfo.DATA_SEGS_OUT + 4)
    if info is None:
        return None
    busy = held = None
    if len(info) >= tcpinfo.SNDBUF_LIMITED + 8:
        busy = tcpinfo.u64(info, tcpinfo.BUSY_TIME)
        held = (tcpinfo.u64(info, tcpinfo.RWND_LIMITED)
                + tcpinfo.u64(info, tcpinfo.SNDBUF_LIMITED))
    return (tcpinfo.u32(info, tcpinfo.DATA_SEGS_OUT), tcpinfo.u32(info, tcpinfo.TOTAL_RETRANS),
            tcpinfo.u32(info, tcpinfo.RTT), tcpinfo.u32(info, tcpinfo.MSS), busy, held)


# A channel whose data has waited this many retransmission timeouts in a row (0.2 + 0.4 + 0.8 s
# and doubling) sits in TCP's backoff: after an outage it would resume only at its next timeout,
# up to twice the outage later. The path is probed with a new connection instead, and once one
# connects the stuck channels are replaced (their chunks go out again on the new ones).
STUCK_TIMEOUTS = 3
_LINGER_RESET = struct.pack("ii", 1, 0)
PROBE_EVERY_S = 0.25
CONNECT_RACE_S = 0.25  # a connect not answered by then gets a sibling attempt
CONNECT_ATTEMPTS = 3


def connect_racing(host: str, port: int, timeout_s: float, race_after_s: float = CONNECT_RACE_S,
                   attempts: int = CONNECT_ATTEMPTS) -> socket.socket:
    """A connected blocking socket to host:port. A lost SYN (or SYN-ACK) waits the kernel's
    1 s initial retransmission timeout, on a 2 % lossy link one channel opening in twelve or
    so: an attempt with no answer after `race_after_s` gets a sibling (up to `attempts` at
    once), the first to connect wins and the rest are closed. A refusal ends it at once."""
    family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    pending: list[socket.socket] = []
    now = time.monotonic()
    deadline, next_start = now + timeout_s, now
    try:
        while True:
            if len(pending) < attempts and now >= next_start:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                err = sock.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    raise OSError(err, os.strerror(err))
                pending.append(sock)
                next_start = now + race_after_s
            wait = max(0.0, min(next_start if len(pending) < attempts else deadline, deadline)
                       - now)
            _r, writable, _x = select.select([], pending, [], wait)
            for sock in writable:
                pending.remove(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    sock.settimeout(timeout_s)  # for the opening; cleared once it is done
                    return sock
                sock.close()
                raise OSError(err, os.strerror(err))
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no answer within {timeout_s:g} s")
    finally:
        for sock in pending:
            sock.close()
def tcp_bytes_acked(sock: socket.socket) -> int | None:
    """Bytes of this connection the peer has acknowledged; None where the kernel does not
    say (or the socket is closed)."""
    info = _tcp_info(sock, tcpinfo.BYTES_ACKED + 8)
    return tcpinfo.u64(info, tcpinfo.BYTES_ACKED) if info is not None else None


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from the socket; False on a clean end of stream before its first byte.
    A plain socket is asked for the whole frame at once (MSG_WAITALL): the kernel fills an
    8 MiB body in one call with the GIL released, instead of a call (and a GIL hand-off that
    the event loop thread waits behind) per arriving burst."""
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, flags)
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("data channel closed mid-frame")
        got += n
    return True


# A body is received this much at a time and each piece hashed at once, while it is still in
# the core's cache (half the benchmark host's 2 MiB L2): blake3 over a cache-hot piece costs
# ~0.17 CPU-s per GiB against ~0.22-0.25 over an 8 MiB buffer read back from memory, and the
# hash is done when the last byte is in instead of starting then (benchmarks/README.md, issue
# 11 round 6).
RECEIVE_PIECE_BYTES = 1 << 20


def _recv_hashed(sock: socket.socket, view: memoryview) -> str | None:
    """Fill `view` from the socket, hashing each piece as it lands; its blake3 (hex), or None
    on a clean end of stream before the first byte."""
    hasher = blake3.blake3()
    for start in range(0, len(view), RECEIVE_PIECE_BYTES):
        piece = view[start : start + RECEIVE_PIECE_BYTES]
        if not _recv_exact(sock, piece):
            if start == 0:
                return None
            raise ConnectionError("data channel closed mid-frame")
        hasher.update(piece)
    return hasher.hexdigest()


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if not _recv_exact(sock, memoryview(buf)):
        raise ConnectionError("data channel closed")
    return bytes(buf)


LOOP_CALL_TIMEOUT_S = 120.0


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the event loop from a channel thread and wait for its result; a loop that
    is stopping is a StorageError (the chunk is not staged; the sender sends it again)."""
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError as exc:  # the loop is closed
        coro.close()
        raise StorageError(f"receiver stopping: {exc}") from exc
    try:
        return future.result(LOOP_CALL_TIMEOUT_S)
    except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError) as exc:
        future.cancel()
        raise StorageError("receiver stopping") from exc


E = TypeVar("E")


class _LoopQueue(Generic[E]):
    """What `LoopBatches` and `LoopInbox` share: entries handed from threads to one event loop
    in batches. `put(entry, loop)` queues one and asks `loop` for a wake unless one is queued
    already (`put(entry, None)`: no wake; it rides with the next); the wake runs `run_batch`
    over everything pending then, in the order put, and reports how long it waited for the
    loop (`loop_waited`: measured when the batch is taken, not after it ran). The wake is
    asked for under the lock, so an entry that joins a batch is on the loop's queue before
    its thread hands the loop anything else. `put` is False when the loop has closed (the
    entry stays pending; `take` has it)."""

    def __init__(self, run_batch: Callable[[list[E]], None]) -> None:
        self._run_batch = run_batch
        self._lock = threading.Lock()
        self._pending: list[E] = []
        self._scheduled = False  # a `_drain` is queued on the loop
        self._woke_at = 0.0  # when it was queued (monotonic)
        self.wakes = 0  # `call_soon_threadsafe`s made (one per batch)

    def put(self, entry: E, loop: asyncio.AbstractEventLoop | None) -> bool:
        with self._lock:
            self._pending.append(entry)
            if loop is None or self._scheduled:
                return True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed
                return False
            self._scheduled = True
            self._woke_at = time.monotonic()
            self.wakes += 1
            return True

    def take(self) -> tuple[list[E], float | None]:
        """Everything pending, and how long its wake waited for the loop (None: none asked)."""
        with self._lock:
            batch, self._pending = self._pending, []
            waited_s = time.monotonic() - self._woke_at if self._scheduled else None
            self._scheduled = False
        return batch, waited_s

    def flush(self) -> None:
        """On the loop: run what is pending now; a drain already queued stays so (it reports
        its wait)."""
        if self._pending:
            with self._lock:
                batch, self._pending = self._pending, []
            self._run_batch(batch)

    def _drain(self) -> None:
        batch, waited_s = self.take()
        try:
            if batch:
                self._run_batch(batch)
        finally:
            if waited_s is not None:  # a sample for the loop-lag probe, from a wake made anyway
                loop_waited(waited_s)


class LoopBatches(Generic[T]):
    """Items handed from worker threads to the event loop in batches: `run(loop, item)`
    queues the item and blocks until `handle` (on the loop) has taken the batch holding it,
    raising what `handle` raised. Whatever arrives while the loop has not run yet joins the
    same batch: one wake-up of the loop and one call of `handle` for all of them, where a
    coroutine per item cost a task, two futures and a wake-up each."""

    def __init__(self, handle: Callable[[list[T]], None]) -> None:
        self.handle = handle
        self._queue: _LoopQueue[tuple[T, concurrent.futures.Future[None]]] = _LoopQueue(
            self._handle_batch)

    def run(self, loop: asyncio.AbstractEventLoop, item: T) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if not self._queue.put((item, done), loop):  # the loop is closed
            batch, _waited_s = self._queue.take()
            for _item, pending in batch:
                pending.set_exception(StorageError("receiver stopping: event loop closed"))
        try:
            done.result(LOOP_CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError as exc:
            raise StorageError("receiver stopping") from exc

    def _handle_batch(self, batch: list[tuple[T, concurrent.futures.Future[None]]]) -> None:
        try:
            self.handle([item for item, _done in batch])
        except Exception as exc:  # each waiting worker answers its chunk with it
            for _item, done in batch:
                done.set_exception(exc)
        else:
            for _item, done in batch:
                done.set_result(None)


class LoopInbox:
    """Calls handed from threads to one event loop, run there in the order they were posted
    (`post`): one wake-up of the loop carries every call pending when it runs, where a
    `call_soon_threadsafe` each woke it once per call that found it asleep (110-230 us of CPU
    per wake of an idle uvloop on the benchmark VM: round 12). `post_later` queues a call
    without waking the loop: bookkeeping nobody waits on, run with the next batch (the next
    `post` from any thread, or `flush` on the loop: the loop-lag probe's tick). A call posted
    before another always runs before it, and before anything its thread hands the loop
    after the post; a loop that has closed drops what it had not run (the daemon is gone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: _LoopQueue[tuple[Callable[..., object], tuple[object, ...]]] = _LoopQueue(
            self._run)

    @property
    def wakes(self) -> int:
        """`call_soon_threadsafe`s made (one per batch)."""
        return self._queue.wakes

    def post(self, call: Callable[..., object], *args: object) -> None:
        self._queue.put((call, args), self.loop)  # False: the loop is closed, the daemon gone

    def post_later(self, call: Callable[..., object], *args: object) -> None:
        self._queue.put((call, args), None)

    def flush(self) -> None:
        """On the loop: run what is pending now (the calls `post_later` left waiting)."""
        self._queue.flush()

    def _run(self, batch: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
        stop: BaseException | None = None
        for call, args in batch:
            try:
                call(*args)
            except Exception as exc:  # as the loop does with a failed callback: log, go on
                self.loop.call_exception_handler({
                    "message": f"LoopInbox: {getattr(call, '__qualname__', call)!r} failed",
                    "exception": exc})
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: after the rest ran
                stop = stop or exc
        if stop is not None:
            raise stop  # the calls taken with it are not lost (each its own callback before)


# ---- sending ------------------------------------------------------------------------------------


class ArrivingBody:
    """A chunk body that is sent while it arrives (a relay's cut-through, `net.relay`): the
    receiving thread fills `view` and calls `grow`; a sender thread sends each part as soon as
    it is there (`wait`). `fail` ends it early: the send stops mid-frame, and that channel goes
    (the next hop can only discard a frame it never gets whole)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.filled = 0
        self.grown_at = time.monotonic()  # when its latest bytes arrived (or it began)
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.view)

    def grow(self, n: int) -> None:
        with self._cond:
            self.filled += n
            self.grown_at = time.monotonic()
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    def poke(self) -> None:
        """Wake a sender waiting for more (its channel broke: it looks at `stop` again)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, past: int, stop: Callable[[], bool] = lambda: False) -> int:
        """How many bytes are there, once more than `past` are (or all of them are).
        ConnectionError once the upstream failed or `stop()` (the sending channel broke:
        its thread must not stay parked on an upstream that paused)."""
        with self._cond:
            while self.filled <= past and self.filled < len(self.view) and self.error is None:
                if stop():
                    raise ConnectionError("the channel broke while the chunk was arriving")
                # Woken by grow/fail/poke; the timeout is only a backstop for a missed poke.
                self._cond.wait(ARRIVING_WAKE_S)
            if self.error is not None:
                raise ConnectionError(f"the chunk's upstream failed: {self.error}")
            return self.filled


@dataclass
class OutgoingChunk:
    """One chunk to send to a peer: header fields and where its body comes from (`fd` and
    `offset` of the local file for `sendfile`, or `body`: compressed or fetched bytes). The
    chunk owns `fd` (a dup) and closes it once its receipt is in or it is withdrawn."""

    upload: str
    digest: str
    locations: tuple[tuple[int, int], ...]
    raw_length: int
    encoding: Encoding
    body_blake3: str
    body: bytes | memoryview | ArrivingBody | None = None
    fd: int | None = None
    offset: int = 0
    done: concurrent.futures.Future[ch.Receipt] = field(
        default_factory=concurrent.futures.Future
    )
    sends: int = 0  # times it went on the wire (more than one: a channel broke under it)
    # Hears, on the sender thread, of every send as it starts: (body bytes, a send again?).
    on_wire: Callable[[int, bool], None] | None = None
    # Goes out only on a channel with nothing else in flight, and nothing follows it there
    # until its receipt: a chunk sent through a relay, so that a relay lost mid-transfer costs
    # at most one chunk per channel (`net.relay`; every other chunk there is at the destination).
    alone: bool = False
    sent_at: float | None = None  # when its latest send started (monotonic)
    # Given up on (`PeerChannels.give_up`, `expire`): a channel that breaks under it does not
    # put it back in the queue nor count it as sent again; it is finished with the error.
    ended: bool = False
    # One pass (a fresh upload's local chunk): `digest` is "" until the sender thread has read
    # and hashed the body as it sent it (`_Channel._write_one_pass`), then set there and told
    # to `on_digest`; a send again after that goes as an ordinary chunk with that address
    # (the receiver's check then catches a source that changed: DAMAGED).
    one_pass: bool = False
    on_digest: Callable[[str], None] | None = None
    path: str = ""  # the source file's, for a chunk sent from one (its errors name it)
    # The source file's device (its open-time st_dev): a filesystem refusing `sendfile` is
    # remembered by it (`SendfileRefusals`) without an fstat in the channel thread.
    dev: int | None = None

    @property
    def wire_length(self) -> int:
        """The body's bytes: what `bytes_sent` and a job's `bytes_on_wire` count (bodies).
        The framing around it (the header; a one-pass chunk's 48-byte trailer, its address
        and MAC) is not counted, as no request's headers are."""
        return len(self.body) if self.body is not None else self.raw_length

    def finish(self, receipt: ch.Receipt | None = None, error: BaseException | None = None) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.done.done():
            return
        if error is not None:
            self.done.set_exception(error)
        else:
            assert receipt is not None
            self.done.set_result(receipt)


def _sendfile_failed(item: OutgoingChunk, at: int, exc: OSError) -> None:
    """`os.sendfile` of `item` failed at file offset `at`: the socket's failure or the
    source's (EIO reading the file comes back the same way)? A one-byte read there tells: if
    it fails, or finds the file ended, the chunk's source failed (`_SourceFailed`,
    `SourceEnded`: the chunk fails, as `_Channel._source_pieces` makes it); if it reads, the
    error was the socket's and this returns (the caller re-raises it: the channel breaks)."""
    assert item.fd is not None
    try:
        probe = os.pread(item.fd, 1, at)
    except OSError as failed:
        raise _source_failed(item, failed) from exc
    if not probe:
        raise SourceEnded("source file ended before the chunk did") from exc


def _source_failed(item: OutgoingChunk, exc: OSError) -> _SourceFailed:
    """A failed read of `item`'s source file, as the chunk's own failure."""
    return _SourceFailed(storage_failure("reading", _source_name(item), exc, side="source"))


def _source_name(item: OutgoingChunk) -> str:
    """The source a chunk is read from, for its errors: its file's path, else its place."""
    if item.path:
        return item.path
    f, offset = item.locations[0] if item.locations else (0, item.offset)
    return f"(file {f} of upload {item.upload}, chunk at offset {offset})"


class _Channel:
    """One open channel to a peer: a sender thread and a receipt thread around one socket.

    The socket is closed by the last of the two threads to end (`_thread_ended`), never by a
    thread breaking the channel (`_close` only shuts it down, which ends the other thread's
    call on it: EOF, EPIPE): a thread may be inside a call with the descriptor's number in
    hand (`os.sendfile` of `sock.fileno()`, OpenSSL's read or write loop on the number it was
    given), and a number closed under it is soon a new channel's socket, which it would then
    read from or write into (a TLS peer sees a bad record MAC on that channel's handshake)."""

    _running = 0  # of the two threads, those not yet ended (under the owner's cond)

    def __init__(self, owner: PeerChannels, sock: socket.socket, session: ch.Session,
                 tls: bool, window: int) -> None:
        self.owner = owner
        self.sock = sock
        self.session = session
        self.tls = tls
        self.window: ch.ChannelWindow[OutgoingChunk] = ch.ChannelWindow(window)
        self.retiring = False
        self.broken = False
        # At the last path sample: TCP segments out, retransmitted, busy and held us, and when.
        self.counted: tuple[int, int, int, int, float] = (0, 0, 0, 0, time.monotonic())
        # When a chunk last went out or a receipt came in, and the bytes the peer had acked
        # then: a channel with chunks in flight where neither moves for `stall_s` is broken.
        self.moved_at = time.monotonic()
        self.acked = 0
        # The sender thread's buffer for one pass (mapped on its first one-pass chunk, unmapped
        # as the thread ends).
        self._piece: memoryview | None = None
        self.threads = [
            threading.Thread(target=self._send_loop, name=f"channel-send-{owner.peer}",
                             daemon=True),
            threading.Thread(target=self._receipt_loop, name=f"channel-recv-{owner.peer}",
                             daemon=True),
        ]
        self._running = len(self.threads)
        for t in self.threads:
            t.start()

    # sender thread
    def _send_loop(self) -> None:
        try:
            self._send_chunks()
        finally:
            self._drop_piece()
            self._thread_ended()

    def _drop_piece(self) -> None:
        """The sender thread ends: its one-pass buffer is unmapped (1 MiB per channel)."""
        piece, self._piece = self._piece, None
        if piece is not None:
            region = piece.obj
            piece.release()
            assert isinstance(region, mmap.mmap)
            region.close()

    def _send_chunks(self) -> None:
        lower_thread_priority()
        owner = self.owner
        while True:
            with owner.cond:
                while True:
                    if owner.closing or self.broken:
                        return
                    if self.retiring:
                        if not len(self.window):
                            self._close()  # the receipt thread sees the end and stops
                            return
                    elif owner.queue and (owner.queue[0].done.done() or owner.queue[0].ended):
                        owner.queue.popleft()  # given up on while it waited (a dead relay)
                        continue
                    elif owner.queue and self._has_room(owner.queue[0]):
                        break
                    owner.cond.wait()
                item = owner.queue.popleft()
                seq = self.window.sent(item)
                item.sends += 1
                self.moved_at = item.sent_at = time.monotonic()
            if item.on_wire is not None:
                # Before the first byte: a send cut short, or a sender killed, still counts.
                item.on_wire(item.wire_length, item.sends > 1)
            try:
                self._write(seq, item)
            except Exception as exc:  # OSError, mostly; anything else costs only this channel
                # A source that ended or failed a read fails the chunk (sent again, it would do
                # so again on every channel); the channel, cut mid-body, is broken as well.
                if isinstance(exc, SourceEnded):
                    item.finish(error=source_changed_error(
                        _source_name(item), f"ended inside its chunk at offset {item.offset}"))
                elif isinstance(exc, _SourceFailed):
                    item.finish(error=exc.error)
                self._break(exc)
                return
            owner.metrics.bytes_sent.labels(owner.peer).inc(item.wire_length)

    def _has_room(self, item: OutgoingChunk) -> bool:
        if not len(self.window):
            return True
        return self.window.has_room() and not item.alone and not any(
            i.alone for i in self.window)

    def _write(self, seq: int, item: OutgoingChunk) -> None:
        if item.one_pass and not item.digest:
            if item.sends <= ONE_PASS_SENDS and time.monotonic() >= self.owner.one_pass_off_until:
                self._write_one_pass(seq, item)
                return
            self._hash_first(item)
        head = ch.ChunkHead(
            seq=seq, upload=item.upload, digest=bytes.fromhex(item.digest),
            body_blake3=bytes.fromhex(item.body_blake3), encoding=item.encoding,
            raw_length=item.raw_length, body_length=item.wire_length, locations=item.locations,
        )
        # MSG_MORE: the header waits for the body's first bytes instead of leaving as a
        # packet of its own (the sockets run with TCP_NODELAY for the receipts).
        self.sock.sendall(ch.encode_chunk_head(self.session, head), 0 if self.tls else MSG_MORE)
        if isinstance(item.body, ArrivingBody):
            sent = 0
            while sent < len(item.body):
                # Not parked for good once the channels close: the thread must end to close
                # the socket (`_thread_ended`).
                filled = item.body.wait(sent, lambda: self.broken or self.owner.closing)
                self.sock.sendall(item.body.view[sent:filled])
                sent = filled
        elif item.body is not None:
            self.sock.sendall(item.body)
        elif self.tls:
            # TLS encrypts in user space anyway: send the file read piece by piece (never a
            # mapping of it: a file cut short under one is a SIGBUS, the daemon's death),
            # through the one-pass readers' mapping: a file that ends or a read that fails
            # (EIO) fails the chunk, instead of breaking channel after channel with it.
            self._read_and_send(item)
        else:
            self._send_file(item)

    def _send_file(self, item: OutgoingChunk) -> None:
        """A raw local chunk by `sendfile` from its file; from a filesystem that refuses
        `sendfile` (`SENDFILE_REFUSED`, now or before: `SendfileRefusals`), read into this
        thread's buffer and sent from there, from where `sendfile` stopped. Any other error
        is the source's (`_sendfile_failed`) or the socket's (re-raised: the channel breaks)."""
        assert item.fd is not None
        refusals = self.owner.sendfile_refusals
        sent = 0
        if refusals.refuses(item.dev):
            self._read_and_send(item)
            return
        while sent < item.raw_length:
            try:
                n = os.sendfile(self.sock.fileno(), item.fd, item.offset + sent,
                                item.raw_length - sent)
            except OSError as exc:
                if exc.errno not in SENDFILE_REFUSED:
                    _sendfile_failed(item, item.offset + sent, exc)
                    raise
                refused = exc
                break
            if n == 0:
                raise SourceEnded("source file ended before the chunk did")
            sent += n
        else:
            return
        # Remembered once the read bytes went out: a socket failing meanwhile (its error
        # raised from sendall, the channel breaks) says nothing of the filesystem.
        self._read_and_send(item, sent, lambda: refusals.remember(
            item.dev, _source_name(item), refused))

    def _read_and_send(self, item: OutgoingChunk, skip: int = 0,
                       first_sent: Callable[[], None] | None = None) -> None:
        """A local chunk (past its first `skip` bytes) read into this thread's buffer and sent
        piece by piece (under TLS, or from a filesystem refusing `sendfile`); `first_sent` is
        called once the first piece is out. The reads tell a source that fails
        (`_SourceFailed`) from a socket that does (sendall's error: the channel breaks)."""
        for piece in self._source_pieces(item, skip):
            self.sock.sendall(piece)
            if first_sent is not None:
                first_sent()
                first_sent = None

    def _source_pieces(self, item: OutgoingChunk, skip: int = 0) -> Iterator[memoryview]:
        """A local chunk's bytes (past its first `skip`), read from its file piece by piece
        into this thread's buffer (`file_pieces`; each piece valid until the next): a one-pass
        chunk's (both one-pass readers) and a raw hash-first chunk's under TLS (no `sendfile`
        there) or from a filesystem that refuses `sendfile`. A file that ends first is the
        chunk's SourceEnded; a read that fails is its `_SourceFailed`, never the channel's."""
        assert item.fd is not None
        if self._piece is None:
            self._piece = memoryview(mmap.mmap(-1, ONE_PASS_PIECE_BYTES))
        pieces = file_pieces(item.fd, item.offset + skip, item.raw_length - skip, self._piece)
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                return
            except SourceEnded:
                raise
            except OSError as exc:
                raise _source_failed(item, exc) from exc
            yield piece

    def _hash_first(self, item: OutgoingChunk) -> None:
        """A one-pass chunk whose sends broke ONE_PASS_SENDS channels before its body had
        gone (then one pass to the peer is off for ONE_PASS_OFF_S), or one sent meanwhile:
        hashed here (its file read once more) and sent as an ordinary chunk, its digest told
        to `on_digest` as a one-pass send's would be."""
        hasher = blake3.blake3()
        for piece in self._source_pieces(item):
            hasher.update(piece)
        item.digest = item.body_blake3 = hasher.hexdigest()
        if item.sends > ONE_PASS_SENDS:
            self.owner.one_pass_off_until = time.monotonic() + ONE_PASS_OFF_S
            log.warning("channel.one_pass_off", extra={"fields": {
                "peer": self.owner.peer, "path": item.path, "offset": item.offset,
                "sends": item.sends - 1, "for_s": ONE_PASS_OFF_S}})
        if item.on_digest is not None:
            item.on_digest(item.digest)

    def _write_one_pass(self, seq: int, item: OutgoingChunk) -> None:
        """Header, then the chunk read piece by piece into this thread's buffer, each piece
        hashed and sent while it is in cache (one pass over the bytes instead of a hashing
        pass and a `sendfile`), then the trailer with the address."""
        head = ch.ChunkHead(
            seq=seq, upload=item.upload, digest=bytes(32), body_blake3=bytes(32),
            encoding="identity", raw_length=item.raw_length, body_length=item.raw_length,
            locations=item.locations, trailed=True,
        )
        frame = ch.encode_chunk_head(self.session, head)
        more = 0 if self.tls else MSG_MORE
        self.sock.sendall(frame, more)
        hasher = blake3.blake3()
        for piece in self._source_pieces(item):
            hasher.update(piece)
            self.sock.sendall(piece, more)
        digest = hasher.digest()
        item.digest = item.body_blake3 = digest.hex()
        if item.on_digest is not None:
            item.on_digest(item.digest)
        self.sock.sendall(ch.encode_trailer(self.session, frame, digest))

    # receipt thread
    def _receipt_loop(self) -> None:
        lower_thread_priority()
        owner = self.owner
        try:
            while True:
                fixed = bytearray(ch.RECEIPT_FIXED.size)
                if not _recv_exact(self.sock, memoryview(fixed)):
                    raise ConnectionError("the peer closed the data channel")
                _status, rest_len = ch.decode_receipt_fixed(bytes(fixed))
                receipt = ch.decode_receipt(self.session, bytes(fixed), _read(self.sock, rest_len))
                with owner.cond:
                    item = self.window.completed(receipt.seq)
                    self.moved_at = time.monotonic()
                    owner.cond.notify_all()
                item.finish(receipt)
        except Exception as exc:  # OSError, a bad receipt; anything else costs this channel
            self._break(exc)
        finally:
            self._thread_ended()

    def _break(self, exc: BaseException) -> None:
        owner = self.owner
        with owner.cond:
            if self.broken:
                return
            self.broken = True
            # Those given up on (`PeerChannels.give_up`, an upstream that failed) stay ended.
            drained = self.window.drain()
            again = [i for i in drained if not i.done.done() and not i.ended]
            for item in reversed(again):
                owner.queue.appendleft(item)  # first in line for the next channel
            owner.cond.notify_all()
        for item in drained:  # a sender thread parked on a relayed body still arriving
            if isinstance(item.body, ArrivingBody):
                item.body.poke()
        if again and not owner.closing and not self.retiring:
            owner.resent(again)
            log.warning("channel.broken", extra={"fields": {
                "peer": owner.peer, "error": f"{type(exc).__name__}: {exc}"[:200],
                "chunks_again": len(again)}})
        self._close()

    def _close(self) -> None:
        """Shut the socket down: both threads' calls on it end (and they then end). Closed
        here only if both have ended already; else the last to end closes it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self.owner.cond:
            idle = not self._running
        if idle:
            with contextlib.suppress(OSError):
                self.sock.close()

    def _thread_ended(self) -> None:
        """One of the channel's threads ends; the last closes the socket (neither uses its
        descriptor any more; both end only once the channel is broken, retired or closing,
        with its socket shut down)."""
        with self.owner.cond:
            self._running -= 1
            last = not self._running
        if last:
            self._close()

    @property
    def alive(self) -> bool:
        return not self.broken and not self.retiring


class PeerChannels:
    """The data channels to one peer, opened on demand at the count the stream controller
    wants (in parallel: on a lossy link a lost SYN costs the 1 s initial RTO, and openings one
    after the other add those up), kept open across chunks and jobs, fed from one queue."""

    def __init__(
        self,
        *,
        site: str,
        peer: str,
        keys: Keys,
        metrics: Metrics,
        congestion_control: CongestionControl = "bbr",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        window: int = 2,
        sendfile_refusals: SendfileRefusals | None = None,
    ) -> None:
        self.site = site
        self.peer = peer
        self.keys = keys
        self.metrics = metrics
        self.congestion_control = congestion_control
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.window = window
        # The daemon's, shared by its peers (a filesystem refusing `sendfile` is logged once).
        self.sendfile_refusals = (
            sendfile_refusals if sendfile_refusals is not None else SendfileRefusals())
        self.cond = threading.Condition()
        self.queue: deque[OutgoingChunk] = deque()
        self.channels: list[_Channel] = []
        self.closing = False
        self.opened = 0  # channels opened over the daemon's life (reuse shows as few)
        self.algorithms: set[str] = set()
        self._open_lock = asyncio.Lock()
        self._address: tuple[str, int] | None = None  # where the last channels were opened
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.stall_s = STALL_S
        # Monotonic: until when one-pass chunks go hashed first (`ONE_PASS_OFF_S`).
        self.one_pass_off_until = 0.0
        self._stall_check_at = 0.0  # monotonic: when `ensure` looks for stalled channels next

    # -- called from the event loop ----------------------------------------------------------
    def live(self) -> int:
        with self.cond:
            self.channels = [c for c in self.channels if not c.broken]
            return sum(1 for c in self.channels if c.alive)

    async def ensure(self, count: int, address: Callable[[], Coroutine[Any, Any, tuple[str, int]]]
                     ) -> None:
        """At least `count` live channels (more are retired down to it); opens the missing
        ones in parallel. TransportError (or AuthError) when the peer cannot be reached.
        Called for every chunk sent: the stall check (a TCP_INFO read per channel) runs at
        most every `stall_s / STALL_CHECKS` seconds, and with the count right nothing else."""
        now = time.monotonic()
        if now >= self._stall_check_at:
            self._stall_check_at = now + self.stall_s / STALL_CHECKS
            self.break_stalled()
        if not self._open_lock.locked() and self.live() == count:
            return
        async with self._open_lock:
            missing = count - self.live()
            if missing > 0:
                host, port = await address()
                self._watch((host, port))
                opened = await asyncio.gather(
                    *(asyncio.to_thread(self._open, host, port) for _ in range(missing)),
                    return_exceptions=True)
                errors = [e for e in opened if isinstance(e, BaseException)]
                if errors and self.live() == 0:
                    first = errors[0]
                    if isinstance(first, TransferdError):
                        raise first
                    raise TransportError(f"{self.peer}: cannot open a data channel: {first}",
                                         peer=self.peer) from first
            elif missing < 0:
                self.retire(-missing)

    def break_stalled(self) -> int:
        """Break the channels whose chunks in flight have not moved for `stall_s` (no receipt,
        nothing acked by the peer's TCP): a link that black-holes a connection without a reset
        would otherwise hold those chunks for the kernel's retransmission timeout (~15 min).
        Their chunks go back to the queue. Returns how many were broken."""
        now = time.monotonic()
        stalled = []
        with self.cond:
            for chan in self.channels:
                if not chan.alive or not len(chan.window):
                    continue
                acked = tcp_bytes_acked(chan.sock)
                if acked is not None and acked != chan.acked:
                    chan.acked, chan.moved_at = acked, now
                elif now - chan.moved_at > self.stall_s:
                    stalled.append(chan)
        for chan in stalled:
            chan._break(TimeoutError(f"nothing moved for {self.stall_s:g} s"))
        return len(stalled)

    def retire(self, n: int) -> None:
        """Close `n` channels once their in-flight chunks are in (the controller went down)."""
        with self.cond:
            for chan in [c for c in self.channels if c.alive][:n]:
                chan.retiring = True
            self.cond.notify_all()

    def submit(self, item: OutgoingChunk) -> concurrent.futures.Future[ch.Receipt]:
        with self.cond:
            if self.closing:
                raise TransportError(f"{self.peer}: data channels are closing", peer=self.peer)
            self.queue.append(item)
            self.cond.notify_all()
        return item.done

    def withdraw(self, upload: str, only: OutgoingChunk | None = None,
                 reason: str = "withdrawn: the job ended") -> None:
        """Drop the queued (not yet sent) chunks of `upload` (its job has ended), or just
        `only` (it will be sent again later), ending them with `reason`."""
        with self.cond:
            keep: deque[OutgoingChunk] = deque()
            gone: list[OutgoingChunk] = []
            for item in self.queue:
                drop = item.upload == upload and (only is None or item is only)
                (gone if drop else keep).append(item)
            self.queue = keep
        for item in gone:
            item.finish(error=TransportError(reason, peer=self.peer))

    def moved_at(self, item: OutgoingChunk) -> float | None:
        """When the channel carrying `item` last moved (a receipt, or bytes the peer's TCP
        acknowledged); None while it is not in flight."""
        with self.cond:
            chan = next((c for c in self.channels
                         if not c.broken and any(i is item for i in c.window)), None)
            if chan is None:
                return None
            acked = tcp_bytes_acked(chan.sock)
            if acked is not None and acked != chan.acked:
                chan.acked, chan.moved_at = acked, time.monotonic()
            return chan.moved_at

    def last_moved(self) -> float | None:
        """When any live channel to the peer last moved (a receipt, or bytes acknowledged):
        chunks queued here are being taken while it does. None with no live channel."""
        now = time.monotonic()
        with self.cond:
            live = [c for c in self.channels if c.alive]
            for chan in live:
                acked = tcp_bytes_acked(chan.sock)
                if acked is not None and acked != chan.acked:
                    chan.acked, chan.moved_at = acked, now
            return max((c.moved_at for c in live), default=None)

    def give_up(self, upload: str, error: TransferdError) -> int:
        """End every chunk of `upload` queued or in flight here with `error`, breaking the
        channels that carry one (the peer stopped answering them: a hung relay); their other
        chunks go to the queue again. Returns how many chunks were in flight."""
        return self._end(lambda i: i.upload == upload, error)

    def expire(self, item: OutgoingChunk, error: TransferdError) -> None:
        """End `item` with `error` whether queued or in flight (the channel carrying it is
        broken: its send stops, and the body it reads from may go)."""
        self._end(lambda i: i is item, error)

    def _end(self, which: Callable[[OutgoingChunk], bool], error: TransferdError) -> int:
        with self.cond:
            carrying = [c for c in self.channels
                        if not c.broken and any(which(i) for i in c.window)]
            flying = [i for c in carrying for i in c.window if which(i)]
            queued = [i for i in self.queue if which(i)]
            # Marked before any channel breaks: a broken channel must not queue them again
            # (another channel would send them to the peer given up on) nor count them sent
            # again.
            for item in (*flying, *queued):
                item.ended = True
            self.queue = deque(i for i in self.queue if not which(i))
        for chan in carrying:  # first: a send under way stops before its chunk is ended
            with contextlib.suppress(OSError):  # reset: the peer may never read a FIN
                chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            chan._break(error)
        for item in (*flying, *queued):
            item.finish(error=error)
        return len(flying)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self.cond:
            self.closing = True
            channels, self.channels = self.channels, []
            queued, self.queue = list(self.queue), deque()
            self.cond.notify_all()
        for chan in channels:
            chan._close()
        for chan in channels:
            for t in chan.threads:
                t.join(timeout=5)
            for item in chan.window.drain():
                item.finish(error=TransportError("daemon stopping", peer=self.peer))
        for item in queued:
            item.finish(error=TransportError("daemon stopping", peer=self.peer))

    def path_sample(self) -> PathSample | None:
        """TCP_INFO of the live channels since the last sample: segments sent and resent
        (summed), RTT and MSS (their means); None before any data went out."""
        segs = retrans = 0
        busy_us = held_us = 0
        span_s = 0.0
        chrono = True
        rtts: list[int] = []
        mss: list[int] = []
        with self.cond:
            live = [c for c in self.channels if c.alive]
        now = time.monotonic()
        for chan in live:
            got = tcp_counters(chan.sock)
            if got is None:
                continue
            out, resent, rtt_us, seg, busy, held = got
            was = chan.counted
            segs += out - was[0]
            retrans += resent - was[1]
            if busy is None or held is None:
                chrono = False
                busy = held = 0
            busy_us += busy - was[2]
            held_us += held - was[3]
            span_s += now - was[4]
            chan.counted = (out, resent, busy, held, now)
            rtts.append(rtt_us)
            mss.append(seg)
        if segs <= 0 or not rtts:
            return None
        return PathSample(segs_out=segs, retrans=max(0, retrans),
                          rtt_s=sum(rtts) / len(rtts) / 1e6, mss=int(sum(mss) / len(mss)),
                          busy_s=busy_us / 1e6 if chrono else None,
                          held_s=held_us / 1e6 if chrono else None,
                          span_s=span_s if chrono else None)

    def tcp_infos(self) -> list[tuple[object, bytes]]:
        """Each live channel (as an identity) with its raw struct tcp_info: for telemetry."""
        with self.cond:
            live = [c for c in self.channels if c.alive]
        return [(c, info) for c in live if (info := _tcp_info(c.sock, 0)) is not None]

    # -- channel threads -----------------------------------------------------------------------
    def _watch(self, address: tuple[str, int]) -> None:
        self._address = address
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_loop, name=f"channel-watch-{self.peer}", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        """Thread: replace channels stuck in retransmission backoff once the path answers."""
        restore_base_priority()  # started by the real-time loop: its threads start at nice 0
        while not self._stop.wait(PROBE_EVERY_S):
            with self.cond:
                stuck = [c for c in self.channels if c.alive and len(c.window)]
            stuck = [c for c in stuck if tcp_timeouts(c.sock) >= STUCK_TIMEOUTS]
            if not stuck or self._address is None:
                continue
            host, port = self._address
            try:
                probe = connect_racing(host, port, 2 * PROBE_EVERY_S)
            except OSError:
                continue  # still down: TCP keeps retrying on the old channels as well
            log.warning("channel.stuck", extra={"fields": {
                "peer": self.peer, "channels": len(stuck), "replaced": True}})
            try:
                self._open(host, port, probe)
            except TransferdError:
                continue
            for chan in stuck:
                with contextlib.suppress(OSError):  # reset, not FIN: the peer frees it at once
                    chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                chan._break(TransportError("stuck in retransmission backoff while the path "
                                           "answers again", peer=self.peer))
            for _ in stuck[1:]:
                with contextlib.suppress(TransferdError):
                    self._open(host, port)

    def resent(self, items: Sequence[OutgoingChunk]) -> None:
        self.metrics.chunks_resent.labels(self.peer).inc(len(items))

    def _open(self, host: str, port: int, raw: socket.socket | None = None) -> _Channel:
        """Thread: connect (unless `raw` is connected already), TLS, the HMAC opening; a
        started channel."""
        if raw is None:
            try:
                raw = connect_racing(host, port, OPEN_TIMEOUT_S)
            except OSError as exc:
                raise TransportError(f"{self.peer}: data channel to {host}:{port}: "
                                     f"{exc.strerror or exc}", peer=self.peer) from exc
        raw.settimeout(OPEN_TIMEOUT_S)
        try:
            algorithm = _tune(raw, self.congestion_control)
            sock: socket.socket = raw
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(raw, server_hostname=self.server_hostname)
            secret = self.keys.secret_for(self.peer)
            said, frame = ch.hello(self.site, self.peer)
            sock.sendall(frame)
            server_nonce = _read(sock, ch.CHALLENGE_BYTES)
            sock.sendall(ch.proof(secret, said, server_nonce))
            ch.check_accept(secret, said, server_nonce, _read(sock, ch.ACCEPT_BYTES))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
            sock.settimeout(None)
        except AuthError:
            raw.close()
            raise
        except (OSError, ssl.SSLError, ValueError) as exc:
            raw.close()
            raise TransportError(f"{self.peer}: opening a data channel: {exc}",
                                 peer=self.peer) from exc
        chan = _Channel(self, sock, ch.Session.derive(secret, said, server_nonce),
                        self.ssl_context is not None, self.window)
        with self.cond:
            # Registered here, not by the awaiting task: one cancelled meanwhile (the daemon
            # stopping) must not leave an open channel nobody closes.
            closing = self.closing
            if not closing:
                self.channels.append(chan)
                self.opened += 1
                self.algorithms.add(algorithm)
            self.cond.notify_all()
        if closing:
            chan._close()
            return chan
        self.metrics.channels_opened.labels(self.peer).inc()
        log.info("channel.opened", extra={"fields": {
            "peer": self.peer, "to": f"{host}:{port}", "congestion_control": algorithm,
            "tls": self.ssl_context is not None}})
        return chan


# ---- receiving ----------------------------------------------------------------------------------


class ChunkSink(Protocol):
    """What a receiving channel needs from the daemon, all called in a worker thread: where a
    chunk goes, the bytes, and its booking (the sink goes to the event loop `bind` gave it
    where it must: the journal lives there)."""

    def bind(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def chunk_targets(self, head: ch.ChunkHead, peer: str) -> Any: ...

    def verify_and_write(self, head: ch.ChunkHead, body: memoryview, targets: Any,
                         body_blake3: str | None = None) -> None:
        """`body_blake3`: the body's hash, computed as it arrived (None: hash it here)."""

    def chunk_landed(self, head: ch.ChunkHead, peer: str, targets: Any) -> None:
        """Booked (journaled) when it returns: the receipt may go."""


class PassingChunk(Protocol):
    """A chunk a sink passes on as it arrives (`cut_through`): `receive` takes its body off
    the channel (in the channel's thread), `answer_later` sends the receipt when it is known."""

    def receive(self, sock: socket.socket) -> None: ...

    def answer_later(self, answer: Callable[[ch.ReceiptStatus, str], None]) -> None: ...


class DataListener:
    """Accepts data channels from peers on its own port (`data_listen`; the peers learn it over
    the control plane) and receives their chunks in threads."""

    def __init__(
        self,
        *,
        site: str,
        keys: Keys,
        peers: Mapping[str, CongestionControl],
        sink: ChunkSink,
        buffers: AlignedBuffers,
        metrics: Metrics,
        workers: concurrent.futures.Executor,
        ssl_context: ssl.SSLContext | None = None,
        on_peer: Callable[[str], None] | None = None,
    ) -> None:
        self.site = site
        # Called on the event loop when a peer opens a channel here: it is up, so channels to
        # it can be opened now too.
        self.on_peer = on_peer
        self.keys = keys
        self.peers = dict(peers)
        self.sink = sink
        self.buffers = buffers
        self.metrics = metrics
        self.workers = workers
        self.ssl_context = ssl_context
        self.port = 0
        self._server: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._accepter: threading.Thread | None = None
        # A sink that passes some chunks on as they arrive (a relay) says so per chunk header.
        self._cut_through: Callable[[ch.ChunkHead, str], PassingChunk | None] | None = getattr(
            sink, "cut_through", None)

    def start(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> int:
        self._loop = loop
        self.sink.bind(loop)
        server = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._server = server
        self.port = server.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name="channel-accept",
                                          daemon=True)
        self._accepter.start()
        return self.port

    def close(self) -> None:
        with self._lock:
            self._closing = True
            conns = list(self._conns)
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._accepter is not None:
            self._accepter.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._server is not None
        restore_base_priority()  # started by the real-time loop: its threads start at nice 0
        while True:
            try:
                conn, _addr = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="channel-in",
                             daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        lower_thread_priority()
        sock: socket.socket = raw
        peer = "?"  # until the opening names it
        try:
            raw.settimeout(OPEN_TIMEOUT_S)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(raw, server_side=True)
            peer, session = self._open(sock)
            sock.settimeout(None)
            if self.on_peer is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self.on_peer, peer)
            self._receive(sock, peer, session)
        except AuthError as exc:
            # A bad opening proof (a replayed or forged opening), or a frame failing its MAC.
            self.metrics.auth_failures.labels("data channel").inc()
            log.warning("auth.refused", extra={"fields": {"path": "data channel",
                                                          "error": exc.message}})
        except ProtocolError as exc:
            # A frame out of bounds (oversize, unknown kind, replayed sequence number): nothing
            # of it was staged; the channel goes, the sender's chunks go on another one.
            self.metrics.channels_refused.labels(peer).inc()
            log.warning("channel.refused", extra={"fields": {"from": peer,
                                                             "error": exc.message[:200]}})
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.info("channel.closed", extra={"fields": {"error": f"{type(exc).__name__}: "
                                                                  f"{exc}"[:200]}})
        except Exception as exc:  # a bug must cost this channel, never the daemon
            self.metrics.channels_refused.labels(peer).inc()
            log.exception("channel.failed", extra={"fields": {
                "from": peer, "error": f"{type(exc).__name__}: {exc}"[:200]}})
        finally:
            with self._lock:
                self._conns.discard(raw)
            with contextlib.suppress(OSError):
                sock.close()

    def _open(self, sock: socket.socket) -> tuple[str, ch.Session]:
        n_src, n_dst, client_nonce = ch.decode_hello(_read(sock, ch.HELLO_FIXED.size))
        said = ch.hello_sites(n_src, _read(sock, n_src + n_dst), client_nonce)
        if said.dest != self.site:
            raise AuthError(f"data channel addressed to {said.dest!r}, not this site")
        if said.source not in self.peers:
            raise AuthError(f"site {said.source!r} is not a peer of this site")
        secret = self.keys.secret_for(said.source)
        server_nonce = ch.challenge()
        sock.sendall(server_nonce)
        ch.check_proof(secret, said, server_nonce, _read(sock, ch.PROOF_BYTES))
        sock.sendall(ch.accept_frame(secret, said, server_nonce))
        _tune(sock, self.peers[said.source])
        return said.source, ch.Session.derive(secret, said, server_nonce)

    def _receive(self, sock: socket.socket, peer: str, session: ch.Session) -> None:
        seqs = ch.SeqGuard()
        send_lock = threading.Lock()
        fixed = bytearray(ch.CHUNK_FIXED.size)
        while _recv_exact(sock, memoryview(fixed)):
            partial, rest_len = ch.decode_chunk_head(bytes(fixed))
            head = ch.finish_chunk_head(session, partial, _read(sock, rest_len))
            seqs.check(head.seq)
            # A one-pass chunk is never cut through: its address is known only at its end.
            passing = (self._cut_through(head, peer)
                       if self._cut_through is not None and not head.trailed else None)
            if passing is not None:
                # A relayed chunk: its bytes go on to the next hop as they arrive (`net.relay`).
                passing.receive(sock)
                self.workers.submit(self._passed, sock, send_lock, session, peer, head, passing)
                continue
            pooled = head.body_length <= self.buffers.buffer_bytes
            buf = self.buffers.acquire() if pooled else mmap.mmap(-1, head.body_length)
            assert buf is not None
            view = memoryview(buf)[: head.body_length]
            try:
                body_blake3 = _recv_hashed(sock, view)
                if body_blake3 is None:
                    raise ConnectionError("data channel closed before a chunk body")
                if head.trailed:
                    # Its address, bound to this header: then `_land` checks the body
                    # against it as for any chunk (DAMAGED, nothing written, if it differs).
                    head = ch.check_trailer(session, head, _read(sock, ch.TRAILER_BYTES))
            except BaseException:
                view.release()
                self._give_back(buf, pooled)
                raise
            self.workers.submit(self._land, sock, send_lock, session, peer, head, buf, view,
                                pooled, body_blake3)

    def _give_back(self, buf: mmap.mmap, pooled: bool) -> None:
        if pooled:
            self.buffers.release(buf)
        else:
            buf.close()

    def _land(self, sock: socket.socket, send_lock: threading.Lock, session: ch.Session,
              peer: str, head: ch.ChunkHead, buf: mmap.mmap, view: memoryview,
              pooled: bool, body_blake3: str) -> None:
        """Worker thread: check where the chunk goes, verify (against the hash taken as it
        arrived) and stage it, book it (the sink's journal), answer."""
        status, reason = ch.ReceiptStatus.OK, ""
        try:
            targets = self.sink.chunk_targets(head, peer)
            self.sink.verify_and_write(head, view, targets, body_blake3)
            self.sink.chunk_landed(head, peer, targets)
        except IntegrityError as exc:
            status, reason = ch.ReceiptStatus.DAMAGED, exc.message
            self.metrics.integrity_failures.labels(peer, "receiver").inc()
        except StorageError as exc:
            status, reason = ch.ReceiptStatus.STORAGE, exc.message
        except (ProtocolError, PolicyViolation, AuthError) as exc:
            status, reason = ch.ReceiptStatus.REFUSED, exc.message
        except Exception as exc:  # a bug: this chunk is refused, the channel and daemon go on
            status, reason = ch.ReceiptStatus.REFUSED, f"{type(exc).__name__}: {exc}"
            log.exception("chunk.failed", extra={"fields": {"from": peer}})
        finally:
            view.release()
            self._give_back(buf, pooled)
        _answer(sock, send_lock, session, peer, head, status, reason)

    def _passed(self, sock: socket.socket, send_lock: threading.Lock, session: ch.Session,
                peer: str, head: ch.ChunkHead, passing: PassingChunk) -> None:
        """Worker thread: a chunk passed on as it arrived is booked, then answered when the
        next hop answers it (or at once if it could not be passed on)."""
        with contextlib.suppress(TransferdError):
            self.sink.chunk_landed(head, peer, passing)
        passing.answer_later(functools.partial(_answer, sock, send_lock, session, peer, head))


def _answer(sock: socket.socket, send_lock: threading.Lock, session: ch.Session, peer: str,
            head: ch.ChunkHead, status: ch.ReceiptStatus, reason: str) -> None:
    """The receipt of one chunk, on the channel it came on."""
    if status is not ch.ReceiptStatus.OK:
        log.warning("chunk.refused", extra={"fields": {
            "from": peer, "upload": head.upload[:128], "status": status.name,
            "error": reason[:200]}})
    frame = ch.encode_receipt(session, ch.Receipt(head.seq, status, reason))
    with send_lock, contextlib.suppress(OSError):
        sock.sendall(frame)
