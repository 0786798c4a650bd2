"""Adapters for the compared tools, all moving the same file over the same link in one run:
transferd (against issue 3's CLI contract), iperf3 (the ceiling: one stream -l 1M, and -P 8),
rsync in daemon mode (plain and --compress --compress-choice=zstd), and rclone copy with
multi-thread streams from `rclone serve webdav`. `run_tool` wraps each with the link's counters
(bytes on the wire, TCP re-sends, the emulator's health) and turns failures into a reason.
"""

from __future__ import annotations

import compileall
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks._echo import started_by
from benchmarks.backends import rejection
from benchmarks.datasets import dataset, file_blake3
from benchmarks.errors import LabError, ToolError
from benchmarks.lab import REPO_ROOT, Lab, python_env
from benchmarks.measure import (
    LinkFlapper,
    Measured,
    ToolRun,
    peak_rss_mib,
    run_measured,
    server_cpu_s,
    settle,
    settle_host,
    sustained_rate,
    thread_cpu_s,
    wait_listening,
)
from benchmarks.message_trace import percentile
from benchmarks.scenario import Scenario, Work, WorkKind

__all__ = ["ADAPTERS", "RunContext", "run_tool", "NOT_YET_SUPPORTED"]

NOT_YET_SUPPORTED = "not yet supported by transferd"
MSS_BYTES = 1448  # TCP payload per 1500-byte packet with timestamps: re-sent bytes per segment
TRANSFER_TIMEOUT_S = 900


@dataclass
class RunContext:
    lab: Lab
    scenario: Scenario
    quick: bool
    work: Work
    data_path: Path
    data_hash: str
    scratch: Path
    flapper: LinkFlapper | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def src(self) -> str:
        return self.scenario.source_site()

    @property
    def dst(self) -> str:
        return self.scenario.dest_site()

    def transfer_started(self) -> None:
        if self.flapper is not None:
            self.flapper.start()

    def size_bytes(self) -> int:
        return self.data_path.stat().st_size

    def verify(self, tool: str, received: Path) -> None:
        if not received.exists():
            raise ToolError(tool, f"reported success but {received.name} is not at the receiver")
        if file_blake3(received) != self.data_hash:
            raise ToolError(tool, "received file differs from the source (blake3 mismatch)")


def _link_data(src: Path, into: Path) -> Path:
    """The data file placed in a tool's tree: a hard link, so 2 GiB is not copied per tool."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / src.name
    try:
        os.link(src, target)
    except OSError:
        shutil.copyfile(src, target)
    return target


def _goodput(size: int, seconds: float) -> float:
    return size * 8 / seconds / 1e6


def _copied(ctx: RunContext, tool: str, got: Measured, dest: Path, cpu_s: float) -> ToolRun:
    """The result of a copy tool's run: its exit status, the copy verified at `dest`, goodput."""
    if got.returncode != 0:
        raise ToolError(tool, f"exit {got.returncode}: {got.stderr.strip()[-300:]}")
    ctx.verify(tool, dest / ctx.data_path.name)
    size = ctx.size_bytes()
    return ToolRun(tool=tool, ok=True, goodput_mbit=_goodput(size, got.seconds),
                   seconds=got.seconds, cpu_s=cpu_s, bytes_logical=size, host=got.host)


def _client_run(ctx: RunContext, tool: str, server: subprocess.Popen[bytes], site: str,
                cmd: list[str], *, timeout_s: float = TRANSFER_TIMEOUT_S,
                env: dict[str, str] | None = None) -> tuple[Measured, float]:
    """Run a peer tool's client in `site` against its already listening server; returns the
    client's measurement and the CPU seconds of client and server together over the run."""
    cpu0 = server_cpu_s(server.pid)
    ctx.transfer_started()
    got = run_measured(ctx.lab.in_site(site, cmd), timeout_s=timeout_s, env=env,
                       log_dir=ctx.lab.workdir, name=tool)
    settle()
    return got, got.cpu_s + server_cpu_s(server.pid) - cpu0


# ---- iperf3 ---------------------------------------------------------------------------------

IPERF3_PORT = 5201


def _iperf3(ctx: RunContext, streams: int) -> ToolRun:
    lab, tool = ctx.lab, "iperf3-1stream" if streams == 1 else "iperf3-8streams"
    if shutil.which("iperf3") is None:
        raise ToolError(tool, "iperf3 is not installed")
    addr = lab.addr(ctx.dst)
    server = lab.spawn(ctx.dst, ["iperf3", "-s", "-B", addr, "-p", str(IPERF3_PORT)],
                       name=f"{tool}-server")
    try:
        wait_listening(lab.in_site(ctx.dst, []), IPERF3_PORT, alive=server, what="iperf3 -s")
        seconds = ctx.scenario.quick_iperf3_seconds if ctx.quick else ctx.scenario.iperf3_seconds
        cmd = ["iperf3", "-c", addr, "-p", str(IPERF3_PORT), "-l", "1M", "-t", f"{seconds:g}",
               "-J"]
        if streams > 1:
            cmd += ["-P", str(streams)]
        got, cpu = _client_run(ctx, tool, server, ctx.src, cmd, timeout_s=seconds + 120)
    finally:
        lab.stop(server)
    try:
        report = json.loads(got.stdout)
    except ValueError as exc:
        raise ToolError(tool, f"no JSON report (exit {got.returncode}): {got.stderr[-300:]}"
                        ) from exc
    if got.returncode != 0 or "error" in report:
        raise ToolError(tool, str(report.get("error", f"exit {got.returncode}")))
    received = report["end"]["sum_received"]
    return ToolRun(tool=tool, ok=True, goodput_mbit=received["bits_per_second"] / 1e6,
                   seconds=received["seconds"], cpu_s=cpu, bytes_logical=int(received["bytes"]))


