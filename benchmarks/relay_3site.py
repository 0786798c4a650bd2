"""The runner of scenarios with a third site (`relay-3site`): a slow lossy direct link A-B and
fast links A-R, R-B (the scenario's `links`, direct first), and one file moved from A to B by
each tool:

- transferd-direct: `transferd send` straight over A-B;
- transferd-relay: `transferd send --via R` (R's daemon relays chunk by chunk);
- transferd-multipath: `--via R --multipath`, both paths at once;
- rsync-direct: rsync daemon at B, client at A, over A-B;
- rsync-two-hop: rsync A -> R, then R -> B, timed end to end.

Beside them, the planner's prediction for the same topology (netplan's throughput model: the
direct path's and the relayed path's transfer time), so the measured speed-up of relaying can be
set against the one the plan promised. The direct link moves 512 MiB in minutes (rsync over a
1 % lossy 80 ms link: far longer), so the direct tools are measured over a bounded window of
steady transfer (the scenario's `window_s`) and their time is projected from that rate; the
results say which numbers are projected. `benchmarks.runner.run_scenario` hands such scenarios
here; run (as root, under the bench lock):

    flock /tmp/netplan-bench.lock python -m benchmarks run relay-3site

writes benchmarks/results/relay-3site.json and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.backends import BackendChoice, probe_backend
from benchmarks.datasets import dataset, file_blake3
from benchmarks.errors import LabError, ToolError
from benchmarks.lab import Lab, MeshLink, python_env
from benchmarks.linkspec import LinkSpec
from benchmarks.measure import run_measured, wait_listening
from benchmarks.runner import _git_commit
from benchmarks.scenario import Scenario, load_scenario

__all__ = ["SCENARIO", "ToolResult", "planner_prediction", "run_relay_3site",
           "run_relay_scenario"]

SCENARIO = "relay-3site"
PORT = 7801  # every daemon's control port, inside its own namespace
RSYNC_PORT = 8873
REL = "approved/bench/data.bin"


@dataclass
class ToolResult:
    tool: str
    ok: bool
    seconds: float | None = None  # measured, or projected from the window's rate
    goodput_mbit: float | None = None
    projected: bool = False  # seconds came from a rate measured over a window
    window_s: float | None = None
    window_bytes: int | None = None
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Ends:
    """The scenario's sites: where the file starts, the relay, where it goes."""

    src: str
    relay: str
    dst: str

    @classmethod
    def of(cls, scenario: Scenario) -> _Ends:
        return cls(scenario.source_site(), scenario.relay_site(), scenario.dest_site())


def planner_prediction(scenario: Scenario, size_mib: int) -> dict[str, float]:
    """netplan's predicted transfer times for the direct path and the path through the relay,
    on the scenario's links."""
    from netplan.loader import parse_topology
    from netplan.network import Network
    from netplan.routes import candidates

    ends = _Ends.of(scenario)

    def link(a: str, b: str, spec: LinkSpec) -> str:
        return (f"  - {{between: [{a}, {b}], bandwidth_gbps: {(spec.rate_mbit or 10_000) / 1000}, "
                f"rtt_ms: {spec.rtt_ms}, loss_pct: {spec.loss_pct}}}\n")

    text = textwrap.dedent(f"""\
        name: {scenario.scenario}
        sites:
          - {{id: {ends.src}, kind: onprem, region: eu}}
          - {{id: {ends.relay}, kind: cloud, region: eu}}
          - {{id: {ends.dst}, kind: cloud, region: eu}}
        links:
        """) + "".join(link(*x.between, x.spec) for x in scenario.links)
    network = Network(parse_topology(text, scenario.scenario))
    size_gb = size_mib * 2**20 / 1e9
    times = {"->".join(c.path.sites): c.seconds
             for c in candidates(network, ends.src, ends.dst, size_gb)}
    direct = times[f"{ends.src}->{ends.dst}"]
    relay = times[f"{ends.src}->{ends.relay}->{ends.dst}"]
    return {"direct_s": direct, "relay_s": relay, "factor": direct / relay}


