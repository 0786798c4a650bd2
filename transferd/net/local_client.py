"""The one client for a site's local API: the CLI's requests to its own daemon, the Python
calls `send_message` and `read_inbox`, and `MessageSocket`, the light path for a program that
sends many messages (`protocol.message_socket`: no HTTP, no aiohttp, one authentication per
connection).

Requests are signed like every request between daemons (HMAC with the site's own pair secret,
`protocol.auth.local_signer`); answers are parsed into their wire models (or by a function of
the caller's) and errors rebuilt into the package's own. The module imports no pydantic:
`transferd send` asks for its jobs and reads their answers (`job_ids`, `jobs_of`) without the
models, whose import takes longer than a small job. `call` runs over the standard library's
http.client and needs no event loop: `transferd send` and `status` start without importing
aiohttp. `acall` is the same request from a running event loop (aiohttp, imported on first
use).
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

from transferd.errors import AuthError, ProtocolError, TransferdError, TransportError
from transferd.protocol import message_socket as ms
from transferd.protocol.http_paths import INBOX_ROUTE, MESSAGE_SOCKET_ROUTE, MESSAGES_ROUTE

if TYPE_CHECKING:
    import aiohttp
    from pydantic import BaseModel

    from netplan.ids import TrafficClass
    from transferd.protocol.auth import LocalSigner, PairSecrets
    from transferd.protocol.messages import InboxMessage, MessageReceipt

__all__ = [
    "LocalClient",
    "LocalRequest",
    "MessageSocket",
    "JobOutcome",
    "job_ids",
    "jobs_of",
    "read_inbox",
    "send_message",
]

TIMEOUT_S = 120.0
RESTART_GRACE_S = 3.0  # how long a transient refusal of the message socket's discovery is retried
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


# protocol.local_api.JobState's values (a test keeps them equal), the first three active.
JOB_STATES = ("queued", "running", "waiting", "committed", "failed")
ACTIVE_JOB_STATES = frozenset(JOB_STATES[:3])


@dataclass(frozen=True)
class JobOutcome:
    """A job as `transferd send` reads it from a jobs answer: the fields of
    `protocol.local_api.Job` that the CLI prints, by the same names, read with json. The
    daemon answers with the JobsAnswer model's dump; `send --wait` reads it without building
    the models (pydantic and the wire models: ~90 ms of imports and CPU per command, longer
    than a small job takes). A field missing or of the wrong type is a ProtocolError naming
    it, as the model's would be."""

    id: str
    path: str
    dest: str
    state: str  # one of JOB_STATES
    error: str | None
    error_kind: str | None
    bytes_logical: int
    bytes_done: int
    bytes_on_wire: int
    chunks: int
    chunks_skipped: int
    retries: int
    note: str | None = None
    next_attempt_at: float | None = None
    attempts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_JOB_STATES


# Per field of JobOutcome: the JSON types it takes (None: null allowed); a missing field with
# a default in Job (note, next_attempt_at, attempts) takes that default.
_TEXT, _COUNT = (str,), (int,)
_JOB_FIELDS: dict[str, tuple[type | None, ...]] = {
    "id": _TEXT, "path": _TEXT, "dest": _TEXT, "state": _TEXT,
    "error": (str, None), "error_kind": (str, None),
    "bytes_logical": _COUNT, "bytes_done": _COUNT, "bytes_on_wire": _COUNT, "chunks": _COUNT,
    "chunks_skipped": _COUNT, "retries": _COUNT,
    "note": (str, None), "next_attempt_at": (float, int, None), "attempts": _COUNT,
}
_JOB_DEFAULTS = {"note": None, "next_attempt_at": None, "attempts": 0}


def _job_outcome(i: int, raw: object) -> JobOutcome:
    if not isinstance(raw, dict):
        raise ProtocolError(f"invalid JobsAnswer: jobs.{i}: must be an object")
    values: dict[str, Any] = {}
    for name, kinds in _JOB_FIELDS.items():
        if name not in raw and name not in _JOB_DEFAULTS:
            raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.{name}: field required")
        value = raw.get(name, _JOB_DEFAULTS.get(name))
        ok = (value is None and None in kinds) or (
            value is not None and not isinstance(value, bool)
            and isinstance(value, tuple(k for k in kinds if k is not None)))
        if not ok:
            raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.{name}: {value!r}")
        values[name] = value
    if values["state"] not in JOB_STATES:
        raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.state: {values['state']!r}")
    return JobOutcome(**values)


def jobs_of(reply: bytes) -> list[JobOutcome]:
    """A JobsAnswer's jobs, read with json (see JobOutcome); a ProtocolError for anything
    else."""
    try:
        jobs = json.loads(reply)["jobs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError("invalid JobsAnswer: jobs: missing or not JSON") from exc
    if not isinstance(jobs, list):
        raise ProtocolError("invalid JobsAnswer: jobs: must be a list")
    return [_job_outcome(i, raw) for i, raw in enumerate(jobs)]


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

    def call(self, request: LocalRequest[A]) -> A:
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
