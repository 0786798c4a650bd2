"""The TUN-pair fallback emulator, for hosts without iptables/nft NFQUEUE: one process owns a TUN
device in each site's namespace (created after `setns` into it), reads every packet one site
sends, holds it for delay +- jitter (the same `DelayLine` as the NFQUEUE emulator, so a direction
stays FIFO), drops the seeded loss fraction, and writes it into the other site's TUN.

Run as ``python -m benchmarks._tun --ns-a NS --ns-b NS --dev wan0 --delay-ms 20 --stats FILE``
in the host namespace; prints ``ready`` once both devices exist, writes stats on SIGUSR1 and at
exit. The devices vanish when the process exits.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

from benchmarks._nfqueue import add_link_arguments, delay_line, run_like_a_wire

__all__ = ["main", "open_tun_in"]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun_in(netns: str, dev: str) -> int:
    """A TUN device named `dev` inside namespace `netns`; returns its non-blocking fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(ns_fd)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._tun")
    parser.add_argument("--ns-a", required=True)
    parser.add_argument("--ns-b", required=True)
    parser.add_argument("--dev", default="wan0")
    add_link_arguments(parser)
    args = parser.parse_args(argv)

    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = [open_tun_in(args.ns_a, args.dev), open_tun_in(args.ns_b, args.dev)]
    ctypes.CDLL(None, use_errno=True).setns(host_ns, CLONE_NEWNET)
    os.close(host_ns)
    line = delay_line(args)
    # queue 0 carries A -> B (read from A's device), queue 1 carries B -> A.
    held: list[collections.deque[tuple[int, bytes]]] = [collections.deque(), collections.deque()]
    next_id = [0, 0]
    counters = {"write_errors": 0, "down_drops": 0, "stats_written": 0}
    scheduling = run_like_a_wire()

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    pending: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: pending.add(s))
    started = time.monotonic()

    def write_stats() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        counters["stats_written"] += 1
        stats = {"seq": counters["stats_written"], "received": line.received, "lost": line.lost,
                 "max_held": line.max_held, "queue_dropped": 0, "user_dropped": 0,
                 "enobufs": 0, "verdict_errors": counters["write_errors"],
                 "dropped_link_down": counters["down_drops"],
                 "cpu_s": usage.ru_utime + usage.ru_stime,
                 "scheduling": scheduling,
                 "wall_s": time.monotonic() - started}
        tmp = args.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(args.stats)

    def release(now: float) -> None:
        for queue, last_id in line.due(now):
            out_fd = fds[1 - queue]
            while held[queue] and held[queue][0][0] <= last_id:
                _, packet = held[queue].popleft()
                try:
                    os.write(out_fd, packet)
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        # The far device is down (a link flap, or not up yet at start): the
                        # link lost the packet, not the emulator.
                        counters["down_drops"] += 1
                        continue
                    if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                        raise
                    counters["write_errors"] += 1

    write_stats()
    print("ready", flush=True)
    stopping = False
    while not stopping:
        deadline = line.next_deadline()
        timeout = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([*fds, wake_r.fileno()], [], [], timeout)
        for queue, fd in enumerate(fds):
            if fd not in readable:
                continue
            for _ in range(1024):  # bounded drain so due packets are not starved
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if line.arrive(queue, next_id[queue], now):
                    held[queue].append((next_id[queue], packet))
                next_id[queue] += 1
        if wake_r.fileno() in readable:
            try:
                wake_r.recv(64)
            except BlockingIOError:
                pass
        release(time.monotonic())
        while pending:
            if pending.pop() == signal.SIGUSR1:
                write_stats()
            else:
                stopping = True
    write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
