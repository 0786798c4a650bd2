"""A job's control round trips: the upload opens with have/want of its first chunks, and the
commit goes out with the last chunks still on the way, answered when they land (issue 11: the
fixed cost of a short job on a long link)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.integration._data import file_blake3, two_jobs_through, write_random
from tests.integration._procs import poll_until
from tests.integration.test_auth_policy import send_chunk
from transferd import TrafficClass
from transferd.daemon import Daemon
from transferd.errors import ProtocolError, StorageError, TransferdError
from transferd.net import inbound as inbound_mod
from transferd.net import sender as sender_mod
from transferd.net import server as server_mod
from transferd.protocol.channel import ReceiptStatus
from transferd.protocol.local_api import JobState
from transferd.protocol.manifest import (
    ChunkRef,
    CommitAnswer,
    OfferAnswer,
    OpenAnswer,
    UploadIntent,
)
from transferd.protocol.upload import (
    commit_path,
    offer_batches,
    offer_refused,
    open_request,
    upload_intent,
    upload_manifest,
)
from transferd.protocol.wire import parse_body, to_body
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

CHUNK = 64 * 1024
UPLOAD = "A-round-trip-1"


def control_paths(link: LinkProxy) -> list[str]:
    return [m.path for m in link.captured if m.kind == "control"]


@pytest.mark.parametrize("chunks", [2, 12])
async def test_a_job_opens_with_its_first_offer_and_commits_ahead_of_its_receipts(
    tmp_path: Path, chunks: int
) -> None:
    """Control requests per job: one open (carrying the first batch's have/want), one
    have/want per later batch, one commit sent with `wait_ms` and answered 200. The old
    shape asked have/want for the first batch on its own and committed after the receipts."""
    src = tmp_path / "site-A" / "curated" / "f.bin"
    digest = write_random(src, chunks * CHUNK, seed=chunks)
    link = LinkProxy(capture=True)
    async with loopback_pair(tmp_path, link=link, chunk_size=CHUNK) as (a, _b):
        [job_id] = a.sender.submit("curated/f.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "f.bin") == digest
    upload = f"/v1/uploads/A-{job_id}"
    batches = len(offer_batches(chunks, 2, 8))
    assert control_paths(link) == [
        "/v1/uploads",
        *[f"{upload}/have"] * (batches - 1),
        f"{upload}/commit?wait_ms=10000",
    ]
    assert [m.status for m in link.captured if m.kind == "control"] == [200] * (batches + 1)


def test_an_older_peers_refusal_of_the_offer_is_recognised() -> None:
    """A receiver or relay before `OpenRequest` parses the open as `UploadIntent`: the offer
    is refused for good (400), and the sender knows it for what it is."""
    intent = upload_intent("A-job-0001", "A", "B", "curated/d", "file", [("", 30)])
    with pytest.raises(ProtocolError) as refused:
        parse_body(UploadIntent, to_body(open_request(intent, [])))
    assert not refused.value.transient
    assert offer_refused(refused.value)
    assert not offer_refused(ProtocolError("invalid OpenRequest: offer.0.hash: too short"))


async def test_an_older_receiver_is_opened_bare_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B parses opens as its release before `OpenRequest` did: the first job's open with an
    offer is refused (400), opened again bare with have/want on its own, and later jobs to B
    open bare at once. Both land."""
    monkeypatch.setattr(server_mod, "OpenRequest", UploadIntent)
    link = LinkProxy(capture=True)
    opens = await two_jobs_through(tmp_path, link, 3 * CHUNK, chunk_size=CHUNK)
    assert opens == [400, 200, 200]  # refused once, then bare: the second job at once
    assert len([m for m in link.captured
                if m.kind == "control" and m.path.endswith("/have")]) >= 2


async def _open(
    a: Daemon, data: list[bytes], upload: str = UPLOAD
) -> tuple[list[ChunkRef], OfferAnswer]:
    intent = upload_intent(upload, "A", "B", f"curated/{upload}.bin", "file",
                           [("", len(data) * CHUNK)])
    refs = [ChunkRef(file=0, offset=i * CHUNK, length=CHUNK,
                     hash=blake3.blake3(d).hexdigest()) for i, d in enumerate(data)]
    reply = await a.links["B"].call(TrafficClass.CONTROL, "POST", "/v1/uploads",
                                    body=open_request(intent, refs))
    return refs, parse_body(OfferAnswer, reply.body)


async def _commit(
    a: Daemon, refs: list[ChunkRef], wait_s: float, upload: str = UPLOAD
) -> CommitAnswer:
    intent = upload_intent(upload, "A", "B", f"curated/{upload}.bin", "file",
                           [("", len(refs) * CHUNK)])
    manifest = upload_manifest(intent, a.clock(), [[(r.hash, r.offset, r.length)
                                                    for r in refs]])
    reply = await a.links["B"].call(TrafficClass.CONTROL, "POST", commit_path(upload, wait_s),
                                    body=manifest.sign(a.keyring), accept=(200, 409))
    return parse_body(CommitAnswer, reply.body)


async def _until_waiting(b: Daemon, count: int) -> None:
    async with asyncio.timeout(10):
        for _ in iter(int, 1):  # until the commits reached B and wait there
            if b.inbound.commits_waiting >= count:
                return
            await asyncio.sleep(0.005)


async def test_a_commit_sent_ahead_is_answered_when_its_last_chunk_lands(
    tmp_path: Path,
) -> None:
    data = [bytes([i + 1]) * CHUNK for i in range(3)]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        refs, opened = await _open(a, data)
        assert opened.committed is False
        assert opened.want == [0, 1, 2]  # the offer was answered in the open
        assert (await send_chunk(a, UPLOAD, data[0], at=0)).status is ReceiptStatus.OK
        # Without a wait, a commit missing chunks is refused at once, naming them.
        refused = await _commit(a, refs, 0.0)
        assert refused == CommitAnswer(committed=False, want=[(0, CHUNK), (0, 2 * CHUNK)])
        ahead = asyncio.create_task(_commit(a, refs, 10.0))
        await _until_waiting(b, 1)
        assert (await send_chunk(a, UPLOAD, data[1], at=CHUNK)).status is ReceiptStatus.OK
        await asyncio.sleep(0.05)
        assert not ahead.done()  # one chunk still missing: the commit waits for it
        assert b.inbound.commits_waiting == 1
        assert not (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").exists()
        assert (await send_chunk(a, UPLOAD, data[2], at=2 * CHUNK)).status is ReceiptStatus.OK
        assert await ahead == CommitAnswer(committed=True)
        assert (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").read_bytes() == b"".join(data)
        assert b.inbound.commits_waiting == 0


async def test_a_commit_held_for_its_chunks_wakes_only_on_its_own_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks of another upload do not wake a held commit, and its own chunks are struck
    off without reading the journal again: the upload's received rows are read once when the
    commit arrives and once more under the commit lock."""
    mine = [b"\x11" * CHUNK, b"\x12" * CHUNK]
    other = [bytes([0x20 + i]) * CHUNK for i in range(6)]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        refs, _ = await _open(a, mine)
        await _open(a, other, upload="A-round-trip-other")
        reads: list[str] = []
        real_missing = b.receiver.missing

        def counted(upload: str, manifest):  # type: ignore[no-untyped-def]
            reads.append(upload)
            return real_missing(upload, manifest)

        monkeypatch.setattr(b.receiver, "missing", counted)
        assert (await send_chunk(a, UPLOAD, mine[0], at=0)).status is ReceiptStatus.OK
        ahead = asyncio.create_task(_commit(a, refs, 10.0))
        await _until_waiting(b, 1)
        assert reads == [UPLOAD]
        for i, body in enumerate(other):
            sent = await send_chunk(a, "A-round-trip-other", body, at=i * CHUNK)
            assert sent.status is ReceiptStatus.OK
        await asyncio.sleep(0.05)
        assert reads == [UPLOAD], "a held commit re-read its upload on another's chunks"
        assert not ahead.done()
        assert (await send_chunk(a, UPLOAD, mine[1], at=CHUNK)).status is ReceiptStatus.OK
        assert await ahead == CommitAnswer(committed=True)
        assert reads == [UPLOAD, UPLOAD]  # the check under the commit lock


async def test_commits_held_per_peer_are_capped_and_a_stop_answers_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the cap a commit sent ahead is answered at once (409, what is missing); a held
    commit is answered 503 (transient: the sender commits again) when the receiver stops."""
    monkeypatch.setattr(inbound_mod, "COMMITS_WAITING_PER_PEER", 1)
    data = [b"\x31" * CHUNK, b"\x32" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        refs, _ = await _open(a, data)
        other_refs, _ = await _open(a, data, upload="A-round-trip-other")
        held = asyncio.create_task(_commit(a, refs, 30.0))
        await _until_waiting(b, 1)
        async with asyncio.timeout(5):  # not held for its 30 s: answered at once
            answer = await _commit(a, other_refs, 30.0, upload="A-round-trip-other")
        assert answer == CommitAnswer(committed=False, want=[(0, 0), (0, CHUNK)])
        assert b.inbound.commits_waiting == 1
        b.inbound.stopping()
        async with asyncio.timeout(5):
            with pytest.raises(TransferdError, match="stopping") as stopped:
                await held
        assert stopped.value.transient
        assert b.inbound.commits_waiting == 0


async def test_a_commit_ahead_whose_chunks_stop_landing_is_refused_naming_them(
    tmp_path: Path,
) -> None:
    data = [b"\x07" * CHUNK, b"\x08" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        refs, _opened = await _open(a, data)
        assert (await send_chunk(a, UPLOAD, data[0], at=0)).status is ReceiptStatus.OK
        answer = await _commit(a, refs, 0.2)  # none lands for 0.2 s
        assert answer == CommitAnswer(committed=False, want=[(0, CHUNK)])
        assert not (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").exists()


async def test_open_shapes_old_and_new_and_a_bad_wait_are_answered_clearly(
    tmp_path: Path,
) -> None:
    data = [b"\x01" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        link = a.links["B"]
        intent = upload_intent("A-round-trip-2", "A", "B", "curated/v.bin", "file",
                               [("", CHUNK)])
        # A bare intent (an older sender) opens as before: an OpenAnswer, no `want` (the
        # strict model refuses unknown fields, so an older sender can read it).
        bare = await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads", body=intent)
        assert parse_body(OpenAnswer, bare.body) == OpenAnswer(upload="A-round-trip-2",
                                                               committed=False)
        # An empty offer opens too, answered with an empty want.
        empty = await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads",
                                body=open_request(intent, []))
        assert parse_body(OfferAnswer, empty.body).want == []
        refs, _opened = await _open(a, data)
        manifest = upload_manifest(
            upload_intent(UPLOAD, "A", "B", "curated/w.bin", "file", [("", CHUNK)]),
            a.clock(), [[(refs[0].hash, 0, CHUNK)]]).sign(a.keyring)
        for bad in ("abc", "-5", "1e3"):
            with pytest.raises(ProtocolError, match="wait_ms: .* not a whole number"):
                await link.call(TrafficClass.CONTROL, "POST",
                                f"/v1/uploads/{UPLOAD}/commit?wait_ms={bad}",
                                body=manifest, accept=(200, 409))
        # An offer naming a chunk outside the upload's files is refused, naming it.
        outside = refs[0].model_copy(update={"offset": CHUNK})
        with pytest.raises(ProtocolError, match="chunks\\[0\\] lies outside"):
            await link.call(TrafficClass.CONTROL, "POST", "/v1/uploads",
                            body=open_request(intent, [outside]))


def _hold_last_chunk_until_the_commit_waits(
    b: Daemon, waited: list[int]
) -> Callable[[], None]:
    """A function for B's chunk workers: wait (in the worker) until A's commit sent ahead is
    held at B, so the chunk's receipt meets that commit. It notes in `waited` how many
    commits were held then, for the test's thread to check (an assert in B's worker would
    only fail the chunk)."""

    def hold() -> None:
        deadline = time.monotonic() + 10
        while b.inbound.commits_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        waited.append(b.inbound.commits_waiting)

    return hold


@pytest.mark.parametrize("failure", ["io", "disk-full"])
async def test_a_storage_receipt_under_a_commit_sent_ahead_fails_the_job_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The receiver's storage fails the last chunk while the commit sent ahead waits for it:
    the data did not land, so the job fails (kind storage), nothing is visible at B and its
    staging is given back; and
    the held commit is answered at once, not after the commit's idle wait (set to 60 s here),
    so the job does not hang on a chunk that will never land."""
    monkeypatch.setattr(sender_mod, "COMMIT_AHEAD_IDLE_S", 60.0)
    src = tmp_path / "site-A" / "curated" / "s.bin"
    write_random(src, 4 * CHUNK, seed=41)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        waited: list[int] = []
        hold = _hold_last_chunk_until_the_commit_waits(b, waited)
        real_write = b.receiver.verify_and_write

        def failing_write(upload: str, digest: str, body: Any, *args: Any) -> None:
            targets = args[3]
            if targets[0].offset == 3 * CHUNK:
                hold()
                code = errno.EIO if failure == "io" else errno.ENOSPC
                raise StorageError(f"writing {upload} failed: {os.strerror(code)}",
                                   errno=code)
            real_write(upload, digest, body, *args)

        monkeypatch.setattr(b.receiver, "verify_and_write", failing_write)
        async with asyncio.timeout(20):  # the commit's idle wait is 60 s
            [job] = await wait_for_jobs(a, a.sender.submit("curated/s.bin", ["B"]), 30)
        assert waited == [1], "the commit was not sent ahead of the last chunk"
        assert job.state is JobState.FAILED, job
        assert job.error_kind == "storage", job
        assert not (tmp_path / "site-B" / "curated" / "s.bin").exists()
        assert b.inbound.commits_waiting == 0
        # and B gives the upload's staging back (the disk-full failure, or the sender's abort,
        # which follows the job's failure)
        staging = tmp_path / "site-B" / ".transferd" / "staging"

        async def staged() -> list[Path]:
            return list(staging.iterdir())

        assert await poll_until(staged, lambda left: not left, timeout_s=10) == []


async def test_a_storage_receipt_for_a_chunk_whose_commit_went_through_counts_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last chunk lands and its booking lets the commit sent ahead through, but its own
    receipt says STORAGE (as a copy sent again finds its upload sealed): the file is at B
    whole, so the job is committed, not failed."""
    src = tmp_path / "site-A" / "curated" / "s.bin"
    digest = write_random(src, 4 * CHUNK, seed=42)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        waited: list[int] = []
        hold = _hold_last_chunk_until_the_commit_waits(b, waited)
        real_landed = b.inbound.chunk_landed

        def landed_then_storage(head: Any, peer: str, targets: Any) -> None:
            if targets[0].offset == 3 * CHUNK:
                hold()
                real_landed(head, peer, targets)  # booked: the held commit goes through
                raise StorageError("upload sealed: committed meanwhile")
            real_landed(head, peer, targets)

        monkeypatch.setattr(b.inbound, "chunk_landed", landed_then_storage)
        [job] = await wait_for_jobs(a, a.sender.submit("curated/s.bin", ["B"]), 30)
        assert waited == [1], "the commit was not sent ahead of the last chunk"
        assert job.state is JobState.COMMITTED, job
        assert job.bytes_done == 4 * CHUNK
        assert file_blake3(tmp_path / "site-B" / "curated" / "s.bin") == digest


async def test_a_copy_sent_again_failing_in_storage_does_not_answer_the_held_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that landed is sent again (its receipt was lost) and that copy fails in
    storage while the commit waits for another chunk: the commit is not missing it, so it
    waits on and commits when the other lands."""
    data = [b"\x51" * CHUNK, b"\x52" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        ahead = await _first_chunk_landed_and_the_commit_held(a, b, data)
        monkeypatch.setattr(b.receiver, "verify_and_write", _failing_write_at(b, 0))
        assert (await send_chunk(a, UPLOAD, data[0], at=0)).status is ReceiptStatus.STORAGE
        await asyncio.sleep(0.05)
        assert not ahead.done()  # still waiting for chunk 1, not answered by the failed copy
        assert (await send_chunk(a, UPLOAD, data[1], at=CHUNK)).status is ReceiptStatus.OK
        assert await ahead == CommitAnswer(committed=True)
        assert (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").read_bytes() == b"".join(data)


async def _first_chunk_landed_and_the_commit_held(
    a: Daemon, b: Daemon, data: list[bytes]
) -> asyncio.Task[CommitAnswer]:
    """Open an upload of `data`, land its first chunk, and send its commit ahead (held up to
    60 s at B for the others): the task answering that commit, once B holds it."""
    refs, _ = await _open(a, data)
    assert (await send_chunk(a, UPLOAD, data[0], at=0)).status is ReceiptStatus.OK
    ahead = asyncio.create_task(_commit(a, refs, 60.0))
    await _until_waiting(b, 1)
    return ahead


def _failing_write_at(b: Daemon, offset: int) -> Callable[..., None]:
    """B's `verify_and_write`, failing (EIO) for the chunk at `offset`."""
    real_write = b.receiver.verify_and_write

    def write(upload: str, digest: str, body: Any, *args: Any) -> None:
        if args[3][0].offset == offset:
            raise StorageError(f"writing {upload} failed: {os.strerror(errno.EIO)}",
                               errno=errno.EIO)
        real_write(upload, digest, body, *args)

    return write


async def test_a_commit_coming_after_its_chunks_storage_failure_is_answered_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk fails in storage at B before the commit sent ahead reaches B (the commit
    was on its way): the commit, held for up to 60 s here, is answered at once naming the
    chunk, not after its idle wait. Once the chunk lands, the commit goes through."""
    data = [b"\x51" * CHUNK, b"\x52" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        refs, _ = await _open(a, data)
        assert (await send_chunk(a, UPLOAD, data[0], at=0)).status is ReceiptStatus.OK
        with monkeypatch.context() as patch:
            patch.setattr(b.receiver, "verify_and_write", _failing_write_at(b, CHUNK))
            receipt = await send_chunk(a, UPLOAD, data[1], at=CHUNK)
        assert receipt.status is ReceiptStatus.STORAGE
        async with asyncio.timeout(20):  # the commit's wait is 60 s
            answer = await _commit(a, refs, 60.0)
        assert answer == CommitAnswer(committed=False, want=[(0, CHUNK)])
        assert b.inbound.commits_waiting == 0
        # the chunk sent again lands: nothing is remembered as failed any more
        assert (await send_chunk(a, UPLOAD, data[1], at=CHUNK)).status is ReceiptStatus.OK
        assert await _commit(a, refs, 60.0) == CommitAnswer(committed=True)
        assert (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").read_bytes() == b"".join(data)


async def test_a_job_whose_chunk_failed_before_its_commit_reached_b_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same order in a job: B's storage fails the last chunk, and only then does the
    commit sent ahead reach B. The job fails (storage) without waiting for the commit's idle
    time (60 s here), while A's chunk task waits for that commit's answer."""
    monkeypatch.setattr(sender_mod, "COMMIT_AHEAD_IDLE_S", 60.0)
    src = tmp_path / "site-A" / "curated" / "s.bin"
    write_random(src, 4 * CHUNK, seed=43)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        loop = asyncio.get_running_loop()
        failed_seen = asyncio.Event()
        failing = _failing_write_at(b, 3 * CHUNK)
        ahead_sent: list[bool] = []

        def write(upload: str, digest: str, body: Any, *args: Any) -> None:
            try:
                failing(upload, digest, body, *args)
            except StorageError:
                # in B's worker: fail once A's commit is on its way (else the receipt, coming
                # before the commit is sent, fails the job at once anyway)
                deadline = time.monotonic() + 10
                while not a.sender._ahead and time.monotonic() < deadline:
                    time.sleep(0.005)
                ahead_sent.append(bool(a.sender._ahead))
                # after `_chunk_failed`, queued on the loop just before it
                loop.call_soon_threadsafe(lambda: loop.call_soon(failed_seen.set))
                raise

        monkeypatch.setattr(b.receiver, "verify_and_write", write)
        real_commit = b.inbound.commit

        async def late_commit(*args: Any, **kw: Any) -> CommitAnswer:
            await failed_seen.wait()  # the commit is handled after the chunk's failure
            return await real_commit(*args, **kw)

        monkeypatch.setattr(b.inbound, "commit", late_commit)
        async with asyncio.timeout(20):
            [job] = await wait_for_jobs(a, a.sender.submit("curated/s.bin", ["B"]), 30)
        assert ahead_sent == [True], "the commit was not sent ahead of the last chunk"
        assert job.state is JobState.FAILED, job
        assert job.error_kind == "storage", job
        assert not (tmp_path / "site-B" / "curated" / "s.bin").exists()
        assert b.inbound.commits_waiting == 0


async def test_a_failed_copy_does_not_answer_the_commit_while_another_copy_is_booked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one chunk (sent again after a channel broke): the first is staged and
    its booking not yet done when the second fails in storage. The first will land, so the
    commit held for that chunk waits on, and commits when the first copy is booked."""
    data = [b"\x61" * CHUNK, b"\x62" * CHUNK]
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        ahead = await _first_chunk_landed_and_the_commit_held(a, b, data)
        staged, go_on = threading.Event(), threading.Event()
        real_landed = b.inbound.chunk_landed

        def held_landed(head: Any, peer: str, targets: Any) -> None:
            if targets[0].offset == CHUNK and not go_on.is_set():
                staged.set()
                go_on.wait(10)  # in B's worker: the first copy, staged, not booked yet
            real_landed(head, peer, targets)

        monkeypatch.setattr(b.inbound, "chunk_landed", held_landed)
        first = asyncio.create_task(send_chunk(a, UPLOAD, data[1], at=CHUNK))
        assert await asyncio.to_thread(staged.wait, 10)
        monkeypatch.setattr(b.receiver, "verify_and_write", _failing_write_at(b, CHUNK))
        second = await send_chunk(a, UPLOAD, data[1], at=CHUNK)
        assert second.status is ReceiptStatus.STORAGE
        await asyncio.sleep(0.05)
        assert not ahead.done()  # not answered by the failed copy
        go_on.set()
        assert (await first).status is ReceiptStatus.OK
        assert await ahead == CommitAnswer(committed=True)
        assert (tmp_path / "site-B" / "curated" / f"{UPLOAD}.bin").read_bytes() == b"".join(data)
