"""The framed peer hop's two ends (`protocol.message_hop` has the frames, the opening and why):
`HopLink`, this daemon's connection to one peer, kept open by `keep()` in the message
service's TaskGroup; and `HopServer`, which takes an authenticated Upgrade request over from
aiohttp and serves that connection with a plain asyncio protocol.

The hop carries what the HTTP path carries, nothing less: the receiver hands each SEND to
`MessageService.receive` (the ledger, the inbox and its hook, the late flag), and answers its
MessageAck or its error; the sender books the answer exactly as an HTTP one (deadlines, budget
misses, the retry). When the hop is not up (the peer is older and does not know the route, or
the connection broke and is being opened again) the sender uses the HTTP path, and says so in
the log once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from transferd.errors import (
    AuthError,
    ProtocolError,
    TransferdError,
    TransportError,
)
from transferd.net.framed import FramedConnection
from transferd.net.peer_client import PeerLink
from transferd.protocol import channel as ch
from transferd.protocol import message_hop as mh
from transferd.protocol import message_socket as ms
from transferd.protocol.auth import EMPTY_BODY_BLAKE3, Keys, sign_headers
from transferd.protocol.backoff import backoff_delays
from transferd.protocol.messages import MessageAck, MessageEnvelope
from transferd.protocol.wire import MESSAGE_HOP_ROUTE, check_reply, parse_body, to_body
from transferd.site.metrics import Metrics

__all__ = ["HopConnection", "HopLink", "HopServer", "HopUnsupported", "deliver"]

log = logging.getLogger("transferd.messages")

OPEN_TIMEOUT_S = 10.0  # TCP (+TLS), the Upgrade and its answer
RECHECK_S = 300.0  # an older peer is asked again this often (it may have been upgraded)
REOPEN_BUDGET_S = 3600.0 * 24 * 365  # a broken hop is opened again for as long as we run
REOPEN_MAX_S = 2.0  # ... at most this far apart
AUTH_RETRY_S = 10.0  # after the peer refused the opening's authentication
# A hop that stayed up this long (or answered a message) was healthy: its next reopening
# starts the backoff afresh. One that the peer drops at once keeps backing off.
STABLE_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0  # the receiver's wait for AUTH after its 101
MAX_OUTSTANDING_BYTES = 64 << 20  # bodies in progress per connection before reading pauses
# A hop with messages in flight that hears nothing for this long (a PING went out half-way) is
# taken for dead: at least 1 s, so its messages still go again on HTTP inside the 2 s retry
# budget (MessageService.retry_budget_s), and a few round trips on a long path.
WATCHDOG_MIN_S = 1.0
WATCHDOG_RTTS = 4
IDLE_PING_S = 15.0  # an idle hop is pinged this often (a NAT drops idle flows after minutes)
# Unacknowledged bytes older than this end the connection in the kernel (Linux).
TCP_USER_TIMEOUT_MS = 10_000


class HopUnsupported(TransferdError):
    """The peer answered the Upgrade with an HTTP status instead of 101 (an older daemon)."""


def _nonce_of(query: str) -> bytes:
    try:
        nonce = bytes.fromhex(query)
    except ValueError:
        nonce = b""
    if len(nonce) != ch.NONCE_BYTES:
        raise ProtocolError("message hop: nonce must be 32 hex digits")
    return nonce


# ---- the sending end ---------------------------------------------------------------------------


class HopConnection(asyncio.Protocol):
    """One open hop to a peer: `request` writes a SEND and returns the future of its reply."""

    def __init__(self, peer: str, watchdog_s: float = WATCHDOG_MIN_S) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.head = self.loop.create_future()  # the Upgrade's answer
        self.closed = self.loop.create_future()  # why it closed (str)
        self.watchdog_s = watchdog_s
        self.quiet_since = self.loop.time()  # the last byte from the peer, or the first wait
        self.pings: set[int] = set()  # PINGs not answered yet
        self._watch: asyncio.TimerHandle | None = None
        self._watch_due = 0.0
        self.session: ch.Session | None = None
        self._buf = b""
        self.reader = ms.FrameReader(name="message hop")
        self.seqs = ch.SeqGuard()
        self.next_seq = 1
        self.pending: dict[int, asyncio.Future[mh.HopReply]] = {}
        self.answered = False  # the peer answered a message here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a peer that vanished without a FIN is noticed
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                    TCP_USER_TIMEOUT_MS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        reason = f"closed: {exc}" if exc is not None else "closed by the peer"
        self._fail_all(TransportError(f"{self.peer}: message hop {reason}", peer=self.peer))
        if not self.head.done():
            self.head.set_exception(TransportError(f"{self.peer}: message hop {reason}",
                                                   peer=self.peer))
        if not self.closed.done():
            self.closed.set_result(reason)

    def _fail_all(self, exc: TransferdError) -> None:
        """Fail the messages in flight as the network failing, whatever closed the hop (a
        refused frame, the peer's ERROR(0), a timeout): transient, so `retrying` sends each
        again on the HTTP path; the peer's ledger answers a message it already stored."""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        closed = exc if isinstance(exc, TransportError) and exc.transient else TransportError(
            f"{self.peer}: message hop closed: {exc.message}", peer=self.peer)
        for future in pending.values():
            if not future.done():
                future.set_exception(closed)

    def close(self, exc: TransferdError) -> None:
        self._disarm()
        self._fail_all(exc)
        if not self.head.done():  # an opening given up: nobody will read its answer
            self.head.cancel()
        if not self.closed.done():
            self.closed.set_result(exc.message)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.quiet_since = self.loop.time()
        try:
            if self.session is None:
                if self.head.done():
                    raise ProtocolError("message hop: frames before the opening finished")
                self._buf += data
                answer = mh.parse_response_head(self._buf)
                if answer is not None:
                    self._buf = b""
                    self.head.set_result(answer)
                return
            for kind, payload in self.reader.feed(data):
                self._reply(kind, payload)
        except TransferdError as exc:
            if not self.head.done():
                self.head.set_exception(exc)
            log.warning("message.hop_refused", extra={"fields": {
                "peer": self.peer, "error": exc.message[:200]}})
            self.close(exc)

    def _reply(self, kind: ms.Frame, payload: bytes) -> None:
        assert self.session is not None
        reply = mh.decode_reply(self.session, kind, payload)
        self.seqs.check(reply.seq)
        if reply.request_seq == 0:  # about the connection: the peer closes it
            check_reply(reply.status, reply.body, (), self.peer)
        if reply.request_seq in self.pings:
            self.pings.discard(reply.request_seq)
            return
        future = self.pending.pop(reply.request_seq, None)
        if future is None:
            raise ProtocolError(f"message hop: reply to {reply.request_seq}, not in flight")
        self.answered = True
        if not future.done():
            future.set_result(reply)

    def authenticated(self, session: ch.Session, proof: bytes, after_head: bytes) -> None:
        assert self.transport is not None
        self.session = session
        self.transport.write(ms.encode_frame(ms.Frame.AUTH, proof))
        if after_head:
            self.data_received(after_head)

    def request(self, envelope: MessageEnvelope, body: bytes) -> asyncio.Future[mh.HopReply]:
        if self.session is None or self.transport is None or self.transport.is_closing():
            raise TransportError(f"{self.peer}: message hop closed", peer=self.peer)
        seq = self.next_seq
        # Encoded first: a SEND that cannot be encoded leaves nothing awaited behind it.
        frame = mh.encode_send(self.session, seq, mh.envelope_json(envelope), body)
        self.next_seq += 1
        future: asyncio.Future[mh.HopReply] = self.loop.create_future()
        self._awaiting()
        self.pending[seq] = future
        self.transport.write(frame)
        return future

    def ping(self) -> None:
        """Ask the peer to answer (at most one PING in flight); the watchdog closes the hop
        when nothing comes back."""
        if (self.pings or self.session is None or self.transport is None
                or self.transport.is_closing()):
            return
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self._awaiting()
        self.pings.add(seq)
        self.transport.write(mh.encode_ping(self.session, seq))

    # The watchdog: while anything is awaited from the peer, a timer every quarter of
    # `watchdog_s` looks at how long the peer has been silent: a PING at half, closed at whole.

    def _awaiting(self) -> None:
        if not self.pending and not self.pings:  # silence counts from now, not from idle
            self.quiet_since = self.loop.time()
        if self._watch is None:
            self._arm()

    def _arm(self) -> None:
        step = self.watchdog_s / 4
        self._watch_due = self.loop.time() + step
        self._watch = self.loop.call_at(self._watch_due, self._check)

    def _disarm(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check(self) -> None:
        self._watch = None
        if self.closed.done() or (not self.pending and not self.pings):
            return
        now = self.loop.time()
        if now - self._watch_due > self.watchdog_s / 4:
            # This loop itself stalled: the peer's answer may be unread in the socket. Let
            # the loop read first, and judge on the next turn.
            self._arm()
            return
        silent_s = now - self.quiet_since
        if silent_s >= self.watchdog_s:
            log.warning("message.hop_silent", extra={"fields": {
                "peer": self.peer, "silent_s": round(silent_s, 3),
                "in_flight": len(self.pending)}})
            self.close(TransportError(f"{self.peer}: message hop silent for {silent_s:.1f} s "
                                      "with requests in flight", peer=self.peer))
            return
        if silent_s >= self.watchdog_s / 2:
            self.ping()
        self._arm()


class HopLink:
    """This daemon's hop to one peer: `keep()` opens it and opens it again when it breaks;
    `connection()` is the open hop, or None (then the message goes on the HTTP path)."""

    def __init__(self, link: PeerLink, *, clock: Callable[[], float] = time.time,
                 open_timeout_s: float = OPEN_TIMEOUT_S, recheck_s: float = RECHECK_S) -> None:
        self.link = link
        self.peer = link.peer
        self.clock = clock
        self.open_timeout_s = open_timeout_s
        self.recheck_s = recheck_s
        self.idle_ping_s = IDLE_PING_S
        self.conn: HopConnection | None = None
        self.up = asyncio.Event()
        self.settled = asyncio.Event()  # the first opening ended (up, down or unsupported)
        self._poked = asyncio.Event()
        self.state = "opening"  # up | down | unsupported: what the log said last

    def poke(self) -> None:
        """The peer is up (it opened its own hop or a data channel here): a hop that is down
        is opened again now, not after its backoff (daemons rarely start together)."""
        if self.connection() is None:
            self._poked.set()

    async def _pause(self, delay_s: float) -> None:
        """Wait `delay_s`, or until poked (since the last pause: a poke during an opening
        that failed counts)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._poked.wait()
        self._poked.clear()

    def connection(self) -> HopConnection | None:
        conn = self.conn
        if conn is None or conn.closed.done():
            return None
        return conn

    def _say(self, state: str, **fields: object) -> None:
        self.settled.set()
        if state == self.state:
            return
        self.state = state
        level = logging.INFO if state == "up" else logging.WARNING
        event = {"up": "message.hop_up", "down": "message.hop_down",
                 "unsupported": "message.hop_unsupported"}[state]
        then = "" if state == "up" else "messages go over HTTP until it is back"
        log.log(level, event, extra={"fields": {"peer": self.peer, **fields,
                                                **({"fallback": then} if then else {})}})

    async def keep(self) -> None:
        """Until cancelled: open the hop, wait for it to close, open it again."""
        delays = backoff_delays(REOPEN_BUDGET_S, first_s=0.1, cap_s=REOPEN_MAX_S)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.open_timeout_s):
                        conn = await self.open()
                except HopUnsupported as exc:
                    self._say("unsupported", error=exc.message[:200])
                    await self._pause(self.recheck_s)  # a poke (the peer restarted) ends it
                    continue
                except AuthError as exc:
                    # A pair secret that differs (or B's restart refusal): asked again more
                    # slowly than a network failure, each try being an auth failure at B.
                    self._say("down", error=exc.message[:200])
                    await self._pause(AUTH_RETRY_S)
                    continue
                except TimeoutError:
                    self._say("down", error=f"not open within {self.open_timeout_s:g} s")
                    await self._pause(next(delays, REOPEN_MAX_S))
                    continue
                except TransferdError as exc:
                    self._say("down", error=exc.message[:200])
                    await self._pause(next(delays, REOPEN_MAX_S))
                    continue
                except Exception as exc:
                    # A bug in an opening must not end the daemon's TaskGroup: the hop is
                    # down (messages go over HTTP) and is tried again.
                    log.exception("message.hop_open_failed",
                                  extra={"fields": {"peer": self.peer}})
                    self._say("down", error=f"internal error: {type(exc).__name__}: {exc}"[:200])
                    await self._pause(next(delays, REOPEN_MAX_S))
                    continue
                self.conn = conn
                self.up.set()
                self._say("up")
                up_at = conn.loop.time()
                reason = await self._watch_idle(conn)
                if conn.answered or conn.loop.time() - up_at >= STABLE_S:
                    delays = backoff_delays(REOPEN_BUDGET_S, first_s=0.1, cap_s=REOPEN_MAX_S)
                self.up.clear()
                self.conn = None
                self._say("down", error=str(reason)[:200])
                await self._pause(next(delays, REOPEN_MAX_S))
        finally:
            self.up.clear()
            if self.conn is not None:
                self.conn.close(TransportError("the daemon is stopping"))
                self.conn = None

    async def _watch_idle(self, conn: HopConnection) -> str:
        """Until the hop closes (its reason): pinged every `idle_ping_s`, so a hop whose peer
        went away while it was idle is found dead before a message waits on it."""
        while True:
            done, _ = await asyncio.wait({conn.closed}, timeout=self.idle_ping_s)
            if done:
                return str(conn.closed.result())
            conn.ping()

    async def open(self) -> HopConnection:
        """Connect, Upgrade (signed), check the peer's proof, send ours: an open hop.
        HopUnsupported for a peer that answers with a plain HTTP status (an older daemon)."""
        link = self.link
        split = urllib.parse.urlsplit(link.url)
        host = split.hostname or "127.0.0.1"
        port = split.port or (443 if split.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await loop.create_connection(
                lambda: HopConnection(self.peer), host, port,
                ssl=link.tls if split.scheme == "https" else None,
                server_hostname=host if split.scheme == "https" else None)
        except OSError as exc:
            raise TransportError(f"{self.peer}: message hop to {host}:{port}: "
                                 f"{exc.strerror or exc}", peer=self.peer) from exc
        try:
            return await self._upgrade(conn, split.netloc)
        except BaseException:
            conn.close(TransportError("opening failed"))
            raise

    async def _upgrade(self, conn: HopConnection, netloc: str) -> HopConnection:
        assert conn.transport is not None
        link = self.link
        secret = link.keys.secret_for(self.peer)
        said, _frame = ch.hello(link.site, self.peer)
        path_qs = f"{MESSAGE_HOP_ROUTE}?nonce={said.client_nonce.hex()}"
        signed = sign_headers(secret, method="GET", path_qs=path_qs,
                              body_blake3=EMPTY_BODY_BLAKE3, src=link.site, dst=self.peer,
                              now=self.clock())
        sent_at = conn.loop.time()
        conn.transport.write(mh.upgrade_request(netloc, path_qs, signed))
        answer = await conn.head
        conn.watchdog_s = max(WATCHDOG_MIN_S, WATCHDOG_RTTS * (conn.loop.time() - sent_at))
        if answer.status != 101:
            if answer.status in (401, 403):
                raise AuthError(f"{self.peer} refused the message hop (HTTP {answer.status})",
                                status=answer.status)
            if answer.status in (404, 405):  # no such route: a daemon from before the hop
                raise HopUnsupported(f"{self.peer} answered the message hop's Upgrade with "
                                     f"HTTP {answer.status} (an older daemon?)", peer=self.peer)
            # 5xx (stopping, overloaded, a proxy's 502) and the rest: down, tried again soon.
            raise TransportError(f"{self.peer} answered the message hop's Upgrade with HTTP "
                                 f"{answer.status}", peer=self.peer)
        if answer.headers.get("upgrade", "").lower() != mh.UPGRADE:
            raise HopUnsupported(f"{self.peer} switched to another protocol", peer=self.peer)
        try:
            server_nonce = bytes.fromhex(answer.headers.get(mh.H_CHALLENGE.lower(), ""))
            accept = bytes.fromhex(answer.headers.get(mh.H_ACCEPT.lower(), ""))
        except ValueError:
            raise ProtocolError("message hop: malformed challenge") from None
        if len(server_nonce) != ch.NONCE_BYTES or len(accept) != ch.ACCEPT_BYTES:
            raise ProtocolError("message hop: malformed challenge")
        ch.check_accept(secret, said, server_nonce, accept)  # the peer holds the pair secret
        conn.authenticated(ch.Session.derive(secret, said, server_nonce),
                           ch.proof(secret, said, server_nonce), answer.body_start)
        return conn


# ---- the receiving end -------------------------------------------------------------------------


Receive = Callable[[str, MessageEnvelope, bytes], Awaitable[MessageAck]]  # MessageService.receive


class HopServer:
    """Serves hops from peers on the daemon's HTTP port; `serve` is the route's handler, after
    the Upgrade request's signature was checked (`source`: the peer it names)."""

    def __init__(self, site: str, keys: Keys, receive: Receive, metrics: Metrics, *,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 on_peer: Callable[[str], None] | None = None) -> None:
        self.site = site
        self.on_peer = on_peer  # a peer opened its hop here: it is up
        self.keys = keys
        self.receive = receive
        self.metrics = metrics
        self.handshake_timeout_s = handshake_timeout_s
        self.connections: set[_HopServing] = set()
        self._closed = False

    async def serve(self, request: web.Request, source: str) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != mh.UPGRADE:
            raise ProtocolError(f"message hop: Upgrade: {mh.UPGRADE} expected")
        if self._closed:
            raise TransportError("the daemon is stopping")
        said = ch.Hello(source, self.site, _nonce_of(request.query.get("nonce", "")))
        secret = self.keys.secret_for(source)
        server_nonce = ch.challenge()
        transport = request.transport
        if transport is None:
            raise TransportError("message hop: connection gone")
        serving = _HopServing(self, source, cast(asyncio.Transport, transport), said, secret,
                              server_nonce, request.protocol)
        response = web.StreamResponse(status=101, headers={
            "Upgrade": mh.UPGRADE, "Connection": "Upgrade",
            mh.H_CHALLENGE: server_nonce.hex(),
            mh.H_ACCEPT: ch.accept_frame(secret, said, server_nonce).hex()})
        # From here the connection is the hop's: aiohttp's protocol object hears nothing more.
        serving.transport.set_protocol(serving)
        self.connections.add(serving)
        try:
            await response.prepare(request)
            await response.write_eof()  # the head goes out now (a 101 has no body)
            async with asyncio.TaskGroup() as tg:
                serving.tg = tg
                serving.start()
                if self.on_peer is not None:
                    self.on_peer(source)
                # Messages already read finish their `receive` (into the inbox) even when
                # the connection closes under them, as an HTTP handler does.
                await serving.closed
        finally:
            self.connections.discard(serving)
            serving.transport.close()
        return response

    def close(self) -> None:
        """Drop every hop (the daemon is stopping; the peers fall back to HTTP): aborted, as
        replies a peer does not read must not hold the daemon's stop."""
        self._closed = True
        for serving in list(self.connections):
            serving.abort()

    def authenticated(self, serving: _HopServing) -> None:
        """One hop per peer: an older one from the same peer is dropped (the peer opened this
        one because it gave that up, or that one's path is dead)."""
        for other in list(self.connections):
            if other is not serving and other.source == serving.source:
                log.info("message.hop_replaced", extra={"fields": {"from": serving.source}})
                other.abort()

    def refused(self, exc: TransferdError, source: str) -> None:
        if isinstance(exc, AuthError):
            self.metrics.auth_failures.labels("message hop").inc()
        log.warning("auth.refused" if isinstance(exc, AuthError) else "request.refused",
                    extra={"fields": {"path": "message-hop", "from": source, "kind": exc.kind,
                                      "error": exc.message[:200]}})


class _HopServing(FramedConnection):
    """One peer's hop here: AUTH first, then SENDs (and PINGs), each answered when received.
    The handshake deadline, flow control (reading paused while the messages in progress hold
    MAX_OUTSTANDING_BYTES or the peer does not read its replies) and refusing are the
    message socket's (`net.framed`)."""

    what = "message hop"

    def __init__(self, server: HopServer, source: str, transport: asyncio.Transport,
                 said: ch.Hello, secret: bytes, server_nonce: bytes,
                 http_protocol: asyncio.BaseProtocol) -> None:
        super().__init__(handshake_timeout_s=server.handshake_timeout_s,
                         max_outstanding_bytes=MAX_OUTSTANDING_BYTES)
        self.server = server
        # aiohttp's protocol for this connection: told when it closes (its server's books).
        self.http_protocol = http_protocol
        self.source = source
        self.transport = transport
        self.said = said
        self.secret = secret
        self.server_nonce = server_nonce
        self.session = ch.Session.derive(secret, said, server_nonce)
        self.reader = ms.FrameReader(ms.HANDSHAKE_FRAME_BYTES, name="message hop")
        self.authenticated = False
        self.seqs = ch.SeqGuard()
        self.reply_seq = 0
        self.closed = asyncio.get_running_loop().create_future()
        self.tg: asyncio.TaskGroup | None = None
        self.early: list[tuple[int, MessageEnvelope, bytes]] = []

    def start(self) -> None:
        if not self.authenticated:
            self.arm_handshake()
        early, self.early = self.early, []
        for seq, envelope, body in early:
            self._spawn(seq, envelope, body)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)
        self.http_protocol.connection_lost(exc)

    def error_frame(self, request_id: int, exc: TransferdError) -> bytes:
        return self._reply_frame(request_id, exc.http_status,
                                 json.dumps(exc.to_json()).encode(), True)

    def refused(self, exc: TransferdError) -> None:
        self.server.refused(exc, self.source)

    def _reply_frame(self, request_seq: int, status: int, body: bytes, error: bool) -> bytes:
        self.reply_seq += 1
        return mh.encode_reply(self.session, self.reply_seq, request_seq, status, body,
                               error=error)

    def _write_reply(self, request_seq: int, status: int, body: bytes, error: bool) -> None:
        if not self.transport.is_closing():
            self.write(self._reply_frame(request_seq, status, body, error))

    def data_received(self, data: bytes) -> None:
        try:
            # AUTH alone first: the SENDs pipelined behind it in the same read are checked
            # against the frame limit AUTH raises, not the handshake's.
            while not self.authenticated:
                first = self.reader.feed(data, max_frames=1)
                data = b""
                if not first:
                    return
                self._frame(*first[0])
            for kind, payload in self.reader.feed(data):
                self._frame(kind, payload)
        except TransferdError as exc:
            self.fail(exc)

    def _frame(self, kind: ms.Frame, payload: bytes) -> None:
        if not self.authenticated:
            if kind is not ms.Frame.AUTH:
                raise ProtocolError(f"message hop: {kind.name} frame before AUTH")
            ch.check_proof(self.secret, self.said, self.server_nonce, payload)
            self.authenticated = True
            self.reader.max_bytes = mh.HOP_MAX_FRAME_BYTES  # larger bodies go over HTTP
            self.handshake_done()
            self.server.authenticated(self)
            return
        if kind is ms.Frame.PING:
            seq = mh.decode_ping(self.session, payload)
            self.seqs.check(seq)
            self._write_reply(seq, 204, b"", False)
            return
        if kind is not ms.Frame.SEND:
            raise ProtocolError(f"message hop: {kind.name} frame where a SEND was expected")
        send = mh.decode_send(self.session, payload)
        self.seqs.check(send.seq)
        try:
            if len(send.body) > mh.HOP_MAX_BODY_BYTES:
                raise ProtocolError(f"message hop: body of {len(send.body)} bytes exceeds "
                                    f"{mh.HOP_MAX_BODY_BYTES} (larger messages go over HTTP)")
            envelope = mh.parse_envelope(send.envelope_json)
        except ProtocolError as exc:
            self.server.refused(exc, self.source)
            self._write_reply(send.seq, exc.http_status, json.dumps(exc.to_json()).encode(),
                              True)
            return
        if self.tg is None:
            self.early.append((send.seq, envelope, send.body))
        else:
            self._spawn(send.seq, envelope, send.body)

    def _spawn(self, seq: int, envelope: MessageEnvelope, body: bytes) -> None:
        assert self.tg is not None
        self.tg.create_task(self._answer(seq, envelope, body))
        self.took(len(body))

    async def _answer(self, seq: int, envelope: MessageEnvelope, body: bytes) -> None:
        try:
            try:
                ack = await self.server.receive(self.source, envelope, body)
            except TransferdError:
                raise
            except Exception as exc:  # one message's bug must not end the hop
                log.exception("message_hop.request_failed")
                raise TransferdError(f"internal error: {type(exc).__name__}") from exc
        except TransferdError as exc:
            self.server.refused(exc, self.source)
            self._write_reply(seq, exc.http_status, json.dumps(exc.to_json()).encode(), True)
        else:
            self._write_reply(seq, 200, to_body(ack), False)
        finally:
            self.finished(len(body))


async def deliver(conn: HopConnection, envelope: MessageEnvelope, body: bytes) -> MessageAck:
    """One message over an open hop: its MessageAck, or the peer's error (rebuilt, as the
    HTTP path's `check_reply` does), or TransportError when the hop closes first."""
    reply = await conn.request(envelope, body)
    check_reply(reply.status, reply.body, () if reply.error else (200,), conn.peer)
    return parse_body(MessageAck, reply.body)

