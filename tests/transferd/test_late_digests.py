"""Once its upload is committed, a job waits for the one-pass sends its attempts gave up on
while a channel still held them unhashed (each may yet tell a second digest): only those
that may still tell one, for at most their channels' stall bound."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from transferd.errors import TransportError
from transferd.net import sender as sender_mod
from transferd.net.channels import OutgoingChunk


def _one_pass(offset: int, digest: str = "") -> OutgoingChunk:
    item = OutgoingChunk(upload="u1", digest=digest, locations=((0, offset),), raw_length=10,
                         encoding="identity", body_blake3=digest, fd=None, offset=offset)
    item.one_pass = True
    return item


class _Channels:
    """PeerChannels' part that _late_digests uses: a queue, withdraw, expire, stall_s."""

    def __init__(self, queued: list[OutgoingChunk], stall_s: float) -> None:
        self.queue = deque(queued)
        self.stall_s = stall_s
        self.withdrawn: list[OutgoingChunk] = []
        self.expired: list[OutgoingChunk] = []

    def withdraw(self, upload: str, only: OutgoingChunk | None = None,
                 reason: str = "") -> None:
        for item in list(self.queue):
            if item.upload == upload and (only is None or item is only):
                self.queue.remove(item)
                self.withdrawn.append(item)
                item.finish(error=TransportError(reason, peer="B"))

    def expire(self, item: OutgoingChunk, error: TransportError) -> None:
        self.expired.append(item)
        item.finish(error=error)


async def test_only_strays_that_may_still_tell_a_digest_are_waited_for_within_stall_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three strays: one that told its digest already (still in flight: its receipt may be
    slow), one still queued (it has read nothing), one in flight unhashed that never ends.
    Only the last is waited for, for the channels' stall_s (not a module constant), then
    expired; the queued one is withdrawn at once; the told one is left to its channel."""
    told = _one_pass(0, digest="ab" * 32)
    queued = _one_pass(10)
    flying = _one_pass(20)
    channels = _Channels([queued], stall_s=0.01)
    waits: list[float | None] = []
    real_timeout = asyncio.timeout

    def timeout(delay: float | None) -> Any:
        waits.append(delay)
        return real_timeout(delay)

    monkeypatch.setattr(asyncio, "timeout", timeout)
    pump = SimpleNamespace(strays=[told, queued, flying], channels=channels,
                           link=SimpleNamespace(peer="B"))
    files = [SimpleNamespace(conflict=None)]
    await sender_mod._late_digests(pump, files)  # type: ignore[arg-type]
    assert waits == [channels.stall_s]
    assert channels.withdrawn == [queued]
    assert channels.expired == [flying]
    assert not told.done.done()
    assert pump.strays == []
