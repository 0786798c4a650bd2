"""Requests that are unsigned, badly signed, stale or replayed are refused and write nothing;
paths that escape data_dir and raw-tier data are refused on both sides."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp
import blake3
import pytest

from tests.integration._data import write_random
from transferd import TrafficClass
from transferd.daemon import Daemon
from transferd.errors import AuthError, PolicyViolation
from transferd.net.channels import OutgoingChunk
from transferd.protocol import channel as ch
from transferd.protocol.auth import sign_headers
from transferd.protocol.channel import Receipt, ReceiptStatus
from transferd.protocol.manifest import UploadIntent
from transferd.protocol.upload import upload_intent, upload_manifest
from transferd.protocol.wire import to_body
from transferd.site.keys import Keyring, keygen
from transferd.testing import loopback_pair

CHUNK = 64 * 1024


def intent(root: str = "curated/a.bin", size: int = CHUNK) -> UploadIntent:
    return upload_intent("A-test-upload-1", "A", "B", root, "file", [("", size)])


def visible_files(daemon: Daemon) -> list[str]:
    """Everything under B's data_dir except its private state folder."""
    root = daemon.config.data_path
    return sorted(
        str(Path(d, f).relative_to(root))
        for d, _dirs, files in os.walk(root)
        for f in files
        if ".transferd" not in Path(d).relative_to(root).parts
    )


def staged(daemon: Daemon) -> list[str]:
    return sorted(p.name for p in daemon.storage.staging_root.iterdir())


async def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status


async def send_chunk(a: Daemon, upload: str, data: bytes, at: int = 0) -> Receipt:
    """One raw chunk from A to B on A's data channels; B's receipt."""
    channels = a.channels["B"]
    await channels.ensure(1, lambda: a.sender.data_address(a.links["B"]))
    digest = blake3.blake3(data).hexdigest()
    chunk = OutgoingChunk(upload=upload, digest=digest, locations=((0, at),),
                          raw_length=len(data), encoding="identity", body_blake3=digest,
                          body=data)
    return await asyncio.wrap_future(channels.submit(chunk))


async def test_unsigned_bad_stale_replayed_requests_are_refused_and_write_nothing(
    tmp_path: Path,
) -> None:
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        body = to_body(intent())
        digest = blake3.blake3(body).hexdigest()
        secret = a.keyring.secret_for("B")

        def signed(secret: bytes = secret, now: float | None = None) -> dict[str, str]:
            return sign_headers(
                secret,
                method="POST",
                path_qs="/v1/uploads",
                body_blake3=digest,
                src="A",
                dst="B",
                now=a.clock() if now is None else now,
            )

        assert await post(b.url, "/v1/uploads", body, {}) == 401
        assert await post(b.url, "/v1/uploads", body, signed(secret=b"\x00" * 32)) == 401
        assert await post(b.url, "/v1/uploads", body, signed(now=a.clock() - 3600)) == 401
        tampered = to_body(intent(root="curated/other.bin"))
        assert await post(b.url, "/v1/uploads", tampered, signed()) in (401, 422)
        assert staged(b) == []
        assert b.journal.upload("A-test-upload-1") is None

        good = signed()
        assert await post(b.url, "/v1/uploads", body, good) == 200
        assert await post(b.url, "/v1/uploads", body, good) == 401  # the same nonce again
        assert b.metrics.value("transferd_auth_failures_total", reason="replayed request") == 1
        assert visible_files(b) == []


