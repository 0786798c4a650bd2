"""The TCP echo that checks a link's achieved RTT before anything is measured (ping under-reports
NFQUEUE delay: ICMP can take a different path through the rules, and ping's own timing is not what
a TCP flow sees). `serve` echoes every byte back; `client` times `count` small round trips with
TCP_NODELAY and prints them as JSON milliseconds (with `--times`, as [Unix time it started, ms]
pairs, so a caller can keep the round trips that ran while something else did: the
interactive-during-bulk floor counts those that started while the bulk transfer ran).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

__all__ = ["main", "started_by"]


def _serve(host: str, port: int) -> None:
    with socket.create_server((host, port), reuse_port=False) as server:
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(65536):
                    conn.sendall(data)


def _client(host: str, port: int, count: int, size: int, timeout_s: float,
            interval_s: float = 0.0, start_delay_s: float = 0.0) -> list[tuple[float, float]]:
    """(Unix time the round trip started, its milliseconds) per round trip."""
    payload = b"x" * size
    rtts: list[tuple[float, float]] = []
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(start_delay_s)
        for i in range(count):
            if i and interval_s:
                time.sleep(interval_s)
            started, started_at = time.perf_counter(), time.time()
            conn.sendall(payload)
            got = 0
            while got < size:
                chunk = conn.recv(size - got)
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += len(chunk)
            rtts.append((started_at, (time.perf_counter() - started) * 1e3))
    return rtts


def started_by(rtts: list[tuple[float, float]], until: float) -> list[float]:
    """The milliseconds of the round trips (`--times` pairs) that started by Unix time `until`:
    those that ran under a load that ended then."""
    return [ms for started, ms in rtts if started <= until]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._echo")
    parser.add_argument("mode", choices=["serve", "client"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--interval-ms", type=float, default=0.0)  # pause between round trips
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--times", action="store_true",
                        help="print [start time, ms] pairs, not the milliseconds alone")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        _serve(args.host, args.port)
        return 0
    rtts = _client(args.host, args.port, args.count, args.size, args.timeout_s,
                   args.interval_ms / 1e3, args.start_delay_s)
    print(json.dumps(rtts if args.times else [ms for _, ms in rtts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
