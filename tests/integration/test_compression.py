"""`compression: auto` end to end: on a link slower than the compressor, zero-heavy checkpoint
shards cross compressed (fewer bytes on the wire than in the file) and arrive intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.integration._data import file_blake3
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
