"""Interactive messages between two real daemons on 127.0.0.1 ephemeral ports, on the daemons'
one HTTP stack (their request signatures, error mapping and metrics): delivery, long-poll,
budget misses, late flags, refused requests, unreachable peers, a full inbox, the hook."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from transferd import TrafficClass, local_signer, read_inbox, send_message
from transferd.daemon import Daemon
from transferd.errors import ProtocolError, StorageError, TransportError
from transferd.protocol.auth import body_blake3, sign_headers
from transferd.protocol.wire import PEER_MESSAGES_ROUTE
from transferd.testing import bound_socket, loopback_pair, running_daemon, write_site_configs


def _value(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.value(f"transferd_messages_{name}_total", **labels)


async def test_message_is_delivered_to_the_peer_inbox_with_its_bytes(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        body = bytes(range(256)) * 16
        receipt = await send_message(
            a.url, "B", body, deadline_ms=5000, sign=local_signer(a.keyring)
        )
        assert receipt.delivered
        assert receipt.peer == "B"
        assert not receipt.late
        assert receipt.budget_miss is None
        [got] = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert got.body == body
        assert got.source == "A"
        assert got.id == receipt.id
        assert got.traffic_class is TrafficClass.INTERACTIVE
        assert not got.late
        assert await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring)) == []
        assert _value(a, "delivered", peer="B", **{"class": "interactive"}) == 1
        assert _value(b, "received", peer="A", **{"class": "interactive"}) == 1


async def test_long_poll_returns_when_a_message_arrives(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        reader = asyncio.create_task(
            read_inbox(b.url, wait_ms=20_000, sign=local_signer(b.keyring))
        )
        await asyncio.sleep(0)  # let the reader start waiting
        await send_message(
            a.url, "B", b"policy update v7", deadline_ms=5000, sign=local_signer(a.keyring)
        )
        async with asyncio.timeout(15):
            messages = await reader
        assert [m.body for m in messages] == [b"policy update v7"]


async def test_message_that_cannot_meet_its_deadline_is_a_counted_logged_miss_and_arrives_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transferd.messages")
    async with loopback_pair(tmp_path) as (a, b):
        receipt = await send_message(
            a.url, "B", b"x" * 4096, deadline_ms=0, sign=local_signer(a.keyring)
        )
        assert receipt.delivered
        assert receipt.late
        assert receipt.budget_miss is not None
        assert receipt.budget_miss.startswith("arrived ")
        [got] = await read_inbox(b.url, sign=local_signer(b.keyring))
        assert got.late
        assert got.body == b"x" * 4096
        assert _value(a, "budget_misses", peer="B", kind="arrived_late") == 1
        assert _value(b, "received_late", peer="A", **{"class": "interactive"}) == 1
    [record] = [r for r in caplog.records if r.getMessage() == "message.budget_miss"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["peer"] == "B"
    assert fields["kind"] == "arrived_late"
    assert fields["reason"].endswith("after its deadline")


async def test_unsigned_or_tampered_messages_are_refused_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    async with loopback_pair(tmp_path) as (a, b), aiohttp.ClientSession() as http:
        envelope = {
            "X-Transferd-Message-Id": "m1",
            "X-Transferd-Class": "interactive",
            "X-Transferd-Sent-At": f"{time.time():.3f}",
        }
        url = b.url + PEER_MESSAGES_ROUTE
        async with http.post(url, data=b"evil", headers=envelope) as resp:
            assert resp.status == 401
            assert (await resp.json())["kind"] == "auth"
        # Signed by A for another body: the body was swapped, or damaged, on the way.
        signed = sign_headers(
            a.keyring.secret_for("B"),
            method="POST",
            path_qs=PEER_MESSAGES_ROUTE,
            body_blake3=body_blake3(b"good"),
            src="A",
            dst="B",
            now=time.time(),
        )
        async with http.post(url, data=b"evil", headers={**envelope, **signed}) as resp:
            assert resp.status == 422
            assert (await resp.json())["kind"] == "integrity"
        assert len(b.messages.inbox) == 0
        assert _value(b, "received", peer="A", **{"class": "interactive"}) == 0
        assert b.metrics.value("transferd_integrity_failures_total", peer="A", side="receiver")


async def test_bad_requests_name_the_problem(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, _b):
        sign = local_signer(a.keyring)
        with pytest.raises(ProtocolError, match="unknown peer 'Z'"):
            await send_message(a.url, "Z", b"hi", sign=sign)
        with pytest.raises(ProtocolError, match="not a message class"):
            await send_message(
                a.url, "B", b"hi", traffic_class=TrafficClass.CHECKPOINT, sign=sign
            )
        path_qs = "/v1/messages/B?deadline_ms=soon"
        async with aiohttp.ClientSession() as http:
            headers = sign("POST", path_qs, b"hi")
            async with http.post(a.url + path_qs, data=b"hi", headers=headers) as resp:
                assert resp.status == 400
                assert "deadline_ms" in (await resp.json())["error"]


async def test_unreachable_peer_fails_the_send_and_counts_a_miss(tmp_path: Path) -> None:
    sock, dead = bound_socket(), bound_socket()  # C: bound, never listening: refused
    ports = {"A": sock.getsockname()[1], "C": dead.getsockname()[1]}
    paths = write_site_configs(tmp_path, ports)
    from transferd.config import load_config

    async with running_daemon(load_config(paths["A"]), sock) as a:
        with pytest.raises(TransportError):
            await send_message(a.url, "C", b"hello", deadline_ms=1000, sign=local_signer(a.keyring))
        assert _value(a, "budget_misses", peer="C", kind="delivery_failed") == 1
        assert _value(a, "delivered", peer="C", **{"class": "interactive"}) == 0
    dead.close()


async def test_full_inbox_refuses_and_the_sender_reports_it(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        b.messages.inbox.max_messages = 1
        sign = local_signer(a.keyring)
        await send_message(a.url, "B", b"first", deadline_ms=5000, sign=sign)
        with pytest.raises(StorageError, match="inbox full"):
            await send_message(a.url, "B", b"second", deadline_ms=5000, sign=sign)
        assert _value(a, "budget_misses", peer="B", kind="delivery_failed") == 1


async def test_hook_command_consumes_messages(tmp_path: Path) -> None:
    out = tmp_path / "hooked"
    script = (
        "import os, sys; data = sys.stdin.buffer.read();"
        "src = os.environ['TRANSFERD_MESSAGE_FROM'].encode();"
        f"open({str(out)!r}, 'ab').write(src + b':' + data)"
    )
    hook = {"traffic": {"inbox_hook": [sys.executable, "-c", script]}}
    async with loopback_pair(tmp_path, B=hook) as (a, b):
        await send_message(
            a.url, "B", b"embedding-42", deadline_ms=5000, sign=local_signer(a.keyring)
        )
        for _ in range(200):  # the hook runs after the peer acknowledged: wait for it, bounded
            if out.exists() and out.read_bytes():
                break
            await asyncio.sleep(0.05)
        assert out.read_bytes() == b"A:embedding-42"
        assert await read_inbox(b.url, sign=local_signer(b.keyring)) == []


async def test_failing_hook_keeps_the_message_in_the_inbox(tmp_path: Path) -> None:
    hook = {"traffic": {"inbox_hook": [sys.executable, "-c", "raise SystemExit(3)"]}}
    async with loopback_pair(tmp_path, B=hook) as (a, b):
        await send_message(a.url, "B", b"keep me", deadline_ms=5000, sign=local_signer(a.keyring))
        messages = await read_inbox(b.url, wait_ms=10_000, sign=local_signer(b.keyring))
        assert [m.body for m in messages] == [b"keep me"]
