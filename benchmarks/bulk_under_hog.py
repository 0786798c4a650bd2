"""`python -m benchmarks.bulk_under_hog [--size-mib N] [--rounds R]`: does a bulk transfer still
progress when other work keeps every core busy and no message is moving, per
`traffic.bulk_priority` (nice, idle, adaptive), side by side in one run.

Two real daemons (`transferd serve`, A and B) on 127.0.0.1, each in a session of its own (as a
terminal or a systemd unit starts it), no impairment; one CPU hog per core (`while True: pass`,
each in its own session too: a training job's processes), then `transferd send --wait` of a
fresh random file A -> B; the policies interleaved, `--rounds` times, new daemons and file each
time. Per run: the transfer's wall time and goodput, and whether the bulk ever switched to
SCHED_IDLE (`bulk.priority_in_use` in the daemons' logs: it must not, with no message). One
run of `nice` without the hogs gives the scale. `--shared-session`: the daemons and the hogs
all in this process's session instead (one autogroup, as in one container's cgroup), where a
SCHED_IDLE thread competes by its own weight against the hogs' instead of by its session's.
`--message-every-s S`: an application on A also sends one 4 KiB message to B every S seconds
through the message socket while the bulk runs (the busy host with a steady message: what
`adaptive`'s GIL backoff was built for); each row then counts the daemons' loop stalls of 100 ms
or more, the backoffs (`bulk.priority_backoff`) and the messages' p99. `--baseline DIR`: each
policy also runs with the daemons from the tree at DIR (PYTHONPATH), interleaved.
Prints a table; --json PATH writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.message_client import wait_local_port
from benchmarks.message_trace import percentile

__all__ = ["main"]

POLICIES = ("nice", "idle", "adaptive")
TIMEOUT_S = 180.0


# The message application of --message-every-s: one MessageSocket to A, a message to B every
# argv[3] seconds until killed; one line per message, its latency in ms.
_MESSAGES = """
import asyncio, sys, time
from pathlib import Path
import transferd
from transferd.site.keys import Keyring

async def main() -> None:
    sock = transferd.MessageSocket(sys.argv[1], Keyring.load(Path(sys.argv[2]), "A", []))
    await sock.connect()
    body = bytes(4096)
    while True:
        t0 = time.perf_counter()
        await sock.send("B", body, wait=True)
        print(round((time.perf_counter() - t0) * 1e3, 2), flush=True)
        await asyncio.sleep(float(sys.argv[3]))

asyncio.run(main())
"""


def _log_counts(text: str) -> tuple[int, list[float]]:
    """Loop stalls of 100 ms or more, and each backoff's length, in a daemon's log."""
    stalls, backoffs = 0, []
    for line in text.splitlines():
        if '"loop.stall"' in line and json.loads(line).get("ms", 0) >= 100:
            stalls += 1
        elif '"bulk.priority_backoff"' in line:
            backoffs.append(json.loads(line).get("nice_for_s"))
    return stalls, backoffs


def _latencies_ms(text: str) -> list[float]:
    """The message application's latencies (ms, one a line; anything else skipped)."""
    return [float(v) for v in text.split() if v.replace(".", "", 1).isdigit()]


