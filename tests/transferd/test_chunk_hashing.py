"""The bulk path hashes each chunk once per side, in pieces: the sender through a small reused
buffer (`SourceFile.hash_span`), the receiver as the body arrives (`channels._recv_hashed`).
Both must give the chunk's blake3 whatever the piece boundaries, and fail cleanly."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import blake3
import pytest

from transferd.errors import IntegrityError
from transferd.net import channels
from transferd.site.source import HASH_PIECE_BYTES, SourceFile


def test_a_span_hashes_to_its_bytes_across_piece_boundaries(tmp_path: Path) -> None:
    data = os.urandom(2 * HASH_PIECE_BYTES + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with SourceFile(str(path)) as source:
        for offset, length in [(0, len(data)), (7, HASH_PIECE_BYTES + 1),
                               (HASH_PIECE_BYTES - 3, 6), (len(data) - 1, 1), (0, 0)]:
            assert source.hash_span(offset, length) == blake3.blake3(
                data[offset : offset + length]).hexdigest()


def test_a_file_that_shrank_inside_a_span_is_an_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * HASH_PIECE_BYTES))
    with SourceFile(str(path)) as source:
        os.truncate(path, HASH_PIECE_BYTES + 10)  # cut while it is being sent
        with pytest.raises(IntegrityError, match="changed while being sent"):
            source.hash_span(0, 3 * HASH_PIECE_BYTES)


def _send_in_bursts(sock: socket.socket, data: bytes, burst: int, close: bool) -> None:
    for i in range(0, len(data), burst):
        sock.sendall(data[i : i + burst])
    if close:
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("burst", [1000, 64 * 1024, 3 * 1024 * 1024])
def test_a_body_is_hashed_as_it_arrives_whatever_the_bursts(burst: int) -> None:
    body = os.urandom(2 * channels.RECEIVE_PIECE_BYTES + 4097)
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=_send_in_bursts, args=(a, body, burst, False))
        sender.start()
        buf = bytearray(len(body))
        got = channels._recv_hashed(b, memoryview(buf))
        sender.join()
    assert bytes(buf) == body
    assert got == blake3.blake3(body).hexdigest()


def test_a_channel_that_ends_before_or_inside_a_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.shutdown(socket.SHUT_WR)
        assert channels._recv_hashed(b, memoryview(bytearray(10))) is None  # a clean end
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=_send_in_bursts, args=(
            a, os.urandom(channels.RECEIVE_PIECE_BYTES + 5), 1 << 16, True))
        sender.start()
        with pytest.raises(ConnectionError):
            channels._recv_hashed(b, memoryview(bytearray(2 * channels.RECEIVE_PIECE_BYTES)))
        sender.join()
