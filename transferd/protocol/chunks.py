"""Chunk addressing: where a file is cut and what a chunk is called.

A file is cut into contiguous spans (fixed `chunk_size` spans by default; Arrow IPC and Parquet
files on record-batch boundaries, `arrow_chunks`). Each span is addressed by the blake3 of its
bytes; the file's digest is the Merkle root over those addresses (`manifest.file_digest`). A
chunk PUT names every place in the upload that holds the same bytes as `file:offset,...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Literal

import blake3
from pydantic import ConfigDict, Field

from transferd.errors import ProtocolError
from transferd.protocol.wire import FrozenModel

__all__ = [
    "MAX_CHUNK_BYTES",
    "ChunkPut",
    "Encoding",
    "blake3_hex",
    "check_address",
    "fixed_spans",
    "format_locations",
    "parse_locations",
]

Encoding = Literal["identity", "zstd"]  # how a chunk body is framed on the wire (`codec`)
MAX_CHUNK_BYTES = 256 * 1024 * 1024
MAX_LOCATIONS = 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fixed_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) spans of at most chunk_size covering [0, size); none for an empty file."""
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


def blake3_hex(data: bytes | memoryview) -> str:
    # blake3 releases the GIL on large inputs, so this runs in worker threads in parallel.
    return blake3.blake3(data).hexdigest()


class ChunkPut(FrozenModel):
    """The headers of a chunk PUT: how the body is framed and how long the chunk is raw."""

    model_config = ConfigDict(extra="ignore", validate_by_name=True)

    encoding: Encoding = Field(
        default="identity", validation_alias="X-Transferd-Encoding"
    )
    raw_length: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)] = Field(
        validation_alias="X-Transferd-Length"
    )

    def headers(self) -> dict[str, str]:
        return {"X-Transferd-Encoding": self.encoding, "X-Transferd-Length": str(self.raw_length)}


def check_address(digest: str) -> str:
    if not _HEX64.match(digest):
        raise ProtocolError("chunk address must be 64 lowercase hex digits")
    return digest


def format_locations(locations: Iterable[tuple[int, int]]) -> str:
    """`file:offset,...`: every place in the upload that holds a chunk's bytes."""
    return ",".join(f"{f}:{off}" for f, off in locations)


def parse_locations(where: str) -> list[tuple[int, int]]:
    """(file, offset) pairs of `format_locations` (at most MAX_LOCATIONS; ProtocolError)."""
    out: list[tuple[int, int]] = []
    try:
        for item in where.split(",")[:MAX_LOCATIONS]:
            f_text, _, off_text = item.partition(":")
            out.append((int(f_text), int(off_text)))
    except ValueError as exc:
        raise ProtocolError(f"bad chunk locations {where[:64]!r}") from exc
    if not out:
        raise ProtocolError("a chunk needs at least one location")
    return out
