"""data_dir on an object store (S3, GCS, Azure Blob through fsspec): stores without rename.

Theory of operation. An object store makes one object visible atomically (a PUT, or the
completion of a multipart upload) but has no rename and no multi-object transaction, so a folder
cannot appear by one rename as it does on a filesystem. A committed folder is therefore defined
by its *manifest object* `<folder>/.transferd-manifest.json`, written last:

1. before the first object is written, an intent file in the state dir names the folder (it is
   how start-up finds what a crash left behind, without listing the bucket);
2. a folder being replaced loses its old manifest first (from then on it reads as absent, never
   as a mix of the old and the new);
3. the members are PUT under the folder's prefix, in parallel (multipart, parts in parallel,
   memory bounded by `_PUT_FILES x _PUT_PARTS x _PART_BYTES`, files under 64 MiB in one PUT).
   On S3 a member of at least `_STREAM_MIN_BYTES` has gone up already, while the transfer ran:
   the receiver calls `member_staged` once its last chunk is staged and verified, which starts a
   multipart upload of it (parts in parallel); here those uploads are only *completed*, which
   is when their objects appear. Until then nothing of the new version is visible: the old
   folder stays whole for readers for the whole transfer;
4. one listing of the prefix verifies that every member is there at its size, and deletes
   objects that are not members (an old version's extra files, a crashed attempt's leftovers);
5. the manifest (members, sizes, the upload that wrote them) is PUT: the folder is visible;
6. the intent file goes.

Readers trust the manifest: a folder with an unfinished commit is absent (`exists`, `is_dir`,
`list_dir`, `list_source`), and listing a committed folder reads its manifest rather than the
bucket. Checkpoint steps build on this: LATEST is written after the step's manifest, retention
deletes a step's manifest before its objects. Start-up (`reclaim`) cleans each folder named by
an intent file: multipart uploads under it that were never completed are aborted; then, unless
the intent only covered uploads streamed during a transfer (those wrote no visible object),
with a manifest, objects it does not list go; without one, the whole prefix goes.
Folders written by other tools (a source site's training job) have no manifest and are listed
as they are. Files are one object each, PUT straight to their key (atomic on every store).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import mmap
import os
import posixpath
import re
import socket
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferd.errors import (
    ConfigError,
    IntegrityError,
    PolicyViolation,
    StorageError,
    TransferdError,
)
from transferd.site.failures import (
    Side,
    http_status,
    source_changed_error,
    storage_failure,
    storage_failures,
)
from transferd.site.staging import Staging, os_errors
from transferd.site.storage import FsspecStorage, Source, info_mtime

__all__ = ["MANIFEST", "OBJECT_STORE_PROTOCOLS", "ObjectStorage", "is_object_store"]

log = logging.getLogger("transferd.storage")

MANIFEST = ".transferd-manifest.json"
MANIFEST_FORMAT = "transferd-folder/1"
# fsspec protocols of stores with no rename (their `mv` is copy + delete, object by object).
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
)
# Parallel PUTs: files at once x parts per file at once x part size bounds the memory a commit
# holds (4 x 2 x 32 MiB = 256 MiB). A file under two parts (64 MiB) goes in one PUT, as
# rclone's upload cutoff does: a multipart upload costs three more requests and a server-side
# concatenation.
_PUT_FILES = 4
_PUT_PARTS = 2
_PART_BYTES = 32 * 1024 * 1024
# Members at least this large are streamed to S3 during the transfer (multipart, completed at
# commit); smaller ones go in one PUT at commit. 5 MiB is S3's smallest part.
_STREAM_MIN_BYTES = 5 * 1024 * 1024
# S3 allows at most 10,000 parts per upload: a larger file gets larger parts.
_MAX_PARTS = 10_000
# An object is read as windows of up to this many bytes, one GET each (the whole object, without
# a Range, when it fits in one: botocore then checks the CRC the store keeps, once the body has
# been read to its end). The windows held at a time, across every source of the site, are bounded
# by bytes (`_HELD_BYTES`: memory 256 MiB, whatever the objects' sizes) and by GETs in flight
# (`_GETS_AT_ONCE`), and are granted strictly in the order the sources were opened (`_Budget`):
# the sender reads its files, and each file's chunks, in order. Small objects thus get more GETs
# at once (8 x 32 MiB) than large ones (4 x 64 MiB), where a count of windows held 4 x 32 MiB.
_WINDOW_BYTES = 64 * 1024 * 1024
_HELD_BYTES = 256 * 1024 * 1024
_GETS_AT_ONCE = 8
_SLOT_WAIT_S = 60.0  # a window waiting longer for room gives up: its reader GETs its spans
# A reader waits for the bytes of its span only, not its window's: a GET body is read straight
# into the window (`readinto`, no piece allocated) in pieces of this size, each handed over as
# it lands.
_READ_PIECE_BYTES = 1024 * 1024
# A version of an object (its ETag) whose GET bodies failed their checksum this many times in a
# row is not read again: the store keeps it damaged, or something on the way damages it every
# time; its jobs fail, naming both checksums, rather than trying again for ever.
_MISMATCHES_FATAL = 3
# Window buffers no longer referenced are kept this long for the next windows (`_WindowBuffers`).
_BUFFERS_IDLE_S = 5.0
# A listing's sizes and ETags open its objects without a HEAD each for this long (`list_source`).
_LISTED_FRESH_S = 60.0
# A prefix found empty as an upload opened counts as absent this long for its streaming.
_ABSENT_FRESH_S = 30.0


# Fresh windows are mapped with their pages in place (MAP_POPULATE: the kernel faults the whole
# range in one call, rather than one fault per 4 KiB page as the GET first writes it): on the
# benchmark host 8 windows of 32 MiB filled 1 MiB at a time cost 0.11-0.12 CPU-s populated
# against 0.15-0.18 faulted page by page. Linux only; elsewhere 0.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _window_buffer(size: int) -> mmap.mmap:
    """A window's memory: a private anonymous mapping, which the kernel zeroes page by page as
    the GET first writes into it. A bytearray is zeroed by malloc before the GET (every page
    faulted in then, and written twice). Measured on the benchmark host, 256 MiB S3 -> local,
    one fresh daemon, same rounds: sender daemon 0.53-0.63 CPU-s with mappings, 0.65-0.67 with
    bytearrays. Not asked for huge pages (MADV_HUGEPAGE): in a fresh 256 MiB filling loop they
    cut the faults' cost from 0.15 to 0.03 CPU-s, but in the daemon they doubled the sender's
    CPU (1.31-1.49 CPU-s, every huge page granted, no compaction stall), cause not found."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)