# ---- the lab ------------------------------------------------------------------------------


def _lab(scenario: Scenario, choice: BackendChoice, cc: str) -> Lab:
    return Lab(sites=scenario.sites, link=scenario.links[0].spec, choice=choice,
               congestion_control=cc,
               mesh=tuple(MeshLink(*x.between, x.spec) for x in scenario.links))


def _transferd(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferd", *args]


class _Sites:
    """Three transferd daemons (fresh data dirs and keys), the relay passing the source's
    transfers on to the destination."""

    def __init__(self, lab: Lab, ends: _Ends, scratch: Path, data: Path, chunk_mib: int = 8,
                 extra: dict[str, Any] | None = None,
                 caps_mbps: dict[str, float] | None = None) -> None:
        self.lab, self.ends, self.scratch = lab, ends, scratch
        names = (ends.src, ends.relay, ends.dst)
        keys = scratch / "keys"
        done = subprocess.run(_transferd("keygen", "--sites", ",".join(names), "--out",
                                         str(keys)),
                              capture_output=True, text=True, env=python_env(), timeout=60,
                              check=False)
        if done.returncode != 0:
            raise ToolError("transferd", f"keygen failed: {done.stderr.strip()[-300:]}")
        self.configs: dict[str, Path] = {}
        self.data_dirs: dict[str, Path] = {}
        for site in names:
            peers: dict[str, Any] = {p: {"url": f"http://{lab.addr_on(p, site)}:{PORT}"}
                                     for p in names if p != site}
            if site == ends.src:  # `caps_mbps`: its rate caps toward its peers (to slow a run)
                for p, mbps in (caps_mbps or {}).items():
                    peers[p]["rate_caps_mbps"] = {"total": mbps}
            self.data_dirs[site] = scratch / f"site-{site}"
            config: dict[str, Any] = {
                "site": site, "listen": f"0.0.0.0:{PORT}", "data_dir": str(self.data_dirs[site]),
                "keys_dir": str(keys), "peers": peers, "chunk_size": chunk_mib * 2**20,
                **(extra or {}),
            }  # fmt: skip
            if site == ends.relay:
                config["relay"] = {"for_peers": [ends.src], "destinations": [ends.dst]}
            self.configs[site] = scratch / f"site-{site}.yaml"
            self.configs[site].write_text(yaml.safe_dump(config, sort_keys=False))
        src = self.data_dirs[ends.src] / REL
        src.parent.mkdir(parents=True)
        src.hardlink_to(data)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, tag: str) -> None:
        for site in (self.ends.dst, self.ends.relay, self.ends.src):
            self.procs[site] = self.lab.spawn(
                site, _transferd("serve", "--config", str(self.configs[site])),
                name=f"{tag}-{site}")
        for site, proc in self.procs.items():
            wait_listening(self.lab.in_site(site, []), PORT, alive=proc,
                           what=f"transferd serve ({site})")

    def send(self, tag: str, *extra: str, wait: bool = True, timeout_s: float = 1800
             ) -> tuple[float, str]:
        cmd = _transferd("send", REL, "--config", str(self.configs[self.ends.src]), "--to",
                         self.ends.dst, *extra, "--json", *(["--wait"] if wait else []))
        got = run_measured(self.lab.in_site(self.ends.src, cmd), timeout_s=timeout_s,
                           env=python_env(), log_dir=self.lab.workdir, name=tag)
        if got.returncode != 0:
            raise ToolError(tag, f"send exit {got.returncode}: {got.stderr.strip()[-300:]}")
        return got.seconds, got.stdout

    def status(self) -> dict[str, Any]:
        done = subprocess.run(self.lab.in_site(self.ends.src, _transferd(
            "status", "--config", str(self.configs[self.ends.src]), "--json")),
            capture_output=True, text=True, env=python_env(), timeout=60, check=False)
        if done.returncode != 0:
            raise ToolError("transferd", f"status failed: {done.stderr.strip()[-300:]}")
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            self.lab.stop(proc, timeout=15)
        self.procs.clear()

    def received(self) -> Path:
        return self.data_dirs[self.ends.dst] / REL


