"""The message service: sends small objects to peers through their schedulers and keeps the
inbox of received ones (the wire format and its rules are `protocol.messages`).

Sends go through the peer's `SchedulerPump` (control strict, interactive earliest-deadline-first;
the pump the daemon's bulk path shares) and out over the peer client (`PeerLink`: the pair's
signatures, one connection pool per class, the one retry with backoff). A message that cannot
meet its deadline is counted and logged as a budget miss with the reason and still delivered;
one that reaches the peer after its deadline comes back flagged `late`. `run()` holds every
worker, the pool warmer and the inbox hook in one TaskGroup, which the daemon owns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from netplan.plan import TrafficClass
from transferd.errors import ProtocolError, StorageError, TransferdError, TransportError
from transferd.net.peer_client import INTERACTIVE_POOL, PeerLink, retrying
from transferd.net.pump import SchedulerPump
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
from transferd.protocol.wire import PEER_MESSAGES_ROUTE, parse_body
from transferd.site.metrics import Metrics

__all__ = ["Inbox", "MessageService"]

log = logging.getLogger("transferd.messages")


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
            try:
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

    async def _deliver(self, message: _Outgoing) -> MessageReceipt:
        link = self.links[message.peer]

        async def attempt() -> MessageAck:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    reply = await link.call(
                        message.traffic_class,
                        "POST",
                        PEER_MESSAGES_ROUTE,
                        body=message.body,
                        headers=message.envelope.headers(),
                    )
            except TimeoutError as exc:
                raise TransportError(
                    f"{message.peer}: no answer within {self.request_timeout_s:g} s",
                    peer=message.peer,
                ) from exc
            return parse_body(MessageAck, reply.body)

        ack = await retrying(
            attempt,
            budget_s=self.retry_budget_s,
            on_retry=lambda _exc, _delay: self.metrics.retries.labels(message.peer).inc(),
            first_delay_s=0.02,
        )
        done_at = self.clock()
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
        ack, message = self.ledger.accept(source, envelope, body, self.clock())
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
