"""The message socket (`protocol.message_socket`) against real daemons on 127.0.0.1: messages
delivered end to end and pipelined on one connection beside the HTTP route, the socket's file
permissions, clients that do not hold the site's secret refused with nothing delivered, and a
client that outlives its daemon's restart. Then the daemon's end alone on a real socket (its
message service held in the test's hand): requests during the daemon's stop refused with that
reason, memory bounded per client (reading paused, small frames and a deadline before the
handshake), and a file at the socket's path left alone."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from tests.integration._procs import cli, poll_until, start_daemon, wait_until_serving
from transferd import MessageSocket, TrafficClass, local_signer, read_inbox, send_message
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.errors import (
    AuthError,
    ConfigError,
    ProtocolError,
    TransferdError,
    TransportError,
)
from transferd.net.messages import MessageService, MessageSocketServer, message_socket_path
from transferd.protocol import message_socket as ms
from transferd.protocol.auth import PairSecrets
from transferd.protocol.messages import MessageQuery, MessageReceipt
from transferd.site.keys import Keyring
from transferd.site.metrics import Metrics
from transferd.testing import free_port, loopback_pair, running_daemon, write_site_configs


class _WrongSecret:
    """Site A's name with a secret that is not A's."""

    site = "A"

    def secret_for(self, _site: str) -> bytes:
        return b"\x01" * 32


async def test_messages_go_end_to_end_pipelined_beside_the_http_route(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, b), MessageSocket(a.url, a.keyring) as messages:
        bodies = [os.urandom(4096) for _ in range(20)]
        receipts = await asyncio.gather(*(
            messages.send("B", body, traffic_class=TrafficClass.INTERACTIVE, deadline_ms=5000)
            for body in bodies))
        over_http = await send_message(a.url, "B", b"over http", deadline_ms=5000,
                                       sign=local_signer(a.keyring))
        got = await read_inbox(b.url, wait_ms=0, max_messages=100, sign=local_signer(b.keyring))
        assert all(r.delivered and r.peer == "B" and not r.late for r in receipts)
        by_id = {m.id: m for m in got}
        assert [by_id[r.id].body for r in receipts] == bodies
        assert by_id[over_http.id].body == b"over http"
        assert all(by_id[r.id].source == "A" for r in receipts)
        # Queued only (wait=False): the daemon answers at once, delivery follows.
        queued = await messages.send("B", b"later", wait=False)
        assert not queued.delivered
        path = a.message_socket_path() or ""
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert os.stat(os.path.dirname(path)).st_uid == os.geteuid()


async def test_daemon_errors_come_back_as_the_package_errors(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, _b), MessageSocket(a.url, a.keyring) as messages:
        with pytest.raises(ProtocolError, match="unknown peer 'Z'"):
            await messages.send("Z", b"x")
        with pytest.raises(ProtocolError, match="deadline_ms"):
            await messages.send("B", b"x", deadline_ms=-1)
        # The connection is still good after refused requests.
        assert (await messages.send("B", b"fine", deadline_ms=5000)).delivered


async def test_a_request_that_times_out_or_breaks_is_an_error_and_the_daemon_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with loopback_pair(tmp_path) as (a, _b), MessageSocket(a.url, a.keyring) as messages:
        real = a.messages.send
        failures: list[BaseException] = [TimeoutError(), RuntimeError("a bug")]

        async def failing(*args: object, **kwargs: object) -> object:
            if failures:
                raise failures.pop(0)
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(a.messages, "send", failing)
        with pytest.raises(TransportError, match="no receipt in time"):
            await messages.send("B", b"x", deadline_ms=5000)
        with pytest.raises(TransferdError, match="internal error: RuntimeError"):
            await messages.send("B", b"x", deadline_ms=5000)
        assert (await messages.send("B", b"still serving", deadline_ms=5000)).delivered


async def _raw(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def _frame(reader: asyncio.StreamReader) -> tuple[ms.Frame, bytes]:
    frames = ms.FrameReader()
    while True:
        data = await reader.read(65536)
        assert data, "the daemon closed the connection without a frame"
        if got := frames.feed(data):
            return got[0]


async def test_clients_without_the_sites_secret_are_refused_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        path = a.message_socket_path()
        assert path is not None
        refused = a.metrics.value
        # A SEND before any handshake.
        reader, writer = await _raw(path)
        writer.write(ms.encode_send(1, b'{"peer": "B"}', b"evil"))
        kind, payload = await _frame(reader)
        assert kind is ms.Frame.ERROR
        assert b"HELLO" in ms.decode_reply(payload)[2]
        assert await reader.read() == b""  # closed
        writer.close()
        # A client with the wrong secret: the daemon refuses its proof.
        reader, writer = await _raw(path)
        nonce = os.urandom(ms.NONCE_BYTES)
        writer.write(ms.encode_frame(ms.Frame.HELLO, ms.MAGIC, nonce))
        kind, payload = await _frame(reader)
        assert kind is ms.Frame.CHALLENGE
        server_nonce = payload[:ms.NONCE_BYTES]
        writer.write(ms.encode_frame(ms.Frame.AUTH,
                                     ms.client_proof(b"\x01" * 32, nonce, server_nonce)))
        writer.write(ms.encode_send(1, b'{"peer": "B"}', b"evil"))
        kind, payload = await _frame(reader)
        assert kind is ms.Frame.ERROR
        _, status, body = ms.decode_reply(payload)
        assert status == 401
        assert b'"kind": "auth"' in body
        assert await reader.read() == b""
        writer.close()
        assert refused("transferd_auth_failures_total", reason="message socket") == 1
        # And the client side: a daemon that does not prove the secret is not trusted.
        wrong: PairSecrets = _WrongSecret()
        client = MessageSocket(a.url, wrong)
        with pytest.raises(AuthError, match="did not prove this site's own secret"):
            await client._open(path)
        client.close()
        assert len(b.messages.inbox) == 0
        assert a.metrics.value("transferd_messages_sent_total", peer="B",
                               **{"class": "interactive"}) == 0


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _leave_stale_socket(path: str) -> None:
    """What a daemon killed with SIGKILL leaves: a bound socket file nobody listens on."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert _exists(path)


