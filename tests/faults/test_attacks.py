"""An attacker on the link between two daemons: requests captured in flight and replayed (at
once, and after the receiver restarted, including one dated ahead inside the allowed skew),
tampered with, forged with the wrong key, unsigned, stale, from the future, reflected, or sent
to the local API with a peer's key. Every one is refused, nothing is written or delivered
twice, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import blake3
import pytest

from tests.faults.conftest import Tally
from tests.integration._data import file_blake3, tree_digests, write_random
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.net.channels import OutgoingChunk
from transferd.protocol.auth import MARK_STEP_S, sign_headers
from transferd.protocol.channel import ReceiptStatus
from transferd.protocol.messages import MessageEnvelope
from transferd.protocol.wire import PEER_MESSAGES_ROUTE
from transferd.site.keys import keygen
from transferd.testing import (
    LinkProxy,
    bound_socket,
    free_port,
    running_daemon,
    wait_for_jobs,
    write_site_configs,
)

ATTACKS = "attacks (forged, tampered, stale, unsigned, replayed)"
FIGURE = ATTACKS  # what a failure here counts against (conftest.tally)
CHUNK = 64 * 1024


def rebind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def raw_request(port: int, raw: bytes) -> int:
    """Send bytes as they are (a captured request) and return the reply's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()


async def replay_channel(b: Daemon, port: int, raw: bytes) -> int:
    """Replay a captured data channel (its opening and chunk frames, as they crossed) to B's
    data listener: 401 when B refused it and counted it as an auth failure without staging a
    chunk, 200 when a chunk was taken."""
    def value(name: str, **labels: str) -> float:
        return b.metrics.registry.get_sample_value(name, labels) or 0.0

    refusals = value("transferd_auth_failures_total", reason="data channel")
    chunks = value("transferd_chunks_received_total", peer="A")

    def replay() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(raw)
            got = b""
            with contextlib.suppress(OSError):
                while part := sock.recv(65536):
                    got += part
            return got

    answer = await asyncio.to_thread(replay)
    refused = value("transferd_auth_failures_total", reason="data channel") == refusals + 1
    taken = value("transferd_chunks_received_total", peer="A") > chunks
    # The listener answers the opening with its challenge (16 bytes) and nothing more.
    return 200 if taken or len(answer) > 16 else (401 if refused else 500)


def with_header(raw: bytes, name: str, value: str) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = [
        f"{name}: {value}".encode() if line.lower().startswith(name.lower().encode() + b":")
        else line
        for line in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines) + sep + body


def header(raw: bytes, name: str) -> str:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise KeyError(name)


class Sites:
    """A and B as in-process daemons, A reaching B (control and data channels) through a
    capturing proxy; B restartable."""

    def __init__(self, root: Path, proxy: LinkProxy, stack: contextlib.AsyncExitStack) -> None:
        self.root, self.proxy, self.stack = root, proxy, stack
        self.a: Daemon
        self.b: Daemon
        self._b_stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        socks = {"A": bound_socket(), "B": bound_socket()}
        self.ports = {s: k.getsockname()[1] for s, k in socks.items()}
        self.data_port = free_port()
        self.proxy.target_port, self.proxy.data_target_port = self.ports["B"], self.data_port
        await self.stack.enter_async_context(self.proxy)
        self.paths = write_site_configs(
            self.root, self.ports, peer_urls={"B": self.proxy.url}, chunk_size=CHUNK,
            data_ports={"B": self.data_port}, data_addresses={"B": self.proxy.data_address},
        )
        self.a = await self.stack.enter_async_context(
            running_daemon(load_config(self.paths["A"]), socks["A"])
        )
        await self._start_b(socks["B"])

    async def _start_b(self, sock: socket.socket) -> None:
        self._b_stack = contextlib.AsyncExitStack()
        self.b = await self._b_stack.enter_async_context(
            running_daemon(load_config(self.paths["B"]), sock)
        )

    async def restart_b(self) -> None:
        assert self._b_stack is not None
        await self._b_stack.aclose()
        await asyncio.sleep(1.1)  # a real restart takes about this long; marks are 1 s coarse
        await self._start_b(rebind(self.ports["B"]))

    async def close(self) -> None:
        if self._b_stack is not None:
            await self._b_stack.aclose()


