"""Site storage: reading sources, staging incoming files, and committing them atomically.

Backends behind one small interface, chosen by data_dir: `LocalStorage` (a path: mmap reads,
pwrite staging on the same filesystem, fsync + rename commit), `FsspecStorage` (any fsspec URL:
staging on local disk in state_dir, then put to a partial name and move into place) and, for
object stores without rename (S3, GCS, Azure), `site.objectstore.ObjectStorage` (a manifest
object written last makes a folder visible). Staging and
commit never expose a partial file at the final path; OSError becomes StorageError here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import fsspec

from transferd.errors import PolicyViolation, StorageError
from transferd.protocol.policy import normalize_rel_path
from transferd.site.source import SourceFile
from transferd.site.staging import Staging, os_errors, storage_error

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "SiteStorage",
    "Source",
    "confine",
    "open_storage",
]


class Source(Protocol):
    size: int

    def mapped(self, offset: int, length: int) -> Any: ...
    def changed(self) -> bool: ...
    def close(self) -> None: ...


class _FsspecSource:
    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.size = int(fs.size(path))

    @contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        yield memoryview(self.fs.cat_file(self.path, start=offset, end=offset + length))

    def changed(self) -> bool:
        return int(self.fs.size(self.path)) != self.size

    def close(self) -> None:
        pass


class SiteStorage(Protocol):
    """What the daemon does with data_dir; every path is relative to it and starts with a tier.
    Both backends pass the same conformance tests (tests/transferd/test_storage_conformance.py)."""

    staging_root: Path  # local disk, where incoming files are staged before commit

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

    def read_range(self, rel: str, offset: int, length: int) -> bytes: ...
    def list_dir(self, rel: str) -> list[str]: ...
    def write_text_atomic(self, rel: str, text: str) -> None: ...
    def read_text(self, rel: str) -> str | None: ...
    def remove_tree(self, rel: str) -> None: ...
    def newest_mtime(self, rel: str) -> float: ...


def confine(root: Path, rel_path: str) -> Path:
    """The local path for `rel_path` under `root`, refusing symlinks that lead outside root.

    The path need not exist; its deepest existing ancestor is resolved (symlinks followed) and must
    stay under the resolved root.
    """
    rel = normalize_rel_path(rel_path)
    real_root = Path(os.path.realpath(root))
    candidate = real_root / rel
    resolved = Path(os.path.realpath(candidate))
    if resolved != real_root and real_root not in resolved.parents:
        raise PolicyViolation(f"path leads outside data_dir through a symlink: {rel!r}", path=rel)
    return candidate


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """data_dir on a local filesystem; staging lives inside it, so commit is one rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging_root = root / ".transferd" / "staging"
        with os_errors("creating data_dir", root):
            self.staging_root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return confine(self.root, rel)

    def check_path(self, rel: str) -> None:
        self.path(rel)

    def open_source(self, rel: str) -> Source:
        with os_errors(f"opening {rel}", rel):
            return SourceFile(str(self.path(rel)))

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        """('file', [('', size)]) or ('folder', [(member, size), ...]) in sorted order."""
        path = self.path(rel)
        with os_errors(f"listing {rel}", rel):
            if path.is_file():
                return "file", [("", path.stat().st_size)]
            if not path.is_dir():
                raise StorageError(f"{rel} does not exist at this site", path=rel)
            members: list[tuple[str, int]] = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    member = full.relative_to(path).as_posix()
                    self.path(f"{rel}/{member}")  # symlinks leading out are refused here
                    members.append((member, full.stat().st_size))
            if not members:
                raise StorageError(f"{rel} is an empty folder", path=rel)
            return "folder", sorted(members)  # by member path, as every backend lists them

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def commit(self, staging: Staging, rel: str) -> None:
        final = self.path(rel)
        with os_errors(f"committing {rel}", rel):
            staging.sync()
            staging.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            if staging.kind == "file":
                os.replace(staging.payload_path, final)
            else:
                for dirpath, _dirs, _files in os.walk(staging.payload_path):
                    _fsync_dir(Path(dirpath))
                old = staging.dir / "replaced"
                if final.exists():
                    os.rename(final, old)
                os.rename(staging.payload_path, final)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(final.parent)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with os_errors(f"reading {rel}", rel), open(self.path(rel), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def list_dir(self, rel: str) -> list[str]:
        with os_errors(f"listing {rel}", rel), suppress(FileNotFoundError):
            return sorted(os.listdir(self.path(rel)))
        return []

    def is_dir(self, rel: str) -> bool:
        return self.path(rel).is_dir()

    def write_text_atomic(self, rel: str, text: str) -> None:
        final = self.path(rel)
        tmp = final.with_name(f".{final.name}.transferd-tmp")
        with os_errors(f"writing {rel}", rel):
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)

    def read_text(self, rel: str) -> str | None:
        with os_errors(f"reading {rel}", rel), suppress(FileNotFoundError):
            return self.path(rel).read_text(encoding="utf-8")
        return None

    def remove_tree(self, rel: str) -> None:
        path = self.path(rel)
        with os_errors(f"removing {rel}", rel):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

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

    def __init__(self, url: str, storage_options: dict[str, Any], state_dir: Path) -> None:
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ValueError, ImportError, OSError) as exc:
            raise StorageError(f"data_dir {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.staging_root = state_dir / "staging"
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> str:
        return f"{self.root}/{normalize_rel_path(rel)}"

    def check_path(self, rel: str) -> None:
        normalize_rel_path(rel)

    def open_source(self, rel: str) -> Source:
        with os_errors(f"opening {rel}", rel):
            return _FsspecSource(self.fs, self.path(rel))

    def list_source(self, rel: str) -> tuple[str, list[tuple[str, int]]]:
        path = self.path(rel)
        with os_errors(f"listing {rel}", rel):
            if self.fs.isfile(path):
                return "file", [("", int(self.fs.size(path)))]
            found = self.fs.find(path, detail=True)
        members = []
        for name, info in sorted(found.items()):
            member = name[len(path) :].lstrip("/")
            if ".." in member.split("/"):
                raise PolicyViolation(f"member escapes {rel}: {member!r}", path=rel)
            members.append((member, int(info["size"])))
        if not members:
            raise StorageError(f"{rel} does not exist at this site", path=rel)
        return "folder", members

    def exists(self, rel: str) -> bool:
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
        except OSError as exc:
            try:
                if self.fs.exists(partial):
                    self.fs.rm(partial, recursive=True)
            except OSError:
                pass  # the original failure is the one to report
            raise storage_error(f"committing {rel}", exc, rel) from exc

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with os_errors(f"reading {rel}", rel):
            return bytes(self.fs.cat_file(self.path(rel), start=offset, end=offset + length))

    def list_dir(self, rel: str) -> list[str]:
        with os_errors(f"listing {rel}", rel), suppress(FileNotFoundError):
            listed = self.fs.ls(self.path(rel), detail=False)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return []

    def is_dir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.path(rel)))

    def write_text_atomic(self, rel: str, text: str) -> None:
        final = self.path(rel)
        tmp = f"{final}.transferd-tmp"
        with os_errors(f"writing {rel}", rel):
            self.fs.pipe_file(tmp, text.encode())
            self.fs.mv(tmp, final)

    def read_text(self, rel: str) -> str | None:
        with os_errors(f"reading {rel}", rel), suppress(FileNotFoundError):
            return bytes(self.fs.cat_file(self.path(rel))).decode()
        return None

    def remove_tree(self, rel: str) -> None:
        with os_errors(f"removing {rel}", rel):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)

    def newest_mtime(self, rel: str) -> float:
        newest = 0.0
        for info in self.fs.find(self.path(rel), detail=True).values():
            # Each filesystem names it differently: local "mtime", S3 "LastModified", memory
            # "created" (its files are never modified in place).
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            newest = max(newest, float(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime))
        return newest


def open_storage(
    data_dir_is_local: bool, data_path: Path, url: str, options: dict[str, Any], state_dir: Path
) -> SiteStorage:
    """The backend for data_dir: a local path, an object store (no rename: commits through a
    manifest object, `site.objectstore`), or any other fsspec URL. A store reached over the
    network is checked once here (list, write, read, delete a probe object): ConfigError."""
    if data_dir_is_local:
        return LocalStorage(data_path)
    from transferd.site.objectstore import OBJECT_STORE_PROTOCOLS, ObjectStorage

    if urlsplit(url).scheme in OBJECT_STORE_PROTOCOLS:
        store = ObjectStorage(url, options, state_dir)
        store.probe()
        store.reclaim()
        return store
    return FsspecStorage(url, options, state_dir)
