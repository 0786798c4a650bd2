"""The one client for peers: signed HTTP requests to a peer daemon, one aiohttp connection
pool per traffic class, for uploads and messages alike.

Control messages (have/want, commit) and interactive messages never queue behind each other:
each (peer, TrafficClass) pair owns its own `ClientSession` and connector; the bulk bytes are
not here at all but on the data channels (`net.channels`). Bodies go out as memoryviews with
Content-Length (no chunked encoding: aiohttp copies each chunk then).

Every send is signed afresh by a client middleware (a new nonce and timestamp), so aiohttp's
own re-send of a request on a kept-alive connection the peer had closed is not a replay; every
reply that the caller acts on must carry the peer's signature over it (a damaged reply is
asked for again). aiohttp and OS errors become TransportError here; error bodies from the peer
are rebuilt into the package's errors (`wire.check_reply`). `retrying` is the one retry loop:
it retries a call whose error is transient (`TransferdError.transient`: the network failed, a
body or reply was damaged in flight, a replay or restart refusal) with the one capped
exponential backoff (`protocol.backoff`), each attempt signed afresh.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import payload
from pydantic import BaseModel
from yarl import URL

from netplan.plan import BULK_CLASSES, TrafficClass
from transferd.errors import TransferdError, TransportError
from transferd.protocol.auth import (
    H_BODY,
    H_NONCE,
    H_SITE,
    H_TO,
    Keys,
    body_blake3,
    check_reply_signature,
    sign_headers,
)
from transferd.protocol.backoff import backoff_delays
from transferd.protocol.wire import check_reply, to_body

__all__ = ["ChunkBody", "PeerLink", "Reply", "retrying"]

T = TypeVar("T")

_CONTROL_POOL = 8  # control: small messages, a few connections suffice
# Interactive messages: HTTP/1.1 carries one request per connection at a time, so a pool of n
# delivers at most n / RTT messages per second (Little's law): 8 capped a 40 ms link at 200/s.
INTERACTIVE_POOL = 32


class ChunkBody(payload.Payload):
    """A request body sent straight from a memoryview with Content-Length. aiohttp's
    BytesPayload warns on large bodies (a manifest of a large folder); writing one buffer is
    what we want here, since the event loop hands it to the kernel without copying."""

    def __init__(
        self, value: bytes | memoryview, on_wire: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(value, content_type="application/octet-stream")
        self._size = memoryview(value).nbytes
        self._wire_bytes = self._size
        self._on_wire = on_wire

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        # Flush the headers on their own first: on Python < 3.12.9 aiohttp coalesces headers
        # and body with b"".join, a full copy of every chunk.
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:
            send_headers()
        if self._on_wire is not None:
            # Counted as it starts to go out, every time it does (aiohttp's own re-send too),
            # before the first byte: a body cut short, or a sender killed, is still counted.
            self._on_wire(self._wire_bytes)
        await writer.write(self._value)


@dataclass(frozen=True)
class Reply:
    """An answer with an accepted status; callers parse `body` with the model they expect."""

    status: int
    body: bytes


class PeerLink:
    """Everything this site says to one peer (or, with peer == own site, to its own daemon)."""

    def __init__(
        self,
        *,
        site: str,
        peer: str,
        url: str,
        keys: Keys,
        streams: int,
        clock: Callable[[], float],
        ssl_context: ssl.SSLContext | None = None,
        shared_pool: bool = False,
    ) -> None:
        self.site, self.peer, self.url = site, peer, url
        self.host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
        # Benchmark baseline only: every class on one pool, so small messages queue behind bulk.
        self.shared_pool = shared_pool
        self.keys = keys
        self.streams = streams
        self.clock = clock
        self.ssl_context = ssl_context
        self._sessions: dict[TrafficClass, aiohttp.ClientSession] = {}

    @property
    def tls(self) -> ssl.SSLContext | bool:
        """The `ssl` argument of a connection to this peer's https URL: the site's `tls`
        context, or True (the system's trust store and hostname check) without one; a
        connection of ours to an https peer never goes out in plaintext."""
        return self.ssl_context if self.ssl_context is not None else True

    def session(self, traffic_class: TrafficClass) -> aiohttp.ClientSession:
        if self.shared_pool:
            traffic_class = TrafficClass.CHECKPOINT
        session = self._sessions.get(traffic_class)
        if session is None or session.closed:
            bulk = traffic_class in BULK_CLASSES
            interactive = traffic_class is TrafficClass.INTERACTIVE
            # Bulk: each stream may have one more upload awaiting its answer (BulkGate.sent).
            limit = 2 * self.streams if bulk else INTERACTIVE_POOL if interactive else _CONTROL_POOL
            connector = aiohttp.TCPConnector(
                limit=limit,
                ssl=self.tls,
                enable_cleanup_closed=False,
                # Idle interactive connections stay open (the message service keeps them warm)
                # for less than aiohttp servers' 75 s keep-alive, so the peer never closes first.
                keepalive_timeout=60.0 if interactive else 15.0,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
                auto_decompress=False,
                middlewares=(self._sign,),
            )
            self._sessions[traffic_class] = session
        return session

    def _what_failed(self, exc: BaseException) -> str:
        """A transport failure in words a user reads in `status` and `send --wait`."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            err = exc.os_error
            reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
            return f"{self.peer} unreachable at {self.url}: {reason.lower()}"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return f"{self.peer} closed the connection mid-request"
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return f"{self.peer} stopped answering (timed out)"
        if isinstance(exc, aiohttp.ClientOSError | OSError) and getattr(exc, "strerror", None):
            return f"connection to {self.peer} lost: {str(exc.strerror).lower()}"
        return f"{self.peer}: {type(exc).__name__}: {exc}"

    async def _sign(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Sign this send of the request: runs again for every re-send aiohttp makes."""
        request.headers.update(
            sign_headers(
                self.keys.secret_for(self.peer),
                method=request.method,
                path_qs=request.url.raw_path_qs,
                body_blake3=request.headers[H_BODY],
                src=self.site,
                dst=self.peer,
                now=self.clock(),
            )
        )
        return await handler(request)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def call(
        self,
        traffic_class: TrafficClass,
        method: str,
        path_qs: str,
        *,
        body: BaseModel | bytes | memoryview | None = None,
        body_digest: str | None = None,
        headers: dict[str, str] | None = None,
        accept: tuple[int, ...] = (200,),
        on_wire: Callable[[int, bool], None] | None = None,
    ) -> Reply:
        """One signed request (`body_digest`: the body's blake3 when the caller knows it).
        Returns the reply of an accepted status; raises the peer's error (ProtocolError,
        AuthError, ...) or TransportError otherwise. `on_wire(n, again)` hears of every time
        the body (n bytes) starts going out on a connection; `again` when aiohttp sends it once
        more by itself (a kept-alive connection found closed), which is a retry too."""
        if isinstance(body, BaseModel):
            body = to_body(body)
        # The signature itself is added per send, by `_sign`.
        signed = {
            H_SITE: self.site,
            H_TO: self.peer,
            H_BODY: body_digest or body_blake3(body),
            **(headers or {}),
        }
        sends = 0

        def wire(n: int) -> None:
            nonlocal sends
            sends += 1
            if on_wire is not None:
                on_wire(n, sends > 1)

        data = ChunkBody(body, wire) if body is not None else None
        try:
            async with self.session(traffic_class).request(
                method, URL(self.url + path_qs, encoded=True), data=data, headers=signed
            ) as resp:
                raw = await resp.read()
                status = resp.status
                nonce = resp.request_info.headers.get(H_NONCE, "")
                reply_headers = resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(self._what_failed(exc), peer=self.peer) from exc
        check_reply_signature(
            self.keys.secret_for(self.peer),
            nonce,
            status,
            raw,
            reply_headers,
            required=status in accept,
        )
        check_reply(status, raw, accept, self.peer)
        return Reply(status, raw)


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    budget_s: float,
    on_retry: Callable[[TransferdError, float], None],
    first_delay_s: float = 0.1,
) -> T:
    """Retry `call` while its error is transient, with capped exponential backoff, until
    `budget_s` is spent; then (or at once for a permanent error) raise it. `on_retry(error,
    delay_s)` hears of each retry before its wait."""
    delays = backoff_delays(budget_s, first_s=first_delay_s)
    while True:
        try:
            return await call()
        except TransferdError as exc:
            if not exc.transient:
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            on_retry(exc, delay)
            await asyncio.sleep(delay)
