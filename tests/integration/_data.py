"""Shared fixtures for loopback daemon tests: seeded data files, jobs that send them one
after another, and a read of one chunk that fails on its data channel's thread."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest

from transferd.errors import StorageError
from transferd.net import sender as sender_mod
from transferd.net.channels import OutgoingChunk
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs


def write_random(path: Path, size: int, seed: int) -> str:
    """Write `size` seeded pseudo-random bytes; return their blake3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return blake3.blake3(data).hexdigest()


def file_blake3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def tree_digests(root: Path, skip: tuple[str, ...] = (".transferd",)) -> dict[str, str]:
    """Every file under `root` (top folders in `skip` left out) with its blake3; a symlink is
    listed as "link", not followed: what a test compares before and after."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] and rel.parts[0] in skip:
            continue
        for name in files:
            full = Path(dirpath, name)
            out[str(rel / name)] = "link" if full.is_symlink() else file_blake3(full)
    return out


async def two_jobs_through(root: Path, link: LinkProxy, size: int, **overrides: Any) -> list[int]:
    """Two seeded files of `size` bytes at A (curated/0.bin and 1.bin), each sent to B by a
    job of its own through `link` (capturing), the second after the first: each commits, and
    B holds both whole. Returns the statuses of the uploads' opens that crossed the link."""
    digests = [write_random(root / "site-A" / "curated" / f"{n}.bin", size, seed=n)
               for n in range(2)]
    async with loopback_pair(root, link=link, **overrides) as (a, _b):
        for n in range(2):
            [job_id] = a.sender.submit(f"curated/{n}.bin", ["B"])
            [job] = await wait_for_jobs(a, [job_id])
            assert job.state == "committed", job.error
    for n, digest in enumerate(digests):
        assert file_blake3(root / "site-B" / "curated" / f"{n}.bin") == digest
    return [m.status for m in link.captured
            if m.kind == "control" and m.path == "/v1/uploads"]


def eio_on_channel_reads(monkeypatch: pytest.MonkeyPatch, offset: int, *, always: bool = False
                         ) -> tuple[list[int], list[OutgoingChunk]]:
    """A read of the source at `offset` on a data channel's sender thread fails with EIO
    (os.preadv, os.pread, and os.sendfile from there, as a disk's bad sector would), during
    the chunk's first send (its first attempt) or `always`; a hashing worker's read there
    goes through. Returns the offsets failed and every send of the chunk at `offset` (each
    attempt's OutgoingChunk), as they happen."""
    preadv, pread, sendfile = os.preadv, os.pread, os.sendfile
    failed: list[int] = []
    real_send = sender_mod._ChunkPump._send
    sent: list[OutgoingChunk] = []

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if item.offset == offset:
            sent.append(item)
        return await real_send(self, item)

    def fails(at: int) -> bool:
        if (at == offset and (always or len(sent) < 2)
                and threading.current_thread().name.startswith("channel-send")):
            failed.append(at)
            return True
        return False

    def flaky_preadv(fd: int, buffers: Any, at: int, *args: Any) -> int:
        if fails(at):
            raise OSError(errno.EIO, "Input/output error")
        return preadv(fd, buffers, at, *args)

    def flaky_pread(fd: int, n: int, at: int) -> bytes:
        if fails(at):
            raise OSError(errno.EIO, "Input/output error")
        return pread(fd, n, at)

    def flaky_sendfile(out: int, fd: int, at: int | None, count: int) -> int:
        if at is not None and fails(at):
            raise OSError(errno.EIO, "Input/output error")
        return sendfile(out, fd, at, count)

    monkeypatch.setattr(os, "preadv", flaky_preadv)
    monkeypatch.setattr(os, "pread", flaky_pread)
    monkeypatch.setattr(os, "sendfile", flaky_sendfile)
    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    return failed, sent


def failed_sends(sent: list[OutgoingChunk]) -> list[BaseException]:
    """The errors the sends in `sent` ended with so far (read before the daemons' shutdown
    ends any still queued)."""
    return [exc for item in sent
            if item.done.done() and (exc := item.done.exception()) is not None]


def assert_the_sources_eio(errors: list[BaseException], src: Path) -> None:
    """Each error is the source's StorageError for `eio_on_channel_reads`'s EIO, naming the
    source file (not a channel's or the peer's error)."""
    assert errors
    for error in errors:
        assert isinstance(error, StorageError), repr(error)
        assert error.fields.get("side") == "source"
        assert "Input/output error" in str(error)
        assert str(src) in str(error)
