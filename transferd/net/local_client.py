"""The one client for a site's local API: the CLI's requests to its own daemon, the Python
calls `send_message` and `read_inbox`, and `MessageSocket`, the light path for a program that
sends many messages (`protocol.message_socket`: no HTTP, no aiohttp, one authentication per
connection).

The HTTP requests (`LocalClient`, `LocalRequest`, and what `transferd send` reads of its
jobs) live in `net.local_http`, re-exported here: the CLI imports that module alone, without
the asyncio this one needs for the message socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urlencode

from transferd.errors import AuthError, ProtocolError, TransferdError, TransportError
from transferd.net.local_http import (
    ACTIVE_JOB_STATES,
    JOB_STATES,
    TIMEOUT_S,
    JobOutcome,
    LocalClient,
    LocalRequest,
    job_ids,
    jobs_of,
)
from transferd.protocol import message_socket as ms
from transferd.protocol.http_paths import INBOX_ROUTE, MESSAGE_SOCKET_ROUTE, MESSAGES_ROUTE

if TYPE_CHECKING:
    import aiohttp

    from netplan.ids import TrafficClass
    from transferd.protocol.auth import LocalSigner, PairSecrets
    from transferd.protocol.messages import InboxMessage, MessageReceipt

__all__ = [
    "ACTIVE_JOB_STATES",
    "JOB_STATES",
    "TIMEOUT_S",
    "JobOutcome",
    "LocalClient",
    "LocalRequest",
    "MessageSocket",
    "job_ids",
    "jobs_of",
    "read_inbox",
    "send_message",
]

RESTART_GRACE_S = 3.0  # how long a transient refusal of the message socket's discovery is retried


async def send_message(
    daemon_url: str,
    peer: str,
    body: bytes,
    *,
    traffic_class: TrafficClass | None = None,
    deadline_ms: float | None = None,
    wait: bool = True,
    session: aiohttp.ClientSession | None = None,
    sign: LocalSigner | None = None,
) -> MessageReceipt:
    """Ask the local daemon at `daemon_url` to deliver `body` to `peer` (signed with
    `local_signer(keyring)`), as `traffic_class` (default interactive); the receipt says when
    it was delivered and whether late."""
    from netplan.ids import TrafficClass
    from transferd.protocol.messages import MessageReceipt

    traffic_class = TrafficClass.INTERACTIVE if traffic_class is None else traffic_class
    query = {"class": traffic_class.value, "wait": "1" if wait else "0"}
    if deadline_ms is not None:
        query["deadline_ms"] = f"{deadline_ms:g}"
    path_qs = MESSAGES_ROUTE.format(peer=quote(peer, safe="")) + "?" + urlencode(query)
    request = LocalRequest("POST", path_qs, MessageReceipt, body=body, accept=(200, 202))
    return await LocalClient(daemon_url, sign).acall(request, session)


async def read_inbox(
    daemon_url: str,
    *,
    wait_ms: float = 0.0,
    max_messages: int = 100,
    session: aiohttp.ClientSession | None = None,
    sign: LocalSigner | None = None,
) -> list[InboxMessage]:
    """Take up to `max_messages` from the local daemon's inbox, waiting up to `wait_ms`."""
    from transferd.protocol.messages import InboxAnswer

    path_qs = INBOX_ROUTE + "?" + urlencode({"wait_ms": f"{wait_ms:g}", "max": str(max_messages)})
    answer = await LocalClient(daemon_url, sign).acall(
        LocalRequest("GET", path_qs, InboxAnswer), session
    )
    return answer.messages


