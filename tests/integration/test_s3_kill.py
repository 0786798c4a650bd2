"""Real daemon processes with site B's data_dir on S3 (moto's server): B killed with SIGKILL in
the middle of committing a checkpoint step never leaves a half-visible step (LATEST still names
the previous one, the step has no manifest), and after a restart the garbage is reclaimed and the
step commits whole; a local receiver killed mid-transfer from an S3 sender resumes to a whole
step; a store that fails the start-up check stops `transferd serve` with exit 2."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import fsspec

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


class _HoldingProxy:
    """A TCP proxy in front of moto that passes requests on until a PUT naming `key` comes:
    that request (and its connection) is held, never passed on, until `release()`. A daemon
    whose store goes through it stops at exactly that step of its commit, whatever the
    machine's speed, so a kill lands there."""

    def __init__(self, upstream_port: int, key: bytes) -> None:
        self.upstream_port = upstream_port
        self.key = key
        self.held = asyncio.Event()  # a PUT of `key` arrived and is being held
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _holds(self, data: bytes) -> bool:
        at = data.find(self.key)
        return (at >= 0 and not self._released.is_set()
                and data[data.rfind(b"\n", 0, at) + 1:].startswith(b"PUT "))

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def answers() -> None:
            while data := await up_reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

        back = asyncio.create_task(answers())
        try:
            while data := await reader.read(1 << 16):
                if self._holds(data):
                    # HTTP/1.1 without pipelining: this read starts the PUT's request (the
                    # connection's previous request was answered), so nothing of it goes on.
                    self.held.set()
                    await self._released.wait()
                    return
                up_writer.write(data)
                await up_writer.drain()
        except OSError:
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                w.close()


def _s3_site(s3: MotoS3Server, url: str, state: Path) -> dict[str, Any]:
    return {"data_dir": url, "state_dir": str(state), "storage_options": s3.storage_options}


@dataclass
class _Pair:
    configs: dict[str, Path]
    url: dict[str, str]
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen[bytes]]

    async def restart(self, site: str) -> None:
        self.procs[site] = start_daemon(self.configs[site], self.logs[site])
        await wait_until_serving(self.url[site])

    async def kill(self, site: str) -> None:
        self.procs[site].send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(self.procs[site].wait, 20) == -signal.SIGKILL


@asynccontextmanager
async def _daemons(tmp_path: Path, **overrides: Any) -> AsyncIterator[_Pair]:
    """Sites A and B as `transferd serve` processes, serving; stopped with SIGTERM after."""
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports, chunk_size=CHUNK, **overrides)
    pair = _Pair(
        configs,
        {s: f"http://127.0.0.1:{ports[s]}" for s in ports},
        {s: tmp_path / f"{s}.log" for s in ports},
        {},
    )
    try:
        for site in ports:
            await pair.restart(site)
        yield pair
    except BaseException as exc:
        # What the daemons said, in the failure's report (their logs live in tmp_path, which
        # a CI machine does not keep), and what each still running one says of its jobs and
        # peers now (a job waiting for its next attempt logs nothing while it waits).
        for site, log in pair.logs.items():
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- the last lines of {site}'s log ---", *lines[-60:], sep="\n")
        if isinstance(exc, Exception):
            for site, proc in pair.procs.items():
                if proc.poll() is None:
                    print(f"--- {site}'s status ---", *await _status(configs[site]), sep="\n")
        raise
    finally:
        for proc in pair.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in pair.procs.values():
            proc.wait(timeout=20)


async def _status(config: Path) -> tuple[str, ...]:
    """`transferd status --json` of a running daemon, for a failure's report."""
    try:
        code, out, err = await cli("status", "--config", str(config), "--json", timeout_s=20)
    except (TimeoutError, OSError) as exc:
        return (f"status: {exc!r}",)
    return (f"exit {code}", out[-4000:], err[-2000:])


async def _restarted_step_is_whole(
    sites: _Pair, s3: MotoS3Server, bucket: str, step: str, digests: dict[str, str]
) -> None:
    """B restarts; LATEST comes to name step-200, which holds its shards whole and nothing
    else."""
    await sites.restart("B")

    async def latest() -> str:
        return await asyncio.to_thread(_text, s3, bucket, "site-B/checkpoints/r/LATEST")

    await poll_until(latest, lambda t: t == "step-200\n", timeout_s=90, every_s=0.2)
    keys = _keys(s3, bucket, step)
    assert sorted(keys) == sorted([step + n for n in digests] + [step + MANIFEST])
    for name, digest in digests.items():
        body = s3.client().get_object(Bucket=bucket, Key=step + name)["Body"].read()
        assert blake3.blake3(body).hexdigest() == digest


