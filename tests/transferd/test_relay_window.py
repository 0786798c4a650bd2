"""The relay window: chunks in memory up to its cap, then in spill files up to theirs, then a
wait (the relay stops reading); nothing is left on disk, in use or not, once chunks are let go."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from netplan.plan import TrafficClass
from transferd.config import RelaySettings
from transferd.errors import PolicyViolation, TransportError
from transferd.net import channels as chm
from transferd.net import relay as rl
from transferd.net.channels import ArrivingBody, OutgoingChunk
from transferd.net.relay import RelayWindow
from transferd.protocol import channel as ch
from transferd.site.journal import Journal, RelayedUpload
from transferd.site.metrics import Metrics


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
    # The release runs on the loop (another thread): wait for the loop to have run what was
    # handed to it by now, not for a fixed time.
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(60)
    assert gate.in_flight == 0
    assert fwd.item is None
    assert fwd.status is ch.ReceiptStatus.STORAGE
    assert "spill file" in fwd.failed
    answers: list[tuple[ch.ReceiptStatus, str]] = []
    fwd.answer_later(lambda status, reason: answers.append((status, reason)))
    assert [status for status, _ in answers] == [ch.ReceiptStatus.STORAGE]


# -- a relayed body that stops arriving; channels broken under relayed chunks ------------------


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    yield a, b
    a.close()
    b.close()


def _arriving_chunk(n: int, upload: str = "u1") -> tuple[ArrivingBody, OutgoingChunk]:
    body = ArrivingBody(memoryview(bytearray(n)))
    item = OutgoingChunk(upload=upload, digest="00" * 32, locations=((0, 0),), raw_length=n,
                         encoding="identity", body_blake3="00" * 32, body=body)
    return body, item


def test_a_channel_broken_under_a_paused_relayed_body_frees_its_sender_thread(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """R -> B's sender thread waits for a relayed body that A paused half-way; breaking that
    channel (stall detection) must end the thread, not leave it parked for good (one thread
    leaked per break), and the chunk goes to the queue for another channel."""
    a, _b = tcp_pair
    pc = chm.PeerChannels(site="R", peer="B", keys=None, metrics=Metrics())  # type: ignore[arg-type]
    body, item = _arriving_chunk(1 << 20)
    chan = chm._Channel(pc, a, ch.Session(b"k" * 32), False, 2)  # type: ignore[arg-type]
    pc.channels.append(chan)
    pc.submit(item)
    body.grow(1000)  # a little arrived, then the upstream paused
    time.sleep(0.2)
    chan._break(TimeoutError("nothing moved for 30 s"))
    sender = chan.threads[0]
    # It looks at its channel every ARRIVING_WAKE_S: far more than that is a bound for a
    # loaded machine, and a thread parked for good stays alive however long it is.
    sender.join(30 * chm.ARRIVING_WAKE_S)
    alive = sender.is_alive()
    body.fail(ConnectionError("test over"))  # frees it if the fix is missing
    sender.join(2)
    assert not alive, "the sender thread stayed parked on the arriving body"
    assert list(pc.queue) == [item]


def _relay_stub(forward_timeout_s: float, channels: dict[str, Any] | None = None
                ) -> rl.RelayService:
    svc = object.__new__(rl.RelayService)
    svc.site, svc.loop = "R", None
    svc.settings = RelaySettings(forward_timeout_s=forward_timeout_s)
    svc._pending, svc._pending_lock = set(), threading.Lock()
    svc.channels = channels or {}  # type: ignore[assignment]
    return svc


def test_a_relayed_body_that_stops_arriving_ends_after_the_forward_timeout(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A paused mid-chunk (its socket open, nothing sent): R's receive must not wait forever
    holding window room and a gate slot; the chunk fails (the sender sends it again) and the
    channel's socket is back to blocking reads."""
    a, b = tcp_pair
    svc = _relay_stub(0.3)
    body, item = _arriving_chunk(1 << 20)
    fwd = rl._Forward(svc, None, 1 << 20, item=item, body=body)
    a.sendall(b"x" * 1000)
    raised: list[BaseException] = []

    def receive() -> None:
        try:
            fwd.receive(b)
        except BaseException as exc:
            raised.append(exc)

    receiver = threading.Thread(target=receive)
    receiver.start()
    receiver.join(10)
    stuck = receiver.is_alive()
    if stuck:
        b.shutdown(socket.SHUT_RDWR)  # frees it when the timeout is missing
        receiver.join(5)
    assert not stuck, "the relay waited on the paused body past its forward timeout"
    assert isinstance(raised[0], TimeoutError)
    assert "no byte of the chunk" in str(raised[0])
    assert body.filled == 1000
    assert isinstance(body.error, TimeoutError)
    assert isinstance(item.done.exception(0), TransportError)
    timeout = b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    assert timeout == bytes(len(timeout))  # reads of the next header block again