@contextlib.asynccontextmanager
async def sites(root: Path) -> AsyncIterator[Sites]:
    async with contextlib.AsyncExitStack() as stack:
        s = Sites(root, LinkProxy(capture=True), stack)
        await s.start()
        try:
            yield s
        finally:
            await s.close()


def future_message(s: Sites, ahead_s: float, message_id: str) -> bytes:
    """A genuine message request from A to B, signed with A's key, dated `ahead_s` ahead."""
    body = b'{"attack": "future-dated"}'
    envelope = MessageEnvelope.model_validate(
        {
            "X-Transferd-Message-Id": message_id,
            "X-Transferd-Class": "interactive",
            "X-Transferd-Sent-At": str(s.a.clock()),
        }
    )
    headers = {
        "Host": f"127.0.0.1:{s.ports['B']}",
        "Content-Length": str(len(body)),
        **envelope.headers(),
        **sign_headers(
            s.a.keyring.secret_for("B"),
            method="POST",
            path_qs=PEER_MESSAGES_ROUTE,
            body_blake3=blake3.blake3(body).hexdigest(),
            src="A",
            dst="B",
            now=s.a.clock() + ahead_s,
        ),
    }
    head = f"POST {PEER_MESSAGES_ROUTE} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode() + b"\r\n" + body


async def test_captured_requests_replayed_before_and_after_a_restart_are_refused(
    tmp_path: Path, tally: Tally
) -> None:
    digest = write_random(tmp_path / "site-A" / "approved" / "m.bin", 5 * CHUNK + 3, seed=1)
    async with sites(tmp_path) as s:
        [job] = await wait_for_jobs(s.a, s.a.sender.submit("approved/m.bin", ["B"]))
        assert job.state == "committed", job.error
        await s.a.messages.send("B", b"hello", _query())
        future = future_message(s, ahead_s=250, message_id="future-1")
        assert await raw_request(s.ports["B"], future) == 200  # genuine: delivered once
        # HTTP requests (a chunk's capture is its body only: its channel is replayed below).
        captured = [
            bytes(m.raw) for m in s.proxy.captured if m.raw is not None and m.kind != "chunk"
        ]
        kinds = {m.kind for m in s.proxy.captured}
        assert {"chunk", "control", "message"} <= kinds
        channels = [bytes(c) for c in s.proxy.captured_streams if c]
        assert channels
        before = tree_digests(s.b.config.data_path)

        outcomes: list[tuple[str, int]] = []
        for raw in [*captured, future]:
            outcomes.append(("replay", await raw_request(s.ports["B"], raw)))
        for raw in channels:
            outcomes.append(("channel replay", await replay_channel(s.b, s.data_port, raw)))
        inbox_before_restart = len(s.b.messages.inbox)
        await s.restart_b()
        for raw in [*captured, future]:
            outcomes.append(("replay after restart", await raw_request(s.ports["B"], raw)))
        for raw in channels:
            outcomes.append(
                ("channel replay after restart", await replay_channel(s.b, s.data_port, raw))
            )
        refused = [status in (401, 403) for _what, status in outcomes]
        unchanged = tree_digests(s.b.config.data_path) == before
        no_duplicate = len(s.b.messages.inbox) == 0  # nothing delivered after the restart
        for ok in refused:
            tally(ATTACKS, ok and unchanged and no_duplicate)
        assert all(refused), outcomes
        assert unchanged
        assert no_duplicate
        assert inbox_before_restart == 2  # hello + future-1, each once
        # Still serving after all that: a new send goes through.
        write_random(tmp_path / "site-A" / "approved" / "n.bin", CHUNK, seed=2)
        [job] = await wait_for_jobs(s.a, s.a.sender.submit("approved/n.bin", ["B"]))
        assert job.state == "committed", job.error
        assert file_blake3(s.b.config.data_path / "approved" / "m.bin") == digest