def _one(policy: str, size_mib: int, hogs: int, own_sessions: bool,
         message_every_s: float | None = None, tree: Path | None = None) -> dict[str, Any]:
    from transferd.testing import free_port, write_site_configs

    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}

    with tempfile.TemporaryDirectory(prefix="bulk-hog-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        ports = {"A": free_port(), "B": free_port()}
        paths = write_site_configs(root, ports)
        for path in paths.values():
            doc = yaml.safe_load(path.read_text())
            doc.setdefault("traffic", {})["bulk_priority"] = policy
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        src = root / "site-A" / "curated" / "blob"
        src.parent.mkdir(parents=True)
        with src.open("wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for site in ("B", "A"):
                log = stack.enter_context((root / f"{site}.log").open("wb"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "transferd", "serve", "--config", str(paths[site])],
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=own_sessions,
                    env=env))
            for port in ports.values():
                wait_local_port(port)
            if message_every_s is not None:  # this tree's client, the daemons' either tree
                out = stack.enter_context((root / "messages.out").open("wb"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", _MESSAGES, f"http://127.0.0.1:{ports['A']}",
                     str(root / "keys"), str(message_every_s)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=own_sessions))
            procs += [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       start_new_session=own_sessions) for _ in range(hogs)]
            time.sleep(1.0)  # the hogs at full speed before the bulk starts
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "transferd", "send", "curated/blob", "--config",
                 str(paths["A"]), "--to", "B", "--wait", "--json"],
                capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=env)
            seconds = time.monotonic() - started
        except subprocess.TimeoutExpired:
            done, seconds = None, TIMEOUT_S
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(20)
        switched = [json.loads(line)["policy"]
                    for site in ("A", "B")
                    for line in (root / f"{site}.log").read_text().splitlines()
                    if '"bulk.priority_in_use"' in line]
        ok = done is not None and done.returncode == 0
        row = {"policy": policy, "tree": "baseline" if tree is not None else "this",
               "hogs": hogs, "ok": ok, "seconds": round(seconds, 2),
               "mbit_s": round(size_mib * 8 * 1.048576 / seconds, 1) if ok else None,
               "switched_to": switched,
               "error": None if ok else (done.stderr[-300:] if done else "timed out")}
        if message_every_s is not None:
            counts = [_log_counts((root / f"{site}.log").read_text()) for site in ("A", "B")]
            row["stalls_100ms"] = sum(c[0] for c in counts)
            row["backoffs_s"] = [b for c in counts for b in c[1]]
            latencies = _latencies_ms((root / "messages.out").read_text())
            row["messages"] = len(latencies)
            row["message_p99_ms"] = percentile(latencies, 99) if latencies else None
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_under_hog")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared-session", action="store_true",
                        help="daemons and hogs in this session (one autogroup)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--message-every-s", type=float,
                        help="also send a message A -> B every this many seconds")
    parser.add_argument("--baseline", type=Path,
                        help="a tree whose daemons run each policy too, interleaved")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated, of " + ", ".join(POLICIES))
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if not policies or any(p not in POLICIES for p in policies):
        parser.error(f"--policies: each of {', '.join(POLICIES)}")
    if args.message_every_s is not None and args.message_every_s <= 0:
        parser.error("--message-every-s: must be > 0")
    if args.baseline is not None and not (args.baseline / "transferd").is_dir():
        parser.error(f"--baseline: {args.baseline} holds no transferd package")
    own = not args.shared_session
    hogs = os.cpu_count() or 1
    trees: list[Path | None] = [None] if args.baseline is None else [args.baseline, None]
    rows = [_one("nice", args.size_mib, 0, own, args.message_every_s)]
    print(json.dumps(rows[-1]), flush=True)
    for _ in range(args.rounds):
        for policy in policies:
            for tree in trees:
                rows.append(_one(policy, args.size_mib, hogs, own, args.message_every_s, tree))
                print(json.dumps(rows[-1]), flush=True)
    print("| bulk_priority | tree | CPU hogs | runs ok | wall s (median) | Mbit/s (median) | "
          "switched to idle | stalls >= 100 ms | backoffs | message p99 ms (median) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    kinds = [("nice", "this", 0), *((p, t, hogs) for p in policies
                                    for t in ([] if args.baseline is None else ["baseline"])
                                    + ["this"])]
    for policy, tree_name, n in kinds:
        mine = [r for r in rows
                if r["policy"] == policy and r["hogs"] == n and r["tree"] == tree_name]
        if not mine:
            continue
        oks = [r for r in mine if r["ok"]]
        secs = statistics.median(r["seconds"] for r in mine)
        rate = statistics.median(r["mbit_s"] for r in oks) if oks else None
        idle = sum("idle" in r["switched_to"] for r in mine)
        stalls = "/".join(str(r.get("stalls_100ms", "-")) for r in mine)
        backoffs = "/".join(str(len(r.get("backoffs_s", []))) for r in mine)
        p99s = [r["message_p99_ms"] for r in mine if r.get("message_p99_ms") is not None]
        p99 = f"{statistics.median(p99s):.1f}" if p99s else "-"
        print(f"| {policy} | {tree_name} | {n} | {len(oks)}/{len(mine)} | {secs:.1f} | "
              f"{'-' if rate is None else f'{rate:.0f}'} | {idle}/{len(mine)} | {stalls} | "
              f"{backoffs} | {p99} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "shared_session":
                                         args.shared_session, "message_every_s":
                                         args.message_every_s, "baseline":
                                         None if args.baseline is None else str(args.baseline),
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
