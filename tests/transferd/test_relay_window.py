"""The relay window: chunks in memory up to its cap, then in spill files up to theirs, then a
wait (the relay stops reading); nothing is left on disk, in use or not, once chunks are let go."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from netplan.plan import TrafficClass
from transferd.config import RelaySettings
from transferd.errors import TransportError
from transferd.net import relay as rl
from transferd.net.relay import RelayWindow
from transferd.protocol import channel as ch


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


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only): a spill disk that fills."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_spill_disk_is_enospc_at_hold_not_sigbus_at_receive(small_tmpfs: Path) -> None:
    """A sparse spill file on a full disk would kill the relay (SIGBUS) when the body is
    received into it; allocated up front, the chunk is refused with ENOSPC and its room
    given back."""
    window = RelayWindow(memory_bytes=1, spill_bytes=64 << 20, spill_dir=small_tmpfs)
    first = window.hold(1, 1.0)  # memory full: the next chunk spills
    with pytest.raises(OSError, match="No space left") as caught:
        window.hold(4 << 20, 1.0)
    assert caught.value.errno == errno.ENOSPC
    assert window.spilled == 0
    assert list(small_tmpfs.iterdir()) == []
    first.release()


class _Gate:
    def __init__(self) -> None:
        self.in_flight = 0

    async def acquire(self, n: int) -> None:
        self.in_flight += 1

    def release(self, acked: int, errors: int = 0) -> None:
        self.in_flight -= 1


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(2)
    loop.close()


def test_a_spill_failure_answers_storage_and_gives_the_gate_slot_back(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """The next hop's gate slot is taken before the window; a spill file that cannot be made
    must give it back (else the gate closes for good after streams x 2 such chunks) and answer
    the sender STORAGE, not end the channel on a raw OSError."""
    svc = object.__new__(rl.RelayService)
    svc.site, svc.loop = "R", loop
    gate = _Gate()
    relayed = rl._Relayed("u1", "A", "B", "B", ())

    class Traffic:
        gates = {TrafficClass.SYNC: gate}

    svc.traffic = {"B": Traffic()}  # type: ignore[dict-item]
    svc.settings = RelaySettings(forward_timeout_s=1.0)
    svc.window = RelayWindow(1, 64 << 20, tmp_path / "not-a-dir" / "spill")
    (tmp_path / "not-a-dir").write_text("a file where the spill directory should be")
    svc.window.hold(1, 1.0)  # memory full: the next chunk spills, and cannot

    async def ready(head: object, peer: str) -> rl._Relayed:
        return relayed

    svc._ready = ready  # type: ignore[method-assign]
    head = SimpleNamespace(body_length=1 << 20, upload="u1")
    fwd = svc.begin(head, "A")  # type: ignore[arg-type]
    time.sleep(0.1)  # the release runs on the loop
    assert gate.in_flight == 0
    assert fwd.item is None
    assert fwd.status is ch.ReceiptStatus.STORAGE
    assert "spill file" in fwd.failed
    answers: list[tuple[ch.ReceiptStatus, str]] = []
    fwd.answer_later(lambda status, reason: answers.append((status, reason)))
    assert [status for status, _ in answers] == [ch.ReceiptStatus.STORAGE]