def _in_use(buf: mmap.mmap) -> bool:
    """Whether a view of `buf` is still alive somewhere (a chunk being sent, hashed, kept).
    CPython refuses to resize a mapping while a buffer of it is exported (every view derived
    from one `memoryview(buf)` counts through it); resizing to its own size moves nothing."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return True
    return False


class _WindowBuffers:
    """Window buffers reused once nothing refers to them any more. A fresh window is memory
    the kernel must fault in and zero (`_window_buffer`), and gives back when freed: profiled
    on the benchmark host (S3 -> local, 256 MiB), allocating the windows as bytearrays was half
    the S3 sender's CPU beside the socket reads themselves. Kept buffers count with the windows held
    against `_HELD_BYTES` (the memory bound stays); they go after `_BUFFERS_IDLE_S` unused."""

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        budget.buffers = self
        self._free: list[mmap.mmap] = []
        self._lock = budget._cond  # one lock: the budget counts the kept buffers (`kept`)
        self._used_at = 0.0
        self._timer: threading.Timer | None = None

    @property
    def kept(self) -> int:
        return sum(len(b) for b in self._free)

    def make_room(self, needed: int) -> None:
        """Under the budget's lock: drop kept buffers until `needed` more bytes fit beside the
        windows held and the buffers kept, those of another size first."""
        self._free.sort(key=lambda b: len(b) == needed)
        while self._free and self._budget.held + needed + self.kept > self._budget.limit:
            self._free.pop(0)

    def take(self, size: int) -> mmap.mmap:
        """A buffer of exactly `size` bytes (the room `size` took counts it, no more)."""
        with self._lock:
            self._used_at = time.monotonic()
            fits = [b for b in self._free if len(b) == size and not _in_use(b)]
            if fits:
                self._free.remove(fits[0])
                return fits[0]
        return _window_buffer(size)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if self.kept + len(buf) + self._budget.held > self._budget.limit:
                return  # freed now: the bound holds
            self._free.append(buf)
            if self._timer is None:
                self._timer = threading.Timer(_BUFFERS_IDLE_S, self._trim)
                self._timer.daemon = True
                self._timer.start()

    def _trim(self) -> None:
        with self._lock:
            self._timer = None
            idle = time.monotonic() - self._used_at
            if idle >= _BUFFERS_IDLE_S:
                self._free.clear()
            elif self._free:
                self._timer = threading.Timer(_BUFFERS_IDLE_S - idle, self._trim)
                self._timer.daemon = True
                self._timer.start()


class _Budget:
    """The bytes of windows held (fetched or being fetched, not yet all taken by their reader),
    at most `limit`, granted in ticket order: a later window never takes the room an earlier one
    waits for, so the window the reader needs next is never stuck behind ones it needs later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most ever held (tests check the bound)
        self.buffers: _WindowBuffers | None = None  # kept free buffers count against `limit`
        self._next = 0
        self._waiting: set[int] = set()
        self._cond = threading.Condition()

    def ticket(self) -> int:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._waiting.add(ticket)
            return ticket

    def acquire(self, ticket: int, size: int, timeout: float) -> bool:
        """Wait until `ticket` is the first still waiting and `size` bytes fit, and take them;
        False if the ticket was cancelled meanwhile (its source closed) or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while ticket in self._waiting:
                    first = ticket == min(self._waiting)
                    if first and (not self.held or self.held + size <= self.limit):
                        if self.buffers is not None:
                            self.buffers.make_room(size)
                        self.held += size
                        self.peak = max(self.peak, self.held)
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return False
            finally:
                self._waiting.discard(ticket)
                self._cond.notify_all()

    def cancel(self, ticket: int) -> None:
        """A window that will not take its room (its source closed): the next one goes ahead,
        and if it is waiting for room it stops."""
        with self._cond:
            self._waiting.discard(ticket)
            self._cond.notify_all()

    def release(self, size: int) -> None:
        with self._cond:
            self.held -= size
            self._cond.notify_all()


class _Window:
    """The bytes [start, start + size) of an object as one GET delivers them, in order: a reader
    waits for the span it needs (`span`), not for the whole window."""

    def __init__(self, start: int, size: int) -> None:
        self.start, self.size = start, size
        self.buf: mmap.mmap | None = None
        self.got = 0
        self.taken = 0
        self.verifies = False  # its body's end-of-body check covers every byte (`_BodyReader`)
        self.failed = False
        self.closed = False  # its source was closed: stop reading
        self.granted = False  # its bytes count in the budget
        self.released = False  # and were given back
        self.ticket = -1
        self.cond = threading.Condition()
        self.future: Future[bool] | None = None

    def feed(self, body: Any, buf: mmap.mmap | None = None) -> None:
        """In the GET thread: read `body` into the window (`buf`, at least `size` bytes: a
        reused one, or a new one), waking readers piece by piece. The last piece is handed over
        only once the body's end-of-body checks passed (`_BodyReader.finish`: no byte more than
        asked for, and the object's checksum where the body has one, `verifies`: a whole-object
        window, not a range of one). A reader that took every byte of a verified window took
        bytes the store's checksum vouched for; one whose verified GET failed after handing out
        part of it learns so at its next read or at `ObjectSource.changed`. A ranged window's
        bytes are vouched for by nothing but TCP, as every ranged read's."""
        if buf is None:
            buf = _window_buffer(self.size)
        with self.cond:
            self.buf = buf
        reader = _body_reader(body, self.size)
        self.verifies = reader.verifies
        done = False
        try:
            with memoryview(buf) as view:  # released even on an error: the buffer is reused
                filled = 0
                while filled < self.size:
                    if self.closed:
                        raise OSError("source closed")
                    end = min(filled + _READ_PIECE_BYTES, self.size)
                    n = reader.readinto(view[filled:end])
                    if not n:
                        raise OSError(f"the store sent {filled} of {self.size} bytes")
                    filled += n
                    if filled == self.size:
                        reader.finish()
                    with self.cond:
                        self.got = filled
                        self.cond.notify_all()
            done = True
        finally:
            if not done:
                reader.abort()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def span(self, offset: int, length: int) -> memoryview | None:
        """The bytes at `offset` (in the object), once they have landed; None if the GET failed."""
        end = offset - self.start + length
        with self.cond:
            while self.got < end and not self.failed:
                self.cond.wait()
            if self.got < end or self.buf is None:
                return None
            # A view, no copy: these bytes are never written again. Made under `cond`: once
            # it exists the buffer reads as in use (`_in_use`) and is not reused under it.
            return memoryview(self.buf).toreadonly()[offset - self.start : end]


class _ChecksumMismatch(OSError):
    """A GET body whose checksum is not the one the store keeps for the object: its bytes are
    not the object's (`got` and `expected` as the store writes them)."""

    def __init__(self, got: str, expected: str) -> None:
        super().__init__(f"the body's checksum is {got}, the store's {expected}")
        self.got, self.expected = got, expected


def _botocore_mismatch(exc: Exception) -> _ChecksumMismatch | None:
    """botocore's FlexibleChecksumError (a whole-object body whose checksum did not match,
    raised as it is read to its end) as a `_ChecksumMismatch`; None for any other error."""
    if type(exc).__name__ != "FlexibleChecksumError":
        return None
    found = re.search(r"checksum (\S+) did not match calculated checksum: (\S+)", str(exc))
    return _ChecksumMismatch(*(found.group(2, 1) if found else (str(exc), "?")))


