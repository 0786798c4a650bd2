"""Site storage: reading sources, staging incoming files, and committing them atomically.

Backends behind one small interface, chosen by data_dir: `LocalStorage` (a path: pread reads,
pwrite staging on the same filesystem, fsync + rename commit), `FsspecStorage` (any fsspec URL:
staging on local disk in state_dir, then put to a partial name and move into place) and, for
object stores without rename (S3, GCS, Azure), `site.objectstore.ObjectStorage` (a manifest
object written last makes a folder visible). Staging and
commit never expose a partial file at the final path. A backend's failures (OSError, an HTTP
status, its network library's own kinds) become the job's errors through one classifier
(`site.failures.storage_failure`: gone, refused or transient, with the side they happened on).

On a local data_dir every path goes through `confine`, which applies the policy on where it
resolves (`protocol.policy.check_resolved`: symlinks are followed, and a path outside raw/ that
leads into raw/ or out of the tier folders is refused). A file opened to be sent is checked
again through its open descriptor (what is read is what was checked) and for hard links to
raw/ data; a commit renames into a parent directory opened and checked the same way.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import fsspec

from transferd.errors import ConfigError, PolicyViolation, StorageError
from transferd.protocol.policy import (
    check_not_raw_inode,
    check_resolved,
    normalize_rel_path,
    top_folder,
)
from transferd.site.failures import source_changed_error, storage_failure, storage_failures
from transferd.site.source import SourceFile
from transferd.site.staging import Staging, os_errors

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "SiteStorage",
    "Source",
    "confine",
    "exchange",
    "open_storage",
]

log = logging.getLogger("transferd.storage")


class Source(Protocol):
    size: int

    def mapped(self, offset: int, length: int) -> Any: ...
    def read(self, offset: int, length: int) -> bytes | memoryview:
        """The bytes at `offset`, the caller's to keep (nothing mapped or reused behind them:
        a fetched object's bytes come as they are, without a copy). Raises a TransferdError
        (`side="source"`) when they cannot be had (`failures.storage_failure`), or, from an object
        store, not checked; never a bare OSError or a library's own kind (the sender maps
        whatever else escapes to a StorageError: `sender._from_source`)."""
        ...

    def changed(self) -> bool:
        """Whether the source is no longer what was opened (the sender checks it after each
        batch it hashed, before any commit). May raise a TransferdError instead: an object
        store's source whose reads went unchecked (`objectstore.ObjectSource.changed`: a
        transient IntegrityError, or not transient once a version failed its checksum time
        after time); such errors carry `side="source"`, and the job is tried again without
        any route marked down."""
        ...

    def close(self) -> None: ...


class _LocalSource(SourceFile):
    """A local file to send. Read through the descriptor opened (a rename or a delete does not
    change what is read), so `changed` also says when the file lost its last name: removed or
    replaced while it was being sent, it is no longer what the site holds at that path."""

    def changed(self) -> bool:
        try:
            return super().changed() or os.fstat(self.fileno()).st_nlink == 0
        except OSError as exc:
            raise storage_failure("checking", self.path, exc, side="source") from exc

    def read(self, offset: int, length: int) -> bytes:
        try:
            return super().read(offset, length)
        except OSError as exc:
            raise storage_failure("reading", self.path, exc, side="source") from exc


class _FsspecSource:
    """A file behind an fsspec URL, read span by span (`cat_file` ranges). Its failures are the
    job's TransferdErrors (`failures.storage_failure`); a span that comes back short, or a file
    whose size or modification time moved, is a changed source."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        info = fs.info(path)
        self.size = int(info["size"])
        self.mtime = info_mtime(info)

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        yield memoryview(self.read(offset, length))

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = bytes(self.fs.cat_file(self.path, start=offset, end=offset + length))
        except Exception as exc:  # OSError, and the kinds of the backend's network library
            raise storage_failure("reading", self.path, exc, side="source") from exc
        if len(data) != length:
            raise source_changed_error(self.path, f"ends at {offset + len(data)}, inside a chunk")
        return data

    def changed(self) -> bool:
        try:
            info = self.fs.info(self.path)
        except Exception as exc:
            raise storage_failure("checking", self.path, exc, side="source") from exc
        return int(info["size"]) != self.size or info_mtime(info) != self.mtime

    def close(self) -> None:
        pass


