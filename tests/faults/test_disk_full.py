"""A receiver that runs out of space: the job fails cleanly (a storage error that says so),
nothing partial is visible, the staging is given back at once, and the same send succeeds once
space is freed. Space is counted against what is missing: re-sending an unchanged file needs
none, a folder with one changed member needs that member's size. Abandoned uploads are
reclaimed by age at start-up, and a sender that comes back after that starts over."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import Tally
from tests.integration._data import file_blake3, tree_digests, write_random
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.testing import (
    FakeClock,
    LinkProxy,
    loopback_pair,
    mounted_tmpfs,
    running_daemon,
    wait_for_jobs,
)

CHUNK = 256 * 1024
MiB = 1024 * 1024
DISK_FULL = "disk-full cases"
FIGURE = DISK_FULL  # what a failure here counts against (conftest.tally)


@pytest.fixture
def tmpfs_b(tmp_path: Path) -> Iterator[Path]:
    """B's data_dir on a 10 MiB tmpfs (root only: mounting needs it; skipped otherwise)."""
    mount = tmp_path / "site-B"
    with mounted_tmpfs(mount, 10 * MiB) as mounted:
        if not mounted:
            pytest.skip("needs root to mount a small tmpfs for B's data_dir")
        yield mount


def fill(path: Path) -> None:
    """Take every byte left on the filesystem of `path`, as another writer would."""
    with pytest.raises(OSError, match="No space left") as full, open(path, "wb") as fh:  # noqa: PT012
        while True:
            fh.write(b"\0" * MiB)
            fh.flush()
    assert full.value.errno == errno.ENOSPC


async def until(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        for _ in range(int(timeout_s / 0.02) + 1):
            if done():
                return
            await asyncio.sleep(0.02)


def received(b: Daemon) -> float:
    return b.metrics.value("transferd_chunks_received_total", peer="A")


def staged(b: Daemon) -> list[str]:
    root = b.storage.staging_root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def test_disk_filling_mid_transfer_fails_cleanly_and_the_retry_succeeds(
    tmp_path: Path, tmpfs_b: Path, tally: Tally
) -> None:
    """Something else fills B's disk while a folder arrives: the job fails with 'no space', no
    partial file appears, B gives the staging back at once; with space freed, the same send
    goes through (it used to fail again on the leftover staging)."""
    src = tmp_path / "site-A" / "curated" / "ds"
    digests = {f"curated/ds/f{i}.bin": write_random(src / f"f{i}.bin", 2 * MiB, seed=i)
               for i in range(3)}
    proxy = LinkProxy(rate_bytes_per_s=4e6)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("curated/ds", ["B"])
        await until(lambda: received(b) >= 2)
        filler = tmpfs_b / "filler.bin"
        fill(filler)
        [job] = await wait_for_jobs(a, [job_id], timeout_s=60)
        failed_cleanly = (
            job.state == "failed"
            and job.error_kind == "storage"
            and "no space left" in (job.error or "")
        )
        # The abort and the receiver's own failure give the staging back.
        with contextlib.suppress(TimeoutError):
            await until(lambda: staged(b) == [], timeout_s=5)
        nothing_partial = not (tmpfs_b / "curated").exists()
        reclaimed = staged(b) == []
        filler.unlink()
        proxy.rate_bytes_per_s = None
        [again] = await wait_for_jobs(a, a.sender.submit("curated/ds", ["B"]), timeout_s=60)
        exact = tree_digests(tmpfs_b) == digests
    tally(DISK_FULL, failed_cleanly and nothing_partial and reclaimed)
    tally(DISK_FULL, again.state == "committed" and exact)
    assert failed_cleanly, (job.state, job.error)
    assert nothing_partial
    assert reclaimed
    assert again.state == "committed", again.error
    assert exact


async def test_resending_an_unchanged_file_needs_no_space(
    tmp_path: Path, tmpfs_b: Path, tally: Tally
) -> None:
    """A 7 MiB file on a 10 MiB disk, sent again unchanged: nothing moves and nothing is
    staged (it used to fail: the staging was reserved at the file's full size)."""
    digest = write_random(tmp_path / "site-A" / "approved" / "m.bin", 7 * MiB, seed=1)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [first] = await wait_for_jobs(a, a.sender.submit("approved/m.bin", ["B"]), 60)
        assert first.state == "committed", first.error
        inode = (tmpfs_b / "approved" / "m.bin").stat().st_ino
        [again] = await wait_for_jobs(a, a.sender.submit("approved/m.bin", ["B"]), 60)
        ok = (
            again.state == "committed"
            and again.chunks_sent == 0
            and file_blake3(tmpfs_b / "approved" / "m.bin") == digest
            and staged(b) == []
        )
    tally(DISK_FULL, ok)
    assert again.state == "committed", again.error
    assert again.chunks_sent == 0
    assert again.bytes_on_wire < 64 * 1024  # have/want and commit bodies only
    assert again.chunks_skipped == again.chunks
    assert (tmpfs_b / "approved" / "m.bin").stat().st_ino == inode  # kept, not rewritten
    assert file_blake3(tmpfs_b / "approved" / "m.bin") == digest


async def test_a_folder_with_one_changed_member_needs_only_that_members_space(
    tmp_path: Path, tmpfs_b: Path, tally: Tally
) -> None:
    """7 MiB of a 10 MiB disk hold the folder (about 2 MiB stay free); one 1 MiB member
    changes: the new tree links the unchanged members and stages only the changed one (a full
    copy of the folder would not fit)."""
    src = tmp_path / "site-A" / "approved" / "ds"
    for i, size in enumerate((2, 2, 2, 1)):
        write_random(src / f"m{i}.bin", size * MiB, seed=10 + i)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        [first] = await wait_for_jobs(a, a.sender.submit("approved/ds", ["B"]), 60)
        assert first.state == "committed", first.error
        write_random(src / "m3.bin", MiB, seed=99)
        [second] = await wait_for_jobs(a, a.sender.submit("approved/ds", ["B"]), 60)
        exact = all(
            file_blake3(tmpfs_b / "approved" / "ds" / f"m{i}.bin") == file_blake3(src / f"m{i}.bin")
            for i in range(4)
        )
    tally(DISK_FULL, second.state == "committed" and exact)
    assert second.state == "committed", second.error
    assert MiB <= second.bytes_on_wire < MiB + 64 * 1024  # the changed member, and control
    assert exact


async def test_a_file_that_cannot_fit_is_refused_before_anything_is_written(
    tmp_path: Path, tmpfs_b: Path, tally: Tally
) -> None:
    write_random(tmp_path / "site-A" / "curated" / "big.bin", 12 * MiB, seed=5)
    write_random(tmp_path / "site-A" / "curated" / "ok.bin", MiB, seed=6)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job] = await wait_for_jobs(a, a.sender.submit("curated/big.bin", ["B"]), 60)
        clean = (
            job.state == "failed"
            and job.error_kind == "storage"
            and "needs at least 12.0 MiB" in (job.error or "")
            and not (tmpfs_b / "curated").exists()
            and staged(b) == []
            and job.chunks_sent == 0
        )
        [ok] = await wait_for_jobs(a, a.sender.submit("curated/ok.bin", ["B"]), 60)
    tally(DISK_FULL, clean and ok.state == "committed")
    assert clean, (job.state, job.error, job.chunks_sent)
    assert ok.state == "committed", ok.error