# ---- rsync ----------------------------------------------------------------------------------

RSYNC_PORT = 8730


def _rsync(ctx: RunContext, zstd: bool) -> ToolRun:
    lab, tool = ctx.lab, "rsync-zstd" if zstd else "rsync"
    if shutil.which("rsync") is None:
        raise ToolError(tool, "rsync is not installed")
    dest = ctx.scratch / f"{tool}-dest"
    dest.mkdir(parents=True)
    conf = lab.workdir / f"{tool}.conf"
    conf.write_text(
        f"pid file = {lab.workdir / (tool + '.pid')}\nuse chroot = false\n"
        f"[bench]\npath = {dest}\nread only = false\nuid = root\ngid = root\n")
    addr = lab.addr(ctx.dst)
    server = lab.spawn(ctx.dst, ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                 f"--address={addr}", f"--port={RSYNC_PORT}"],
                       name=f"{tool}-daemon")
    try:
        wait_listening(lab.in_site(ctx.dst, []), RSYNC_PORT, alive=server, what="rsync --daemon")
        cmd = ["rsync", "-a"]
        if zstd:
            cmd += ["--compress", "--compress-choice=zstd"]
        cmd += [str(ctx.data_path), f"rsync://{addr}:{RSYNC_PORT}/bench/"]
        got, cpu = _client_run(ctx, tool, server, ctx.src, cmd)
    finally:
        lab.stop(server)
    return _copied(ctx, tool, got, dest, cpu)


# ---- rclone ---------------------------------------------------------------------------------

RCLONE_PORT = 8080
RCLONE_STREAMS = 8


def _rclone(ctx: RunContext) -> ToolRun:
    """rclone's multi-thread streams work on downloads (its webdav backend has no multi-part
    upload), so B copies from `rclone serve webdav` at A: the bytes still flow A -> B."""
    lab, tool = ctx.lab, "rclone"
    if shutil.which("rclone") is None:
        raise ToolError(tool, "rclone is not installed")
    served = _link_data(ctx.data_path, ctx.scratch / "rclone-src").parent
    dest = ctx.scratch / "rclone-dest"
    config = lab.workdir / "rclone.conf"
    config.write_text("")
    addr = lab.addr(ctx.src)
    env = python_env({"RCLONE_CONFIG_SRC_TYPE": "webdav",
                      "RCLONE_CONFIG_SRC_URL": f"http://{addr}:{RCLONE_PORT}/"})
    server = lab.spawn(ctx.src, ["rclone", "serve", "webdav", str(served), "--addr",
                                 f"{addr}:{RCLONE_PORT}", "--config", str(config)],
                       name="rclone-serve")
    try:
        wait_listening(lab.in_site(ctx.src, []), RCLONE_PORT, alive=server,
                       what="rclone serve webdav")
        cmd = ["rclone", "copy", "src:", str(dest), "--config", str(config),
               "--multi-thread-streams", str(RCLONE_STREAMS), "--multi-thread-cutoff", "16M"]
        got, cpu = _client_run(ctx, tool, server, ctx.dst, cmd, env=env)
    finally:
        lab.stop(server)
    return _copied(ctx, tool, got, dest, cpu)


# ---- the receiving disk ---------------------------------------------------------------------

DD_BLOCK = "8M"  # transferd's default chunk size


def _disk(ctx: RunContext, direct: bool) -> ToolRun:
    """The write ceiling of the disk every copy lands on, measured with `dd` in the same run:
    `oflag=direct` is the path transferd's receiver takes (O_DIRECT, no page cache), buffered
    is the page-cache path rsync and rclone take. Both end with an fsync, as a commit does."""
    tool = "disk-direct" if direct else "disk-buffered"
    if shutil.which("dd") is None:
        raise ToolError(tool, "dd is not installed")
    dest = ctx.scratch / f"{tool}-dest"
    dest.mkdir(parents=True)
    cmd = ["dd", f"if={ctx.data_path}", f"of={dest / ctx.data_path.name}", f"bs={DD_BLOCK}",
           "conv=fsync", "status=none"]
    if direct:
        cmd.append("oflag=direct")
    ctx.transfer_started()
    got = run_measured(cmd, timeout_s=TRANSFER_TIMEOUT_S, log_dir=ctx.lab.workdir, name=tool)
    return _copied(ctx, tool, got, dest, got.cpu_s)