def _link_tx(lab: Lab, site: str, peer: str) -> int:
    """Bytes `site` sent on its link to `peer` (the device's counter: headers and TCP's
    re-sent segments included, the same measure for every tool)."""
    e = lab.ends_between(site, peer)
    ns, dev = (e.ns_a, e.dev_a) if e.site_a == site else (e.ns_b, e.dev_b)
    info = json.loads(lab.must(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev]))
    return int(info[0]["stats64"]["tx"]["bytes"])


def _window_rate(progress: Callable[[], int], window_s: float, warmup_s: float,
                 alive: Callable[[], bool]) -> tuple[float, int]:
    """Bytes per second of `progress()` over `window_s` after `warmup_s` (a start-up that
    opens connections and fills the pipe is not the steady rate)."""
    deadline = time.monotonic() + warmup_s + 120
    while progress() <= 0:
        if time.monotonic() > deadline or not alive():
            raise ToolError("window", "no progress before the window")
        time.sleep(0.2)
    time.sleep(warmup_s)
    b0, t0 = progress(), time.monotonic()
    time.sleep(window_s)
    b1, t1 = progress(), time.monotonic()
    if b1 <= b0:
        raise ToolError("window", f"nothing moved in the {window_s:g} s window")
    return (b1 - b0) / (t1 - t0), b1 - b0


# ---- the tools ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What every tool's run gets: the lab, the sites, the file and its size and hash."""

    lab: Lab
    ends: _Ends
    scratch: Path
    data: Path
    size: int
    digest: str
    window_s: float


def _transferd_direct(run: _Run) -> ToolResult:
    sites = _Sites(run.lab, run.ends, run.scratch, run.data)
    sites.start("transferd-direct")
    try:
        sites.send("transferd-direct-send", wait=False)
        rate, moved = _window_rate(lambda: _link_tx(run.lab, run.ends.src, run.ends.dst),
                                   run.window_s, 5.0, lambda: True)
    finally:
        sites.stop()
    return ToolResult("transferd-direct", True, seconds=run.size / rate,
                      goodput_mbit=rate * 8 / 1e6, projected=True, window_s=run.window_s,
                      window_bytes=moved)


def _transferd_relay(run: _Run, multipath: bool = False) -> ToolResult:
    tool = "transferd-multipath" if multipath else "transferd-relay"
    sites = _Sites(run.lab, run.ends, run.scratch, run.data)
    sites.start(tool)
    try:
        extra = ("--via", run.ends.relay) + (("--multipath",) if multipath else ())
        seconds, out = sites.send(f"{tool}-send", *extra)
        report = json.loads(out.strip().splitlines()[-1])
        status = sites.status()
    finally:
        sites.stop()
    if file_blake3(sites.received()) != run.digest:
        raise ToolError(tool, "received file differs from the source (blake3 mismatch)")
    routes = [r for j in status["jobs"] for r in j.get("route_status", [])]
    return ToolResult(tool, True, seconds=seconds, goodput_mbit=run.size * 8 / seconds / 1e6,
                      notes={"routes": routes, "bytes_on_wire": report.get("bytes_on_wire")})


def _rsync_daemon(lab: Lab, site: str, dest: Path, tag: str) -> subprocess.Popen[bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    conf = lab.workdir / f"{tag}.conf"
    conf.write_text(f"pid file = {lab.workdir / (tag + '.pid')}\nuse chroot = false\n"
                    f"[bench]\npath = {dest}\nread only = false\nuid = root\ngid = root\n")
    server = lab.spawn(site, ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                              f"--port={RSYNC_PORT}"], name=tag)
    wait_listening(lab.in_site(site, []), RSYNC_PORT, alive=server, what="rsync --daemon")
    return server