class SiteStorage(Protocol):
    """What the daemon does with data_dir; every path is relative to it and starts with a tier.
    Both backends pass the same conformance tests (tests/transferd/test_storage_conformance.py)."""

    staging_root: Path  # local disk, where incoming files are staged before commit
    # Staged spans keep their CRC-32 (`Staging.crc32`): the commit uploads them with it.
    stage_crc32: bool

    def check_path(self, rel: str) -> None:
        """PolicyViolation when `rel` is not a clean tier path or would lead out of data_dir."""
        ...

    def open_source(self, rel: str) -> Source: ...

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        """('file', [('', size)]) or ('folder', [(member, size), ...]) in sorted order."""
        ...

    def exists(self, rel: str) -> bool: ...
    def is_dir(self, rel: str) -> bool: ...

    def commit(self, staging: Staging, rel: str) -> None:
        """Put a staged upload at `rel` atomically (a reader sees the old or the new, whole)."""
        ...

    def member_staged(self, staging: Staging, rel: str, index: int) -> None:
        """Member `index` of the upload to `rel` is staged whole and verified (called from a
        worker thread while the transfer runs): a backend whose commit must copy the bytes
        elsewhere may start now, as long as nothing shows before `commit`."""
        ...

    def discard_staged(self, staging: Staging) -> None:
        """The upload was given up: drop whatever `member_staged` started for it."""
        ...

    def read_range(self, rel: str, offset: int, length: int) -> bytes: ...

    def size(self, rel: str) -> int | None:
        """The size of the file at `rel`, None when there is no file there."""
        ...

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        """`size` of each of `rels` (an object store answers a folder's in one listing)."""
        ...

    def link_into(self, rel: str, staged: Path) -> None:
        """Put the committed file `rel` at the local staging path `staged` without copying
        when the backend can (a hard link), by copying otherwise."""
        ...

    def free_bytes(self) -> int:
        """Free space where uploads are staged."""
        ...

    def list_dir(self, rel: str) -> list[str]: ...
    def write_text_atomic(self, rel: str, text: str) -> None: ...
    def read_text(self, rel: str) -> str | None: ...
    def remove_tree(self, rel: str) -> None: ...
    def newest_mtime(self, rel: str) -> float: ...

    def folder_state(self, rel: str) -> tuple[list[tuple[str, int]], float] | None:
        """What a poll of `rel` compares: its members with sizes (as `list_source`) and its
        newest mtime; None when it does not exist. An object store answers an unchanged
        folder with one request."""
        ...


def folder_state(storage: SiteStorage, rel: str) -> tuple[list[tuple[str, int]], float] | None:
    """`SiteStorage.folder_state` from its other calls (a local or fsspec data_dir)."""
    if not storage.exists(rel):
        return None
    _kind, members = storage.list_source(rel)
    return members, storage.newest_mtime(rel)


def _relative(real_root: str, real: str) -> str | None:
    """`real` relative to `real_root` in POSIX form ("" for the root), None when outside."""
    if real == real_root:
        return ""
    prefix = real_root.rstrip(os.sep) + os.sep
    return real[len(prefix) :].replace(os.sep, "/") if real.startswith(prefix) else None