async def test_badly_signed_manifest_is_refused_403_and_nothing_is_committed(
    tmp_path: Path,
) -> None:
    src = tmp_path / "site-A" / "curated" / "a.bin"
    write_random(src, CHUNK, seed=3)
    data = src.read_bytes()
    chunk_hash = blake3.blake3(data).hexdigest()
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        link = a.links["B"]
        await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads", body=intent())
        assert (await send_chunk(a, "A-test-upload-1", data)).status is ReceiptStatus.OK
        manifest = upload_manifest(intent(), a.clock(), [[(chunk_hash, 0, CHUNK)]])
        # Signed by a key that is not A's: the receiver must refuse it.
        keygen(["A"], tmp_path / "other-keys")
        forger = Keyring.load(tmp_path / "other-keys", "A", [])
        forged = manifest.sign(forger)
        with pytest.raises(AuthError) as refused:
            await link.call(
                TrafficClass.CONTROL, "POST", "/v1/uploads/A-test-upload-1/commit", body=forged
            )
        assert refused.value.http_status == 403
        assert visible_files(b) == []
        # The genuine signature commits the same upload.
        genuine = manifest.sign(a.keyring)
        await link.call(
            TrafficClass.CONTROL, "POST", "/v1/uploads/A-test-upload-1/commit", body=genuine
        )
        assert (tmp_path / "site-B" / "curated" / "a.bin").read_bytes() == data


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside.bin", "escapes data_dir"),
        ("curated/../../outside.bin", "escapes data_dir"),
        ("/etc/passwd", "absolute path"),
        ("raw/sensor.bin", "raw-tier"),
        ("curated/link-out/x.bin", "symlink"),
    ],
)
async def test_sender_refuses_escaping_paths_and_raw_tier(
    tmp_path: Path, path: str, reason: str
) -> None:
    outside = tmp_path / "outside"
    write_random(outside / "x.bin", 100, seed=1)
    write_random(tmp_path / "site-A" / "raw" / "sensor.bin", 100, seed=2)
    (tmp_path / "site-A" / "curated").mkdir(parents=True)
    (tmp_path / "site-A" / "curated" / "link-out").symlink_to(outside)
    async with loopback_pair(tmp_path) as (a, b):
        with pytest.raises(PolicyViolation, match=reason):
            a.sender.submit(path, ["B"])
        assert a.journal.jobs() == []
        assert a.metrics.value("transferd_policy_refusals_total", side="sender") == 1
        assert visible_files(b) == []


@pytest.mark.parametrize(
    ("root", "reason"),
    [
        ("../outside.bin", "escapes data_dir"),
        ("/abs.bin", "absolute path"),
        ("raw/x.bin", "raw-tier"),
        ("curated/./x.bin", "normal form"),
    ],
)
async def test_receiver_refuses_escaping_paths_and_raw_tier(
    tmp_path: Path, root: str, reason: str
) -> None:
    async with loopback_pair(tmp_path) as (a, b):
        with pytest.raises(PolicyViolation, match=reason) as refused:
            await a.links["B"].call(
                TrafficClass.CONTROL, "POST", "/v1/uploads", body=intent(root=root)
            )
        assert refused.value.http_status == 403
        assert staged(b) == []
        assert visible_files(b) == []
        assert b.metrics.value("transferd_policy_refusals_total", side="receiver") == 1


def _open_raw(port: int, source: str, secret: bytes) -> tuple[socket.socket, bytes]:
    """A data channel opened by hand (blocking); returns the socket and what the server
    answered to the proof (ACCEPT, or b"" when it hung up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    said, frame = ch.hello(source, "B")
    sock.sendall(frame)
    server_nonce = sock.recv(ch.CHALLENGE_BYTES, socket.MSG_WAITALL)
    sock.sendall(ch.proof(secret, said, server_nonce))
    return sock, sock.recv(ch.ACCEPT_BYTES, socket.MSG_WAITALL)


async def test_data_channels_refuse_bad_proofs_and_strangers_and_count_them(
    tmp_path: Path,
) -> None:
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        assert b.data_port
        secret = a.keyring.secret_for("B")
        sock, answer = await asyncio.to_thread(_open_raw, b.data_port, "A", b"\x00" * 32)
        sock.close()
        assert answer == b""  # wrong secret: the receiver hangs up without proving its own
        sock, answer = await asyncio.to_thread(_open_raw, b.data_port, "Z", secret)
        sock.close()
        assert answer == b""  # not a peer of B
        # The right secret opens a channel, and the receiver proves the secret back.
        sock, answer = await asyncio.to_thread(_open_raw, b.data_port, "A", secret)
        sock.close()
        assert len(answer) == ch.ACCEPT_BYTES
        assert b.metrics.value("transferd_auth_failures_total", reason="data channel") == 2
        assert staged(b) == []


async def test_a_chunk_for_an_upload_that_is_not_open_is_refused(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        receipt = await send_chunk(a, "A-never-opened", b"x" * 4096)
        assert receipt.status is ReceiptStatus.REFUSED
        assert "unknown upload" in receipt.reason
        assert visible_files(b) == []
