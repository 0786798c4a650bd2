"""The message socket (`protocol.message_socket`) against real daemons on 127.0.0.1: messages
delivered end to end and pipelined on one connection beside the HTTP route, the socket's file
permissions, clients that do not hold the site's secret refused with nothing delivered, and a
client that outlives its daemon's restart."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.integration._procs import start_daemon, wait_until_serving
from transferd import MessageSocket, TrafficClass, local_signer, read_inbox, send_message
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.errors import AuthError, ProtocolError, TransferdError, TransportError
from transferd.protocol import message_socket as ms
from transferd.protocol.auth import PairSecrets
from transferd.site.keys import Keyring
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
