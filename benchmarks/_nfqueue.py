"""The userspace delay/loss emulator for kernels without sch_netem: a pure-Python nfnetlink_queue
client (AF_NETLINK, no compiled code) that holds queued packets for delay +- jitter and releases
them with batched verdicts, dropping a seeded fraction for loss.

Theory of operation. iptables/nft rules send a link's packets to NFQUEUE numbers (one per
direction). The kernel keeps each packet and tells us only its metadata (COPY_META, GSO packets
left whole). `DelayLine` (pure: time is a parameter) gives each packet a release time
`max(previous release, arrival + delay + U(-jitter, +jitter))`, so a direction stays FIFO and one
NFQNL_MSG_VERDICT_BATCH "accept every id <= N" releases all due packets at once. A lost packet gets
its own NF_DROP verdict on arrival (per-packet mode), which removes it from the queue, so the next
batch verdict still covers only packets that were meant to pass. Drops that were *not* chosen
(kernel queue full, socket buffer overrun) are counted separately: a run with any is rejected.

Run as ``python -m benchmarks._nfqueue --queue 0 --queue 1 --delay-ms 20 ... --stats FILE`` inside
the site's namespace; it prints ``ready`` once bound, writes stats on SIGUSR1 and at exit (SIGTERM
releases everything still held, then exits 0).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DelayLine", "NfQueueSocket", "main", "parse_datagram"]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_DROP = 0
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33

# Packets the kernel may hold per queue: must exceed a long fat link's bandwidth-delay product in
# packets (1 Gbit/s x 100 ms RTT ~ 8,300 MTU packets) with room to spare.
QUEUE_MAXLEN = 65_536
RCVBUF_BYTES = 64 * 1024 * 1024


@dataclass
class DelayLine:
    """Release schedule for the packets of several FIFO queues (pure; `now` is a parameter)."""

    delay_s: float
    jitter_s: float = 0.0
    loss: float = 0.0  # fraction 0..1
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _held: dict[int, collections.deque[tuple[float, int]]] = field(default_factory=dict)
    _last_release: dict[int, float] = field(default_factory=dict)
    received: int = 0
    lost: int = 0
    max_held: int = 0
    held_now: int = 0

    def arrive(self, queue: int, packet_id: int, now: float) -> bool:
        """Record a packet; False when it is to be dropped (emulated loss)."""
        self.received += 1
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return False
        delay = self.delay_s
        if self.jitter_s:
            delay = max(0.0, delay + self.rng.uniform(-self.jitter_s, self.jitter_s))
        release = max(self._last_release.get(queue, 0.0), now + delay)
        self._last_release[queue] = release
        self._held.setdefault(queue, collections.deque()).append((release, packet_id))
        self.held_now += 1
        self.max_held = max(self.max_held, self.held_now)
        return True

    def due(self, now: float) -> list[tuple[int, int]]:
        """(queue, highest packet id to accept) for every queue with packets due at `now`."""
        out = []
        for queue, held in self._held.items():
            last_id = -1
            while held and held[0][0] <= now:
                last_id = held.popleft()[1]
                self.held_now -= 1
            if last_id >= 0:
                out.append((queue, last_id))
        return out

    def release_all(self) -> list[tuple[int, int]]:
        return self.due(float("inf"))

    def next_deadline(self) -> float | None:
        heads = [held[0][0] for held in self._held.values() if held]
        return min(heads) if heads else None


def _nla(attr_type: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, attr_type) + data + b"\0" * (-length % 4)


class NfQueueSocket:
    """One AF_NETLINK socket bound to several NFQUEUE numbers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        self.sock.bind((0, 0))
        self._seq = 0
        self.verdict_errors = 0
        # Verdicts for packets the kernel already dropped itself: it flushes a queue's packets
        # for a device that goes down (a link flap), which is the flap's loss, not ours.
        self.verdicts_for_flushed = 0

    def _message(self, msg_type: int, flags: int, queue: int, attrs: bytes) -> bytes:
        self._seq += 1
        payload = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
        header = struct.pack(
            "=IHHII", 16 + len(payload), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self._seq, 0
        )
        return header + payload

    def _request_acked(self, queue: int, attrs: bytes) -> None:
        msg = self._message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, attrs)
        self.sock.send(msg)
        reply = self.sock.recv(65536)
        _length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply, 0)
        if msg_type == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"nfnetlink_queue config of queue {queue}: "
                              f"{os.strerror(-error)}")

    def bind(self, queue: int) -> None:
        self._request_acked(queue, _nla(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0,
                                                                  socket.AF_INET)))
        self._request_acked(queue, _nla(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._request_acked(queue, _nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
        # GSO: the kernel hands us whole super-packets instead of segmenting them first.
        self._request_acked(
            queue,
            _nla(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
            + _nla(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)),
        )

    def unbind(self, queue: int) -> None:
        msg = self._message(NFQNL_MSG_CONFIG, NLM_F_REQUEST, queue,
                            _nla(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0,
                                                           socket.AF_INET)))
        self.sock.send(msg)

    def verdict(self, queue: int, packet_id: int, verdict: int, *, batch: bool) -> None:
        msg_type = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
        attrs = _nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self.sock.send(self._message(msg_type, NLM_F_REQUEST, queue, attrs))

    def parse(self, buf: memoryview, size: int) -> list[tuple[int, int]]:
        packets, flushed, errors = parse_datagram(buf, size)
        self.verdicts_for_flushed += flushed
        self.verdict_errors += errors
        return packets


def parse_datagram(buf: memoryview | bytes, size: int) -> tuple[list[tuple[int, int]], int, int]:
    """(queue, packet id) of each queued-packet message in one netlink datagram, plus the counts
    of error replies: verdicts for packets the kernel had already flushed (ENOENT), and others."""
    out = []
    flushed = errors = 0
    offset = 0
    while offset + 16 <= size:
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", buf, offset)
        if length < 16:
            break
        if msg_type == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", buf, offset + 16)
            if error == -errno.ENOENT:
                flushed += 1
            elif error:
                errors += 1
        elif msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            (queue,) = struct.unpack_from("!H", buf, offset + 18)
            pos, end = offset + 20, offset + length
            while pos + 4 <= end:
                attr_len, attr_type = struct.unpack_from("=HH", buf, pos)
                if attr_len < 4:
                    break
                if attr_type & NLA_TYPE_MASK == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from("!I", buf, pos + 4)
                    out.append((queue, packet_id))
                    break
                pos += (attr_len + 3) & ~3
        offset += (length + 3) & ~3
    return out, flushed, errors


def kernel_queue_drops(queues: list[int]) -> dict[str, int]:
    """Packets the kernel dropped for our queues: queue full, or our socket buffer overran."""
    drops = {"queue_dropped": 0, "user_dropped": 0}
    try:
        text = Path("/proc/net/netfilter/nfnetlink_queue").read_text()
    except OSError:
        return drops
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 7 and int(cols[0]) in queues:
            drops["queue_dropped"] += int(cols[5])
            drops["user_dropped"] += int(cols[6])
    return drops


WIRE_RT_PRIORITY = 50


def run_like_a_wire() -> str:
    """Schedule this emulator ahead of the processes under test, as netem is (it runs in the
    kernel's softirq context): SCHED_FIFO when allowed, else the highest nice value we may take.
    Otherwise the endpoints' own CPU load delays packets in the emulator, and a tool's latency
    would be charged for the emulator's scheduling. Returns the policy it got (for the stats)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(WIRE_RT_PRIORITY))
        return f"SCHED_FIFO {WIRE_RT_PRIORITY}"
    except (AttributeError, OSError):
        pass
    for niceness in (-20, -10, 0):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            return f"nice {niceness}"
        except OSError:
            continue
    return "default"


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """The link spec and stats file every userspace emulator takes (see `delay_line`)."""
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", type=Path, required=True)


def delay_line(args: argparse.Namespace) -> DelayLine:
    return DelayLine(args.delay_ms / 1e3, args.jitter_ms / 1e3, args.loss_pct / 100,
                     random.Random(args.seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._nfqueue")
    parser.add_argument("--queue", type=int, action="append", required=True)
    add_link_arguments(parser)
    args = parser.parse_args(argv)

    line = delay_line(args)
    nfq = NfQueueSocket()
    for queue in args.queue:
        nfq.bind(queue)
    nfq.sock.setblocking(False)

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    pending: set[int] = set()
    signal.signal(signal.SIGTERM, lambda s, f: pending.add(s))
    signal.signal(signal.SIGINT, lambda s, f: pending.add(s))
    signal.signal(signal.SIGUSR1, lambda s, f: pending.add(s))

    started = time.monotonic()
    counters = {"enobufs": 0, "released_batches": 0, "stats_written": 0}
    scheduling = run_like_a_wire()

    def write_stats() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        counters["stats_written"] += 1
        stats = {
            "seq": counters["stats_written"],
            "received": line.received,
            "lost": line.lost,
            "max_held": line.max_held,
            "held_now": line.held_now,
            "enobufs": counters["enobufs"],
            "verdict_errors": nfq.verdict_errors,
            "verdicts_for_flushed": nfq.verdicts_for_flushed,
            "batches": counters["released_batches"],
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "wall_s": time.monotonic() - started,
            "scheduling": scheduling,
            **kernel_queue_drops(args.queue),
        }
        tmp = args.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(args.stats)

    def release(now: float) -> None:
        for queue, last_id in line.due(now):
            nfq.verdict(queue, last_id, NF_ACCEPT, batch=True)
            counters["released_batches"] += 1

    write_stats()
    print("ready", flush=True)
    buf = bytearray(65536)
    view = memoryview(buf)
    stopping = False
    while not stopping:
        deadline = line.next_deadline()
        timeout = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([nfq.sock, wake_r], [], [], timeout)
        if wake_r in readable:
            try:
                wake_r.recv(64)
            except BlockingIOError:
                pass
        for _ in range(4096):  # drain, bounded so due packets are never starved
            try:
                size = nfq.sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    counters["enobufs"] += 1
                    continue
                raise
            now = time.monotonic()
            for queue, packet_id in nfq.parse(view, size):
                if not line.arrive(queue, packet_id, now):
                    nfq.verdict(queue, packet_id, NF_DROP, batch=False)
            release(now)
        release(time.monotonic())
        while pending:
            sig = pending.pop()
            if sig == signal.SIGUSR1:
                write_stats()
            else:
                stopping = True
    for queue, last_id in line.release_all():
        nfq.verdict(queue, last_id, NF_ACCEPT, batch=True)
    write_stats()
    for queue in args.queue:
        nfq.unbind(queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
