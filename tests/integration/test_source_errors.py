"""A source that fails or changes while it is being sent: real daemons (A sends from an fsspec
`memory://` data_dir or a local one, B receives on local disk). The job fails cleanly (or is tried
again), nothing is committed at B, and A's daemon goes on serving: the next job commits."""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.integration._data import assert_the_sources_eio, eio_on_channel_reads, failed_sends
from tests.integration._procs import poll_until
from transferd.net import sender as sender_mod
from transferd.site.source import SourceFile
from transferd.testing import loopback_pair, loopback_tls, wait_for_jobs

CHUNK = 64 * 1024
SIZE = 6 * CHUNK + 123


def _memory_site(tmp_path: Path) -> tuple[dict[str, Any], Any, str]:
    root = f"/src-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    overrides = {"A": {"data_dir": f"memory://{root}", "state_dir": str(tmp_path / "state-A")}}
    (tmp_path / "site-B").mkdir()
    return overrides, fs, root


def _failing_reads(fs: Any, monkeypatch: pytest.MonkeyPatch, path: str,
                   fail: Callable[[int], None]) -> None:
    """fs.cat_file on `path` calls `fail(n)` before its n-th read (n from 1)."""
    real = fs.cat_file
    calls = 0

    def cat_file(p: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if p.lstrip("/") == path.lstrip("/"):
            calls += 1
            fail(calls)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", cat_file)


async def _still_serving(a: Any, fs: Any, root: str, tmp_path: Path) -> None:
    """A's sender still runs jobs: a fresh file commits at B, whole."""
    data = os.urandom(2 * CHUNK + 5)
    fs.pipe_file(f"{root}/curated/next.bin", data)
    [job] = await wait_for_jobs(a, a.sender.submit("curated/next.bin", ["B"]), timeout_s=30)
    assert job.state == "committed", job.error
    assert (tmp_path / "site-B/curated/next.bin").read_bytes() == data


async def _fails_cleanly(a: Any, tmp_path: Path, rel: str, expect: str) -> Any:
    """A's job for `rel` fails, saying `expect`, and nothing of it is committed at B."""
    [job] = await wait_for_jobs(a, a.sender.submit(rel, ["B"]), timeout_s=30)
    assert job.state == "failed"
    assert job.error is not None
    assert expect in job.error
    assert not (tmp_path / "site-B" / rel).exists()
    return job


def _raise_from_third_read(error: Exception) -> Callable[[str, Any], Callable[[int], None]]:
    def fail(n: int) -> None:
        if n >= 3:
            raise error

    return lambda _path, _fs: fail


def _delete_at_second_read(path: str, fs: Any) -> Callable[[int], None]:
    def delete(n: int) -> None:
        if n == 2:
            fs.rm(path)

    return delete


@pytest.mark.parametrize(
    ("make_fail", "expect"),
    [
        (_raise_from_third_read(RuntimeError("backend library blew up")), "curated/big.bin"),
        (_raise_from_third_read(PermissionError(errno.EACCES, "denied")), "curated/big.bin"),
        (_delete_at_second_read, "changed while being sent"),
    ],
    ids=["foreign-exception", "permission", "deleted-mid-send"],
)
async def test_fsspec_read_failing_mid_job_fails_the_job_and_the_daemon_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_fail: Callable[[str, Any], Callable[[int], None]], expect: str,
) -> None:
    """A read that fails for good (or finds the file gone: the changed outcome) mid-job."""
    overrides, fs, root = _memory_site(tmp_path)
    path = f"{root}/curated/big.bin"
    fs.pipe_file(path, os.urandom(SIZE))
    async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
        _failing_reads(fs, monkeypatch, path, make_fail(path, fs))
        await _fails_cleanly(a, tmp_path, "curated/big.bin", expect)
        await _still_serving(a, fs, root, tmp_path)


async def test_fsspec_io_error_is_transient_and_the_job_commits_on_its_next_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, fs, root = _memory_site(tmp_path)
    data = os.urandom(SIZE)
    fs.pipe_file(f"{root}/curated/big.bin", data)

    def fail(n: int) -> None:
        if n == 3:
            raise OSError(errno.EIO, "Input/output error")

    async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
        _failing_reads(fs, monkeypatch, f"{root}/curated/big.bin", fail)
        [job] = await wait_for_jobs(a, a.sender.submit("curated/big.bin", ["B"]), timeout_s=30)
        assert job.state == "committed", job.error
        assert job.retries >= 1  # waited, then tried again
        assert (tmp_path / "site-B/curated/big.bin").read_bytes() == data
        await _still_serving(a, fs, root, tmp_path)


