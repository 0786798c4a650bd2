"""Interactive messages: small objects delivered to a peer's inbox on their own class and pool,
each with a deadline. The aiohttp routes the daemon mounts with `add_message_routes(app, service)`:

  POST /v1/messages/{peer}?class=interactive&deadline_ms=50   local: queue to a peer, await delivery
  POST /v1/peer/messages                                      peer side: receive into the inbox
  GET  /v1/inbox?wait_ms=1000&max=100                         local: read the inbox (long-poll)

plus the Python client calls `send_message` and `read_inbox`. Sends go through the peer's
`SchedulerPump` (control strict, interactive earliest-deadline-first), one connection pool per
(peer, class). A message that cannot meet its deadline is counted and logged as a budget miss with
the reason and still delivered; one that reaches the peer after its deadline is delivered flagged
`late`. Deadlines cross sites as Unix time, so they assume NTP-synchronised clocks, as the request
signatures' timestamps already do. Authentication is the injected `PeerAuth`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web
from yarl import URL

from transferd._classes import TrafficClass
from transferd.errors import (
    AuthError,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
    error_from_json,
)
from transferd.net.peer_client import INTERACTIVE_POOL, ChunkBody
from transferd.net.pump import SchedulerPump
from transferd.protocol.auth import NonceGuard, authenticate, sign_headers
from transferd.protocol.chunks import blake3_hex
from transferd.protocol.sched import BudgetMiss, ClassScheduler
from transferd.site.keys import Keyring

__all__ = [
    "MESSAGE_CLASSES",
    "HmacPeerAuth",
    "InboxMessage",
    "MessageMetrics",
    "MessageReceipt",
    "MessageService",
    "PeerAuth",
    "add_message_routes",
    "local_signer",
    "read_inbox",
    "send_message",
]

log = logging.getLogger("transferd.messages")

MESSAGE_CLASSES = (TrafficClass.CONTROL, TrafficClass.INTERACTIVE)
MAX_MESSAGE_BYTES = 16 << 20  # "small objects": bigger payloads belong to `transferd send`
PEER_ROUTE = "/v1/peer/messages"
H_ID = "X-Transferd-Message-Id"
H_CLASS = "X-Transferd-Class"
H_DEADLINE = "X-Transferd-Deadline"  # Unix seconds
H_SENT = "X-Transferd-Sent-At"  # Unix seconds


class PeerAuth(Protocol):
    """Signs requests to peers and verifies requests from them (the daemon's HMAC scheme)."""

    def sign(self, peer: str, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        """Headers to add to a request to `peer`."""
        ...

    def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        """The authenticated source site of a request; raises AuthError otherwise."""
        ...


LocalAuth = Callable[[Mapping[str, str], str, str, bytes], None]
"""Checks a local API request (headers, method, path_qs, body); raises AuthError."""
LocalSigner = Callable[[str, str, bytes], Mapping[str, str]]
"""Headers for a local API request (method, path_qs, body), e.g. `local_signer(keyring)`."""


class HmacPeerAuth:
    """`PeerAuth` with the daemon's request signatures (transferd.protocol.auth): HMAC-SHA256 over
    method, path, body blake3, timestamp, nonce and both site ids, with the pair secret."""

    def __init__(
        self,
        keyring: Keyring,
        guard: NonceGuard,
        peers: Collection[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.guard = guard
        self.peers = set(peers)
        self.clock = clock

    def sign(self, peer: str, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return sign_headers(
            self.keyring.secret_for(peer),
            method=method,
            path_qs=path_qs,
            body_blake3=blake3_hex(body),
            src=self.keyring.site,
            dst=peer,
            now=self.clock(),
        )

    def _check(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        auth = authenticate(
            headers,
            method=method,
            path_qs=path_qs,
            keys=self.keyring,
            guard=self.guard,
            now=self.clock(),
        )
        if blake3_hex(body) != auth.body_blake3:
            raise AuthError("request body does not match its signed blake3", status=401)
        return auth.site

    def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        site = self._check(headers, method, path_qs, body)
        if site not in self.peers:
            raise AuthError(f"site {site!r} is not a peer of this site", status=403)
        return site

    def verify_local(
        self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes
    ) -> None:
        """The local API answers only this site's own CLI (signed with the site's own secret)."""
        if self._check(headers, method, path_qs, body) != self.keyring.site:
            raise AuthError("the local API only answers this site's own CLI", status=403)

    def sign_local(self, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return self.sign(self.keyring.site, method, path_qs, body)


def local_signer(keyring: Keyring, clock: Callable[[], float] = time.time) -> LocalSigner:
    """Signs requests to this site's own daemon (what its CLI does), for `send_message` and
    `read_inbox`: `local_signer(Keyring.load(keys_dir, site, []))`."""

    def sign(method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return sign_headers(
            keyring.secret_for(keyring.site),
            method=method,
            path_qs=path_qs,
            body_blake3=blake3_hex(body),
            src=keyring.site,
            dst=keyring.site,
            now=clock(),
        )

    return sign


@dataclass(frozen=True)
class InboxMessage:
    id: str
    source: str
    traffic_class: TrafficClass
    sent_at: float
    deadline: float | None
    received_at: float
    late: bool
    body: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": self.source,
            "class": self.traffic_class.value,
            "sent_at": self.sent_at,
            "deadline": self.deadline,
            "received_at": self.received_at,
            "late": self.late,
            "size": len(self.body),
            "body_b64": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: object) -> InboxMessage:
        try:
            assert isinstance(data, dict)
            deadline = data["deadline"]
            return cls(
                id=str(data["id"]),
                source=str(data["from"]),
                traffic_class=TrafficClass(data["class"]),
                sent_at=float(data["sent_at"]),
                deadline=None if deadline is None else float(deadline),
                received_at=float(data["received_at"]),
                late=bool(data["late"]),
                body=base64.b64decode(data["body_b64"], validate=True),
            )
        except (AssertionError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ProtocolError(f"malformed inbox message: {exc!r}") from exc


@dataclass(frozen=True)
class MessageReceipt:
    """What the sender learns: delivered or queued, late or not, and any budget miss reason."""

    id: str
    peer: str
    traffic_class: TrafficClass
    delivered: bool
    late: bool
    latency_ms: float | None
    budget_miss: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "class": self.traffic_class.value,
            "delivered": self.delivered,
            "late": self.late,
            "latency_ms": self.latency_ms,
            "budget_miss": self.budget_miss,
        }

    @classmethod
    def from_json(cls, data: object) -> MessageReceipt:
        try:
            assert isinstance(data, dict)
            latency = data["latency_ms"]
            miss = data["budget_miss"]
            return cls(
                id=str(data["id"]),
                peer=str(data["peer"]),
                traffic_class=TrafficClass(data["class"]),
                delivered=bool(data["delivered"]),
                late=bool(data["late"]),
                latency_ms=None if latency is None else float(latency),
                budget_miss=None if miss is None else str(miss),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed message receipt: {exc!r}") from exc


class MessageMetrics:
    """Counters as plain ints (always) and as Prometheus counters when given a registry."""

    def __init__(self, registry: Any = None) -> None:
        self.sent: dict[str, int] = {}
        self.delivered: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.received_late: dict[str, int] = {}
        self.budget_misses: dict[tuple[str, str], int] = {}
        self._prom: dict[str, Any] = {}
        if registry is not None:
            from prometheus_client import Counter

            for name, doc, labels in (
                ("sent", "Messages queued to a peer", ["peer", "class"]),
                ("delivered", "Messages a peer acknowledged", ["peer", "class"]),
                ("received", "Messages received from a peer", ["peer", "class"]),
                ("received_late", "Messages received after their deadline", ["peer", "class"]),
                (
                    "budget_misses",
                    "Messages that missed their deadline, by reason",
                    ["peer", "kind"],
                ),
            ):
                self._prom[name] = Counter(
                    f"transferd_messages_{name}", doc, labels, registry=registry
                )

    def _bump(self, name: str, key: Any, *labels: str) -> None:
        table: dict[Any, int] = getattr(self, name)
        table[key] = table.get(key, 0) + 1
        if name in self._prom:
            self._prom[name].labels(*labels).inc()

    def count(self, name: str, peer: str, traffic_class: TrafficClass) -> None:
        self._bump(name, peer, peer, traffic_class.value)

    def budget_miss(self, peer: str, kind: str) -> None:
        self._bump("budget_misses", (peer, kind), peer, kind)

    def total_budget_misses(self) -> int:
        return sum(self.budget_misses.values())


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
    id: str
    peer: str
    traffic_class: TrafficClass
    body: bytes
    queued_at: float  # Unix seconds
    deadline: float | None  # Unix seconds
    done: asyncio.Future[MessageReceipt]
    miss_reason: str | None = None


class MessageService:
    """Sends messages to peers through their schedulers and keeps the inbox of received ones.

    Use as `async with service:` (or `await start()` / `await close()`): it owns one aiohttp
    session per (peer, class) and the worker tasks, all in one TaskGroup.
    """

    def __init__(
        self,
        site: str,
        peers: Mapping[str, str],
        auth: PeerAuth,
        *,
        pumps: Mapping[str, SchedulerPump[Any]] | None = None,
        metrics: MessageMetrics | None = None,
        inbox: Inbox | None = None,
        hook_command: Sequence[str] | None = None,
        workers: Mapping[TrafficClass, int] | None = None,
        default_deadline_ms: float = 1000.0,
        request_timeout_s: float = 30.0,
        attempts: int = 3,
        clock: Callable[[], float] = time.time,
        session_for: Callable[[str, TrafficClass], aiohttp.ClientSession] | None = None,
        warm_interval_s: float | None = 30.0,
    ) -> None:
        self.site = site
        self.peers = {name: url.rstrip("/") for name, url in peers.items()}
        self.auth = auth
        self.metrics = MessageMetrics() if metrics is None else metrics
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
        self.attempts = attempts
        self.clock = clock
        # The daemon's own per-(peer, class) pools when given; else this service opens its own.
        self.session_for = session_for
        self._pumps: dict[str, SchedulerPump[Any]] = dict(pumps or {})
        self._sessions: dict[tuple[str, TrafficClass], aiohttp.ClientSession] = {}
        self._hook_queue: asyncio.Queue[InboxMessage] = asyncio.Queue()
        self._seen: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._ids = itertools.count()
        self._runner: asyncio.Task[None] | None = None
        self._miss_hooked: set[str] = set()
        # Interactive connections are opened ahead of the first message and kept open, so a
        # message does not pay a TCP (and TLS) handshake, a round trip or more, on top of its own.
        self.warm_interval_s = warm_interval_s
        self._busy: dict[str, int] = dict.fromkeys(self.peers, 0)

    # -- lifecycle ------------------------------------------------------------------------------

    def pump(self, peer: str) -> SchedulerPump[Any]:
        """The peer's scheduler (shared with the daemon's bulk path when it passed `pumps`)."""
        if peer not in self._pumps:
            loop = asyncio.get_running_loop()
            self._pumps[peer] = SchedulerPump(ClassScheduler(loop.time()))
        pump = self._pumps[peer]
        if peer not in self._miss_hooked:
            self._miss_hooked.add(peer)
            pump.on_budget_miss = _chain(pump.on_budget_miss, self._on_budget_miss)
        return pump

    async def start(self) -> None:
        if self._runner is not None:
            return
        for peer in self.peers:
            self.pump(peer)
            for cls in MESSAGE_CLASSES:
                if self.session_for is not None:
                    continue
                self._sessions[(peer, cls)] = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self.workers[cls]),
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                )
        self._runner = asyncio.create_task(self._run(), name=f"transferd-messages-{self.site}")

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for peer in self.peers:
                for cls in MESSAGE_CLASSES:
                    for _ in range(self.workers[cls]):
                        tg.create_task(self._send_worker(peer, cls))
                if self.warm_interval_s is not None:
                    tg.create_task(self._keep_warm(peer, self.warm_interval_s))
            if self.hook_command:
                for _ in range(2):
                    tg.create_task(self._hook_worker())

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])
            if not runner.cancelled() and runner.exception() is not None:
                raise TransportError("message workers failed") from runner.exception()
        for session in self._sessions.values():
            await session.close()  # only the pools this service opened itself
        self._sessions.clear()

    async def __aenter__(self) -> MessageService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending --------------------------------------------------------------------------------

    def _on_budget_miss(self, miss: BudgetMiss) -> None:
        message = miss.item.payload
        if isinstance(message, _Outgoing):
            message.miss_reason = miss.reason
            self._record_miss(message, miss.kind, miss.reason)

    def _record_miss(self, message: _Outgoing, kind: str, reason: str) -> None:
        self.metrics.budget_miss(message.peer, kind)
        log.warning(
            "message.budget_miss",
            extra={
                "fields": {
                    "peer": message.peer,
                    "class": message.traffic_class.value,
                    "id": message.id,
                    "kind": kind,
                    "reason": reason,
                }
            },
        )

    async def send(
        self,
        peer: str,
        body: bytes,
        traffic_class: TrafficClass = TrafficClass.INTERACTIVE,
        deadline_ms: float | None = None,
        wait: bool = True,
    ) -> MessageReceipt:
        """Queue `body` to `peer`; with `wait`, return once the peer acknowledged it."""
        if peer not in self.peers:
            raise ProtocolError(f"unknown peer {peer!r}", peer=peer)
        if traffic_class not in MESSAGE_CLASSES:
            raise ProtocolError(
                f"class {traffic_class.value!r} is not a message class (control, interactive);"
                " send bulk data with `transferd send`"
            )
        if len(body) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
        budget_ms = self.default_deadline_ms if deadline_ms is None else deadline_ms
        if not budget_ms >= 0:
            raise ProtocolError(f"deadline_ms must be >= 0, got {budget_ms}")
        if self._runner is None:
            raise TransportError("message service is not running")
        now = self.clock()
        message = _Outgoing(
            id=f"{self.site}-{os.getpid()}-{next(self._ids)}-{secrets.token_hex(4)}",
            peer=peer,
            traffic_class=traffic_class,
            body=body,
            queued_at=now,
            deadline=now + budget_ms / 1000.0,
            done=asyncio.get_running_loop().create_future(),
        )
        self.metrics.count("sent", peer, traffic_class)
        pump = self.pump(peer)
        await pump.put(traffic_class, len(body), message, deadline=pump.now() + budget_ms / 1000.0)
        if not wait:
            return MessageReceipt(message.id, peer, traffic_class, False, False, None, None)
        # Bounded even if a worker died: every attempt has its own request timeout.
        async with asyncio.timeout(budget_ms / 1000.0 + self.request_timeout_s * self.attempts):
            return await asyncio.shield(message.done)

    def _session(self, peer: str, traffic_class: TrafficClass) -> aiohttp.ClientSession:
        if self.session_for is not None:
            return self.session_for(peer, traffic_class)
        return self._sessions[(peer, traffic_class)]

    async def _keep_warm(self, peer: str, interval_s: float) -> None:
        """Open (or keep open) the peer's interactive pool with one cheap GET per connection,
        every `interval_s` while no message is on its way (then the messages keep it warm);
        retried after a second while the peer does not answer yet."""
        url = self.peers[peer] + PEER_ROUTE
        n = self.workers[TrafficClass.INTERACTIVE]

        async def ping(session: aiohttp.ClientSession) -> bool:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    return resp.status == 204
            except (aiohttp.ClientError, TimeoutError, OSError):
                return False

        while True:
            warm = True
            idle = self.pump(peer).scheduler.queued_bytes(TrafficClass.INTERACTIVE) == 0
            if self._busy[peer] == 0 and idle:
                session = self._session(peer, TrafficClass.INTERACTIVE)
                try:
                    async with asyncio.timeout(self.request_timeout_s):
                        warm = all(await asyncio.gather(*(ping(session) for _ in range(n))))
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
            session = self._session(peer, traffic_class)
            self._busy[peer] += 1
            try:
                receipt = await self._deliver(session, message)
            except TransferdError as exc:
                self._record_miss(message, "delivery_failed", f"not delivered: {exc}")
                if not message.done.done():
                    message.done.set_exception(exc)
            else:
                if not message.done.done():
                    message.done.set_result(receipt)
            finally:
                self._busy[peer] -= 1

    async def _deliver(self, session: aiohttp.ClientSession, message: _Outgoing) -> MessageReceipt:
        url = self.peers[message.peer] + PEER_ROUTE
        headers = {
            H_ID: message.id,
            H_CLASS: message.traffic_class.value,
            H_SENT: f"{message.queued_at:.6f}",
            "Content-Type": "application/octet-stream",
        }
        if message.deadline is not None:
            headers[H_DEADLINE] = f"{message.deadline:.6f}"
        last: TransferdError | None = None
        for attempt in range(self.attempts):
            signed = dict(headers)
            signed.update(self.auth.sign(message.peer, "POST", PEER_ROUTE, message.body))
            try:
                async with session.post(url, data=ChunkBody(message.body), headers=signed) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise error_from_json(resp.status, answer)
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                last = TransportError(f"peer {message.peer}: {exc!r}", peer=message.peer)
                await asyncio.sleep(0.02 * (attempt + 1))
                continue
            break
        else:
            assert last is not None
            raise last
        done_at = self.clock()
        late = bool(answer.get("late")) if isinstance(answer, dict) else False
        if late and message.miss_reason is None:
            assert message.deadline is not None
            over_ms = (float(answer.get("received_at", done_at)) - message.deadline) * 1000.0
            message.miss_reason = f"reached {message.peer} {over_ms:.1f} ms after its deadline"
            self._record_miss(message, "delivered_late", message.miss_reason)
        self.metrics.count("delivered", message.peer, message.traffic_class)
        return MessageReceipt(
            id=message.id,
            peer=message.peer,
            traffic_class=message.traffic_class,
            delivered=True,
            late=late,
            latency_ms=(done_at - message.queued_at) * 1000.0,
            budget_miss=message.miss_reason,
        )

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self, source: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Accept a message from an authenticated peer; idempotent on (source, message id)."""
        try:
            message_id = headers[H_ID]
            traffic_class = TrafficClass(headers[H_CLASS])
            sent_at = float(headers[H_SENT])
            deadline = float(headers[H_DEADLINE]) if H_DEADLINE in headers else None
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed message headers: {exc!r}") from exc
        if traffic_class not in MESSAGE_CLASSES or not 0 < len(message_id) <= 128:
            raise ProtocolError("message class or id out of range")
        key = (source, message_id)
        if key in self._seen:
            return self._seen[key]  # a retry of a message already delivered
        received_at = self.clock()
        late = deadline is not None and received_at > deadline
        message = InboxMessage(
            message_id, source, traffic_class, sent_at, deadline, received_at, late, body
        )
        if self.hook_command:
            self._hook_queue.put_nowait(message)
        else:
            await self.inbox.put(message)
        self.metrics.count("received", source, traffic_class)
        if late:
            self.metrics.count("received_late", source, traffic_class)
            assert deadline is not None
            log.warning(
                "message.late",
                extra={
                    "fields": {
                        "from": source,
                        "id": message_id,
                        "late_ms": round((received_at - deadline) * 1000, 1),
                    }
                },
            )
        answer = {"id": message_id, "late": late, "received_at": received_at}
        self._seen[key] = answer
        while len(self._seen) > 100_000:
            self._seen.popitem(last=False)
        return answer

    async def _hook_worker(self) -> None:
        assert self.hook_command is not None
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


def _chain(
    first: Callable[[BudgetMiss], None] | None, second: Callable[[BudgetMiss], None]
) -> Callable[[BudgetMiss], None]:
    if first is None:
        return second

    def both(miss: BudgetMiss) -> None:
        first(miss)
        second(miss)

    return both


# -- aiohttp adapter ------------------------------------------------------------------------------


def _error_response(exc: TransferdError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.http_status)


SERVICE_KEY: web.AppKey[MessageService] = web.AppKey("transferd_messages", MessageService)


def add_message_routes(
    app: web.Application, service: MessageService, local_auth: LocalAuth | None = None
) -> None:
    """Mount the three message routes and tie the service's lifetime to the app's.
    `local_auth` guards the two local routes (the daemon's CLI signatures); None leaves them open
    to whoever can reach the listener (tests, or a listener on a private socket)."""
    app[SERVICE_KEY] = service

    def check_local(request: web.Request, body: bytes) -> None:
        if local_auth is not None:
            local_auth(request.headers, request.method, request.raw_path, body)

    async def lifespan(_app: web.Application) -> Any:
        await service.start()
        yield
        await service.close()

    app.cleanup_ctx.append(lifespan)

    async def post_message(request: web.Request) -> web.Response:
        try:
            query = request.rel_url.query
            traffic_class = TrafficClass(query.get("class", TrafficClass.INTERACTIVE.value))
            deadline_ms = float(query["deadline_ms"]) if "deadline_ms" in query else None
            wait = query.get("wait", "1") not in ("0", "false")
        except ValueError as exc:
            return _error_response(ProtocolError(f"bad query: {exc}"))
        if request.content_length is not None and request.content_length > MAX_MESSAGE_BYTES:
            return _error_response(ProtocolError(f"message exceeds {MAX_MESSAGE_BYTES} bytes"))
        body = await request.read()
        try:
            check_local(request, body)
            receipt = await service.send(
                request.match_info["peer"], body, traffic_class, deadline_ms, wait=wait
            )
        except TransferdError as exc:
            return _error_response(exc)
        return web.json_response(receipt.to_json(), status=200 if wait else 202)

    async def receive_message(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            source = service.auth.verify(request.headers, request.method, request.raw_path, body)
            answer = await service.receive(source, request.headers, body)
        except AuthError as exc:
            log.warning("message.refused", extra={"fields": {"reason": exc.message}})
            return _error_response(exc)
        except TransferdError as exc:
            return _error_response(exc)
        return web.json_response(answer)

    async def get_inbox(request: web.Request) -> web.Response:
        try:
            wait_ms = float(request.rel_url.query.get("wait_ms", "0"))
            max_messages = int(request.rel_url.query.get("max", "100"))
        except ValueError as exc:
            return _error_response(ProtocolError(f"bad query: {exc}"))
        # Bound the long-poll: a proxy or client timeout is usually about a minute.
        wait_s = min(max(wait_ms, 0.0), 60_000.0) / 1000.0
        try:
            check_local(request, b"")
        except TransferdError as exc:
            return _error_response(exc)
        messages = await service.inbox.get(wait_s, max(1, min(max_messages, 10_000)))
        return web.json_response({"messages": [m.to_json() for m in messages]})

    app.router.add_post("/v1/messages/{peer}", post_message)
    async def warm_up(_request: web.Request) -> web.Response:
        return web.Response(status=204)  # a peer opening its interactive pool; says nothing

    app.router.add_post(PEER_ROUTE, receive_message)
    app.router.add_get(PEER_ROUTE, warm_up)
    app.router.add_get("/v1/inbox", get_inbox)


# -- Python client --------------------------------------------------------------------------------


async def _local_call(
    daemon_url: str,
    method: str,
    path_qs: str,
    body: bytes,
    session: aiohttp.ClientSession | None,
    sign: LocalSigner | None,
) -> Any:
    headers = dict(sign(method, path_qs, body)) if sign is not None else {}
    url = daemon_url.rstrip("/") + path_qs
    owned = session is None
    client = session or aiohttp.ClientSession()
    try:
        async with client.request(
            method, URL(url, encoded=True), data=ChunkBody(body) if body else None, headers=headers
        ) as resp:
            status, answer = resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        raise TransportError(f"{method} {url}: {exc!r}") from exc
    finally:
        if owned:
            await client.close()
    if status not in (200, 202):
        raise error_from_json(status, answer)
    return answer


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
    """Ask the local daemon at `daemon_url` to deliver `body` to `peer`."""
    query = {"class": traffic_class.value, "wait": "1" if wait else "0"}
    if deadline_ms is not None:
        query["deadline_ms"] = f"{deadline_ms:g}"
    path_qs = f"/v1/messages/{quote(peer, safe='')}?{urlencode(query)}"
    answer = await _local_call(daemon_url, "POST", path_qs, body, session, sign)
    return MessageReceipt.from_json(answer)


async def read_inbox(
    daemon_url: str,
    *,
    wait_ms: float = 0.0,
    max_messages: int = 100,
    session: aiohttp.ClientSession | None = None,
    sign: LocalSigner | None = None,
) -> list[InboxMessage]:
    """Take up to `max_messages` from the local daemon's inbox, waiting up to `wait_ms`."""
    path_qs = "/v1/inbox?" + urlencode({"wait_ms": f"{wait_ms:g}", "max": str(max_messages)})
    answer = await _local_call(daemon_url, "GET", path_qs, b"", session, sign)
    if not isinstance(answer, dict) or not isinstance(answer.get("messages"), list):
        raise ProtocolError("inbox answer has no message list")
    return [InboxMessage.from_json(item) for item in answer["messages"]]
