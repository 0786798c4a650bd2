"""The framed peer hop between two real daemons on 127.0.0.1: interactive messages go over it
(not over B's HTTP message route), its opening refuses the unsigned, the forged and the
replayed, and A falls back to HTTP when B is older or the hop breaks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import transferd.daemon
import transferd.net.message_hop
import transferd.net.server
from tests.integration._procs import poll_until
from transferd import TrafficClass, local_signer, read_inbox, send_message
from transferd.daemon import Daemon
from transferd.errors import ProtocolError, TransferdError, TransportError
from transferd.net.message_hop import HopLink, HopUnsupported
from transferd.net.peer_client import PeerLink
from transferd.protocol import channel as ch
from transferd.protocol import message_hop as mh
from transferd.protocol import message_socket as ms
from transferd.protocol.auth import EMPTY_BODY_BLAKE3, sign_headers
from transferd.protocol.messages import MAX_MESSAGE_BYTES, MessageEnvelope, MessageQuery
from transferd.protocol.wire import MESSAGE_HOP_ROUTE
from transferd.testing import loopback_pair


def _paths(daemon: Daemon, path: str) -> float:
    return daemon.metrics.value("transferd_message_paths_total", peer="B", path=path)


async def _send(a: Daemon, body: bytes, **kw: Any) -> Any:
    return await send_message(a.url, "B", body, deadline_ms=5000, sign=local_signer(a.keyring),
                              **kw)


async def test_a_message_arrives_over_the_hop_while_b_http_message_route_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parse_query = transferd.net.server.parse_query

    def broken(model: type[Any], query: Any) -> Any:
        if model is MessageEnvelope:
            raise ProtocolError("the HTTP message route is broken in this test")
        return parse_query(model, query)

    # B's HTTP route parses the envelope from the headers with this; the hop does not use it.
    monkeypatch.setattr(transferd.net.server, "parse_query", broken)
    async with loopback_pair(tmp_path) as (a, b):
        assert a.messages.hops["B"].connection() is not None
        bodies = [bytes([i]) * 4096 for i in range(20)]
        receipts = await asyncio.gather(*(_send(a, body) for body in bodies))
        assert all(r.delivered and not r.late for r in receipts)
        got = await read_inbox(b.url, wait_ms=0, max_messages=100,
                               sign=local_signer(b.keyring))
        assert sorted(m.body for m in got) == sorted(bodies)
        assert {m.source for m in got} == {"A"}
        assert _paths(a, "hop") == 20
        assert _paths(a, "http") == 0


async def test_control_messages_and_large_ones_keep_the_http_path(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        await _send(a, b"ctl", traffic_class=TrafficClass.CONTROL)
        # (through the service: the local HTTP client warns on a raw body this large)
        await a.messages.send("B", b"x" * (mh.HOP_MAX_BODY_BYTES + 1), MessageQuery())
        await _send(a, b"small")
        assert (_paths(a, "http"), _paths(a, "hop")) == (2, 1)
        # 100 KiB would hold a 50 ms-deadline message behind it on the one FIFO connection.
        await a.messages.send("B", b"y" * (100 << 10), MessageQuery())
        assert (_paths(a, "http"), _paths(a, "hop")) == (3, 1)
        got = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert len(got) == 4


async def test_late_messages_are_flagged_on_the_hop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transferd.messages")
    async with loopback_pair(tmp_path) as (a, b):
        # B's clock runs 10 s ahead: every message reaches it after its 5 s deadline.
        b.messages.clock = lambda: b.clock() + 10.0
        receipt = await _send(a, b"late")
        assert receipt.delivered
        assert receipt.late
        assert receipt.budget_miss is not None
        assert "after its deadline" in receipt.budget_miss
        assert _paths(a, "hop") == 1
        [got] = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert got.late
        assert any(r.getMessage() == "message.late" for r in caplog.records)


async def test_an_older_peer_without_the_hop_gets_messages_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="transferd.messages")
    build_app = transferd.daemon.build_app

    def older_b(**kwargs: Any) -> Any:
        if kwargs["messages"].site == "B":
            kwargs["hop_server"] = None  # B's app as before the hop: no such route (404)
        return build_app(**kwargs)

    monkeypatch.setattr(transferd.daemon, "build_app", older_b)
    async with loopback_pair(tmp_path) as (a, b):
        assert a.messages.hops["B"].state == "unsupported"
        receipt = await _send(a, b"to an older daemon")
        assert receipt.delivered
        assert (_paths(a, "http"), _paths(a, "hop")) == (1, 0)
        [got] = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert got.body == b"to an older daemon"
    [line] = [r for r in caplog.records if r.getMessage() == "message.hop_unsupported"]
    assert "HTTP 404" in line.fields["error"]  # type: ignore[attr-defined]


async def test_a_broken_hop_falls_back_then_is_opened_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="transferd.messages")
    async with loopback_pair(tmp_path) as (a, b):
        hop = a.messages.hops["B"]
        conn = hop.connection()
        assert conn is not None
        open_hop = hop.open
        may_open = asyncio.Event()

        async def open_when_allowed() -> Any:
            if not may_open.is_set():
                raise TransportError("not opened yet in this test", peer="B")
            return await open_hop()

        hop.open = open_when_allowed  # type: ignore[method-assign]
        for serving in list(b.hop_server.connections):
            serving.transport.close()
        async with asyncio.timeout(10):
            await conn.closed
        receipt = await _send(a, b"while it is down")
        assert receipt.delivered
        assert (_paths(a, "http"), _paths(a, "hop")) == (1, 0)
        may_open.set()
        hop.poke()
        async with asyncio.timeout(10):
            while hop.connection() is None:
                await hop.up.wait()
                await asyncio.sleep(0)
        await _send(a, b"once it is back")
        got = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert [m.body for m in got] == [b"while it is down", b"once it is back"]
        assert (_paths(a, "http"), _paths(a, "hop")) == (1, 1)
        events = [r.getMessage() for r in caplog.records]
        assert "message.hop_down" in events
        assert events.count("message.hop_up") >= 2  # A's hop twice (and B's own to A)


# -- the opening, by hand ---------------------------------------------------------------------


async def _open(b: Daemon, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                     mh.Upgraded]:
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    writer.write(request)
    buf = b""
    while (answer := mh.parse_response_head(buf)) is None:
        chunk = await reader.read(4096)
        assert chunk, "closed before an answer"
        buf += chunk
    return reader, writer, answer


def _signed_request(a: Daemon, b: Daemon, nonce: bytes) -> bytes:
    path_qs = f"{MESSAGE_HOP_ROUTE}?nonce={nonce.hex()}"
    signed = sign_headers(a.keyring.secret_for("B"), method="GET", path_qs=path_qs,
                          body_blake3=EMPTY_BODY_BLAKE3, src="A", dst="B", now=a.clock())
    return mh.upgrade_request(f"127.0.0.1:{b.port}", path_qs, signed)


async def _refused_frame(reader: asyncio.StreamReader, after_head: bytes) -> tuple[int, bytes]:
    """The ERROR frame (request 0) the receiver sends before it closes, and its status."""
    async with asyncio.timeout(10):  # a hang guard
        data = after_head + await reader.read()  # until the receiver closes
    [(kind, payload)] = ms.FrameReader().feed(data)
    assert kind is ms.Frame.ERROR
    _seq, request_seq, status = mh._REPLY.unpack_from(payload)
    assert request_seq == 0
    return status, payload


async def test_the_hop_opening_refuses_unsigned_forged_and_replayed(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        _no_reopening(a)  # B keeps one hop per peer: A's would replace ours
        before = b.metrics.value("transferd_auth_failures_total", reason="message hop")
        # Unsigned: refused before the switch, like any unsigned peer request.
        nonce = ch.challenge()
        path_qs = f"{MESSAGE_HOP_ROUTE}?nonce={nonce.hex()}"
        _r, w, answer = await _open(b, mh.upgrade_request("x", path_qs, {}))
        assert answer.status == 401
        w.close()

        # Signed, then a wrong proof: the receiver answers an error and closes.
        said = ch.Hello("A", "B", ch.challenge())
        request = _signed_request(a, b, said.client_nonce)
        reader, w, answer = await _open(b, request)
        assert answer.status == 101
        server_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
        secret = a.keyring.secret_for("B")
        ch.check_accept(secret, said, server_nonce,
                        bytes.fromhex(answer.headers[mh.H_ACCEPT.lower()]))
        w.write(ms.encode_frame(ms.Frame.AUTH, bytes(ch.PROOF_BYTES)))
        status, _ = await _refused_frame(reader, answer.body_start)
        assert status == 401
        w.close()
        assert b.metrics.value("transferd_auth_failures_total",
                               reason="message hop") == before + 1

        # The same signed request again: its nonce was used (replay refused).
        _r, w, answer = await _open(b, request)
        assert answer.status == 401
        w.close()

        # A genuine opening recorded, then its proof replayed on a fresh opening (a new
        # challenge): refused; and a SEND before AUTH is refused too.
        said = ch.Hello("A", "B", ch.challenge())
        reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
        old_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
        recorded = ch.proof(secret, said, old_nonce)
        w.write(ms.encode_frame(ms.Frame.AUTH, recorded))
        await w.drain()
        w.close()
        reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
        assert answer.status == 101
        assert bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()]) != old_nonce
        w.write(ms.encode_frame(ms.Frame.AUTH, recorded))
        status, _ = await _refused_frame(reader, answer.body_start)
        assert status == 401
        w.close()
        assert b.metrics.value("transferd_auth_failures_total",
                               reason="message hop") == before + 2
        # Nothing reached B's inbox, and A still reaches B.
        assert await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring)) == []
        assert (await _send(a, b"still fine")).delivered


async def test_a_frame_injected_into_the_hop_closes_it_and_stores_nothing(
    tmp_path: Path
) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        _no_reopening(a)  # B keeps one hop per peer: A's would replace ours
        said = ch.Hello("A", "B", ch.challenge())
        secret = a.keyring.secret_for("B")
        reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
        server_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
        w.write(ms.encode_frame(ms.Frame.AUTH, ch.proof(secret, said, server_nonce)))
        envelope = mh.envelope_json(_envelope())
        # A SEND under another session's key (an attacker's guess), then one replayed.
        wrong = ch.Session(bytes(32))
        w.write(mh.encode_send(wrong, 1, envelope, b"injected"))
        status, _ = await _refused_frame(reader, answer.body_start)
        assert status == 401
        w.close()
        # A genuine SEND sequence with its seq replayed: the first lands, the replay closes.
        said = ch.Hello("A", "B", ch.challenge())
        reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
        server_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
        session = ch.Session.derive(secret, said, server_nonce)
        w.write(ms.encode_frame(ms.Frame.AUTH, ch.proof(secret, said, server_nonce)))
        frame = mh.encode_send(session, 1, envelope, b"once")
        w.write(frame)
        replies = ms.FrameReader()
        frames = replies.feed(answer.body_start)
        async with asyncio.timeout(10):  # a hang guard
            while not frames:
                chunk = await reader.read(4096)
                assert chunk, "closed before the RECEIPT"
                frames += replies.feed(chunk)
            w.write(frame)  # the same frame again, once the first was answered
            frames += replies.feed(await reader.read())  # until B closes
        w.close()
        assert [kind for kind, _ in frames] == [ms.Frame.RECEIPT, ms.Frame.ERROR]
        assert b"replayed" in frames[1][1]
        got = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert [m.body for m in got] == [b"once"]


def _envelope() -> MessageEnvelope:
    now = time.time()
    return MessageEnvelope(id="injected-1", traffic_class=TrafficClass.INTERACTIVE,
                           sent_at=now, deadline=now + 5)


async def test_auth_and_a_send_in_one_write_are_both_taken(tmp_path: Path) -> None:
    """A sender pipelines its first SENDs right behind AUTH: when they arrive in the same read,
    the SEND is held to the authenticated frame limit, not the handshake's 256 bytes."""
    async with loopback_pair(tmp_path) as (a, b):
        _no_reopening(a)  # B keeps one hop per peer: A's would replace ours
        said = ch.Hello("A", "B", ch.challenge())
        secret = a.keyring.secret_for("B")
        reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
        server_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
        session = ch.Session.derive(secret, said, server_nonce)
        body = b"s" * 4096
        w.write(ms.encode_frame(ms.Frame.AUTH, ch.proof(secret, said, server_nonce))
                + mh.encode_send(session, 1, mh.envelope_json(_envelope()), body))
        replies = ms.FrameReader()
        frames = replies.feed(answer.body_start)
        async with asyncio.timeout(10):
            while not frames:
                chunk = await reader.read(4096)
                assert chunk, "the hop closed"
                frames += replies.feed(chunk)
        w.close()
        [(kind, payload)] = frames
        assert kind is ms.Frame.RECEIPT, payload
        [got] = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert got.body == body


