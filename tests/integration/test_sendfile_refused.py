"""A source on a filesystem that refuses `sendfile` (EINVAL, ENOSYS, EOPNOTSUPP: some FUSE and
network filesystems, /proc-like files) between real daemons: the refused sends fall back to
reading the file (pread, then send) and the job commits, the channels unbroken; the daemon stops
trying `sendfile` from that filesystem and says so once. A real socket error from `sendfile`
still breaks its channel, and the chunk goes again on another."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.integration._data import (
    assert_the_sources_eio,
    eio_on_channel_reads,
    failed_sends,
    file_blake3,
    write_random,
)
from tests.integration._procs import poll_until
from transferd.net import channels as channels_mod
from transferd.net import sender as sender_mod
from transferd.net.channels import OutgoingChunk
from transferd.testing import loopback_pair, wait_for_jobs

CHUNK = 256 * 1024
STREAMS = 4


def _sends(monkeypatch: pytest.MonkeyPatch) -> list[OutgoingChunk]:
    """Every chunk handed to the channels (one OutgoingChunk per attempt), as it happens."""
    real_send = sender_mod._ChunkPump._send
    sent: list[OutgoingChunk] = []

    async def send(self: Any, item: OutgoingChunk) -> Any:
        sent.append(item)
        return await real_send(self, item)

    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    return sent


def _hash_first_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk goes hashed first, raw, by `sendfile` from its file (not one pass)."""
    monkeypatch.setattr(sender_mod._ChunkPump, "may_one_pass", lambda *a: False)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP],
                         ids=["EINVAL", "ENOSYS", "EOPNOTSUPP"])
async def test_a_filesystem_refusing_sendfile_is_read_instead_and_the_job_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    """`sendfile` from the sources' filesystem fails with `code` (its pread works, as on a
    FUSE mount without splice): each refused send goes on, read from the file, on the same
    channel; no channel breaks, no chunk is sent twice, both jobs commit whole. Once refused,
    `sendfile` is not tried from that filesystem again (at most the channels' first sends,
    already under way, meet the refusal: no more than the channels opened) and the daemon
    logs it once."""
    caplog.set_level(logging.INFO, logger="transferd.channels")
    site_a = tmp_path / "site-A" / "curated"
    digests = {name: write_random(site_a / name, 10 * CHUNK + 77, seed=n)
               for n, name in enumerate(["first.bin", "second.bin"])}
    refusing_dev = os.stat(site_a / "first.bin").st_dev
    real_sendfile = os.sendfile
    refused: list[int] = []
    lock = threading.Lock()

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        if os.fstat(in_fd).st_dev == refusing_dev:
            with lock:
                refused.append(in_fd)
            raise OSError(code, os.strerror(code))
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    _hash_first_raw(monkeypatch)
    sent = _sends(monkeypatch)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off",
                             streams=STREAMS) as (a, _b):
        for name in digests:
            [job] = await wait_for_jobs(a, a.sender.submit(f"curated/{name}", ["B"]),
                                        timeout_s=30)
            assert job.state == "committed", job.error
            assert job.retries == 0
            if name == "first.bin":
                refused_first = len(refused)
        channels = a.channels["B"].opened
    for name, digest in digests.items():
        assert file_blake3(tmp_path / "site-B" / "curated" / name) == digest
    # The refusal was met, then remembered: a channel's first send at most, none for the
    # second file.
    assert 1 <= refused_first <= channels
    assert len(refused) == refused_first
    assert len(sent) == 2 * 11
    assert all(item.sends == 1 for item in sent)
    # No channel broke under a refused send (a break for another reason, on a loaded
    # machine, is not this test's business: every send went once, above).
    assert not _broken_by(caplog, code)
    [record] = [r for r in caplog.records if r.getMessage() == "channel.sendfile_refused"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["errno"] == errno.errorcode[code]
    assert str(site_a) in fields["path"]


async def test_a_socket_error_from_sendfile_still_breaks_the_channel_and_the_chunk_goes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """`sendfile` fails once with the socket's error (ECONNRESET) while the file reads: the
    channel breaks (logged), the chunk is put back in the queue and sent again on another
    channel, the job commits whole, and nothing says `sendfile` was refused."""
    caplog.set_level(logging.INFO, logger="transferd.channels")
    src = tmp_path / "site-A" / "curated" / "f.bin"
    digest = write_random(src, 10 * CHUNK, seed=3)
    real_sendfile = os.sendfile
    failed: list[int] = []

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        if offset == 9 * CHUNK and not failed:
            failed.append(offset)
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    _hash_first_raw(monkeypatch)
    sent = _sends(monkeypatch)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off",
                             streams=STREAMS) as (a, _b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/f.bin", ["B"]), timeout_s=30)
        assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    assert failed == [9 * CHUNK]
    [again] = [item for item in sent if item.offset == 9 * CHUNK]
    assert again.sends == 2  # the same send, put back in the queue: not failed as the source's
    broken = [r for r in caplog.records if r.getMessage() == "channel.broken"]
    assert broken
    assert "ConnectionResetError" in broken[0].fields["error"]  # type: ignore[attr-defined]
    assert "channel.sendfile_refused" not in [r.getMessage() for r in caplog.records]


async def test_a_read_error_in_the_fallback_fails_the_chunk_as_the_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """`sendfile` refused (EINVAL), then the read that replaces it fails (EIO at one chunk,
    every time): that chunk's send fails with the source's StorageError naming the file, as a
    failed read does on any channel; it is not put back in the queue to break channel after
    channel, and the job waits for its next attempt (each a new send that went out once)."""
    caplog.set_level(logging.INFO, logger="transferd.channels")
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=4)
    failed, sent = eio_on_channel_reads(monkeypatch, 9 * CHUNK, always=True)

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", sendfile)
    _hash_first_raw(monkeypatch)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        a.sender.retry_budget_s = 0.5
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        await poll_until(lambda: _job(a, job_id), lambda j: j.state == "waiting", timeout_s=30)
        errors = failed_sends(sent)
    assert failed
    assert_the_sources_eio(errors, src)
    # Each failed send ended there (its channel, cut mid-body, breaks too, as on any read
    # error): none went round the channels again.
    assert all(item.sends == 1 for item in sent)
    assert "channel.sendfile_refused" in [r.getMessage() for r in caplog.records]