# ---- transferd ------------------------------------------------------------------------------

TRANSFERD_PORTS = (7701, 7702)
# The bulk transfer is under way this long before interactive messages start.
MESSAGES_START_DELAY_S = 1.0
MESSAGES_INTERVAL_MS = 5.0


def _transferd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferd", *args]


@functools.cache
def byte_compiled() -> None:
    """Write the .pyc files of transferd and netplan, as `pip install` does, before any timed
    `transferd` process. A checkout run with PYTHONDONTWRITEBYTECODE=1 (as these sessions are)
    has none, and every CLI would compile ~20 modules from source again: ~20 ms of every
    timed `send --wait` (benchmarks/README.md, issue 11 round 4). py_compile writes them
    whatever that variable says; up-to-date files are left as they are."""
    for package in ("transferd", "netplan"):
        compileall.compile_dir(REPO_ROOT / package, quiet=1)


_FEATURES_PROBE = """
import json
import transferd
from transferd.config import SiteConfig
print(json.dumps({
    "traffic": "traffic" in SiteConfig.model_fields,
    "messages": hasattr(transferd, "send_message") and hasattr(transferd, "local_signer"),
}))
"""


def _transferd_features(tool: str) -> dict[str, bool]:
    """What this transferd can do: a working `send`, traffic settings (issue 4), messages."""
    probe = subprocess.run(_transferd_cmd("send", "--help"), capture_output=True, text=True,
                           env=python_env(), timeout=60, check=False)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolError(tool, f"{NOT_YET_SUPPORTED}: `transferd send` is unavailable ({reason})")
    found = subprocess.run([sys.executable, "-c", _FEATURES_PROBE], capture_output=True,
                           text=True, env=python_env(), timeout=60, check=False)
    try:
        features: dict[str, bool] = json.loads(found.stdout)
    except ValueError as exc:
        raise ToolError(tool, f"cannot inspect transferd: {found.stderr.strip()[-300:]}") from exc
    return features


def _variant(tool: str, features: dict[str, bool]) -> dict[str, Any]:
    """Site-config keys for the compared transferd variants."""
    if tool in ("transferd", "transferd-http-messages"):  # the latter: only its client differs
        return {}
    if tool == "transferd-1stream":
        fixed = {"traffic": {"adaptive_streams": False}} if features["traffic"] else {}
        return {"streams": 1, **fixed}
    if tool == "transferd-warm":  # the same daemon; only what runs before the timed send differs
        return {}
    if tool in ("transferd-4streams", "transferd-8streams"):  # the controller's start, adaptive
        return {"streams": int(tool.removeprefix("transferd-").removesuffix("streams"))}
    if tool == "transferd-shared-pool":
        if not features["traffic"]:
            raise ToolError(tool, f"{NOT_YET_SUPPORTED}: no `traffic.shared_pool` setting "
                            "(traffic classes, issue 4)")
        return {"traffic": {"shared_pool": True}}
    if tool == "transferd-normal-loop":
        return {"traffic": {"loop_priority": "normal"}}
    if tool in _BULK_PRIORITY_ROWS:
        return {"traffic": {"bulk_priority": _BULK_PRIORITY_ROWS[tool]}}
    raise ToolError(tool, "unknown transferd variant")


# Rows that differ only in `traffic.bulk_priority` (the default is "nice").
_BULK_PRIORITY_ROWS = {"transferd-idle-bulk": "idle", "transferd-nice-bulk": "nice",
                       "transferd-adaptive-bulk": "adaptive"}


_COUNTERS_PROBE = """
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
peer = 'peer="%s"' % sys.argv[2]
for line in text.splitlines():
    if peer in line and line.startswith(("transferd_data_channels_opened_total",
                                         "transferd_chunks_resent_total")):
        print(line.split("{")[0], line.rsplit(" ", 1)[1])
"""


_LAG_PROBE = """
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for line in text.splitlines():
    if line.startswith("transferd_event_loop_lag_seconds_"):
        print(line.rsplit(" ", 1)[0].replace(" ", ""), line.rsplit(" ", 1)[1])
"""
LAG_MARKS_S = ("0.02", "0.05", "0.1")


