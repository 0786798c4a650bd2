"""Event-loop wake-ups and CPU of two `transferd serve` daemons (A -> B, 127.0.0.1), counted
from /proc rather than timed: per second idle (after start-up), then over one `send --wait` of
a 2 GiB incompressible file: the loop thread's (main thread's) CPU and voluntary context
switches (each a sleep in epoll and a wake-up). Run from the tree measured (round 13):
`cd $TREE && PYTHONPATH=$TREE python loop_wakes.py SCRATCH [DATA_FILE]` under the bench lock."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transferd.testing import free_port, write_site_configs

DATA = Path("/var/tmp/netplan-bench-data/incompressible-2048MiB-seed0.bin")
IDLE_S = 10.0


def loop_thread(pid: int) -> tuple[float, int]:
    """(CPU-s, voluntary context switches) of the process's main thread (the event loop)."""
    task = Path(f"/proc/{pid}/task/{pid}")
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = (task / "status").read_text()
    switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return cpu, switches


def main(root: Path, data: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = write_site_configs(root, {"A": free_port(), "B": free_port()})
    src = root / "site-A" / "checkpoints" / "bench"
    src.mkdir(parents=True)
    os.link(data, src / data.name)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {
        site: subprocess.Popen(
            [sys.executable, "-m", "transferd", "serve", "--config", str(path)], env=env,
            stdout=subprocess.DEVNULL, stderr=(root / f"{site}.log").open("w"))
        for site, path in paths.items()
    }
    try:
        time.sleep(8)
        a0, t0 = {s: loop_thread(p.pid) for s, p in procs.items()}, time.monotonic()
        time.sleep(IDLE_S)
        a1, t1 = {s: loop_thread(p.pid) for s, p in procs.items()}, time.monotonic()
        for s in procs:
            print(f"{s} idle: loop {1e3 * (a1[s][0] - a0[s][0]) / (t1 - t0):.1f} ms CPU/s, "
                  f"{(a1[s][1] - a0[s][1]) / (t1 - t0):.0f} wakes/s")
        b0, t0 = {s: loop_thread(p.pid) for s, p in procs.items()}, time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "transferd", "send", f"checkpoints/bench/{data.name}",
             "--config", str(paths["A"]), "--to", "B", "--wait", "--json"],
            env=env, capture_output=True, text=True, timeout=600, check=True)
        b1, t1 = {s: loop_thread(p.pid) for s, p in procs.items()}, time.monotonic()
        job = json.loads(out.stdout)
        chunks = job.get("chunks_sent") or job.get("chunks") or 0
        print(f"send: {t1 - t0:.2f} s, {data.stat().st_size * 8 / (t1 - t0) / 1e6:.0f} Mbit/s, "
              f"chunks_sent {chunks}")
        for s in procs:
            cpu, wakes = b1[s][0] - b0[s][0], b1[s][1] - b0[s][1]
            per = f", {wakes / chunks:.1f} wakes/chunk" if chunks else ""
            print(f"{s} send: loop {cpu:.2f} CPU-s, {wakes} wakes{per}")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: loop_wakes.py SCRATCH_DIR [DATA_FILE]")
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else DATA)
