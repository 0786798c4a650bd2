"""The interactive-message load for interactive-during-bulk: runs inside the sending site, waits
`--start-delay-s` (the bulk transfer is under way by then), then asks the local transferd to
deliver `--count` messages of `--size` bytes to the peer, one every `--interval-ms`, each with a
deadline, through transferd's public client: by default the message socket (`MessageSocket`,
one connection, requests pipelined, connected before the first message), with `--transport
http` the local HTTP API (`send_message`, aiohttp, signed with `local_signer`). Each message's
latency is the wall time from the request until the daemon reports it delivered (the sender's
view, one round trip at least). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    # Imported by name: the message client arrives with the traffic-classes work (issue 4),
    # and the harness checks for it before starting this driver.
    api: Any = importlib.import_module("transferd")
    keys: Any = importlib.import_module("transferd.site.keys")
    keyring = keys.Keyring.load(Path(args.keys), args.site, [])
    sign = api.local_signer(keyring)
    body = os.urandom(args.size)
    latencies: list[float] = []
    daemon_latencies: list[float] = []  # the sending daemon's own view: queued -> peer's answer
    outside: list[float] = []
    sent_at: list[float] = []  # Unix time of each request, to tell which overlapped the bulk
    misses: list[str] = []
    errors: list[str] = []
    # Per message: its id, the Unix times this process sent it and had its receipt, for
    # `benchmarks.message_trace` (joined with the daemons' debug lines by id).
    trace: list[tuple[str, float, float]] = []
    n_late = 0

    socket_client: Any = None
    if args.transport == "socket":
        socket_client = api.MessageSocket(args.url, keyring)
        await socket_client.connect()

    async def send(session: aiohttp.ClientSession) -> Any:
        if socket_client is not None:
            return await socket_client.send(args.peer, body,
                                            traffic_class=api.TrafficClass.INTERACTIVE,
                                            deadline_ms=args.deadline_ms, wait=True)
        return await api.send_message(
            args.url, args.peer, body, traffic_class=api.TrafficClass.INTERACTIVE,
            deadline_ms=args.deadline_ms, wait=True, session=session, sign=sign)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal n_late
        started = time.perf_counter()
        sent_at.append(time.time())
        sent = sent_at[-1]
        try:
            receipt = await send(session)
        except Exception as exc:  # a failed message is data here: counted with its reason
            errors.append(repr(exc)[:200])
            return
        latencies.append((time.perf_counter() - started) * 1e3)
        trace.append((receipt.id, sent, sent + latencies[-1] / 1e3))
        if receipt.latency_ms is not None:
            daemon_latencies.append(receipt.latency_ms)
            # This message's time outside the sending daemon's queued -> answered: the local
            # API hop both ways and this process (its CPU and its waits for one).
            outside.append(latencies[-1] - receipt.latency_ms)
        n_late += bool(receipt.late)
        if receipt.budget_miss:
            misses.append(receipt.budget_miss)

    # This process's own event loop: a 10 ms timer's lateness while the messages go out. The
    # client is a normal-priority process on the same cores as the bulk; its waits for a CPU
    # are in its latencies and not in the daemon's (`daemon_latencies_ms`).
    late: list[float] = []

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.01)
            late.append(loop.time() - t0 - 0.01)

    await asyncio.sleep(args.start_delay_s)
    sched0 = _schedstat()
    ticker = asyncio.get_running_loop().create_task(tick())
    # No client-side connection cap: a request queued in aiohttp's pool would count its wait
    # against transferd.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session, \
            asyncio.TaskGroup() as group:
        for _ in range(args.count):
            group.create_task(one(session))
            await asyncio.sleep(args.interval_ms / 1e3)
    ticker.cancel()
    sched1 = _schedstat()
    if socket_client is not None:
        socket_client.close()
    return {"outside_daemon_ms": outside,
            "client_sched": {  # this process's loop thread while the messages went out
                "ran_ms": round((sched1[0] - sched0[0]) / 1e6, 1),
                "cpu_wait_ms": round((sched1[1] - sched0[1]) / 1e6, 1),
                "slices": sched1[2] - sched0[2]} if sched0 and sched1 else None,
            "latencies_ms": latencies, "daemon_latencies_ms": daemon_latencies,
            "client_loop": {"late_20ms": sum(v >= 0.02 for v in late),
                            "late_max_ms": round(max(late, default=0.0) * 1e3, 1)},
            "sent_at": sent_at, "late": n_late, "transport": args.transport,
            "budget_misses": len(misses), "miss_reasons": sorted(set(misses))[:5],
            "errors": errors[:5], "n_errors": len(errors), "trace": trace}


def _schedstat() -> tuple[int, ...] | None:
    """This thread's time on a CPU and waiting in a run queue (ns), and its time slices."""
    try:
        return tuple(int(v) for v in Path("/proc/thread-self/schedstat").read_text().split())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._interactive")
    parser.add_argument("--url", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--keys", required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--deadline-ms", type=float, default=50)
    parser.add_argument("--interval-ms", type=float, default=5)
    parser.add_argument("--start-delay-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--transport", choices=["socket", "http"], default="socket",
                        help="the message socket (default) or the local HTTP API")
    args = parser.parse_args(argv)
    result = asyncio.run(_drive(args))
    args.out.write_text(json.dumps(result))
    # Also into this process's log, which NB_KEEP_LOGS keeps (the --out file is the run's).
    print(json.dumps({"trace": result["trace"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
