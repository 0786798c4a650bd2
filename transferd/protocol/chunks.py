"""Chunk addressing: where a file is cut and what a chunk is called.

A file is cut into contiguous spans (fixed `chunk_size` spans by default; Arrow IPC and Parquet
files on record-batch boundaries, `arrow_chunks`). Each span is addressed by the blake3 of its
bytes; the file's digest is the Merkle root over those addresses (`manifest.file_digest`). A
chunk on a data channel names every place in the upload that holds the same bytes as
(file, offset) pairs (`channel.ChunkHead.locations`).
"""

from __future__ import annotations

from typing import Literal

import blake3

__all__ = ["MAX_CHUNK_BYTES", "MAX_LOCATIONS", "Encoding", "blake3_hex", "fixed_spans"]

Encoding = Literal["identity", "zstd"]  # how a chunk body is framed on the wire (`codec`)
MAX_CHUNK_BYTES = 256 * 1024 * 1024
MAX_LOCATIONS = 1024  # places one chunk may fill in one upload


def fixed_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) spans of at most chunk_size covering [0, size); none for an empty file."""
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


def blake3_hex(data: bytes | memoryview) -> str:
    # blake3 releases the GIL on large inputs, so this runs in worker threads in parallel.
    return blake3.blake3(data).hexdigest()