def confine(root: Path, rel_path: str, *, follow: bool = True) -> Path:
    """The local path of `rel_path` under `root`, after the policy on where it resolves.

    The path need not exist: the part that exists is resolved (symlinks followed). With
    `follow=False` only its parent is resolved: for acting on the entry itself (renaming onto
    it, removing it), which never goes through a link in the last component.
    """
    rel = normalize_rel_path(rel_path)
    real_root = os.path.realpath(root)
    candidate = Path(real_root) / rel
    if follow:
        check_resolved(rel, _relative(real_root, os.path.realpath(candidate)))
    elif "/" in rel:
        parent = rel.rsplit("/", 1)[0]
        check_resolved(parent, _relative(real_root, os.path.realpath(candidate.parent)))
    return candidate


def _fd_path(fd: int, fallback: Path) -> str:
    """Where an open file or directory really is (Linux: /proc/self/fd, immune to a link
    swapped after the open); elsewhere the resolved path it was opened by."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _load_renameat2() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(src: Path, dst_dir_fd: int, dst: str) -> bool:
    """Swap `src` and the entry `dst` in the folder `dst_dir_fd` in one step (Linux
    renameat2 RENAME_EXCHANGE): a reader sees the old or the new, never neither. False when
    this system or filesystem cannot; OSError for anything else."""
    if _renameat2 is None:
        return False
    rc = _renameat2(  # type: ignore[operator]
        _AT_FDCWD, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_EXCHANGE
    )
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SPECIAL_FILES = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_sendable(rel: str, mode: int) -> StorageError:
    """`rel` is neither a regular file nor a folder: what it is, refused by name."""
    kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "not a regular file")
    return StorageError(
        f"{rel} is {kind}: only regular files and folders are sent", path=rel, side="source"
    )


def check_utf8_name(rel: str, member: str) -> None:
    """A member's name must be UTF-8 text to be carried (manifests, requests and logs are
    JSON): one that is not (read with surrogate escapes) is refused, shown escaped. It used
    to reach the open request's JSON encoder, whose error ended the daemon."""
    try:
        member.encode()
    except UnicodeEncodeError:
        shown = f"{rel}/{os.fsencode(member).decode('utf-8', 'backslashreplace')}"
        raise StorageError(
            f"{shown}: the name is not UTF-8, which transferd cannot carry: rename it",
            path=shown, side="source",
        ) from None


def _source_stat(path: Path, rel: str, *, top: bool) -> os.stat_result:
    """The stat of what `path` leads to (links followed). A link to nothing, or a loop of
    links, is refused as such; a path that is not there is not at this site (`top`: the path
    a job was asked for) or was removed while it was listed (a member: the changed source)."""
    try:
        return path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP) and path.is_symlink():
            what = "a loop of links"
            if exc.errno == errno.ENOENT:
                with suppress(OSError):
                    what = f"a link to nothing (it points to {os.readlink(path)!r})"
            raise StorageError(f"{rel} is {what}", path=rel, side="source") from exc
        if top and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise StorageError(f"{rel} does not exist at this site", path=rel) from exc
        raise storage_failure("listing", rel, exc, side="source") from exc


