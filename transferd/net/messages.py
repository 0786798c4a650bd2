"""The message service: sends small objects to peers through their schedulers and keeps the
inbox of received ones (the wire format and its rules are `protocol.messages`).

Sends go through the peer's `SchedulerPump` (control strict, interactive earliest-deadline-first;
the pump the daemon's bulk path shares) and out over the framed peer hop (`net.message_hop`:
one long-lived connection per peer, interactive messages up to `HOP_MAX_BODY_BYTES`) when it
is open, else over the peer client (`PeerLink`: the pair's signatures, one connection pool per
class); either way with the one retry with backoff. A message that cannot
meet its deadline is counted and logged as a budget miss with the reason and still delivered;
one that reaches the peer after its deadline comes back flagged `late`. `run()` holds every
worker, the pool warmer and the inbox hook in one TaskGroup, which the daemon owns.
`MessageSocketServer` is the light local path into `send` (`protocol.message_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from netplan.plan import TrafficClass
from transferd.errors import (
    AuthError,
    ConfigError,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
)
from transferd.net import message_hop
from transferd.net.bulk_priority import interactive_seen, interactive_traffic
from transferd.net.framed import FramedConnection
from transferd.net.loop_lag import work_seen
from transferd.net.message_hop import HopLink
from transferd.net.peer_client import INTERACTIVE_POOL, PeerLink, retrying
from transferd.net.pump import SchedulerPump
from transferd.protocol import message_socket as ms
from transferd.protocol.local_api import SiteName
from transferd.protocol.message_hop import HOP_MAX_BODY_BYTES
from transferd.protocol.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_CLASSES,
    InboxMessage,
    MessageAck,
    MessageEnvelope,
    MessageLedger,
    MessageQuery,
    MessageReceipt,
    late_reason,
)
from transferd.protocol.sched import BudgetMiss, ClassScheduler
from transferd.protocol.wire import PEER_MESSAGES_ROUTE, parse_body, to_body
from transferd.site.metrics import Metrics

__all__ = ["Inbox", "MessageService", "MessageSocketServer", "message_socket_path"]

log = logging.getLogger("transferd.messages")


def _trace(event: str, message_id: str, at: float, **fields: float) -> None:
    """A message's time at one stage (Unix time, us), at debug level only: the benchmark's
    `benchmarks.message_trace` joins both daemons' lines and the client's by message id."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(event, extra={"fields": {"id": message_id, "t": round(at, 6), **{
            k: round(v, 6) for k, v in fields.items()}}})


class Inbox:
    """Received messages waiting for a local consumer; bounded so a silent consumer cannot
    exhaust memory (a full inbox refuses new messages, and the sender reports the miss)."""

    def __init__(self, max_messages: int = 10_000, max_bytes: int = 256 << 20) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._messages: deque[InboxMessage] = deque()
        self._bytes = 0
        self._arrived = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._messages)

    async def put(self, message: InboxMessage) -> None:
        async with self._arrived:
            if (
                len(self._messages) >= self.max_messages
                or self._bytes + len(message.body) > self.max_bytes
            ):
                raise StorageError(
                    f"inbox full ({len(self._messages)} messages, {self._bytes} bytes)"
                )
            self._messages.append(message)
            self._bytes += len(message.body)
            self._arrived.notify_all()

    async def get(self, wait_s: float, max_messages: int) -> list[InboxMessage]:
        """Up to `max_messages`, waiting up to `wait_s` for the first one."""
        async with self._arrived:
            if not self._messages and wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._arrived.wait_for(lambda: bool(self._messages))
                except TimeoutError:
                    pass
            out: list[InboxMessage] = []
            while self._messages and len(out) < max_messages:
                message = self._messages.popleft()
                self._bytes -= len(message.body)
                out.append(message)
            return out


@dataclass(eq=False)
class _Outgoing:
    envelope: MessageEnvelope
    peer: str
    body: bytes
    done: asyncio.Future[MessageReceipt]
    miss_reason: str | None = None

    @property
    def traffic_class(self) -> TrafficClass:
        return self.envelope.traffic_class


