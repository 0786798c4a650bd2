"""Source files read for sending: hashed through a small reused buffer, read into memory
only when their bytes are needed there (compression, TLS), and never mapped.

A chunk's address is hashed by reading the span in HASH_PIECE_BYTES pieces into a per-thread
buffer and hashing each piece while it is still in the core's cache (`SourceFile.hash_span`).
Measured on this project's 2-vCPU benchmark host (benchmarks/README.md, issue 11 round 6): a
1 GiB file from the page cache, 0.29 CPU-s against 0.35-0.38 for hashing 8 MiB mmap windows,
which also fault in 2048 page-table entries per chunk and tear them down at munmap (a TLB
shootdown across the daemon's threads). A chunk sent raw goes from the file itself
(`sendfile`), so nothing of it stays buffered. A chunk tried for compression is read (pread)
into a reused span buffer (`mapped`): its sample first, the whole chunk only to compress it.

No source file is ever mapped: a file cut short by someone else while a mapping of it is read
kills the whole daemon with SIGBUS, which Python cannot catch. Read with pread, the same file
just ends early: a changed source, the job's error (`failures.source_changed_error`).
`chunk_spans` says where to cut a file (`protocol.chunks`, `protocol.arrow_chunks`); for
Arrow IPC and Parquet it reads only the bytes the layout looks at (`_layout_buffer`).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import blake3

from transferd.protocol.arrow_chunks import record_batch_spans
from transferd.protocol.chunks import fixed_spans
from transferd.site.failures import source_changed_error, storage_failure

__all__ = ["HASH_PIECE_BYTES", "SourceEnded", "SourceFile", "chunk_spans", "file_pieces"]

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


def _in_use(buf: mmap.mmap) -> bool:
    """Whether a view of `buf` is still alive somewhere (CPython refuses to resize a mapping
    while a buffer of it is exported; resizing to its own size moves nothing)."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return True
    return False


# Span buffers kept idle for the next span read whole: a chunk tried for compression on any
# worker thread takes one; more than this many idle ones are unmapped (RSS: in the loopback
# A/B, one kept per worker thread held ~40 MiB more at the sender than main's mappings did).
_SPARE_SPANS = 2
_spare_spans: list[mmap.mmap] = []
_spare_lock = threading.Lock()


