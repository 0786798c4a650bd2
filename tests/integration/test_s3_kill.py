"""Real daemon processes with site B's data_dir on S3 (moto's server): B killed with SIGKILL in
the middle of committing a checkpoint step never leaves a half-visible step (LATEST still names
the previous one, the step has no manifest), and after a restart the garbage is reclaimed and the
step commits whole; a local receiver killed mid-transfer from an S3 sender resumes to a whole
step; a store that fails the start-up check stops `transferd serve` with exit 2."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import blake3

from tests.integration._data import write_random
from tests.integration._procs import cli, metric, poll_until, start_daemon, wait_until_serving
from transferd.site.objectstore import MANIFEST
from transferd.testing import MotoS3Server, free_port, write_site_configs

CHUNK = 256 * 1024
SHARDS = 48


def _keys(s3: MotoS3Server, bucket: str, prefix: str) -> dict[str, int]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _text(s3: MotoS3Server, bucket: str, key: str) -> str:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()


async def test_sigkill_of_an_s3_receiver_mid_commit_never_shows_half_a_step(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "r"
    write_random(run / "step-100" / "w.bin", CHUNK, seed=1)
    digests = {
        f"shard-{i:02d}.bin": write_random(run / "step-200" / f"shard-{i:02d}.bin", 2 * CHUNK, i)
        for i in range(SHARDS)
    }
    ports = {"A": free_port(), "B": free_port()}
    b_site = {
        "data_dir": f"s3://{s3_bucket}/site-B",
        "state_dir": str(tmp_path / "state-B"),
        "storage_options": moto_s3.storage_options,
    }
    configs = write_site_configs(tmp_path, ports, chunk_size=CHUNK, B=b_site)
    url = {s: f"http://127.0.0.1:{ports[s]}" for s in ports}
    logs = {s: tmp_path / f"{s}.log" for s in ports}
    procs = {s: start_daemon(configs[s], logs[s]) for s in ("A", "B")}
    step = "site-B/checkpoints/r/step-200/"
    try:
        for s in ("A", "B"):
            await wait_until_serving(url[s])
        code, _, err = await cli(
            "send", "checkpoints/r/step-100", "--config", str(configs["A"]), "--to", "B", "--wait"
        )
        assert code == 0, err
        code, _, err = await cli(
            "send", "checkpoints/r/step-200", "--config", str(configs["A"]), "--to", "B"
        )
        assert code == 0, err

        def mid_commit() -> bool:
            keys = _keys(moto_s3, s3_bucket, step)
            return bool(keys) and step + MANIFEST not in keys

        async def probe() -> bool:
            return await asyncio.to_thread(mid_commit)

        await poll_until(probe, bool, timeout_s=60, every_s=0.005)
        procs["B"].send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(procs["B"].wait, 20) == -signal.SIGKILL
        # What a reader of the bucket sees now: the old step, and no manifest for the new one.
        keys = _keys(moto_s3, s3_bucket, step)
        assert step + MANIFEST not in keys
        assert 0 < len(keys) <= SHARDS  # killed with objects written, the manifest not
        assert _text(moto_s3, s3_bucket, "site-B/checkpoints/r/LATEST") == "step-100\n"

        procs["B"] = start_daemon(configs["B"], logs["B"])
        await wait_until_serving(url["B"])

        async def latest() -> str:
            return await asyncio.to_thread(
                _text, moto_s3, s3_bucket, "site-B/checkpoints/r/LATEST"
            )

        await poll_until(latest, lambda t: t == "step-200\n", timeout_s=60, every_s=0.2)
        keys = _keys(moto_s3, s3_bucket, step)
        assert sorted(keys) == sorted([step + n for n in digests] + [step + MANIFEST])
        for name, digest in digests.items():
            body = moto_s3.client().get_object(Bucket=s3_bucket, Key=step + name)["Body"].read()
            assert blake3.blake3(body).hexdigest() == digest
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=20)


async def test_sigkill_of_a_receiver_reading_from_an_s3_sender_resumes_to_a_whole_step(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """The other direction: A's checkpoints live in S3; B (local disk) is killed mid-transfer,
    restarts, and the step lands whole with LATEST naming it."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **moto_s3.storage_options)
    digests = {}
    for i in range(SHARDS):
        data = random.Random(i).randbytes(2 * CHUNK)
        fs.pipe_file(f"{s3_bucket}/site-A/checkpoints/r/step-200/shard-{i:02d}.bin", data)
        digests[f"shard-{i:02d}.bin"] = blake3.blake3(data).hexdigest()
    ports = {"A": free_port(), "B": free_port()}
    a_site = {
        "data_dir": f"s3://{s3_bucket}/site-A",
        "state_dir": str(tmp_path / "state-A"),
        "storage_options": moto_s3.storage_options,
    }
    (tmp_path / "site-B").mkdir()
    configs = write_site_configs(tmp_path, ports, chunk_size=CHUNK, streams=1, A=a_site)
    url = {s: f"http://127.0.0.1:{ports[s]}" for s in ports}
    logs = {s: tmp_path / f"{s}.log" for s in ports}
    procs = {s: start_daemon(configs[s], logs[s]) for s in ("A", "B")}
    try:
        for s in ("A", "B"):
            await wait_until_serving(url[s])
        code, _, err = await cli(
            "send", "checkpoints/r/step-200", "--config", str(configs["A"]), "--to", "B"
        )
        assert code == 0, err
        await poll_until(
            lambda: metric(url["B"], "transferd_chunks_received_total", peer="A"),
            lambda n: (n or 0) >= 4,
            timeout_s=60,
            every_s=0.01,
        )
        procs["B"].send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(procs["B"].wait, 20) == -signal.SIGKILL
        dst = tmp_path / "site-B" / "checkpoints" / "r"
        assert not (dst / "step-200").exists()
        procs["B"] = start_daemon(configs["B"], logs["B"])
        await wait_until_serving(url["B"])
        await poll_until(
            lambda: asyncio.sleep(0, (dst / "LATEST").exists()), bool, timeout_s=60, every_s=0.2
        )
        assert (dst / "LATEST").read_text() == "step-200\n"
        for name, digest in digests.items():
            assert blake3.blake3((dst / "step-200" / name).read_bytes()).hexdigest() == digest
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=20)


async def test_serve_exits_2_naming_the_reason_when_the_store_fails_its_check(
    tmp_path: Path, moto_s3: MotoS3Server
) -> None:
    ports = {"A": free_port(), "B": free_port()}
    b_site = {
        "data_dir": "s3://no-such-bucket/site-B",
        "state_dir": str(tmp_path / "state-B"),
        "storage_options": moto_s3.storage_options,
    }
    configs = write_site_configs(tmp_path, ports, B=b_site)
    code, _, err = await cli("serve", "--config", str(configs["B"]), timeout_s=60)
    assert code == 2
    assert "'no-such-bucket' does not exist (create the bucket first)" in err
    assert "Traceback" not in err