class MessageService:
    def __init__(
        self,
        site: str,
        links: Mapping[str, PeerLink],
        metrics: Metrics,
        *,
        pumps: Mapping[str, SchedulerPump[object]] | None = None,
        inbox: Inbox | None = None,
        hook_command: Sequence[str] | None = None,
        workers: Mapping[TrafficClass, int] | None = None,
        default_deadline_ms: float = 1000.0,
        request_timeout_s: float = 30.0,
        retry_budget_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        warm_interval_s: float | None = 30.0,
        framed_hop: bool = True,
    ) -> None:
        self.site = site
        self.links = dict(links)
        self.metrics = metrics
        self.inbox = Inbox() if inbox is None else inbox
        self.hook_command = list(hook_command) if hook_command else None
        # One worker per connection the interactive pool may open (see INTERACTIVE_POOL).
        self.workers = {
            TrafficClass.CONTROL: 2,
            TrafficClass.INTERACTIVE: INTERACTIVE_POOL,
            **(workers or {}),
        }
        self.default_deadline_ms = default_deadline_ms
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self.clock = clock
        # Interactive connections are opened ahead of the first message and kept open, so a
        # message does not pay a TCP (and TLS) handshake, a round trip or more, on top of its own.
        self.warm_interval_s = warm_interval_s
        self.ledger = MessageLedger()
        self._pumps: dict[str, SchedulerPump[object]] = dict(pumps or {})
        self._hook_queue: asyncio.Queue[InboxMessage] = asyncio.Queue()
        self._ids = itertools.count()
        self._busy: dict[str, int] = dict.fromkeys(self.links, 0)
        # The framed hop per peer (interactive messages), kept open by `run()`.
        self.hops: dict[str, HopLink] = (
            {peer: HopLink(link, clock=clock) for peer, link in self.links.items()}
            if framed_hop else {})

    def pump(self, peer: str) -> SchedulerPump[object]:
        """The peer's scheduler (shared with the daemon's bulk path when it passed `pumps`)."""
        pump = self._pumps.get(peer)
        if pump is None:
            now = asyncio.get_running_loop().time()
            pump = self._pumps[peer] = SchedulerPump(ClassScheduler(now))
        pump.on_budget_miss = self._on_budget_miss
        return pump

    async def run(self) -> None:
        """Deliver queued messages (and feed the inbox hook) until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for peer in self.links:
                self.pump(peer)
                for cls in MESSAGE_CLASSES:
                    for _ in range(self.workers[cls]):
                        tg.create_task(self._send_worker(peer, cls))
                if self.warm_interval_s is not None:
                    tg.create_task(self._keep_warm(peer, self.warm_interval_s))
                if peer in self.hops:
                    tg.create_task(self.hops[peer].keep())
            if self.hook_command:
                for _ in range(2):
                    tg.create_task(self._hook_worker())
            await asyncio.Future()  # until cancelled

    # -- sending --------------------------------------------------------------------------------

    def _on_budget_miss(self, miss: BudgetMiss) -> None:
        message = miss.item.payload
        if isinstance(message, _Outgoing):
            message.miss_reason = miss.reason
            self._record_miss(message, miss.kind, miss.reason)

    def _record_miss(self, message: _Outgoing, kind: str, reason: str) -> None:
        self.metrics.budget_misses.labels(message.peer, kind).inc()
        log.warning(
            "message.budget_miss",
            extra={
                "fields": {
                    "peer": message.peer,
                    "class": message.traffic_class.value,
                    "id": message.envelope.id,
                    "kind": kind,
                    "reason": reason,
                }
            },
        )

    async def send(self, peer: str, body: bytes, query: MessageQuery) -> MessageReceipt:
        """Queue `body` to `peer`; with `query.wait`, return once the peer acknowledged it.
        Delivery starts once `run()` does."""
        if peer not in self.links:
            raise ProtocolError(f"unknown peer {peer!r}", peer=peer)
        if len(body) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
        budget_s = (
            self.default_deadline_ms if query.deadline_ms is None else query.deadline_ms
        ) / 1000.0
        now = self.clock()
        envelope = MessageEnvelope(
            id=f"{self.site}-{os.getpid()}-{next(self._ids)}-{secrets.token_hex(4)}",
            traffic_class=query.traffic_class,
            sent_at=now,
            deadline=now + budget_s,
        )
        message = _Outgoing(envelope, peer, body, asyncio.get_running_loop().create_future())
        _trace("message.queued", envelope.id, now)
        interactive_seen()  # from here, not from its worker: a busy pump may hold it a while
        work_seen()  # the loop-lag probe ticks fast while messages move
        self.metrics.messages_sent.labels(peer, query.traffic_class.value).inc()
        pump = self.pump(peer)
        await pump.put(query.traffic_class, len(body), message, deadline=pump.now() + budget_s)
        if not query.wait:
            return MessageReceipt(
                id=envelope.id,
                peer=peer,
                traffic_class=query.traffic_class,
                delivered=False,
                late=False,
                latency_ms=None,
                budget_miss=None,
            )
        # Bounded even if a worker died: every attempt has its own request timeout.
        async with asyncio.timeout(budget_s + self.request_timeout_s + self.retry_budget_s):
            return await asyncio.shield(message.done)

    async def _keep_warm(self, peer: str, interval_s: float) -> None:
        """Open (or keep open) the peer's interactive pool with one cheap GET per connection,
        every `interval_s` while no message is on its way (then the messages keep it warm);
        retried after a second while the peer does not answer yet."""
        link = self.links[peer]

        async def ping() -> bool:
            try:
                await link.call(TrafficClass.INTERACTIVE, "GET", PEER_MESSAGES_ROUTE, accept=(204,))
            except TransferdError:
                return False
            return True

        while True:
            warm = True
            idle = self.pump(peer).scheduler.queued_bytes(TrafficClass.INTERACTIVE) == 0
            if self._busy[peer] == 0 and idle:
                n = self.workers[TrafficClass.INTERACTIVE]
                try:
                    async with asyncio.timeout(self.request_timeout_s):
                        warm = all(await asyncio.gather(*(ping() for _ in range(n))))
                except TimeoutError:
                    warm = False
            await asyncio.sleep(interval_s if warm else min(1.0, interval_s))

    async def _send_worker(self, peer: str, traffic_class: TrafficClass) -> None:
        pump = self.pump(peer)
        while True:
            item = await pump.get([traffic_class])
            message = item.payload
            if not isinstance(message, _Outgoing):
                raise ProtocolError(f"{traffic_class.value} queue holds a non-message item")
            self._busy[peer] += 1
            _trace("message.taken", message.envelope.id, self.clock())
            try:
                with interactive_traffic():  # the bulk gives way while messages move
                    receipt = await self._deliver(message)
            except TransferdError as exc:
                self._record_miss(message, "delivery_failed", f"not delivered: {exc}")
                if not message.done.done():
                    message.done.set_exception(exc)
            else:
                if not message.done.done():
                    message.done.set_result(receipt)
            finally:
                self._busy[peer] -= 1

    def _hop_for(self, message: _Outgoing) -> message_hop.HopConnection | None:
        """The open hop this message goes on, or None (the HTTP path): the interactive class
        only, and bodies small enough not to hold the others behind them."""
        hop = self.hops.get(message.peer)
        if (hop is None or message.traffic_class is not TrafficClass.INTERACTIVE
                or len(message.body) > HOP_MAX_BODY_BYTES):
            return None
        return hop.connection()

    async def _deliver(self, message: _Outgoing) -> MessageReceipt:
        link = self.links[message.peer]
        path = "http"

        async def attempt() -> MessageAck:
            nonlocal path
            conn = self._hop_for(message)
            path = "http" if conn is None else "hop"
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    if conn is not None:
                        return await message_hop.deliver(conn, message.envelope, message.body)
                    reply = await link.call(
                        message.traffic_class,
                        "POST",
                        PEER_MESSAGES_ROUTE,
                        body=message.body,
                        headers=message.envelope.headers(),
                    )
            except TimeoutError as exc:
                error = TransportError(
                    f"{message.peer}: no answer within {self.request_timeout_s:g} s",
                    peer=message.peer,
                )
                if conn is not None:  # a hop that does not answer is likely dead: reopen it
                    conn.close(error)
                raise error from exc
            return parse_body(MessageAck, reply.body)

        ack = await retrying(
            attempt,
            budget_s=self.retry_budget_s,
            on_retry=lambda _exc, _delay: self.metrics.retries.labels(message.peer).inc(),
            first_delay_s=0.02,
        )
        done_at = self.clock()
        self.metrics.message_paths.labels(message.peer, path).inc()
        _trace("message.acked", message.envelope.id, done_at, peer_rx=ack.received_at)
        reason = late_reason(message.peer, ack, message.envelope.deadline)
        if reason is not None and message.miss_reason is None:
            message.miss_reason = reason
            self._record_miss(message, "delivered_late", reason)
        envelope = message.envelope
        self.metrics.count_delivered(
            message.peer, message.traffic_class, done_at - envelope.sent_at,
            None if envelope.deadline is None else envelope.deadline - envelope.sent_at)
        return MessageReceipt(
            id=message.envelope.id,
            peer=message.peer,
            traffic_class=message.traffic_class,
            delivered=True,
            late=ack.late,
            latency_ms=(done_at - message.envelope.sent_at) * 1000.0,
            budget_miss=message.miss_reason,
        )

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self, source: str, envelope: MessageEnvelope, body: bytes) -> MessageAck:
        """Accept a message from an authenticated peer; idempotent on (source, message id)."""
        if len(body) > MAX_MESSAGE_BYTES:  # whichever path it came by (HTTP, the hop)
            raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}",
                                source=source)
        interactive_seen()  # the bulk gives way to this message's answer and its followers
        work_seen()  # the loop-lag probe ticks fast while messages move
        ack, message = self.ledger.accept(source, envelope, body, self.clock())
        _trace("message.received", envelope.id, ack.received_at)
        if message is None:
            return ack  # a retry of a message already delivered
        if self.hook_command:
            self._hook_queue.put_nowait(message)
        else:
            await self.inbox.put(message)
        self.ledger.record(source, ack)
        cls = envelope.traffic_class.value
        self.metrics.messages_received.labels(source, cls).inc()
        if ack.late:
            self.metrics.messages_received_late.labels(source, cls).inc()
            assert envelope.deadline is not None  # late implies a deadline
            log.warning(
                "message.late",
                extra={
                    "fields": {
                        "from": source,
                        "id": envelope.id,
                        "late_ms": round((ack.received_at - envelope.deadline) * 1000, 1),
                    }
                },
            )
        return ack

    async def _hook_worker(self) -> None:
        assert self.hook_command is not None  # workers start only with a hook
        while True:
            message = await self._hook_queue.get()
            env = {
                **os.environ,
                "TRANSFERD_MESSAGE_ID": message.id,
                "TRANSFERD_MESSAGE_FROM": message.source,
                "TRANSFERD_MESSAGE_CLASS": message.traffic_class.value,
                "TRANSFERD_MESSAGE_LATE": "1" if message.late else "0",
            }
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.hook_command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    env=env,
                )
                try:
                    async with asyncio.timeout(self.request_timeout_s):
                        await proc.communicate(message.body)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                ok = proc.returncode == 0
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "message.hook_failed", extra={"fields": {"id": message.id, "error": repr(exc)}}
                )
                ok = False
            if not ok:
                # The consumer's hook failed: keep the message where a reader can still get it.
                log.warning(
                    "message.hook_failed", extra={"fields": {"id": message.id, "kept_in_inbox": 1}}
                )
                try:
                    await self.inbox.put(message)
                except StorageError as exc:
                    log.error(
                        "message.lost", extra={"fields": {"id": message.id, "reason": str(exc)}}
                    )


# -- the message socket (protocol.message_socket) ---------------------------------------------

SOCKET_NAME = "messages.sock"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class MessageSocketSend(MessageQuery):
    """The JSON header of a message socket SEND: the peer, then what `POST
    /v1/messages/{peer}` takes in its query (class, deadline_ms, wait). Parsed here, not in
    `protocol.message_socket`, which the client imports without the plan's models."""

    peer: SiteName


