"""Source files read for sending, through mmap windows without copying.

Only a window per chunk is mapped at a time, so a 10 GiB file never counts 10 GiB against the
daemon's RSS. `chunk_spans` says where to cut a file (`protocol.chunks`, `protocol.arrow_chunks`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from transferd.protocol.arrow_chunks import record_batch_spans
from transferd.protocol.chunks import fixed_spans

__all__ = ["FileWindow", "SourceFile", "chunk_spans"]

PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass
class FileWindow:
    """A mapped view of [offset, offset+length) of a file; `view` is valid until close()."""

    view: memoryview
    _map: mmap.mmap | None

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            self._map.close()

    def discard(self) -> None:
        """close(), unless a transport still holds slices of the view (a chunk body being
        written): then the mapping goes when the last of them does."""
        try:
            self.close()
        except BufferError:
            pass


class SourceFile:
    """A local file opened for chunked reading (mmap windows)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
        except OSError:
            os.close(self._fd)
            raise
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        # Identity, for the hard-link policy (storage.LocalStorage.open_source).
        self.dev, self.inode, self.nlink = st.st_dev, st.st_ino, st.st_nlink

    def fileno(self) -> int:
        """The open file (data channels `sendfile` chunks from a dup of it)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def window(self, offset: int, length: int) -> FileWindow:
        if length == 0:
            return FileWindow(memoryview(b""), None)
        base = offset - offset % PAGE
        m = mmap.mmap(self._fd, length + (offset - base), prot=mmap.PROT_READ, offset=base)
        if hasattr(m, "madvise"):
            m.madvise(mmap.MADV_SEQUENTIAL)
        return FileWindow(memoryview(m)[offset - base : offset - base + length], m)

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        w = self.window(offset, length)
        try:
            yield w.view
        finally:
            w.close()

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def changed(self) -> bool:
        st = os.fstat(self._fd)
        return st.st_size != self.size or st.st_mtime_ns != self.mtime_ns


# Arrow IPC file, Parquet, and Arrow IPC stream (continuation marker) openings.
_COLUMNAR_MAGICS = (b"ARROW1", b"PAR1", b"\xff\xff\xff\xff")


def chunk_spans(source: SourceFile, chunk_size: int) -> list[tuple[int, int]]:
    """Where to cut a file: on record-batch / row-group boundaries for Arrow IPC and Parquet
    (each chunk then opens zero-copy at the receiver), fixed-size otherwise."""
    if source.size >= 8:
        with source.mapped(0, 8) as head:
            magic = bytes(head)
        if magic.startswith(_COLUMNAR_MAGICS):
            with source.mapped(0, source.size) as whole:
                spans = record_batch_spans(whole, chunk_size)
            if spans:
                return spans
    return fixed_spans(source.size, chunk_size)