class _SocketConnection(asyncio.Protocol):
    """One connection to the message socket: handshake frames go to `handshake`, replies to
    the future of their request; a lost connection fails every request still waiting, with
    the daemon's reason when it gave one (an ERROR for request 0, then the connection closed)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.reader = ms.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Queue[tuple[ms.Frame, bytes] | None] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.ready = False
        self.lost: TransferdError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's (uvloop's transports are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            for kind, payload in self.reader.feed(data):
                if not self.ready or kind not in (ms.Frame.RECEIPT, ms.Frame.ERROR):
                    self.handshake.put_nowait((kind, payload))
                    continue
                request_id, status, body = ms.decode_reply(payload)
                if request_id == 0 and kind is ms.Frame.ERROR:
                    self.lost = self.lost or _refusal(status, body, self.where)
                    continue  # the daemon closes the connection next
                waiter = self.pending.pop(request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((status, body))
        except ProtocolError as exc:
            self.drop(TransportError(f"{self.where}: {exc.message}", local_daemon=self.where))

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.lost = self.lost or TransportError(
            f"{self.where}: the daemon closed the message socket (stopped or restarted){why}",
            local_daemon=self.where)
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(self.lost)
        self.pending.clear()
        self.handshake.put_nowait(None)

    def drop(self, exc: TransferdError) -> None:
        self.lost = self.lost or exc
        if self.transport is not None:
            self.transport.close()

    async def next_frame(self) -> tuple[ms.Frame, bytes]:
        got = await self.handshake.get()
        if got is None:
            assert self.lost is not None  # set before the None is queued
            raise self.lost
        return got


class MessageSocket:
    """Messages to peers through the local daemon's message socket, from a running event
    loop. One connection, requests pipelined; the socket's path comes from the local API
    (`GET /v1/local/message-socket`, signed as the CLI signs). A request that was waiting when
    the daemon went away fails with TransportError; the next one connects again (after a
    restart too). `keys`: the site's own secret (`LocalSecret.load(keys_dir, site)`, or a
    Keyring), used for the local API and for the socket's handshake.

        async with MessageSocket(url, keys) as messages:
            receipt = await messages.send("B", b"hello", deadline_ms=50)
    """

    def __init__(
        self, daemon_url: str, keys: PairSecrets, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        from transferd.protocol.auth import local_signer

        self.url = daemon_url.rstrip("/")
        self._secret = keys.secret_for(keys.site)
        self._http = LocalClient(daemon_url, local_signer(keys), ssl_context)
        self._conn: _SocketConnection | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> MessageSocket:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
        self._http.close()

    async def connect(self) -> None:
        """Connect now (the first `send` does otherwise): discovery, connection, handshake."""
        await self._connected()

    async def _connected(self) -> _SocketConnection:
        async with self._connecting:
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            self._conn = None
            from transferd.protocol.backoff import backoff_delays
            from transferd.protocol.local_api import MessageSocketAnswer

            ask = LocalRequest("GET", MESSAGE_SOCKET_ROUTE, MessageSocketAnswer)
            # Asked on a new connection: one kept alive since the last discovery may be to a
            # daemon that has restarted since (http.client would fail on it: RemoteDisconnected).
            self._http.close()
            # A refusal that passes (signed in the second its daemon restarted) is asked
            # again, signed afresh, as the CLI's first call does; a daemon down is not.
            delays = backoff_delays(RESTART_GRACE_S)
            while True:
                try:
                    where = await asyncio.to_thread(self._http.call, ask)
                    break
                except AuthError as exc:
                    delay = next(delays, None)
                    if not exc.transient or delay is None:
                        raise
                    await asyncio.sleep(delay)
            self._conn = await self._open(where.path)
            return self._conn

    async def _open(self, path: str) -> _SocketConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_unix_connection(lambda: _SocketConnection(path), path)
        except OSError as exc:
            raise TransportError(f"{path}: cannot reach the daemon's message socket: "
                                 f"{exc.strerror or exc} (is `transferd serve` running?)",
                                 local_daemon=self.url) from exc
        assert conn.transport is not None  # connected
        try:
            client_nonce = os.urandom(ms.NONCE_BYTES)
            conn.transport.write(ms.encode_frame(ms.Frame.HELLO, ms.MAGIC, client_nonce))
            kind, payload = await conn.next_frame()
            self._refused(kind, payload, path)
            server_nonce, proof = payload[:ms.NONCE_BYTES], payload[ms.NONCE_BYTES:]
            if kind is not ms.Frame.CHALLENGE or not _equal(
                    proof, ms.server_proof(self._secret, client_nonce, server_nonce)):
                raise AuthError(f"{path}: the daemon did not prove this site's own secret")
            conn.transport.write(ms.encode_frame(
                ms.Frame.AUTH, ms.client_proof(self._secret, client_nonce, server_nonce)))
            kind, payload = await conn.next_frame()
            self._refused(kind, payload, path)
            if kind is not ms.Frame.READY:
                raise ProtocolError(f"{path}: {kind.name} frame where READY was expected")
        except BaseException:
            conn.transport.close()
            raise
        conn.ready = True
        return conn

    @staticmethod
    def _refused(kind: ms.Frame, payload: bytes, path: str) -> None:
        if kind is ms.Frame.ERROR:
            _, status, body = ms.decode_reply(payload)
            raise _refusal(status, body, path)

    async def send(
        self,
        peer: str,
        body: bytes,
        *,
        traffic_class: TrafficClass | None = None,
        deadline_ms: float | None = None,
        wait: bool = True,
    ) -> MessageReceipt:
        """Deliver `body` to `peer` as `send_message` does (same receipt, same errors); a body
        past the daemon's limit is refused here, before anything is sent."""
        from transferd.protocol.messages import MAX_MESSAGE_BYTES, MessageReceipt

        if len(body) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES} "
                                "(bigger payloads belong to `transferd send`)")
        conn = await self._connected()
        header: dict[str, object] = {"peer": peer, "wait": wait}
        if traffic_class is not None:
            header["class"] = traffic_class.value
        if deadline_ms is not None:
            header["deadline_ms"] = deadline_ms
        request_id = next(self._ids) % (1 << 32) or next(self._ids)
        frame = ms.encode_send(request_id, json.dumps(header).encode(), body)
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = waiter
        assert conn.transport is not None  # connected
        conn.transport.write(frame)
        try:
            status, reply = await waiter
        finally:
            conn.pending.pop(request_id, None)
        request = LocalRequest("POST", "", MessageReceipt, accept=(200, 202))
        return request.answer_of(status, reply, self.url)


def _refusal(status: int, body: bytes, where: str) -> TransferdError:
    """The error the daemon sent in an ERROR frame."""
    from transferd.protocol.wire import check_reply

    try:
        check_reply(status, body, (), where)
    except TransferdError as exc:
        return exc
    raise AssertionError("check_reply accepts no status here")


def _equal(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
