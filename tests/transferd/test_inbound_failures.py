"""How B's inbound side answers commits held for chunks that failed in storage, with the
receiver stubbed down to what those paths ask of it (the real daemons' runs are in
tests/integration/test_round_trips.py)."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

import pytest

from transferd.errors import StorageError
from transferd.net import inbound as inbound_module
from transferd.net.inbound import InboundUploads
from transferd.protocol.upload import ChunkTarget
from transferd.site.journal import Upload, UploadState
from transferd.site.metrics import Metrics


class _Journal:
    def __init__(self) -> None:
        self.state = UploadState.OPEN

    def upload(self, upload: str) -> Upload | None:
        return Upload("A", "approved/x", self.state, None)  # type: ignore[arg-type]

    def received(self, upload: str) -> dict[tuple[int, int], str]:
        return {}


class _Receiver:
    """Chunk (0, 0) is missing; the journal fails its writes with `record_error`."""

    def __init__(self, record_error: StorageError | None = None) -> None:
        self.journal = _Journal()
        self.record_error = record_error
        self.failed: list[tuple[str, StorageError | None]] = []

    def missing(self, upload: str, manifest: Any) -> list[tuple[int, int]]:
        return [(0, 0)]

    def record_many(self, rows: list[Any]) -> None:
        if self.record_error is not None:
            raise self.record_error

    def fail(self, upload: str, now: float, cause: StorageError | None = None) -> None:
        self.failed.append((upload, cause))


def _inbound(receiver: _Receiver) -> InboundUploads:
    inbound = InboundUploads(receiver, Metrics(), time.monotonic, 1)  # type: ignore[arg-type]
    inbound.bind(asyncio.get_running_loop())
    return inbound


async def test_a_commit_after_a_failed_copy_waits_while_another_copy_is_being_staged() -> None:
    """Copy 1 of a chunk failed in storage; copy 2 (sent again) is being staged when the
    commit comes: the commit waits for copy 2 rather than being refused at once, and is
    answered as soon as copy 2 fails too."""
    inbound = _inbound(_Receiver())
    eio = StorageError("writing u failed: EIO", errno=errno.EIO)
    inbound._chunk_failed("u", frozenset({(0, 0)}), eio)
    targets = [ChunkTarget(0, 0, 10)]
    inbound._count_copies("u", targets, 1)  # copy 2 on its way
    held = asyncio.create_task(inbound._until_staged("u", None, idle_s=30.0))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert not held.done(), "refused at once with another copy on its way"
    inbound._count_copies("u", targets, -1)
    inbound._chunk_failed("u", frozenset({(0, 0)}), eio)  # copy 2 failed as well
    async with asyncio.timeout(5):
        await held


async def test_a_booking_that_fails_for_a_full_disk_fails_the_upload_and_its_held_commit() -> None:
    """The journal cannot book staged chunks (its disk is full): the upload fails at once and
    a commit held for those chunks is answered now, not after its idle time."""
    full = StorageError("journal: database or disk is full", errno=errno.ENOSPC)
    receiver = _Receiver(record_error=full)
    inbound = _inbound(receiver)
    held = asyncio.create_task(inbound._until_staged("u", None, idle_s=30.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    targets = [ChunkTarget(0, 0, 10)]
    inbound._count_copies("u", targets, 1)
    with pytest.raises(StorageError):
        inbound._book([inbound_module._Landed(("u", targets, "digest"), "A", 10)])
    assert receiver.failed == [("u", full)]
    async with asyncio.timeout(5):
        await held
    assert inbound._copies == {}


async def test_a_chunk_failing_for_an_upload_no_longer_open_is_not_remembered() -> None:
    """A copy failing after its upload failed (or was aborted, or committed): nothing would
    ever forget its place, so none is remembered."""
    receiver = _Receiver()
    inbound = _inbound(receiver)
    receiver.journal.state = UploadState.FAILED
    inbound._chunk_failed("u", frozenset({(0, 0)}), StorageError("EIO", errno=errno.EIO))
    assert inbound._failed_places == {}
