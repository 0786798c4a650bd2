"""Measuring one tool run: the process's CPU seconds (wait4 rusage for clients, /proc for
servers), wall time with a bound, a timed link flap, and the run's record in the results format.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.errors import ToolError

__all__ = ["HostSample", "LinkFlapper", "Measured", "ToolRun", "peak_rss_mib", "run_measured",
           "quiet", "server_cpu_s", "settle", "settle_host", "thread_cpu_s", "wait_listening"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class ToolRun:
    """One row of `runs` in results/<scenario>.json (the issue's fields first)."""

    tool: str
    ok: bool
    goodput_mbit: float | None = None
    link_pct: float | None = None
    # The rate the link carried while the bulk of the data moved (10 %..90 % of the bytes, from
    # the sending end's interface counter): what a tool reaches once ramped up, beside the
    # wall-clock goodput that also counts start-up, TCP ramp and the tail.
    sustained_mbit: float | None = None
    sustained_link_pct: float | None = None
    seconds: float | None = None
    bytes_on_wire: int | None = None
    cpu_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None
    data: str | None = None  # which data set ("incompressible", "checkpoint-bf16"); None: iperf3
    bytes_logical: int | None = None
    peak_rss_mib: dict[str, float] | None = None
    tcp_retrans_segs: int | None = None
    resent_bytes: int | None = None
    streams: int | None = None  # transferd: data channels it opened to the peer
    app_resent_bytes: int | None = None  # transferd: chunks sent again after a channel broke
    emulator_cpu_pct: float | None = None
    latencies_ms: list[float] | None = None  # interactive messages, for the latency CDF
    messages: dict[str, Any] | None = None  # interactive: sent, failed, late, budget misses
    # transferd: `cpu_s` split by process (sending daemon, receiving daemon, the send CLI),
    # and each daemon's by thread name (`thread_cpu_s`, over the timed send).
    cpu_by_process: dict[str, float] | None = None
    cpu_by_thread: dict[str, dict[str, float]] | None = None
    # The whole machine over the timed part (`HostSample.since`): what else ran beside the
    # tool (busy CPU-s of every process), CPU the hypervisor took (steal), and the disk's work.
    host: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # user + system of the process and the children it waited for
    seconds: float
    host: dict[str, float] | None = None  # HostSample.since over the run


SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size


@dataclass(frozen=True)
class HostSample:
    """Machine-wide counters at one moment: CPU jiffies from /proc/stat (busy = user + nice +
    system + irq + softirq; steal: time the hypervisor ran something else on our vCPUs) and
    the block devices' sectors written and discarded (/proc/diskstats, whole disks only)."""

    busy: int
    iowait: int
    steal: int
    written_sectors: int
    discarded_sectors: int

    @classmethod
    def now(cls) -> HostSample | None:
        try:
            cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            disks = Path("/proc/diskstats").read_text().splitlines()
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
        written = discarded = 0
        for line in disks:
            fields = line.split()
            name = fields[2]
            if not Path(f"/sys/block/{name}").exists() or name.startswith(("loop", "ram")):
                continue  # partitions are counted in their disk
            written += int(fields[9])
            discarded += int(fields[16]) if len(fields) > 16 else 0
        return cls(busy=user + nice + system + irq + softirq, iowait=iowait, steal=steal,
                   written_sectors=written, discarded_sectors=discarded)

    def since(self, before: HostSample) -> dict[str, float]:
        return {
            "busy_cpu_s": round((self.busy - before.busy) / CLK_TCK, 2),
            "iowait_s": round((self.iowait - before.iowait) / CLK_TCK, 2),
            "steal_s": round((self.steal - before.steal) / CLK_TCK, 2),
            "disk_written_mib": round((self.written_sectors - before.written_sectors)
                                      * SECTOR_BYTES / 2**20, 1),
            "disk_discarded_mib": round((self.discarded_sectors - before.discarded_sectors)
                                        * SECTOR_BYTES / 2**20, 1),
        }


def run_measured(cmd: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
                 cwd: Path | None = None, log_dir: Path, name: str) -> Measured:
    """Run a client to completion; CPU from wait4's rusage. Killed (group) after `timeout_s`."""
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        host0 = HostSample.now()
        started = time.monotonic()
        popen = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, start_new_session=True)
        status, usage = 0, None
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                os.wait4(popen.pid, 0)
                popen.returncode = -9
                raise ToolError(name, f"timed out after {timeout_s:.0f} s")
            time.sleep(0.02)
        seconds = time.monotonic() - started
        host1 = HostSample.now()
        popen.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        returncode=popen.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        cpu_s=usage.ru_utime + usage.ru_stime,
        seconds=seconds,
        host=host1.since(host0) if host0 is not None and host1 is not None else None,
    )


