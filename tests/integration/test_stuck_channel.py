"""A data channel stuck in TCP's retransmission backoff (after a link outage) is replaced as soon
as a new connection to the peer answers: its chunks go out again on the new channel and the job
commits. The backoff is simulated (the kernel's counter is read through `tcp_timeouts`); the
bytes travel through a rate-limited proxy so that chunks are in flight when the watcher looks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration._data import file_blake3, write_random
from transferd.net import channels
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

CHUNK = 256 * 1024


async def test_a_channel_stuck_in_backoff_is_replaced_and_its_chunks_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck: dict[str, int] = {}

    def timeouts(sock: socket.socket) -> int:
        stuck.setdefault("id", id(sock))  # the first channel the watcher looks at
        return channels.STUCK_TIMEOUTS if id(sock) == stuck["id"] else 0

    monkeypatch.setattr(channels, "tcp_timeouts", timeouts)
    src = tmp_path / "site-A" / "approved" / "s.bin"
    digest = write_random(src, 16 * CHUNK, seed=9)
    proxy = LinkProxy(rate_bytes_per_s=2 * 2**20)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK) as (a, b):
        [job_id] = a.sender.submit("approved/s.bin", ["B"])
        [job] = await wait_for_jobs(a, [job_id], timeout_s=60)
        assert job.state == "committed", job.error
        assert "id" in stuck
        assert a.metrics.value("transferd_chunks_resent_total", peer="B") >= 1
        opened = a.metrics.value("transferd_data_channels_opened_total", peer="B")
        assert opened > a.traffic["B"].streams_wanted()  # the replacement came on top
    assert file_blake3(tmp_path / "site-B" / "approved" / "s.bin") == digest
