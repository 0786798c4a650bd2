"""The relay window: chunks in memory up to its cap, then in spill files up to theirs, then a
wait (the relay stops reading); nothing is left on disk, in use or not, once chunks are let go."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from transferd.errors import TransportError
from transferd.net.relay import RelayWindow


def test_memory_then_spill_then_wait_and_nothing_left(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    window = RelayWindow(memory_bytes=2 * 100, spill_bytes=100, spill_dir=spill)
    body = bytes(range(100))
    a, b = window.hold(100, 1.0), window.hold(100, 1.0)
    assert (window.in_memory, window.spilled) == (200, 0)
    c = window.hold(100, 1.0)  # memory full: on disk
    assert (window.in_memory, window.spilled, window.spills) == (200, 100, 1)
    c.view[:] = body  # received into the spill file's mapping, sent from it
    assert bytes(c.view) == body
    assert list(spill.iterdir()) == []  # unlinked at once: a dead relay leaves nothing
    with pytest.raises(TransportError, match="relay window full"):
        window.hold(100, 0.05)  # both full: the worker waits, here only 50 ms

    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(window.hold(100, 5.0)))
    waiter.start()
    time.sleep(0.05)
    assert not got
    a.release()  # the next hop has chunk a: its room goes to the waiting chunk
    waiter.join(5)
    assert got
    for held in (b, c, got[0]):
        held.release()  # type: ignore[union-attr]
    assert (window.in_memory, window.spilled) == (0, 0)
    assert (window.peak_memory, window.peak_spilled) == (200, 100)


def test_one_chunk_larger_than_the_window_still_passes(tmp_path: Path) -> None:
    window = RelayWindow(memory_bytes=10, spill_bytes=0, spill_dir=tmp_path)
    held = window.hold(64, 0.1)
    assert window.in_memory == 64
    held.release()
    assert window.in_memory == 0
