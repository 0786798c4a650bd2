"""`traffic.bulk_priority` as `transferd serve` applies it: two real daemon processes on
127.0.0.1 with their data channels open; the policy of each daemon's channel threads is read back
from the kernel (sched_getscheduler on the thread id, /proc/<pid>/task/<tid>/comm for its name).
A asked for `idle` (SCHED_IDLE), B runs the default (`nice`: normal policy, nice +10); the event
loop of neither is a bulk thread."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration._procs import metric, poll_until, start_daemon, wait_until_serving
from transferd.site.threads import BULK_THREAD_NICENESS
from transferd.testing import free_port, write_site_configs

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread scheduling policy is Linux's"
)


def _threads(pid: int) -> dict[str, list[int]]:
    """Thread ids of process `pid` by their kernel name."""
    out: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        out.setdefault(name, []).append(int(task.name))
    return out


def _bulk_line(log: Path) -> str:
    [policy] = [json.loads(line)["policy"] for line in log.read_text().splitlines()
                if '"bulk.priority"' in line]
    return str(policy)


def test_serve_runs_channel_threads_at_the_configured_bulk_priority(tmp_path: Path) -> None:
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports)
    # A asks for SCHED_IDLE; B runs the default (nice +10).
    doc = yaml.safe_load(configs["A"].read_text())
    doc.setdefault("traffic", {})["bulk_priority"] = "idle"
    configs["A"].write_text(yaml.safe_dump(doc, sort_keys=False))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for site in ("B", "A"):
            procs[site] = start_daemon(configs[site], tmp_path / f"{site}.log")
            asyncio.run(wait_until_serving(f"http://127.0.0.1:{ports[site]}"))
        # A opens its data channels to B on its own (kept open across jobs).
        asyncio.run(poll_until(
            lambda: metric(f"http://127.0.0.1:{ports['A']}",
                           "transferd_data_channels_opened_total", peer="B"),
            lambda v: bool(v), timeout_s=30))
        a_threads = asyncio.run(poll_until(
            lambda: asyncio.sleep(0, _threads(procs["A"].pid)),
            lambda t: "channel-send-B" in t and "channel-recv-B" in t, timeout_s=30))
        b_threads = asyncio.run(poll_until(
            lambda: asyncio.sleep(0, _threads(procs["B"].pid)),
            lambda t: "channel-in" in t, timeout_s=30))

        a_bulk = a_threads["channel-send-B"] + a_threads["channel-recv-B"]
        assert {os.sched_getscheduler(tid) for tid in a_bulk} == {os.SCHED_IDLE}
        # The main thread (the event loop) is never lowered: real-time or normal, not idle.
        assert os.sched_getscheduler(procs["A"].pid) & ~os.SCHED_RESET_ON_FORK in (
            os.SCHED_RR, os.SCHED_OTHER)

        base_nice = os.getpriority(os.PRIO_PROCESS, procs["B"].pid)
        for tid in b_threads["channel-in"]:
            assert os.sched_getscheduler(tid) == os.SCHED_OTHER
            assert os.getpriority(os.PRIO_PROCESS, tid) == min(base_nice + BULK_THREAD_NICENESS,
                                                               19)
        # One log line says which policy each daemon's bulk threads run at.
        assert _bulk_line(tmp_path / "A.log").startswith("idle (SCHED_IDLE")
        assert _bulk_line(tmp_path / "B.log") == f"nice (+{BULK_THREAD_NICENESS})"
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
