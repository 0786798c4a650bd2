"""An Arrow IPC file replicates on record-batch boundaries; at the receiver its record-batch
chunks open one read per chunk, the batches' buffers views of that chunk's buffer (no copy of
their own; never a mapping of the file: a file cut short under one is a SIGBUS), each chunk
checked against its committed digest, memory bounded by the chunks the caller holds."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from transferd.errors import IntegrityError, StorageError
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


async def test_arrow_record_batch_chunks_open_at_the_receiver_as_views_of_one_read_per_chunk(
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
        batches = list(b.receiver.record_batches("curated/events.arrow"))
    dst = tmp_path / "site-B" / "curated" / "events.arrow"
    data = dst.read_bytes()
    assert data == src.read_bytes()
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches(expected))
    # No copy of their own: every buffer of a batch lies inside the one read of the chunk
    # that holds the batch (a buffer where the file's bytes at that chunk's offset are).
    bases = set()
    for batch, (address, off) in zip(batches, _offsets_in_file(batches, dst), strict=True):
        [span] = [s for s in spans if s.offset <= off < s.offset + s.length]
        base = address - off  # where the file's offset 0 would be, read like this chunk
        bases.add(base)
        for col in batch.columns:
            for buf in col.buffers():
                if buf:
                    assert base + span.offset <= buf.address
                    assert buf.address + buf.size <= base + span.offset + span.length
        assert ctypes.string_at(base + span.offset, 8) == data[span.offset : span.offset + 8]
    assert len(bases) > 1  # a read per chunk, not one of the whole file


async def test_record_batches_hold_one_chunk_in_memory_at_a_time(tmp_path: Path) -> None:
    """Taken one after another, the batches of a file many chunks long need the memory of
    about a chunk or two (the one read and the one whose last batch the caller still holds),
    not of the file (a 50 GB file read whole would need 50 GB of heap)."""
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    expected = write_arrow_file(src, batches=12, rows=10_000)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/events.arrow", ["B"]))
        assert job.state == "committed", job.error
        largest = max(span.length for span in b.journal.chunks_of("curated/events.arrow"))
        pool = pa.proxy_memory_pool(pa.default_memory_pool())
        default = pa.default_memory_pool()
        pa.set_memory_pool(pool)
        try:
            rows = 0
            for batch in b.receiver.record_batches("curated/events.arrow"):
                rows += batch.num_rows
            del batch
        finally:
            pa.set_memory_pool(default)
    size = src.stat().st_size
    assert rows == sum(batch.num_rows for batch in expected)
    assert size > 4 * largest
    assert 0 < pool.max_memory() <= 2 * largest + 4096, (pool.max_memory(), size)


async def test_a_committed_file_rewritten_in_place_is_an_integrity_error(
    tmp_path: Path,
) -> None:
    """One byte of a committed Arrow file changed in place (same size, still a valid Arrow
    file: a value in a batch's body): the chunk holding it does not match its committed
    digest, an IntegrityError naming the file and the chunk, not batches of other bytes."""
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    write_arrow_file(src, batches=6, rows=10_000)
    dst = tmp_path / "site-B" / "curated" / "events.arrow"
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/events.arrow", ["B"]))
        assert job.state == "committed", job.error
        spans = b.journal.chunks_of("curated/events.arrow")
        target = spans[2]
        first = list(b.receiver.record_batches("curated/events.arrow"))
        # A float in the middle of the x column of the chunk's batch.
        x = first[1].column(1).buffers()[1]
        at = dst.read_bytes().find(x.to_pybytes())
        assert at >= 0
        at += x.size // 2
        assert target.offset <= at < target.offset + target.length
        _flip_byte(dst, at)
        with pytest.raises(IntegrityError) as caught:
            list(b.receiver.record_batches("curated/events.arrow"))
    message = str(caught.value)
    assert "curated/events.arrow" in message
    assert f"the chunk at offset {target.offset} ({target.length} bytes)" in message


def _flip_byte(path: Path, at: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
    finally:
        os.close(fd)


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
            list(b.receiver.record_batches("curated/events.arrow"))
        batches = list(b.receiver.record_batches("curated/other.arrow"))
    message = str(caught.value)
    assert "curated/events.arrow" in message
    assert f"{left} bytes on disk where {size} were committed" in message
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches(expected))



class _NoMemoryOSFile:
    """pa.OSFile whose `read_buffer` finds memory exhausted (`error`): a chunk's buffer cannot
    be allocated from Arrow's pool."""

    error: type[BaseException] = MemoryError

    def __init__(self, path: str, mode: str) -> None:
        self._file = _REAL_OS_FILE(path, mode)

    def __enter__(self) -> _NoMemoryOSFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def size(self) -> int:
        return int(self._file.size())

    def seek(self, offset: int) -> int:
        return int(self._file.seek(offset))

    def read_buffer(self, n: int) -> pa.Buffer:
        raise self.error(f"malloc of size {n} failed")


_REAL_OS_FILE = pa.OSFile


def _take(batches: Any, into: list[pa.RecordBatch]) -> None:
    """Each batch into `into` as it comes (those before an error stay there)."""
    for batch in batches:
        into.append(batch)


@pytest.mark.parametrize("error", [pa.ArrowMemoryError, MemoryError],
                         ids=["ArrowMemoryError", "MemoryError"])
@pytest.mark.parametrize("where", ["read", "schema", "batch"])
async def test_no_memory_while_reading_record_batches_is_a_storage_error_naming_the_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, error: type[BaseException],
) -> None:
    """Memory exhausted while record batches are read (allocating a chunk's buffer, decoding
    the schema, or decoding a batch, as IPC body decompression allocates): a StorageError
    with ENOMEM naming the file and the chunk, as `record_batches` promises; neither a
    pyarrow or Python traceback nor an IntegrityError calling intact bytes damaged. The
    batches before it were whole, and the file reads whole once memory is back."""
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    expected = pa.Table.from_batches(write_arrow_file(src, batches=12, rows=10_000))
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/events.arrow", ["B"]))
        assert job.state == "committed", job.error
        spans = b.journal.chunks_of("curated/events.arrow")
        calls = 0

        def exhausted(real: Any, fail_at: int) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == fail_at:
                    raise error("malloc failed")
                return real(*args, **kwargs)
            return call

        taken: list[pa.RecordBatch] = []
        with monkeypatch.context() as patch:
            if where == "read":
                patch.setattr(_NoMemoryOSFile, "error", error)
                patch.setattr(pa, "OSFile", _NoMemoryOSFile)
            elif where == "schema":
                patch.setattr(ipc, "read_schema", exhausted(ipc.read_schema, 1))
            else:  # the fourth batch: some came before it
                patch.setattr(ipc, "read_record_batch", exhausted(ipc.read_record_batch, 4))
            with pytest.raises(StorageError) as caught:
                _take(b.receiver.record_batches("curated/events.arrow"), taken)
        again = list(b.receiver.record_batches("curated/events.arrow"))
    assert caught.value.fields.get("errno") == errno.ENOMEM
    message = str(caught.value)
    assert "curated/events.arrow" in message
    assert "no memory" in message
    if where == "batch":
        assert taken
        assert pa.Table.from_batches(taken).equals(expected.slice(0, sum(map(len, taken))))
        [failed] = [s for s in spans[1:] if message.endswith(f"chunk at offset {s.offset}")]
    else:
        assert not taken
        failed = spans[0]
    assert f"its {failed.length}-byte chunk at offset {failed.offset}" in message
    assert pa.Table.from_batches(again).equals(expected)


async def test_an_allocation_past_the_hosts_memory_while_decoding_is_damage_not_enomem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoding a committed batch asks pyarrow for more memory than the host has (as a
    damaged compressed-IPC length prefix does: "malloc of size 1125899906842624 failed"):
    an IntegrityError naming the file, not a StorageError ENOMEM that a caller would retry
    forever on bytes that will never decode."""
    src = tmp_path / "site-A" / "curated" / "events.arrow"
    write_arrow_file(src, batches=12, rows=10_000)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/events.arrow", ["B"]))
        assert job.state == "committed", job.error
        real = ipc.read_record_batch
        calls = 0

        def damaged(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise pa.ArrowMemoryError("malloc of size 1125899906842624 failed")
            return real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(ipc, "read_record_batch", damaged)
            with pytest.raises(IntegrityError) as caught:
                list(b.receiver.record_batches("curated/events.arrow"))
    message = str(caught.value)
    assert "curated/events.arrow" in message
    assert "1125899906842624-byte allocation" in message