async def test_a_client_outlives_its_daemons_restart(tmp_path: Path) -> None:
    ports = {"A": free_port(), "B": free_port()}
    paths = write_site_configs(tmp_path, ports)
    async with running_daemon(load_config(paths["B"])) as b:
        async with running_daemon(load_config(paths["A"])) as a:
            url = a.url
            messages = MessageSocket(url, a.keyring)
            assert (await messages.send("B", b"before", deadline_ms=5000)).delivered
            socket_path = a.message_socket_path()
        assert socket_path is not None
        assert not _exists(socket_path)
        # The daemon is gone: a clear TransportError, naming where it was looked for.
        with pytest.raises(TransportError) as down:
            await messages.send("B", b"while down", deadline_ms=5000)
        assert url in str(down.value) or socket_path in str(down.value)
        # A stale socket file left by a killed daemon does not stop the next one.
        _leave_stale_socket(socket_path)
        async with running_daemon(load_config(paths["A"])) as a2:
            assert isinstance(a2, Daemon)
            assert (await messages.send("B", b"after", deadline_ms=5000)).delivered
        messages.close()
        got = await read_inbox(b.url, wait_ms=0, sign=local_signer(b.keyring))
        assert [m.body for m in got] == [b"before", b"after"]


async def test_a_client_that_sent_nothing_while_its_daemon_restarted_carries_on(
    tmp_path: Path,
) -> None:
    # Its kept-alive HTTP connection (the socket's discovery) is to the daemon that stopped.
    ports = {"A": free_port(), "B": free_port()}
    paths = write_site_configs(tmp_path, ports)
    async with running_daemon(load_config(paths["B"])):
        async with running_daemon(load_config(paths["A"])) as a:
            messages = MessageSocket(a.url, a.keyring)
            assert (await messages.send("B", b"before", deadline_ms=5000)).delivered
        async with running_daemon(load_config(paths["A"])):
            assert (await messages.send("B", b"after", deadline_ms=5000)).delivered
        messages.close()


async def test_served_daemons_killed_and_restarted_keep_the_socket_working(
    tmp_path: Path,
) -> None:
    # `transferd serve` runs on uvloop, as in production; a SIGKILL leaves its socket file.
    ports = {"A": free_port(), "B": free_port()}
    paths = write_site_configs(tmp_path, ports)
    logs = {s: tmp_path / f"{s}.log" for s in ports}
    procs = {s: start_daemon(paths[s], logs[s]) for s in ("B", "A")}
    url = f"http://127.0.0.1:{ports['A']}"
    keys = Keyring.load(tmp_path / "keys", "A", [])
    messages = MessageSocket(url, keys)
    try:
        for site in ("A", "B"):
            await wait_until_serving(f"http://127.0.0.1:{ports[site]}")
        assert (await messages.send("B", b"one", deadline_ms=5000)).delivered
        procs["A"].kill()
        await asyncio.to_thread(procs["A"].wait)
        with pytest.raises(TransportError):
            await messages.send("B", b"while down", deadline_ms=5000)
        procs["A"] = start_daemon(paths["A"], logs["A"])
        await wait_until_serving(url)
        assert (await messages.send("B", b"two", deadline_ms=5000)).delivered
    finally:
        messages.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            await asyncio.to_thread(proc.wait, 20)


