"""Watch mode: a new checkpoint step with a COMMITTED marker replicates without being asked;
a step still being written (no marker, inside the quiet period) does not."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration._data import file_blake3, write_random
from transferd.testing import loopback_pair

CHUNK = 128 * 1024


async def test_committed_step_replicates_by_itself_and_an_unfinished_one_waits(
    tmp_path: Path,
) -> None:
    run = tmp_path / "site-A" / "checkpoints" / "llm"
    watch = {
        "watch": {"enabled": True, "poll_interval_s": 0.05, "quiet_period_s": 3600},
        "checkpoints": {"targets": ["B"]},
    }
    async with loopback_pair(tmp_path, chunk_size=CHUNK, A=watch) as (a, b):
        write_random(run / "step-2" / "shard.bin", 3 * CHUNK, seed=2)  # no marker: still writing
        digest = write_random(run / "step-1" / "shard.bin", 3 * CHUNK, seed=1)
        (run / "step-1" / "COMMITTED").write_text("")
        latest = tmp_path / "site-B" / "checkpoints" / "llm" / "LATEST"
        async with asyncio.timeout(20):
            for _ in range(2000):
                if latest.exists():
                    break
                await asyncio.sleep(0.01)
        assert latest.read_text() == "step-1\n"
        assert (
            file_blake3(tmp_path / "site-B" / "checkpoints" / "llm" / "step-1" / "shard.bin")
            == digest
        )
        assert not (tmp_path / "site-B" / "checkpoints" / "llm" / "step-2").exists()
        assert [j.path for j in a.journal.jobs()] == ["checkpoints/llm/step-1"]