async def test_messages_in_flight_on_a_hop_refused_mid_way_go_again_over_http(
    tmp_path: Path
) -> None:
    """B refuses the hop (ERROR(0), a protocol error) while it holds five messages: each is
    sent again over HTTP and lands once, the hop's copies finding B's ledger entry."""
    async with loopback_pair(tmp_path) as (a, b):
        receive = b.hop_server.receive
        gate = asyncio.Event()
        held: list[str] = []
        all_held = asyncio.Event()

        async def held_receive(source: str, envelope: MessageEnvelope, body: bytes) -> Any:
            held.append(envelope.id)
            if len(held) == 5:
                all_held.set()
            await gate.wait()
            return await receive(source, envelope, body)

        b.hop_server.receive = held_receive
        bodies = [b"in flight %d" % i for i in range(5)]
        sends = [asyncio.create_task(_send(a, body)) for body in bodies]
        async with asyncio.timeout(10):
            await all_held.wait()
        hop = a.messages.hops["B"]

        async def cannot_open() -> Any:
            raise TransportError("not opened again in this test", peer="B")

        hop.open = cannot_open  # type: ignore[method-assign]  # the retries: HTTP only
        [serving] = [s for s in b.hop_server.connections if s.source == "A"]
        serving.fail(ProtocolError("refused in this test"))
        async with asyncio.timeout(20):
            receipts = await asyncio.gather(*sends)
        gate.set()  # the hop's copies reach the ledger now: already stored
        assert all(r.delivered for r in receipts)
        assert (_paths(a, "http"), _paths(a, "hop")) == (5, 0)
        got = await read_inbox(b.url, wait_ms=0, max_messages=100,
                               sign=local_signer(b.keyring))
        assert sorted(m.body for m in got) == sorted(bodies)


