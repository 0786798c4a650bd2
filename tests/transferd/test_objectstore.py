"""The object-store backend's commit protocol on a real S3 endpoint (moto's server): a folder is
visible only once its manifest object is written; a crash between objects and manifest leaves
nothing visible and start-up reclaims the objects; a store that fails the start-up check is a
ConfigError naming the step and the reason."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import threading
import time
import zlib
from pathlib import Path

import pytest

from transferd.errors import ConfigError, IntegrityError, StorageError
from transferd.protocol.upload import upload_intent
from transferd.site import objectstore
from transferd.site.checkpoints import update_run
from transferd.site.failures import http_status
from transferd.site.journal import Journal
from transferd.site.keys import Keyring, keygen
from transferd.site.metrics import Metrics
from transferd.site.objectstore import MANIFEST, ObjectStorage
from transferd.site.receiver import Receiver
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
    real_put = store._put_local
    calls: list[str] = []

    def put_then_fail(local: Path | str, path: str, crc32: int | None = None) -> None:
        calls.append(path)
        if len(calls) > 1:  # the first object lands, the second is refused
            raise PermissionError(13, "Access Denied")
        real_put(local, path, crc32)

    monkeypatch.setattr(store, "_put_local", put_then_fail)
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


def _slots_back(store: ObjectStorage) -> bool:
    """Every byte of window room of the store's fetcher is free again (within 5 s: a dropped
    window's GET gives its room back when it ends)."""
    budget = store._fetcher.budget
    with budget._cond:
        return budget._cond.wait_for(lambda: budget.held == 0, 5)


def _asking(fetcher: objectstore._Fetcher) -> int:
    """How many windows' GETs wait for a slot."""
    return len(fetcher.budget._cond._waiters)  # type: ignore[attr-defined]