def _query():  # noqa: ANN202 - MessageQuery, imported lazily as the CLI does
    from transferd.protocol.messages import MessageQuery

    return MessageQuery(deadline_ms=5000)


Tamper = Callable[[bytes, "Sites"], bytes]


def _resigned(raw: bytes, s: Sites, *, now: float, secret: bytes | None = None,
              src: str = "A", dst: str = "B", path: str | None = None) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    method, path_qs, _ = head.split(b"\r\n")[0].decode().split(" ")
    signed = sign_headers(
        secret or s.a.keyring.secret_for("B"),
        method=method,
        path_qs=path or path_qs,
        body_blake3=blake3.blake3(body).hexdigest(),
        src=src,
        dst=dst,
        now=now,
    )
    for name, value in signed.items():
        raw = with_header(raw, name, value)
    return raw


def _tampers() -> dict[str, Tamper]:
    def flip_sig(raw: bytes, _s: Sites) -> bytes:
        sig = header(raw, "X-Transferd-Signature")
        return with_header(raw, "X-Transferd-Signature", ("1" if sig[0] != "1" else "2") + sig[1:])

    def body_byte(raw: bytes, _s: Sites) -> bytes:
        head, sep, body = raw.partition(b"\r\n\r\n")
        return head + sep + bytes([body[0] ^ 0x20]) + body[1:]

    def other_site(raw: bytes, _s: Sites) -> bytes:
        return with_header(raw, "X-Transferd-Site", "C")

    def unsigned(raw: bytes, _s: Sites) -> bytes:
        return with_header(raw, "X-Transferd-Signature", "")

    def stale(raw: bytes, s: Sites) -> bytes:
        return _resigned(raw, s, now=s.a.clock() - 3600)

    def from_the_future(raw: bytes, s: Sites) -> bytes:
        return _resigned(raw, s, now=s.a.clock() + 3600)

    def wrong_key(raw: bytes, s: Sites) -> bytes:
        return _resigned(raw, s, now=s.a.clock(), secret=os.urandom(32))

    def reflected(raw: bytes, s: Sites) -> bytes:  # addressed to A, delivered to B
        return _resigned(raw, s, now=s.a.clock(), dst="A")

    def other_path(raw: bytes, s: Sites) -> bytes:  # signed for another route
        return _resigned(raw, s, now=s.a.clock(), path="/v1/uploads/x/have")

    return {
        f.__name__: f
        for f in (flip_sig, body_byte, other_site, unsigned, stale, from_the_future, wrong_key,
                  reflected, other_path)
    }


async def test_tampered_forged_stale_and_reflected_requests_are_refused(
    tmp_path: Path, tally: Tally
) -> None:
    write_random(tmp_path / "site-A" / "approved" / "m.bin", 3 * CHUNK, seed=3)
    async with sites(tmp_path) as s:
        [job] = await wait_for_jobs(s.a, s.a.sender.submit("approved/m.bin", ["B"]))
        assert job.state == "committed", job.error
        await s.a.messages.send("B", b"hello", _query())
        before = tree_digests(s.b.config.data_path)
        inbox = len(s.b.messages.inbox)
        samples = {}
        for m in s.proxy.captured:
            if m.raw is not None and m.length and m.kind not in samples and m.kind != "chunk":
                samples[m.kind] = bytes(m.raw)
        outcomes = []
        for name, tamper in sorted(_tampers().items()):
            for kind, raw in sorted(samples.items()):
                status = await raw_request(s.ports["B"], tamper(raw, s))
                outcomes.append((name, kind, status))
        # The local API with a peer's key, and a peer API call with the site's own CLI key.
        local = await _local_api_with_peer_key(s)
        outcomes.append(("peer key on the local API", "local", local))
        refused = [status in (400, 401, 403, 422) for _n, _k, status in outcomes]
        unchanged = (
            tree_digests(s.b.config.data_path) == before and len(s.b.messages.inbox) == inbox
        )
        for ok in refused:
            tally(ATTACKS, ok and unchanged)
        assert all(refused), [o for o, ok in zip(outcomes, refused, strict=True) if not ok]
        assert unchanged
        [job] = await wait_for_jobs(s.a, s.a.sender.submit("approved/m.bin", ["B"]))
        assert job.state == "committed", job.error


