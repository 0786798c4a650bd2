"""The CPU floor of transferd's loopback data path, without the daemons: one thread reads each
8 MiB chunk of the cached benchmark file in 1 MiB pieces, hashes each piece (blake3) and sends
it over a loopback TCP connection; another receives each piece into a page-aligned buffer and
hashes it, as the data channels do (`net/channels.py`: `_write_one_pass`, `_recv_hashed`).
What a daemon spends per GiB above this is its own (event loops, chunk workers, probes, CLI).

Sending modes (each the same bytes, CPU-s of the two threads from getrusage(RUSAGE_THREAD)):
- preadv:        preadv into one 1 MiB buffer, blake3, sendall (what one pass does today)
- mmap-send:     the chunk mapped, blake3 and sendall from the mapping (no read copy)
- mmap-sendfile: the chunk mapped for blake3, the piece sent with sendfile (no user copy)
and `blake3-only`: one thread hashing a cache-hot 1 MiB buffer (the hash's own floor).

    python -m benchmarks.loopback_floor --mib 512 --repeat 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import sys
import threading
from collections.abc import Callable

import blake3

from benchmarks.datasets import dataset
from benchmarks.scenario import DataKind

CHUNK_BYTES = 8 << 20  # transferd's default chunk
PIECE_BYTES = 1 << 20  # ONE_PASS_PIECE_BYTES, RECEIVE_PIECE_BYTES


def _thread_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    return sender, receiver


def _receive(sock: socket.socket, total: int, out: list[float]) -> None:
    buf = mmap.mmap(-1, CHUNK_BYTES)
    view = memoryview(buf)
    started = _thread_cpu_s()
    left = total
    while left > 0:
        hasher = blake3.blake3()
        got = 0
        while got < CHUNK_BYTES:
            n = sock.recv_into(view[got:got + PIECE_BYTES], min(PIECE_BYTES, CHUNK_BYTES - got),
                               socket.MSG_WAITALL)
            if not n:
                raise ConnectionError("the sending thread closed early")
            hasher.update(view[got:got + n])
            got += n
        left -= CHUNK_BYTES
    out.append(_thread_cpu_s() - started)
    view.release()
    buf.close()


def _send_preadv(sock: socket.socket, fd: int, start: int, total: int) -> None:
    buf = mmap.mmap(-1, PIECE_BYTES)
    view = memoryview(buf)
    for chunk in range(start, start + total, CHUNK_BYTES):
        hasher = blake3.blake3()
        for offset in range(chunk, chunk + CHUNK_BYTES, PIECE_BYTES):
            n = os.preadv(fd, [view], offset)
            hasher.update(view[:n])
            sock.sendall(view[:n])
    view.release()
    buf.close()


def _send_mapped(sock: socket.socket, fd: int, start: int, total: int, sendfile: bool) -> None:
    for chunk in range(start, start + total, CHUNK_BYTES):
        mapped = mmap.mmap(fd, CHUNK_BYTES, prot=mmap.PROT_READ, offset=chunk)
        view = memoryview(mapped)
        hasher = blake3.blake3()
        for offset in range(0, CHUNK_BYTES, PIECE_BYTES):
            hasher.update(view[offset:offset + PIECE_BYTES])
            if sendfile:
                sent = 0
                while sent < PIECE_BYTES:
                    sent += os.sendfile(sock.fileno(), fd, chunk + offset + sent,
                                        PIECE_BYTES - sent)
            else:
                sock.sendall(view[offset:offset + PIECE_BYTES])
        view.release()
        mapped.close()


SendMode = Callable[[socket.socket, int, int, int], None]
MODES: dict[str, SendMode] = {
    "preadv": _send_preadv,
    "mmap-send": lambda s, fd, start, total: _send_mapped(s, fd, start, total, False),
    "mmap-sendfile": lambda s, fd, start, total: _send_mapped(s, fd, start, total, True),
}


def measure(mode: SendMode, fd: int, start: int, total: int) -> tuple[float, float]:
    """CPU-s of the sending and the receiving thread for `total` bytes from `start`."""
    sender, receiver = _pair()
    got: list[float] = []
    thread = threading.Thread(target=_receive, args=(receiver, total, got))
    thread.start()
    try:
        began = _thread_cpu_s()
        mode(sender, fd, start, total)
        sent = _thread_cpu_s() - began
    finally:
        sender.close()
        thread.join()
        receiver.close()
    if not got:
        raise ConnectionError("the receiving thread failed")
    return sent, got[0]


def blake3_only(total: int) -> float:
    piece = memoryview(os.urandom(PIECE_BYTES))
    hasher = blake3.blake3()
    began = _thread_cpu_s()
    for _ in range(total // PIECE_BYTES):
        hasher.update(piece)
    return _thread_cpu_s() - began


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loopback_floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="bytes per measurement (MiB)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.mib < 8 or args.mib % 8 or args.mib > 2048:
        parser.error("--mib: a multiple of 8 from 8 to 2048 (the 2 GiB benchmark file)")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    total = args.mib << 20
    path = dataset(DataKind.INCOMPRESSIBLE, 2048)
    per_gib = (1 << 30) / total
    print(f"{args.mib} MiB per run of {path.name}; CPU-s per GiB (sending + receiving thread)")
    fd = os.open(path, os.O_RDONLY)
    try:
        for trial in range(args.repeat):
            start = (trial % ((2048 << 20) // total)) * total  # another part each time
            for name, mode in MODES.items():
                sent, received = measure(mode, fd, start, total)
                print(f"  #{trial + 1} {name:14s} {sent * per_gib:.2f} + {received * per_gib:.2f}"
                      f" = {(sent + received) * per_gib:.2f}")
            print(f"  #{trial + 1} {'blake3-only':14s} {blake3_only(total) * per_gib:.2f}"
                  " (one thread, one hash pass)")
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