def message_socket_path(state_dir: Path) -> Path:
    """Where the daemon of `state_dir` listens for messages: `<state_dir>/run/messages.sock`,
    unless that path is too long for a unix socket (then a private temporary directory,
    announced by the local API like any other path)."""
    return state_dir / "run" / SOCKET_NAME


class MessageSocketServer:
    """The daemon's end of the message socket: authenticates each connection with the site's
    own secret, then hands each SEND to `MessageService.send` and writes its receipt (or
    error) back when it has one. Requests run in `run()`'s TaskGroup; `start()` binds first, so
    the socket exists once the daemon says it listens; once `run()` has ended (the daemon is
    stopping) a connection or a SEND is refused with that reason.

    Memory is bounded per connection: a client must authenticate within `handshake_timeout_s`
    with frames of at most `ms.HANDSHAKE_FRAME_BYTES`, and the daemon stops reading from a
    client whose requests in progress hold more than `max_outstanding_bytes` of bodies (or
    that does not read its replies), until they drop below it."""

    def __init__(
        self,
        service: MessageService,
        secret: bytes,
        metrics: Metrics,
        *,
        handshake_timeout_s: float = 10.0,
        max_outstanding_bytes: int = 64 << 20,
    ) -> None:
        self.service = service
        self.secret = secret
        self.metrics = metrics
        self.handshake_timeout_s = handshake_timeout_s
        self.max_outstanding_bytes = max_outstanding_bytes
        self.path: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._private_dir: Path | None = None  # a temporary directory of ours, removed at close
        self._tg: asyncio.TaskGroup | None = None
        self._early: list[Coroutine[Any, Any, None]] = []  # requests before run() started
        self.connections: set[_SocketConnection] = set()
        self._closed = False

    async def start(self, path: Path) -> Path:
        """Listen at `path` (its directory made 0700, the socket 0600, a stale socket of a
        killed daemon replaced); ConfigError when it cannot."""
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            self._private_dir = Path(tempfile.mkdtemp(prefix="transferd-"))  # 0700
            path = self._private_dir / SOCKET_NAME
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.parent.stat().st_uid != os.geteuid():
                raise ConfigError(f"message socket: {path.parent} belongs to another user")
            path.parent.chmod(0o700)
            _remove_stale_socket(path)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _SocketConnection(self), str(path))
            path.chmod(0o600)
        except OSError as exc:
            raise ConfigError(f"message socket: cannot listen at {path}: "
                              f"{exc.strerror or exc}") from exc
        self.path = path
        return path

    def check_open(self) -> None:
        """TransportError (transient: ask again once it is back) when the daemon is stopping."""
        if self._closed:
            raise TransportError("message socket: the daemon is stopping")

    def spawn(self, request: Coroutine[Any, Any, None]) -> None:
        """Run `request` in `run()`'s TaskGroup; TransportError once `run()` has ended."""
        if self._closed:
            request.close()
            self.check_open()
        elif self._tg is None:
            self._early.append(request)
        else:
            self._tg.create_task(request)

    async def run(self) -> None:
        """Serve requests until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for request in self._early:
                    tg.create_task(request)
                self._early.clear()
                await asyncio.Future()
        finally:
            # The daemon cancels this with its other tasks and closes the socket once they
            # have all ended: a SEND arriving in between must not reach a finished TaskGroup.
            self._tg = None
            self._closed = True

    async def close(self) -> None:
        """Stop listening and drop every client (each sees its connection closed)."""
        self._closed = True
        for request in self._early:
            request.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    def refused(self, exc: TransferdError) -> None:
        if isinstance(exc, AuthError):
            self.metrics.auth_failures.labels(exc.message.split(":")[0][:40]).inc()
        log.warning(
            "auth.refused" if isinstance(exc, AuthError) else "request.refused",
            extra={"fields": {"path": "message-socket", "kind": exc.kind, "error": exc.message}},
        )


def _remove_stale_socket(path: Path) -> None:
    """Remove the socket a killed daemon left at `path` (the state_dir lock,
    `site.state_lock`, says no other daemon runs here); ConfigError for anything at `path`
    that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"message socket: {path} exists and is not a socket; it was left "
                          "as it is (move it away, or set state_dir elsewhere)", path=path)
    path.unlink()