async def _local_api_with_peer_key(s: Sites) -> int:
    path = "/v1/local/status"
    headers = sign_headers(
        s.a.keyring.secret_for("B"), method="GET", path_qs=path,
        body_blake3=blake3.blake3(b"").hexdigest(), src="A", dst="B", now=s.a.clock(),
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{s.ports['B']}{path}", headers=headers) as r:
            await r.read()
            return r.status


async def test_forged_manifest_is_refused_and_nothing_committed(
    tmp_path: Path, tally: Tally
) -> None:
    """A commit whose manifest is signed by a key that is not A's (the request itself is
    properly signed: the attacker holds the pair secret but not A's signing key)."""
    from transferd.errors import AuthError
    from transferd.protocol.upload import upload_intent, upload_manifest
    from transferd.site.keys import Keyring
    from transferd.testing import loopback_pair

    data = os.urandom(CHUNK)
    digest = blake3.blake3(data).hexdigest()
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        link = a.links["B"]
        intent = upload_intent("A-forged-1", "A", "B", "curated/f.bin", "file", [("", CHUNK)])
        from netplan.plan import TrafficClass

        await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads", body=intent)
        channels = a.channels["B"]
        await channels.ensure(1, lambda: a.sender.data_address(link))
        sent = OutgoingChunk(
            upload="A-forged-1", digest=digest, locations=((0, 0),), raw_length=CHUNK,
            encoding="identity", body_blake3=digest, body=data,
        )
        receipt = await asyncio.wrap_future(channels.submit(sent))
        assert receipt.status is ReceiptStatus.OK, receipt
        keygen(["A"], tmp_path / "forger")
        forged = upload_manifest(intent, a.clock(), [[(digest, 0, CHUNK)]]).sign(
            Keyring.load(tmp_path / "forger", "A", [])
        )
        refused = False
        with contextlib.suppress(AuthError):
            await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads/A-forged-1/commit",
                            body=forged)
            refused = False
        refused = not (b.config.data_path / "curated" / "f.bin").exists()
        tally(ATTACKS, refused)
        assert refused


@pytest.mark.parametrize("ahead_s", [0.0, 250.0])
async def test_a_restart_keeps_refusing_what_was_accepted_before(
    tmp_path: Path, ahead_s: float, tally: Tally
) -> None:
    """The replay marks are in the journal: a message dated now or 250 s ahead (inside the
    300 s window) is delivered once, and its replay after the restart is refused."""
    async with sites(tmp_path) as s:
        dated = s.a.clock()  # the message is signed at this time or just after
        raw = future_message(s, ahead_s=ahead_s, message_id=f"m-{ahead_s}")
        assert await raw_request(s.ports["B"], raw) == 200
        if ahead_s:
            assert len(s.b.journal.future_nonces(since=0)) == 1
        else:
            # The mark covers the message's own time (signed to the ms) and runs MARK_STEP_S
            # past it. Not A's clock after the reply: that outruns the mark when the request
            # takes over MARK_STEP_S, as it did on a loaded machine.
            assert s.b.journal.auth_marks()["A"] >= dated - 0.001 + MARK_STEP_S
        await s.restart_b()
        status = await raw_request(s.ports["B"], raw)
        tally(ATTACKS, status == 401 and len(s.b.messages.inbox) == 0)
        assert status == 401
        assert len(s.b.messages.inbox) == 0
        # A's own traffic after the restart is signed afresh and goes through.
        receipt = await s.a.messages.send("B", b"after", _query())
        assert receipt.delivered