def _take_span(length: int) -> mmap.mmap:
    """A buffer for a span read whole (at least `length` bytes): an idle one that fits, so
    reading a chunk costs one copy and no page faults (a fresh mapping costs 2048 faults of
    zeroed pages per 8 MiB, as the file mappings it replaces did), else a new one (whole MiB;
    anonymous, page-aligned). A new one is not populated by mmap(): CPython holds the GIL
    through that call, ~2.6 ms per 8 MiB here and longer when the thread is preempted inside
    it (a SCHED_IDLE one on a busy host), all of it the event loop's wait if it wants the GIL
    (benchmarks/README.md, issue 11 round 12); its pages fault in during the pread that fills
    it, with the GIL released. Transparent huge pages where the kernel offers them
    (MADV_HUGEPAGE; THP is often in `madvise` mode): 2 MiB faults instead of 4 KiB ones make
    that pread ~4x faster and cost ~0.01 ms more under the GIL than the mmap alone
    (`benchmarks/span_fault.py`, issue 11 round 12); the kernel frees them with the unmap."""
    with _spare_lock:
        fits = sorted((b for b in _spare_spans if len(b) >= length), key=len)
        if fits:
            _spare_spans.remove(fits[0])
            return fits[0]
    size = -(-length // HASH_PIECE_BYTES) * HASH_PIECE_BYTES
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only
        with suppress(OSError):  # a kernel built without THP: EINVAL, the 4 KiB pages do
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _give_span(buf: mmap.mmap) -> None:
    """Kept for the next span unless a view of it is still alive somewhere (then it goes
    with the last of them) or enough are kept already (the smallest goes)."""
    if _in_use(buf):
        return
    with _spare_lock:
        _spare_spans.append(buf)
        if len(_spare_spans) <= _SPARE_SPANS:
            return
        _spare_spans.sort(key=len)
        dropped = _spare_spans.pop(0)
    dropped.close()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset` of `fd`; the bytes read (fewer only where the file ends)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class SourceEnded(OSError):
    """A source file ended inside a chunk being sent: it was cut short after it was hashed.
    The chunk's own failure (a changed source), not its data channel's."""


def file_pieces(fd: int, offset: int, length: int,
                buf: memoryview | None = None) -> Iterator[memoryview]:
    """Thread: [offset, offset+length) of `fd` in HASH_PIECE_BYTES pieces read into this
    thread's buffer, or into `buf` (each valid until the next is asked for): for a TLS socket,
    which encrypts in user space anyway, instead of a mapping of a file someone may cut short,
    and for a one-pass send. SourceEnded when the file ends first, as `sendfile` finding no
    more bytes does."""
    buf = _piece_buffer() if buf is None else buf
    done = 0
    while done < length:
        n = os.preadv(fd, [buf[: min(len(buf), length - done)]], offset + done)
        if n <= 0:
            raise SourceEnded("source file ended before the chunk did")
        yield buf[:n]
        done += n


class SourceFile:
    """A local file opened for chunked reading (pread: never mapped)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Non-blocking: opening a FIFO to read otherwise waits for a writer, for ever, in the
        # thread that opened it (and a daemon waiting for that thread never stops). The open
        # file is blocking again once it is known to be a regular file; anything else is left
        # to the caller to refuse (`mode`: storage.LocalStorage.open_source).
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                os.set_blocking(self._fd, True)
        except OSError:
            os.close(self._fd)
            raise
        self.mode = st.st_mode
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

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        """Thread: [offset, offset+length) in memory, valid inside the block: read (pread) into
        a span buffer (`_take_span`), not mapped from the file (the name is the `Source`
        protocol's). A file that ends inside the span was cut short while being sent: the
        changed source's IntegrityError; a read that fails: `failures.storage_failure`."""
        if length == 0:
            yield memoryview(b"")
            return
        buf = _take_span(length)
        try:
            with memoryview(buf) as whole:
                view = whole[:length]
                try:
                    got = _pread_into(self._fd, view, offset)
                except OSError as exc:
                    raise storage_failure("reading", self.path, exc, side="source") from exc
                if got < length:
                    raise source_changed_error(
                        self.path, f"ends at {offset + got}, inside a chunk")
                try:
                    yield view
                finally:
                    view.release()
        finally:
            _give_span(buf)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def hash_span(self, offset: int, length: int) -> str:
        """Thread: the blake3 (hex) of [offset, offset+length), read piece by piece into this
        thread's buffer (both the read and blake3 release the GIL). A file that ends inside
        the span shrank while being sent: the changed source's IntegrityError. A read that
        fails: `failures.storage_failure`."""
        buf = _piece_buffer()
        hasher = blake3.blake3()
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            try:
                n = os.preadv(self._fd, [buf[:want]], offset + done)
            except OSError as exc:
                raise storage_failure("reading", self.path, exc, side="source") from exc
            if n <= 0:
                raise source_changed_error(self.path, f"ends at {offset + done}, inside a chunk")
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
        magic = source.read(0, 8)
        if magic.startswith(_COLUMNAR_MAGICS):
            layout = _layout_buffer(source.fileno(), source.size, magic)
            try:
                spans = record_batch_spans(memoryview(layout), chunk_size)
            finally:
                with suppress(BufferError):  # a view still alive: unmapped when it goes
                    layout.close()
            if spans:
                return spans
    return fixed_spans(source.size, chunk_size)


_ARROW_MAGIC, _PARQUET_MAGIC = b"ARROW1", b"PAR1"
_CONTINUATION = 0xFFFFFFFF
_FOOTER_MAX_BYTES = 256 * 1024 * 1024  # a footer claimed larger is not read (no layout: fixed)
# Arrow's `Message` flatbuffer table: version (field 0), header_type (1), header (2),
# bodyLength (3): the vtable slot of field k is at 4 + 2k (format/Message.fbs; flatbuffers'
# binary format: a root offset, a table's signed offset to its vtable, uint16 field offsets).
_BODY_LENGTH_SLOT = 4 + 2 * 3


def _layout_buffer(fd: int, size: int, magic: bytes) -> mmap.mmap:
    """A file-sized buffer holding exactly the bytes of the file `record_batch_spans` reads
    (the magics; each IPC message's prefix and metadata; the footer), zeros elsewhere: a
    private anonymous mapping (MAP_NORESERVE: the pages never written cost no memory), filled
    by pread. Message bodies are never read: the walk steps over each by the bodyLength in its
    metadata, as pyarrow's reader does. A file cut short meanwhile reads as zeros past its end,
    where the layout's walk stops (its chunks then fail their hash: a changed source)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    buf = mmap.mmap(-1, size, flags=flags)
    with memoryview(buf) as view:

        def fill(lo: int, hi: int) -> bool:
            lo, hi = max(0, lo), min(size, hi)
            return lo < hi and _pread_into(fd, view[lo:hi], lo) == hi - lo

        fill(0, 8)
        tail = 4 + (len(_PARQUET_MAGIC) if magic.startswith(_PARQUET_MAGIC) else len(_ARROW_MAGIC))
        footer_start = size
        if fill(size - tail, size):
            (footer_bytes,) = struct.unpack_from("<i", view, size - tail)
            if 0 < footer_bytes <= min(_FOOTER_MAX_BYTES, size - tail):
                footer_start = size - tail - footer_bytes
                fill(footer_start, size - tail)
        if not magic.startswith(_PARQUET_MAGIC):
            start = 8 if magic.startswith(_ARROW_MAGIC) else 0
            _fill_ipc_messages(view, fill, start, footer_start if start else size)
    return buf


def _fill_ipc_messages(
    view: memoryview, fill: Callable[[int, int], bool], start: int, end: int
) -> None:
    """Fill each IPC message's prefix and metadata in [start, end), message after message,
    until the end-of-stream marker or bytes that do not read as a message."""
    position = start
    while position + 8 <= end and fill(position, position + 8):
        first, second = struct.unpack_from("<Ii", view, position)
        prefix, meta_bytes = (8, second) if first == _CONTINUATION else (4, first)  # pre-0.15
        if meta_bytes <= 0 or position + prefix + meta_bytes > end:
            return
        meta_lo = position + prefix
        if not fill(meta_lo, meta_lo + meta_bytes):
            return
        body = _body_length(view[meta_lo : meta_lo + meta_bytes])
        if body is None or body < 0:
            return
        position = meta_lo + meta_bytes + body


def _body_length(meta: memoryview) -> int | None:
    """bodyLength of an IPC message's metadata (a `Message` flatbuffer); None if it does not
    read as one."""
    n = len(meta)
    if n < 8:
        return None
    (table,) = struct.unpack_from("<I", meta, 0)
    if table + 4 > n:
        return None
    (to_vtable,) = struct.unpack_from("<i", meta, table)
    vtable = table - to_vtable
    if vtable < 0 or vtable + 4 > n:
        return None
    (vtable_bytes,) = struct.unpack_from("<H", meta, vtable)
    if _BODY_LENGTH_SLOT + 2 > vtable_bytes or vtable + _BODY_LENGTH_SLOT + 2 > n:
        return 0  # the field is absent: its default
    (field,) = struct.unpack_from("<H", meta, vtable + _BODY_LENGTH_SLOT)
    if field == 0:
        return 0
    if table + field + 8 > n:
        return None
    (body,) = struct.unpack_from("<q", meta, table + field)
    return int(body)
