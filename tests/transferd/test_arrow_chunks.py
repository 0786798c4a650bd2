"""Record-batch-aligned spans for Arrow IPC / Parquet and zero-copy opening of the chunks."""

from __future__ import annotations

import io
import mmap
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferd.protocol.arrow_chunks import (
    ArrowChunkError,
    ArrowChunkMemoryError,
    ChunkLayout,
    LayoutFormat,
    Span,
    SpanKind,
    chunk_layout,
    open_record_batch_chunk,
    read_chunk_schema,
    record_batch_spans,
)

SEED = 20261127


def _table(rows: int, seed: int = SEED) -> pa.Table:
    """Mixed fixed-width, variable-width, nested and nullable columns: many buffers per batch."""
    rng = random.Random(seed)
    return pa.table(
        {
            "step": pa.array(range(rows), pa.int64()),
            "loss": pa.array([rng.random() for _ in range(rows)], pa.float32()),
            "site": pa.array(
                [rng.choice(["A", "B", None, "edge-7"]) for _ in range(rows)], pa.string()
            ),
            "tokens": pa.array(
                [[rng.randrange(50_000) for _ in range(rng.randrange(4))] for _ in range(rows)],
                pa.list_(pa.int32()),
            ),
            "shard": pa.array(
                [{"rank": i % 8, "ok": i % 3 == 0} for i in range(rows)],
                pa.struct([("rank", pa.int16()), ("ok", pa.bool_())]),
            ),
        }
    )


