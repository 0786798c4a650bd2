"""Hostile input on a data channel, sent byte by byte to a receiver's data listener: not a
channel at all, an opening from an unknown site or without the pair secret, a replayed
opening, frames with a bad MAC, out-of-bounds lengths, an unknown frame kind, a frame replayed
on its channel or carried to another one, a body that does not hash to its header, locations
outside the upload. Each is refused and counted (`transferd_auth_failures_total{reason="data
channel"}`, `transferd_channels_refused_total`, `transferd_integrity_failures_total`, or a
refusing receipt), no unverified byte is written anywhere under the receiver's data_dir, and
the daemon keeps serving: a real job commits afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import blake3

from netplan.plan import TrafficClass
from tests.faults.conftest import Tally
from tests.integration._data import tree_digests, write_random
from tests.integration._procs import poll_until
from transferd.daemon import Daemon
from transferd.protocol import channel as ch
from transferd.protocol.chunks import MAX_CHUNK_BYTES
from transferd.protocol.upload import upload_intent
from transferd.protocol.wire import UPLOADS_ROUTE
from transferd.testing import loopback_pair, wait_for_jobs

ATTACKS = "attacks (forged, tampered, stale, unsigned, replayed)"
FIGURE = ATTACKS
CHUNK = 64 * 1024
# A body no genuine file holds: found anywhere under B's data_dir, it was written unverified.
GARBAGE = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (CHUNK // 4)


class RawChannel:
    """A data channel client that does only what it is told (blocking; run in a thread)."""

    opened: list[RawChannel] = []  # every one, to close after each attack

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = bytearray()  # everything sent, for replays
        RawChannel.opened.append(self)

    def send(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes | None:
        """`n` bytes, or None when the listener closed the channel first."""
        got = b""
        try:
            while len(got) < n:
                part = self.sock.recv(n - len(got))
                if not part:
                    return None
                got += part
        except OSError:
            return None
        return got

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def open(self, secret: bytes, src: str = "A", dst: str = "B") -> ch.Session | None:
        """The opening; the session, or None when the listener refused it."""
        said, frame = ch.hello(src, dst)
        self.send(frame)
        server_nonce = self.recv_exact(ch.CHALLENGE_BYTES)
        if server_nonce is None:
            return None
        self.send(ch.proof(secret, said, server_nonce))
        accept = self.recv_exact(ch.ACCEPT_BYTES)
        if accept is None:
            return None
        ch.check_accept(secret, said, server_nonce, accept)
        return ch.Session.derive(secret, said, server_nonce)

    def chunk(self, session: ch.Session, head: ch.ChunkHead, body: bytes) -> None:
        self.send(ch.encode_chunk_head(session, head) + body)

    def receipt(self, session: ch.Session) -> ch.Receipt | None:
        fixed = self.recv_exact(ch.RECEIPT_FIXED.size)
        if fixed is None:
            return None
        _status, rest = ch.decode_receipt_fixed(fixed)
        tail = self.recv_exact(rest)
        return None if tail is None else ch.decode_receipt(session, fixed, tail)

    def close(self) -> None:
        self.sock.close()


def head(seq: int, upload: str, body: bytes, digest: bytes | None = None,
         locations: tuple[tuple[int, int], ...] = ((0, 0),)) -> ch.ChunkHead:
    address = digest if digest is not None else blake3.blake3(body).digest()
    return ch.ChunkHead(seq=seq, upload=upload, digest=address, body_blake3=address,
                        encoding="identity", raw_length=len(body), body_length=len(body),
                        locations=locations)


def counters(b: Daemon) -> dict[str, float]:
    def value(name: str, **labels: str) -> float:
        return b.metrics.registry.get_sample_value(name, labels) or 0.0

    return {
        "auth": value("transferd_auth_failures_total", reason="data channel"),
        "refused": value("transferd_channels_refused_total", peer="A")
        + value("transferd_channels_refused_total", peer="?"),
        "damaged": value("transferd_integrity_failures_total", peer="A", side="receiver"),
        "chunks": value("transferd_chunks_received_total", peer="A"),
    }


def garbage_written(root: Path) -> list[str]:
    """Files under `root` (staging included) holding any 4 KiB of GARBAGE."""
    probe = GARBAGE[:4096]
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if probe in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:
                continue
    return hits


Attack = Callable[[int, bytes], tuple[str, ch.Receipt | None]]


def attacks(upload: str) -> dict[str, Attack]:
    """Each attack, run against B's data port with the pair secret that A and B share (the
    attacker has it where the attack needs a genuine channel: a peer gone bad); returns
    which counter must move ("auth", "refused", "damaged", or "receipt" for a refusing
    receipt) and the receipt, if one came."""

    def not_a_channel(port: int, _secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        c.send(b"GET /v1/data-channel HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.closed_by_peer()
        return "refused", None

    def unknown_site(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        assert c.open(secret, src="C") is None
        return "auth", None

    def without_the_secret(port: int, _secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        assert c.open(os.urandom(32)) is None
        return "auth", None

    def replayed_opening(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        genuine = RawChannel(port)
        assert genuine.open(secret) is not None
        genuine.close()
        replay = RawChannel(port)
        replay.send(bytes(genuine.sent))  # HELLO and PROOF as they crossed the link
        assert replay.recv_exact(ch.CHALLENGE_BYTES) is not None
        assert replay.closed_by_peer()  # no ACCEPT: the old proof is worthless
        return "auth", None

    def bad_mac(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        assert c.open(secret) is not None
        c.chunk(ch.Session(os.urandom(32)), head(0, upload, GARBAGE), GARBAGE)
        assert c.closed_by_peer()
        return "auth", None

    def oversize(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        session = c.open(secret)
        assert session is not None
        big = ch.ChunkHead(seq=0, upload=upload, digest=os.urandom(32),
                           body_blake3=os.urandom(32), encoding="zstd",
                           raw_length=MAX_CHUNK_BYTES + 1, body_length=MAX_CHUNK_BYTES + 1,
                           locations=((0, 0),))
        c.send(ch.encode_chunk_head(session, big))
        assert c.closed_by_peer()
        return "refused", None

    def unknown_kind(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        session = c.open(secret)
        assert session is not None
        c.send(ch.encode_receipt(session, ch.Receipt(0, ch.ReceiptStatus.OK)).ljust(
            ch.CHUNK_FIXED.size, b"\0"))
        assert c.closed_by_peer()
        return "refused", None

    def replayed_frame(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        session = c.open(secret)
        assert session is not None
        frame = ch.encode_chunk_head(session, head(0, "A-nothing-open", GARBAGE)) + GARBAGE
        c.send(frame)
        first = c.receipt(session)
        assert first is not None
        assert first.status is ch.ReceiptStatus.REFUSED
        c.send(frame)  # the same frame again on its channel
        assert c.closed_by_peer()
        return "refused", None

    def frame_from_another_channel(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        one = RawChannel(port)
        session = one.open(secret)
        assert session is not None
        frame = ch.encode_chunk_head(session, head(0, upload, GARBAGE)) + GARBAGE
        two = RawChannel(port)
        assert two.open(secret) is not None
        two.send(frame)
        assert two.closed_by_peer()
        one.close()
        return "auth", None

    def body_not_its_address(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        session = c.open(secret)
        assert session is not None
        c.chunk(session, head(0, upload, GARBAGE, digest=os.urandom(32)), GARBAGE)
        return "damaged", c.receipt(session)

    def outside_the_upload(port: int, secret: bytes) -> tuple[str, ch.Receipt | None]:
        c = RawChannel(port)
        session = c.open(secret)
        assert session is not None
        c.chunk(session, head(0, upload, GARBAGE, locations=((0, 1 << 40),)), GARBAGE)
        return "receipt", c.receipt(session)

    return {f.__name__: f for f in (
        not_a_channel, unknown_site, without_the_secret, replayed_opening, bad_mac, oversize,
        unknown_kind, replayed_frame, frame_from_another_channel, body_not_its_address,
        outside_the_upload,
    )}


async def test_hostile_channel_input_is_refused_counted_and_never_written(
    tmp_path: Path, tally: Tally
) -> None:
    write_random(tmp_path / "site-A" / "approved" / "m.bin", 3 * CHUNK + 5, seed=7)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        secret = a.keyring.secret_for("B")
        port = b.listener.port
        # An upload really open at B, so the attacks on it get past "unknown upload".
        upload = "A-hostile-1"
        intent = upload_intent(upload, "A", "B", "curated/h.bin", "file", [("", 4 * CHUNK)])
        await a.links["B"].call(TrafficClass.CONTROL, "POST", UPLOADS_ROUTE, body=intent)
        before_tree = tree_digests(b.config.data_path)
        results = {}
        for name, attack in attacks(upload).items():
            before = counters(b)
            try:
                kind, receipt = await asyncio.to_thread(attack, port, secret)
            finally:
                for c in RawChannel.opened:
                    c.close()
                RawChannel.opened.clear()
            if kind != "receipt":
                # The listener's thread counts as it closes: wait for the counter the attack
                # must move (bounded), not for a fixed time that a loaded machine overruns.
                with contextlib.suppress(TimeoutError):
                    await poll_until(lambda: asyncio.sleep(0, counters(b)),
                                     lambda now, k=kind, was=before: now[k] > was[k],
                                     timeout_s=30, every_s=0.01)
            after = counters(b)
            if kind == "receipt":
                ok = receipt is not None and receipt.status is ch.ReceiptStatus.REFUSED
            elif kind == "damaged":
                ok = (receipt is not None and receipt.status is ch.ReceiptStatus.DAMAGED
                      and after["damaged"] == before["damaged"] + 1)
            else:
                ok = after[kind] == before[kind] + 1
            ok = ok and after["chunks"] == before["chunks"]  # nothing staged
            results[name] = ok
            tally(ATTACKS, ok)
        written = garbage_written(b.config.data_path)
        assert written == []
        assert tree_digests(b.config.data_path) == before_tree
        assert all(results.values()), results
        # Still serving: a genuine job commits over the same listener.
        [job] = await wait_for_jobs(a, a.sender.submit("approved/m.bin", ["B"]))
        assert job.state == "committed", job.error
