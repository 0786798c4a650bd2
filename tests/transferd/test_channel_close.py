"""A data channel's socket is closed by the last of its two threads to end, never under a
call one of them may be making with its descriptor's number (a number closed there is soon a
new channel's socket, which that thread would read from or write into)."""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

import pytest

from transferd.net import channels as chm
from transferd.net.channels import OutgoingChunk
from transferd.protocol import channel as ch
from transferd.site.metrics import Metrics


def test_a_channel_broken_by_another_thread_is_closed_by_its_last_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stall check breaks a channel (from the event loop's thread) while its sender thread
    is inside a write (as in `os.sendfile(sock.fileno(), ...)` or OpenSSL's write loop):
    the socket is shut down, the receipt thread ends, and the descriptor stays open (its
    number not reusable) until the sender thread has left the write and ended too."""
    inside, release = threading.Event(), threading.Event()

    def write(self: Any, seq: int, item: OutgoingChunk) -> None:
        inside.set()
        release.wait()
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # a write on a shut-down socket

    monkeypatch.setattr(chm._Channel, "_write", write)
    a, b = socket.socketpair()
    pc = chm.PeerChannels(site="A", peer="B", keys=None, metrics=Metrics())  # type: ignore[arg-type]
    try:
        chan = chm._Channel(pc, a, ch.Session(b"k" * 32), False, 2)
        pc.channels.append(chan)
        pc.submit(OutgoingChunk(upload="u1", digest="00" * 32, locations=(), raw_length=10,
                                encoding="identity", body_blake3="00" * 32, body=b"x" * 10))
        assert inside.wait(30)
        fd = a.fileno()
        sender, receiver = chan.threads
        chan._break(TimeoutError("nothing moved for 30 s"))
        receiver.join(30)
        assert not receiver.is_alive()  # the shutdown ended its read
        # Still open: the sender thread is inside a call with the number in hand.
        assert a.fileno() == fd
        release.set()
        sender.join(30)
        assert not sender.is_alive()
        assert a.fileno() == -1  # closed by the last thread to end
    finally:
        release.set()
        pc.close()
        b.close()
