"""Idle event-loop CPU of two `transferd serve` daemons (A and B, peers of each other, no
job): the loop thread's CPU per second over 12 s, after 8 s of start-up. PATCH=NAME=VALUE,...
sets `transferd.daemon` constants first (see serve_patched.py). Run from the tree measured:
`PATCH=LAG_TICK_S=1 PYTHONPATH=$TREE python idle_loop.py /tmp/scratch` (round 12, loopcpu)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transferd.testing import free_port, write_site_configs

SERVE = Path(__file__).with_name("serve_patched.py")


def loop_cpu_s(pid: int) -> float:
    """utime + stime of the process's main thread (the event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = write_site_configs(root, {"A": free_port(), "B": free_port()})
    procs = {
        site: subprocess.Popen(
            [sys.executable, str(SERVE), "serve", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=(root / f"{site}.log").open("w"),
        )
        for site, path in paths.items()
    }
    try:
        time.sleep(8)
        cpu0, t0 = {s: loop_cpu_s(p.pid) for s, p in procs.items()}, time.time()
        time.sleep(12)
        cpu1, t1 = {s: loop_cpu_s(p.pid) for s, p in procs.items()}, time.time()
        for site in procs:
            rate = 1e3 * (cpu1[site] - cpu0[site]) / (t1 - t0)
            print(site, f"idle loop thread {rate:.1f} ms CPU per s")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: idle_loop.py SCRATCH_DIR")
    main(Path(sys.argv[1]))