async def _local_still_serving(a: Any, tmp_path: Path, rel: str) -> None:
    """A's sender still runs jobs: `rel`, written afresh at A, commits at B, whole."""
    data = os.urandom(CHUNK + 1)
    (tmp_path / "site-A" / rel).write_bytes(data)
    [job] = await wait_for_jobs(a, a.sender.submit(rel, ["B"]), timeout_s=30)
    assert job.state == "committed", job.error
    assert (tmp_path / "site-B" / rel).read_bytes() == data


async def test_local_file_deleted_mid_send_is_a_changed_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read through its open descriptor, a deleted file still reads whole: the job must not
    commit at B a file the site no longer holds."""
    src = tmp_path / "site-A/curated/big.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(64 * CHUNK))
    (tmp_path / "site-B").mkdir()
    real = SourceFile.hash_span

    def hash_span(self: SourceFile, offset: int, length: int) -> str:
        src.unlink(missing_ok=True)  # hashed in parallel threads
        return real(self, offset, length)

    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        monkeypatch.setattr(SourceFile, "hash_span", hash_span)
        await _fails_cleanly(a, tmp_path, "curated/big.bin", "changed while being sent")
        monkeypatch.undo()
        await _local_still_serving(a, tmp_path, "curated/big.bin")


@pytest.mark.parametrize("rel", ["curated/grow.bin", "curated/ds/sub/grow.bin"],
                         ids=["file", "folder-member"])
async def test_a_file_written_to_while_it_is_sent_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rel: str
) -> None:
    """The job's error names the file that changed (it said "(file)" for a single file and
    the bare member name for a folder's, which left the user to guess which)."""
    src = tmp_path / "site-A" / rel
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(8 * CHUNK))
    (tmp_path / "site-B").mkdir()
    real = SourceFile.hash_span

    def hash_span(self: SourceFile, offset: int, length: int) -> str:
        if os.path.getsize(src) == 8 * CHUNK:
            with open(src, "ab") as grow:  # someone still writing it
                grow.write(b"more")
        return real(self, offset, length)

    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        monkeypatch.setattr(SourceFile, "hash_span", hash_span)
        sent = "curated/ds" if "/ds/" in rel else rel
        job = await _fails_cleanly(a, tmp_path, sent, "changed while being sent")
        assert f"changed while being sent: {rel} " in job.error


async def test_local_file_cut_short_before_a_chunk_is_compressed_is_a_changed_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk tried for compression is mapped from the file after it was hashed: a file cut
    short in between made mmap refuse the span (ValueError), which escaped the job and took
    A's sender down. Now it is the changed source it is."""
    src = tmp_path / "site-A/curated/text.bin"
    src.parent.mkdir(parents=True)
    # Two chunks: one batch, hashed (and checked) before the first chunk is mapped.
    text = b"".join(b"line %08d of a compressible file\n" % i for i in range(4000))
    src.write_bytes(text[: 2 * CHUNK])
    (tmp_path / "site-B").mkdir()

    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression=3) as (a, _b):
        policy = a.sender.compression["B"]
        real = policy.should_try

        def should_try() -> bool:  # asked right before the chunk is mapped
            os.truncate(src, 100)
            return real()

        monkeypatch.setattr(policy, "should_try", should_try)
        await _fails_cleanly(a, tmp_path, "curated/text.bin", "changed while being sent")
        monkeypatch.undo()
        await _local_still_serving(a, tmp_path, "curated/text.bin")