async def test_sigkill_of_an_s3_receiver_mid_commit_never_shows_half_a_step(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "r"
    write_random(run / "step-100" / "w.bin", CHUNK, seed=1)
    digests = {
        f"shard-{i:02d}.bin": write_random(run / "step-200" / f"shard-{i:02d}.bin", 2 * CHUNK, i)
        for i in range(SHARDS)
    }
    step = "site-B/checkpoints/r/step-200/"
    # B's store is reached through a proxy that holds the step's manifest PUT: B is killed
    # with every shard object of the step written and its manifest not (the widest window).
    proxy = _HoldingProxy(moto_s3.port, f"/{s3_bucket}/{step}{MANIFEST}".encode())
    b_site = _s3_site(moto_s3, f"s3://{s3_bucket}/site-B", tmp_path / "state-B")
    b_site["storage_options"] = {
        **b_site["storage_options"], "endpoint_url": f"http://127.0.0.1:{await proxy.start()}"}
    try:
        async with _daemons(tmp_path, B=b_site) as sites:
            a_config = str(sites.configs["A"])
            for send in (["checkpoints/r/step-100", "--wait"], ["checkpoints/r/step-200"]):
                code, _, err = await cli("send", *send, "--config", a_config, "--to", "B")
                assert code == 0, err

            await asyncio.wait_for(proxy.held.wait(), timeout=60)
            await sites.kill("B")
            # What a reader of the bucket sees now: the old step, and no manifest for the new.
            keys = _keys(moto_s3, s3_bucket, step)
            assert step + MANIFEST not in keys
            assert 0 < len(keys) <= SHARDS  # killed with objects written, the manifest not
            assert _text(moto_s3, s3_bucket, "site-B/checkpoints/r/LATEST") == "step-100\n"

            proxy.release()
            await _restarted_step_is_whole(sites, moto_s3, s3_bucket, step, digests)
    finally:
        await proxy.close()


async def test_sigkill_of_an_s3_receiver_mid_streaming_upload_never_shows_half_a_step(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """Shards large enough to be streamed to S3 while the transfer runs: B is killed once the
    first of them is in the bucket and before the last chunk arrived. The step is not visible
    (no manifest, LATEST unchanged); after a restart the streamed objects are reclaimed, the
    transfer resumes, and the step commits whole with no multipart upload left behind."""
    size, shards = 6 * 1024 * 1024, 6  # each over the streaming threshold (5 MiB)
    run = tmp_path / "site-A" / "checkpoints" / "r"
    write_random(run / "step-100" / "w.bin", CHUNK, seed=1)
    digests = {
        f"shard-{i}.bin": write_random(run / "step-200" / f"shard-{i}.bin", size, i)
        for i in range(shards)
    }
    chunks = shards * size // CHUNK
    b_site = _s3_site(moto_s3, f"s3://{s3_bucket}/site-B", tmp_path / "state-B")
    step = "site-B/checkpoints/r/step-200/"
    async with _daemons(tmp_path, streams=1, B=b_site) as sites:
        a_config = str(sites.configs["A"])
        for send in (["checkpoints/r/step-100", "--wait"], ["checkpoints/r/step-200"]):
            code, _, err = await cli("send", *send, "--config", a_config, "--to", "B")
            assert code == 0, err

        async def streamed() -> float | None:
            if not await asyncio.to_thread(_keys, moto_s3, s3_bucket, step):
                return None
            return await metric(sites.url["B"], "transferd_chunks_received_total", peer="A")

        received = await poll_until(streamed, lambda n: n is not None, timeout_s=60, every_s=0.005)
        await sites.kill("B")
        assert received is not None
        assert received < chunks
        keys = _keys(moto_s3, s3_bucket, step)
        assert keys
        assert step + MANIFEST not in keys
        assert _text(moto_s3, s3_bucket, "site-B/checkpoints/r/LATEST") == "step-100\n"

        await _restarted_step_is_whole(sites, moto_s3, s3_bucket, step, digests)
        left = moto_s3.client().list_multipart_uploads(Bucket=s3_bucket, Prefix="site-B/")
        assert left.get("Uploads", []) == []


async def test_sigkill_of_a_receiver_reading_from_an_s3_sender_resumes_to_a_whole_step(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """The other direction: A's checkpoints live in S3; B (local disk) is killed mid-transfer,
    restarts, and the step lands whole with LATEST naming it."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **moto_s3.storage_options)
    digests = {}
    for i in range(SHARDS):
        data = random.Random(i).randbytes(2 * CHUNK)
        fs.pipe_file(f"{s3_bucket}/site-A/checkpoints/r/step-200/shard-{i:02d}.bin", data)
        digests[f"shard-{i:02d}.bin"] = blake3.blake3(data).hexdigest()
    a_site = _s3_site(moto_s3, f"s3://{s3_bucket}/site-A", tmp_path / "state-A")
    (tmp_path / "site-B").mkdir()
    async with _daemons(tmp_path, streams=1, A=a_site) as sites:
        code, _, err = await cli(
            "send", "checkpoints/r/step-200", "--config", str(sites.configs["A"]), "--to", "B"
        )
        assert code == 0, err
        await poll_until(
            lambda: metric(sites.url["B"], "transferd_chunks_received_total", peer="A"),
            lambda n: (n or 0) >= 4,
            timeout_s=60,
            every_s=0.01,
        )
        await sites.kill("B")
        dst = tmp_path / "site-B" / "checkpoints" / "r"
        assert not (dst / "step-200").exists()
        await sites.restart("B")
        await poll_until(
            lambda: asyncio.sleep(0, (dst / "LATEST").exists()), bool, timeout_s=60, every_s=0.2
        )
        assert (dst / "LATEST").read_text() == "step-200\n"
        for name, digest in digests.items():
            assert blake3.blake3((dst / "step-200" / name).read_bytes()).hexdigest() == digest


async def test_serve_exits_2_naming_the_reason_when_the_store_fails_its_check(
    tmp_path: Path, moto_s3: MotoS3Server
) -> None:
    ports = {"A": free_port(), "B": free_port()}
    b_site = _s3_site(moto_s3, "s3://no-such-bucket/site-B", tmp_path / "state-B")
    configs = write_site_configs(tmp_path, ports, B=b_site)
    code, _, err = await cli("serve", "--config", str(configs["B"]), timeout_s=60)
    assert code == 2
    assert "'no-such-bucket' does not exist (create the bucket first)" in err
    assert "Traceback" not in err
