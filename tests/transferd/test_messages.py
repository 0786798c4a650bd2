"""Messages: inbox bounds and long-poll, receive-side late flags and idempotency on a fake clock,
validation of headers and queries, decoders that only raise the package's errors (no sockets);
then the sending side's connection pools against a minimal fake peer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from transferd import TrafficClass
from transferd.errors import ProtocolError, StorageError, TransferdError
from transferd.net.messages import Inbox, MessageService
from transferd.net.peer_client import INTERACTIVE_POOL, PeerLink
from transferd.protocol.auth import sign_reply
from transferd.protocol.messages import (
    InboxMessage,
    MessageEnvelope,
    MessageLedger,
    MessageQuery,
    MessageReceipt,
)
from transferd.protocol.wire import parse_body, parse_query, to_body
from transferd.site.keys import Keyring
from transferd.site.metrics import Metrics


def _keyring(site: str, peer: str) -> Keyring:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Keyring(
        site=site, signing_key=Ed25519PrivateKey.generate(), secrets={peer: b"pair-secret"}
    )


def _link(url: str, shared_pool: bool = False) -> PeerLink:
    return PeerLink(
        site="A",
        peer="B",
        url=url,
        keys=_keyring("A", "B"),
        streams=4,
        clock=lambda: 0.0,
        shared_pool=shared_pool,
    )


def _message(i: int, size: int = 10) -> InboxMessage:
    return InboxMessage(
        id=f"m{i}",
        source="A",
        traffic_class=TrafficClass.INTERACTIVE,
        sent_at=1.0,
        deadline=2.0,
        received_at=1.5,
        late=False,
        body=b"x" * size,
    )


async def test_inbox_is_bounded_by_count_and_bytes() -> None:
    inbox = Inbox(max_messages=2, max_bytes=25)
    await inbox.put(_message(1))
    await inbox.put(_message(2))
    with pytest.raises(StorageError, match="inbox full"):
        await inbox.put(_message(3))
    assert [m.id for m in await inbox.get(0, 1)] == ["m1"]
    with pytest.raises(StorageError, match="inbox full"):
        await inbox.put(_message(4, size=16))  # 10 + 16 bytes > 25
    await inbox.put(_message(5, size=15))
    assert [m.id for m in await inbox.get(0, 10)] == ["m2", "m5"]


async def test_inbox_long_poll_wakes_on_put_and_returns_empty_on_timeout() -> None:
    inbox = Inbox()
    waiter = asyncio.create_task(inbox.get(wait_s=30.0, max_messages=5))
    await asyncio.sleep(0)
    await inbox.put(_message(1))
    assert [m.id for m in await waiter] == ["m1"]
    assert await inbox.get(wait_s=0.001, max_messages=5) == []


def _envelope(message_id: str, deadline: float | None) -> MessageEnvelope:
    return MessageEnvelope(
        id=message_id, traffic_class=TrafficClass.INTERACTIVE, sent_at=100.0, deadline=deadline
    )


def test_the_ledger_flags_late_arrivals_and_answers_a_retry_without_a_second_copy() -> None:
    ledger = MessageLedger()
    ack, message = ledger.accept("A", _envelope("m1", 100.050), b"a", now=100.030)
    assert (ack.late, ack.received_at) == (False, 100.030)
    assert message is not None
    assert message.body == b"a"
    ledger.record("A", ack)
    late, message = ledger.accept("A", _envelope("m2", 100.050), b"b", now=100.080)
    assert late.late
    assert message is not None
    assert message.late
    ledger.record("A", late)
    # A retry of m2 (the ack got lost) is answered again, and nothing is delivered twice.
    assert ledger.accept("A", _envelope("m2", 100.050), b"b", now=100.2) == (late, None)
    # The same id from another site is a different message.
    assert ledger.accept("C", _envelope("m2", None), b"c", now=100.2)[1] is not None


async def test_receive_stores_once_and_a_refused_message_can_come_again() -> None:
    metrics = Metrics()
    service = MessageService("B", {}, metrics, inbox=Inbox(max_messages=1), clock=lambda: 100.08)
    await service.receive("A", _envelope("m1", 100.050), b"a")
    with pytest.raises(StorageError, match="inbox full"):
        await service.receive("A", _envelope("m2", None), b"b")
    assert [m.id for m in await service.inbox.get(0, 10)] == ["m1"]
    await service.receive("A", _envelope("m1", 100.050), b"a")  # a retry: not stored again
    await service.receive("A", _envelope("m2", None), b"b")  # refused before: stored now
    assert [m.id for m in await service.inbox.get(0, 10)] == ["m2"]
    labels = {"peer": "A", "class": "interactive"}
    assert metrics.value("transferd_messages_received_total", **labels) == 2
    assert metrics.value("transferd_messages_received_late_total", **labels) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Transferd-Message-Id": "m", "X-Transferd-Class": "interactive",
         "X-Transferd-Sent-At": "soon"},
        {"X-Transferd-Message-Id": "m", "X-Transferd-Class": "bulk", "X-Transferd-Sent-At": "1"},
        {"X-Transferd-Message-Id": "m", "X-Transferd-Class": "checkpoint",
         "X-Transferd-Sent-At": "1"},
        {"X-Transferd-Message-Id": "", "X-Transferd-Class": "interactive",
         "X-Transferd-Sent-At": "1"},
        {"X-Transferd-Message-Id": "m", "X-Transferd-Class": "interactive",
         "X-Transferd-Sent-At": "1", "X-Transferd-Deadline": "x"},
    ],
)  # fmt: skip
def test_malformed_message_headers_are_protocol_errors(headers: dict[str, str]) -> None:
    with pytest.raises(ProtocolError, match="invalid MessageEnvelope"):
        parse_query(MessageEnvelope, headers)


def test_a_send_query_names_what_is_wrong() -> None:
    with pytest.raises(ProtocolError, match="class: .*'sync' is not a message class"):
        parse_query(MessageQuery, {"class": "sync"})
    with pytest.raises(ProtocolError, match="deadline_ms"):
        parse_query(MessageQuery, {"deadline_ms": "-1"})
    query = parse_query(MessageQuery, {"class": "control", "deadline_ms": "50", "wait": "0"})
    assert (query.traffic_class, query.deadline_ms, query.wait) == (
        TrafficClass.CONTROL, 50.0, False)  # fmt: skip


async def test_send_refuses_an_unknown_peer_and_an_oversized_body() -> None:
    service = MessageService("A", {"B": _link("http://127.0.0.1:1")}, Metrics())
    with pytest.raises(ProtocolError, match="unknown peer 'C'"):
        await service.send("C", b"x", MessageQuery())
    with pytest.raises(ProtocolError, match="exceeds"):
        await service.send("B", b"x" * ((16 << 20) + 1), MessageQuery())
    await service.links["B"].close()


def test_inbox_message_and_receipt_round_trip_through_json() -> None:
    message = InboxMessage(
        id="id",
        source="A",
        traffic_class=TrafficClass.CONTROL,
        sent_at=1.0,
        deadline=None,
        received_at=2.0,
        late=True,
        body=b"\x00\xff",
    )
    text = to_body(message)
    assert b'"from":"A"' in text
    assert b'"body_b64":"AP8="' in text
    assert parse_body(InboxMessage, text) == message
    receipt = MessageReceipt(
        id="id",
        peer="B",
        traffic_class=TrafficClass.INTERACTIVE,
        delivered=True,
        late=True,
        latency_ms=3.5,
        budget_miss="late",
    )
    assert parse_body(MessageReceipt, to_body(receipt)) == receipt


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
inbox_like = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        for key in ("id", "from", "class", "sent_at", "deadline", "received_at", "late", "body_b64")
    },
)


@given(st.one_of(json_values, inbox_like))
def test_decoders_only_raise_package_errors(data: object) -> None:
    text = json.dumps(data)
    for model in (InboxMessage, MessageReceipt):
        try:
            parse_body(model, text.encode())
        except TransferdError:
            pass


@pytest.mark.parametrize("shared", [False, True])
async def test_each_class_has_its_own_pool_unless_the_baseline_shares_one(shared: bool) -> None:
    link = _link("http://127.0.0.1:1", shared_pool=shared)
    try:
        pools = {id(link.session(cls)) for cls in TrafficClass}
        assert len(pools) == (1 if shared else 4)
    finally:
        await link.close()


@asynccontextmanager
async def _fake_peer(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _signed(request: web.Request, response: web.Response) -> web.Response:
    """A fake peer signs its replies as a daemon does (the pair secret of `_keyring`)."""
    body = response.body if isinstance(response.body, bytes) else b""
    nonce = request.headers["X-Transferd-Nonce"]
    response.headers.update(sign_reply(b"pair-secret", nonce, response.status, body))
    return response


def _ack(request: web.Request) -> web.Response:
    return _signed(
        request,
        web.json_response(
            {"id": request.headers["X-Transferd-Message-Id"], "late": False, "received_at": 0.0}
        ),
    )


async def test_interactive_messages_to_a_distant_peer_are_all_in_flight_at_once() -> None:
    """HTTP/1.1 carries one request per connection at a time, so the pool size bounds the message
    rate to pool / RTT: 32 messages sent together must all reach a slow peer concurrently (a
    pool of 8 capped a 40 ms link at 200 messages/s and queued the rest behind it)."""
    in_flight, most = 0, 0
    all_arrived = asyncio.Event()

    async def peer(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        await request.read()
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == INTERACTIVE_POOL:
            all_arrived.set()
        try:
            await all_arrived.wait()  # held like a long round trip until every message is here
        finally:
            in_flight -= 1
        return _ack(request)

    app = web.Application()
    app.router.add_post("/v1/peer/messages", peer)
    async with _fake_peer(app) as url:
        link = _link(url)
        service = MessageService("A", {"B": link}, Metrics(), warm_interval_s=None)
        query = MessageQuery(deadline_ms=60_000)
        try:
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(service.run())
                async with asyncio.timeout(20):  # a bound, not a measurement
                    receipts = await asyncio.gather(
                        *(service.send("B", b"x" * 4096, query) for _ in range(INTERACTIVE_POOL))
                    )
                runner.cancel()
        finally:
            await link.close()
    assert all(r.delivered for r in receipts)
    assert most == INTERACTIVE_POOL >= 32


async def test_the_interactive_pool_is_open_before_the_first_message() -> None:
    """A message must not pay a TCP handshake (a round trip on a WAN) on top of its own trip:
    the service opens the peer's interactive connections ahead of time and messages reuse them."""
    connections: set[int] = set()
    posts_on: set[int] = set()
    warmed = asyncio.Event()

    async def warm_up(request: web.Request) -> web.Response:
        connections.add(id(request.protocol))
        if len(connections) == INTERACTIVE_POOL:
            warmed.set()
        return _signed(request, web.Response(status=204))

    async def receive(request: web.Request) -> web.Response:
        posts_on.add(id(request.protocol))
        await request.read()
        return _ack(request)

    app = web.Application()
    app.router.add_get("/v1/peer/messages", warm_up)
    app.router.add_post("/v1/peer/messages", receive)
    async with _fake_peer(app) as url:
        link = _link(url)
        service = MessageService("A", {"B": link}, Metrics())
        query = MessageQuery(deadline_ms=60_000)
        try:
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(service.run())
                async with asyncio.timeout(20):  # a bound, not a measurement
                    await warmed.wait()
                    receipts = await asyncio.gather(
                        *(service.send("B", b"x" * 4096, query) for _ in range(8))
                    )
                runner.cancel()
        finally:
            await link.close()
    assert all(r.delivered for r in receipts)
    assert posts_on
    assert posts_on <= connections  # every message rode a connection opened before it
