"""An Arrow IPC file replicates on record-batch boundaries; at the receiver every record-batch
chunk opens without a copy: the batches' buffers point into the committed file's mapping."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

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
    # Zero copy: every buffer of every batch lies inside one mapping of the committed file
    # (one contiguous address range the size of the file), not in freshly allocated memory.
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
    # The mapped memory at `base` is the file itself.
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
