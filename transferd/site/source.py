"""Source files read for sending: hashed through a small reused buffer, mapped only when
their bytes are needed in memory (compression, TLS).

A chunk's address is hashed by reading the span in HASH_PIECE_BYTES pieces into a per-thread
buffer and hashing each piece while it is still in the core's cache (`SourceFile.hash_span`).
Measured on this project's 2-vCPU benchmark host (benchmarks/README.md, issue 11 round 6): a
1 GiB file from the page cache, 0.29 CPU-s against 0.35-0.38 for hashing 8 MiB mmap windows,
which also fault in 2048 page-table entries per chunk and tear them down at munmap (a TLB
shootdown across the daemon's threads). A chunk sent raw goes from the file itself
(`sendfile`), so nothing of it stays mapped or buffered. Only a window per chunk is mapped at a
time (`window`), so a 10 GiB file never counts 10 GiB against the daemon's RSS. `chunk_spans`
says where to cut a file (`protocol.chunks`, `protocol.arrow_chunks`).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import blake3

from transferd.errors import IntegrityError, StorageError
from transferd.protocol.arrow_chunks import record_batch_spans
from transferd.protocol.chunks import fixed_spans

__all__ = ["HASH_PIECE_BYTES", "FileWindow", "SourceFile", "chunk_spans"]

PAGE = mmap.ALLOCATIONGRANULARITY
# Half a core's L2 (2 MiB on the benchmark host's EPYC): the piece just read is hashed from the
# cache. 256 KiB pieces cost ~10 % more (a system call per piece), 2 MiB no less.
HASH_PIECE_BYTES = 1 << 20
_pieces = threading.local()


def _piece_buffer() -> memoryview:
    """This thread's hashing buffer (anonymous mmap: page-aligned, faulted in once)."""
    view: memoryview | None = getattr(_pieces, "view", None)
    if view is None:
        view = _pieces.view = memoryview(mmap.mmap(-1, HASH_PIECE_BYTES))
    return view


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

    def hash_span(self, offset: int, length: int) -> str:
        """Thread: the blake3 (hex) of [offset, offset+length), read piece by piece into this
        thread's buffer (both the read and blake3 release the GIL). A file that ends inside
        the span shrank while being sent: IntegrityError (a mapping of it would have been a
        SIGBUS). A read that fails: StorageError."""
        buf = _piece_buffer()
        hasher = blake3.blake3()
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            try:
                n = os.preadv(self._fd, [buf[:want]], offset + done)
            except OSError as exc:
                raise StorageError(f"reading {self.path}: {exc.strerror or exc}",
                                   path=self.path) from exc
            if n <= 0:
                raise IntegrityError(f"source file changed while being sent: {self.path} "
                                     f"ends at {offset + done}, inside a chunk")
            hasher.update(buf[:n])
            done += n
        return hasher.hexdigest()

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