def test_a_window_slot_goes_to_the_window_read_next_even_when_later_ones_asked_first(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot held by windows fetched ahead of the reader, and the later windows' GETs
    asking for a slot before the one the reader needs next (pool threads race): the slot the
    reader frees goes to the window it reads next. Handed out in the order asked, the later
    windows took every slot, which they keep until read, after the window the reader waited
    for a slot for a minute (a sender's job stood still: test_s3_kill's flaky hang)."""
    monkeypatch.setattr(objectstore, "_HELD_BYTES", 4 * 5000)  # room for 4 of the 8 windows
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    blobs = {f"approved/o/s{i}.bin": bytes([i]) * 5000 for i in range(8)}
    for rel, data in blobs.items():
        store.fs.pipe_file(store.path(rel), data)
    fetcher = store._fetcher
    held: list[tuple[concurrent.futures.Future[bool], object, tuple[object, ...]]] = []

    class HeldPool:  # the fetcher's pool, running each window's GET when the test says
        def submit(self, fn: object, *args: object) -> concurrent.futures.Future[bool]:
            held.append((concurrent.futures.Future(), fn, args))
            return held[-1][0]

    fetcher._pool = HeldPool()  # type: ignore[assignment]
    sources = [store.open_source(rel) for rel in blobs]  # windows 0-7, one per object

    def run(i: int) -> None:
        future, fn, args = held[i]
        future.set_running_or_notify_cancel()
        future.set_result(fn(*args))  # type: ignore[operator]

    gets = {i: threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)}
    try:
        for i in range(4):  # windows 0-3 take every slot
            gets[i].start()
            gets[i].join(5)
        for waiting, i in enumerate((7, 6, 5, 4), start=1):  # the later ones ask first
            gets[i].start()
            with fetcher.budget._cond:
                assert fetcher.budget._cond.wait_for(lambda n=waiting: _asking(fetcher) == n, 5)
        assert bytes(sources[0].read(0, 5000)) == blobs["approved/o/s0.bin"]  # frees a slot
        gets[4].join(5)
        assert not gets[4].is_alive()  # window 4 got it and landed
        assert all(gets[i].is_alive() for i in (5, 6, 7))  # still waiting their turn
        for i, rel in enumerate(blobs):
            assert bytes(sources[i].read(0, 5000)) == blobs[rel]
            if i < 4:
                gets[i + 4].join(5)
        assert [h[0].result(0) for h in held] == [True] * 8  # every one read from its window
    finally:
        for source in sources:
            source.close()
    assert _slots_back(store)


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
    assert _slots_back(store)  # every window's room came back


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


def _uploads(s3: MotoS3Server, bucket: str, prefix: str) -> list[str]:
    """Keys of the multipart uploads begun and neither completed nor aborted."""
    listed = s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(u["Key"] for u in listed.get("Uploads", []))


BIG = 6 * 1024 * 1024  # over _STREAM_MIN_BYTES: streamed while the transfer runs


def test_a_member_streamed_during_the_transfer_shows_only_when_the_folder_commits(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    store.commit(_staged(store, {"big.bin": b"old" * 3}), "approved/d")
    new = random.Random(7).randbytes(BIG)
    staging = _staged(store, {"big.bin": new, "small.bin": b"s"})
    store.member_staged(staging, "approved/d", 0)
    store.member_staged(staging, "approved/d", 1)  # small: goes in one PUT at commit
    store.member_staged(staging, "approved/d", 0)  # told twice: streamed once
    streamed = store._streamed[staging.dir.name].members
    assert list(streamed) == [0]
    streamed[0].result()
    # Streamed, not visible: readers still see the old version whole.
    assert _uploads(moto_s3, s3_bucket, "data/approved/d") == ["data/approved/d/big.bin"]
    assert store.list_source("approved/d") == ("folder", [("big.bin", 9)])
    assert store.read_range("approved/d/big.bin", 0, 9) == b"old" * 3
    store.commit(staging, "approved/d")
    assert store.list_source("approved/d") == ("folder", [("big.bin", BIG), ("small.bin", 1)])
    assert store.read_range("approved/d/big.bin", 0, BIG) == new
    assert _uploads(moto_s3, s3_bucket, "data/") == []
    assert list((tmp_path / "state" / "object-commits").iterdir()) == []


def test_a_single_file_streamed_is_completed_at_commit(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(8).randbytes(BIG)
    staging = _staged(store, {"": data})
    store.member_staged(staging, "approved/f.bin", 0)
    store._streamed[staging.dir.name].members[0].result()
    assert not store.exists("approved/f.bin")
    store.commit(staging, "approved/f.bin")
    assert store.read_range("approved/f.bin", 0, BIG) == data
    assert _uploads(moto_s3, s3_bucket, "data/") == []


def test_a_given_up_upload_aborts_what_it_streamed(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    staging = _staged(store, {"a.bin": bytes(BIG), "b.bin": bytes(BIG)})
    store.member_staged(staging, "approved/d", 0)
    store.member_staged(staging, "approved/d", 1)
    streamed = store._streamed[staging.dir.name].members
    store.discard_staged(staging)
    for future in streamed.values():
        future.result()
    store._member_pool.submit(lambda: None).result()  # after the abort queued behind them

    def clean() -> bool:
        return _uploads(moto_s3, s3_bucket, "data/") == [] and not list(
            (tmp_path / "state" / "object-commits").iterdir()
        )

    deadline = time.monotonic() + 10
    while not clean() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert clean()
    assert _keys(moto_s3, s3_bucket, "data/") == []


def test_a_crash_mid_streaming_keeps_the_old_folder_and_restart_aborts_the_uploads(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Killed while members were streaming: nothing new is visible, the old version (here
    one another tool wrote, with no manifest) keeps every object, and start-up aborts the
    multipart uploads."""
    state = tmp_path / "state"
    store = _store(moto_s3, s3_bucket, state)
    moto_s3.client().put_object(Bucket=s3_bucket, Key="data/approved/d/old.bin", Body=b"o")
    staging = _staged(store, {"old.bin": bytes(BIG), "new.bin": bytes(BIG)})
    store.member_staged(staging, "approved/d", 0)
    store.member_staged(staging, "approved/d", 1)
    for future in store._streamed[staging.dir.name].members.values():
        future.result()
    assert len(_uploads(moto_s3, s3_bucket, "data/approved/d")) == 2
    # The process dies here: a new one starts on the same state dir.
    restarted = _store(moto_s3, s3_bucket, state)
    assert _uploads(moto_s3, s3_bucket, "data/") == []
    assert _keys(moto_s3, s3_bucket, "data/approved/d") == ["data/approved/d/old.bin"]
    assert restarted.list_source("approved/d") == ("folder", [("old.bin", 1)])
    assert list((state / "object-commits").iterdir()) == []


def test_members_streamed_into_a_new_folder_read_as_absent_until_its_manifest(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """A folder that did not exist: members are PUT at their keys as they are staged (one
    request each), the folder reads as absent until the commit writes its manifest, and a
    crash before that leaves objects that start-up deletes."""
    state = tmp_path / "state"
    store = _store(moto_s3, s3_bucket, state)
    data = random.Random(9).randbytes(BIG)
    for attempt in ("crashed", "committed"):
        staging = _staged(store, {"a.bin": data})
        store.member_staged(staging, "checkpoints/r/step-1", 0)
        store._streamed[staging.dir.name].members[0].result()
        assert _keys(moto_s3, s3_bucket, "data/checkpoints/r/step-1") == [
            "data/checkpoints/r/step-1/a.bin"
        ]
        assert not store.exists("checkpoints/r/step-1")
        assert store.list_dir("checkpoints/r") == []
        if attempt == "crashed":
            store = _store(moto_s3, s3_bucket, state)  # a new process on the same state dir
            assert _keys(moto_s3, s3_bucket, "data/checkpoints") == []
            continue
        store.commit(staging, "checkpoints/r/step-1")
    assert store.list_source("checkpoints/r/step-1") == ("folder", [("a.bin", BIG)])
    assert store.read_range("checkpoints/r/step-1/a.bin", 0, BIG) == data
    assert list((state / "object-commits").iterdir()) == []


def test_polling_an_unchanged_folder_costs_one_request(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """What a sync route's poll sends to the store, counted in the server's request log: an
    unchanged folder costs one request (a HEAD of the manifest, or one listing of a folder
    another tool wrote), and a change is seen at the next poll."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    client = moto_s3.client()
    store.commit(_staged(store, {"a.bin": b"aa", "sub/b.bin": b"b"}), "approved/ours")
    for i in range(30):
        client.put_object(Bucket=s3_bucket, Key=f"data/approved/theirs/p-{i:02d}.bin", Body=b"t")

    def poll(rel: str) -> tuple[tuple[list[tuple[str, int]], float] | None, list[str]]:
        before = len(moto_s3.requests(s3_bucket))
        state = store.folder_state(rel)
        return state, moto_s3.requests(s3_bucket)[before:]

    first, _ = poll("approved/ours")
    assert first is not None
    assert first[0] == [("a.bin", 2), ("sub/b.bin", 1)]
    again, sent = poll("approved/ours")
    assert again == first
    assert sent == [f"HEAD /{s3_bucket}/data/approved/ours/{MANIFEST} HTTP/1.1"]

    theirs, _ = poll("approved/theirs")
    assert theirs is not None
    assert len(theirs[0]) == 30
    again, sent = poll("approved/theirs")
    assert again == theirs
    assert len(sent) == 1
    assert sent[0].startswith(f"GET /{s3_bucket}?list-type=2")

    # Changes are seen: a new version of ours (a new manifest), a new object in theirs.
    store.commit(_staged(store, {"a.bin": b"aaa"}), "approved/ours")
    changed, _ = poll("approved/ours")
    assert changed is not None
    assert changed[0] == [("a.bin", 3)]
    client.put_object(Bucket=s3_bucket, Key="data/approved/theirs/p-99.bin", Body=b"new")
    grown, _ = poll("approved/theirs")
    assert grown is not None
    assert ("p-99.bin", 3) in grown[0]
    # The same answers as the calls a poll made before (exists, list_source, newest_mtime).
    for rel in ("approved/ours", "approved/theirs"):
        assert store.folder_state(rel) == (store.list_source(rel)[1], store.newest_mtime(rel))
    assert store.folder_state("approved/none") is None


def test_a_put_carries_the_crc_of_the_staged_chunks_and_an_unsigned_body(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The CRC-32 combined from the chunks as they were staged goes in a signed header (no
    pass over the file, no SHA-256 of the body before the first byte); the store keeps it and
    a GET checks the object against it."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    assert store.stage_crc32
    data = random.Random(5).randbytes(3 * 65536 + 5)
    staging = Staging(
        store.staging_root / "u1", "folder", ["a.bin"], [len(data)], crc32=store.stage_crc32
    )
    staging.create()
    for off in range(0, len(data), 65536):
        staging.write(0, off, data[off : off + 65536])
    sent: list[dict[str, str]] = []
    store._client().meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_kw: sent.append({k.lower(): str(v) for k, v in request.headers.items()}),
    )
    store.commit(staging, "approved/crc")
    put = [h for h in sent if "x-amz-checksum-crc32" in h]
    assert len(put) == 1
    expected = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert expected in put[0]["x-amz-checksum-crc32"]
    assert "UNSIGNED-PAYLOAD" in put[0]["x-amz-content-sha256"]
    head = moto_s3.client().head_object(
        Bucket=s3_bucket, Key="data/approved/crc/a.bin", ChecksumMode="ENABLED"
    )
    assert head["ChecksumCRC32"] == expected


def test_a_large_object_is_read_in_windows_as_they_land_and_a_replaced_one_reads_as_changed(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(objectstore, "_WINDOW_BYTES", 10_000)
    monkeypatch.setattr(objectstore, "_READ_PIECE_BYTES", 3_000)
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(6).randbytes(45_678)  # 5 windows, the last short
    store.fs.pipe_file(store.path("curated/big.bin"), data)
    source = store.open_source("curated/big.bin")
    try:
        read = b""
        for offset in range(0, len(data), 4_096):  # spans that cross window edges
            read += bytes(source.read(offset, min(4_096, len(data) - offset)))
        assert read == data
        for offset, length in [(9_990, 30), (100, 50), (45_000, 678)]:  # again: own GETs
            assert bytes(source.read(offset, length)) == data[offset : offset + length]
        before = len(moto_s3.requests(s3_bucket))
        assert not source.changed()
        assert len(moto_s3.requests(s3_bucket)) == before  # no request: GETs were If-Match
        store.fs.pipe_file(store.path("curated/big.bin"), b"another version" * 100)
        with pytest.raises(IntegrityError, match="changed while being sent") as changed:
            source.read(0, 10)
        assert not changed.value.transient
        assert source.changed()
    finally:
        source.close()
    assert _slots_back(store)  # every window's room came back


def test_options_only_s3fs_understands_keep_the_s3fs_path(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """`s3_additional_kwargs` is s3fs's (no botocore client is made from it): commits, streamed
    members and reads all go through s3fs, which applies it to every PUT."""
    options = {
        **moto_s3.storage_options,
        "s3_additional_kwargs": {"Metadata": {"written-by": "s3fs-path"}},
    }
    state = tmp_path / "state"
    store = open_storage(False, state, f"s3://{s3_bucket}/fb", options, state)
    assert isinstance(store, ObjectStorage)
    assert store._client() is None
    assert not store.stage_crc32
    big = random.Random(8).randbytes(BIG)
    store.commit(_staged(store, {"big.bin": b"old"}), "approved/f")
    staging = _staged(store, {"big.bin": big, "small.bin": b"s"})
    store.member_staged(staging, "approved/f", 0)  # over an existing folder: multipart
    store._streamed[staging.dir.name].members[0].result()  # the upload runs in a pool thread
    assert _uploads(moto_s3, s3_bucket, "fb/approved/f") == ["fb/approved/f/big.bin"]
    store.commit(staging, "approved/f")
    assert store.list_source("approved/f") == ("folder", [("big.bin", BIG), ("small.bin", 1)])
    for name in ("big.bin", "small.bin"):
        head = moto_s3.client().head_object(Bucket=s3_bucket, Key=f"fb/approved/f/{name}")
        assert head["Metadata"] == {"written-by": "s3fs-path"}
    source = store.open_source("approved/f/big.bin")
    try:
        got = b"".join(
            bytes(source.read(off, min(1 << 20, BIG - off))) for off in range(0, BIG, 1 << 20)
        )
        assert got == big
        assert not source.changed()
    finally:
        source.close()
    assert _uploads(moto_s3, s3_bucket, "fb/") == []



def test_opening_an_upload_of_a_folder_costs_one_listing_of_the_store(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The receiver checks which members change (their sizes at the destination) when an
    upload opens: on S3 one listing of the folder, counted in the server's request log, not a
    HEAD and a listing per member; a member already there at its size needs no space."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    store.commit(_staged(store, {"m00.bin": b"same"}), "approved/d")
    keygen(["A", "B"], tmp_path / "keys")
    journal = Journal(tmp_path / "journal.sqlite")
    receiver = Receiver("B", store, journal, Keyring.load(tmp_path / "keys", "B", ["A"]),
                        Metrics(), retention=3)  # fmt: skip
    members = [(f"m{i:02d}.bin", 4) for i in range(8)]
    intent = upload_intent("A-open-0001", "A", "B", "approved/d", "folder", members)
    before = len(moto_s3.requests(s3_bucket))
    assert receiver.open(intent, "A", now=1.0) is False
    during = moto_s3.requests(s3_bucket)[before:]
    assert len(during) == 1, during
    assert "list-type=2" in during[0]
    assert store.sizes(["approved/d/m00.bin", "approved/d/m01.bin"]) == [4, None]
    receiver.close()
    journal.close()


def test_windows_held_stay_within_the_byte_budget_and_are_granted_in_the_order_opened(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sources of 5 windows each, room for two windows: the first source's first two are
    fetched (not a later source's, though 8 GETs may run), nothing more until the reader takes
    them; reading all three in order returns every byte with one GET per window, and the bytes
    held never exceed the budget."""
    monkeypatch.setattr(objectstore, "_WINDOW_BYTES", 10_000)
    monkeypatch.setattr(objectstore, "_HELD_BYTES", 25_000)
    monkeypatch.setattr(objectstore, "_READ_PIECE_BYTES", 3_000)
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    datas = [random.Random(20 + i).randbytes(45_678) for i in range(3)]
    for i, data in enumerate(datas):
        store.fs.pipe_file(store.path(f"curated/o{i}.bin"), data)
    budget = store._fetcher.budget
    gets: list[str] = []
    store._client().meta.events.register(
        "before-send.s3.GetObject", lambda request, **_kw: gets.append(request.url)
    )
    sources = [store.open_source(f"curated/o{i}.bin") for i in range(3)]
    try:
        windows = [w for source in sources for w in source._windows]  # type: ignore[attr-defined]
        assert len(windows) == 15
        deadline = time.monotonic() + 10
        while not all(w.got == w.size for w in windows[:2]) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for a third window would be taken by now
        assert [w.granted for w in windows] == [True, True] + [False] * 13
        assert budget.held == 20_000
        for source, data in zip(sources, datas, strict=True):
            read = b"".join(
                bytes(source.read(off, min(4_096, len(data) - off)))
                for off in range(0, len(data), 4_096)
            )
            assert read == data
        assert budget.peak <= 25_000
        assert len(gets) == 15, gets  # no span needed a GET of its own
    finally:
        for source in sources:
            source.close()
    assert budget.held == 0


def test_a_window_reads_its_body_to_the_end_so_the_store_crc_is_checked() -> None:
    """The body is read into the window and then to its end: botocore checks the CRC the store
    keeps only there, and a body longer than asked for is an error, not a silent truncation."""
    from botocore.exceptions import FlexibleChecksumError
    from botocore.httpchecksum import Crc32Checksum, StreamingChecksumBody

    data = random.Random(9).randbytes(7_000)

    def body(crc_of: bytes) -> StreamingChecksumBody:
        expected = base64.b64encode(zlib.crc32(crc_of).to_bytes(4, "big")).decode()
        return StreamingChecksumBody(io.BytesIO(data), len(data), Crc32Checksum(), expected)

    window = objectstore._Window(0, len(data))
    window.feed(body(data))
    assert bytes(window.span(0, len(data)) or b"") == data
    with pytest.raises(objectstore._ChecksumMismatch) as mismatch:
        objectstore._Window(0, len(data)).feed(body(data[:-1] + b"x"))
    assert isinstance(mismatch.value.__cause__, FlexibleChecksumError)
    assert mismatch.value.got != mismatch.value.expected
    with pytest.raises(OSError, match="more than"):
        objectstore._Window(0, 6_000).feed(io.BytesIO(data))


def test_sending_a_folder_from_s3_costs_one_listing_and_a_get_per_object(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """What the sender asks the store for a folder another tool wrote, counted in the server's
    request log: one listing (sizes and ETags), then one GET per object, no HEAD per member.
    An object replaced after the listing reads as changed, never as a mix of versions."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    client = moto_s3.client()
    data = {f"p-{i}.bin": random.Random(i).randbytes(1000 + i) for i in range(8)}
    for name, body in data.items():
        client.put_object(Bucket=s3_bucket, Key=f"data/approved/ds/{name}", Body=body)
    client.put_object(Bucket=s3_bucket, Key="data/approved/ds/empty/", Body=b"")  # a "folder"
    before = len(moto_s3.requests(s3_bucket))
    kind, members = store.list_source("approved/ds")
    assert (kind, members) == ("folder", [(n, len(b)) for n, b in sorted(data.items())])
    sources = [store.open_source(f"approved/ds/{n}") for n, _ in members]
    got = {n: bytes(s.read(0, s.size)) for (n, _), s in zip(members, sources, strict=True)}
    for source in sources:
        assert not source.changed()
        source.close()
    sent = moto_s3.requests(s3_bucket)[before:]
    assert got == data
    assert sum("list-type=2" in r for r in sent) == 1, sent
    assert sorted(r.split("?")[0].split(" HTTP")[0] for r in sent if "list-type" not in r) == [
        f"GET /{s3_bucket}/data/approved/ds/{n}" for n in sorted(data)
    ]

    store.list_source("approved/ds")
    client.put_object(Bucket=s3_bucket, Key="data/approved/ds/p-3.bin", Body=b"replaced")
    source = store.open_source("approved/ds/p-3.bin")
    with pytest.raises(IntegrityError, match="p-3.bin") as changed:
        source.read(0, source.size)
    assert not changed.value.transient
    assert source.changed()
    source.close()
    assert store.list_source("approved/ds/p-0.bin") == ("file", [("", len(data["p-0.bin"]))])
    with pytest.raises(StorageError, match="does not exist"):
        store.list_source("approved/none")


def test_a_window_buffer_is_reused_only_once_no_view_of_it_is_left() -> None:
    """A window's buffer goes back for reuse when its window is released, but a chunk still
    being sent holds a view of it: the next window gets another buffer until that view goes.
    Kept buffers count against the byte budget with the windows held."""
    budget = objectstore._Budget(64)
    buffers = objectstore._WindowBuffers(budget)
    first = buffers.take(16)
    first[:4] = b"sent"
    view = memoryview(first).toreadonly()[0:4]  # a chunk on its way
    buffers.give(first)
    second = buffers.take(16)
    assert second is not first
    second[:4] = b"next"
    assert bytes(view) == b"sent"
    view.release()
    assert buffers.take(8) is not first  # only a buffer of the size asked is reused
    assert buffers.take(16) is first
    budget.held = 60
    buffers.give(second)  # 16 more would pass the budget: freed, not kept
    budget.held = 0
    assert buffers.take(16) is not second


def _read_member(s3: MotoS3Server, bucket: str, rel: str, member: str) -> bytes:
    body: bytes = s3.client().get_object(Bucket=bucket, Key=f"data/{rel}/{member}")["Body"].read()
    return body


def test_two_uploads_of_one_folder_end_with_a_manifest_over_its_own_bytes(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Upload A streams straight into a new folder; upload B of the same folder commits while
    A runs; A then commits. Whichever manifest is visible, every member holds its version's
    bytes, and no stale manifest shows while A's commit runs."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    rel = "approved/ds"
    big = random.Random(1).randbytes(objectstore._STREAM_MIN_BYTES + 1)
    a = {"a.bin": big, "b.bin": b"A" * 20}
    st_a = _staged(store, a)
    store.member_staged(st_a, rel, 0)
    assert store._streamed[st_a.dir.name].direct
    store._streamed[st_a.dir.name].members[0].result()
    b = {"a.bin": b"B" * 50, "b.bin": b"b" * 20}
    store.commit(_staged(store, b), rel)
    assert all(_read_member(moto_s3, s3_bucket, rel, m) == d for m, d in b.items())
    seen: dict[str, object] = {}
    prune = store._verify_and_prune

    def spy(r: str, sizes: dict[str, int]) -> None:
        seen["manifest"] = store.manifest(r)
        prune(r, sizes)

    store._verify_and_prune = spy  # type: ignore[method-assign]
    store.commit(st_a, rel)
    assert seen["manifest"] is None  # B's manifest went before A's objects did
    doc = store.manifest(rel)
    assert doc is not None
    assert doc["upload"] == st_a.dir.name
    assert all(_read_member(moto_s3, s3_bucket, rel, m) == d for m, d in a.items())
    assert list(store.intents_dir.glob("*.json")) == []


def test_a_folder_found_absent_then_committed_is_not_streamed_into_as_new(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """An upload that found the folder absent and committed it without streaming: the next
    upload of that folder (within the freshness window) replaces it by multipart uploads, so the
    committed version stays whole while it runs."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    rel = "approved/ds"
    v1 = {"a.bin": b"A" * 100, "b.bin": b"B" * 100, "old.bin": b"O" * 10}
    assert store.sizes([f"{rel}/{m}" for m in v1]) == [None, None, None]
    store.commit(_staged(store, v1), rel)
    v2 = {"a.bin": random.Random(1).randbytes(objectstore._STREAM_MIN_BYTES + 1), "b.bin": b"b2"}
    assert store.sizes([f"{rel}/{m}" for m in v2]) == [100, 100]
    st2 = _staged(store, v2)
    store.member_staged(st2, rel, 0)
    streamed = store._streamed[st2.dir.name]
    assert not streamed.direct
    streamed.members[0].result()
    assert store.list_source(rel)[1] == [("a.bin", 100), ("b.bin", 100), ("old.bin", 10)]
    assert _read_member(moto_s3, s3_bucket, rel, "a.bin") == v1["a.bin"]
    store.commit(st2, rel)
    assert store.list_source(rel)[1] == [("a.bin", len(v2["a.bin"])), ("b.bin", 2)]


def test_a_span_handed_to_a_reader_is_never_the_buffer_of_a_later_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window is released (and its buffer taken by the next window) just as a reader asks
    for a span: the reader gets the first window's bytes or none, never the next one's."""
    fetcher = objectstore._Fetcher(None)
    first = objectstore._Window(0, 8)
    first.granted = True
    first.feed(io.BytesIO(b"AAAAAAAA"), fetcher.buffers.take(8))
    real = memoryview
    got: dict[str, bytes | None] = {}

    def release_meanwhile(obj: object) -> memoryview:
        if threading.current_thread().name == "reader" and "done" not in got:
            got["done"] = None

            def reuse() -> None:
                fetcher.release(first)  # the reader's window is given back...
                later = objectstore._Window(8, 8)
                later.feed(io.BytesIO(b"BBBBBBBB"), fetcher.buffers.take(8))  # ...and reused

            other = threading.Thread(target=reuse)
            other.start()
            other.join(1)  # done at once unless the reader's hold on the window keeps it out
        return real(obj)  # type: ignore[arg-type]

    monkeypatch.setattr(objectstore, "memoryview", release_meanwhile, raising=False)

    def read() -> None:
        view = first.span(0, 8)
        got["view"] = None if view is None else bytes(view)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    reader.join(10)
    assert got["view"] in (b"AAAAAAAA", None)


def test_kept_window_buffers_and_windows_held_stay_within_the_byte_budget() -> None:
    """A large object's windows are released (their buffers kept), then small windows and
    another large object's are granted: every buffer mapped, held or kept, stays within the
    budget (main reused a 64 MiB buffer for a 1 KiB window and mapped 448 MiB of 256)."""
    mib = 1 << 20
    budget = objectstore._Budget(256 * mib)
    buffers = objectstore._WindowBuffers(budget)
    mapped: list[object] = []

    def window(size: int, timeout: float = 1) -> bool:
        if not budget.acquire(budget.ticket(), size, timeout):
            return False
        mapped.append(buffers.take(size))
        return True

    for _ in range(4):
        assert window(64 * mib)
    for buf in list(mapped):
        budget.release(64 * mib)
        buffers.give(buf)  # type: ignore[arg-type]
    mapped.clear()
    assert sum(len(b) for b in buffers._free) == 256 * mib
    for _ in range(4):
        assert window(1024)
    while window(64 * mib, timeout=0.1):
        pass
    held = sum(len(b) for b in mapped)  # type: ignore[arg-type]
    assert held == budget.held
    assert held + sum(len(b) for b in buffers._free) <= budget.limit


def test_only_empty_folder_markers_are_left_out_of_a_listing_and_a_put_body_reads_0_as_empty(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """A zero-byte key ending in "/" is a console's folder marker; one holding bytes is an
    object (a commit's verification must see it). `_PutBody.read(0)` asks for nothing."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="data/approved/m/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="data/approved/m/odd/", Body=b"bytes")
    found = store._find(store.path("approved/m"))
    assert sorted(found) == [f"{s3_bucket}/data/approved/m/odd/"]
    staged = tmp_path / "body.bin"
    staged.write_bytes(b"x" * 10)
    with objectstore._PutBody(staged) as body:
        assert body.read(0) == b""
        assert body.read(4) == b"x" * 10


def test_a_whole_object_is_read_from_the_socket_and_its_connection_serves_the_next_get(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-object GET is read straight from the socket into its window (no copy through
    urllib3), its CRC-32 checked, and its connection goes back to urllib3's pool: three
    objects read one after the other take one connection of the pool (moto answers
    `Connection: close`, so the pool opens its socket again; a store that keeps connections
    alive gets the same socket). The 3 MiB object's reads wait for 256 KiB at a time
    (SO_RCVLOWAT) until near its end, where a read asking past the body would otherwise
    wait for bytes that never come (60 s, then a failure)."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    readers: list[str] = []
    real = objectstore._body_reader

    def spy(body: object, size: int) -> objectstore._BodyReader:
        made = real(body, size)
        readers.append(type(made).__name__)
        return made

    monkeypatch.setattr(objectstore, "_body_reader", spy)
    sizes = [20_000, 3 * 1024 * 1024 + 7, 300_001]  # the 3 MiB one: reads with a low mark
    objects = {f"curated/{i}.bin": random.Random(i).randbytes(n) for i, n in enumerate(sizes)}
    for rel, data in objects.items():
        store._client().put_object(Bucket=s3_bucket, Key=f"data/{rel}", Body=data)  # CRC-32
    for rel, data in objects.items():
        source = store.open_source(rel)
        try:
            assert bytes(source.read(0, len(data))) == data
            assert not source.changed()
        finally:
            source.close()
    assert readers == ["_SocketBody"] * 3
    endpoint = store._client().meta.endpoint_url
    pool = store._client()._endpoint.http_session._manager.connection_from_url(endpoint)
    assert pool.num_connections == 1


class _CutAfter:
    """A socket file that ends (EOF) after `left` more bytes: a store closing mid-body."""

    def __init__(self, fp: io.BufferedReader, left: int) -> None:
        self.fp, self.left = fp, left

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            return 0
        n = self.fp.readinto(memoryview(b)[: self.left])
        self.left -= n
        return n

    def close(self) -> None:
        self.fp.close()


@pytest.mark.parametrize("damage", ["crc mismatch", "body cut short"])
def test_a_get_failing_after_handing_out_bytes_fails_the_read_for_a_retry_never_its_last_piece(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:  # fmt: skip
    """A window's GET whose CRC-32 does not match, or whose body ends early, after some of its
    pieces were handed to the reader: the window's last piece is never handed out, nor read
    through a GET of its own (no checksum on a range): the read raises a transient
    IntegrityError, as `changed()` does (the sender checks it after every batch, before any
    commit: the job fails cleanly and is tried again). A fresh read (the retry) gets the
    object whole and checked."""
    monkeypatch.setattr(objectstore, "_READ_PIECE_BYTES", 3_000)
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(11).randbytes(20_000)
    store._client().put_object(Bucket=s3_bucket, Key="data/curated/x.bin", Body=data)
    damaged: list[bool] = []

    def spoil(http_response: object, **_: object) -> None:
        if damaged:
            return  # the first GET only
        damaged.append(True)
        raw = http_response.raw  # type: ignore[attr-defined]
        if damage == "crc mismatch":
            wrong = (zlib.crc32(data) ^ 1).to_bytes(4, "big")
            raw.headers["x-amz-checksum-crc32"] = base64.b64encode(wrong).decode()
        else:
            raw._fp.fp = _CutAfter(raw._fp.fp, 10_000)

    gets: list[str | None] = []
    store._client().meta.events.register(
        "before-call.s3.GetObject",
        lambda params, **_: gets.append(params["headers"].get("Range")),  # type: ignore[misc]
    )
    store._client().meta.events.register("after-call.s3.GetObject", spoil)
    source = store.open_source("curated/x.bin")
    try:
        read = b""

        def read_in_order() -> None:  # as the sender reads
            nonlocal read
            for offset in range(0, len(data), 1000):
                read += bytes(source.read(offset, 1000))

        with pytest.raises(IntegrityError, match="GET failed") as failed:
            read_in_order()
        assert failed.value.transient
        assert damaged
        # Never the window's last piece (18,000-20,000); none at all if the GET failed
        # before the reader's first read (the source is known bad by then).
        assert len(read) <= 18_000
        assert read == data[: len(read)]
        assert gets == [None]  # the window's GET (no Range), no ranged GET of its own
        with pytest.raises(IntegrityError, match="GET failed") as again_failed:
            source.changed()
        assert again_failed.value.transient
    finally:
        source.close()
    again = store.open_source("curated/x.bin")
    try:
        assert bytes(again.read(0, len(data))) == data
        assert not again.changed()
    finally:
        again.close()


def test_a_windows_last_piece_waits_for_the_end_of_body_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes handed out before a body's CRC-32 is known are all but the window's last piece:
    when the check fails, that piece never shows (a reader waiting for it gets None)."""
    from botocore.httpchecksum import Crc32Checksum, StreamingChecksumBody

    monkeypatch.setattr(objectstore, "_READ_PIECE_BYTES", 3_000)
    data = random.Random(12).randbytes(7_000)
    wrong = base64.b64encode((zlib.crc32(data) ^ 1).to_bytes(4, "big")).decode()
    window = objectstore._Window(0, len(data))
    with pytest.raises(Exception, match="checksum"):
        window.feed(StreamingChecksumBody(io.BytesIO(data), len(data), Crc32Checksum(), wrong))
    assert 0 < window.got < len(data)
    window.fail()
    assert window.span(0, len(data)) is None


def _get_ranges(store: ObjectStorage, damage: object) -> list[str | None]:
    """The Range of every GET `store`'s client makes (None: a whole object), in order;
    `damage(count, range, http_response, parsed)` runs on each answer."""
    ranges: list[str | None] = []

    def sent(params: dict[str, object], context: dict[str, object], **_: object) -> None:
        context["test_range"] = params["headers"].get("Range")  # type: ignore[attr-defined]
        ranges.append(context["test_range"])  # type: ignore[arg-type]

    def answered(
        http_response: object, parsed: dict[str, object], context: dict[str, object], **_: object
    ) -> None:
        damage(len(ranges), context["test_range"], http_response, parsed)  # type: ignore[operator]

    store._client().meta.events.register("before-call.s3.GetObject", sent)
    store._client().meta.events.register("after-call.s3.GetObject", answered)
    return ranges


def test_a_ranged_window_cut_mid_body_reads_its_spans_again_and_the_source_is_unchanged(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window of a large object is a range (no checksum covers it): its GET cut short after
    handing out bytes leaves those bytes as good as any ranged read's, and the reader GETs the
    rest of its spans, as before windows were checked. The source does not read as changed:
    one dropped connection does not fail a large job (on s3g it raised from `changed()`)."""
    monkeypatch.setattr(objectstore, "_WINDOW_BYTES", 10_000)
    monkeypatch.setattr(objectstore, "_READ_PIECE_BYTES", 3_000)
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(13).randbytes(45_678)
    store._client().put_object(Bucket=s3_bucket, Key="data/curated/big.bin", Body=data)

    def cut_second_window(count: int, rng: str | None, http_response: object, _p: object) -> None:
        if rng == "bytes=10000-19999" and count <= 5:
            raw = http_response.raw  # type: ignore[attr-defined]
            raw._fp.fp = _CutAfter(raw._fp.fp, 4_000)

    ranges = _get_ranges(store, cut_second_window)
    source = store.open_source("curated/big.bin")
    try:
        read = b""
        for offset in range(0, len(data), 1000):
            read += bytes(source.read(offset, min(1000, len(data) - offset)))
        assert read == data
        assert not source.changed()
    finally:
        source.close()
    spans = [r for r in ranges if r and r.startswith("bytes=1") and r != "bytes=10000-19999"]
    assert spans
    assert all(r.startswith("bytes=1") for r in spans)
    assert _slots_back(store)


def test_a_one_piece_object_failing_its_checksum_is_never_read_unchecked_and_the_third_is_final(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A 200,000-byte object (one window of one piece: no byte handed out before the check)
    whose GET body has one bit flipped every time: no read of it returns bytes, none goes
    through a ranged GET of its own (no checksum there: on s3g it returned the damaged bytes),
    each mismatch is logged with the path, the ETag and both checksums, and the third in a row
    of that ETag is an IntegrityError that is not transient. A good body starts the count
    again."""
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(14).randbytes(200_000)
    etag = store._client().put_object(Bucket=s3_bucket, Key="data/curated/x.bin", Body=data)[
        "ETag"]  # fmt: skip
    flipping = [True]

    def flip(_count: int, _rng: str | None, http_response: object, _p: object) -> None:
        if flipping[0]:
            raw = http_response.raw  # type: ignore[attr-defined]
            raw._fp.fp = _FlipAt(raw._fp.fp, 123_456)

    ranges = _get_ranges(store, flip)
    caplog.set_level("WARNING", logger="transferd.storage")

    def attempt() -> IntegrityError:
        source = store.open_source("curated/x.bin")
        try:
            with pytest.raises(IntegrityError, match="checksum") as failed:
                source.read(0, len(data))
            with pytest.raises(IntegrityError):
                source.changed()
            return failed.value
        finally:
            source.close()

    assert [attempt().transient for _ in range(3)] == [True, True, False]
    assert ranges == [None, None, None]  # whole-object GETs only
    mismatches = [r for r in caplog.records if r.getMessage() == "storage.checksum_mismatch"]
    assert len(mismatches) == 3
    fields = mismatches[0].fields  # type: ignore[attr-defined]
    assert fields["path"].endswith("data/curated/x.bin")
    assert fields["etag"] == etag
    assert fields["store"] == f"crc32 {zlib.crc32(data):08x}" != fields["got"]
    flipping[0] = False
    source = store.open_source("curated/x.bin")
    try:
        assert bytes(source.read(0, len(data))) == data
        assert not source.changed()
    finally:
        source.close()
    flipping[0] = True
    assert attempt().transient  # counted from one again


class _FlipAt:
    """A socket file that flips one bit of the byte at `at`."""

    def __init__(self, fp: io.BufferedReader, at: int) -> None:
        self.fp, self.at, self.pos = fp, at, 0

    def readinto(self, b: memoryview) -> int:
        view = memoryview(b)
        n = self.fp.readinto(view)
        if self.pos <= self.at < self.pos + n:
            view[self.at - self.pos] ^= 0x01
        self.pos += n
        return n

    def read(self, amt: int | None = None) -> bytes:
        data = bytearray(self.fp.read(amt) if amt is not None else self.fp.read())
        if self.pos <= self.at < self.pos + len(data):
            data[self.at - self.pos] ^= 0x01
        self.pos += len(data)
        return bytes(data)

    def __getattr__(self, name: str) -> object:  # flush, fileno, ...: the socket file's
        return getattr(self.fp, name)


def test_a_store_ignoring_the_range_is_an_error_never_the_wrong_bytes(
    moto_s3: MotoS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ranged GET answered 200 with the whole object (a store ignoring Range): neither the
    window nor the span's own GET publishes those bytes; the read fails as a transient
    StorageError naming what the store answered."""
    monkeypatch.setattr(objectstore, "_WINDOW_BYTES", 10_000)
    store = _store(moto_s3, s3_bucket, tmp_path / "state")
    data = random.Random(15).randbytes(25_000)
    store._client().put_object(Bucket=s3_bucket, Key="data/curated/r.bin", Body=data)

    def as_200(_count: int, _rng: str | None, _h: object, parsed: dict[str, object]) -> None:
        parsed["ResponseMetadata"]["HTTPStatusCode"] = 200  # type: ignore[index]
        parsed.pop("ContentRange", None)

    _get_ranges(store, as_200)
    source = store.open_source("curated/r.bin")
    try:
        with pytest.raises(StorageError, match="answered a GET of 10000-10099 with 200") as e:
            source.read(10_000, 100)
        assert e.value.transient
    finally:
        source.close()


def test_only_a_412_answer_reads_as_a_changed_source_not_412_in_an_error_text() -> None:
    """A body cut at 4,120,000 bytes says "412" in its text: the source has not changed (on
    s3g it read as changed, and the job failed for good); a 412 answer (If-Match refused)
    has."""
    from botocore.exceptions import ClientError

    source = objectstore.ObjectSource(None, "b/k", listed=(10, '"e"'))
    source.note_failure(OSError("the store sent 4120000 of 67108864 bytes"))
    assert not source._changed
    refused = ClientError(
        {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}},
        "GetObject",
    )
    source.note_failure(refused)
    assert source._changed
    assert http_status(refused) == 412
