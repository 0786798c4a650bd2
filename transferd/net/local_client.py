"""The one client for a site's local API: the CLI's requests to its own daemon, and the Python
calls `send_message` and `read_inbox`.

Requests are signed like every request between daemons (HMAC with the site's own pair secret,
`protocol.auth.local_signer`); answers are parsed into their wire models (or by a function of
the caller's) and errors rebuilt into the package's own. The module imports no pydantic: a
request can go out before the models are built (`transferd send` builds them while its daemon
works, `call(..., on_sent=)`). `call` runs over the standard library's http.client and needs
no event loop: `transferd send` and `status` start without importing aiohttp. `acall` is the
same request from a running event loop (aiohttp, imported on first use).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

from transferd.errors import ProtocolError, TransportError
from transferd.protocol.http_paths import INBOX_ROUTE, MESSAGES_ROUTE

if TYPE_CHECKING:
    import aiohttp
    from pydantic import BaseModel

    from netplan.ids import TrafficClass
    from transferd.protocol.auth import LocalSigner
    from transferd.protocol.messages import InboxMessage, MessageReceipt

__all__ = ["LocalClient", "LocalRequest", "job_ids", "read_inbox", "send_message"]

TIMEOUT_S = 120.0
A = TypeVar("A")


@dataclass(frozen=True)
class LocalRequest(Generic[A]):
    """One request of the local API and what its answer parses into: a wire model, or a
    function of the body (which raises ProtocolError for one it cannot read). A body is a
    wire model, JSON bytes (`json=True`) or raw bytes."""

    method: str
    path_qs: str
    answer: type[A] | Callable[[bytes], A]
    body: BaseModel | bytes | None = None
    accept: tuple[int, ...] = (200,)
    json: bool = False

    def answer_of(self, status: int, reply: bytes, daemon: str) -> A:
        if status not in self.accept:
            from transferd.protocol.wire import check_reply

            check_reply(status, reply, self.accept, daemon)
        if hasattr(self.answer, "model_validate_json"):
            from transferd.protocol.wire import parse_body

            return cast(A, parse_body(cast(Any, self.answer), reply))
        return cast(Callable[[bytes], A], self.answer)(reply)


def job_ids(reply: bytes) -> list[str]:
    """A SendAnswer's job ids, read with json (`transferd send` asks before it has built the
    models); a ProtocolError for anything else."""
    try:
        ids = json.loads(reply)["jobs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError("invalid SendAnswer: jobs: missing or not JSON") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError("invalid SendAnswer: jobs: must be a list of job ids")
    return ids


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
        if body is not None and not isinstance(body, bytes):
            from transferd.protocol.wire import to_body

            raw: bytes | None = to_body(body)
            headers = {"Content-Type": "application/json"}
        elif request.json:
            raw, headers = body, {"Content-Type": "application/json"}
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

    def call(self, request: LocalRequest[A], on_sent: Callable[[], object] | None = None) -> A:
        """Send one signed request and parse its answer; the daemon's error (ProtocolError,
        AuthError, ...) otherwise; TransportError when it cannot be reached. `on_sent` runs
        once the request is on the wire, before its answer is read."""
        raw, headers = self._prepared(request)
        conn = self._connection()
        try:
            conn.request(request.method, request.path_qs, body=raw, headers=headers)
            if on_sent is not None:
                on_sent()
            resp = conn.getresponse()
            reply, status = resp.read(), resp.status
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # the next call reconnects
            reason = f"{self.url}: {type(exc).__name__}: {exc}"
            raise TransportError(reason, peer=self.url, local_daemon=self.url) from exc
        return request.answer_of(status, reply, self.url)

    async def acall(
        self, request: LocalRequest[A], session: aiohttp.ClientSession | None = None
    ) -> A:
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