def _no_reopening(a: Daemon) -> None:
    """A's hop to B is not opened again (the rest of the test: HTTP only)."""

    async def cannot_open() -> Any:
        raise TransportError("not opened again in this test", peer="B")

    a.messages.hops["B"].open = cannot_open  # type: ignore[method-assign]


def _b_stops_reading(b: Daemon) -> None:
    """B's end of A's hop reads nothing more, as a peer gone without a FIN (or a NAT that
    dropped the flow): A's frames are not answered and no FIN or RST comes back."""
    [serving] = [s for s in b.hop_server.connections if s.source == "A"]
    serving.transport.pause_reading()


async def test_a_message_on_a_hop_whose_peer_went_silent_goes_over_http(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transferd.messages")
    async with loopback_pair(tmp_path) as (a, b):
        assert a.messages.hops["B"].connection() is not None
        _no_reopening(a)
        _b_stops_reading(b)
        async with asyncio.timeout(20):  # a hang guard: A's request timeout is 30 s
            receipt = await _send(a, b"to a silent hop")
        assert receipt.delivered
        assert (_paths(a, "http"), _paths(a, "hop")) == (1, 0)
        got = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert [m.body for m in got] == [b"to a silent hop"]
        assert "message.hop_silent" in [r.getMessage() for r in caplog.records]


async def test_an_idle_hop_whose_peer_went_silent_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transferd.net.message_hop, "IDLE_PING_S", 0.1)
    async with loopback_pair(tmp_path) as (a, b):
        hop = a.messages.hops["B"]
        conn = hop.connection()
        assert conn is not None
        _no_reopening(a)
        _b_stops_reading(b)
        async with asyncio.timeout(20):
            reason = await conn.closed
        assert "silent" in reason
        assert hop.connection() is None