class LocalStorage:
    """data_dir on a local filesystem; staging lives inside it, so commit is one rename."""

    stage_crc32 = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging_root = root / ".transferd" / "staging"
        self._warned_exchange = False
        with os_errors("creating data_dir", root):
            self.staging_root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str, *, follow: bool = True) -> Path:
        return confine(self.root, rel, follow=follow)

    def check_path(self, rel: str) -> None:
        self.path(rel)

    def open_source(self, rel: str) -> Source:
        """A file to send, checked through its open descriptor: where it really is, and
        whether its inode also has a name under raw/ (a hard link)."""
        path = self.path(rel)
        with storage_failures("opening", rel, side="source"):
            source = _LocalSource(str(path))
        try:
            if not stat.S_ISREG(source.mode):  # replaced since it was listed
                raise _not_sendable(rel, source.mode)
            real_root = os.path.realpath(self.root)
            check_resolved(rel, _relative(real_root, _fd_path(source.fileno(), path)))
            if source.nlink > 1:
                key = (source.dev, source.inode)
                check_not_raw_inode(rel, self._raw_names({key}).get(key))
        except BaseException:
            source.close()
            raise
        return source

    def _raw_names(self, inodes: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """A name under raw/ for each of `inodes` (device, inode) that has one. One walk of
        raw/ by directory entries (the inode number comes with readdir; only candidates are
        stat'ed), done only for files with more than one link."""
        found: dict[tuple[int, int], str] = {}
        numbers = {ino for _dev, ino in inodes}
        raw = Path(os.path.realpath(self.root)) / "raw"
        stack = [raw]
        while stack and len(found) < len(inodes):
            top = stack.pop()
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.inode() in numbers and entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) in inodes:
                            name = Path(entry.path).relative_to(raw).as_posix()
                            found[(st.st_dev, st.st_ino)] = f"raw/{name}"
                except OSError:
                    continue
        return found

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        """('file', [('', size)]) or ('folder', [(member, size), ...]) in sorted order.

        A folder is listed whole or not at all: a subfolder that cannot be read is the
        listing's error, not a folder sent without it (the receiver's copy would lose it at
        the commit). Links are followed, into subfolders too, each checked by the policy
        (`confine`); a link to nothing, a loop of links, a FIFO, a socket or a device is
        refused by name, before anything is opened (a FIFO's open would wait for a writer)."""
        path = self.path(rel)
        st = _source_stat(path, rel, top=True)
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                check_not_raw_inode(rel, self._raw_names({key}).get(key))
            return "file", [("", st.st_size)]
        if not stat.S_ISDIR(st.st_mode):
            raise _not_sendable(rel, st.st_mode)
        members: list[tuple[str, int]] = []
        linked: dict[tuple[int, int], str] = {}  # hard-linked members: checked for raw/
        for member, member_st in self._folder_files(path, rel, st):
            members.append((member, member_st.st_size))
            if member_st.st_nlink > 1:
                linked[(member_st.st_dev, member_st.st_ino)] = f"{rel}/{member}"
        if not members:
            raise StorageError(f"{rel} is an empty folder", path=rel)
        if linked and top_folder(rel) != "raw":
            for key, raw_name in self._raw_names(set(linked)).items():
                check_not_raw_inode(linked[key], raw_name)
        return "folder", sorted(members)  # by member path, as every backend lists them

    def _folder_files(self, path: Path, rel: str, st: os.stat_result
                      ) -> Iterator[tuple[str, os.stat_result]]:
        """Each regular file under the folder `path` (`rel`): its member path and its stat,
        links followed. A folder reached again below itself (a link to a folder it is in) is
        a loop, refused. A folder reached a second time anywhere else (two links to it, or
        `current -> v3` beside v3) is refused too, naming both: listed twice it became two
        copies at the receiver (and 16 levels of two links each, 65,536 copies of one file),
        listed once the receiver's copy would lack one of the two names."""
        top = (st.st_dev, st.st_ino)
        seen: dict[tuple[int, int], str] = {top: rel}  # every folder listed: its member path
        stack: list[tuple[str, frozenset[tuple[int, int]]]] = [("", frozenset({top}))]
        while stack:
            sub, above = stack.pop()
            with storage_failures("listing", f"{rel}/{sub}" if sub else rel, side="source"):
                with os.scandir(path / sub if sub else path) as found:
                    names = sorted(entry.name for entry in found)
            for name in names:
                member = f"{sub}/{name}" if sub else name
                check_utf8_name(rel, member)
                member_rel = f"{rel}/{member}"
                self.path(member_rel)  # links into raw/ or out are refused here
                member_st = _source_stat(path / member, member_rel, top=False)
                if stat.S_ISDIR(member_st.st_mode):
                    key = (member_st.st_dev, member_st.st_ino)
                    if key in above:
                        raise StorageError(
                            f"{member_rel} is a link to a folder it is in (a loop of links)",
                            path=member_rel, side="source")
                    if key in seen:
                        raise StorageError(
                            f"{seen[key]} and {member_rel} are one folder (reached twice through "
                            "links): send one of them, or replace a link by a copy",
                            path=member_rel, side="source")
                    seen[key] = member_rel
                    stack.append((member, above | {key}))
                elif stat.S_ISREG(member_st.st_mode):
                    yield member, member_st
                else:
                    raise _not_sendable(member_rel, member_st.st_mode)

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def commit(self, staging: Staging, rel: str) -> None:
        final = self.path(rel)
        parent_rel, _, name = normalize_rel_path(rel).rpartition("/")
        with os_errors(f"committing {rel}", rel):
            staging.sync()
            staging.close()
            parent = self._open_dir(parent_rel)
            try:
                if staging.kind == "file":
                    os.replace(staging.payload_path, name, dst_dir_fd=parent)
                else:
                    for dirpath, _dirs, _files in os.walk(staging.payload_path):
                        _fsync_dir(Path(dirpath))
                    self._swap_in(staging, parent, name, final)
                os.fsync(parent)
            finally:
                os.close(parent)

    def _swap_in(self, staging: Staging, parent: int, name: str, final: Path) -> None:
        """Put the staged folder at `name`: one exchange when something is there (a re-commit
        is never seen missing: a reader polling the folder, or LATEST naming a step, finds the
        old or the new), one rename when not. Where the filesystem cannot exchange, the old
        copy is renamed away first (a moment with neither; logged once)."""
        payload = staging.payload_path
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(payload, name, dst_dir_fd=parent)
            return
        if exchange(payload, parent, name):
            old = payload  # the exchange left the old copy where the new one was staged
        else:
            if not self._warned_exchange:
                self._warned_exchange = True
                log.warning(
                    "commit.no_exchange",
                    extra={"fields": {"path": str(final), "reason": "no renameat2 exchange"}},
                )
            old = staging.dir / "replaced"
            os.rename(name, old, src_dir_fd=parent)
            os.rename(payload, name, dst_dir_fd=parent)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)

    def _open_dir(self, rel_dir: str) -> int:
        """A descriptor of the folder `rel_dir` ("": data_dir), made if missing, after the
        policy on where the opened folder really is: a rename into it lands where was checked,
        whatever links change meanwhile."""
        real_root = os.path.realpath(self.root)
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(real_root, flags)
        try:
            for part in rel_dir.split("/") if rel_dir else []:
                try:
                    step = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    with suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    step = os.open(part, flags | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
                os.close(fd)
                fd = step
            if rel_dir:
                real = _fd_path(fd, Path(real_root) / rel_dir)
                check_resolved(rel_dir, _relative(real_root, real))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def member_staged(self, staging: Staging, rel: str, index: int) -> None:
        pass  # the commit is a rename: nothing to start early

    def discard_staged(self, staging: Staging) -> None:
        pass

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with (storage_failures("reading", rel, side="destination"),
              open(self.path(rel), "rb") as fh):
            fh.seek(offset)
            return fh.read(length)

    def size(self, rel: str) -> int | None:
        path = self.path(rel)
        with storage_failures("checking", rel, side="destination"):
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
        return st.st_size if path.is_file() else None

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        return [self.size(rel) for rel in rels]

    def link_into(self, rel: str, staged: Path) -> None:
        path = self.path(rel)
        with os_errors(f"keeping {rel}", rel):
            staged.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, staged)  # same filesystem: staging lives inside data_dir
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(path, staged)

    def free_bytes(self) -> int:
        with os_errors("checking free space", self.staging_root):
            return shutil.disk_usage(self.staging_root).free

    def list_dir(self, rel: str) -> list[str]:
        with os_errors(f"listing {rel}", rel), suppress(FileNotFoundError):
            return sorted(os.listdir(self.path(rel)))
        return []

    def is_dir(self, rel: str) -> bool:
        return self.path(rel).is_dir()

    def write_text_atomic(self, rel: str, text: str) -> None:
        self.path(rel)  # a link at `rel` itself is replaced, never written through
        parent_rel, _, name = normalize_rel_path(rel).rpartition("/")
        tmp = f".{name}.transferd-tmp"
        with os_errors(f"writing {rel}", rel):
            parent = self._open_dir(parent_rel)
            try:
                # A fresh file: never through a link or a second name left at the temp name.
                with suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=parent)
                with open(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
                os.fsync(parent)
            finally:
                os.close(parent)

    def read_text(self, rel: str) -> str | None:
        with os_errors(f"reading {rel}", rel), suppress(FileNotFoundError):
            return self.path(rel).read_text(encoding="utf-8")
        return None

    def remove_tree(self, rel: str) -> None:
        """Remove the file or folder at `rel`; a link there is removed itself, never what it
        points to."""
        path = self.path(rel, follow=False)
        with os_errors(f"removing {rel}", rel):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.is_symlink() or path.exists():
                path.unlink()

    def folder_state(self, rel: str) -> tuple[list[tuple[str, int]], float] | None:
        return folder_state(self, rel)

    def newest_mtime(self, rel: str) -> float:
        newest = 0.0
        for dirpath, _dirs, files in os.walk(self.path(rel)):
            for name in [*files, "."]:
                try:
                    newest = max(newest, os.stat(Path(dirpath) / name).st_mtime)
                except OSError:
                    continue
        return newest


class FsspecStorage:
    """data_dir at any fsspec URL; incoming files stage on local disk (state_dir), then are put
    under a partial name and moved into place, so readers never see a half-written file."""

    stage_crc32 = False

    def __init__(self, url: str, storage_options: dict[str, Any], state_dir: Path) -> None:
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as exc:
            raise StorageError(f"{url!r} needs a package that is not installed: {exc}") from exc
        except (ValueError, TypeError, OSError) as exc:
            known = ", ".join(sorted(fsspec.available_protocols())[:12])
            raise StorageError(
                f"{url!r}: {exc} (known protocols include: {known}, ...)"
                if "protocol" in str(exc).lower()
                else f"{url!r}: {exc}"
            ) from exc
        self.root = root.rstrip("/")
        self.staging_root = state_dir / "staging"
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> str:
        return f"{self.root}/{normalize_rel_path(rel)}"

    def check_path(self, rel: str) -> None:
        normalize_rel_path(rel)

    def open_source(self, rel: str) -> Source:
        try:
            return _FsspecSource(self.fs, self.path(rel))
        except Exception as exc:
            raise storage_failure("opening", rel, exc, side="source") from exc

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        path = self.path(rel)
        with storage_failures("listing", rel, side="source"):
            if self.fs.isfile(path):
                return "file", [("", int(self.fs.size(path)))]
            found = self.fs.find(path, detail=True)
        members = []
        for name, info in sorted(found.items()):
            member = name[len(path) :].lstrip("/")
            if ".." in member.split("/"):
                raise PolicyViolation(f"member escapes {rel}: {member!r}", path=rel)
            check_utf8_name(rel, member)
            members.append((member, int(info["size"])))
        if not members:
            raise StorageError(f"{rel} does not exist at this site", path=rel)
        return "folder", members

    def exists(self, rel: str) -> bool:
        with storage_failures("checking", rel, side="source"):
            return bool(self.fs.exists(self.path(rel)))

    def commit(self, staging: Staging, rel: str) -> None:
        final = self.path(rel)
        partial = f"{final}.transferd-partial-{staging.dir.name}"
        try:
            staging.sync()
            staging.close()
            parent = final.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            if staging.kind == "file":
                self.fs.put_file(str(staging.payload_path), partial)
                self.fs.mv(partial, final)
            else:
                self.fs.put(str(staging.payload_path), partial, recursive=True)
                if self.fs.exists(final):
                    self.fs.rm(final, recursive=True)
                self.fs.mv(partial, final, recursive=True)
        except Exception as exc:  # OSError, and the kinds of the backend's network library
            try:
                if self.fs.exists(partial):
                    self.fs.rm(partial, recursive=True)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
            err = storage_failure("committing", rel, exc, side="destination")
            if err is exc:
                raise
            raise err from exc

    def member_staged(self, staging: Staging, rel: str, index: int) -> None:
        pass  # staged on local disk and put at commit (object stores stream: ObjectStorage)

    def discard_staged(self, staging: Staging) -> None:
        pass

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with storage_failures("reading", rel, side="destination"):
            return bytes(self.fs.cat_file(self.path(rel), start=offset, end=offset + length))

    def size(self, rel: str) -> int | None:
        path = self.path(rel)
        with storage_failures("checking", rel, side="destination"):
            return int(self.fs.size(path)) if self.fs.isfile(path) else None

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        return [self.size(rel) for rel in rels]

    def link_into(self, rel: str, staged: Path) -> None:
        with storage_failures("keeping", rel, side="destination"):
            staged.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path(rel), str(staged))

    def free_bytes(self) -> int:
        with os_errors("checking free space", self.staging_root):
            return shutil.disk_usage(self.staging_root).free

    def list_dir(self, rel: str) -> list[str]:
        with storage_failures("listing", rel, side="destination"), suppress(FileNotFoundError):
            listed = self.fs.ls(self.path(rel), detail=False)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return []

    def is_dir(self, rel: str) -> bool:
        with storage_failures("checking", rel, side="destination"):
            return bool(self.fs.isdir(self.path(rel)))

    def write_text_atomic(self, rel: str, text: str) -> None:
        final = self.path(rel)
        tmp = f"{final}.transferd-tmp"
        with storage_failures("writing", rel, side="destination"):
            self.fs.pipe_file(tmp, text.encode())
            self.fs.mv(tmp, final)

    def read_text(self, rel: str) -> str | None:
        with storage_failures("reading", rel, side="destination"), suppress(FileNotFoundError):
            return bytes(self.fs.cat_file(self.path(rel))).decode()
        return None

    def remove_tree(self, rel: str) -> None:
        with storage_failures("removing", rel, side="destination"):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)

    def folder_state(self, rel: str) -> tuple[list[tuple[str, int]], float] | None:
        return folder_state(self, rel)

    def newest_mtime(self, rel: str) -> float:
        with storage_failures("listing", rel, side="source"):
            infos = self.fs.find(self.path(rel), detail=True).values()
        return max((info_mtime(info) for info in infos), default=0.0)


