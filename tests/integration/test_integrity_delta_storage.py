"""A byte flipped in flight is caught and repaired; a second checkpoint that shares 9 of 10
shards sends about a tenth of the bytes; a full disk at the receiver fails the job cleanly."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._data import file_blake3, write_random
from transferd.testing import (
    CappedFileSystem,
    LinkProxy,
    loopback_pair,
    mounted_tmpfs,
    wait_for_jobs,
)

CHUNK = 256 * 1024
CONTROL_BYTES = 64 * 1024


async def test_byte_flipped_in_flight_is_detected_refetched_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "site-A" / "approved" / "model.bin"
    digest = write_random(src, 8 * CHUNK, seed=7)
    # Past every control message, inside the first chunk body of a bulk connection.
    proxy = LinkProxy(flip_at=CHUNK // 2)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("approved/model.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert proxy.flipped == 1
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "approved" / "model.bin") == digest
    assert job.integrity_failures == 1
    assert job.chunks_sent == 8  # every chunk arrived once, intact
    assert b.metrics.value("transferd_integrity_failures_total", peer="A", side="receiver") == 1


async def test_second_checkpoint_sharing_nine_of_ten_shards_sends_a_tenth(tmp_path: Path) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "run7"
    for shard in range(10):
        write_random(run / "step-100" / f"shard-{shard:02d}.bin", 4 * CHUNK, seed=shard)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [first_id] = a.sender.submit("checkpoints/run7/step-100", ["B"])
        [first] = await wait_for_jobs(a, [first_id])
        shutil.copytree(run / "step-100", run / "step-200")
        changed = write_random(run / "step-200" / "shard-03.bin", 4 * CHUNK, seed=99)
        [second_id] = a.sender.submit("checkpoints/run7/step-200", ["B"])
        [second] = await wait_for_jobs(a, [second_id])
    assert (first.state, second.state) == ("committed", "committed")
    # Chunk bodies, plus the have/want, manifest and commit bodies (a few KiB).
    assert 40 * CHUNK <= first.bytes_on_wire < 40 * CHUNK + CONTROL_BYTES
    assert 4 * CHUNK <= second.bytes_on_wire < 4 * CHUNK + CONTROL_BYTES  # one shard of ten
    assert second.chunks_skipped == 36
    dst = tmp_path / "site-B" / "checkpoints" / "run7"
    assert file_blake3(dst / "step-200" / "shard-03.bin") == changed
    for shard in range(10):
        name = f"shard-{shard:02d}.bin"
        assert file_blake3(dst / "step-200" / name) == file_blake3(run / "step-200" / name)
    assert (dst / "LATEST").read_text() == "step-200\n"


async def test_checkpoint_retention_keeps_the_newest_steps(tmp_path: Path) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "r"
    for step in (1, 2, 10):
        write_random(run / f"step-{step}" / "w.bin", CHUNK, seed=step)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, checkpoints={"retention": 2}) as (a, b):
        for step in (1, 2, 10):
            [job_id] = a.sender.submit(f"checkpoints/r/step-{step}", ["B"])
            [job] = await wait_for_jobs(a, [job_id])
            assert job.state == "committed"
    dst = tmp_path / "site-B" / "checkpoints" / "r"
    assert sorted(p.name for p in dst.iterdir()) == ["LATEST", "step-10", "step-2"]
    assert (dst / "LATEST").read_text() == "step-10\n"


async def test_disk_full_at_receiver_fails_the_job_clearly_with_no_partial_file(
    tmp_path: Path,
) -> None:
    CappedFileSystem.register()
    write_random(tmp_path / "site-A" / "curated" / "big.bin", 8 * CHUNK, seed=5)
    store = tmp_path / "site-B-store"
    store.mkdir()
    b_overrides = {
        "data_dir": f"transferd-capped://{store}",
        "state_dir": str(tmp_path / "site-B-state"),
        "storage_options": {"capacity_bytes": 3 * CHUNK},
    }
    async with loopback_pair(tmp_path, chunk_size=CHUNK, B=b_overrides) as (a, b):
        [job_id] = a.sender.submit("curated/big.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "failed"
    assert job.error_kind == "storage"
    assert "no space left" in (job.error or "")
    assert [p for p in store.rglob("*") if p.is_file()] == []
    assert list((tmp_path / "site-B-state" / "staging").iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """B's data_dir on a 2 MiB tmpfs (needs permission to mount; skipped otherwise)."""
    mount = tmp_path / "site-B"
    with mounted_tmpfs(mount, 2 * 1024 * 1024) as mounted:
        if not mounted:
            pytest.skip("needs permission to mount a tmpfs")
        yield mount


async def test_disk_full_on_a_small_tmpfs_fails_at_open_and_leaves_nothing(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    write_random(tmp_path / "site-A" / "curated" / "big.bin", 16 * CHUNK, seed=5)  # 4 MiB
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("curated/big.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "failed"
        assert job.error_kind == "storage"
        assert "no space left" in (job.error or "")
        assert not (small_tmpfs / "curated").exists()
        assert list(b.storage.staging_root.iterdir()) == []