async def test_the_hop_runs_over_mutual_tls(tmp_path: Path) -> None:
    from transferd.testing import loopback_tls

    async with loopback_pair(tmp_path, tls=loopback_tls(tmp_path / "tls")) as (a, b):
        assert a.links["B"].url.startswith("https://")
        assert a.messages.hops["B"].connection() is not None
        # (through the services: the local API is on https too, with the site's certificate)
        receipt = await a.messages.send("B", b"over tls", MessageQuery(deadline_ms=5000))
        assert receipt.delivered
        assert (_paths(a, "hop"), _paths(a, "http")) == (1, 0)
        [got] = await b.messages.inbox.get(0, 10)
        assert got.body == b"over tls"


async def test_an_https_peer_without_a_tls_section_gets_tls_not_plaintext(
    tmp_path: Path
) -> None:
    """A site without `tls` that names a peer by https:// verifies it against the system's
    trust store, as its HTTP path does: the hop's first bytes are a TLS ClientHello."""
    first: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first.append(await reader.read(4))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, loopback_pair(tmp_path) as (a, _b):
        link = PeerLink(site="A", peer="B", url=f"https://127.0.0.1:{port}", keys=a.keyring,
                        streams=1, clock=time.time)
        with pytest.raises(TransferdError):
            async with asyncio.timeout(10):
                await HopLink(link).open()
    assert first[0][:1] == b"\x16"  # a TLS handshake record, not "GET "


