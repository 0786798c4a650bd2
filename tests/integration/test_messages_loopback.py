"""Interactive messages between two minimal aiohttp apps on 127.0.0.1 ephemeral ports: delivery,
long-poll, budget misses, late flags, authentication, unreachable peers, the hook, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from transferd import TrafficClass
from transferd.errors import AuthError, ProtocolError, StorageError, TransportError
from transferd.net.messages import (
    Inbox,
    MessageMetrics,
    MessageService,
    add_message_routes,
    read_inbox,
    send_message,
)

SECRET = b"pair-secret-for-tests"


class HmacAuth:
    """A minimal per-pair HMAC (the daemon wires its own, replay-protected scheme)."""

    def __init__(self, site: str) -> None:
        self.site = site

    def _mac(self, src: str, dst: str, method: str, path_qs: str, body: bytes) -> str:
        text = b"\n".join([src.encode(), dst.encode(), method.encode(), path_qs.encode(), body])
        return hmac.new(SECRET, text, hashlib.sha256).hexdigest()

    def sign(self, peer: str, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return {
            "X-Test-Site": self.site,
            "X-Test-Sig": self._mac(self.site, peer, method, path_qs, body),
        }

    def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        src = headers.get("X-Test-Site", "")
        want = self._mac(src, self.site, method, path_qs, body)
        if not hmac.compare_digest(want, headers.get("X-Test-Sig", "")):
            raise AuthError("bad request signature", status=401)
        return src


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _url(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def serve(service: MessageService, sock: socket.socket) -> AsyncIterator[str]:
    app = web.Application()
    add_message_routes(app, service)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield _url(sock)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def site_pair(
    **b_kwargs: object,
) -> AsyncIterator[tuple[str, str, MessageService, MessageService]]:
    sa, sb = _listening_socket(), _listening_socket()
    a = MessageService("A", {"B": _url(sb)}, HmacAuth("A"))
    b = MessageService("B", {"A": _url(sa)}, HmacAuth("B"), **b_kwargs)  # type: ignore[arg-type]
    async with serve(a, sa) as url_a, serve(b, sb) as url_b:
        yield url_a, url_b, a, b


async def test_message_is_delivered_to_the_peer_inbox_with_its_bytes() -> None:
    async with site_pair() as (url_a, url_b, a, b):
        body = bytes(range(256)) * 16
        receipt = await send_message(url_a, "B", body, deadline_ms=5000)
        assert receipt.delivered
        assert receipt.peer == "B"
        assert not receipt.late
        assert receipt.budget_miss is None
        [got] = await read_inbox(url_b, wait_ms=0)
        assert got.body == body
        assert got.source == "A"
        assert got.id == receipt.id
        assert got.traffic_class is TrafficClass.INTERACTIVE
        assert not got.late
        assert await read_inbox(url_b, wait_ms=0) == []  # read once
        assert a.metrics.delivered == {"B": 1}
        assert b.metrics.received == {"A": 1}


async def test_long_poll_returns_when_a_message_arrives() -> None:
    async with site_pair() as (url_a, url_b, _a, _b):
        reader = asyncio.create_task(read_inbox(url_b, wait_ms=20_000))
        await asyncio.sleep(0)  # let the reader start waiting
        await send_message(url_a, "B", b"policy update v7", deadline_ms=5000)
        async with asyncio.timeout(15):
            messages = await reader
        assert [m.body for m in messages] == [b"policy update v7"]


async def test_message_that_cannot_meet_its_deadline_is_a_counted_logged_miss_and_arrives_late(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    sa, sb = _listening_socket(), _listening_socket()
    a = MessageService("A", {"B": _url(sb)}, HmacAuth("A"), metrics=MessageMetrics(registry))
    b = MessageService("B", {"A": _url(sa)}, HmacAuth("B"))
    caplog.set_level(logging.WARNING, logger="transferd.messages")
    async with serve(a, sa) as url_a, serve(b, sb) as url_b:
        receipt = await send_message(url_a, "B", b"x" * 4096, deadline_ms=0)
        assert receipt.delivered
        assert receipt.late
        assert receipt.budget_miss is not None
        assert receipt.budget_miss.startswith("arrived ")
        [got] = await read_inbox(url_b)
        assert got.late
        assert got.body == b"x" * 4096
    assert a.metrics.budget_misses == {("B", "arrived_late"): 1}
    assert b.metrics.received_late == {"A": 1}
    sample = registry.get_sample_value(
        "transferd_messages_budget_misses_total", {"peer": "B", "kind": "arrived_late"}
    )
    assert sample == 1.0
    [record] = [r for r in caplog.records if r.getMessage() == "message.budget_miss"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["peer"] == "B"
    assert fields["kind"] == "arrived_late"
    assert fields["reason"].endswith("after its deadline")


async def test_unsigned_or_forged_requests_are_refused_and_nothing_is_stored() -> None:
    async with site_pair() as (_url_a, url_b, _a, b), aiohttp.ClientSession() as http:
        headers = {
            "X-Transferd-Message-Id": "m1",
            "X-Transferd-Class": "interactive",
            "X-Transferd-Sent-At": "0",
        }
        async with http.post(f"{url_b}/v1/peer/messages", data=b"evil", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["kind"] == "auth"
        forged = {**headers, **HmacAuth("A").sign("B", "POST", "/v1/peer/messages", b"good")}
        async with http.post(f"{url_b}/v1/peer/messages", data=b"evil", headers=forged) as resp:
            assert resp.status == 401
        assert len(b.inbox) == 0
        assert b.metrics.received == {}


async def test_bad_requests_name_the_problem() -> None:
    async with site_pair() as (url_a, _url_b, _a, _b):
        with pytest.raises(ProtocolError, match="unknown peer 'Z'"):
            await send_message(url_a, "Z", b"hi")
        with pytest.raises(ProtocolError, match="not a message class"):
            await send_message(url_a, "B", b"hi", traffic_class=TrafficClass.CHECKPOINT)
        async with aiohttp.ClientSession() as http:
            url = f"{url_a}/v1/messages/B?deadline_ms=soon"
            async with http.post(url, data=b"hi") as resp:
                assert resp.status == 400
                assert "bad query" in (await resp.json())["error"]


async def test_unreachable_peer_fails_the_send_and_counts_a_miss() -> None:
    dead = _listening_socket()  # bound, never listening: connections are refused
    sa = _listening_socket()
    a = MessageService("A", {"C": _url(dead)}, HmacAuth("A"), request_timeout_s=5)
    async with serve(a, sa) as url_a:
        with pytest.raises(TransportError):
            await send_message(url_a, "C", b"hello", deadline_ms=1000)
    dead.close()
    assert a.metrics.budget_misses == {("C", "delivery_failed"): 1}
    assert a.metrics.delivered == {}


async def test_full_inbox_refuses_and_the_sender_reports_it() -> None:
    async with site_pair(inbox=Inbox(max_messages=1)) as (url_a, _url_b, a, _b):
        await send_message(url_a, "B", b"first", deadline_ms=5000)
        with pytest.raises(StorageError, match="inbox full"):
            await send_message(url_a, "B", b"second", deadline_ms=5000)
        assert a.metrics.budget_misses == {("B", "delivery_failed"): 1}


async def test_hook_command_consumes_messages(tmp_path: Path) -> None:
    out = tmp_path / "hooked"
    script = (
        "import os, sys; data = sys.stdin.buffer.read();"
        "src = os.environ['TRANSFERD_MESSAGE_FROM'].encode();"
        f"open({str(out)!r}, 'ab').write(src + b':' + data)"
    )
    async with site_pair(hook_command=[sys.executable, "-c", script]) as (url_a, url_b, _a, b):
        await send_message(url_a, "B", b"embedding-42", deadline_ms=5000)
        for _ in range(200):  # the hook runs after the peer acknowledged: wait for it, bounded
            if out.exists() and out.read_bytes():
                break
            await asyncio.sleep(0.05)
        assert out.read_bytes() == b"A:embedding-42"
        assert await read_inbox(url_b) == []
        assert len(b.inbox) == 0


async def test_failing_hook_keeps_the_message_in_the_inbox() -> None:
    async with site_pair(hook_command=[sys.executable, "-c", "raise SystemExit(3)"]) as (
        url_a,
        url_b,
        _a,
        _b,
    ):
        await send_message(url_a, "B", b"keep me", deadline_ms=5000)
        messages = await read_inbox(url_b, wait_ms=10_000)
        assert [m.body for m in messages] == [b"keep me"]
