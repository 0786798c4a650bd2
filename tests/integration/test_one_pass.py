"""One pass for fresh uploads (issue 11): a file the receiver has nothing of is read, hashed and
sent in one pass (its address in a MAC'd trailer), with one chunk in ONE_PASS_PROBE_EVERY still
hashed and offered first. Every chunk is still checked against its address before it is
written; a body damaged in flight is refused and sent again; a resumed upload, an older
receiver and a file whose probe the receiver holds go hash-first; a source that changed
between a send and its send again fails the job."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.integration._data import (
    eio_on_channel_reads,
    file_blake3,
    two_jobs_through,
    write_random,
)
from tests.integration._procs import poll_until
from transferd import daemon as daemon_mod
from transferd.errors import IntegrityError, TransportError
from transferd.net import channels as channels_mod
from transferd.net import inbound as inbound_mod
from transferd.net import sender as sender_mod
from transferd.net import server as server_mod
from transferd.net.channels import OutgoingChunk
from transferd.net.loop_lag import LagPace
from transferd.protocol import manifest
from transferd.protocol.chunks import blake3_hex
from transferd.protocol.manifest import ChunkRef, UploadIntent
from transferd.protocol.upload import ONE_PASS_PROBE_EVERY
from transferd.site.journal import UploadState
from transferd.site.receiver import Receiver
from transferd.site.source import SourceFile
from transferd.site.staging import Staging
from transferd.site.storage import LocalStorage
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

CHUNK = 256 * 1024


def chunk_names(proxy: LinkProxy, since: int = 0) -> list[str]:
    """What each chunk frame on the data channels carried: "one-pass", or its address."""
    return [m.path for m in proxy.captured[since:] if m.kind == "chunk"]


def hash_first_expected(n: int, first: int = 2) -> int:
    """Chunks of a fresh n-chunk file that are hashed and offered first: the first batch,
    then one probe every ONE_PASS_PROBE_EVERY."""
    return first + len(range(first, n, ONE_PASS_PROBE_EVERY))


async def test_a_fresh_file_goes_in_one_pass_but_for_its_first_batch_and_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which files may go in one pass (no destination file) comes from the listing the open's
    space check made: the destinations are listed once, not again in the same open."""
    n = 20
    digest = write_random(tmp_path / "site-A" / "curated" / "f.bin", n * CHUNK, seed=1)
    sizes = LocalStorage.sizes
    listings: list[list[str]] = []

    def counted(self: LocalStorage, rels: Any) -> list[int | None]:
        listings.append(list(rels))
        return sizes(self, rels)

    monkeypatch.setattr(LocalStorage, "sizes", counted)
    proxy = LinkProxy(capture=True)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, compression="off") as (
        a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    names = chunk_names(proxy)
    assert len(names) == n == job.chunks_sent
    assert names.count("one-pass") == n - hash_first_expected(n) == 15
    assert n * CHUNK <= job.bytes_on_wire < n * CHUNK + 64 * 1024
    assert listings == [["curated/f.bin"]]


async def test_each_chunk_wakes_the_sending_loop_at_most_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's send start, its one-pass digest and its receipt reach A's loop through one
    inbox (`LoopInbox`): the start wakes nothing (it rides with the next call), so at most
    the digest and the receipt wake the loop, and both together once when they come close;
    a crossing each was three wake-ups per chunk (one-pass chunks: 3n less the hashed-first
    ones' digests, over 2n). Counted where the wakes are asked for: `call_soon_threadsafe`
    from A's sending channel threads. Every send's start is still booked before its job
    ends (bytes_on_wire counts every chunk's body)."""
    n = 24
    digest = write_random(tmp_path / "site-A" / "curated" / "f.bin", n * CHUNK, seed=9)
    loop = asyncio.get_running_loop()
    wakes: list[str] = []
    real_call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        if name.startswith(("channel-send-", "channel-recv-", "channel-watch-")):
            wakes.append(name)
        return real_call_soon_threadsafe(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    assert job.chunks_sent == n
    assert n * CHUNK <= job.bytes_on_wire < n * CHUNK + 64 * 1024
    assert 0 < len(wakes) <= 2 * n


async def test_a_send_start_left_unbooked_at_shutdown_is_booked_before_the_journal_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send's start rides with the next batch or the probe's tick (`post_later`); at a
    daemon's stop neither comes, so the stop books it (bytes_on_wire would miss the send).
    The probe here never ticks, so only the stop can."""
    real_watch_lag = daemon_mod.watch_lag

    async def quiet_probe(on_tick: Any, working: Any) -> None:
        await real_watch_lag(on_tick, working=working,
                             pace=LagPace(tick_s=3600.0, idle_tick_s=3600.0))

    monkeypatch.setattr(daemon_mod, "watch_lag", quiet_probe)
    booked: list[str] = []
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        inbox = a.sender.inbox(asyncio.get_running_loop())
        await asyncio.to_thread(inbox.post_later, booked.append, "on_wire")
        await asyncio.sleep(0.05)
        assert booked == []
    assert booked == ["on_wire"]


async def test_a_body_damaged_in_a_one_pass_chunk_is_refused_unwritten_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-pass twin of `test_byte_flipped_in_flight_is_detected_refetched_and_counted`:
    the trailer's address is checked against the body hashed as it arrived, the chunk is
    answered DAMAGED and nothing of it is written; sent again, it lands, counted once."""
    src = tmp_path / "site-A" / "approved" / "model.bin"
    digest = write_random(src, 12 * CHUNK, seed=7)
    data = src.read_bytes()
    written: list[tuple[int, bool]] = []
    write = Staging.write

    def checked_write(self: Staging, index: int, offset: int, body: Any) -> None:
        written.append((offset, bytes(body) == data[offset : offset + len(body)]))
        write(self, index, offset, body)

    monkeypatch.setattr(Staging, "write", checked_write)
    proxy = LinkProxy(corrupt_first={"one-pass": 1})
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, compression="off") as (
        a, b):
        [job_id] = a.sender.submit("approved/model.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    [damaged] = proxy.corrupted
    assert (damaged.path, damaged.status) == ("one-pass", 422)  # a one-pass chunk, DAMAGED
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "approved" / "model.bin") == digest
    assert job.integrity_failures == 1
    assert job.chunks_sent == 12
    assert b.metrics.value("transferd_integrity_failures_total", peer="A", side="receiver") == 1
    # Every write carried the source's bytes, each span once: the damaged body never was.
    assert all(ok for _off, ok in written)
    assert sorted(off for off, _ok in written) == [i * CHUNK for i in range(12)]


async def test_a_source_changed_before_a_send_again_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-pass chunk damaged in flight is sent again from its file; the file was rewritten
    meanwhile: the re-read does not hash to the first send's address, so the job fails with
    "source file changed" and nothing is committed."""
    src = tmp_path / "site-A" / "approved" / "m.bin"
    write_random(src, 10 * CHUNK, seed=3)  # first batch 2, probe, then 7 in one pass
    proxy = LinkProxy(corrupt_first={"one-pass": 1})
    hash_span = SourceFile.hash_span
    rewritten: list[bool] = []

    def rewrite_once_damaged(self: SourceFile, offset: int, length: int) -> str:
        if proxy.corrupted and not rewritten:
            rewritten.append(True)
            with open(src, "r+b") as f:  # the same file, other bytes (as an editor saving)
                f.write(bytes(10 * CHUNK))
        return hash_span(self, offset, length)

    monkeypatch.setattr(SourceFile, "hash_span", rewrite_once_damaged)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, compression="off") as (
        a, _b):
        [job_id] = a.sender.submit("approved/m.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert rewritten
    assert proxy.corrupted[0].path == "one-pass"
    assert job.state == "failed"
    assert job.error is not None
    assert "source file changed" in job.error
    assert not (tmp_path / "site-B" / "approved" / "m.bin").exists()


async def test_a_probe_the_receiver_holds_turns_the_file_back_to_hash_first(
    tmp_path: Path,
) -> None:
    """b.bin: ten new chunks, then the ten last chunks of a.bin (committed at B already). Its
    first batch and first probe are new (one pass from chunk 3); the probe at chunk 10 is held
    at B, so chunks 11-19 are hashed and offered: all ten are copied at B, none sent."""
    a_path = tmp_path / "site-A" / "curated" / "a.bin"
    write_random(a_path, 20 * CHUNK, seed=5)
    fresh = write_random(tmp_path / "scratch.bin", 10 * CHUNK, seed=6)
    assert fresh
    b_bytes = (tmp_path / "scratch.bin").read_bytes() + a_path.read_bytes()[10 * CHUNK :]
    (tmp_path / "site-A" / "curated" / "b.bin").write_bytes(b_bytes)
    proxy = LinkProxy(capture=True)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, compression="off") as (
        a, _b):
        [first_id] = a.sender.submit("curated/a.bin", ["B"])
        [first] = await wait_for_jobs(a, [first_id])
        seen = len(proxy.captured)
        [second_id] = a.sender.submit("curated/b.bin", ["B"])
        [second] = await wait_for_jobs(a, [second_id])
    assert (first.state, second.state) == ("committed", "committed"), second.error
    assert (tmp_path / "site-B" / "curated" / "b.bin").read_bytes() == b_bytes
    names = chunk_names(proxy, seen)
    assert len(names) == second.chunks_sent == 10
    assert names.count("one-pass") == ONE_PASS_PROBE_EVERY - 1  # chunks 3-9
    assert second.chunks_skipped == 10
    assert second.bytes_on_wire < 10 * CHUNK + 64 * 1024


class _OpenRequestBeforeOnePass(UploadIntent):
    """`OpenRequest` as the release before `one_pass` parses it (unknown fields refused)."""

    offer: list[ChunkRef] = []
    one_pass: ClassVar[bool] = False  # (not a field: what the new `inbound.open` reads)
    offered = manifest.OpenRequest.offered
    intent = manifest.OpenRequest.intent
    have = manifest.OpenRequest.have


_OpenRequestBeforeOnePass.__name__ = "OpenRequest"  # as its refusals name it


async def test_an_older_receiver_gets_every_file_hash_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B refuses the open's `one_pass` (400, as a release before it does): A opens again
    without it, sends every chunk hash-first, and remembers: its next job asks no more."""
    monkeypatch.setattr(server_mod, "OpenRequest", _OpenRequestBeforeOnePass)
    monkeypatch.setattr(inbound_mod, "OpenRequest", _OpenRequestBeforeOnePass)
    link = LinkProxy(capture=True)
    opens = await two_jobs_through(tmp_path, link, 12 * CHUNK, chunk_size=CHUNK,
                                   compression="off")
    assert opens == [400, 200, 200]  # refused once, then without asking: the second job at once
    names = chunk_names(link)
    assert len(names) == 24
    assert "one-pass" not in names


async def test_a_resumed_fresh_upload_goes_hash_first_and_sends_no_staged_chunk_again(
    tmp_path: Path,
) -> None:
    """The sender stops mid-way through a fresh file sent in one pass; restarted, it re-opens
    the same upload: B has staged spans now, so the file is not listed for one pass, every
    chunk is offered hash-first and only those B lacks are sent."""
    n = 48
    digest = write_random(tmp_path / "site-A" / "approved" / "m.bin", n * CHUNK, seed=21)
    first = LinkProxy(capture=True, rate_bytes_per_s=4e6)  # ~3 s for the file: stopped mid-way
    async with loopback_pair(tmp_path, proxy=first, chunk_size=CHUNK, compression="off") as (
        a, b):
        [job_id] = a.sender.submit("approved/m.bin", ["B"])
        upload = f"A-{job_id}"
        await poll_until(lambda: _staged(b, upload), lambda k: k >= n // 3, 30, 0.02)
    landed = [m for m in first.captured if m.kind == "chunk" and m.status == 204]
    assert n // 3 <= len(landed) < n
    assert any(m.path == "one-pass" for m in landed)  # the first run went in one pass
    second = LinkProxy(capture=True)
    async with loopback_pair(tmp_path, proxy=second, chunk_size=CHUNK, compression="off") as (
        a, _b):
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "approved" / "m.bin") == digest
    names = chunk_names(second)
    assert "one-pass" not in names  # resumed: hash-first throughout
    assert len(names) <= n - len(landed)  # nothing staged before crossed the wire again


async def _staged(daemon: Any, upload: str) -> int:
    return len(daemon.journal.received(upload))


async def test_a_one_pass_chunk_whose_send_failed_after_its_body_goes_again_by_its_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 9's body goes in one pass (hashed as it went), then the peer becomes unreachable
    before its receipt (`_send` raises TransportError) and the file is rewritten keeping its
    size and mtime (which `SourceFile.changed` cannot see). The send again is hash-first under
    the first send's address: B answers DAMAGED, the re-read differs, the job fails "changed"
    and B commits nothing (not a file mixing the two versions)."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=1)  # 0-1 first batch, 2 probe, 3-9 one pass
    real = sender_mod._ChunkPump._send
    sends: list[tuple[bool, str]] = []

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if item.offset != 9 * CHUNK or sends or not item.one_pass:
            receipt = await real(self, item)
            if item.offset == 9 * CHUNK:
                sends.append((item.one_pass, item.digest))
            return receipt
        release = threading.Event()
        hashed = asyncio.Event()
        loop = asyncio.get_running_loop()
        told = item.on_digest
        assert told is not None

        def hold(digest: str) -> None:
            told(digest)
            loop.call_soon_threadsafe(hashed.set)
            release.wait(5)  # the channel's sender thread, before the trailer

        item.on_digest = hold
        self.channels.submit(item)
        await hashed.wait()
        sends.append((item.one_pass, item.digest))
        self.channels.expire(item, TransportError("B: link lost", peer="B"))
        release.set()
        _rewrite_keeping_size_and_mtime(src, [0, 9 * CHUNK])
        raise TransportError("B: link lost while the receipt was awaited", peer="B")

    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    assert len(sends) == 2
    assert sends[0][0]  # one pass,
    assert not sends[1][0]  # then hash-first
    assert sends[1][1] == sends[0][1]  # under the first send's address
    assert job.state == "failed"
    assert "source file changed" in (job.error or "")
    assert not (tmp_path / "site-B" / "curated" / "f.bin").exists()


@pytest.mark.parametrize("sealed", [False, True], ids=["retry-any-time", "retry-after-seal"])
async def test_a_one_pass_chunk_hashed_after_its_send_failed_goes_again_by_that_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sealed: bool
) -> None:
    """As above, but `_send` gives up on chunk 9 before its channel has hashed it; the channel
    sends it all the same and hashes it during the retry's backoff, then the file is
    rewritten (size and mtime kept). The retry takes the address its channel found and goes
    hash-first under it, not in one pass under a new one: B answers DAMAGED, or (`sealed`:
    the retry waits for it) the first send landed and the commit sent ahead sealed the upload
    with the file as A held it when the job began - never a mix of the two versions. Either
    way the job fails "source file changed" (the source no longer holds what was sent)."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=1)
    original = src.read_bytes()
    real_send = sender_mod._ChunkPump._send
    real_write = channels_mod._Channel._write_one_pass
    real_retrying = sender_mod.retrying
    gate = threading.Event()
    sends: list[tuple[bool, str]] = []
    first: list[OutgoingChunk] = []
    behind: list[asyncio.Task[None]] = []
    got = tmp_path / "site-B" / "curated" / "f.bin"

    def gated(self: Any, seq: int, item: OutgoingChunk) -> None:
        if item.offset == 9 * CHUNK:
            gate.wait(5)  # the channel thread, before it reads and hashes the chunk
        real_write(self, seq, item)

    async def hash_then_rewrite(item: OutgoingChunk) -> None:
        gate.set()
        while not item.digest:  # noqa: ASYNC110 (the channel thread hashes it now)
            await asyncio.sleep(0.001)
        await asyncio.to_thread(_rewrite_keeping_size_and_mtime, src, [0, 9 * CHUNK])

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if item.offset != 9 * CHUNK:
            return await real_send(self, item)
        sends.append((item.one_pass, item.digest))
        if len(sends) > 1:
            if sealed:  # the first send landed: the commit sent ahead seals the upload
                await poll_until(committed_at_b, bool, 30)
            return await real_send(self, item)
        first.append(item)
        self.channels.submit(item)  # its send goes on after this attempt gave up
        behind.append(asyncio.create_task(hash_then_rewrite(item)))
        raise TransportError("B: no receipt, link lost", peer="B")

    sites: list[Any] = []

    async def committed_at_b() -> bool:  # sealed: B's journal, not the file renamed before it
        return bool(sites[1].journal.uploads(UploadState.COMMITTED))

    def retrying(call: Any, **kw: Any) -> Any:
        async def after_behind() -> Any:
            for task in behind:
                await task  # the channel's late hash and the rewrite, before the retry
            return await call()
        return real_retrying(after_behind, **kw)

    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    monkeypatch.setattr(channels_mod._Channel, "_write_one_pass", gated)
    monkeypatch.setattr(sender_mod, "retrying", retrying)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, b):
        sites += [a, b]
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    assert first[0].digest  # hashed by its channel, after its attempt gave up
    assert sends == [(True, ""), (False, first[0].digest)]
    assert job.state == "failed"
    assert "source file changed" in (job.error or "")
    if sealed:
        assert got.read_bytes() == original
    elif got.exists():
        assert got.read_bytes() == original


async def test_a_one_pass_digest_told_after_the_commit_sealed_the_upload_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_send` gives up on chunk 9 while its channel holds it unread (the send goes on); the
    retry goes in one pass too (no digest yet), lands, and the commit sent ahead seals the
    upload. Then the file is rewritten (size and mtime kept) and the first send reads and
    hashes it: a second digest for the chunk, after the commit. B holds the bytes the job
    read first (never a mix), but the job fails "source file changed" as it does when the
    second digest comes before its manifest."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=1)  # 0-1 first batch, 2 probe, 3-9 one pass
    original = src.read_bytes()
    got = tmp_path / "site-B" / "curated" / "f.bin"
    real_send = sender_mod._ChunkPump._send
    real_write = channels_mod._Channel._write_one_pass
    gate = threading.Event()
    first: list[OutgoingChunk] = []
    sends: list[tuple[bool, str]] = []

    def gated(self: Any, seq: int, item: OutgoingChunk) -> None:
        if first and item is first[0]:
            gate.wait(30)  # the channel thread, before it reads and hashes the chunk
        real_write(self, seq, item)

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if item.offset != 9 * CHUNK:
            return await real_send(self, item)
        sends.append((item.one_pass, item.digest))
        if first:
            return await real_send(self, item)
        first.append(item)
        self.channels.submit(item)  # its send goes on after this attempt gave up
        raise TransportError("B: no receipt, link lost", peer="B")

    async def committed_at_b() -> bool:
        return got.exists()

    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    monkeypatch.setattr(channels_mod._Channel, "_write_one_pass", gated)
    try:
        async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
            [job_id] = a.sender.submit("curated/f.bin", ["B"])
            await poll_until(committed_at_b, bool, 30)
            await asyncio.to_thread(_rewrite_keeping_size_and_mtime, src, [9 * CHUNK])
            gate.set()
            [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    finally:
        gate.set()
    assert sends == [(True, ""), (True, "")]  # the retry went in one pass as well
    assert first[0].digest  # the first send's digest, told after the commit
    assert got.read_bytes() == original  # B: what the job read first
    assert job.state == "failed"
    assert "source file changed" in (job.error or "")


async def test_a_hash_first_chunk_sent_again_after_the_seal_is_delivered_without_a_reread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash-first chunk's receipt is lost (its send goes on and lands), the commit sent
    ahead seals the upload, then the file is rewritten in place (size and mtime kept) before
    the retry: the retry finds the upload committed with the bytes its digest names (hashed
    from the source before they went, as the manifest says), so the chunk is delivered and
    the job commits; the source is not read again (a rewrite since is another job's).

    Sealed means B's journal says COMMITTED, which comes after the files are renamed into
    place: the test waited for the file to exist and, once in a full run, sent the retry in
    between (answered DAMAGED, the job failed "changed"). The gap is widened here so the
    test shows it waits for the seal itself."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=1)
    original = src.read_bytes()
    got = tmp_path / "site-B" / "curated" / "f.bin"
    real_send = sender_mod._ChunkPump._send
    sends: list[tuple[bool, str]] = []

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if item.offset != 9 * CHUNK:
            return await real_send(self, item)
        sends.append((item.one_pass, item.digest))
        if len(sends) > 1:
            await poll_until(committed_at_b, bool, 30)  # sealed by the commit sent ahead
            await asyncio.to_thread(_rewrite_keeping_size_and_mtime, src, [9 * CHUNK])
            return await real_send(self, item)
        self.channels.submit(item)  # its send goes on after this attempt gave up
        raise TransportError("B: no receipt, link lost", peer="B")

    sites: list[Any] = []

    async def committed_at_b() -> bool:
        return bool(sites[1].journal.uploads(UploadState.COMMITTED))

    real_commit_files = Receiver.commit_files

    def commit_files_then_pause(self: Receiver, *args: Any, **kwargs: Any) -> None:
        real_commit_files(self, *args, **kwargs)
        time.sleep(0.5)  # (a thread) renamed into place, not yet COMMITTED in the journal

    monkeypatch.setattr(Receiver, "commit_files", commit_files_then_pause)
    monkeypatch.setattr(sender_mod._ChunkPump, "may_one_pass", lambda *a: False)
    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, b):
        sites += [a, b]
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    digest = blake3_hex(original[9 * CHUNK :])
    assert sends == [(False, digest), (False, digest)]
    assert job.state == "committed", job.error
    assert got.read_bytes() == original


def _rewrite_keeping_size_and_mtime(path: Path, offsets: list[int]) -> None:
    """Other bytes (zeros) in the chunks at `offsets`, the size and mtime kept (a restore, or
    two writes inside one timestamp tick)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(bytes(CHUNK))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_a_one_pass_chunk_told_a_second_digest_keeps_the_first_and_fails_the_job(
    tmp_path: Path,
) -> None:
    """`settle` hearing another digest for a chunk it already knows (two one-pass reads of a
    file that changed between them) keeps the first and the job fails before its manifest."""
    state = sender_mod._FileState("f.bin", SourceFile.__new__(SourceFile))
    settle = state.one_pass_chunk(asyncio.get_running_loop(), 0, CHUNK)
    assert settle("aa" * 32)
    assert not settle("bb" * 32)
    assert settle("aa" * 32)  # the same again (its receipt) is no conflict
    assert state.chunks == [("aa" * 32, 0, CHUNK)]
    with pytest.raises(IntegrityError, match="source file changed"):
        await sender_mod._one_pass_digests([state])


@pytest.mark.parametrize("one_pass", [True, False])
async def test_a_file_cut_short_inside_its_last_chunk_fails_the_job_and_the_next_one_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_pass: bool
) -> None:
    """The file is truncated inside chunk 9 just before that chunk's send (in one pass, or
    hash-first by `sendfile`): the chunk fails with the changed-source error naming the file
    (it is not put back in the queue to break channel after channel), the job fails, and the
    daemon sends the next job as usual."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    write_random(src, 10 * CHUNK, seed=1)  # 0-1 first batch, 2 probe, 3-9 one pass
    other = write_random(tmp_path / "site-A" / "curated" / "g.bin", 4 * CHUNK, seed=2)
    real = sender_mod._ChunkPump._send
    cut: list[OutgoingChunk] = []

    async def send(self: Any, item: OutgoingChunk) -> Any:
        if not cut and item.offset == 9 * CHUNK:
            cut.append(item)
            os.truncate(src, 9 * CHUNK + 1000)
        return await real(self, item)

    monkeypatch.setattr(sender_mod._ChunkPump, "_send", send)
    if not one_pass:
        monkeypatch.setattr(sender_mod._ChunkPump, "may_one_pass", lambda *a: False)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
        [next_id] = a.sender.submit("curated/g.bin", ["B"])
        [next_job] = await wait_for_jobs(a, [next_id], timeout_s=30)
    assert [item.one_pass for item in cut] == [one_pass]
    assert cut[0].sends == 1  # the chunk failed; it did not go round the channels
    assert job.state == "failed"
    assert job.error is not None
    assert "source file changed" in job.error
    assert str(src) in job.error  # the file named, not an empty chunk address
    assert not (tmp_path / "site-B" / "curated" / "f.bin").exists()
    assert next_job.state == "committed", next_job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "g.bin") == other


async def test_a_read_error_in_a_one_pass_chunk_fails_that_send_not_its_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO reading chunk 9 on its channel's thread (one pass): the chunk's send fails with
    the source's transient StorageError, which the chunk's own retry takes (read again, it
    lands); it is not put back in the queue for channel after channel to fail on."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    digest = write_random(src, 10 * CHUNK, seed=4)
    failed, sent = eio_on_channel_reads(monkeypatch, 9 * CHUNK)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
    assert failed == [9 * CHUNK]
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    # The failed send ended with the read (not queued again); the chunk's retry, a new send
    # after the source's transient error, landed.
    assert [item.sends for item in sent] == [1, 1]
    assert sent[0].one_pass


async def test_one_pass_chunks_that_break_their_channels_go_hash_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that refuses the one-pass frame mid-job (downgraded) closes the channel at
    its header: here every one-pass send from chunk 4 on breaks its channel. A chunk whose
    sends broke ONE_PASS_SENDS channels is hashed first on its channel and goes as an
    ordinary chunk, and one pass to the peer is off from then: the job commits, and the
    channels broken are bounded by the chunks in flight, not by the file's length."""
    n = 40
    src = tmp_path / "site-A" / "curated" / "f.bin"
    digest = write_random(src, n * CHUNK, seed=5)
    write_one_pass = channels_mod._Channel._write_one_pass
    refused: list[tuple[int, int]] = []

    def refuse(self: Any, seq: int, item: OutgoingChunk) -> None:
        if item.offset >= 4 * CHUNK:
            refused.append((item.offset, item.sends))
            raise ConnectionResetError("B closed the channel: unknown frame kind 3")
        write_one_pass(self, seq, item)

    monkeypatch.setattr(channels_mod._Channel, "_write_one_pass", refuse)
    proxy = LinkProxy(capture=True)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, compression="off") as (
        a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=30)
        off = a.channels["B"].one_pass_off_until
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    assert chunk_names(proxy).count("one-pass") == 1  # chunk 3 only
    assert all(sends <= channels_mod.ONE_PASS_SENDS for _off, sends in refused)
    one_pass_after = n - hash_first_expected(n) - 1
    assert len(refused) < one_pass_after  # 2 per chunk without the switch-off: 64
    assert off > 0


async def test_a_channels_one_pass_buffer_is_unmapped_when_it_closes(tmp_path: Path) -> None:
    """Each channel that sent a chunk in one pass mapped a 1 MiB buffer for it; closed (here
    as the daemon stops), the channel's sender thread unmaps it."""
    write_random(tmp_path / "site-A" / "curated" / "f.bin", 12 * CHUNK, seed=9)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
        chans = list(a.channels["B"].channels)
        pieces = [c._piece for c in chans if c._piece is not None]
    assert job.state == "committed", job.error
    assert pieces  # one pass went through them
    assert all(not t.is_alive() for c in chans for t in c.threads)
    assert all(c._piece is None for c in chans)
    for piece in pieces:
        with pytest.raises(ValueError, match="released"):
            bytes(piece[:1])