class _BodyReader:
    """A GET body as a window reads it: `readinto` pieces, `finish` once every byte asked for
    is in (the end-of-body checks), `abort` when the window gives up. This one goes through
    the body's own `readinto` (botocore's: urllib3 reads each piece into bytes of its own and
    copies it over, and botocore checks the store's checksum when the body is read to its
    end, if the store sent one)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    @property
    def verifies(self) -> bool:
        """Whether `finish` checks every byte against the store's checksum (botocore's
        `StreamingChecksumBody` with the store's value; never for a range)."""
        return getattr(self._body, "_expected", None) is not None and hasattr(
            self._body, "checksum"
        )

    def readinto(self, view: memoryview) -> int:
        try:
            return int(self._body.readinto(view))
        except Exception as exc:
            mismatch = _botocore_mismatch(exc)
            if mismatch is None:
                raise
            raise mismatch from exc

    def finish(self) -> None:
        try:
            more = self._body.read(1)  # b"" at the end: botocore checks the checksum there
        except Exception as exc:
            mismatch = _botocore_mismatch(exc)
            if mismatch is None:
                raise
            raise mismatch from exc
        if more:
            raise OSError("the store sent more than the bytes asked for")

    def abort(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with suppress(Exception):
                close()  # the connection goes: what is left of the body is never read


class _SocketBody(_BodyReader):
    """A GET body read from the socket straight into the window: no copy but the kernel's.
    Through botocore (urllib3) every piece was read into a bytes object and copied over, twice
    the memory traffic of the body, a third of the S3 sender's CPU in the benchmark's profile.
    The HTTP response is read through `http.client`'s own `readinto`, which stops at its
    Content-Length; urllib3's and botocore's counters are never used again (this body is
    not read through them), and the connection goes back to urllib3's pool once the body is
    read whole and checked (`finish`), or is closed (`abort`). The CRC-32 the store keeps
    (`x-amz-checksum-crc32`, on a whole object) is computed piece by piece and compared at
    the end, as botocore would have."""

    def __init__(self, raw: Any, fp: http.client.HTTPResponse, crc32: int | None) -> None:
        super().__init__(None)
        self._raw, self._fp = raw, fp
        self._expected = crc32
        self._crc = 0
        self._left = fp.length or 0
        self._sock: Any = getattr(getattr(raw, "connection", None), "sock", None)
        self._lowat = False
        if self._sock is not None and self._left > _LOWAT_TAIL:
            with suppress(OSError, AttributeError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _RCVLOWAT)
                self._lowat = True

    @property
    def verifies(self) -> bool:
        return self._expected is not None

    def readinto(self, view: memoryview) -> int:
        if self._lowat and self._left - len(view) < _LOWAT_TAIL:
            self._low_off()  # near the end: a read may ask past the body's last byte
        n = self._fp.readinto(view)
        self._left -= n
        if self._expected is not None and n:
            self._crc = zlib.crc32(view[:n], self._crc)
        return n

    def _low_off(self) -> None:
        self._lowat = False
        with suppress(OSError, AttributeError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def finish(self) -> None:
        if self._expected is not None and self._crc != self._expected:
            raise _ChecksumMismatch(f"crc32 {self._crc:08x}", f"crc32 {self._expected:08x}")
        # Nothing more to check for bytes past the body: `_body_reader` took this reader only
        # for a Content-Length of exactly the window's size, and http.client's reads stop
        # there (it closes the response at its last byte).
        if self._lowat:
            self._low_off()
        self._raw.release_conn()  # read whole: the connection serves the next GET

    def abort(self) -> None:
        with suppress(Exception):
            self._raw.close()
        with suppress(Exception):
            self._raw.release_conn()  # its slot in the pool (urllib3 reconnects it)


# A GET body's socket returns from a read only once this many bytes are in (SO_RCVLOWAT), or
# the read's own length if smaller: fewer, larger reads, each a GIL round trip and a wake-up
# of its thread among 8 GET threads. Set back to 1 for the body's last `_LOWAT_TAIL` bytes
# (http.client's buffered reader may ask for 8 KiB past a body's end there) and before the
# connection goes back to the pool.
_RCVLOWAT = 256 * 1024
_LOWAT_TAIL = 64 * 1024

# Checksums botocore checks on a whole-object GET (`x-amz-checksum-<name>`): a body with one
# of these but no CRC-32 is read through botocore, which checks it.
_CHECKSUM_HEADERS = ("x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme",
                     "x-amz-checksum-sha1", "x-amz-checksum-sha256")  # fmt: skip


def _body_reader(body: Any, size: int) -> _BodyReader:
    """A `_SocketBody` where `body` is botocore's over urllib3 over `http.client`, with
    nothing read yet, not chunked or encoded, of exactly `size` bytes; else the body's own."""
    raw: Any = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        not isinstance(fp, http.client.HTTPResponse)
        or fp.chunked
        or fp.length != size
        or getattr(raw, "_fp_bytes_read", None) != 0
    ):
        return _BodyReader(body)
    headers = raw.headers
    if headers.get("content-encoding", "identity").lower() != "identity":
        return _BodyReader(body)
    # A whole object's (200, not a range's 206): the store's checksums are of the whole.
    stored = (headers.get("x-amz-checksum-crc32") or "") if raw.status == 200 else ""
    crc32: int | None = None
    if stored and "-" not in stored:  # "-N": of the parts' checksums, not of the bytes
        try:
            decoded = base64.b64decode(stored, validate=True)
        except ValueError:
            return _BodyReader(body)
        if len(decoded) != 4:  # not a CRC-32: botocore's own check reports it
            return _BodyReader(body)
        crc32 = int.from_bytes(decoded, "big")
    elif raw.status == 200 and any(h in headers and "-" not in headers[h]
                                   for h in _CHECKSUM_HEADERS):  # fmt: skip
        return _BodyReader(body)
    return _SocketBody(raw, fp, crc32)


class _Fetcher:
    """GETs windows in the background, at most `_GETS_AT_ONCE` at once and `_HELD_BYTES` held:
    a window's bytes count from before its GET until a reader has taken every byte of it (or
    its source closed). Room goes to the windows in the order they were asked for, which is
    the order they are read in: a later window that took room first would hold it until the
    reader is done with the earlier one, which waits for that very room. A window that cannot
    get room within `_SLOT_WAIT_S` gives up (its reader then reads its spans with GETs of their
    own)."""

    def __init__(self, client: Callable[[], Any] | None = None) -> None:
        self._client = client  # a blocking S3 client, if the store has one (`_make_client`)
        self._pool = ThreadPoolExecutor(_GETS_AT_ONCE, thread_name_prefix="transferd-s3-get")
        self.budget = _Budget(_HELD_BYTES)
        self.buffers = _WindowBuffers(self.budget)
        self._lock = threading.Lock()
        self._order = threading.Lock()
        # (bucket/key, ETag) -> GET bodies in a row that failed their checksum (`mismatched`).
        self._mismatches: OrderedDict[tuple[str, str | None], int] = OrderedDict()

    def mismatched(self, path: str, etag: str | None) -> int:
        """One more body of this version failed its checksum: how many in a row now."""
        with self._lock:
            seen = self._mismatches.pop((path, etag), 0) + 1
            self._mismatches[(path, etag)] = seen
            while len(self._mismatches) > 1024:
                self._mismatches.popitem(last=False)
            return seen

    def verified(self, path: str, etag: str | None) -> None:
        """A body of this version passed its checksum: the count starts again."""
        if self._mismatches:
            with self._lock:
                self._mismatches.pop((path, etag), None)

    def fetch(self, source: ObjectSource, window: _Window) -> None:
        with self._order:  # tickets in the pool's order: the pool starts windows in that order
            window.ticket = self.budget.ticket()
            window.future = self._pool.submit(self._get, source, window)

    def _get(self, source: ObjectSource, w: _Window) -> bool:
        if w.closed or not self.budget.acquire(w.ticket, w.size, timeout=_SLOT_WAIT_S):
            self.budget.cancel(w.ticket)
            w.fail()
            return False
        w.granted = True
        t0 = time.time()
        try:
            whole = w.start == 0 and w.size == source.size
            client = self._client() if self._client is not None else None
            if client is None:
                data = source.fs.cat_file(source.path, start=w.start, end=w.start + w.size)
                w.feed(io.BytesIO(data), self.buffers.take(w.size))
            else:
                # In this pool thread, not on s3fs's one loop thread. If-Match: a window of
                # another version of the object fails (the source reads as changed).
                bucket, _, key = source.path.partition("/")
                extra = {"IfMatch": source.etag} if source.etag else {}
                if not whole:
                    extra["Range"] = f"bytes={w.start}-{w.start + w.size - 1}"
                out = client.get_object(Bucket=bucket, Key=key, **extra)
                if not whole:
                    _check_range(out, w.start, w.size)
                w.feed(out["Body"], self.buffers.take(w.size))
        except Exception as exc:  # noqa: BLE001 - the reader's own GET reports the error
            # Bytes handed out that the body's checksum was to vouch for, and never did: what
            # was read of the object is not to be trusted. A ranged window's (no checksum) are
            # as good as any ranged read's: its reader GETs the rest of its spans.
            source.note_failure(exc, unchecked=w.got > 0 and w.verifies and not w.closed)
            self.release(w)
            w.fail()
            return False
        if w.verifies:
            self.verified(source.path, source.etag)
        log.debug(
            "storage.get",
            extra={"fields": {"path": source.path, "bytes": w.size, "at": round(t0, 4),
                              "seconds": round(time.time() - t0, 4)}},
        )  # fmt: skip
        return True

    def release(self, w: _Window) -> None:
        with self._lock:
            if w.released or not w.granted:
                return
            w.released = True
        with w.cond:
            buf, w.buf = w.buf, None  # the readers' views keep what they took
        self.budget.release(w.size)
        if buf is not None:
            self.buffers.give(buf)  # reused once those views are gone

    def drop(self, w: _Window) -> None:
        """The source closed: stop (or never start) its GET and give its room back."""
        w.closed = True
        future = w.future
        self.budget.cancel(w.ticket)  # its turn passes (or, waiting for room, it stops)
        if future is None or future.cancel():
            return
        future.add_done_callback(lambda f: self.release(w) if f.result() else None)


class ObjectSource:
    """An object read chunk by chunk, from windows fetched in the background as soon as the
    source opens (`_Fetcher`): a chunk is handed over as soon as its bytes have landed, as a
    view of the window. A span outside the windows (read again, out of order) gets a GET of its
    own. Every GET names the ETag seen at open (If-Match), so the object cannot change under
    the reader between windows; `changed()` then costs no request."""

    def __init__(
        self, fs: Any, path: str, fetcher: _Fetcher | None = None,
        listed: tuple[int, str | None] | None = None,
    ) -> None:  # fmt: skip
        self.fs, self.path = fs, path
        if listed is None:
            info = fs.info(path)
            listed = int(info["size"]), info.get("ETag") or None
        # From a listing moments ago (`listed`): the GETs' If-Match then reads exactly the
        # version listed, whose size the upload intent carries.
        self.size, self.etag = listed
        self._client = fetcher._client if fetcher is not None else None
        self._fetcher = fetcher
        self._changed = False
        self._unchecked: str | None = None  # why bytes handed out went unchecked
        self._corrupt = False  # this version failed its checksum `_MISMATCHES_FATAL` times
        self._lock = threading.Lock()
        self._windows: list[_Window] = []
        if fetcher is not None:
            for start in range(0, self.size, _WINDOW_BYTES):
                window = _Window(start, min(_WINDOW_BYTES, self.size - start))
                self._windows.append(window)
                fetcher.fetch(self, window)

    def note_failure(self, exc: BaseException, *, unchecked: bool = False) -> None:
        """A GET failed: if the object is no longer the version opened, the source changed.
        If its body failed its checksum, or it had handed out part of a window its checksum
        was to vouch for (`unchecked`: a body cut short), what was read of this object is not
        to be trusted: its next read and `changed` raise (a transient IntegrityError; after
        `_MISMATCHES_FATAL` checksum failures of this version in a row, not transient)."""
        if http_status(exc) == 412 or "PreconditionFailed" in str(exc):
            # (Not "412" anywhere in the text: "the store sent 4120000 of ..." is no change.)
            self._changed = True
        elif isinstance(exc, _ChecksumMismatch):
            seen = self._fetcher.mismatched(self.path, self.etag) if self._fetcher else 1
            log.warning(
                "storage.checksum_mismatch",
                extra={"fields": {"path": self.path, "etag": self.etag, "got": exc.got,
                                  "store": exc.expected, "in_a_row": seen}},
            )  # fmt: skip
            with self._lock:
                self._unchecked = self._unchecked or str(exc)
                self._corrupt = self._corrupt or seen >= _MISMATCHES_FATAL
        elif unchecked:
            with self._lock:
                self._unchecked = self._unchecked or str(exc) or type(exc).__name__

    def _unchecked_error(self) -> IntegrityError:
        if self._corrupt:
            return IntegrityError(
                f"{self.path}: the store's bytes of version {self.etag} failed their checksum "
                f"{_MISMATCHES_FATAL} times in a row ({self._unchecked}); not read again",
                transient=False, path=self.path, side="source",
            )  # fmt: skip
        return IntegrityError(
            f"{self.path}: a GET failed its checks after bytes of it were read, or its "
            f"checksum ({self._unchecked}); reading the object again",
            transient=True, path=self.path, side="source",
        )  # fmt: skip

    def _take(self, offset: int, length: int) -> bytes | memoryview:
        if self._unchecked is not None:
            # Nothing more of a read already known bad: not even through a ranged GET of its
            # own (no checksum), which would hand out bytes a checksum just refused.
            raise self._unchecked_error()
        if length == 0:
            return b""
        first = offset // _WINDOW_BYTES
        last = (offset + length - 1) // _WINDOW_BYTES
        pieces: list[memoryview] = []
        if self._windows and last < len(self._windows):
            for i in range(first, last + 1):
                w = self._windows[i]
                lo, hi = max(offset, w.start), min(offset + length, w.start + w.size)
                view = None if w.released else w.span(lo, hi - lo)
                if view is None:
                    pieces = []
                    break
                pieces.append(view)
                with self._lock:
                    w.taken += hi - lo
                    done = w.taken >= w.size
                if done and self._fetcher is not None:
                    self._fetcher.release(w)
        if len(pieces) == 1:
            return pieces[0]
        if pieces:
            return b"".join(pieces)
        if self._unchecked is not None:  # the window's GET failed, and said why
            raise self._unchecked_error()
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        """A span's own ranged GET (If-Match the version opened). Its failures are the job's
        (`_read_error`), never a bare OSError."""
        try:
            client = self._client() if self._client is not None else None
            if client is None:
                return bytes(self.fs.cat_file(self.path, start=offset, end=offset + length))
            bucket, _, key = self.path.partition("/")
            extra = {"IfMatch": self.etag} if self.etag else {}
            out = client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}", **extra
            )
            _check_range(out, offset, length)
            data = bytes(out["Body"].read())
            if len(data) != length:
                raise OSError(f"the store sent {len(data)} of {length} bytes")
            return data
        except Exception as exc:  # botocore's and urllib3's own kinds, OSError
            mismatch = _botocore_mismatch(exc)  # a range that is the whole object has one
            self.note_failure(mismatch or exc)
            if mismatch is not None:
                raise self._unchecked_error() from exc
            raise self._read_error(exc) from exc

    def _read_error(self, exc: Exception) -> TransferdError:
        """A span's GET failure as the job's error (`failures.storage_failure`: the object
        gone or no longer the version opened is a changed source, the store's 5xx or 429 or
        the network failing is transient, a refusal is not), or a changed source whenever an
        earlier GET found the version opened replaced."""
        if self._changed:
            return source_changed_error(self.path, f"is no longer the version opened ({exc})")
        return storage_failure("reading", self.path, exc, side="source")

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        yield memoryview(self._take(offset, length))

    def read(self, offset: int, length: int) -> bytes | memoryview:
        return self._take(offset, length)

    def changed(self) -> bool:
        """Whether the object is no longer the version opened. Raises an IntegrityError when
        a body failed its checksum or a GET failed after handing out bytes its checksum had
        not yet vouched for (`note_failure`): the sender checks this after each batch it
        hashed, so a job whose chunks came from such a window fails before its commit, and is
        tried again (transient) unless this version failed its checksum
        `_MISMATCHES_FATAL` times in a row."""
        if self._unchecked is not None:
            raise self._unchecked_error()
        if self._client is not None and self._client() is not None:
            return self._changed  # every GET was If-Match the version opened
        return self._changed or int(self.fs.size(self.path)) != self.size

    def close(self) -> None:
        if self._fetcher is not None:
            for w in self._windows:
                self._fetcher.drop(w)
        self._windows = []


