"""The object-store backend's commit protocol on a real S3 endpoint (moto's server): a folder is
visible only once its manifest object is written; a crash between objects and manifest leaves
nothing visible and start-up reclaims the objects; a store that fails the start-up check is a
ConfigError naming the step and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transferd.errors import ConfigError, StorageError
from transferd.site.checkpoints import update_run
from transferd.site.objectstore import MANIFEST, ObjectStorage
from transferd.site.staging import Staging
from transferd.site.storage import open_storage
from transferd.testing import MotoS3Server, staged_upload


def _store(s3: MotoS3Server, bucket: str, state: Path) -> ObjectStorage:
    made = open_storage(False, state, f"s3://{bucket}/data", s3.storage_options, state)
    assert isinstance(made, ObjectStorage)
    return made


def _staged(store: ObjectStorage, files: dict[str, bytes]) -> Staging:
    return staged_upload(store.staging_root, files)


def _killed_mid_commit(store: ObjectStorage, rel: str, member: str) -> None:
    """What a receiver killed mid-commit leaves: the intent, an object, no manifest."""
    store._begin(rel, "upload-killed")
    store.fs.pipe_file(store.path(f"{rel}/{member}"), b"half")


def _keys(s3: MotoS3Server, bucket: str, prefix: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_a_folder_commit_writes_its_manifest_last_and_lists_from_it(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    store.commit(_staged(store, {"a.bin": b"aa", "sub/b.bin": b"b"}), "approved/d")
    doc = json.loads(
        moto_s3.client()
        .get_object(Bucket=s3_bucket, Key=f"data/approved/d/{MANIFEST}")["Body"]
        .read()
    )
    assert [(m["path"], m["size"]) for m in doc["members"]] == [("a.bin", 2), ("sub/b.bin", 1)]
    # An object another tool drops into the folder is not a member: the manifest is the truth.
    moto_s3.client().put_object(Bucket=s3_bucket, Key="data/approved/d/stray.bin", Body=b"x")
    assert store.list_source("approved/d") == ("folder", [("a.bin", 2), ("sub/b.bin", 1)])


def test_a_crash_between_objects_and_manifest_leaves_nothing_visible_and_restart_reclaims(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    store = _store(moto_s3, s3_bucket, state)
    store.commit(_staged(store, {"w.bin": b"one"}), "checkpoints/run1/step-1")
    store.write_text_atomic("checkpoints/run1/LATEST", "step-1\n")
    _killed_mid_commit(store, "checkpoints/run1/step-2", "w.bin")
    assert not store.exists("checkpoints/run1/step-2")
    assert not store.is_dir("checkpoints/run1/step-2")
    assert store.list_dir("checkpoints/run1") == ["LATEST", "step-1"]
    with pytest.raises(StorageError, match="does not exist"):
        store.list_source("checkpoints/run1/step-2")
    assert update_run(store, "checkpoints/run1", 3, lambda _rel: None) == "step-1"

    restarted = _store(moto_s3, s3_bucket, state)  # start-up reclaims
    assert _keys(moto_s3, s3_bucket, "data/checkpoints/run1/step-2") == []
    assert restarted.read_text("checkpoints/run1/LATEST") == "step-1\n"
    assert list((state / "object-commits").iterdir()) == []


def test_a_crash_before_a_replacement_started_keeps_the_old_folder(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    store = _store(moto_s3, s3_bucket, state)
    store.commit(_staged(store, {"a.bin": b"v1"}), "approved/d")
    _killed_mid_commit(store, "approved/d", "new.bin")
    restarted = _store(moto_s3, s3_bucket, state)
    assert restarted.list_source("approved/d") == ("folder", [("a.bin", 2)])
    assert _keys(moto_s3, s3_bucket, "data/approved/d") == [
        f"data/approved/d/{MANIFEST}",
        "data/approved/d/a.bin",
    ]


def test_a_failed_upload_leaves_the_folder_absent_and_no_objects(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    real_put = store.fs.put

    def put_then_fail(lpaths: list[str], rpaths: list[str], **kwargs: object) -> None:
        real_put(lpaths[:1], rpaths[:1], **kwargs)
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(store.fs, "put", put_then_fail)
    with pytest.raises(StorageError, match="committing checkpoints/r/step-9 failed: Access Denied"):
        store.commit(_staged(store, {"a.bin": b"a", "b.bin": b"b"}), "checkpoints/r/step-9")
    assert not store.exists("checkpoints/r/step-9")
    assert _keys(moto_s3, s3_bucket, "data/checkpoints") == []


def test_retention_removes_the_manifest_and_every_object_of_old_steps(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    for step in (1, 2, 3):
        store.commit(_staged(store, {"w.bin": b"w" * step}), f"checkpoints/r/step-{step}")
    removed: list[str] = []
    assert update_run(store, "checkpoints/r", 2, removed.append) == "step-3"
    assert removed == ["checkpoints/r/step-1"]
    assert _keys(moto_s3, s3_bucket, "data/checkpoints/r/step-1") == []
    assert store.read_text("checkpoints/r/LATEST") == "step-3\n"


def test_a_missing_bucket_fails_the_start_up_check_naming_it(
    moto_s3: MotoS3Server, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"listing no-such-bucket.*does not exist"):
        _store(moto_s3, "no-such-bucket", tmp_path / "state")


def test_an_unreachable_endpoint_fails_the_start_up_check_with_the_reason(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    options = {
        **moto_s3.storage_options,
        "endpoint_url": "http://127.0.0.1:9",  # nothing listens there
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    with pytest.raises(ConfigError, match="start-up check .*Could not connect"):
        open_storage(False, tmp_path, f"s3://{s3_bucket}/data", options, tmp_path / "state")


def test_a_source_read_in_order_and_out_of_order_gives_the_objects_bytes(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes: 25 spans of 1,000, the last short
    store.fs.pipe_file(store.path("curated/x.bin"), data)
    source = store.open_source("curated/x.bin")
    try:
        assert source.size == len(data)
        read = b""
        for offset in range(0, len(data), 1000):  # as the sender reads: in order, read ahead
            with source.mapped(offset, min(1000, len(data) - offset)) as view:
                read += bytes(view)
        assert read == data
        for offset, length in [(24_000, 836), (5, 10), (12_000, 1000), (0, 0)]:
            with source.mapped(offset, length) as view:
                assert bytes(view) == data[offset : offset + length]
        assert not source.changed()
    finally:
        source.close()


def test_small_objects_arrive_whole_in_parallel_and_give_their_memory_back(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    blobs = {f"approved/d/s{i}.bin": bytes([i]) * (3000 + i) for i in range(7)}
    for rel, data in blobs.items():
        store.fs.pipe_file(store.path(rel), data)
    sources = {rel: store.open_source(rel) for rel in blobs}  # as the sender opens a folder
    try:
        for rel, source in sources.items():
            read = b""
            for offset in range(0, source.size, 1000):
                with source.mapped(offset, min(1000, source.size - offset)) as view:
                    read += bytes(view)
            assert read == blobs[rel]
        unread = [store.open_source(rel) for rel in blobs]  # opened, then closed unread
    finally:
        for source in [*sources.values()]:
            source.close()
    for source in unread:
        source.close()
    slots = store._whole_objects._slots
    acquired = [slots.acquire(timeout=5) for _ in range(4)]  # every slot came back
    assert acquired == [True] * 4


def test_the_readmes_s3_site_config_loads(tmp_path: Path) -> None:
    """The S3 site example in the README is a valid site config (an object-store data_dir with
    state_dir and storage_options)."""
    from transferd.config import load_config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Object stores as site storage") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", 8)]
    (tmp_path / "site.yaml").write_text(block, encoding="utf-8")
    config = load_config(tmp_path / "site.yaml")
    assert not config.data_dir_is_local
    assert config.storage_options["endpoint_url"].startswith("https://s3.")
    assert str(config.state_path) == "/var/lib/transferd/cloud-eu"
