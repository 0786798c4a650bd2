"""`traffic.bulk_priority` as `transferd serve` applies it: two real daemon processes on
127.0.0.1 with their data channels open; the policy of each daemon's channel threads is read back
from the kernel (sched_getscheduler on the thread id, /proc/<pid>/task/<tid>/comm for its name).
A asked for `idle` (SCHED_IDLE), B runs the default (`nice`: the normal policy at nice +10 over
the nice value the daemon was started at, `nice -n 10 transferd serve` included); `adaptive`
(SCHED_IDLE only while messages move) is tested on both; the event loop is never a bulk thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration._procs import cli, metric, poll_until, start_daemon, wait_until_serving
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


def _own_nice() -> int:
    """The nice value the daemons inherit: this process's (`nice -n 10 pytest ...`)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def _bulk_nice() -> int:
    return min(_own_nice() + BULK_THREAD_NICENESS, 19)


@contextlib.contextmanager
def _two_daemons(
    tmp_path: Path, a_bulk_priority: str | None, b_bulk_priority: str | None = None
) -> Iterator[tuple[dict[str, Path], dict[str, int], dict[str, subprocess.Popen[bytes]]]]:
    """Daemons B and A (each one's `traffic.bulk_priority` as given, None: the default) with
    A's data channels to B open; stopped at the end."""
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports)
    for site, policy in (("A", a_bulk_priority), ("B", b_bulk_priority)):
        if policy is not None:
            doc = yaml.safe_load(configs[site].read_text())
            doc.setdefault("traffic", {})["bulk_priority"] = policy
            configs[site].write_text(yaml.safe_dump(doc, sort_keys=False))
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
        yield configs, ports, procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_serve_runs_channel_threads_at_the_configured_bulk_priority(tmp_path: Path) -> None:
    # A asks for SCHED_IDLE; B runs the default (nice +10).
    with _two_daemons(tmp_path, "idle") as (_configs, _ports, procs):
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

        for tid in b_threads["channel-in"]:
            assert os.sched_getscheduler(tid) == os.SCHED_OTHER
            assert os.getpriority(os.PRIO_PROCESS, tid) == _bulk_nice()
        # Threads the loop starts that are not bulk work (the channel listener, the channel
        # watcher) keep the daemon's own nice, not the 0 that SCHED_RESET_ON_FORK gives them.
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert b_threads["channel-accept"]  # named in the kernel when its nice is restored
        for tid in b_threads["channel-accept"] + a_threads.get("channel-watch-B", []):
            assert os.getpriority(os.PRIO_PROCESS, tid) == own_nice
        # One log line says which policy each daemon's bulk threads run at.
        assert _bulk_line(tmp_path / "A.log").startswith("idle (SCHED_IDLE")
        assert _bulk_line(tmp_path / "B.log").startswith("nice (+")


# Kernel names (15 bytes at most) of the bulk threads of a sending and a receiving daemon: the
# data channels' threads and the chunk workers (`transferd-bulk_N`, `transferd-chunk_N`).
_BULK_NAMES = ("channel-send-B", "channel-recv-B", "channel-in", "transferd-bulk_",
               "transferd-chunk")


def test_every_bulk_thread_runs_at_the_daemons_nice_plus_ten(tmp_path: Path) -> None:
    """Data-channel threads are started from a chunk worker that is already at +10, and the
    loop's threads start at nice 0 (SCHED_RESET_ON_FORK): each still reads back exactly the
    daemon's own nice + 10 (19 at most), not +20 and not 0 + 10."""
    with _two_daemons(tmp_path, None) as (configs, _ports, procs):
        (tmp_path / "site-A" / "curated").mkdir(parents=True)
        (tmp_path / "site-A" / "curated" / "f").write_bytes(os.urandom(3 * 1024 * 1024))
        code, out, err = asyncio.run(cli("send", "curated/f", "--config", str(configs["A"]),
                                         "--to", "B", "--wait", "--json"))
        assert code == 0, err
        assert json.loads(out)["state"] == "committed"

        def bulk_nices() -> dict[str, set[int]]:
            nices: dict[str, set[int]] = {}
            for proc in procs.values():
                for name, tids in _threads(proc.pid).items():
                    if name in _BULK_NAMES:
                        for tid in tids:
                            with contextlib.suppress(OSError):  # the thread ended
                                nices.setdefault(name, set()).add(
                                    os.getpriority(os.PRIO_PROCESS, tid))
            return nices

        expected = _bulk_nice()
        # A thread is named (prctl) just before its nice is set: wait for that instant to pass.
        with contextlib.suppress(TimeoutError):
            asyncio.run(poll_until(
                lambda: asyncio.sleep(0, bulk_nices()),
                lambda n: all(v == {expected} for v in n.values()), timeout_s=5))
        nices = bulk_nices()
        assert {"channel-send-B", "channel-recv-B", "channel-in", "transferd-bulk_"} <= set(nices)
        assert nices == dict.fromkeys(nices, {expected})


def _policies(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, set[tuple[int, int]]]:
    """(policy, nice) of each daemon's bulk threads, by site."""
    out: dict[str, set[tuple[int, int]]] = {}
    for site, proc in procs.items():
        for name, tids in _threads(proc.pid).items():
            if name.startswith(_BULK_NAMES):
                for tid in tids:
                    with contextlib.suppress(OSError):  # the thread ended
                        out.setdefault(site, set()).add(
                            (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))
    return out


def _in_use(log: Path) -> list[tuple[str, int]]:
    return [(f["policy"], f["threads"]) for f in map(json.loads, log.read_text().splitlines())
            if f["event"] == "bulk.priority_in_use"]


def test_adaptive_bulk_gives_way_while_messages_move_and_only_then(tmp_path: Path) -> None:
    """`adaptive` on a busy host: with no message the bulk threads of both daemons run at the
    nice policy (what keeps a bulk on cores that other work keeps busy at nice's rate); a
    message turns the sender's and the receiver's bulk threads to SCHED_IDLE, and a second
    after it they are back at nice +10, each switch logged once."""
    with _two_daemons(tmp_path, "adaptive", "adaptive") as (configs, _ports, procs):
        if not _bulk_line(tmp_path / "A.log").startswith("adaptive"):
            pytest.skip("this host refuses leaving SCHED_IDLE (no CAP_SYS_NICE or RLIMIT_NICE)")
        nice = {(os.SCHED_OTHER, _bulk_nice())}
        assert _policies(procs) == {"A": nice, "B": nice}
        code, _out, err = asyncio.run(cli("message", "B", "--config", str(configs["A"]),
                                          "--data", "hello"))
        assert code == 0, err
        # Back at nice once the hold after the message is over (polled: the hold is 1 s).
        asyncio.run(poll_until(lambda: asyncio.sleep(0, _policies(procs)),
                               lambda p: p == {"A": nice, "B": nice}, timeout_s=20))
        for site in ("A", "B"):
            switched = _in_use(tmp_path / f"{site}.log")
            assert [policy for policy, _n in switched] == ["idle", "nice"], site
            assert all(n > 0 for _p, n in switched), site  # it moved the running threads