async def test_a_state_dir_too_deep_for_a_unix_socket_gets_a_private_directory(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # past sockaddr_un's 108 bytes
    async with loopback_pair(deep) as (a, _b), MessageSocket(a.url, a.keyring) as messages:
        path = a.message_socket_path()
        assert path is not None
        assert not path.startswith(str(deep))
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert (await messages.send("B", b"deep", deadline_ms=5000)).delivered
    assert not _exists(os.path.dirname(path))  # removed with the daemon


async def test_an_oversized_message_says_so_and_spares_the_other_requests(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path) as (a, _b), MessageSocket(a.url, a.keyring) as messages:
        small = asyncio.create_task(messages.send("B", b"fine", deadline_ms=5000))
        with pytest.raises(ProtocolError, match=f"of {17 << 20} bytes exceeds {16 << 20}"):
            await messages.send("B", b"x" * (17 << 20))
        assert (await small).delivered


async def test_the_daemons_reason_for_closing_the_connection_reaches_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with loopback_pair(tmp_path) as (a, _b), MessageSocket(a.url, a.keyring) as messages:
        # The daemon's frame limit made smaller than the client's: it refuses the frames and
        # closes the connection, saying why (an ERROR for the connection, request id 0).
        monkeypatch.setattr(ms, "MAX_FRAME_BYTES", 1024)
        await messages.connect()
        sends = [messages.send("B", b"x" * 4096, deadline_ms=5000) for _ in range(2)]
        for outcome in await asyncio.gather(*sends, return_exceptions=True):
            assert isinstance(outcome, ProtocolError), outcome
            assert "exceeds 1024" in outcome.message
        monkeypatch.undo()
        assert (await messages.send("B", b"next connection", deadline_ms=5000)).delivered


# -- the daemon's end alone, on a real socket ---------------------------------------------------

SECRET = b"s" * 32


class _HeldService:
    """The message service's `send`, holding every request until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []

    async def send(self, peer: str, body: bytes, query: MessageQuery) -> MessageReceipt:
        self.bodies.append(body)
        await self.release.wait()
        return MessageReceipt(id=f"m{len(self.bodies)}", peer=peer,
                              traffic_class=query.traffic_class, delivered=True, late=False,
                              latency_ms=0.0, budget_miss=None)


def _server(service: _HeldService | None = None, **limits: float) -> MessageSocketServer:
    return MessageSocketServer(cast(MessageService, service), SECRET, Metrics(),
                               **limits)  # type: ignore[arg-type]


async def _authenticated(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _raw(str(path))
    nonce = os.urandom(ms.NONCE_BYTES)
    writer.write(ms.encode_frame(ms.Frame.HELLO, ms.MAGIC, nonce))
    kind, payload = await _frame(reader)
    assert kind is ms.Frame.CHALLENGE
    writer.write(ms.encode_frame(ms.Frame.AUTH,
                                 ms.client_proof(SECRET, nonce, payload[:ms.NONCE_BYTES])))
    assert (await _frame(reader))[0] is ms.Frame.READY
    return reader, writer


async def _frames(reader: asyncio.StreamReader, count: int) -> list[tuple[ms.Frame, bytes]]:
    frames, got = ms.FrameReader(), []
    while len(got) < count:
        data = await reader.read(65536)
        assert data, f"the daemon closed the connection after {len(got)} of {count} frames"
        got += frames.feed(data)
    return got


async def _until(condition: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return condition()

    await poll_until(probe, bool, timeout_s=10.0, every_s=0.005)


async def test_a_request_while_the_daemon_stops_is_refused_with_that_reason(
    tmp_path: Path,
) -> None:
    """The daemon cancels `run()` with its other tasks and closes the socket later: a SEND in
    between is refused (it used to reach a finished TaskGroup: RuntimeError, and asyncio's
    'protocol.data_received() call failed' traceback)."""
    loop = asyncio.get_running_loop()
    failures: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    server = _server(_HeldService())
    path = await server.start(tmp_path / "messages.sock")
    run = asyncio.create_task(server.run())
    try:
        reader, writer = await _authenticated(path)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        writer.write(ms.encode_send(7, b'{"peer": "B"}', b"late"))
        [(kind, payload)] = await _frames(reader, 1)
        request_id, status, body = ms.decode_reply(payload)
        assert (kind, request_id, status) == (ms.Frame.ERROR, 0, 502)
        assert b"the daemon is stopping" in body
        assert await reader.read() == b""
        writer.close()
        # A client connecting in the same window hears the same.
        reader, writer = await _raw(str(path))
        [(kind, payload)] = await _frames(reader, 1)
        assert kind is ms.Frame.ERROR
        assert b"the daemon is stopping" in payload
        writer.close()

        async def request() -> None:
            raise AssertionError("never runs")

        with pytest.raises(TransportError, match="the daemon is stopping"):
            server.spawn(request())  # closed, not left un-awaited
    finally:
        await server.close()
        loop.set_exception_handler(None)
    assert failures == []


async def test_a_client_whose_requests_hold_too_many_bytes_is_not_read_until_they_finish(
    tmp_path: Path,
) -> None:
    service = _HeldService()
    cap, body_size, count = 300 << 10, 256 << 10, 10
    server = _server(service, max_outstanding_bytes=cap)
    path = await server.start(tmp_path / "messages.sock")
    run = asyncio.create_task(server.run())
    try:
        reader, writer = await _authenticated(path)
        [conn] = server.connections
        for i in range(1, count + 1):
            writer.write(ms.encode_send(i, b'{"peer": "B"}', bytes([i]) * body_size))
        assert conn.transport is not None
        await _until(lambda: conn.transport is not None and not conn.transport.is_reading())
        # Paused past the cap: the rest waits in the socket, not in the daemon's memory.
        assert cap < conn.outstanding < count * body_size
        service.release.set()
        replies = await _frames(reader, count)
        assert sorted(ms.decode_reply(p)[0] for _, p in replies) == list(range(1, count + 1))
        assert all(kind is ms.Frame.RECEIPT for kind, _ in replies)
        assert [b[0] for b in service.bodies] == list(range(1, count + 1))
        await _until(lambda: conn.outstanding == 0)
        assert conn.transport.is_reading()
        writer.close()
    finally:
        run.cancel()
        await server.close()


async def test_before_the_handshake_a_client_gets_small_frames_and_little_time(
    tmp_path: Path,
) -> None:
    service = _HeldService()
    # 1 s: the authenticated client below must finish its handshake (four frames through this
    # loop) within it, which a loaded machine's stalls of a few hundred ms can overrun at 0.2 s.
    server = _server(service, handshake_timeout_s=1.0)
    path = await server.start(tmp_path / "messages.sock")
    run = asyncio.create_task(server.run())
    try:
        # A frame past the handshake's size is refused at its header, not waited for.
        reader, writer = await _raw(str(path))
        writer.write(ms.encode_frame(ms.Frame.HELLO, b"x" * 4096)[:64])
        async with asyncio.timeout(5):
            [(kind, payload)] = await _frames(reader, 1)
        assert kind is ms.Frame.ERROR
        assert f"frame of 4096 bytes exceeds {ms.HANDSHAKE_FRAME_BYTES}".encode() in payload
        assert await reader.read() == b""
        writer.close()
        # A client that never authenticates is closed once the handshake's time is up.
        reader, writer = await _raw(str(path))
        async with asyncio.timeout(5):
            [(kind, payload)] = await _frames(reader, 1)
            assert await reader.read() == b""
        assert kind is ms.Frame.ERROR
        assert b"not authenticated within 1 s" in payload
        writer.close()
        # An authenticated one is not, and may send frames up to the full size.
        reader, writer = await _authenticated(path)
        await asyncio.sleep(1.2)  # past the handshake's time
        service.release.set()
        writer.write(ms.encode_send(1, b'{"peer": "B"}', b"x" * 4096))
        [(kind, payload)] = await _frames(reader, 1)
        assert kind is ms.Frame.RECEIPT
        assert ms.decode_reply(payload)[:2] == (1, 200)
        writer.close()
    finally:
        run.cancel()
        await server.close()


@pytest.mark.parametrize("what", ["file", "directory"])
async def test_something_not_a_socket_at_the_sockets_path_is_left_alone(
    tmp_path: Path, what: str
) -> None:
    path = tmp_path / "run" / "messages.sock"
    path.parent.mkdir()
    if what == "file":
        path.write_text("someone's notes")
    else:
        path.mkdir()
    server = _server()
    with pytest.raises(ConfigError, match=f"{path} exists and is not a socket"):
        await server.start(path)
    await server.close()
    assert path.read_text() == "someone's notes" if what == "file" else path.is_dir()


async def test_serve_refuses_a_file_at_the_sockets_path_with_a_clear_message(
    tmp_path: Path,
) -> None:
    paths = write_site_configs(tmp_path, {"A": free_port(), "B": free_port()})
    path = message_socket_path(load_config(paths["A"]).state_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("someone's notes")
    code, _out, err = await cli("serve", "--config", str(paths["A"]))
    assert code == 2, err
    assert f"{path} exists and is not a socket" in err
    assert "Traceback" not in err
    assert path.read_text() == "someone's notes"
