"""Replicate a file and a checkpoint folder between two real daemons on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration._data import file_blake3, write_random
from transferd import TrafficClass
from transferd.testing import loopback_pair, wait_for_jobs

CONTROL_BYTES = 64 * 1024  # have/want, manifest and commit bodies of a small job, at most
CHUNK = 256 * 1024


async def test_file_replicates_with_equal_bytes_and_hash(tmp_path: Path) -> None:
    src = tmp_path / "site-A" / "curated" / "corpus" / "part-0.bin"
    digest = write_random(src, 5 * CHUNK + 12345, seed=1)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("curated/corpus/part-0.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        dst = tmp_path / "site-B" / "curated" / "corpus" / "part-0.bin"
        assert file_blake3(dst) == digest
        assert dst.read_bytes() == src.read_bytes()
        assert job.chunks == 6
        assert job.chunks_skipped == 0
        assert job.bytes_logical == src.stat().st_size
        # Nothing left in staging at the receiver.
        assert list((tmp_path / "site-B" / ".transferd" / "staging").iterdir()) == []


async def test_checkpoint_folder_replicates_as_one_unit_and_latest_moves(tmp_path: Path) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "run1"
    digests = {}
    for step in ("step-9", "step-10"):
        for shard in range(3):
            rel = f"{step}/shard-{shard}.bin"
            digests[rel] = write_random(run / rel, CHUNK * 2 + shard, seed=hash(rel) % 1000)
        (run / step / "meta.json").write_text(f'{{"step": "{step}"}}')
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        ids = a.sender.submit("checkpoints/run1/step-9", ["B"])
        ids += a.sender.submit("checkpoints/run1/step-10", ["B"])
        jobs = await wait_for_jobs(a, ids)
        assert [j.state for j in jobs] == ["committed", "committed"]
    dst = tmp_path / "site-B" / "checkpoints" / "run1"
    for rel, digest in digests.items():
        assert file_blake3(dst / rel) == digest
    assert (dst / "LATEST").read_text() == "step-10\n"


async def test_replication_over_mutual_tls(tmp_path: Path) -> None:
    from transferd.testing import loopback_tls

    src = tmp_path / "site-A" / "approved" / "m.bin"
    digest = write_random(src, 3 * CHUNK, seed=4)
    tls = loopback_tls(tmp_path / "tls")
    async with loopback_pair(tmp_path, chunk_size=CHUNK, tls=tls) as (a, b):
        assert a.links["B"].url.startswith("https://")
        [job_id] = a.sender.submit("approved/m.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "approved" / "m.bin") == digest


async def test_folder_with_empty_file_nested_dirs_and_repeated_chunks(tmp_path: Path) -> None:
    root = tmp_path / "site-A" / "curated" / "ds"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty.txt").write_bytes(b"")
    (root / "a" / "b" / "zeros.bin").write_bytes(bytes(20 * CHUNK))  # 20 identical chunks
    digest = write_random(root / "a" / "r.bin", CHUNK + 1, seed=9)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, compression="off") as (a, b):
        [job_id] = a.sender.submit("curated/ds", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "committed", job.error
    dst = tmp_path / "site-B" / "curated" / "ds"
    assert (dst / "empty.txt").read_bytes() == b""
    assert (dst / "a" / "b" / "zeros.bin").read_bytes() == bytes(20 * CHUNK)
    assert file_blake3(dst / "a" / "r.bin") == digest
    assert job.chunks == 22
    # One zero chunk, plus r.bin's two chunks; the rest of the wire is control bodies.
    assert 2 * CHUNK + 1 <= job.bytes_on_wire < 2 * CHUNK + 1 + CONTROL_BYTES
    assert job.chunks_skipped == 19


async def test_stale_staging_is_dropped_at_start(tmp_path: Path) -> None:
    from transferd.config import load_config
    from transferd.protocol.upload import upload_intent
    from transferd.site.journal import UploadState
    from transferd.testing import FakeClock, running_daemon

    write_random(tmp_path / "site-A" / "curated" / "x.bin", 3 * CHUNK, seed=1)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, staging_ttl_s=60) as (a, b):
        # Open an upload at B and leave it unfinished, as a sender that vanished would.
        await a.links["B"].call(
            TrafficClass.CONTROL,
            "POST",
            "/v1/uploads",
            body=upload_intent(
                "A-abandoned-1", "A", "B", "curated/x.bin", "file", [("", 3 * CHUNK)]
            ),
        )
        staging = b.storage.staging_root
        assert [p.name for p in staging.iterdir()] == ["A-abandoned-1"]
    clock = FakeClock(start=b.clock() + 61)
    async with running_daemon(load_config(tmp_path / "site-B.yaml"), clock=clock) as b2:
        assert list(staging.iterdir()) == []
        upload = b2.journal.upload("A-abandoned-1")
        assert upload is not None
        assert upload.state is UploadState.FAILED


async def test_jobs_reuse_the_same_data_channels(
    tmp_path: Path,
) -> None:
    for i in range(3):
        write_random(tmp_path / "site-A" / "curated" / f"f{i}.bin", 6 * CHUNK, seed=40 + i)
    async with loopback_pair(tmp_path, chunk_size=CHUNK, streams=2) as (a, b):
        for i in range(3):
            [job_id] = a.sender.submit(f"curated/f{i}.bin", ["B"])
            [job] = await wait_for_jobs(a, [job_id])
            assert job.state == "committed", job.error
        # Opened once (when the daemon started or the first job needed them), then reused by
        # every chunk of every job.
        assert a.metrics.value("transferd_data_channels_opened_total", peer="B") == 2
        assert b.metrics.value("transferd_chunks_received_total", peer="A") == 18
        assert b.metrics.value("transferd_bytes_received_total", peer="A") == 18 * CHUNK
        assert a.channels["B"].algorithms  # each socket reports the congestion control in use
    for i in range(3):
        src = tmp_path / "site-A" / "curated" / f"f{i}.bin"
        assert (tmp_path / "site-B" / "curated" / f"f{i}.bin").read_bytes() == src.read_bytes()


async def test_a_jobs_query_with_wait_ms_answers_when_the_job_has_ended(tmp_path: Path) -> None:
    from transferd.errors import ProtocolError
    from transferd.net.local_client import LocalClient, LocalRequest
    from transferd.protocol.auth import local_signer
    from transferd.protocol.local_api import JobsAnswer
    from transferd.protocol.wire import LOCAL_JOBS_ROUTE

    src = tmp_path / "site-A" / "approved" / "w.bin"
    write_random(src, 64 * CHUNK, seed=5)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        client = LocalClient(a.url, local_signer(a.keyring))
        [job_id] = a.sender.submit("approved/w.bin", ["B"])
        # What `transferd send --wait` asks: one question that is answered once the job ended.
        asked = LocalRequest("GET", f"{LOCAL_JOBS_ROUTE}?ids={job_id}&wait_ms=60000", JobsAnswer)
        [job] = (await client.acall(asked)).jobs
        assert job.state == "committed", job.error
        bad = LocalRequest("GET", f"{LOCAL_JOBS_ROUTE}?ids={job_id}&wait_ms=soon", JobsAnswer)
        with pytest.raises(ProtocolError, match="wait_ms"):
            await client.acall(bad)


async def test_a_job_run_again_after_its_commit_sends_no_chunk(tmp_path: Path) -> None:
    # The upload's open runs while the first batch is hashed; a receiver that has the upload
    # committed already (the sender died between that commit and its own journal entry) still
    # ends the job before any chunk is sent.
    write_random(tmp_path / "site-A" / "curated" / "again.bin", 5 * CHUNK, seed=2)
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("curated/again.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        again = a.journal.job(job_id)
        assert again is not None
        await a.sender._replicate(again)
        after = a.journal.job(job_id)
        assert after is not None
        # The open request's body went out again, and no chunk did.
        assert 0 < after.bytes_on_wire - again.bytes_on_wire < min(CONTROL_BYTES, CHUNK)