@dataclass
class _Multipart:
    """A member's multipart upload with every part in: its object appears when it is completed
    (at commit), and never if it is aborted."""

    path: str  # bucket/key
    upload_id: str
    parts: list[dict[str, Any]]


@dataclass
class _Streamed:
    """The members of one receiver upload streamed to the store while it runs: multipart
    uploads completed at commit, or (`direct`, a folder that did not exist: it reads as absent
    until its manifest, as during a commit) objects PUT at their keys at once (None)."""

    rel: str
    direct: bool
    members: dict[int, Future[_Multipart | None]] = field(default_factory=dict)
    # Another commit of the folder began while this upload streamed straight in: what it PUT
    # may have been overwritten, so its commit PUTs every member again (and streams no more).
    spoiled: bool = False


def is_object_store(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))


class ObjectStorage(FsspecStorage):
    """data_dir at an object store URL (s3://bucket/prefix, gs://..., az://...): folders and
    checkpoint steps commit through a manifest object written last (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any], state_dir: Path) -> None:
        # A listing cached by fsspec would hide what another process (or a crash) changed.
        options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options}
        super().__init__(url, options, state_dir)
        self.url = url
        self.intents_dir = state_dir / "object-commits"
        with os_errors("creating the state dir", self.intents_dir):
            self.intents_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._committing: dict[str, int] = {}  # folder -> commits in progress
        for rel, _upload, streaming in self._intents():
            if not streaming:
                self._committing[rel] = self._committing.get(rel, 0) + 1
        self._fetcher = _Fetcher(self._client)
        self._s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else ())
        self._options = storage_options
        # Staged chunks keep their CRC-32 where the PUTs go through our client (`_put_local`).
        self.stage_crc32 = self._s3 and set(storage_options) <= _CLIENT_OPTIONS
        self._client_lock = threading.Lock()
        self._client_made = False
        self._client_obj: Any = None
        self._streamed: dict[str, _Streamed] = {}  # receiver upload id -> what it streamed
        # bucket/key -> (size, ETag, when listed): what `list_source` saw, for `open_source`.
        self._listed: dict[str, tuple[int, str | None, float]] = {}
        # Prefixes a listing found empty (`sizes`, as an upload opens) and when.
        self._absent: dict[str, float] = {}
        self._stream_lock = threading.Lock()
        # Polled folders with a manifest: its ETag and the state it gave (`folder_state`).
        self._polled: dict[str, tuple[str, tuple[list[tuple[str, int]], float]]] = {}
        # Members streamed at once x parts at once bounds what streaming holds in memory, as
        # for a commit (`_PUT_FILES x _PUT_PARTS x _PART_BYTES`).
        self._member_pool = ThreadPoolExecutor(_PUT_FILES, thread_name_prefix="transferd-s3-put")
        self._part_pool = ThreadPoolExecutor(
            _PUT_FILES * _PUT_PARTS, thread_name_prefix="transferd-s3-part"
        )

    # -- intents (state dir) ----------------------------------------------------------------------
    def _intent_path(self, rel: str, upload: str) -> Path:
        """One file per folder and upload: two uploads of one folder keep their own."""
        key = hashlib.sha256(f"{rel}\0{upload}".encode()).hexdigest()[:32]
        return self.intents_dir / (key + ".json")

    def _intents(self) -> list[tuple[str, Path, bool]]:
        """(folder, its file, only streamed: no visible object written yet) of each intent."""
        found = []
        for entry in sorted(self.intents_dir.glob("*.json")):
            try:
                doc = json.loads(entry.read_text(encoding="utf-8"))
                found.append((str(doc["rel"]), entry, bool(doc.get("streaming", False))))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                entry.unlink(missing_ok=True)  # a torn intent: its commit never wrote objects
        return found

    def _write_intent(self, rel: str, upload: str, *, streaming: bool) -> None:
        path = self._intent_path(rel, upload)
        doc = {"rel": rel, "upload": upload, "streaming": streaming}
        with os_errors(f"recording the commit of {rel}", rel):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            tmp.replace(path)

    def _begin(self, rel: str, upload: str) -> None:
        self._write_intent(rel, upload, streaming=False)
        with self._lock:
            self._committing[rel] = self._committing.get(rel, 0) + 1
            self._absent.pop(self.path(rel), None)  # stale from here on

    def _end(self, rel: str, upload: str) -> None:
        self._intent_path(rel, upload).unlink(missing_ok=True)
        with self._lock:
            left = self._committing.get(rel, 0) - 1
            if left > 0:
                self._committing[rel] = left
            else:
                self._committing.pop(rel, None)

    def _in_commit(self, rel: str) -> bool:
        with self._lock:
            return rel in self._committing

    # -- manifests ------------------------------------------------------------------------------
    def manifest(self, rel: str, side: Side = "source") -> dict[str, Any] | None:
        """The committed folder's manifest, or None (no folder, or one whose commit is not
        finished)."""
        try:
            raw = self.fs.cat_file(f"{self.path(rel)}/{MANIFEST}")
        except FileNotFoundError:
            return None
        except Exception as exc:  # OSError, botocore's own kinds
            raise storage_failure("reading the manifest of", rel, exc, side=side) from exc
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            return dict(doc)
        except (ValueError, AttributeError) as exc:
            raise StorageError(f"{rel}: unreadable folder manifest ({exc})", path=rel) from exc

    def _has_manifest(self, rel: str) -> bool:
        return bool(self.fs.exists(f"{self.path(rel)}/{MANIFEST}"))

    # -- reads ----------------------------------------------------------------------------------
    def open_source(self, rel: str) -> Source:
        path = self.path(rel)
        with self._lock:
            known = self._listed.pop(path, None)
        listed = known[:2] if known and time.monotonic() - known[2] < _LISTED_FRESH_S else None
        with storage_failures("opening", rel, side="source"):
            return ObjectSource(self.fs, path, self._fetcher, listed)

    def _remember(self, found: dict[str, dict[str, Any]], paths: list[str]) -> None:
        """Keep the listed size and ETag of `paths` for `open_source` (a HEAD each spared)."""
        now = time.monotonic()
        with self._lock:
            stale = [p for p, known in self._listed.items() if now - known[2] >= _LISTED_FRESH_S]
            for p in stale:
                del self._listed[p]
            for p in paths:
                info = found.get(p)
                if info is not None and info.get("type") == "file":
                    self._listed[p] = (int(info["size"]), info.get("ETag") or None, now)

    def exists(self, rel: str) -> bool:
        self.check_path(rel)
        with storage_failures("checking", rel, side="source"):
            if self._has_manifest(rel):
                return True
            if self._in_commit(rel):
                return False
            return bool(self.fs.exists(self.path(rel)))

    def is_dir(self, rel: str) -> bool:
        self.check_path(rel)
        with storage_failures("checking", rel, side="destination"):
            if self._has_manifest(rel):
                return True
            return not self._in_commit(rel) and bool(self.fs.isdir(self.path(rel)))

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        """One listing of the prefix (a request per 1,000 objects; a file: its HEAD too, a
        committed folder: its manifest's GET too), whose sizes and ETags then open the
        members without a request each."""
        self.check_path(rel)
        path = self.path(rel)
        with storage_failures("listing", rel, side="source"):
            found = self._find(path)
            if not found:  # a file (its HEAD), or nothing
                with suppress(FileNotFoundError):
                    info = self.fs.info(path)
                    if info.get("type") == "file":
                        found = {path: info}
        doc = self.manifest(rel) if f"{path}/{MANIFEST}" in found else None
        if doc is not None:
            members = [(str(m["path"]), int(m["size"])) for m in doc["members"]]
        elif self._in_commit(rel) or not found:
            raise StorageError(f"{rel} does not exist at this site", path=rel)
        elif found.get(path, {}).get("type") == "file":
            self._remember(found, [path])
            return "file", [("", int(found[path]["size"]))]
        else:
            members = []
            for name, info in sorted(found.items()):
                member = name[len(path) :].lstrip("/")
                if info.get("type") != "file" or _internal(member):
                    continue
                if ".." in member.split("/"):
                    raise PolicyViolation(f"member escapes {rel}: {member!r}", path=rel)
                members.append((member, int(info["size"])))
            if not members:
                raise StorageError(f"{rel} does not exist at this site", path=rel)
        self._remember(found, [f"{path}/{m}" for m, _ in members])
        return "folder", members

    def list_dir(self, rel: str) -> list[str]:
        names = [n for n in super().list_dir(rel) if not _internal(n)]
        with self._lock:
            busy = set(self._committing)
        return [n for n in names if f"{rel}/{n}" not in busy]

    def newest_mtime(self, rel: str) -> float:
        if self._in_commit(rel):
            return time.time()  # being written now
        doc = self.manifest(rel)  # its failures: `manifest`; the listing's: FsspecStorage's
        if doc is not None:
            return float(doc["committed_at"])  # S3's LastModified has whole seconds only
        return super().newest_mtime(rel)

    def folder_state(self, rel: str) -> tuple[list[tuple[str, int]], float] | None:
        """Members and newest mtime for a poll, in one request when nothing changed: a folder
        that had a manifest is checked by the manifest's ETag (a HEAD); any other by one
        listing (members, sizes and LastModified together; a request per 1,000 objects)."""
        self.check_path(rel)
        path = self.path(rel)
        with storage_failures("polling", rel, side="source"):
            known = self._polled.get(rel)
            if known is not None:
                try:
                    etag = self.fs.info(f"{path}/{MANIFEST}").get("ETag")
                except FileNotFoundError:
                    etag = None
                if etag == known[0]:
                    return known[1]
            self._polled.pop(rel, None)
            found = self.fs.find(path, detail=True)
        manifest = found.get(f"{path}/{MANIFEST}")
        if manifest is not None:
            doc = self.manifest(rel)
            if doc is not None:
                state = (
                    [(str(m["path"]), int(m["size"])) for m in doc["members"]],
                    float(doc["committed_at"]),
                )
                self._polled[rel] = (str(manifest.get("ETag")), state)
                return state
        if self._in_commit(rel) or not found:
            return None
        members = sorted(
            (name[len(path) :].lstrip("/"), int(info["size"]))
            for name, info in found.items()
            if not _internal(name[len(path) :].lstrip("/"))
        )
        if not members:
            return None
        return members, max(info_mtime(info) for info in found.values())

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        """Several sizes (a folder's members, when an upload opens) from one listing of their
        common prefix, not a HEAD and a listing each."""
        if len(rels) < 2:
            return [self.size(rel) for rel in rels]
        for rel in rels:
            self.check_path(rel)
        paths = [self.path(rel) for rel in rels]
        top = posixpath.commonpath(paths)
        with storage_failures("listing", top, side="destination"):
            found = self._find(top)
        now = time.monotonic()
        with self._lock:
            for stale in [p for p, at in self._absent.items() if now - at >= _ABSENT_FRESH_S]:
                del self._absent[stale]
            if found:
                self._absent.pop(top, None)
            else:  # `_start_streaming` needs not ask again (a request in the first PUT's way)
                self._absent[top] = now
        return [
            int(found[p]["size"]) if found.get(p, {}).get("type") == "file" else None
            for p in paths
        ]

    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        """The objects under `path/` with their sizes and ETags: one request per 1,000 objects
        with our client (s3fs's `find` asks again, with a HEAD and a listing, when there are
        none), s3fs's `find` otherwise."""
        client = self._client()
        if client is None:
            return dict(self.fs.find(path, detail=True))
        bucket, _, key = path.partition("/")
        found: dict[str, dict[str, Any]] = {}
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/")
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/") and not obj["Size"]:
                    continue  # a console's "folder" marker, no member (s3fs skips them too)
                name = f"{bucket}/{obj['Key']}"
                found[name] = {
                    "name": name, "type": "file", "size": int(obj["Size"]),
                    "ETag": obj.get("ETag"), "LastModified": obj.get("LastModified"),
                }  # fmt: skip
        if found:
            with self._lock:
                self._absent.pop(path, None)  # it exists now: `_start_streaming` must ask
        return found

    # -- writes ---------------------------------------------------------------------------------
    def _put_options(self) -> dict[str, Any]:
        if self._s3:
            return {"chunksize": _PART_BYTES, "max_concurrency": _PUT_PARTS}
        return {}

    def _client(self) -> Any:
        """A blocking botocore S3 client for bulk PUTs (made once, on first use), or None when the
        storage options need something only s3fs understands.

        Why: s3fs runs every request on one asyncio loop thread (`fsspecIO`) and reads a PUT
        body into memory there; the member and part pools then queue on that thread. Measured
        against moto in one run (8 x 32 MiB, 4 at a time, medians of 3): s3fs `put_file` 1.27 s,
        botocore `put_object` with the open file as body 0.92 s, `rclone copy` 1.17 s. botocore
        clients are thread-safe; each pool thread sends its own request on its own connection.
        A PUT carries the file's CRC-32 (`x-amz-checksum-crc32`, checked by the store on
        arrival), combined from the CRCs of its chunks as they were staged, and an unsigned
        body (see `_make_client`): the first byte leaves at once, with no pass over the file
        before it."""
        with self._client_lock:
            if not self._client_made:
                self._client_made = True
                self._client_obj = _make_client(self._options) if self._s3 else None
            return self._client_obj

    def _put_local(self, local: Path | str, path: str, crc32: int | None = None) -> None:
        """One local file to one object (`bucket/key`): a PUT with the file as its body (no copy
        in memory) and its CRC-32 (`crc32`, or computed here) up to `2 x _PART_BYTES`, else
        s3fs's multipart upload."""
        client = self._client()
        size = os.path.getsize(local)
        if client is None or size > 2 * _PART_BYTES:
            self.fs.put_file(str(local), path, **self._put_options())
            return
        bucket, _, key = path.partition("/")
        t0 = time.time()
        if crc32 is None:
            crc32 = _file_crc32(local)
        checksum = base64.b64encode(crc32.to_bytes(4, "big")).decode()
        try:
            with _PutBody(local) as body:
                # The algorithm named too: the store keeps the CRC, and GETs of the object
                # check it (botocore validates a whole-object GET against it).
                client.put_object(
                    Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32",
                    ChecksumCRC32=checksum,
                )  # fmt: skip
        except Exception as exc:  # botocore's own kinds: a ClientError names the store's reason
            raise _os_error(exc, path) from exc
        log.debug(
            "storage.put",
            extra={"fields": {"path": path, "bytes": size, "at": round(t0, 4),
                              "seconds": round(time.time() - t0, 4)}},
        )  # fmt: skip

    # -- streaming (S3: members go up while the transfer runs) ---------------------------------
    def member_staged(self, staging: Staging, rel: str, index: int) -> None:
        """Receiver thread: member `index` of the upload staged at `staging` (committed at
        `rel`) is whole and verified. On S3, one of at least `_STREAM_MIN_BYTES` goes up now:
        into a folder that does not exist yet, PUT at its key (the folder reads as absent
        until its manifest, as during a commit: one request per object, as rclone's); over
        anything else, as a multipart upload that `commit` completes (nothing shows before:
        readers keep the old version whole for the whole transfer)."""
        size = staging.sizes[index]
        if not self._s3 or size < _STREAM_MIN_BYTES:
            return
        upload = staging.dir.name
        path = self.path(rel if staging.kind == "file" else f"{rel}/{staging.members[index]}")
        with self._stream_lock:
            streamed = self._streamed.get(upload)
            if streamed is None:
                streamed = self._start_streaming(staging, rel)
                with self._lock:
                    self._streamed[upload] = streamed
            elif index in streamed.members or streamed.spoiled:
                return  # a spoiled upload's commit PUTs the rest
            streamed.members[index] = self._member_pool.submit(
                self._stream_member, staging, index, path, streamed.direct
            )

    def _start_streaming(self, staging: Staging, rel: str) -> _Streamed:
        """Record the intent (start-up must find what a crash leaves) before any byte goes."""
        upload = staging.dir.name
        path = self.path(rel)
        with self._lock:
            listed_at = self._absent.pop(path, None)
        # Found absent when the upload opened (`sizes`), moments ago: no second request.
        absent = listed_at is not None and time.monotonic() - listed_at < _ABSENT_FRESH_S
        with storage_failures("checking", rel, side="destination"):
            direct = (
                staging.kind == "folder"
                and not self._in_commit(rel)
                and (absent or not self.fs.exists(path))
            )
        if direct:
            self._begin(rel, upload)  # absent from here on; a crash's objects all go
        elif not self._intent_path(rel, upload).exists():
            self._write_intent(rel, upload, streaming=True)
        return _Streamed(rel, direct)

    def _stream_member(
        self, staging: Staging, index: int, path: str, direct: bool
    ) -> _Multipart | None:
        log.debug("storage.stream_member", extra={"fields": {"path": path, "direct": direct}})
        if direct:
            self._put_local(staging.member_path(index), path, staging.member_crc32(index))
            return None
        bucket, _, key = path.partition("/")
        size = staging.sizes[index]
        part = max(_PART_BYTES, -(-size // _MAX_PARTS))
        upload_id = str(
            self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        )
        local = staging.member_path(index)
        parts = [
            self._part_pool.submit(
                self._put_part, local, path, upload_id, n + 1, offset, min(part, size - offset)
            )
            for n, offset in enumerate(range(0, size, part))
        ]
        wait_all(parts)
        try:
            return _Multipart(path, upload_id, [p.result() for p in parts])
        except BaseException:
            self._abort_multipart(path, upload_id)
            raise

    def _put_part(
        self, local: Path, path: str, upload_id: str, number: int, offset: int, length: int
    ) -> dict[str, Any]:
        with open(local, "rb") as fh:
            body = os.pread(fh.fileno(), length, offset)
        if len(body) != length:
            raise OSError(f"{local}: {len(body)} bytes at {offset}, {length} expected")
        bucket, _, key = path.partition("/")
        client = self._client()
        if client is not None:
            try:
                out = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            except Exception as exc:  # botocore's own kinds
                raise _os_error(exc, path) from exc
            return {"PartNumber": number, "ETag": out["ETag"]}
        out = self.fs.call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
            Body=body,
        )  # fmt: skip
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _complete(self, upload: _Multipart) -> None:
        bucket, _, key = upload.path.partition("/")
        self.fs.call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id,
            MultipartUpload={"Parts": upload.parts},
        )  # fmt: skip

    def _abort_multipart(self, path: str, upload_id: str) -> None:
        bucket, _, key = path.partition("/")
        with suppress(OSError):  # gone already; else start-up aborts it
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def _take_streamed(self, upload: str) -> tuple[bool, dict[int, _Multipart | None]]:
        """Whether `upload` began its folder's commit by streaming into it (`direct`), and the
        members it streamed, each PUT or with every part in (a member whose streaming failed
        is left out: the commit PUTs it; a spoiled upload's direct members are all left out)."""
        with self._stream_lock, self._lock:
            streamed = self._streamed.pop(upload, None)
        done: dict[int, _Multipart | None] = {}
        for index, future in (streamed.members if streamed else {}).items():
            try:
                done[index] = future.result()
            except (OSError, StorageError) as exc:
                log.warning(
                    "storage.stream_failed",
                    extra={"fields": {"upload": upload, "member": index, "error": str(exc)}},
                )
        if streamed is not None and streamed.spoiled:
            done = {i: m for i, m in done.items() if m is not None}
        return streamed is not None and streamed.direct, done

    def _spoil_direct(self, rel: str) -> None:
        """A commit of `rel` begins: an upload streaming straight into it streams no more, its
        commit PUTs every member again, and its PUTs in flight land before ours begin."""
        with self._stream_lock, self._lock:
            others = [s for s in self._streamed.values() if s.rel == rel and s.direct]
            for other in others:
                other.spoiled = True
            pending = [f for s in others for f in s.members.values()]
        for future in pending:
            with suppress(Exception):
                future.result()

    def discard_staged(self, staging: Staging) -> None:
        """The upload was given up: abort what it streamed (in the background)."""
        upload_id = staging.dir.name
        with self._lock:
            streamed = self._streamed.pop(upload_id, None)
        if streamed is None:
            return

        def abort() -> None:
            for future in streamed.members.values():
                if future.cancel() or future.exception() is not None:
                    continue
                upload = future.result()
                if upload is not None:
                    self._abort_multipart(upload.path, upload.upload_id)
            if streamed.direct:
                self._end_after_failure(streamed.rel, upload_id)  # its objects go, and its intent
            elif not self._in_commit(streamed.rel):
                self._intent_path(streamed.rel, upload_id).unlink(missing_ok=True)

        self._member_pool.submit(abort)

    def _abort_all_multipart(self, rel: str) -> None:
        """Abort every multipart upload under `rel` (what a crash left uncompleted)."""
        if not self._s3:
            return
        bucket, _, key = self.path(rel).partition("/")
        marker: dict[str, str] = {}
        while True:
            out = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **marker)
            for found in out.get("Uploads", []):
                if found["Key"] == key or found["Key"].startswith(key + "/"):
                    self._abort_multipart(f"{bucket}/{found['Key']}", found["UploadId"])
            if not out.get("IsTruncated"):
                return
            marker = {
                "KeyMarker": out["NextKeyMarker"],
                "UploadIdMarker": out["NextUploadIdMarker"],
            }

    # -- commits --------------------------------------------------------------------------------
    def commit(self, staging: Staging, rel: str) -> None:
        final = self.path(rel)
        try:
            staging.sync()
            staging.close()
            if staging.kind == "file":
                # One object: a PUT (or a multipart upload's completion) shows it whole.
                _direct, streamed = self._take_streamed(staging.dir.name)
                multipart = streamed.get(0)
                if multipart is not None:
                    self._complete(multipart)
                    self._intent_path(rel, staging.dir.name).unlink(missing_ok=True)
                else:
                    self._put_local(staging.payload_path, final, staging.member_crc32(0))
                if int(self.fs.size(final)) != staging.sizes[0]:
                    raise StorageError(f"{rel}: the store holds a different size", path=rel)
                return
        except TransferdError:
            raise
        except Exception as exc:  # OSError (botocore's error its cause), s3fs's own kinds
            raise storage_failure("committing", rel, exc, side="destination") from exc
        self._commit_folder(staging, rel)

    def _commit_folder(self, staging: Staging, rel: str) -> None:
        final = self.path(rel)
        upload = staging.dir.name
        t0 = time.time()
        began, streamed = self._take_streamed(upload)
        t_streamed = time.time()
        if not began:
            self._spoil_direct(rel)
            self._begin(rel, upload)
        try:
            # Even streamed straight in (`began`): another upload of the folder may have
            # committed since.
            if self._has_manifest(rel):
                self.fs.rm_file(f"{final}/{MANIFEST}")  # the old version is gone from here on
            members = list(zip(staging.members, staging.sizes, strict=True))
            # Streamed members appear now (each completion is one request); the rest go up.
            multipart = [m for m in streamed.values() if m is not None]
            list(self._member_pool.map(self._complete, multipart))
            rest = [i for i in range(len(members)) if i not in streamed]
            if rest:
                list(
                    self._member_pool.map(
                        lambda i: self._put_local(
                            staging.member_path(i), f"{final}/{members[i][0]}",
                            staging.member_crc32(i),
                        ),
                        rest,
                    )
                )
            self._verify_and_prune(rel, dict(members))
            doc = {
                "format": MANIFEST_FORMAT,
                "upload": upload,
                "committed_at": time.time(),
                "members": [{"path": m, "size": n} for m, n in sorted(members)],
            }
            self.fs.pipe_file(f"{final}/{MANIFEST}", json.dumps(doc, indent=1).encode())
            log.debug(
                "storage.commit",
                extra={"fields": {"path": rel, "at": round(t0, 4),
                                  "uploads_wait_s": round(t_streamed - t0, 4),
                                  "seconds": round(time.time() - t0, 4)}},
            )  # fmt: skip
        except BaseException as exc:
            self._end_after_failure(rel, upload)
            if isinstance(exc, Exception) and not isinstance(exc, TransferdError):
                raise storage_failure("committing", rel, exc, side="destination") from exc
            raise
        self._end(rel, upload)

    def _end_after_failure(self, rel: str, upload: str) -> None:
        """The folder stays absent; its objects go now if the store lets us, else at start-up
        (the intent file stays)."""
        try:
            self._reclaim_folder(rel)
        except (OSError, StorageError):
            with self._lock:
                self._committing[rel] = max(0, self._committing.get(rel, 1) - 1)
                if not self._committing[rel]:
                    del self._committing[rel]
            return
        self._end(rel, upload)

    def _verify_and_prune(self, rel: str, sizes: dict[str, int]) -> None:
        final = self.path(rel)
        found = {
            name[len(final) :].lstrip("/"): int(info["size"])
            for name, info in self._find(final).items()
        }
        wrong = [m for m, n in sizes.items() if found.get(m) != n]
        if wrong:
            raise StorageError(
                f"committing {rel}: {len(wrong)} object(s) missing or of the wrong size after "
                f"upload (first: {wrong[0]})",
                path=rel,
            )
        extra = [f"{final}/{m}" for m in found if m not in sizes and m != MANIFEST]
        if extra:
            self.fs.rm(extra)

    def write_text_atomic(self, rel: str, text: str) -> None:
        with storage_failures("writing", rel, side="destination"):
            self.fs.pipe_file(self.path(rel), text.encode())  # one PUT: old or new, whole

    def remove_tree(self, rel: str) -> None:
        self.check_path(rel)
        path = self.path(rel)
        with storage_failures("removing", rel, side="destination"):
            if self._has_manifest(rel):
                self.fs.rm_file(f"{path}/{MANIFEST}")  # absent first, then its objects go
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    # -- start-up -------------------------------------------------------------------------------
    def reclaim(self) -> list[str]:
        """Clean up after commits a crash interrupted (named by intent files): returns the
        folders cleaned. A folder with a manifest keeps what it lists; one without loses all."""
        cleaned = []
        for rel, entry, streaming in self._intents():
            try:
                self._reclaim_folder(rel, objects=not streaming)
            except Exception as exc:  # OSError, StorageError, botocore's own kinds
                err = storage_failure("reclaiming", rel, exc, side="destination")
                log.warning(
                    "storage.reclaim_failed", extra={"fields": {"path": rel, "error": str(err)}}
                )
                continue
            cleaned.append(rel)
            log.info("storage.reclaimed", extra={"fields": {"path": rel}})
            entry.unlink(missing_ok=True)
            with self._lock:
                self._committing.pop(rel, None)
        return cleaned

    def _reclaim_folder(self, rel: str, *, objects: bool = True) -> None:
        """Abort the multipart uploads left under `rel`; with `objects`, delete what its
        manifest does not list (everything, without one)."""
        self._abort_all_multipart(rel)
        if not objects:
            return
        path = self.path(rel)
        doc = self.manifest(rel, "destination")
        if not self.fs.exists(path):
            return
        keep = {str(m["path"]) for m in doc["members"]} | {MANIFEST} if doc else set()
        garbage = [name for name in self.fs.find(path) if name[len(path) :].lstrip("/") not in keep]
        if garbage:
            self.fs.rm(garbage)

    def probe(self) -> None:
        """List, write, read back and delete a probe object; ConfigError with the store's reason
        when any step fails (the daemon exits 2 at start-up rather than failing every job)."""
        bucket = self.root.split("/", 1)[0]
        name = f"{self.root}/.transferd-probe-{uuid.uuid4().hex}"
        step = f"listing {bucket}"
        try:
            self.fs.ls(bucket)
            step = "writing a probe object"
            self.fs.pipe_file(name, b"transferd probe\n")
            step = "reading the probe object back"
            if bytes(self.fs.cat_file(name)) != b"transferd probe\n":
                raise OSError("it read back differently")
            step = "deleting the probe object"
            self.fs.rm_file(name)
            step = "making the S3 client"
            self._client()  # now, not in the first job (loading botocore's models: ~0.1 s)
        except Exception as exc:  # the store's client raises its own kinds (botocore, ...)
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, FileNotFoundError) and step.startswith("listing"):
                reason = f"{bucket!r} does not exist (create the bucket first)"
            raise ConfigError(
                f"data_dir {self.url!r}: the store failed the start-up check ({step}): {reason}"
            ) from exc