class _NextHop:
    """The next hop's channels as the watcher sees them: when they last moved."""

    def __init__(self, carrying: float | None, any_channel: float | None) -> None:
        self.carrying, self.any_channel = carrying, any_channel

    def moved_at(self, item: OutgoingChunk) -> float | None:
        return self.carrying

    def last_moved(self) -> float | None:
        return self.any_channel


@pytest.mark.parametrize(
    ("carrying", "any_channel", "times_out"),
    [
        (-1.0, None, False),  # in flight, its channel took bytes a second ago: slow, not hung
        (None, -1.0, False),  # queued behind others while the hop's channels move
        (-30.0, None, True),  # in flight, its channel silent for 30 s
        (None, -30.0, True),  # queued, no channel to the hop moved for 30 s
        (None, None, True),  # queued, no channel to the hop at all
    ],
)
def test_a_relayed_chunk_times_out_on_silence_not_on_time_spent_queued(
    carrying: float | None, any_channel: float | None, times_out: bool
) -> None:
    """A chunk that arrived 100 s ago at a relay whose next hop is slow but moving is not
    answered UNREACHABLE (the sender would take the route down and finish on the slow direct
    path); one whose next hop stopped moving for the forward timeout is."""
    now = time.monotonic()
    hop = _NextHop(None if carrying is None else now + carrying,
                   None if any_channel is None else now + any_channel)
    svc = _relay_stub(20.0, {"B": hop})
    _body, item = _arriving_chunk(8 << 20)
    fwd = rl._Forward(svc, rl._Relayed("u1", "A", "B", "B", ()), 8 << 20, item=item,
                      received_at=now - 100.0)
    assert (svc._stalled(fwd, now) is not None) is times_out


def test_a_body_that_stopped_arriving_is_a_backstop_timeout_for_the_watcher() -> None:
    now = time.monotonic()
    svc = _relay_stub(20.0, {"B": _NextHop(None, now)})
    body, item = _arriving_chunk(8 << 20)
    fwd = rl._Forward(svc, rl._Relayed("u1", "A", "B", "B", ()), 8 << 20, item=item, body=body)
    body.grown_at = now - 10.0
    assert svc._stalled(fwd, now) is None
    body.grown_at = now - 50.0
    assert svc._stalled(fwd, now) == pytest.approx(50.0)