async def test_a_bug_in_an_opening_leaves_the_hop_down_and_the_daemon_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transferd.messages")
    async with loopback_pair(tmp_path) as (a, b):
        hop = a.messages.hops["B"]
        tries = 0
        tried_twice = asyncio.Event()

        async def buggy_open() -> Any:
            nonlocal tries
            tries += 1
            if tries == 2:
                tried_twice.set()
            raise UnicodeEncodeError("ascii", "b\u00fccher", 1, 2, "in this test")

        hop.open = buggy_open  # type: ignore[method-assign]
        conn = hop.connection()
        assert conn is not None
        conn.close(TransportError("closed in this test"))
        async with asyncio.timeout(20):
            await tried_twice.wait()  # keep() lived through the first and tried again
        assert hop.connection() is None
        receipt = await _send(a, b"over http meanwhile")
        assert receipt.delivered
        assert (_paths(a, "http"), _paths(a, "hop")) == (1, 0)
        assert "message.hop_open_failed" in [r.getMessage() for r in caplog.records]


async def _until(condition: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return condition()

    await poll_until(probe, bool, timeout_s=20.0, every_s=0.01)


async def _hand_hop(a: Daemon, b: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                   ch.Session, bytes]:
    """A hop from "A" opened by hand and authenticated (AUTH sent): reader, writer, session,
    the bytes already read after the 101."""
    said = ch.Hello("A", "B", ch.challenge())
    secret = a.keyring.secret_for("B")
    reader, w, answer = await _open(b, _signed_request(a, b, said.client_nonce))
    server_nonce = bytes.fromhex(answer.headers[mh.H_CHALLENGE.lower()])
    w.write(ms.encode_frame(ms.Frame.AUTH, ch.proof(secret, said, server_nonce)))
    return reader, w, ch.Session.derive(secret, said, server_nonce), answer.body_start


def _from_a(b: Daemon) -> list[Any]:
    return [s for s in b.hop_server.connections if s.source == "A"]


async def test_b_keeps_one_hop_per_peer_the_newest(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        _no_reopening(a)
        first_reader, first_w, session, _ = await _hand_hop(a, b)
        first_w.write(mh.encode_ping(session, 1))
        await _until(lambda: len(_from_a(b)) == 1)  # A's own hop was replaced by this one
        _reader, w, _session, _ = await _hand_hop(a, b)
        async with asyncio.timeout(20):
            rest = await first_reader.read()  # until B drops the older hop
        assert [kind for kind, _ in ms.FrameReader().feed(rest)] == [ms.Frame.RECEIPT]
        await _until(lambda: len(_from_a(b)) == 1)
        first_w.close()
        w.close()


async def _a_hop_b_cannot_answer(a: Any, b: Any) -> tuple[Any, asyncio.StreamWriter]:
    """A hop opened from A by hand (A's own kept from reopening), authenticated at B, whose
    replies A never reads, filled until B's transport holds them: B's serving end and the
    hand-opened writer."""
    _no_reopening(a)
    _reader, w, session, _ = await _hand_hop(a, b)
    await _until(lambda: len(_from_a(b)) == 1 and _from_a(b)[0].authenticated)
    [serving] = _from_a(b)
    await _fill_b_replies(serving, w, session)
    return serving, w


async def _fill_b_replies(serving: Any, w: asyncio.StreamWriter, session: ch.Session) -> None:
    """Pings, their answers never read: once the kernel's buffers are full B's replies wait
    in its transport, which then stops reading this peer instead of buffering more."""
    seq = 1
    async with asyncio.timeout(60):  # a hang guard
        while serving.reading:
            w.write(b"".join(mh.encode_ping(session, seq + i) for i in range(2000)))
            seq += 2000
            await asyncio.sleep(0)


async def test_b_stops_reading_a_peer_that_does_not_read_its_replies(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        serving, w = await _a_hop_b_cannot_answer(a, b)
        assert serving.write_blocked
        w.close()


async def test_stopping_b_does_not_wait_for_a_hop_that_reads_nothing(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        serving, w = await _a_hop_b_cannot_answer(a, b)
        assert serving.transport.get_write_buffer_size() > 0
        b.hop_server.close()
        async with asyncio.timeout(20):
            await serving.closed  # aborted: its unread replies are dropped
        w.close()


async def test_a_peer_answering_the_upgrade_with_503_is_down_not_older(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import web

    async def unavailable(self: Any, request: Any, source: str) -> Any:
        raise web.HTTPServiceUnavailable()

    async with loopback_pair(tmp_path) as (a, b):
        monkeypatch.setattr(type(b.hop_server), "serve", unavailable)
        with pytest.raises(TransportError, match="HTTP 503") as refused:
            async with asyncio.timeout(20):
                await HopLink(a.links["B"]).open()
        assert not isinstance(refused.value, HopUnsupported)  # asked again in seconds


async def test_a_poke_ends_the_wait_before_asking_an_older_peer_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_app = transferd.daemon.build_app

    def older_b(**kwargs: Any) -> Any:
        if kwargs["messages"].site == "B":
            kwargs["hop_server"] = None
        return build_app(**kwargs)

    monkeypatch.setattr(transferd.daemon, "build_app", older_b)
    async with loopback_pair(tmp_path) as (a, _b):
        hop = a.messages.hops["B"]
        assert hop.state == "unsupported"
        tried = asyncio.Event()
        open_hop = hop.open

        async def noted_open() -> Any:
            tried.set()
            return await open_hop()

        hop.open = noted_open  # type: ignore[method-assign]
        hop.poke()  # B upgraded and restarted: it opened its own hop here
        async with asyncio.timeout(20):  # RECHECK_S is 300 s
            await tried.wait()


async def test_a_hop_the_peer_drops_at_once_is_reopened_with_a_growing_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        hop = a.messages.hops["B"]
        conn = hop.connection()
        assert conn is not None
        # B drops every hop as soon as it authenticates (say, a bug on B's side).
        monkeypatch.setattr(type(b.hop_server), "authenticated",
                            lambda self, serving: serving.abort())
        pauses: list[float] = []
        four = asyncio.Event()

        async def noted_pause(delay_s: float) -> None:
            pauses.append(delay_s)
            if len(pauses) == 4:
                four.set()
            await asyncio.sleep(0.01 if len(pauses) < 4 else 3600)

        hop._pause = noted_pause  # type: ignore[method-assign]
        conn.close(TransportError("closed in this test"))
        async with asyncio.timeout(20):
            await four.wait()
        assert pauses == sorted(pauses), pauses
        assert pauses[3] > pauses[0], pauses  # (0.1, 0.1, 0.1, 0.1 before: reset at each up)


async def test_closing_an_opening_cancels_its_answer_and_a_send_that_cannot_be_encoded_leaves_nothing_pending(  # noqa: E501
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opening = transferd.net.message_hop.HopConnection("B")
    opening.close(TransportError("given up in this test"))
    assert opening.head.cancelled()

    async with loopback_pair(tmp_path) as (a, _b):
        conn = a.messages.hops["B"].connection()
        assert conn is not None
        monkeypatch.setattr(mh, "envelope_json", lambda _envelope: b"{" + b" " * 70_000)
        with pytest.raises(ProtocolError, match="envelope of"):
            conn.request(_envelope(), b"x")
        assert conn.pending == {}
        assert conn._watch is None  # nothing awaited: no watchdog armed


async def test_the_hop_refuses_a_body_past_its_limit_and_receive_past_the_message_limit(
    tmp_path: Path
) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        _no_reopening(a)
        reader, w, session, after_head = await _hand_hop(a, b)
        envelope = mh.envelope_json(_envelope())
        w.write(mh.encode_send(session, 1, envelope, b"m" * (mh.HOP_MAX_BODY_BYTES + 1)))
        replies = ms.FrameReader()
        frames = replies.feed(after_head)
        async with asyncio.timeout(10):  # a hang guard
            while not frames:
                chunk = await reader.read(4096)
                assert chunk, "closed before the answer"
                frames += replies.feed(chunk)
            # The head of a frame past the hop's frame limit (its length alone refuses it).
            w.write(mh.encode_send(session, 2, envelope,
                                   b"b" * (mh.HOP_MAX_FRAME_BYTES + 1))[:64])
            frames += replies.feed(await reader.read())  # until B closes
        w.close()
        [(k1, p1), (k2, p2)] = frames
        assert (k1, mh._REPLY.unpack_from(p1)[1:]) == (ms.Frame.ERROR, (1, 400))
        assert b"larger messages go over HTTP" in p1
        assert (k2, mh._REPLY.unpack_from(p2)[1:]) == (ms.Frame.ERROR, (0, 400))
        assert await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring)) == []
        with pytest.raises(ProtocolError, match="exceeds"):
            await b.messages.receive("A", _envelope(), b"x" * (MAX_MESSAGE_BYTES + 1))
