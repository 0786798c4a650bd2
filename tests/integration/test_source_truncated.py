"""A local source file cut short (truncated in place) while it is being sent, at the moments a
chunk's bytes are in memory: the job fails as a changed source and the daemon goes on.

Source files used to be mapped (a chunk tried for compression, a chunk sent over TLS, the
whole of an Arrow or Parquet file while its layout was read): a file cut short under a mapping
kills the daemon with SIGBUS, which no Python code can catch. The daemons here run in a child
process, so that a SIGBUS fails the test instead of killing the test run. A raw chunk whose file
ended mid-`sendfile` used to break data channel after channel (sent again on the next one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from transferd.protocol.arrow_chunks import record_batch_spans
from transferd.site.source import SourceEnded, SourceFile, chunk_spans, file_pieces

_SCRIPT = r"""
import asyncio, json, os, sys
from pathlib import Path
from transferd.testing import loopback_pair, loopback_tls, wait_for_jobs

CHUNK = 64 * 1024
tmp, where = Path(sys.argv[1]), sys.argv[2]

async def main():
    src = tmp / "site-A/curated/text.bin"
    src.parent.mkdir(parents=True)
    text = b"".join(b"line %08d of a compressible file\n" % i for i in range(40000))
    src.write_bytes(text[: 16 * CHUNK])
    (tmp / "site-B").mkdir()
    extra = {"compression": 3} if where == "compression" else {"compression": "off"}
    if where == "tls":
        extra["tls"] = loopback_tls(tmp / "tls")
    async with loopback_pair(tmp, chunk_size=CHUNK, **extra) as (a, b):
        cut = []

        def truncate():
            if not cut:
                cut.append(1)
                os.truncate(src, 100)

        if where == "compression":
            real = a.sender.encode

            def encode(peer, view, *probed):  # the chunk is in memory, about to be compressed
                truncate()
                return real(peer, view, *probed)

            a.sender.encode = encode
        elif where == "sendfile":
            real_sendfile = os.sendfile

            def sendfile(out_fd, in_fd, offset, count):  # a raw chunk about to go
                truncate()
                return real_sendfile(out_fd, in_fd, offset, count)

            os.sendfile = sendfile
        else:
            import transferd.net.channels as channels
            real_pieces = channels.file_pieces

            def pieces(fd, offset, length, *buf):  # the chunk is about to be read for TLS
                truncate()  # (or for a one-pass send, into the channel's buffer)
                return real_pieces(fd, offset, length, *buf)

            channels.file_pieces = pieces
        [job] = await wait_for_jobs(a, a.sender.submit("curated/text.bin", ["B"]), timeout_s=60)
        again = tmp / "site-A/curated/next.bin"
        again.write_bytes(os.urandom(3 * CHUNK + 7))
        [nxt] = await wait_for_jobs(a, a.sender.submit("curated/next.bin", ["B"]), timeout_s=60)
        print(json.dumps({
            "state": job.state.value, "error": job.error, "next": nxt.state.value,
            "next_same": (tmp / "site-B/curated/next.bin").read_bytes() == again.read_bytes(),
            "committed": (tmp / "site-B/curated/text.bin").exists(),
        }))

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["compression", "tls", "sendfile"])
def test_a_source_cut_short_while_its_chunk_is_in_memory_fails_the_job_not_the_daemon(
    tmp_path: Path, where: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), where],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != -signal.SIGBUS, "the daemon was killed by SIGBUS"
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["state"] == "failed"
    assert "changed while being sent" in out["error"]
    assert not out["committed"]
    assert out["next"] == "committed"  # the daemon serves on
    assert out["next_same"]


def _arrow_table(rows: int) -> pa.Table:
    return pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "name": pa.array([f"row {i}" for i in range(rows)]).dictionary_encode(),
        "value": pa.array([i * 0.5 for i in range(rows)], pa.float64()),
    })


def _write(path: Path, fmt: str) -> None:
    table = _arrow_table(20000)
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=2000)
        return
    opener = ipc.new_file if fmt == "arrow-file" else ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1500):
            writer.write_batch(batch)


@pytest.mark.parametrize("fmt", ["arrow-file", "arrow-stream", "parquet"])
@pytest.mark.parametrize("chunk_bytes", [16 * 1024, 100 * 1024])
def test_columnar_spans_read_only_what_the_layout_needs_and_match_the_whole_file(
    tmp_path: Path, fmt: str, chunk_bytes: int
) -> None:
    """The layout of an Arrow or Parquet file, read without mapping it (message prefixes,
    metadata and the footer only), cuts exactly where it does from the whole file's bytes."""
    path = tmp_path / "data"
    _write(path, fmt)
    whole = path.read_bytes()
    expected = record_batch_spans(memoryview(whole), chunk_bytes)
    assert expected is not None
    assert len(expected) > 3
    with SourceFile(str(path)) as source:
        assert chunk_spans(source, chunk_bytes) == expected


def test_columnar_spans_of_a_file_cut_short_still_cover_what_was_opened(tmp_path: Path) -> None:
    """Cut short after it was opened: the layout walk stops where the bytes end (zeros past
    it), never faults; its chunks then fail their hash as a changed source."""
    path = tmp_path / "data"
    _write(path, "arrow-file")
    with SourceFile(str(path)) as source:
        os.truncate(path, source.size // 2)
        spans = chunk_spans(source, 16 * 1024)
        assert spans[0][0] == 0
        assert sum(n for _o, n in spans) == source.size


def test_a_span_read_past_the_end_is_a_changed_source(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    with SourceFile(str(path)) as source:
        with source.mapped(100, 5000) as view:
            assert bytes(view) == b"x" * 5000
        os.truncate(path, 3000)
        with pytest.raises(Exception, match="changed while being sent"), source.mapped(0, 5000):
            pass
        with pytest.raises(SourceEnded, match="ended before the chunk did"):
            list(file_pieces(source.fileno(), 0, 5000))