def _loop_late(lab: Lab, site: str, port: int) -> dict[str, int] | None:
    """From a daemon's /metrics: how many of its event loop's lag samples were 20, 50 and
    100 ms or more over the daemon's life (transferd_event_loop_lag_seconds), and the samples
    in all; None for a transferd without the metric. A sample is a probe tick (10 ms apart
    while work moves, 0.25 s when idle, since round 13; 10 ms always before) or a batch of
    data-channel calls (`net.loop_lag`): counts compare between trees of the same kind."""
    done = subprocess.run(lab.in_site(site, [sys.executable, "-c", _LAG_PROBE,
                                             f"http://{lab.addr(site)}:{port}/metrics"]),
                          capture_output=True, text=True, timeout=30, check=False)
    found = dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)
    total = found.get("transferd_event_loop_lag_seconds_count")
    if total is None:
        return None
    out = {"ticks": int(float(total))}
    for mark in LAG_MARKS_S:
        below = float(found.get(f'transferd_event_loop_lag_seconds_bucket{{le="{mark}"}}', total))
        out[f"late_{round(float(mark) * 1000)}ms"] = int(float(total) - below)
    return out


def _daemon_counters(lab: Lab, site: str, port: int, peer: str) -> dict[str, int]:
    """From the sending daemon's /metrics after the run: the data channels it opened to `peer`
    (reused channels: the streams it used) and the chunks it sent again after a channel
    broke (x 8 MiB: application-level re-sent bytes). Empty for a transferd without them."""
    done = subprocess.run(lab.in_site(site, [sys.executable, "-c", _COUNTERS_PROBE,
                                             f"http://{lab.addr(site)}:{port}/metrics", peer]),
                          capture_output=True, text=True, timeout=30, check=False)
    found = dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)
    out: dict[str, int] = {}
    if "transferd_data_channels_opened_total" in found:
        out["opened"] = int(float(found["transferd_data_channels_opened_total"]))
    if "transferd_chunks_resent_total" in found:
        out["resent_bytes"] = int(float(found["transferd_chunks_resent_total"])) * 8 * 2**20
    return out


# How long a run waits for the sending daemon's data channels to open before timing the send.
CHANNELS_WARM_S = 5.0


def _wait_channels_warm(lab: Lab, site: str, port: int, peer: str) -> None:
    """Until the sending daemon has opened its data channels to `peer` (it does so at start,
    as soon as the peer answers), at most CHANNELS_WARM_S: a daemon is a long-running service
    whose channels are open before a job arrives, as they are in use. Timing a send that
    races the opening would count a once-per-peer handshake (TCP, the HMAC exchange: two
    round trips) in one transfer. A transferd without data channels waits the whole time."""
    deadline = time.monotonic() + CHANNELS_WARM_S
    while time.monotonic() < deadline:
        counters = _daemon_counters(lab, site, port, peer)
        if counters.get("opened", 0) > 0:
            return
        time.sleep(0.05)


def _telemetry(lab: Lab, site: str, config: Path) -> dict[str, Any] | None:
    """The sending daemon's link telemetry after the run (`transferd telemetry --json`: what
    `netplan calibrate --from` reads); None for a transferd without it."""
    done = subprocess.run(lab.in_site(site, _transferd_cmd("telemetry", "--config", str(config),
                                                           "--json")),
                          capture_output=True, text=True, timeout=60, env=python_env(),
                          check=False)
    if done.returncode != 0:
        return None
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return None
    return report