def info_mtime(info: dict[str, Any]) -> float:
    """The modification time in an fsspec listing entry. Each filesystem names it differently:
    local "mtime", S3 "LastModified", memory "created" (its files are never modified in place)."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return float(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def open_storage(
    data_dir_is_local: bool, data_path: Path, url: str, options: dict[str, Any], state_dir: Path
) -> SiteStorage:
    """The storage a site config names: a local path, an object store (no rename: commits
    through a manifest object, `site.objectstore`), or any other fsspec URL. A data_dir that
    cannot be used is a ConfigError naming `data_dir` (exit 2: the config is wrong, nothing
    failed to transfer); an object store is checked once here (list, write, read and delete a
    probe object), and what a crash left mid-commit is reclaimed."""
    try:
        if data_dir_is_local:
            if data_path.exists() and not data_path.is_dir():
                raise ConfigError(
                    f"data_dir: {data_path} is a file, not a folder", field="data_dir"
                )
            return LocalStorage(data_path)
        from transferd.site.objectstore import OBJECT_STORE_PROTOCOLS, ObjectStorage

        if urlsplit(url).scheme in OBJECT_STORE_PROTOCOLS:
            store = ObjectStorage(url, options, state_dir)
            store.probe()
            store.reclaim()
            return store
        return FsspecStorage(url, options, state_dir)
    except StorageError as exc:
        raise ConfigError(f"data_dir: {exc.message}", field="data_dir") from exc
