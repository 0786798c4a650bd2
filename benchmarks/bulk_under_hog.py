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

__all__ = ["main"]

POLICIES = ("nice", "idle", "adaptive")
TIMEOUT_S = 180.0


def _one(policy: str, size_mib: int, hogs: int, own_sessions: bool) -> dict[str, Any]:
    from transferd.testing import free_port, write_site_configs

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
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=own_sessions))
            for port in ports.values():
                wait_local_port(port)
            procs += [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       start_new_session=own_sessions) for _ in range(hogs)]
            time.sleep(1.0)  # the hogs at full speed before the bulk starts
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "transferd", "send", "curated/blob", "--config",
                 str(paths["A"]), "--to", "B", "--wait", "--json"],
                capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
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
        return {"policy": policy, "hogs": hogs, "ok": ok, "seconds": round(seconds, 2),
                "mbit_s": round(size_mib * 8 * 1.048576 / seconds, 1) if ok else None,
                "switched_to": switched,
                "error": None if ok else (done.stderr[-300:] if done else "timed out")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_under_hog")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared-session", action="store_true",
                        help="daemons and hogs in this session (one autogroup)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    own = not args.shared_session
    hogs = os.cpu_count() or 1
    rows = [_one("nice", args.size_mib, 0, own)]
    print(json.dumps(rows[-1]), flush=True)
    for _ in range(args.rounds):
        for policy in POLICIES:
            rows.append(_one(policy, args.size_mib, hogs, own))
            print(json.dumps(rows[-1]), flush=True)
    print("| bulk_priority | CPU hogs | runs ok | wall s (median) | Mbit/s (median) | "
          "switched to idle |")
    print("|---|---:|---:|---:|---:|---|")
    for policy, n in [("nice", 0), *((p, hogs) for p in POLICIES)]:
        mine = [r for r in rows if r["policy"] == policy and r["hogs"] == n]
        oks = [r for r in mine if r["ok"]]
        secs = statistics.median(r["seconds"] for r in mine)
        rate = statistics.median(r["mbit_s"] for r in oks) if oks else None
        idle = sum("idle" in r["switched_to"] for r in mine)
        print(f"| {policy} | {n} | {len(oks)}/{len(mine)} | {secs:.1f} | "
              f"{'-' if rate is None else f'{rate:.0f}'} | {idle}/{len(mine)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "shared_session":
                                         args.shared_session, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