def _rsync_direct(run: _Run) -> ToolResult:
    if shutil.which("rsync") is None:
        raise ToolError("rsync-direct", "rsync is not installed")
    lab, ends = run.lab, run.ends
    server = _rsync_daemon(lab, ends.dst, run.scratch / "rsync-dst", "rsync-direct-daemon")
    client = lab.spawn(ends.src, ["rsync", "-a", "--inplace", str(run.data),
                                  f"rsync://{lab.addr_on(ends.dst, ends.src)}:{RSYNC_PORT}"
                                  "/bench/"],
                       name="rsync-direct")
    try:
        rate, moved = _window_rate(lambda: _link_tx(lab, ends.src, ends.dst), run.window_s,
                                   5.0, lambda: client.poll() is None)
    finally:
        lab.stop(client)
        lab.stop(server)
    return ToolResult("rsync-direct", True, seconds=run.size / rate,
                      goodput_mbit=rate * 8 / 1e6, projected=True, window_s=run.window_s,
                      window_bytes=moved)


def _rsync_two_hop(run: _Run) -> ToolResult:
    if shutil.which("rsync") is None:
        raise ToolError("rsync-two-hop", "rsync is not installed")
    lab, ends = run.lab, run.ends
    at_r, at_b = run.scratch / "rsync-relay", run.scratch / "rsync-dst"
    servers = [_rsync_daemon(lab, ends.relay, at_r, "rsync-two-hop-relay"),
               _rsync_daemon(lab, ends.dst, at_b, "rsync-two-hop-dst")]
    try:
        first = run_measured(lab.in_site(ends.src, [
            "rsync", "-a", str(run.data),
            f"rsync://{lab.addr_on(ends.relay, ends.src)}:{RSYNC_PORT}/bench/"]),
            timeout_s=1800, log_dir=lab.workdir, name="rsync-two-hop-1")
        if first.returncode != 0:
            raise ToolError("rsync-two-hop", f"{ends.src} -> {ends.relay} exit "
                                             f"{first.returncode}")
        second = run_measured(lab.in_site(ends.relay, [
            "rsync", "-a", str(at_r / run.data.name),
            f"rsync://{lab.addr_on(ends.dst, ends.relay)}:{RSYNC_PORT}/bench/"]),
            timeout_s=1800, log_dir=lab.workdir, name="rsync-two-hop-2")
        if second.returncode != 0:
            raise ToolError("rsync-two-hop", f"{ends.relay} -> {ends.dst} exit "
                                             f"{second.returncode}")
    finally:
        for server in servers:
            lab.stop(server)
    if file_blake3(at_b / run.data.name) != run.digest:
        raise ToolError("rsync-two-hop", "received file differs from the source")
    seconds = first.seconds + second.seconds
    return ToolResult("rsync-two-hop", True, seconds=seconds,
                      goodput_mbit=run.size * 8 / seconds / 1e6,
                      notes={"to_relay_s": first.seconds, "relay_to_dst_s": second.seconds})


_TOOLS: dict[str, Callable[[_Run], ToolResult]] = {
    "transferd-direct": _transferd_direct,
    "transferd-relay": _transferd_relay,
    "transferd-multipath": lambda run: _transferd_relay(run, multipath=True),
    "rsync-direct": _rsync_direct,
    "rsync-two-hop": _rsync_two_hop,
}