class _Unmapped:
    """A source whose reads fail with what no source maps (a backend's bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.size, self.path = inner, inner.size, inner.path

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        yield memoryview(self.read(offset, length))

    def read(self, offset: int, length: int) -> bytes:
        raise KeyError("a backend's bug")

    def changed(self) -> bool:
        return False

    def close(self) -> None:
        self.inner.close()


async def test_an_unexpected_error_from_a_source_fails_the_job_on_its_second_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The sender's backstop: whatever else escapes a source becomes a StorageError of the
    source's side, tried again once after the job's backoff; the same kind again fails the
    job (the daemon goes on), each logged as a warning with its type and traceback."""
    overrides, fs, root = _memory_site(tmp_path)
    fs.pipe_file(f"{root}/curated/big.bin", os.urandom(SIZE))
    async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
        storage = a.sender.storage
        real = storage.open_source
        monkeypatch.setattr(storage, "open_source", lambda rel: _Unmapped(real(rel)))
        with caplog.at_level(logging.WARNING, logger="transferd.sender"):
            job = await _fails_cleanly(a, tmp_path, "curated/big.bin",
                                       "KeyError: \"a backend's bug\"")
        records = [r for r in caplog.records if r.message == "job.source_error"]
        fields = [getattr(r, "fields", {}) for r in records]
        assert [f["outcome"] for f in fields] == ["tried again", "failed"]
        assert {f["type"] for f in fields} == {"builtins.KeyError"}
        assert all(r.levelno == logging.WARNING and r.exc_info for r in records)
        assert job.retries >= 1
        monkeypatch.undo()
        await _still_serving(a, fs, root, tmp_path)


async def test_an_unexpected_error_from_a_source_once_is_tried_again_and_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend's own kind that nothing classifies, raised once: the job waits its backoff,
    is tried again, and commits (it used to fail for good at once)."""
    overrides, fs, root = _memory_site(tmp_path)
    data = os.urandom(SIZE)
    fs.pipe_file(f"{root}/curated/big.bin", data)

    def fail(n: int) -> None:
        if n == 3:
            raise RuntimeError("backend library blew up once")

    async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
        _failing_reads(fs, monkeypatch, f"{root}/curated/big.bin", fail)
        [job] = await wait_for_jobs(a, a.sender.submit("curated/big.bin", ["B"]), timeout_s=30)
        assert job.state == "committed", job.error
        assert job.retries >= 1
        assert (tmp_path / "site-B/curated/big.bin").read_bytes() == data


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "tls"])
@pytest.mark.parametrize("always", [False, True], ids=["eio-once", "eio-always"])
async def test_a_read_error_on_a_channel_fails_the_chunks_send_not_channel_after_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always: bool, tls: bool
) -> None:
    """A hash-first raw chunk is read from its file on its channel's thread: by `sendfile`
    on a plain channel, piece by piece under TLS. EIO there (sendfile's EIO told from the
    socket's by a read of the file where it stopped) fails that send with the source's
    StorageError naming the file, which the chunk's own retry takes; the chunk is not put
    back in the queue to break channel after channel. Once, the retry reads again and the
    job commits; for good, the job waits for its next attempt with the source's error
    (retries within a short budget, each a new send that went out once)."""
    chunk = 256 * 1024
    src = tmp_path / "site-A" / "curated" / "f.bin"
    src.parent.mkdir(parents=True)
    data = os.urandom(10 * chunk)
    src.write_bytes(data)
    failed, sent = eio_on_channel_reads(monkeypatch, 9 * chunk, always=always)
    monkeypatch.setattr(sender_mod._ChunkPump, "may_one_pass", lambda *a: False)
    overrides: dict[str, Any] = {"tls": loopback_tls(tmp_path / "tls")} if tls else {}
    async with loopback_pair(tmp_path, chunk_size=chunk, compression="off",
                             **overrides) as (a, _b):
        a.sender.retry_budget_s = 0.5
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        if always:
            await poll_until(lambda: _job(a, job_id), lambda j: j.state == "waiting",
                             timeout_s=30)
        else:
            [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
            assert job.state == "committed", job.error
            assert (tmp_path / "site-B/curated/f.bin").read_bytes() == data
        # The sends' own errors (the job's note keeps only its last error, which may be
        # another chunk's or channel's), before the daemons' shutdown ends any still queued.
        errors = failed_sends(sent)
    assert failed
    assert_the_sources_eio(errors, src)
    # Each send that failed ended there: none went round the channels again.
    assert len(sent) >= 2
    assert all(item.sends == 1 for item in sent)


async def _job(a: Any, job_id: str) -> Any:
    return a.journal.job(job_id)