def _error_frame(request_id: int, exc: TransferdError) -> bytes:
    return ms.encode_reply(ms.Frame.ERROR, request_id, exc.http_status,
                           json.dumps(exc.to_json()).encode())


class _SocketConnection(FramedConnection):
    """One client of the message socket: HELLO -> CHALLENGE -> AUTH -> READY, then SENDs."""

    what = "message socket"

    def __init__(self, server: MessageSocketServer) -> None:
        super().__init__(handshake_timeout_s=server.handshake_timeout_s,
                         max_outstanding_bytes=server.max_outstanding_bytes)
        self.server = server
        self.reader = ms.FrameReader(ms.HANDSHAKE_FRAME_BYTES)  # raised once authenticated
        self.state = ms.Frame.HELLO  # the frame expected next
        self.client_nonce = b""
        self.server_nonce = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's (uvloop's transports are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        try:
            self.server.check_open()
        except TransportError as exc:
            self.fail(exc)
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "SO_PEERCRED"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            uid = _PEERCRED.unpack(creds)[1]
            if uid not in (os.geteuid(), 0):
                self.fail(AuthError(f"message socket: uid {uid} is not the daemon's"))
                return
        self.arm_handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        super().connection_lost(exc)

    def error_frame(self, request_id: int, exc: TransferdError) -> bytes:
        return _error_frame(request_id, exc)

    def refused(self, exc: TransferdError) -> None:
        self.server.refused(exc)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for kind, payload in frames:
                self.frame(kind, payload)
        except TransferdError as exc:
            self.fail(exc)

    def frame(self, kind: ms.Frame, payload: bytes) -> None:
        if kind is not self.state:
            raise ProtocolError(f"message socket: {kind.name} frame where {self.state.name} "
                                "was expected")
        if kind is ms.Frame.HELLO:
            magic, nonce = payload[:len(ms.MAGIC)], payload[len(ms.MAGIC):]
            if magic != ms.MAGIC or len(nonce) != ms.NONCE_BYTES:
                raise ProtocolError("message socket: not a transferd message client")
            self.client_nonce, self.server_nonce = nonce, secrets.token_bytes(ms.NONCE_BYTES)
            proof = ms.server_proof(self.server.secret, self.client_nonce, self.server_nonce)
            self.transport.write(ms.encode_frame(ms.Frame.CHALLENGE, self.server_nonce, proof))
            self.state = ms.Frame.AUTH
        elif kind is ms.Frame.AUTH:
            want = ms.client_proof(self.server.secret, self.client_nonce, self.server_nonce)
            if not hmac.compare_digest(payload, want):
                raise AuthError("message socket: bad proof (not this site's own secret)")
            self.transport.write(ms.encode_frame(ms.Frame.READY))
            self.state = ms.Frame.SEND
            self.reader.max_bytes = ms.MAX_FRAME_BYTES
            self.handshake_done()
        else:
            request_id, header, body = ms.decode_send(payload)
            try:
                send = parse_body(MessageSocketSend, header)
            except ProtocolError as exc:
                self.server.refused(exc)
                self.transport.write(_error_frame(request_id, exc))
                return
            self.server.spawn(self.send(request_id, send, body, time.time()))
            self.took(len(body))

    async def send(self, request_id: int, send: MessageSocketSend, body: bytes,
                   arrived: float) -> None:
        try:
            await self.deliver(request_id, send, body, arrived)
        finally:
            self.finished(len(body))

    async def deliver(self, request_id: int, send: MessageSocketSend, body: bytes,
                      arrived: float) -> None:
        receipt: MessageReceipt | None = None
        try:
            try:
                receipt = await self.server.service.send(send.peer, body, send)
            except TimeoutError as exc:  # no receipt within the message's whole budget
                raise TransportError(f"{send.peer}: no receipt in time", peer=send.peer) from exc
            except TransferdError:
                raise
            except Exception as exc:  # one request's bug must not end the daemon's TaskGroup
                log.exception("message_socket.request_failed")
                raise TransferdError(f"internal error: {type(exc).__name__}") from exc
        except TransferdError as exc:
            self.server.refused(exc)
            reply = _error_frame(request_id, exc)
        else:
            reply = ms.encode_reply(ms.Frame.RECEIPT, request_id, 200 if send.wait else 202,
                                    to_body(receipt))
        if not self.transport.is_closing():
            self.transport.write(reply)
            if receipt is not None:
                _trace("message.socket", receipt.id, arrived, out=time.time())