def run_relay_scenario(scenario: Scenario, choice: BackendChoice, *, quick: bool, repeat: int,
                       command: str, congestion_control: str, log: Any = print
                       ) -> dict[str, Any]:
    """`benchmarks.runner.run_scenario` for a scenario with a relay site: the results
    document in the runner's format (`runs`, `link`: the direct one), plus the planner's
    prediction and the measured speed-up of the relay. Written as `<scenario>.json` (one
    congestion control)."""
    work = scenario.work[0]
    size_mib = work.quick_size_mib if quick else work.size_mib
    window_s = scenario.quick_window_s if quick else scenario.window_s
    direct = scenario.links[0].spec
    doc: dict[str, Any] = {
        "scenario": scenario.scenario,
        "description": scenario.description,
        "backend": choice.name,
        "backend_probe": list(choice.reasons),
        "kernel": platform.release(),
        "congestion_control": congestion_control,
        "link": direct.summary(),
        "links": {"-".join(x.between): x.spec.describe() for x in scenario.links},
        "queue_limit_pkts": direct.queue_limit_pkts,
        "measured_rtt_ms": None,
        "rtt_samples_ms": [],
        "command": command,
        "quick": quick,
        "repeat": repeat,
        "size_mib": size_mib,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "cpus": os.cpu_count(),
        "runs": [],
        "error": None,
    }
    if len(scenario.ccs) == 1:
        doc["results_name"] = scenario.scenario  # results/relay-3site.json, as the issue says
    data = dataset(work.data, size_mib)
    digest, size = file_blake3(data), data.stat().st_size
    tag = f"[{scenario.scenario}/{congestion_control}]"
    runs: list[dict[str, Any]] = []
    try:
        with _lab(scenario, choice, congestion_control) as lab:
            log(f"{tag} lab up: run {lab.run_id}; links {doc['links']}")
            for attempt in range(repeat):
                for tool in scenario.tools:
                    scratch = lab.workdir / f"scratch-{tool}-{attempt}"
                    scratch.mkdir()
                    run = _Run(lab, _Ends.of(scenario), scratch, data, size, digest, window_s)
                    try:
                        result = _TOOLS[tool](run)
                    except (ToolError, LabError) as exc:
                        reason = exc.reason if isinstance(exc, ToolError) else str(exc)
                        result = ToolResult(tool, False, error=reason)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                    runs.append({**asdict(result), "data": work.data.value,
                                 "bytes_logical": size})
                    log(f"{tag} {tool} #{attempt + 1}: "
                        + (f"{result.goodput_mbit:.1f} Mbit/s, {result.seconds:.1f} s"
                           + (" (projected)" if result.projected else "")
                           if result.ok and result.seconds and result.goodput_mbit
                           else f"error: {result.error}"))
    except LabError as exc:
        doc["error"] = str(exc)
        log(f"{tag} lab error: {exc}")
    doc["runs"] = runs
    prediction = planner_prediction(scenario, size_mib)
    doc["planner"] = prediction
    doc["relay_speedup_goal"] = prediction["factor"] / 2

    def median_s(tool: str) -> float | None:
        got = [r["seconds"] for r in runs if r["tool"] == tool and r["ok"] and r["seconds"]]
        return statistics.median(got) if got else None

    d, r = median_s("transferd-direct"), median_s("transferd-relay")
    doc["relay_speedup_measured"] = d / r if d and r else None
    log(f"{tag} planner: direct {prediction['direct_s']:.1f} s, via {scenario.relay_site()} "
        f"{prediction['relay_s']:.1f} s, {prediction['factor']:.1f}x; measured "
        + (f"{doc['relay_speedup_measured']:.1f}x" if doc["relay_speedup_measured"] else "-")
        + f" (goal >= {doc['relay_speedup_goal']:.1f}x)")
    return doc


def run_relay_3site(size_mib: int, window_s: float, cc: str = "bbr",
                    tools: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The shipped `relay-3site` scenario at another size, window or set of tools (the tests'
    way in; the command line's is `python -m benchmarks run relay-3site`)."""
    base = load_scenario(SCENARIO)
    work = base.work[0].model_copy(update={"size_mib": size_mib})
    scenario = base.model_copy(update={"work": (work,), "window_s": window_s,
                                       "tools": tools or base.tools})
    return run_relay_scenario(scenario, probe_backend(), quick=False, repeat=1,
                              command=f"run_relay_3site({size_mib}, {window_s:g}, {cc!r})",
                              congestion_control=cc)