async def test_an_abandoned_upload_is_reclaimed_by_age_and_its_sender_starts_over(
    tmp_path: Path, tally: Tally
) -> None:
    """A killed sender leaves an open upload at B; B's next start past staging_ttl_s gives
    its staging back; the sender's job, resumed later, opens it again and it starts over."""
    digest = write_random(tmp_path / "site-A" / "approved" / "x.bin", 48 * CHUNK, seed=7)
    proxy = LinkProxy(rate_bytes_per_s=2e6)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, staging_ttl_s=60) as (
        a,
        b,
    ):
        [job_id] = a.sender.submit("approved/x.bin", ["B"])
        await until(lambda: received(b) >= 2)
        a.sender.stop()  # the sender goes away mid-upload (its job resumes at its next start)
        proxy.rate_bytes_per_s = None  # let the chunks in flight land
        upload = f"A-{job_id}"
        assert staged(b) == [upload]
    config_b = load_config(tmp_path / "site-B.yaml")
    clock = FakeClock(start=b.clock() + 61)
    async with running_daemon(config_b, clock=clock) as b2:
        reclaimed = staged(b2) == []
        state = b2.journal.upload(upload)
    assert state is not None
    async with loopback_pair(tmp_path, chunk_size=CHUNK, staging_ttl_s=60) as (a2, _b3):
        [job] = await wait_for_jobs(a2, [job_id], timeout_s=30)
        exact = file_blake3(tmp_path / "site-B" / "approved" / "x.bin") == digest
    tally(DISK_FULL, reclaimed and job.state == "committed" and exact)
    assert reclaimed
    assert state.state == "failed"
    assert job.state == "committed", job.error
    assert exact
