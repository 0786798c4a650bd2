"""The one client for a site's local API: the CLI's requests to its own daemon, and the Python
calls `send_message` and `read_inbox`.

Requests are signed like every request between daemons (HMAC with the site's own pair secret,
`protocol.auth.local_signer`); answers are parsed into their wire models and errors rebuilt
into the package's own. `call` runs over the standard library's http.client and needs no event
loop: `transferd send` and `status` start without importing aiohttp, which is a fifth of the
CLI's start-up and so of every short `send --wait` measured by its wall clock. `acall` is the
same request from a running event loop (aiohttp, imported on first use).
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel

from netplan.ids import TrafficClass
from transferd.errors import ProtocolError, TransportError
from transferd.protocol.auth import LocalSigner
from transferd.protocol.wire import INBOX_ROUTE, MESSAGES_ROUTE, check_reply, parse_body, to_body

if TYPE_CHECKING:
    import aiohttp

    from transferd.protocol.messages import InboxMessage, MessageReceipt

__all__ = ["LocalClient", "LocalRequest", "read_inbox", "send_message"]

TIMEOUT_S = 120.0
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class LocalRequest(Generic[M]):
    """One request of the local API and the model its answer parses into."""

    method: str
    path_qs: str
    answer: type[M]
    body: BaseModel | bytes | None = None
    accept: tuple[int, ...] = (200,)

    def answer_of(self, status: int, reply: bytes, daemon: str) -> M:
        check_reply(status, reply, self.accept, daemon)
        return parse_body(self.answer, reply)


class LocalClient:
    def __init__(
        self, url: str, sign: LocalSigner | None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ProtocolError(f"no host in {url!r}")
        self.url = url.rstrip("/")
        self._sign = sign
        self._ssl = ssl_context
        self._parts = parts
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _prepared(self, request: LocalRequest[Any]) -> tuple[bytes | None, dict[str, str]]:
        body = request.body
        if isinstance(body, BaseModel):
            raw: bytes | None = to_body(body)
            headers = {"Content-Type": "application/json"}
        else:
            raw, headers = body, {"Content-Type": "application/octet-stream"} if body else {}
        if self._sign is not None:
            headers.update(self._sign(request.method, request.path_qs, raw))
        return raw, headers

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._parts.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    host, port, timeout=TIMEOUT_S, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        return self._conn

    def call(self, request: LocalRequest[M]) -> M:
        """Send one signed request and parse its answer; the daemon's error (ProtocolError,
        AuthError, ...) otherwise; TransportError when it cannot be reached."""
        raw, headers = self._prepared(request)
        conn = self._connection()
        try:
            conn.request(request.method, request.path_qs, body=raw, headers=headers)
            resp = conn.getresponse()
            reply, status = resp.read(), resp.status
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # the next call reconnects
            reason = f"{self.url}: {type(exc).__name__}: {exc}"
            raise TransportError(reason, peer=self.url, local_daemon=self.url) from exc
        return request.answer_of(status, reply, self.url)

    async def acall(
        self, request: LocalRequest[M], session: aiohttp.ClientSession | None = None
    ) -> M:
        """`call` from a running event loop, on `session` (or one opened for this call)."""
        import aiohttp
        from yarl import URL

        raw, headers = self._prepared(request)
        client = session or aiohttp.ClientSession()
        try:
            async with client.request(
                request.method,
                URL(self.url + request.path_qs, encoded=True),
                data=raw,
                headers=headers,
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                reply, status = await resp.read(), resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            where = f"{request.method} {self.url}{request.path_qs}"
            raise TransportError(f"{where}: {exc!r}", local_daemon=self.url) from exc
        finally:
            if session is None:
                await client.close()
        return request.answer_of(status, reply, self.url)


async def send_message(
    daemon_url: str,
    peer: str,
    body: bytes,
    *,
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE,
    deadline_ms: float | None = None,
    wait: bool = True,
    session: aiohttp.ClientSession | None = None,
    sign: LocalSigner | None = None,
) -> MessageReceipt:
    """Ask the local daemon at `daemon_url` to deliver `body` to `peer` (signed with
    `local_signer(keyring)`); the receipt says when it was delivered and whether late."""
    from transferd.protocol.messages import MessageReceipt

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