# s3fs storage options `_make_client` maps onto a botocore client; with any other, s3fs does the
# PUTs (it knows what they mean: `anon`, `requester_pays`, `s3_additional_kwargs`, ...).
_CLIENT_OPTIONS = frozenset(
    {"key", "secret", "token", "endpoint_url", "client_kwargs", "config_kwargs", "profile",
     "use_listings_cache", "skip_instance_cache", "use_ssl", "default_block_size"}
)  # fmt: skip


def _make_client(options: dict[str, Any]) -> Any:
    """A botocore S3 client with the credentials, endpoint and config the s3fs options give, or
    None when they hold something else (s3fs keeps those PUTs)."""
    if not set(options) <= _CLIENT_OPTIONS:
        return None
    import botocore.config
    import botocore.session

    session = botocore.session.Session(profile=options.get("profile"))
    client_kwargs = dict(options.get("client_kwargs") or {})
    if options.get("endpoint_url"):
        client_kwargs.setdefault("endpoint_url", options["endpoint_url"])
    if "use_ssl" in options:
        client_kwargs.setdefault("use_ssl", bool(options["use_ssl"]))
    config = {
        "max_pool_connections": 2 * _PUT_FILES * _PUT_PARTS,
        **(options.get("config_kwargs") or {}),
    }
    # Bodies unsigned, as botocore does over https and rclone does everywhere (Content-MD5 and
    # UNSIGNED-PAYLOAD): each PUT carries its CRC-32 instead, in a signed header, which the
    # store checks. Over plain http botocore would otherwise SHA-256 every body in a pass of its
    # own before sending the first byte. `config_kwargs: {s3: {payload_signing_enabled: true}}`
    # signs them again.
    config["s3"] = {"payload_signing_enabled": False, **(config.get("s3") or {})}
    # Credentials may come as s3fs's key/secret/token or as botocore's names in client_kwargs.
    client_kwargs.setdefault("aws_access_key_id", options.get("key"))
    client_kwargs.setdefault("aws_secret_access_key", options.get("secret"))
    client_kwargs.setdefault("aws_session_token", options.get("token"))
    return session.create_client("s3", config=botocore.config.Config(**config), **client_kwargs)