def _profile(ctx: RunContext, name: str, pid: int) -> subprocess.Popen[bytes] | None:
    """With NB_PROFILE=DIR: `py-spy record` attached to `pid`, collapsed stacks per thread
    (`--format raw --threads`, 100 Hz, without pausing the process) written to
    DIR/<scenario>.<cc>-<name>-<n>.txt when the process exits (wait with `_profiles_written`);
    summed up by `python -m benchmarks.profile DIR/...`."""
    out_dir = os.environ.get("NB_PROFILE")
    if not out_dir:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise ToolError(name, "NB_PROFILE is set but py-spy is not installed (pip install py-spy)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stem = f"{ctx.scenario.scenario}.{ctx.lab.congestion_control}-{name}"
    n = len(list(Path(out_dir).glob(f"{stem}-*.txt"))) + 1
    # NB_PROFILE_GIL=1: only the thread holding the GIL is sampled (whose turns the loop waits)
    gil = ["--gil"] if os.environ.get("NB_PROFILE_GIL") else []
    return ctx.lab.spawn(None, [spy, "record", "--format", "raw", "--threads", "--nonblocking",
                                *gil, "--rate", "100", "-o", str(Path(out_dir) / f"{stem}-{n}.txt"),
                                "--pid", str(pid)], name=f"py-spy-{name}")


def _profiles_written(lab: Lab, profilers: list[subprocess.Popen[bytes] | None]) -> None:
    """py-spy writes its file once the profiled process has exited."""
    for popen in profilers:
        if popen is not None:
            try:
                popen.wait(60)
            except subprocess.TimeoutExpired:
                pass
            lab.stop(popen)


# transferd-warm: an untimed job of this size (other bytes: nothing of it is in the timed file)
# before the timed one, then this long idle, longer than the channels' retransmission timeout
# (~250 ms at 40 ms RTT) and than bbr's 10-round bandwidth window at these RTTs.
WARM_UP_MIB = 64
WARM_IDLE_S = 2.0


def _warm_up(ctx: RunContext, tool: str, config: Path, data_dir: Path) -> None:
    """One job to the peer before the timed one, as a daemon in service has run before a job
    arrives: the data channels' congestion state (window, bbr's bandwidth and RTT estimates)
    is then what the previous job and the idle time left, not a fresh connection's. The row
    says what a service's later jobs see; `transferd` (fresh channels) stays the goals' row."""
    wire0, retrans0 = ctx.lab.link_bytes(), ctx.lab.tcp_retrans_segs(ctx.src)
    size_mib = min(WARM_UP_MIB, max(1, ctx.size_bytes() // 2**20))
    warm = _link_data(dataset(ctx.work.data, size_mib, seed=1),
                      data_dir / "checkpoints" / "bench" / "warm-up")
    done = subprocess.run(ctx.lab.in_site(ctx.src, _transferd_cmd(
        "send", str(warm.relative_to(data_dir)), "--config", str(config), "--to", ctx.dst,
        "--wait", "--json")), capture_output=True, text=True, env=python_env(), timeout=300,
        check=False)
    if done.returncode != 0:
        raise ToolError(tool, f"warm-up send exit {done.returncode}: {done.stderr.strip()[-300:]}")
    time.sleep(WARM_IDLE_S)
    # The row's wire bytes and sustained rate are the timed send's alone (run_tool).
    ctx.notes["warm_up_wire_bytes"] = ctx.lab.link_bytes() - wire0
    ctx.notes["warm_up_retrans_segs"] = ctx.lab.tcp_retrans_segs(ctx.src) - retrans0
    ctx.notes["timed_from"] = time.monotonic()


def _transferd(ctx: RunContext, tool: str) -> ToolRun:
    lab = ctx.lab
    byte_compiled()
    features = _transferd_features(tool)
    interactive = ctx.work.kind is WorkKind.INTERACTIVE_DURING_BULK
    if interactive and not features["messages"]:
        raise ToolError(tool, f"{NOT_YET_SUPPORTED}: no interactive messages (transferd has no "
                        "send_message/local_signer client; traffic classes, issue 4)")
    variant = _variant(tool, features)
    keys = ctx.scratch / "transferd-keys"
    sites = (ctx.src, ctx.dst)
    keygen = subprocess.run(_transferd_cmd("keygen", "--sites", ",".join(sites), "--out",
                                           str(keys)),
                            capture_output=True, text=True, env=python_env(), timeout=60,
                            check=False)
    if keygen.returncode != 0:
        raise ToolError(tool, f"keygen failed: {keygen.stderr.strip()[-300:]}")
    configs: dict[str, Path] = {}
    data_dirs: dict[str, Path] = {}
    for site, port, peer, peer_port in ((ctx.src, TRANSFERD_PORTS[0], ctx.dst,
                                         TRANSFERD_PORTS[1]),
                                        (ctx.dst, TRANSFERD_PORTS[1], ctx.src,
                                         TRANSFERD_PORTS[0])):
        data_dirs[site] = ctx.scratch / f"transferd-{site}"
        data_dirs[site].mkdir(parents=True)
        config = {
            "site": site,
            "listen": f"{lab.addr(site)}:{port}",
            "data_dir": str(data_dirs[site]),
            "peers": {peer: {"url": f"http://{lab.addr(peer)}:{peer_port}"}},
            "keys_dir": str(keys),
            **variant,
        }
        configs[site] = ctx.scratch / f"transferd-{site}.yaml"
        configs[site].write_text(yaml.safe_dump(config, sort_keys=False))
    rel = Path("checkpoints") / "bench" / "step-1" / ctx.data_path.name
    _link_data(ctx.data_path, data_dirs[ctx.src] / rel.parent)
    daemons = {}
    profilers: list[subprocess.Popen[bytes] | None] = []
    try:
        for site, port in zip(sites, TRANSFERD_PORTS, strict=True):
            daemons[site] = lab.spawn(site, _transferd_cmd("serve", "--config",
                                                           str(configs[site])),
                                      name=f"{tool}-{site}")
            profilers.append(_profile(ctx, f"{tool}-{site}", daemons[site].pid))
            try:
                wait_listening(lab.in_site(site, []), port, alive=daemons[site],
                               what=f"transferd serve ({site})")
            except ToolError as exc:
                log = lab.log_tail(f"{tool}-{site}")
                if variant and ("unknown" in log or "extra" in log.lower()):
                    raise ToolError(tool, f"{NOT_YET_SUPPORTED}: the daemon refused "
                                    f"{sorted(variant)}: {log}") from exc
                raise ToolError(tool, f"{exc.reason}: {log}") from exc
        _wait_channels_warm(lab, ctx.src, TRANSFERD_PORTS[0], ctx.dst)
        if tool == "transferd-warm":
            _warm_up(ctx, tool, configs[ctx.src], data_dirs[ctx.src])
        cpu0 = {site: server_cpu_s(p.pid) for site, p in daemons.items()}
        threads0 = {site: thread_cpu_s(p.pid) for site, p in daemons.items()}
        cmd = _transferd_cmd("send", str(rel), "--config", str(configs[ctx.src]), "--to",
                             ctx.dst, "--wait", "--json")
        driver, driver_out = None, lab.workdir / f"{tool}-messages.json"
        echo: _EchoUnderLoad | None = None
        if interactive:
            driver = lab.spawn(ctx.src, [
                sys.executable, "-m", "benchmarks._interactive", "--url",
                f"http://{lab.addr(ctx.src)}:{TRANSFERD_PORTS[0]}", "--peer", ctx.dst,
                "--site", ctx.src, "--keys", str(keys), "--count", str(ctx.work.messages),
                "--size", str(ctx.work.message_bytes), "--deadline-ms",
                str(ctx.work.deadline_ms), "--interval-ms", str(MESSAGES_INTERVAL_MS),
                "--start-delay-s", str(MESSAGES_START_DELAY_S), "--out", str(driver_out),
                "--transport", "http" if tool == "transferd-http-messages" else "socket"],
                name=f"{tool}-messages")
            echo = _EchoUnderLoad(ctx, count=ctx.work.messages, size=ctx.work.message_bytes)
        ctx.transfer_started()
        got = run_measured(lab.in_site(ctx.src, cmd), timeout_s=TRANSFER_TIMEOUT_S,
                           env=python_env(), log_dir=lab.workdir, name=tool)
        bulk_done_at = time.time()
        channels = _daemon_counters(lab, ctx.src, TRANSFERD_PORTS[0], ctx.dst)
        ctx.notes["transferd_telemetry"] = _telemetry(lab, ctx.src, configs[ctx.src])
        loop_late: dict[str, dict[str, int] | None] = {}
        if driver is not None:
            try:
                driver.wait(120)
            except subprocess.TimeoutExpired as exc:
                raise ToolError(tool, "interactive messages did not finish in 120 s") from exc
            loop_late = {site: _loop_late(lab, site, port)
                         for site, port in zip((ctx.src, ctx.dst), TRANSFERD_PORTS, strict=True)}
            if driver.returncode != 0:
                raise ToolError(tool, "interactive message driver failed: "
                                + lab.log_tail(f"{tool}-messages"))
        echo_all = echo.finish() if echo is not None else []
        # The floor counts the round trips that started while the bulk ran: one after another
        # (~45 ms each, 5 ms apart), most of the 500 start after a 1 GiB bulk has finished.
        echo_rtts = started_by(echo_all, bulk_done_at)
        cpu_by_process = {
            **{f"{'sender' if site == ctx.src else 'receiver'}_daemon":
               round(server_cpu_s(p.pid) - cpu0[site], 3) for site, p in daemons.items()},
            "send_cli": round(got.cpu_s, 3)}
        cpu = sum(cpu_by_process.values())
        cpu_by_thread = {}
        for site, p in daemons.items():
            before = threads0[site]
            cpu_by_thread[f"{'sender' if site == ctx.src else 'receiver'}_daemon"] = {
                name: round(s - before.get(name, 0.0), 3)
                for name, s in sorted(thread_cpu_s(p.pid).items())
                if s - before.get(name, 0.0) > 0}
        rss = ({site: round(peak_rss_mib(p.pid), 1) for site, p in daemons.items()}
               if ctx.scenario.peak_rss else None)
    finally:
        if echo is not None:
            echo.stop()
        for popen in daemons.values():
            lab.stop(popen, timeout=15)
        _profiles_written(lab, profilers)
    if got.returncode != 0:
        raise ToolError(tool, f"send exit {got.returncode}: {got.stderr.strip()[-300:]}")
    try:
        report = json.loads(got.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise ToolError(tool, f"send printed no JSON object: {got.stdout[-300:]}") from exc
    ctx.verify(tool, data_dirs[ctx.dst] / rel)
    size = ctx.size_bytes()
    ctx.notes["transferd_report"] = report
    run = ToolRun(tool=tool, ok=True, goodput_mbit=_goodput(size, got.seconds),
                  seconds=got.seconds, cpu_s=cpu, bytes_logical=int(report["bytes_logical"]),
                  peak_rss_mib=rss, streams=channels.get("opened"),
                  app_resent_bytes=channels.get("resent_bytes"), cpu_by_process=cpu_by_process,
                  cpu_by_thread=cpu_by_thread, host=got.host)
    if interactive:
        result = json.loads(driver_out.read_text())
        latencies = [round(v, 3) for v in result["latencies_ms"]]
        daemon = result.get("daemon_latencies_ms", [])
        outside = result.get("outside_daemon_ms", [])
        run.latencies_ms = latencies
        run.messages = {
            "sent": ctx.work.messages, "delivered": len(latencies),
            "failed": result["n_errors"], "late": result["late"],
            "budget_misses": result["budget_misses"],
            "sent_after_bulk_finished": sum(t > bulk_done_at for t in result["sent_at"]),
            "errors": result["errors"], "miss_reasons": result["miss_reasons"],
            # Each daemon's event loop: 10 ms timer ticks that ran 20/50/100 ms or more late
            # (the loop busy, or waiting for the GIL or a CPU) over the daemon's life.
            "loop_late": loop_late,
            # The message client's own loop (a normal-priority process): ticks 20 ms late.
            "client_loop_late": result.get("client_loop"),
            # ... and its loop thread's CPU time and run-queue wait while the messages went out.
            "client_sched": result.get("client_sched"),
            # Per message, the client's latency minus the sending daemon's own (the local API
            # hop and the client process).
            **{f"outside_daemon_p{pct}_ms": percentile(outside, pct) if outside else None
               for pct in (50, 99)},
            # The same messages timed inside the sending daemon (queued -> the peer's answer):
            # the rest of p50_ms/p99_ms is the local API hop and the client process.
            **{f"daemon_p{pct}_ms": percentile(daemon, pct) if daemon else None
               for pct in (50, 99)},
            # A bare TCP echo of the same size over the same link during the same bulk: the
            # floor the network (queue and emulator) sets for any small message in this run.
            **{f"echo_p{pct}_ms": percentile(echo_rtts, pct) if echo_rtts else None
               for pct in (50, 99)},
            "echo_during_bulk": len(echo_rtts),
            # ... and over all its round trips, those after the bulk too (rounds 1-9's floor).
            **{f"echo_all_p{pct}_ms": percentile([ms for _, ms in echo_all], pct)
               if echo_all else None for pct in (50, 99)},
        }
        if latencies:
            run.p50_ms = percentile(latencies, 50)
            run.p99_ms = percentile(latencies, 99)
        if result["n_errors"]:
            run.ok = False
            run.error = (f"{result['n_errors']} of {ctx.work.messages} messages failed: "
                         + "; ".join(result["errors"][:2]))
    return run


ADAPTERS: dict[str, Callable[[RunContext], ToolRun]] = {
    "transferd": lambda ctx: _transferd(ctx, "transferd"),
    "transferd-1stream": lambda ctx: _transferd(ctx, "transferd-1stream"),
    "transferd-shared-pool": lambda ctx: _transferd(ctx, "transferd-shared-pool"),
    "transferd-warm": lambda ctx: _transferd(ctx, "transferd-warm"),
    "transferd-4streams": lambda ctx: _transferd(ctx, "transferd-4streams"),
    "transferd-8streams": lambda ctx: _transferd(ctx, "transferd-8streams"),
    "transferd-normal-loop": lambda ctx: _transferd(ctx, "transferd-normal-loop"),
    "transferd-idle-bulk": lambda ctx: _transferd(ctx, "transferd-idle-bulk"),
    "transferd-nice-bulk": lambda ctx: _transferd(ctx, "transferd-nice-bulk"),
    "transferd-adaptive-bulk": lambda ctx: _transferd(ctx, "transferd-adaptive-bulk"),
    "transferd-http-messages": lambda ctx: _transferd(ctx, "transferd-http-messages"),
    "iperf3-1stream": lambda ctx: _iperf3(ctx, 1),
    "iperf3-8streams": lambda ctx: _iperf3(ctx, 8),
    "rsync": lambda ctx: _rsync(ctx, zstd=False),
    "rsync-zstd": lambda ctx: _rsync(ctx, zstd=True),
    "rclone": _rclone,
    "disk-direct": lambda ctx: _disk(ctx, direct=True),
    "disk-buffered": lambda ctx: _disk(ctx, direct=False),
}


def run_tool(tool: str, ctx: RunContext) -> ToolRun:
    """One measured run with the link's counters around it; never raises for a tool's failure
    (the reason lands in `error`)."""
    lab = ctx.lab
    data = None if tool.startswith("iperf3") else ctx.work.data.value
    settled_s = settle_host()
    bytes0 = lab.link_bytes()
    emu0 = lab.emulator_sample()
    retrans0 = lab.tcp_retrans_segs(ctx.src) if lab.ends else None
    flap = ctx.scenario.flap
    ctx.flapper = LinkFlapper(lab.set_link_up, flap.at_s, flap.down_s) if flap else None
    sampler = _TxSampler(lab) if lab.ends is not None else None
    try:
        run = ADAPTERS[tool](ctx)
    except (ToolError, LabError) as exc:
        reason = exc.reason if isinstance(exc, ToolError) else str(exc)
        run = ToolRun(tool=tool, ok=False, error=reason)
    finally:
        samples = sampler.stop() if sampler is not None else []
        if samples and os.environ.get("NB_KEEP_LOGS"):  # the sending interface over time
            assert sampler is not None
            (lab.workdir / f"{tool}-tx.log").write_text(
                "\n".join(f"{t - sampler.t0:.3f} {b - samples[0][1]}" for t, b in samples) + "\n")
        if sampler is not None and sampler.sockets:
            (lab.workdir / f"{tool}-ss.log").write_text(
                f"# t0_wall {sampler.t0_wall:.3f}\n"
                + "".join(f"@ {t - sampler.t0:.3f}\n{text}" for t, text in sampler.sockets))
        if ctx.flapper is not None:
            ctx.flapper.stop()
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        ctx.scratch.mkdir(parents=True, exist_ok=True)
    run.data = data
    if run.host is not None:
        run.host["settled_s"] = settled_s  # waited for a quiet machine before the run
    run.bytes_on_wire = lab.link_bytes() - bytes0 - ctx.notes.get("warm_up_wire_bytes", 0)
    if "timed_from" in ctx.notes:  # from the last sample before the timed send on
        before = [s for s in samples if s[0] < ctx.notes["timed_from"]]
        samples = before[-1:] + [s for s in samples if s[0] >= ctx.notes["timed_from"]]
    emu1 = lab.emulator_sample()
    if retrans0 is not None:
        run.tcp_retrans_segs = (lab.tcp_retrans_segs(ctx.src) - retrans0
                                - ctx.notes.get("warm_up_retrans_segs", 0))
        if flap:
            # TCP's re-sent segments, plus chunks an application sent again (transferd: those
            # a broken data channel had in flight).
            run.resent_bytes = run.tcp_retrans_segs * MSS_BYTES + (run.app_resent_bytes or 0)
    if emu0 is not None and emu1 is not None:
        share = emu1.cpu_share_since(emu0)
        run.emulator_cpu_pct = round(100 * share, 1) if share is not None else None
    rate = ctx.scenario.link.rate_mbit if ctx.scenario.link else None
    if rate and run.goodput_mbit is not None:
        run.link_pct = 100 * run.goodput_mbit / rate
    sustained = sustained_rate(samples) if run.ok else None
    if sustained is not None:
        run.sustained_mbit = sustained * 8 / 1e6
        if rate:
            run.sustained_link_pct = 100 * run.sustained_mbit / rate
    why = rejection(emu0, emu1)
    if why and run.ok:
        run.ok = False
        run.error = f"rejected: {why}"
    return run


class _TxSampler:
    """The data direction's interface counter, sampled in a thread while a tool runs. With
    NB_TIMELINE=1 (and NB_KEEP_LOGS=DIR, where it lands as <tool>-ss.log) every 0.1 s, and each
    sample also keeps `ss -tinm` of the sending site's TCP connections (cwnd, retransmits,
    pacing and delivery rates, rwnd- and sndbuf-limited times, socket memory): a timeline of
    where a run loses time against the link. The `ss` calls cost CPU on the 2-core machine:
    for diagnosis, not for the committed numbers."""

    INTERVAL_S = 0.2

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.samples: list[tuple[float, int]] = []
        self.sockets: list[tuple[float, str]] = []
        self.timeline = bool(os.environ.get("NB_TIMELINE") and os.environ.get("NB_KEEP_LOGS"))
        self.interval_s = 0.1 if self.timeline else self.INTERVAL_S
        self.t0, self.t0_wall = time.monotonic(), time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tx-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.lab.ends is not None
        ss = ["ip", "netns", "exec", self.lab.ends.ns_a, "ss", "-tinmH", "state", "established"]
        while True:
            try:
                value = self.lab.data_tx_bytes()
            except LabError:
                value = None
            now = time.monotonic()
            if value is not None:
                self.samples.append((now, value))
            if self.timeline:
                done = subprocess.run(ss, capture_output=True, text=True, timeout=5,
                                      check=False)
                self.sockets.append((now, done.stdout))
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


class _EchoUnderLoad:
    """TCP echo round trips (TCP_NODELAY, a fresh `benchmarks._echo` pair) from the source site
    to the destination while the bulk transfer runs, on the message driver's schedule."""

    def __init__(self, ctx: RunContext, *, count: int, size: int) -> None:
        lab = ctx.lab
        if lab.ends is None:
            raise ToolError("echo", "a loopback lab has no link")
        self.lab = lab
        self.server = lab.start_echo_server(ctx.dst, "echo-under-load-server")
        self.client: subprocess.Popen[bytes] | None = lab.spawn(ctx.src, lab.echo_client_args(
            ctx.dst, count, "--size", str(size), "--interval-ms", str(MESSAGES_INTERVAL_MS),
            "--start-delay-s", str(MESSAGES_START_DELAY_S), "--timeout-s", "30", "--times"),
            name="echo-under-load-client", stdout=subprocess.PIPE)

    def finish(self) -> list[tuple[float, float]]:
        """(Unix time started, ms) per round trip (empty when the echo failed: it is context,
        not the result)."""
        if self.client is None:
            return []
        try:
            out, _ = self.client.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            return []
        if self.client.returncode != 0:
            return []
        try:
            return [(float(t), float(ms)) for t, ms in json.loads(out)]
        except (ValueError, TypeError):
            return []

    def stop(self) -> None:
        for popen in (self.client, self.server):
            if popen is not None:
                self.lab.stop(popen)