def test_giving_up_on_an_upload_neither_requeues_nor_counts_its_chunks_resent() -> None:
    """A's hung-relay detector gives up on the upload's chunks: the channels carrying them
    break, but the chunks must not go back to the queue (another channel would send them to
    the hung relay) nor count as re-sent; the channel's other chunks do go again."""
    metrics = Metrics()
    pc = chm.PeerChannels(site="A", peer="R", keys=None, metrics=metrics)  # type: ignore[arg-type]
    a, b = socket.socketpair()
    chan = object.__new__(chm._Channel)
    chan.owner, chan.sock, chan.session, chan.tls = pc, a, None, False
    chan.window = ch.ChannelWindow(2)
    chan.retiring = chan.broken = False
    chan.moved_at, chan.acked = time.monotonic(), 0
    pc.channels.append(chan)
    mine = OutgoingChunk(upload="u1", digest="00" * 32, locations=(), raw_length=10,
                         encoding="identity", body_blake3="00" * 32, body=b"x" * 10)
    other = OutgoingChunk(upload="u2", digest="11" * 32, locations=(), raw_length=10,
                          encoding="identity", body_blake3="11" * 32, body=b"y" * 10)
    queued = OutgoingChunk(upload="u1", digest="22" * 32, locations=(), raw_length=10,
                           encoding="identity", body_blake3="22" * 32, body=b"z" * 10)
    chan.window.sent(mine)
    chan.window.sent(other)
    pc.queue.append(queued)
    error = TransportError("hung", peer="R")
    assert pc.give_up("u1", error) == 1
    assert list(pc.queue) == [other]
    assert metrics.chunks_resent.labels("R")._value.get() == 1  # other, not mine
    assert mine.done.exception(0) is error
    assert queued.done.exception(0) is error
    assert chan.broken
    b.close()


# -- authorization of relayed uploads ----------------------------------------------------------


def _service(tmp_path: Path, journal: Journal, region: str = "eu-central") -> rl.RelayService:
    return rl.RelayService(
        site="R", region=region,
        settings=RelaySettings(for_peers=["A"], destinations=["B"]),
        spill_dir=tmp_path / "spill", links={"B": object(), "C": object()},  # type: ignore[dict-item]
        channels={}, traffic={}, data_address=None,  # type: ignore[arg-type]
        metrics=Metrics(), journal=journal,
    )  # fmt: skip


def test_uploads_restored_from_the_journal_are_checked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay restarted after its settings or region changed goes on passing on only what it
    would accept now: the others are forgotten (and said so), not relayed on the strength of
    an old row."""
    journal = Journal(tmp_path / "journal.sqlite")
    now = time.time()
    rows = {
        "ok": RelayedUpload("ok", "A", "B", "B", (), now, "sync", ("eu-central",)),
        "anywhere": RelayedUpload("anywhere", "A", "B", "B", (), now, "sync", ()),
        "not-for-C": RelayedUpload("not-for-C", "C", "B", "B", (), now, "sync", ()),
        "not-to-C": RelayedUpload("not-to-C", "A", "C", "C", (), now, "sync", ()),
        "us-only": RelayedUpload("us-only", "A", "B", "B", (), now, "sync", ("us-east",)),
        "unrecorded": RelayedUpload("unrecorded", "A", "B", "B", (), now, "sync", None),
    }
    for row in rows.values():
        journal.add_relayed(row)
    with caplog.at_level("WARNING", logger="transferd.relay"):
        svc = _service(tmp_path, journal)
    assert sorted(svc.uploads) == ["anywhere", "ok"]
    assert sorted(r.upload for r in journal.relayed(since=0)) == ["anywhere", "ok"]
    forgotten = [r for r in caplog.records if r.getMessage() == "relay.forgotten"]
    assert len(forgotten) == 4
    assert journal.relayed(since=0)[0].residency in {("eu-central",), ()}
    journal.close()


def test_a_relayed_upload_cannot_be_reopened_by_another_peer(tmp_path: Path) -> None:
    """An upload passing through is bound to the peer that opened it here: another peer the
    relay also serves may not re-open it (and redirect it, or take its chunks' receipts)."""
    journal = Journal(tmp_path / "journal.sqlite")
    svc = _service(tmp_path, journal)
    svc.settings = RelaySettings(for_peers=["A", "C"], destinations=["B"])
    svc.uploads["u1"] = rl._Relayed("u1", "A", "B", "B", ())
    intent = SimpleNamespace(upload="u1", dest_site="B", residency=[])
    assert svc.check(intent, "A", ()) == "B"  # type: ignore[arg-type]
    with pytest.raises(PolicyViolation, match="relayed here for A, not C"):
        svc.check(intent, "C", ())  # type: ignore[arg-type]
    assert svc.metrics.value("transferd_policy_refusals_total", side="relay") == 1
    journal.close()
