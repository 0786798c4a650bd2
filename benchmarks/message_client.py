"""`python -m benchmarks.message_client [--count N] [--rounds R]`: what a message costs the
program that sends it, through the local HTTP API (`transferd.send_message`, aiohttp) against
the message socket (`transferd.MessageSocket`), side by side in one run.

Two real daemons (`transferd serve`, A and B) on 127.0.0.1, no impairment; this process sends
`--count` 4 KiB interactive messages A -> B, one every 5 ms (the interactive-during-bulk
driver's schedule), on each path in turn, `--rounds` times interleaved. Per path and round:
the client's CPU per message (user + system, getrusage) and the latency p50 / p99 from the
client. The connections are opened before the messages start (aiohttp's pool warmed by one
message, the socket connected), so neither pays its set-up in the numbers. Prints a table and,
with --json PATH, writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

INTERVAL_S = 0.005
SIZE = 4096


async def _one_path(url: str, keys: Path, transport: str, count: int) -> dict[str, Any]:
    import aiohttp

    import transferd
    from transferd.site.keys import Keyring

    keyring = Keyring.load(keys, "A", [])
    sign = transferd.local_signer(keyring)
    body = os.urandom(SIZE)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session, \
            transferd.MessageSocket(url, keyring) as sock:

        async def send() -> object:
            if transport == "socket":
                return await sock.send("B", body, deadline_ms=1000)
            return await transferd.send_message(url, "B", body, deadline_ms=1000,
                                                session=session, sign=sign)

        await send()  # warm: the pool's connection, or the socket's handshake

        async def one() -> None:
            started = time.perf_counter()
            await send()
            latencies.append((time.perf_counter() - started) * 1e3)

        before = resource.getrusage(resource.RUSAGE_SELF)
        async with asyncio.TaskGroup() as tg:
            for _ in range(count):
                tg.create_task(one())
                await asyncio.sleep(INTERVAL_S)
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    latencies.sort()
    return {"transport": transport, "cpu_ms_per_message": round(cpu_s / count * 1e3, 3),
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2)}


async def _rounds(url: str, keys: Path, count: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for round_no in range(rounds):
        for transport in ("http", "socket"):
            rows.append({"round": round_no, **await _one_path(url, keys, transport, count)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _run(count: int, rounds: int) -> list[dict[str, Any]]:
    from transferd.testing import free_port, write_site_configs

    with tempfile.TemporaryDirectory(prefix="message-client-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        ports = {"A": free_port(), "B": free_port()}
        paths = write_site_configs(root, ports)
        daemons = []
        for site in ("B", "A"):
            log = stack.enter_context((root / f"{site}.log").open("wb"))
            daemons.append(subprocess.Popen([sys.executable, "-m", "transferd", "serve",
                                             "--config", str(paths[site])],
                                            stdout=subprocess.DEVNULL, stderr=log))
        try:
            for port in ports.values():
                wait_local_port(port)
            return asyncio.run(_rounds(f"http://127.0.0.1:{ports['A']}", root / "keys", count,
                                       rounds))
        finally:
            for proc in daemons:
                proc.terminate()
            for proc in daemons:
                proc.wait(20)


def wait_local_port(port: int, timeout_s: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:`port` (a daemon just started). A hang guard: a
    daemon's start costs about 2 CPU-s of imports, tens of seconds of wall time on a loaded
    core with the other daemon starting beside it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.message_client")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = _run(args.count, args.rounds)
    print("| path | client CPU per message (ms) | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|---:|")
    for transport in ("http", "socket"):
        mine = [r for r in rows if r["transport"] == transport]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("cpu_ms_per_message", "p50_ms", "p99_ms")}
        print(f"| {transport} | {med['cpu_ms_per_message']:.3f} | {med['p50_ms']:.2f} | "
              f"{med['p99_ms']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"count": args.count, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