def _ipc_bytes(batches: list[pa.RecordBatch], fmt: LayoutFormat) -> bytes:
    sink = io.BytesIO()
    schema = batches[0].schema
    new_writer = ipc.new_file if fmt is LayoutFormat.ARROW_FILE else ipc.new_stream
    with new_writer(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def _batches(sizes: list[int]) -> list[pa.RecordBatch]:
    table = _table(sum(sizes))
    out, start = [], 0
    for size in sizes:
        out.append(table.slice(start, size).combine_chunks().to_batches()[0])
        start += size
    return out


def _assert_exact_cover(spans: list[tuple[int, int]], total: int, *, aligned: bool) -> None:
    assert spans, "no spans"
    position = 0
    for offset, length in spans:
        assert offset == position, f"gap or overlap at {offset} (expected {position})"
        assert length > 0
        if aligned:
            assert offset % 8 == 0, f"span at {offset} is not 8-byte aligned"
        position += length
    assert position == total


def _chunk(data: bytes, span: Span) -> memoryview:
    return memoryview(data)[span.offset : span.offset + span.length]


def _reconstruct(data: bytes, spans: tuple[Span, ...]) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Open every record-batch chunk on its own, as a receiver would."""
    assert spans[0].kind is SpanKind.HEADER
    schema = read_chunk_schema(_chunk(data, spans[0]))
    batches: list[pa.RecordBatch] = []
    for span in spans[1:]:
        if span.kind is SpanKind.RECORD_BATCHES:
            batches += open_record_batch_chunk(_chunk(data, span), schema)
    return schema, batches


def _one_batch_per_span(data: bytes) -> ChunkLayout | None:
    return chunk_layout(data, 1, max_chunk_bytes=len(data))


ARROW_FORMATS = [LayoutFormat.ARROW_FILE, LayoutFormat.ARROW_STREAM]


@pytest.mark.parametrize("fmt", ARROW_FORMATS)
@pytest.mark.parametrize("target", [1, 6_000, 40_000, 10_000_000])
def test_arrow_spans_cover_exactly_and_every_batch_opens_from_its_own_chunk(
    fmt: LayoutFormat, target: int
) -> None:
    batches = _batches([300, 50, 1, 700, 120, 120, 120, 999, 5])
    data = _ipc_bytes(batches, fmt)

    cap = max(4 * target, len(data))  # no batch here is cut: caps are tested below

    layout = chunk_layout(data, target, max_chunk_bytes=cap)

    assert layout is not None
    assert layout.format is fmt
    assert record_batch_spans(data, target, max_chunk_bytes=cap) == layout.offsets_and_lengths()
    _assert_exact_cover(layout.offsets_and_lengths(), len(data), aligned=True)
    assert layout.spans[-1].kind is SpanKind.TRAILER
    assert {s.kind for s in layout.spans[1:-1]} == {SpanKind.RECORD_BATCHES}
    schema, reopened = _reconstruct(data, layout.spans)
    assert schema.equals(batches[0].schema)
    # Every batch came back whole from exactly one chunk: so no batch message straddles a cut.
    assert len(reopened) == len(batches)
    for got, want in zip(reopened, batches, strict=True):
        assert got.equals(want)
    for span in layout.spans[1:-1]:
        in_span = len(open_record_batch_chunk(_chunk(data, span), schema))
        assert span.length <= target or in_span == 1, "a span over target packs several batches"


@pytest.mark.parametrize("fmt", ARROW_FORMATS)
def test_small_batches_pack_up_to_target_and_boundaries_follow_greedy_rule(
    fmt: LayoutFormat,
) -> None:
    batches = _batches([40] * 30)
    data = _ipc_bytes(batches, fmt)
    one_batch = _one_batch_per_span(data)
    assert one_batch is not None
    message_sizes = [s.length for s in one_batch.spans[1:-1]]
    assert len(message_sizes) == 30
    target = 5 * max(message_sizes)

    layout = chunk_layout(data, target)

    assert layout is not None
    groups = [s.length for s in layout.spans[1:-1]]
    assert all(size <= target for size in groups)
    # Greedy: a group was closed only because the next message would not fit.
    consumed = 0
    for size in groups[:-1]:
        consumed_after = consumed + size
        index = _message_index_at(message_sizes, consumed_after)
        assert size + message_sizes[index] > target
        consumed = consumed_after
    assert len(groups) < len(message_sizes) / 3


def _message_index_at(sizes: list[int], byte_offset: int) -> int:
    position = 0
    for index, size in enumerate(sizes):
        if position == byte_offset:
            return index
        position += size
    raise AssertionError(f"{byte_offset} is not a message boundary")


@pytest.mark.parametrize("fmt", ARROW_FORMATS)
def test_batch_over_target_stays_whole_and_over_cap_is_cut_into_aligned_pieces(
    fmt: LayoutFormat,
) -> None:
    batches = _batches([10, 2_000, 10])
    data = _ipc_bytes(batches, fmt)
    single = _one_batch_per_span(data)
    assert single is not None
    big = single.spans[2]
    assert big.length > 10_000

    whole = chunk_layout(data, big.length // 3)
    assert whole is not None
    assert big in [Span(s.offset, s.length, s.kind) for s in whole.spans], "big batch was split"

    target = big.length // 5 + 3  # not a multiple of 8: pieces must still start aligned
    cut = chunk_layout(data, target, max_chunk_bytes=4 * target)
    assert cut is not None
    _assert_exact_cover(cut.offsets_and_lengths(), len(data), aligned=True)
    pieces = [s for s in cut.spans if s.kind is SpanKind.PIECE]
    assert len(pieces) >= 5
    assert pieces[0].offset == big.offset
    assert pieces[-1].offset + pieces[-1].length == big.offset + big.length
    assert all(p.length <= target for p in pieces)
    # Pieces are not openable alone, but glued back they are exactly the batch message.
    schema = read_chunk_schema(_chunk(data, cut.spans[0]))
    glued = b"".join(bytes(_chunk(data, p)) for p in pieces)
    with pytest.raises(ArrowChunkError):
        open_record_batch_chunk(_chunk(data, pieces[0]), schema)
    assert open_record_batch_chunk(glued, schema)[0].equals(batches[1])


@pytest.mark.parametrize("fmt", ARROW_FORMATS)
def test_appending_a_batch_leaves_every_earlier_span_byte_identical(fmt: LayoutFormat) -> None:
    sizes = [37, 80, 5, 64, 64, 200, 13, 90, 90, 11, 150, 70]
    batches = _batches([*sizes, 120])
    before = _ipc_bytes(batches[:-1], fmt)
    after = _ipc_bytes(batches, fmt)
    target = 9_000

    old = chunk_layout(before, target)
    new = chunk_layout(after, target)

    assert old is not None
    assert new is not None
    # Only the last (still open) batch group and the trailer may change.
    stable = old.spans[:-2]
    assert len(stable) >= 4
    assert new.spans[: len(stable)] == stable
    for span in stable:
        assert (
            blake3.blake3(_chunk(before, span)).digest()
            == blake3.blake3(_chunk(after, span)).digest()
        )


@pytest.mark.parametrize("fmt", ARROW_FORMATS)
def test_file_still_being_written_keeps_earlier_spans_and_puts_partial_message_in_trailer(
    fmt: LayoutFormat,
) -> None:
    batches = _batches([37, 80, 5, 64, 64, 200, 13, 90, 90, 11, 150, 70])
    complete = _ipc_bytes(batches, fmt)
    whole = _one_batch_per_span(complete)
    assert whole is not None
    last_batch = whole.spans[-2]
    growing = complete[: last_batch.offset + last_batch.length // 2]

    layout = _one_batch_per_span(growing)

    assert layout is not None
    _assert_exact_cover(layout.offsets_and_lengths(), len(growing), aligned=True)
    assert layout.spans[:-1] == whole.spans[:-2]
    assert layout.spans[-1] == Span(
        last_batch.offset, len(growing) - last_batch.offset, SpanKind.TRAILER
    )


def test_spans_over_an_mmap_release_it_so_the_caller_can_close_it(tmp_path: Path) -> None:
    good = _SAMPLES[LayoutFormat.ARROW_FILE]
    for name, data in [("good", good), ("corrupt", good[:100] + b"\xff" * 64 + good[164:])]:
        (tmp_path / name).write_bytes(data)
        with open(tmp_path / name, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mapped)
            spans = record_batch_spans(view, 1024)
            view.release()
            mapped.close()  # BufferError if a pyarrow buffer still exported the mapping
        assert spans is None or sum(length for _, length in spans) == len(data)


def test_compressed_ipc_bodies_open_correctly_though_necessarily_copied() -> None:
    batches = _batches([200, 300])
    sink = io.BytesIO()
    options = ipc.IpcWriteOptions(compression="zstd")
    with ipc.new_stream(sink, batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    data = sink.getvalue()
    layout = _one_batch_per_span(data)
    assert layout is not None

    _, reopened = _reconstruct(data, layout.spans)

    assert [b.num_rows for b in reopened] == [200, 300]
    assert all(got.equals(want) for got, want in zip(reopened, batches, strict=True))


def _parquet_bytes(tables: list[pa.Table], **options: object) -> bytes:
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, tables[0].schema, **options) as writer:
        for table in tables:
            writer.write_table(table)
    return sink.getvalue()


def _column_chunk_ranges(data: bytes) -> list[list[tuple[int, int]]]:
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    groups = []
    for g in range(metadata.num_row_groups):
        row_group = metadata.row_group(g)
        ranges = []
        for c in range(row_group.num_columns):
            column = row_group.column(c)
            start = column.dictionary_page_offset or column.data_page_offset
            ranges.append((start, start + column.total_compressed_size))
        groups.append(ranges)
    return groups


def _span_containing(spans: list[tuple[int, int]], start: int, end: int) -> int:
    for index, (offset, length) in enumerate(spans):
        if offset <= start and end <= offset + length:
            return index
    raise AssertionError(f"byte range [{start}, {end}) straddles a span boundary")


def test_parquet_spans_start_on_row_groups_and_keep_each_row_group_whole() -> None:
    tables = [_table(400, seed=s) for s in range(6)]
    data = _parquet_bytes(tables)
    groups = _column_chunk_ranges(data)
    largest = max(max(e for _, e in g) - min(s for s, _ in g) for g in groups)

    layout = chunk_layout(data, largest)

    assert layout is not None
    assert layout.format is LayoutFormat.PARQUET
    spans = layout.offsets_and_lengths()
    _assert_exact_cover(spans, len(data), aligned=False)
    assert layout.spans[-1].kind is SpanKind.TRAILER
    for ranges in groups:
        first = min(s for s, _ in ranges)
        last = max(e for _, e in ranges)
        _span_containing(spans, first, last)
        assert first == 4 or any(offset == first for offset, _ in spans), "row group not at a cut"
    # Every chunk of row groups decodes as Parquet pages once glued to the trailer's footer.
    glued = b"".join(data[o : o + n] for o, n in spans)
    assert pq.read_table(io.BytesIO(glued)).equals(pa.concat_tables(tables))


def test_parquet_row_group_over_cap_is_cut_at_column_chunk_starts() -> None:
    data = _parquet_bytes([_table(3_000)], compression="none")
    (ranges,) = _column_chunk_ranges(data)
    widest_column = max(e - s for s, e in ranges)
    target = widest_column + 4  # the leading magic rides with the first column chunk

    layout = chunk_layout(data, target, max_chunk_bytes=target)

    assert layout is not None
    spans = layout.offsets_and_lengths()
    _assert_exact_cover(spans, len(data), aligned=False)
    holders = [_span_containing(spans, s, e) for s, e in ranges]
    assert len(set(holders)) > 1, "row group was not split"
    column_starts = {s for s, _ in ranges}
    trailer = layout.spans[-1]
    assert trailer.kind is SpanKind.TRAILER
    assert all(offset in column_starts for offset, _ in spans[1:-1])
    assert trailer.offset == max(e for _, e in ranges)


def test_appending_parquet_row_groups_leaves_earlier_chunk_addresses_unchanged() -> None:
    tables = [_table(300, seed=s) for s in range(9)]
    before = _parquet_bytes(tables[:-1])
    after = _parquet_bytes(tables)
    target = 2 * max(
        max(e for _, e in g) - min(s for s, _ in g) for g in _column_chunk_ranges(after)
    )

    old = record_batch_spans(before, target)
    new = record_batch_spans(after, target)

    assert old is not None
    assert new is not None
    stable = old[:-2]
    assert len(stable) >= 2
    assert new[: len(stable)] == stable
    for offset, length in stable:
        assert before[offset : offset + length] == after[offset : offset + length]


def test_record_batch_chunk_opens_zero_copy_from_an_mmap(tmp_path: Path) -> None:
    batches = _batches([500, 800, 300])
    data = _ipc_bytes(batches, LayoutFormat.ARROW_FILE)
    layout = _one_batch_per_span(data)
    assert layout is not None
    header, middle = layout.spans[0], layout.spans[2]
    assert middle.kind is SpanKind.RECORD_BATCHES
    # The receiver stores each verified chunk by itself and maps it back.
    (tmp_path / "header").write_bytes(_chunk(data, header))
    (tmp_path / "chunk").write_bytes(_chunk(data, middle))
    schema = read_chunk_schema((tmp_path / "header").read_bytes())

    with (
        open(tmp_path / "chunk", "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
        view = memoryview(m)
        base = pa.py_buffer(view).address
        (batch,) = open_record_batch_chunk(view, schema)
        addresses = list(_buffer_addresses(batch))
        equal = batch.equals(batches[1])
        del batch, view  # release the exported buffer before the mmap closes

    assert equal
    assert len(addresses) >= 8
    for address, size in addresses:
        assert base <= address, "buffer was copied"
        assert address + size <= base + middle.length, "buffer was copied"
        assert address % 8 == 0


def _buffer_addresses(batch: pa.RecordBatch) -> Iterator[tuple[int, int]]:
    for column in batch.columns:
        yield from _array_buffers(column)


def _array_buffers(array: pa.Array) -> Iterator[tuple[int, int]]:
    for buffer in array.buffers():
        if buffer is not None and buffer.size:
            yield buffer.address, buffer.size


def test_opening_the_wrong_span_names_what_was_found() -> None:
    batches = _batches([50, 50])
    data = _ipc_bytes(batches, LayoutFormat.ARROW_STREAM)
    layout = _one_batch_per_span(data)
    assert layout is not None
    header, first, trailer = layout.spans[0], layout.spans[1], layout.spans[-1]
    schema = read_chunk_schema(_chunk(data, header))

    with pytest.raises(ArrowChunkError, match="schema message where a record batch"):
        open_record_batch_chunk(_chunk(data, header), schema)
    with pytest.raises(ArrowChunkError, match="end-of-stream"):
        open_record_batch_chunk(_chunk(data, trailer), schema)
    with pytest.raises(ArrowChunkError, match="expected a schema message, found a record batch"):
        read_chunk_schema(_chunk(data, first))
    truncated = bytes(_chunk(data, first))[:-16]
    with pytest.raises(ArrowChunkError, match="unreadable record batch") as caught:
        open_record_batch_chunk(truncated, schema)
    assert caught.value.offset == 0
    with pytest.raises(ArrowChunkError, match="no record batch"):
        open_record_batch_chunk(b"", schema)


def test_dictionary_encoded_file_keeps_dictionaries_in_header_and_refuses_chunkwise_open() -> None:
    table = pa.table({"tier": pa.array(["raw", "curated", "raw"] * 40).dictionary_encode()})
    data = _ipc_bytes(table.to_batches(max_chunksize=30), LayoutFormat.ARROW_FILE)
    layout = _one_batch_per_span(data)
    assert layout is not None
    _assert_exact_cover(layout.offsets_and_lengths(), len(data), aligned=True)
    assert [s.kind for s in layout.spans[1:-1]] == [SpanKind.RECORD_BATCHES] * 4
    schema = read_chunk_schema(_chunk(data, layout.spans[0]))

    with pytest.raises(ArrowChunkError, match="'tier' is dictionary-encoded"):
        open_record_batch_chunk(_chunk(data, layout.spans[1]), schema)


@pytest.mark.parametrize(
    "data",
    [b"", b"step,loss\n1,0.5\n", bytes(range(256)) * 4, b"ARROW1", b"PAR1" + b"\0" * 20 + b"PAR1"],
)
def test_non_arrow_bytes_give_none(data: bytes) -> None:
    assert record_batch_spans(data, 1024) is None


def test_bad_target_is_a_value_error_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="target_chunk_bytes"):
        record_batch_spans(b"", 0)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        record_batch_spans(b"", 100, max_chunk_bytes=99)


# --- fuzzing: arbitrary and damaged inputs give None or valid spans, never an exception ----------

_SAMPLES = {
    LayoutFormat.ARROW_FILE: _ipc_bytes(_batches([30, 7, 60, 2]), LayoutFormat.ARROW_FILE),
    LayoutFormat.ARROW_STREAM: _ipc_bytes(_batches([30, 7, 60, 2]), LayoutFormat.ARROW_STREAM),
    LayoutFormat.PARQUET: _parquet_bytes([_table(50, seed=s) for s in range(3)]),
}
_FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _assert_none_or_valid(data: bytes, target: int) -> None:
    layout = chunk_layout(data, target)
    if layout is None:
        return
    spans = layout.offsets_and_lengths()
    _assert_exact_cover(spans, len(data), aligned=layout.format is not LayoutFormat.PARQUET)


@_FUZZ
@given(data=st.binary(max_size=512), target=st.integers(1, 4096))
def test_fuzz_arbitrary_bytes(data: bytes, target: int) -> None:
    _assert_none_or_valid(data, target)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(_SAMPLES[draw(st.sampled_from(list(_SAMPLES)))])
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    cut_from = draw(st.integers(0, len(data)))
    cut_to = draw(st.integers(cut_from, len(data)))
    if draw(st.booleans()):
        del data[cut_from:cut_to]  # truncation (cut_to == len) or a hole in the middle
    return bytes(data)


@_FUZZ
@given(data=_damaged(), target=st.integers(1, 20_000))
def test_fuzz_truncated_and_corrupted_files(data: bytes, target: int) -> None:
    _assert_none_or_valid(data, target)


def test_every_single_byte_corruption_of_a_parquet_footer_gives_none_or_valid_spans() -> None:
    # pyarrow 26 aborts the process (std::terminate) reading some such footers' column metadata,
    # e.g. a size-statistics histogram length byte 2 -> 110: spans must decode footers themselves.
    data = _SAMPLES[LayoutFormat.PARQUET]
    footer_size = int.from_bytes(data[-8:-4], "little")
    for index in range(len(data) - 8 - footer_size, len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x6C
        _assert_none_or_valid(bytes(damaged), 1000)


_STREAM_LAYOUT = chunk_layout(_SAMPLES[LayoutFormat.ARROW_STREAM], 1, max_chunk_bytes=1 << 20)
assert _STREAM_LAYOUT is not None
_SCHEMA_CHUNK, *_BATCH_CHUNKS = [
    _SAMPLES[LayoutFormat.ARROW_STREAM][s.offset : s.offset + s.length]
    for s in _STREAM_LAYOUT.spans
    if s.kind in (SpanKind.HEADER, SpanKind.RECORD_BATCHES)
]


@st.composite
def _damaged_chunk(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([_SCHEMA_CHUNK, *_BATCH_CHUNKS])))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@_FUZZ
@given(data=_damaged_chunk())
def test_fuzz_damaged_chunks_open_or_raise_only_arrow_chunk_error(data: bytes) -> None:
    schema = read_chunk_schema(_SCHEMA_CHUNK)
    try:
        batches = open_record_batch_chunk(data, schema)
    except ArrowChunkError:
        pass
    else:  # damage confined to values: fully validated batches are safe to read
        assert sum(batch.num_rows for batch in batches) >= 0
        for batch in batches:
            batch.to_pylist()
    try:
        read_chunk_schema(data)
    except ArrowChunkError:
        pass


def _compressed_batch_message() -> tuple[pa.RecordBatch, bytearray, int]:
    """One record batch written with IPC body compression (zstd) as a RECORD_BATCHES chunk,
    and where its body starts (each compressed buffer opens with its int64 raw length)."""
    batch = pa.record_batch({"x": pa.array(range(10_000), pa.int64())})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema,
                        options=ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_batch(batch)
    reader = ipc.MessageReader.open_stream(pa.BufferReader(sink.getvalue()))
    reader.read_next_message()  # the schema
    message = bytearray(reader.read_next_message().serialize().to_pybytes())
    body = 8 + struct.unpack_from("<i", message, 4)[0]
    return batch, message, body


def test_a_damaged_compressed_length_asking_for_more_than_the_host_has_is_damage() -> None:
    """A compressed IPC buffer's raw-length prefix changed to 2**50 (damaged before it was
    hashed, so its digest holds): pyarrow's pool fails "malloc of size 1125899906842624";
    that is an ArrowChunkError (damage, which no retry mends), not the memory error a caller
    maps to a transient ENOMEM."""
    batch, message, body = _compressed_batch_message()
    assert open_record_batch_chunk(bytes(message), batch.schema)[0].equals(batch)
    [at] = [off for off in range(body, len(message) - 8, 8)
            if struct.unpack_from("<q", message, off)[0] == batch.nbytes]
    struct.pack_into("<q", message, at, 1 << 50)
    with pytest.raises(ArrowChunkError) as caught:
        open_record_batch_chunk(bytes(message), batch.schema)
    assert not isinstance(caught.value, MemoryError)
    assert "1125899906842624-byte allocation" in str(caught.value)


@pytest.mark.parametrize("where", ["schema", "batch"])
@pytest.mark.parametrize("message", ["malloc of size 4096 failed", "out of memory"],
                         ids=["sized", "unsized"])
def test_no_memory_for_an_allocation_the_host_could_make_is_not_an_arrow_chunk_error(
    monkeypatch: pytest.MonkeyPatch, where: str, message: str,
) -> None:
    """pyarrow out of memory for a size the host has (or one it does not name), decoding
    the schema or a batch: ArrowChunkMemoryError, which a caller's `except ArrowChunkError`
    (damage) cannot absorb."""
    batch, chunk, _body = _compressed_batch_message()
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema):
        pass

    def exhausted(*args: object, **kwargs: object) -> object:
        raise pa.ArrowMemoryError(message)

    monkeypatch.setattr(ipc, "read_schema" if where == "schema" else "read_record_batch",
                        exhausted)
    def decode() -> None:
        try:
            if where == "schema":
                read_chunk_schema(sink.getvalue())
            else:
                open_record_batch_chunk(bytes(chunk), batch.schema)
        except ArrowChunkError:
            pytest.fail("a memory error was caught as an ArrowChunkError")

    with pytest.raises(ArrowChunkMemoryError) as caught:
        decode()
    assert caught.value.size == (4096 if "4096" in message else None)
    assert isinstance(caught.value.__cause__, pa.ArrowMemoryError)
