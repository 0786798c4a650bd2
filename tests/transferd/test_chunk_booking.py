"""The receiving side's per-chunk path without the event loop's round trips: a chunk's
targets come from the upload's row remembered while this process holds the upload open, and
the chunks that land while the loop is busy are booked in one journal transaction, each
worker answering only once its row is committed."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import blake3
import pytest

from transferd.errors import StorageError
from transferd.net.channels import LoopBatches
from transferd.protocol.upload import ChunkTarget, upload_intent
from transferd.site.journal import Journal
from transferd.site.keys import keygen
from transferd.testing import receiver_at

CHUNK = 4096


async def test_chunks_landing_together_are_handled_in_one_batch() -> None:
    loop = asyncio.get_running_loop()
    batches: list[list[int]] = []
    batcher: LoopBatches[int] = LoopBatches(batches.append)
    # Eight workers hand in an item each while the loop is busy: one batch takes them all.
    def busy_loop() -> None:
        for _ in range(1000):
            if len(batcher._pending) == 8:
                return
            time.sleep(0.01)

    loop.call_soon(busy_loop)
    threads = [threading.Thread(target=batcher.run, args=(loop, i)) for i in range(8)]
    for t in threads:
        t.start()
    await asyncio.to_thread(lambda: [t.join(10) for t in threads])
    assert not any(t.is_alive() for t in threads)
    assert len(batches) == 1  # a call per item without the batching
    assert sorted(batches[0]) == list(range(8))


async def test_a_failed_batch_fails_every_item_in_it() -> None:
    loop = asyncio.get_running_loop()

    def handle(_items: list[int]) -> None:
        raise StorageError("journal write failed: disk full")

    batcher: LoopBatches[int] = LoopBatches(handle)
    with pytest.raises(StorageError, match="disk full"):
        await asyncio.to_thread(batcher.run, loop, 1)
    # The next batch starts afresh (nothing left pending from the failed one).
    ok: LoopBatches[int] = LoopBatches(lambda items: None)
    await asyncio.to_thread(ok.run, loop, 2)


def test_a_closed_loop_is_a_storage_error_not_a_hang() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    batcher: LoopBatches[int] = LoopBatches(lambda items: None)
    with pytest.raises(StorageError, match="stopping"):
        batcher.run(loop, 1)


def test_chunk_targets_come_from_the_remembered_row_only_while_the_upload_is_open(
    tmp_path: Path,
) -> None:
    keygen(["A", "B"], tmp_path / "keys")
    data = os.urandom(2 * CHUNK)
    digest = blake3.blake3(data[:CHUNK]).hexdigest()
    intent = upload_intent("A-rows-0001", "A", "B", "approved/x.bin", "file", [("", len(data))])
    journal = Journal(tmp_path / "data" / ".transferd" / "journal.sqlite")
    receiver = receiver_at(tmp_path, journal)
    receiver.open(intent, "A", now=1.0)
    # Not asked on the loop yet: the worker must ask there.
    assert receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, 0)]) is None
    assert receiver.targets(intent.upload, "A", CHUNK, [(0, 0)]) == [ChunkTarget(0, 0, CHUNK)]
    assert receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, CHUNK)]) == [
        ChunkTarget(0, CHUNK, CHUNK)]
    # The same checks as on the loop: another peer, a place outside the file.
    assert receiver.chunk_targets(intent.upload, "C", CHUNK, [(0, 0)]) is None
    with pytest.raises(Exception, match="outside the upload"):
        receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, CHUNK + 1)])
    # Booked together, read back as staged.
    receiver.verify_and_write(intent.upload, digest, data[:CHUNK], digest, "identity", CHUNK,
                              [ChunkTarget(0, 0, CHUNK)])
    receiver.record_many([(intent.upload, [ChunkTarget(0, 0, CHUNK)], digest)])
    assert set(journal.received(intent.upload)) == {(0, 0)}
    # Failed here: no chunk of it is taken without the loop's checks, which refuse it.
    receiver.fail(intent.upload, now=2.0)
    assert receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, 0)]) is None
    with pytest.raises(Exception, match="failed here"):
        receiver.targets(intent.upload, "A", CHUNK, [(0, 0)])
    # Opened again by its sender: remembered afresh once the loop answered a chunk.
    receiver.open(intent, "A", now=3.0)
    assert receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, 0)]) is None
    assert receiver.targets(intent.upload, "A", CHUNK, [(0, 0)]) == [ChunkTarget(0, 0, CHUNK)]
    assert receiver.chunk_targets(intent.upload, "A", CHUNK, [(0, 0)]) == [
        ChunkTarget(0, 0, CHUNK)]
    receiver.close()
    journal.close()
