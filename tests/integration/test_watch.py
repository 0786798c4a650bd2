"""Watch mode: a new checkpoint step with a COMMITTED marker replicates without being asked;
a step still being written (no marker, inside the quiet period) does not."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

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


def _step_named_in_latin1(checkpoints: Path) -> None:
    """checkpoints/caf\\xe9/step-1/, complete: a run whose name is not UTF-8."""
    step = Path(os.fsdecode(os.fsencode(checkpoints) + b"/caf\xe9/step-1"))
    step.mkdir(parents=True)
    (step / "shard.bin").write_bytes(b"x")
    (step / "COMMITTED").write_text("")


async def _until_exists(path: Path) -> None:
    """Until `path` exists (at most 60 s: a hang guard; the assertions after it say what
    is wrong if it never came)."""
    async with asyncio.timeout(60):
        for _ in range(6000):
            if path.exists():  # noqa: ASYNC240 (a stat per 10 ms, in a test)
                return
            await asyncio.sleep(0.01)


async def test_a_run_named_in_bytes_that_are_not_utf8_is_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its step went into the journal as a job path, whose UTF-8 encoding failed: the watch
    task's error ended the daemon, at every start. Now it is logged once and skipped, and the
    other runs replicate."""
    checkpoints = tmp_path / "site-A" / "checkpoints"
    _step_named_in_latin1(checkpoints)
    watch = {
        "watch": {"enabled": True, "poll_interval_s": 0.05, "quiet_period_s": 3600},
        "checkpoints": {"targets": ["B"]},
    }
    with caplog.at_level(logging.ERROR, logger="transferd.plan"):
        async with loopback_pair(tmp_path, chunk_size=CHUNK, A=watch) as (a, _b):
            digest = write_random(checkpoints / "llm" / "step-1" / "shard.bin", CHUNK, seed=1)
            (checkpoints / "llm" / "step-1" / "COMMITTED").write_text("")
            latest = tmp_path / "site-B" / "checkpoints" / "llm" / "LATEST"
            await _until_exists(latest)
            assert [j.path for j in a.journal.jobs()] == ["checkpoints/llm/step-1"]
    assert file_blake3(latest.parent / "step-1" / "shard.bin") == digest
    refused = [getattr(r, "fields", {}) for r in caplog.records if r.message == "watch.refused"]
    assert refused == [{"path": "checkpoints/caf\\xe9", "kind": "storage", "error":
                        "checkpoints/caf\\xe9: the name is not UTF-8, which transferd cannot "
                        "carry: rename it"}]


async def test_a_step_that_cannot_be_sent_does_not_hold_up_the_steps_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO in a step is refused when it is submitted (it used to hang its job); the watch
    scan went on to the next poll at that step, so no later step of any run ever went."""
    run = tmp_path / "site-A" / "checkpoints" / "llm"
    (run / "step-1").mkdir(parents=True)
    os.mkfifo(run / "step-1" / "pipe")
    (run / "step-1" / "COMMITTED").write_text("")
    watch = {
        "watch": {"enabled": True, "poll_interval_s": 0.05, "quiet_period_s": 3600},
        "checkpoints": {"targets": ["B"]},
    }
    with caplog.at_level(logging.ERROR, logger="transferd.plan"):
        async with loopback_pair(tmp_path, chunk_size=CHUNK, A=watch) as (a, _b):
            digest = write_random(run / "step-2" / "shard.bin", CHUNK, seed=2)
            (run / "step-2" / "COMMITTED").write_text("")
            latest = tmp_path / "site-B" / "checkpoints" / "llm" / "LATEST"
            await _until_exists(latest)
            assert latest.read_text() == "step-2\n"
            assert [j.path for j in a.journal.jobs()] == ["checkpoints/llm/step-2"]
    assert file_blake3(latest.parent / "step-2" / "shard.bin") == digest
    errors = [getattr(r, "fields", {}) for r in caplog.records if r.message == "watch.error"]
    assert errors == [{"path": "checkpoints/llm/step-1", "kind": "storage", "error":
                       "checkpoints/llm/step-1/pipe is a FIFO (named pipe): only regular "
                       "files and folders are sent"}]