def server_cpu_s(pid: int, _depth: int = 0) -> float:
    """CPU seconds of a running server's whole process tree: its own, the children it reaped
    (cutime/cstime) and the children still running (rsync's daemon forks per connection)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(v) for v in fields[11:15]) / CLK_TCK
    if _depth < 4:
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                children = task.read_text().split()
            except OSError:
                continue
            total += sum(server_cpu_s(int(child), _depth + 1) for child in children)
    return total


# Before each timed run (`settle_host`): the machine counts as quiet once a window this long
# saw no block written and the hypervisor took under this share of one CPU (steal).
QUIET_WINDOW_S = 0.5
QUIET_STEAL_SHARE = 0.05
SETTLE_MAX_S = 10.0


def quiet(before: HostSample, after: HostSample, window_s: float) -> bool:
    """Nothing was written to a disk between the samples and steal stayed under
    QUIET_STEAL_SHARE of one CPU."""
    steal_share = (after.steal - before.steal) / CLK_TCK / window_s
    return after.written_sectors == before.written_sectors and steal_share < QUIET_STEAL_SHARE


def settle_host(max_s: float = SETTLE_MAX_S, window_s: float = QUIET_WINDOW_S) -> float:
    """Start each repeat from the same machine state: write back the page cache's dirty pages
    (`sync`: a peer's buffered copy, the data set just made) and wait until a `window_s`
    window is `quiet` (the disk idle, no writeback of an earlier run's bytes competing with
    this run's), at most `max_s`. Returns the seconds waited."""
    started = time.monotonic()
    os.sync()
    before = HostSample.now()
    while before is not None and time.monotonic() - started < max_s:
        time.sleep(window_s)
        after = HostSample.now()
        if after is None or quiet(before, after, window_s):
            break
        before = after
    return round(time.monotonic() - started, 2)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a running process's live threads, summed by thread name (`comm`: the
    name a thread set, e.g. `channel-in`, else its process's): where a daemon's CPU goes. A
    thread that ended is not counted (the process total, `server_cpu_s`, keeps it)."""
    out: dict[str, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def settle() -> None:
    """Give a server a moment to reap the per-connection child that just finished."""
    time.sleep(0.3)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ToolError("peak-rss", f"no VmHWM for pid {pid}")


def wait_listening(ss_cmd: Sequence[str], port: int, *, timeout_s: float = 15,
                   alive: subprocess.Popen[bytes] | None = None, what: str = "server") -> None:
    """Poll `ss -ltn` (run inside the server's namespace) until something listens on `port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([*ss_cmd, "ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, check=False).stdout
        if out.strip():
            return
        if alive is not None and alive.poll() is not None:
            raise ToolError(what, f"exited with {alive.returncode} before listening on {port}")
        time.sleep(0.05)
    raise ToolError(what, f"not listening on port {port} after {timeout_s:.0f} s")


class LinkFlapper:
    """Takes the link down `down_s` seconds, `at_s` seconds after `start()`; `stop()` always
    leaves the link up."""

    def __init__(self, set_up: Any, at_s: float, down_s: float) -> None:
        self._set_up = set_up
        self._at_s, self._down_s = at_s, down_s
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.flapped = False

    def _run(self) -> None:
        if self._cancel.wait(self._at_s):
            return
        self._set_up(False)
        self.flapped = True
        self._cancel.wait(self._down_s)
        self._set_up(True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._cancel.set()
        self._thread.join(timeout=30)
        if self.flapped:
            self._set_up(True)


def sustained_rate(samples: Sequence[tuple[float, int]], lo: float = 0.1,
                   hi: float = 0.9) -> float | None:
    """Bytes/s between the moments `lo` and `hi` of the bytes counted by `samples` (time,
    cumulative counter) had passed, by linear interpolation; None without enough data."""
    if len(samples) < 3:
        return None
    t0, b0 = samples[0]
    total = samples[-1][1] - b0
    if total <= 0:
        return None

    def when(fraction: float) -> float:
        target = b0 + fraction * total
        for (ta, ba), (tb, bb) in zip(samples, samples[1:], strict=False):
            if bb >= target:
                return ta if bb == ba else ta + (tb - ta) * (target - ba) / (bb - ba)
        return samples[-1][0]

    span = when(hi) - when(lo)
    return (hi - lo) * total / span if span > 0 else None