async def test_a_refusal_after_partial_progress_is_sent_on_from_there_without_an_fstat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each chunk's `sendfile` first goes part of the way (the real call, a third of the
    count), then is refused (EINVAL): the rest is read and sent from where it stopped, and
    the file arrives whole, each chunk sent once, no channel broken by it. Meanwhile an fstat
    on a channel's sender thread fails with ESTALE (as on an NFS mount gone stale): the
    refusal is remembered by the source's device from its open, not by an fstat there."""
    caplog.set_level(logging.INFO, logger="transferd.channels")
    src = tmp_path / "site-A" / "curated" / "f.bin"
    digest = write_random(src, 10 * CHUNK + 77, seed=5)
    real_sendfile, real_fstat = os.sendfile, os.fstat
    partial: list[int] = []
    lock = threading.Lock()

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        assert offset is not None
        with lock:
            first = offset % CHUNK == 0 and offset not in partial
            if first:
                partial.append(offset)
        if first and count > 3:
            return real_sendfile(out_fd, in_fd, offset, count // 3)
        raise OSError(errno.EINVAL, "Invalid argument")

    def fstat(fd: int) -> os.stat_result:
        if threading.current_thread().name.startswith("channel-send"):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_fstat(fd)

    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "fstat", fstat)
    _hash_first_raw(monkeypatch)
    sent = _sends(monkeypatch)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off",
                             streams=STREAMS) as (a, _b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/f.bin", ["B"]), timeout_s=30)
        assert job.state == "committed", job.error
        assert job.retries == 0
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    assert partial  # some sends went part of the way by sendfile before the refusal
    assert len(sent) == 11
    assert all(item.sends == 1 for item in sent)
    assert not _broken_by(caplog, errno.EINVAL)
    assert not _broken_by(caplog, errno.ESTALE)
    assert [r.getMessage() for r in caplog.records].count("channel.sendfile_refused") == 1


def test_a_socket_failing_in_the_fallback_does_not_mark_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sendfile` refused (EINVAL), then the socket fails on the fallback's first send
    (EPIPE): the socket's error is raised (its channel breaks) and the filesystem is not
    remembered as refusing `sendfile`; once a fallback send went out, it is."""
    src = tmp_path / "f.bin"
    write_random(src, CHUNK, seed=6)

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", sendfile)
    dev = os.stat(src).st_dev
    left, right = socket.socketpair()
    channel = channels_mod._Channel.__new__(channels_mod._Channel)
    channel.owner = SimpleNamespace(sendfile_refusals=channels_mod.SendfileRefusals())
    channel._piece = None
    fd = os.open(src, os.O_RDONLY)
    try:
        item = OutgoingChunk(upload="u1", digest="00" * 32, locations=((0, 0),),
                             raw_length=CHUNK, encoding="identity", body_blake3="00" * 32,
                             fd=fd, path=str(src), dev=dev)
        channel.sock = SimpleNamespace(  # type: ignore[assignment]
            fileno=left.fileno, sendall=_fails(BrokenPipeError(errno.EPIPE, "Broken pipe")))
        with pytest.raises(BrokenPipeError):
            channel._send_file(item)
        assert not channel.owner.sendfile_refusals.refuses(dev)
        got = bytearray()
        channel.sock = SimpleNamespace(  # type: ignore[assignment]
            fileno=left.fileno, sendall=lambda piece, *a: got.extend(piece))
        channel._send_file(item)
        assert bytes(got) == src.read_bytes()
        assert channel.owner.sendfile_refusals.refuses(dev)
    finally:
        os.close(fd)
        left.close()
        right.close()


def _fails(exc: OSError) -> Any:
    def sendall(piece: Any, *args: Any) -> None:
        raise exc
    return sendall


def _broken_by(caplog: pytest.LogCaptureFixture, code: int) -> list[logging.LogRecord]:
    """The channel.broken records whose error is `code`'s (or names sendfile)."""
    text = os.strerror(code)
    return [r for r in caplog.records if r.getMessage() == "channel.broken"
            and (text in r.fields["error"]  # type: ignore[attr-defined]
                 or "sendfile" in r.fields["error"])]  # type: ignore[attr-defined]


async def _job(a: Any, job_id: str) -> Any:
    return a.journal.job(job_id)