class _PutBody(io.FileIO):
    """A staged file as a PUT body, read in 1 MiB blocks where urllib3 asks for 16 KiB
    (`HTTPConnection.blocksize`: it reads and sends a file body block by block). Profiled on
    the benchmark host (local -> S3, 256 MiB), those 16,384 reads and sends were the S3
    receiver's largest cost. urllib3 only loops `read(blocksize)` until b"" and sends what
    comes; botocore seeks the body back to 0 before a retry."""

    def read(self, size: int | None = -1) -> bytes:
        if size == 0:
            return b""  # read(0) asks for nothing
        if size is not None and size > 0:
            size = max(size, _READ_PIECE_BYTES)
        return super().read(size)


def _file_crc32(path: Path | str) -> int:
    """The CRC-32 of a staged file whose chunks' CRCs are not all known (staged before a
    restart, or linked in)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            crc = zlib.crc32(block, crc)
    return crc


def _check_range(out: dict[str, Any], start: int, size: int) -> None:
    """A ranged GET's answer is the range asked for (206, its Content-Range), not a store
    ignoring the Range with the whole object (200)."""
    status = out.get("ResponseMetadata", {}).get("HTTPStatusCode")
    want = f"bytes {start}-{start + size - 1}/"
    if status != 206 or not str(out.get("ContentRange") or "").startswith(want):
        with suppress(Exception):
            out["Body"].close()
        raise OSError(
            f"the store answered a GET of {want[6:-1]} with {status} "
            f"{out.get('ContentRange') or '(no Content-Range)'}"
        )


def _os_error(exc: Exception, path: str) -> OSError:
    """botocore's error as the OSError the commit path reports; raised `from` it, so its HTTP
    status still classifies it (`failures.http_status`)."""
    if isinstance(exc, OSError):
        return exc
    return OSError(f"{path}: {exc}")


def _internal(name: str) -> bool:
    return name == MANIFEST or ".transferd-" in name.rsplit("/", 1)[-1]
