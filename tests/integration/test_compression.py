"""`compression: auto` end to end: on a link slower than the compressor, zero-heavy checkpoint
shards cross compressed (fewer bytes on the wire than in the file) and arrive intact."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration._data import file_blake3
from transferd.net import sender as sender_mod
from transferd.protocol.codec import LINK_SAMPLES, RELATIVE_SPEED
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

CHUNK = 256 * 1024


def write_bf16_like(path: Path, size: int, seed: int) -> str:
    """bf16-looking weights where most values are exact zeros (pruned / padded tensors)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size // 2).astype(np.float32)
    values[rng.random(values.size) < 0.7] = 0.0
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bf16.tobytes())
    return file_blake3(path)


async def test_auto_compresses_on_a_slow_link_and_the_bytes_arrive_intact(tmp_path: Path) -> None:
    src = tmp_path / "site-A" / "checkpoints" / "r" / "step-1" / "shard.bin"
    digest = write_bf16_like(src, 32 * CHUNK, seed=8)
    proxy = LinkProxy(rate_bytes_per_s=16e6)  # 16 MB/s: far slower than zstd level 1 on any core
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK, streams=2) as (a, b):
        [job_id] = a.sender.submit("checkpoints/r/step-1", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=60)
        ratio = a.metrics.value("transferd_compression_ratio", peer="B")
    assert job.state == "committed", job.error
    assert job.bytes_on_wire < 0.7 * job.bytes_logical
    # The ratio is over chunk bodies; the job's wire also counts its control bodies (a few KiB).
    chunk_wire = ratio * job.bytes_logical
    assert chunk_wire <= job.bytes_on_wire < chunk_wire + 64 * 1024
    assert file_blake3(tmp_path / "site-B" / "checkpoints" / "r" / "step-1" / "shard.bin") == digest


async def test_auto_rates_the_compressor_by_its_cpu_time_not_a_loaded_hosts_wall_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a loaded host a compression's wall-clock time includes its waits for a core. Each
    compression here takes 10 ms of its thread's CPU at level 1 (more at slower levels, as
    RELATIVE_SPEED says) and 2 s of wall-clock (injected clocks, for the compressing thread
    only): `auto` rates the compressor by the CPU time (the model's per-worker speed, ~100
    MB/s), so on a 20 MB/s link, which that outruns, every chunk goes compressed instead of
    compression being switched off for the host's load."""
    data = memoryview(bytes(768 * 1024) + random.Random(2).randbytes(256 * 1024))
    real_compress = sender_mod.zstd_compress
    real_wall, real_cpu = time.perf_counter, time.thread_time
    compressing = threading.local()
    clocks = {"wall": 0.0, "cpu": 0.0}

    def compress(view: memoryview, level: int) -> bytes:
        out = real_compress(view, level)
        clocks["wall"] += 2.0
        clocks["cpu"] += 0.01 / RELATIVE_SPEED[level]
        return out

    def clock(name: str, real: Any) -> Any:
        return lambda: clocks[name] if getattr(compressing, "on", False) else real()

    def encode_all(sender: Any) -> list[str]:
        compressing.on = True
        return [sender.encode("B", data).encoding for _ in range(10)]

    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        policy = a.sender.compression["B"]
        assert policy.auto
        for _ in range(LINK_SAMPLES):
            policy.observe_link(20_000_000, 1.0)
        monkeypatch.setattr(sender_mod, "zstd_compress", compress)
        monkeypatch.setattr(time, "perf_counter", clock("wall", real_wall))
        monkeypatch.setattr(time, "thread_time", clock("cpu", real_cpu))
        encodings = await asyncio.to_thread(encode_all, a.sender)
        monkeypatch.undo()
        speed, tried = policy.compress_bytes_per_s, policy.should_try()
    assert encodings == ["zstd"] * 10
    assert tried
    assert speed == pytest.approx(len(data) / 0.01)  # level 1's rate, by CPU time
