"""The staged files of one upload, written chunk by chunk at their offsets (pwrite, O_DIRECT
where aligned), fsync'ed before commit. A member file is made and its space reserved at full
size (posix_fallocate) when the first bytes for it arrive, so a full disk fails the upload at
that file's first chunk rather than mid-way, and a file that needs no new bytes (its
destination already holds them) costs no space at all.

With `crc32`, each written span's CRC-32 is kept as it is written (the bytes are in memory,
just verified), and `member_crc32` combines them into the whole file's: an object store's upload
then carries its checksum without a pass over the file before the first byte goes.

`os_errors` turns an OSError into a StorageError that says what failed and why (ENOSPC:
"no space left on the receiver's storage"), with its errno; every storage backend maps its
filesystem's errors through it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transferd.errors import StorageError

__all__ = ["Staging", "crc32_combine", "os_errors", "storage_error"]


@contextmanager
def os_errors(action: str, path: object) -> Iterator[None]:
    """An OSError inside the block is raised as the StorageError `storage_error` makes."""
    try:
        yield
    except OSError as exc:
        raise storage_error(action, exc, path) from exc


def storage_error(action: str, exc: OSError, path: object) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the receiver's storage"
    else:
        reason = exc.strerror or str(exc)
    return StorageError(f"{action} failed: {reason}", path=path, errno=exc.errno)


@dataclass
class Staging:
    """The staged files of one upload: `<dir>/file` or `<dir>/tree/<member>`, written by offset."""

    dir: Path
    kind: str
    members: list[str]
    sizes: list[int]
    _fds: dict[int, int] = field(default_factory=dict)
    _direct_fds: dict[int, int] = field(default_factory=dict)
    # O_DIRECT writes skip the page cache: no page allocation (very costly on VMs that back
    # guest memory lazily), no writeback left for the fsync at commit. Used for aligned chunks
    # from aligned buffers; anything else, or a filesystem that refuses it, writes buffered.
    direct: bool = hasattr(os, "O_DIRECT")
    # Writes run on worker threads while the upload may be given up (a full disk, an abort):
    # a discarded staging makes no file again, and its descriptors close when the last write
    # in flight is done (never under a write: the number could be reused by another file).
    # A committing upload's staging is sealed (`close`): a write still in flight (a chunk sent
    # again, its upload committed meanwhile) finishes before the descriptors close, and a
    # write after it is refused.
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _writing: int = 0
    _discarded: bool = False
    _sealed: bool = False
    # Keep the CRC-32 of every span written (member -> offset -> (length, crc)): the uploads of
    # an object store send it as their checksum (`member_crc32`).
    crc32: bool = False
    _crcs: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)

    def member_path(self, index: int) -> Path:
        return self.dir / "file" if self.kind == "file" else self.dir / "tree" / self.members[index]

    @property
    def payload_path(self) -> Path:
        return self.dir / "file" if self.kind == "file" else self.dir / "tree"

    def create(self) -> None:
        """Create (or find, after a restart) the upload's staging folder. Member files are
        made when their first bytes arrive (`reserve`)."""
        try:
            self.payload_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error("staging", exc, self.dir) from exc

    def exists(self, index: int) -> bool:
        """Member `index` has a staged file (some of its bytes arrived or were copied)."""
        return index in self._fds or self.member_path(index).exists()

    def reserve(self, index: int) -> None:
        """Make member `index` at its full size, its space reserved (StorageError: no space)."""
        try:
            with self._lock:
                self._live()
                self._fd(index)
        except OSError as exc:
            raise storage_error("staging", exc, self.dir) from exc

    def _live(self) -> None:
        if self._discarded:
            raise StorageError("the upload was given up", path=self.dir)

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            path = self.member_path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                size = self.sizes[index]
                if os.fstat(fd).st_size != size:
                    # The whole file's space now: a full disk fails at its first chunk.
                    if size and hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(fd, 0, size)
                    os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            self._fds[index] = fd
        return fd

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self.crc32:
            crc = zlib.crc32(view)  # releases the GIL; the bytes are still in the cache
            with self._lock:
                self._crcs.setdefault(index, {})[offset] = (len(view), crc)
        try:
            with self._lock:
                self._live()
                if self._sealed:
                    raise StorageError("the upload is committed", path=self.dir)
                self._writing += 1
                fd = self._fd(index)  # made and reserved at its first bytes
                direct = (
                    self._direct_fd(index) if self.direct and _direct_ok(offset, view) else None
                )
            try:
                if direct is not None:
                    try:
                        _pwrite_all(direct, view, offset)
                        return
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        self.direct = False  # alignment rules differ here: buffered from now on
                _pwrite_all(fd, view, offset)
            finally:
                with self._lock:
                    self._writing -= 1
                    if not self._writing:
                        if self._discarded:
                            self._close_fds()
                        self._lock.notify_all()
        except OSError as exc:
            raise storage_error("writing a chunk", exc, self.dir) from exc

    def member_crc32(self, index: int) -> int | None:
        """The CRC-32 of member `index` from the spans written by this process, or None when
        they do not tile it exactly (bytes staged before a restart, or linked in)."""
        with self._lock:
            spans = sorted(self._crcs.get(index, {}).items())
        crc, end = 0, 0
        for offset, (length, part) in spans:
            if offset != end:
                return None
            crc, end = crc32_combine(crc, part, length), end + length
        return crc if end == self.sizes[index] else None

    def _direct_fd(self, index: int) -> int | None:
        fd = self._direct_fds.get(index)
        if fd is None:
            try:
                fd = os.open(self.member_path(index), os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.direct = False  # e.g. tmpfs on older kernels
                return None
            self._direct_fds[index] = fd
        return fd

    def read(self, index: int, offset: int, length: int) -> bytes:
        try:
            with self._lock:  # a local copy: rare, and never under a closing descriptor
                self._live()
                return os.pread(self._fd(index), length, offset)
        except OSError as exc:
            raise storage_error("reading staged data", exc, self.dir) from exc

    def sync(self) -> None:
        """fsync every member file, making those no bytes were written to (empty files)."""
        try:
            with self._lock:
                self._live()
                for i in range(len(self.sizes)):
                    os.fsync(self._fd(i))
        except OSError as exc:
            raise storage_error("fsync of staged files", exc, self.dir) from exc

    def close(self) -> None:
        """Seal the staged files (the upload commits): writes in flight finish first (their
        descriptors are never closed under them), later writes are refused."""
        with self._lock:
            self._sealed = True
            self._lock.wait_for(lambda: not self._writing)
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()

    def discard(self) -> None:
        """Give the staged files back; writes still in flight finish on unlinked files."""
        with self._lock:
            self._discarded = True
            if not self._writing:
                self._close_fds()
        shutil.rmtree(self.dir, ignore_errors=True)


DIRECT_ALIGN = 4096
_CRC32_POLY = 0xEDB88320  # reflected CRC-32 (zlib, S3's x-amz-checksum-crc32)


def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The GF(2) matrix that advances a CRC-32 over `length` zero bytes (zlib's
    crc32_combine, composed once per length: chunks mostly share one size)."""
    odd = (_CRC32_POLY, *(1 << n for n in range(31)))  # one zero bit
    even = tuple(_gf2_times(odd, odd[n]) for n in range(32))  # two
    square = tuple(_gf2_times(even, even[n]) for n in range(32))  # four
    square = tuple(_gf2_times(square, square[n]) for n in range(32))  # one zero byte
    op: tuple[int, ...] = tuple(1 << n for n in range(32))  # identity
    while length:
        if length & 1:
            op = tuple(_gf2_times(square, op[n]) for n in range(32))
        length >>= 1
        if length:
            square = tuple(_gf2_times(square, square[n]) for n in range(32))
    return op


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from crc(A), crc(B) and len(B), as zlib's crc32_combine (which
    Python's zlib does not expose)."""
    if length2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(length2), crc1) ^ crc2


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _direct_ok(offset: int, view: memoryview) -> bool:
    if offset % DIRECT_ALIGN or len(view) % DIRECT_ALIGN or not len(view):
        return False
    if view.readonly:
        return False  # bytes objects: no way to learn the address, and rarely aligned
    anchor = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(anchor)
    del anchor  # drop the buffer export at once: the pool releases the view afterwards
    return address % DIRECT_ALIGN == 0
