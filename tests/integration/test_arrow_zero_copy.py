"""An Arrow IPC file replicates on record-batch boundaries; at the receiver every record-batch
chunk opens without a copy of its own: the batches' buffers point into one read of the committed
file (never a mapping of it: a file cut short under one is a SIGBUS)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from transferd.errors import IntegrityError
from transferd.testing import loopback_pair, wait_for_jobs

CHUNK = 256 * 1024


def write_arrow_file(path: Path, batches: int, rows: int) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(5)
    schema = pa.schema([("id", pa.int64()), ("x", pa.float32()), ("tag", pa.string())])
    out = []
    for b in range(batches):
        ids = np.arange(b * rows, (b + 1) * rows, dtype=np.int64)
        out.append(
            pa.record_batch(
                [
                    pa.array(ids),
                    pa.array(rng.random(rows, dtype=np.float32)),
                    pa.array([f"t{i % 97}" for i in ids]),
                ],
                schema=schema,
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with ipc.new_file(path, schema) as writer:
        for batch in out:
            writer.write_batch(batch)
    return out


async def test_arrow_record_batch_chunks_open_at_the_receiver_without_a_copy(
    tmp_path: Path,
) -> None:
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    expected = write_arrow_file(src, batches=12, rows=10_000)  # ~150 KiB per batch
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("curated/events.arrow", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        spans = b.journal.chunks_of("curated/events.arrow")
        # Cut on message boundaries, not every CHUNK bytes.
        assert any(span.length != CHUNK for span in spans[:-1])
        batches = b.receiver.record_batches("curated/events.arrow")
    dst = tmp_path / "site-B" / "curated" / "events.arrow"
    assert dst.read_bytes() == src.read_bytes()
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches(expected))
    # Zero copy: every buffer of every batch lies inside one read of the committed file (one
    # contiguous address range the size of the file), not in memory of its own.
    size = dst.stat().st_size
    addresses = [
        buf.address for batch in batches for col in batch.columns for buf in col.buffers() if buf
    ]
    lo = min(addresses)
    base_candidates = {addr - off for addr, off in _offsets_in_file(batches, dst)}
    assert len(base_candidates) == 1, "buffers are not at their file offsets in one mapping"
    base = base_candidates.pop()
    assert base <= lo
    assert max(addresses) < base + size
    # The memory at `base` is the file itself.
    assert ctypes.string_at(base, 8) == dst.read_bytes()[:8]


def _offsets_in_file(batches: list[pa.RecordBatch], path: Path) -> list[tuple[int, int]]:
    """(buffer address, offset of the same bytes in the file) for the int64 id column buffers,
    whose contents are unique in the file."""
    data = path.read_bytes()
    out = []
    for batch in batches:
        buf = batch.column(0).buffers()[1]
        off = data.find(buf.to_pybytes())
        assert off >= 0
        out.append((buf.address, off))
    return out


@pytest.mark.parametrize("left", [0, 100_000], ids=["emptied", "cut-mid-batch"])
async def test_a_committed_file_cut_short_before_it_is_read_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: int
) -> None:
    """The committed file is truncated after its chunks were listed, before it is read (as
    a user's tool might): an IntegrityError naming the file and both sizes, not a crash
    (a mapping read past the new end is a SIGBUS) nor a pyarrow error; the daemon reads
    the next file as usual."""
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    write_arrow_file(src, batches=6, rows=10_000)
    other = tmp_path / "site-A" / "curated" / "other.arrow"
    expected = write_arrow_file(other, batches=3, rows=1_000)
    dst = tmp_path / "site-B" / "curated" / "events.arrow"
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        jobs = await wait_for_jobs(a, a.sender.submit("curated/events.arrow", ["B"])
                                   + a.sender.submit("curated/other.arrow", ["B"]))
        assert [job.state for job in jobs] == ["committed", "committed"]
        listed = b.journal.chunks_of

        def chunks_then_cut(path: str) -> Any:
            spans = listed(path)
            if path == "curated/events.arrow":
                os.truncate(dst, left)
            return spans

        monkeypatch.setattr(b.journal, "chunks_of", chunks_then_cut)
        size = src.stat().st_size
        with pytest.raises(IntegrityError) as caught:
            b.receiver.record_batches("curated/events.arrow")
        batches = b.receiver.record_batches("curated/other.arrow")
    message = str(caught.value)
    assert "curated/events.arrow" in message
    assert f"{left} bytes on disk where {size} were committed" in message
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches(expected))
