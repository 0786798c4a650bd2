"""The message service without sockets: inbox bounds and long-poll, receive-side late flags and
idempotency on a fake clock, validation, and decoders that only raise the package's errors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transferd import TrafficClass
from transferd.errors import AuthError, ProtocolError, StorageError, TransferdError, TransportError
from transferd.net.messages import (
    H_CLASS,
    H_DEADLINE,
    H_ID,
    H_SENT,
    Inbox,
    InboxMessage,
    MessageReceipt,
    MessageService,
)


class RefuseAll:
    def sign(self, peer: str, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return {}

    def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        raise AuthError("no", status=401)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _message(i: int, size: int = 10) -> InboxMessage:
    return InboxMessage(f"m{i}", "A", TrafficClass.INTERACTIVE, 1.0, 2.0, 1.5, False, b"x" * size)


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


def _headers(message_id: str, deadline: float | None) -> dict[str, str]:
    headers = {H_ID: message_id, H_CLASS: "interactive", H_SENT: "100.0"}
    if deadline is not None:
        headers[H_DEADLINE] = str(deadline)
    return headers


async def test_receive_flags_late_arrivals_and_is_idempotent_per_source_and_id() -> None:
    clock = FakeClock(100.030)
    service = MessageService("B", {"A": "http://127.0.0.1:1"}, RefuseAll(), clock=clock)
    on_time = await service.receive("A", _headers("m1", 100.050), b"a")
    assert on_time == {"id": "m1", "late": False, "received_at": 100.030}
    clock.now = 100.080
    late = await service.receive("A", _headers("m2", 100.050), b"b")
    assert late["late"] is True
    # A retry of m2 (the ack got lost) is answered again, not stored twice.
    assert await service.receive("A", _headers("m2", 100.050), b"b") == late
    # The same id from another site is a different message.
    await service.receive("C", _headers("m2", None), b"c")
    got = await service.inbox.get(0, 10)
    assert [(m.source, m.id, m.late) for m in got] == [
        ("A", "m1", False),
        ("A", "m2", True),
        ("C", "m2", False),
    ]
    assert service.metrics.received_late == {"A": 1}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {H_ID: "m", H_CLASS: "interactive", H_SENT: "soon"},
        {H_ID: "m", H_CLASS: "bulk", H_SENT: "1"},
        {H_ID: "m", H_CLASS: "checkpoint", H_SENT: "1"},
        {H_ID: "", H_CLASS: "interactive", H_SENT: "1"},
        {H_ID: "m", H_CLASS: "interactive", H_SENT: "1", H_DEADLINE: "x"},
    ],
)
async def test_malformed_peer_headers_raise_protocol_error_and_store_nothing(
    headers: dict[str, str],
) -> None:
    service = MessageService("B", {}, RefuseAll())
    with pytest.raises(ProtocolError):
        await service.receive("A", headers, b"x")
    assert len(service.inbox) == 0


async def test_send_validates_before_queueing() -> None:
    service = MessageService("A", {"B": "http://127.0.0.1:1"}, RefuseAll())
    with pytest.raises(ProtocolError, match="unknown peer 'C'"):
        await service.send("C", b"x")
    with pytest.raises(ProtocolError, match="not a message class"):
        await service.send("B", b"x", TrafficClass.SYNC)
    with pytest.raises(ProtocolError, match="deadline_ms must be >= 0"):
        await service.send("B", b"x", deadline_ms=-1)
    with pytest.raises(TransportError, match="not running"):
        await service.send("B", b"x")


def test_inbox_message_round_trips_through_json() -> None:
    message = InboxMessage("id", "A", TrafficClass.CONTROL, 1.0, None, 2.0, True, b"\x00\xff")
    assert InboxMessage.from_json(message.to_json()) == message
    receipt = MessageReceipt("id", "B", TrafficClass.INTERACTIVE, True, True, 3.5, "late")
    assert MessageReceipt.from_json(receipt.to_json()) == receipt


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
    for decode in (InboxMessage.from_json, MessageReceipt.from_json):
        try:
            decode(data)
        except TransferdError:
            pass


@pytest.mark.parametrize("shared", [False, True])
async def test_each_class_has_its_own_pool_unless_the_baseline_shares_one(shared: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from transferd.net.peer_client import PeerLink
    from transferd.site.keys import Keyring

    keyring = Keyring(site="A", signing_key=Ed25519PrivateKey.generate())
    link = PeerLink(
        site="A",
        peer="B",
        url="http://127.0.0.1:1",
        keyring=keyring,
        streams=4,
        clock=lambda: 0.0,
        shared_pool=shared,
    )
    try:
        pools = {id(link.session(cls)) for cls in TrafficClass}
        assert len(pools) == (1 if shared else 4)
    finally:
        await link.close()


async def test_interactive_messages_to_a_distant_peer_are_all_in_flight_at_once() -> None:
    """HTTP/1.1 carries one request per connection at a time, so the pool size bounds the message
    rate to pool / RTT: 32 messages sent together must all reach a slow peer concurrently (a
    pool of 8 capped a 40 ms link at 200 messages/s and queued the rest behind it)."""
    from aiohttp import web

    from transferd.net.peer_client import INTERACTIVE_POOL, PeerLink
    from transferd.site.keys import Keyring

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
        return web.json_response({"id": request.headers[H_ID], "late": False, "received_at": 0})

    app = web.Application()
    app.router.add_post("/v1/peer/messages", peer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    link = PeerLink(
        site="A",
        peer="B",
        url=f"http://127.0.0.1:{port}",
        keyring=Keyring(site="A", signing_key=Ed25519PrivateKey.generate()),
        streams=4,
        clock=lambda: 0.0,
    )
    service = MessageService(
        "A",
        {"B": f"http://127.0.0.1:{port}"},
        RefuseAll(),
        session_for=lambda _peer, cls: link.session(cls),
    )
    try:
        async with service, asyncio.timeout(20):  # a bound, not a measurement
            receipts = await asyncio.gather(
                *(
                    service.send("B", b"x" * 4096, TrafficClass.INTERACTIVE, deadline_ms=60_000)
                    for _ in range(INTERACTIVE_POOL)
                )
            )
    finally:
        await link.close()
        await runner.cleanup()
    assert all(r.delivered for r in receipts)
    assert most == INTERACTIVE_POOL >= 32


async def test_the_interactive_pool_is_open_before_the_first_message() -> None:
    """A message must not pay a TCP handshake (a round trip on a WAN) on top of its own trip:
    the service opens the peer's interactive connections ahead of time and messages reuse them."""
    from aiohttp import web

    from transferd.net.messages import add_message_routes
    from transferd.net.peer_client import INTERACTIVE_POOL, PeerLink
    from transferd.site.keys import Keyring

    connections: set[int] = set()
    posts_on: set[int] = set()
    warmed = asyncio.Event()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        conn = id(request.protocol)
        if request.method == "POST":
            posts_on.add(conn)
        else:
            connections.add(conn)
            if len(connections) == INTERACTIVE_POOL:
                warmed.set()
        return await handler(request)

    class AcceptAll(RefuseAll):
        def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
            return "A"

    peer_app = web.Application(middlewares=[count])
    add_message_routes(peer_app, MessageService("B", {}, AcceptAll()))
    runner = web.AppRunner(peer_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    link = PeerLink(
        site="A",
        peer="B",
        url=url,
        keyring=Keyring(site="A", signing_key=Ed25519PrivateKey.generate()),
        streams=4,
        clock=lambda: 0.0,
    )
    service = MessageService(
        "A", {"B": url}, RefuseAll(), session_for=lambda _peer, cls: link.session(cls)
    )
    try:
        async with service, asyncio.timeout(20):  # a bound, not a measurement
            await warmed.wait()
            receipts = await asyncio.gather(
                *(service.send("B", b"x" * 4096, deadline_ms=60_000) for _ in range(8))
            )
    finally:
        await link.close()
        await runner.cleanup()
    assert all(r.delivered for r in receipts)
    assert posts_on
    assert posts_on <= connections  # every message rode a connection opened before it
