"""One set of storage tests that every `SiteStorage` backend must pass, as fsspec's abstract test
suites do for its filesystems: the local backend, the fsspec backend over a local URL and over
fsspec's in-memory filesystem, and the object-store backend on S3 (moto's S3 server on
127.0.0.1). A new backend joins by adding one entry to `BACKENDS`: a function from a temporary
folder (and the test's fixtures) to a fresh storage."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from transferd.errors import PolicyViolation, StorageError
from transferd.site.storage import FsspecStorage, LocalStorage, SiteStorage, open_storage
from transferd.testing import staged_upload


def _local(tmp: Path, request: pytest.FixtureRequest) -> SiteStorage:
    return LocalStorage(tmp / "data")


def _fsspec_file(tmp: Path, request: pytest.FixtureRequest) -> SiteStorage:
    return FsspecStorage(f"file://{tmp / 'data'}", {}, tmp / "state")


def _fsspec_memory(tmp: Path, request: pytest.FixtureRequest) -> SiteStorage:
    return FsspecStorage(f"memory://conformance-{uuid.uuid4().hex}/data", {}, tmp / "state")


def _s3(tmp: Path, request: pytest.FixtureRequest) -> SiteStorage:
    server = request.getfixturevalue("moto_s3")
    bucket = request.getfixturevalue("s3_bucket")
    url = f"s3://{bucket}/data"
    return open_storage(False, tmp, url, server.storage_options, tmp / "state")


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], SiteStorage]] = {
    "local": _local,
    "fsspec-file": _fsspec_file,
    "fsspec-memory": _fsspec_memory,
    "s3": _s3,
}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SiteStorage]:
    made = BACKENDS[request.param](tmp_path, request)
    yield made
    if isinstance(made, FsspecStorage) and "memory" in made.fs.protocol:
        top = made.root.rsplit("/", 1)[0]  # the store is process-wide
        if made.fs.exists(top):
            made.fs.rm(top, recursive=True)


def _commit(storage: SiteStorage, rel: str, files: dict[str, bytes]) -> None:
    """Stage `files` (one file under '' or folder members) and commit them at `rel`."""
    staging = staged_upload(storage.staging_root, files)
    storage.commit(staging, rel)
    staging.discard()


def test_a_committed_file_reads_back_whole_and_by_range(storage: SiteStorage) -> None:
    data = bytes(range(256)) * 64
    _commit(storage, "curated/x.bin", {"": data})
    assert storage.exists("curated/x.bin")
    assert not storage.is_dir("curated/x.bin")
    assert storage.list_source("curated/x.bin") == ("file", [("", len(data))])
    assert storage.read_range("curated/x.bin", 1000, 300) == data[1000:1300]
    source = storage.open_source("curated/x.bin")
    try:
        assert source.size == len(data)
        with source.mapped(4096, 100) as view:
            assert bytes(view) == data[4096:4196]
        assert not source.changed()
    finally:
        source.close()


def test_a_committed_folder_lists_its_members_in_order_and_nothing_partial(
    storage: SiteStorage,
) -> None:
    _commit(storage, "approved/d", {"b/inner.bin": b"22", "a.bin": b"1", "empty.txt": b""})
    assert storage.is_dir("approved/d")
    assert storage.list_source("approved/d") == (
        "folder",
        [("a.bin", 1), ("b/inner.bin", 2), ("empty.txt", 0)],
    )
    assert storage.list_dir("approved") == ["d"]  # no partial or temporary names left behind
    assert storage.list_dir("approved/d") == ["a.bin", "b", "empty.txt"]


def test_committing_a_folder_again_replaces_it_deletions_included(storage: SiteStorage) -> None:
    _commit(storage, "approved/d", {"old.bin": b"old", "kept.bin": b"v1"})
    _commit(storage, "approved/d", {"kept.bin": b"v2", "new.bin": b"new"})
    assert storage.list_source("approved/d") == ("folder", [("kept.bin", 2), ("new.bin", 3)])
    assert storage.read_range("approved/d/kept.bin", 0, 2) == b"v2"
    assert not storage.exists("approved/d/old.bin")


def test_text_files_are_written_atomically_and_read_back(storage: SiteStorage) -> None:
    _commit(storage, "checkpoints/run1/step-1", {"w.bin": b"w"})
    assert storage.read_text("checkpoints/run1/LATEST") is None
    storage.write_text_atomic("checkpoints/run1/LATEST", "step-1\n")
    storage.write_text_atomic("checkpoints/run1/LATEST", "step-2\n")
    assert storage.read_text("checkpoints/run1/LATEST") == "step-2\n"
    assert storage.list_dir("checkpoints/run1") == ["LATEST", "step-1"]


def test_remove_tree_removes_a_folder_and_missing_folders_list_empty(
    storage: SiteStorage,
) -> None:
    _commit(storage, "checkpoints/run1/step-1", {"w.bin": b"w"})
    storage.remove_tree("checkpoints/run1/step-1")
    assert not storage.exists("checkpoints/run1/step-1")
    assert storage.list_dir("checkpoints/run1/step-1") == []
    storage.remove_tree("checkpoints/run1/step-1")  # removing what is gone is not an error


def test_newest_mtime_moves_with_a_new_file(storage: SiteStorage) -> None:
    before = time.time()
    _commit(storage, "approved/d", {"a.bin": b"1"})
    first = storage.newest_mtime("approved/d")
    assert before - 2 <= first <= time.time() + 2  # a wall-clock time, like os.stat's
    time.sleep(0.02)
    _commit(storage, "approved/d", {"a.bin": b"1", "b.bin": b"2"})
    assert storage.newest_mtime("approved/d") > first


def test_a_missing_source_is_a_storage_error(storage: SiteStorage) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_source("curated/nothing-here")
    assert not storage.exists("curated/nothing-here")


@pytest.mark.parametrize(
    "rel", ["../outside.bin", "curated/../../x", "/etc/passwd", "datasets/x", "curated/\x00"]
)
def test_paths_outside_the_tiers_are_refused(storage: SiteStorage, rel: str) -> None:
    with pytest.raises(PolicyViolation):
        storage.check_path(rel)
    with pytest.raises(PolicyViolation):
        storage.exists(rel)
