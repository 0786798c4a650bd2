"""Scenario relay-3site: three sites in network namespaces, a slow lossy direct link A-B and
fast links A-R and R-B, and one file moved from A to B by each tool:

- transferd-direct: `transferd send` straight over A-B;
- transferd-relay: `transferd send --via R` (R's daemon relays chunk by chunk);
- transferd-multipath: a job routed over both paths at once (a plan's `routes` with shares);
- rsync-direct: rsync daemon at B, client at A, over A-B;
- rsync-two-hop: rsync A -> R, then R -> B, timed end to end.

Beside them, the planner's prediction for the same topology (netplan's throughput model: the
direct path's and the relayed path's transfer time), so the measured speed-up of relaying can be
set against the one the plan promised. The direct link moves 512 MiB in minutes (rsync over a
1 % lossy 80 ms link: far longer), so the direct tools are measured over a bounded window of
steady transfer (`--window-s`) and their time is projected from that rate; the results say
which numbers are projected. Run (as root, under the bench lock):

    flock /tmp/netplan-bench.lock python -m benchmarks.relay_3site --size-mib 512

writes benchmarks/results/relay-3site.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.backends import probe_backend
from benchmarks.datasets import dataset, file_blake3
from benchmarks.errors import LabError, ToolError
from benchmarks.lab import Lab, MeshLink, python_env
from benchmarks.linkspec import LinkSpec
from benchmarks.measure import run_measured, wait_listening
from benchmarks.scenario import DataKind

__all__ = ["FAST", "SLOW", "TOOLS", "ToolResult", "planner_prediction", "run_relay_3site"]

SCENARIO = "relay-3site"
SLOW = LinkSpec(rate_mbit=20, delay_ms=40, loss_pct=1)  # A-B: 20 Mbit/s, 80 ms RTT, 1 % loss
FAST = LinkSpec(rate_mbit=1000)  # A-R and R-B
TOOLS = ("transferd-direct", "transferd-relay", "transferd-multipath", "rsync-direct",
         "rsync-two-hop")
PORT = 7801  # every daemon's control port, inside its own namespace
RSYNC_PORT = 8873
RESULTS = Path(__file__).resolve().parent / "results" / f"{SCENARIO}.json"
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


def planner_prediction(size_mib: int, slow: LinkSpec = SLOW, fast: LinkSpec = FAST
                       ) -> dict[str, float]:
    """netplan's predicted transfer times for the direct path and the path through R."""
    from netplan.loader import parse_topology
    from netplan.network import Network
    from netplan.routes import candidates

    def link(a: str, b: str, spec: LinkSpec) -> str:
        return (f"  - {{between: [{a}, {b}], bandwidth_gbps: {(spec.rate_mbit or 10_000) / 1000}, "
                f"rtt_ms: {spec.rtt_ms}, loss_pct: {spec.loss_pct}}}\n")

    text = textwrap.dedent("""\
        name: relay-3site
        sites:
          - {id: A, kind: onprem, region: eu}
          - {id: R, kind: cloud, region: eu}
          - {id: B, kind: cloud, region: eu}
        links:
        """) + link("A", "B", slow) + link("A", "R", fast) + link("R", "B", fast)
    network = Network(parse_topology(text, "relay-3site"))
    size_gb = size_mib * 2**20 / 1e9
    times = {"->".join(c.path.sites): c.seconds for c in candidates(network, "A", "B", size_gb)}
    direct, relay = times["A->B"], times["A->R->B"]
    return {"direct_s": direct, "relay_s": relay, "factor": direct / relay}


# ---- the lab ------------------------------------------------------------------------------


def _lab(cc: str) -> Lab:
    return Lab(sites=("A", "R", "B"), link=SLOW, choice=probe_backend(), congestion_control=cc,
               mesh=(MeshLink("A", "B", SLOW), MeshLink("A", "R", FAST),
                     MeshLink("R", "B", FAST)))


def _transferd(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferd", *args]


class _Sites:
    """Three transferd daemons (fresh data dirs and keys), R relaying A's transfers to B."""

    def __init__(self, lab: Lab, scratch: Path, data: Path, chunk_mib: int = 8,
                 extra: dict[str, Any] | None = None,
                 caps_mbps: dict[str, float] | None = None) -> None:
        self.lab, self.scratch = lab, scratch
        keys = scratch / "keys"
        done = subprocess.run(_transferd("keygen", "--sites", "A,R,B", "--out", str(keys)),
                              capture_output=True, text=True, env=python_env(), timeout=60,
                              check=False)
        if done.returncode != 0:
            raise ToolError("transferd", f"keygen failed: {done.stderr.strip()[-300:]}")
        self.configs: dict[str, Path] = {}
        self.data_dirs: dict[str, Path] = {}
        for site in ("A", "R", "B"):
            peers: dict[str, Any] = {p: {"url": f"http://{lab.addr_on(p, site)}:{PORT}"}
                                     for p in ("A", "R", "B") if p != site}
            if site == "A":  # `caps_mbps`: A's rate caps toward its peers (e.g. to slow a run)
                for p, mbps in (caps_mbps or {}).items():
                    peers[p]["rate_caps_mbps"] = {"total": mbps}
            self.data_dirs[site] = scratch / f"site-{site}"
            config: dict[str, Any] = {
                "site": site, "listen": f"0.0.0.0:{PORT}", "data_dir": str(self.data_dirs[site]),
                "keys_dir": str(keys), "peers": peers, "chunk_size": chunk_mib * 2**20,
                **(extra or {}),
            }  # fmt: skip
            if site == "R":
                config["relay"] = {"for_peers": ["A"], "destinations": ["B"]}
            self.configs[site] = scratch / f"site-{site}.yaml"
            self.configs[site].write_text(yaml.safe_dump(config, sort_keys=False))
        src = self.data_dirs["A"] / REL
        src.parent.mkdir(parents=True)
        src.hardlink_to(data)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, tag: str) -> None:
        for site in ("B", "R", "A"):
            self.procs[site] = self.lab.spawn(
                site, _transferd("serve", "--config", str(self.configs[site])),
                name=f"{tag}-{site}")
        for site, proc in self.procs.items():
            wait_listening(self.lab.in_site(site, []), PORT, alive=proc,
                           what=f"transferd serve ({site})")

    def send(self, tag: str, *extra: str, wait: bool = True, timeout_s: float = 1800
             ) -> tuple[float, str]:
        cmd = _transferd("send", REL, "--config", str(self.configs["A"]), "--to", "B", *extra,
                         "--json", *(["--wait"] if wait else []))
        got = run_measured(self.lab.in_site("A", cmd), timeout_s=timeout_s, env=python_env(),
                           log_dir=self.lab.workdir, name=tag)
        if got.returncode != 0:
            raise ToolError(tag, f"send exit {got.returncode}: {got.stderr.strip()[-300:]}")
        return got.seconds, got.stdout

    def status(self) -> dict[str, Any]:
        done = subprocess.run(self.lab.in_site("A", _transferd(
            "status", "--config", str(self.configs["A"]), "--json")), capture_output=True,
            text=True, env=python_env(), timeout=60, check=False)
        if done.returncode != 0:
            raise ToolError("transferd", f"status failed: {done.stderr.strip()[-300:]}")
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            self.lab.stop(proc, timeout=15)
        self.procs.clear()

    def received(self) -> Path:
        return self.data_dirs["B"] / REL


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


def _transferd_direct(lab: Lab, scratch: Path, data: Path, size: int, window_s: float
                      ) -> ToolResult:
    sites = _Sites(lab, scratch, data)
    sites.start("transferd-direct")
    try:
        _, out = sites.send("transferd-direct-send", wait=False)
        job_id = json.loads(out.strip().splitlines()[-1])["jobs"][0]

        del job_id
        rate, moved = _window_rate(lambda: _link_tx(lab, "A", "B"), window_s, 5.0, lambda: True)
    finally:
        sites.stop()
    return ToolResult("transferd-direct", True, seconds=size / rate, goodput_mbit=rate * 8 / 1e6,
                      projected=True, window_s=window_s, window_bytes=moved)


def _transferd_relay(lab: Lab, scratch: Path, data: Path, size: int, digest: str,
                     multipath: bool = False) -> ToolResult:
    tool = "transferd-multipath" if multipath else "transferd-relay"
    sites = _Sites(lab, scratch, data)
    sites.start(tool)
    try:
        extra = ("--via", "R") if not multipath else ("--via", "R", "--multipath")
        seconds, out = sites.send(f"{tool}-send", *extra)
        report = json.loads(out.strip().splitlines()[-1])
        status = sites.status()
    finally:
        sites.stop()
    if file_blake3(sites.received()) != digest:
        raise ToolError(tool, "received file differs from the source (blake3 mismatch)")
    routes = [r for j in status["jobs"] for r in j.get("route_status", [])]
    return ToolResult(tool, True, seconds=seconds, goodput_mbit=size * 8 / seconds / 1e6,
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


def _rsync_direct(lab: Lab, scratch: Path, data: Path, size: int, window_s: float
                  ) -> ToolResult:
    if shutil.which("rsync") is None:
        raise ToolError("rsync-direct", "rsync is not installed")
    dest = scratch / "rsync-B"
    server = _rsync_daemon(lab, "B", dest, "rsync-direct-daemon")
    client = lab.spawn("A", ["rsync", "-a", "--inplace", str(data),
                             f"rsync://{lab.addr_on('B', 'A')}:{RSYNC_PORT}/bench/"],
                       name="rsync-direct")
    try:
        rate, moved = _window_rate(lambda: _link_tx(lab, "A", "B"), window_s, 5.0,
                                   lambda: client.poll() is None)
    finally:
        lab.stop(client)
        lab.stop(server)
    return ToolResult("rsync-direct", True, seconds=size / rate, goodput_mbit=rate * 8 / 1e6,
                      projected=True, window_s=window_s, window_bytes=moved)


def _rsync_two_hop(lab: Lab, scratch: Path, data: Path, size: int, digest: str) -> ToolResult:
    if shutil.which("rsync") is None:
        raise ToolError("rsync-two-hop", "rsync is not installed")
    at_r, at_b = scratch / "rsync-R", scratch / "rsync-B"
    servers = [_rsync_daemon(lab, "R", at_r, "rsync-two-hop-R"),
               _rsync_daemon(lab, "B", at_b, "rsync-two-hop-B")]
    try:
        first = run_measured(lab.in_site("A", ["rsync", "-a", str(data),
                                               f"rsync://{lab.addr_on('R', 'A')}:{RSYNC_PORT}"
                                               "/bench/"]),
                             timeout_s=1800, log_dir=lab.workdir, name="rsync-two-hop-1")
        if first.returncode != 0:
            raise ToolError("rsync-two-hop", f"A -> R exit {first.returncode}")
        second = run_measured(lab.in_site("R", ["rsync", "-a", str(at_r / data.name),
                                                f"rsync://{lab.addr_on('B', 'R')}:{RSYNC_PORT}"
                                                "/bench/"]),
                              timeout_s=1800, log_dir=lab.workdir, name="rsync-two-hop-2")
        if second.returncode != 0:
            raise ToolError("rsync-two-hop", f"R -> B exit {second.returncode}")
    finally:
        for server in servers:
            lab.stop(server)
    if file_blake3(at_b / data.name) != digest:
        raise ToolError("rsync-two-hop", "received file differs from the source")
    seconds = first.seconds + second.seconds
    return ToolResult("rsync-two-hop", True, seconds=seconds, goodput_mbit=size * 8 / seconds / 1e6,
                      notes={"a_to_r_s": first.seconds, "r_to_b_s": second.seconds})


def run_relay_3site(size_mib: int, window_s: float, cc: str = "bbr",
                    tools: tuple[str, ...] = TOOLS) -> dict[str, Any]:
    data = dataset(DataKind.INCOMPRESSIBLE, size_mib)
    digest = file_blake3(data)
    size = data.stat().st_size
    results: list[ToolResult] = []
    with _lab(cc) as lab:
        for tool in tools:
            scratch = lab.workdir / f"scratch-{tool}"
            scratch.mkdir()
            try:
                if tool == "transferd-direct":
                    results.append(_transferd_direct(lab, scratch, data, size, window_s))
                elif tool == "transferd-relay":
                    results.append(_transferd_relay(lab, scratch, data, size, digest))
                elif tool == "transferd-multipath":
                    results.append(_transferd_relay(lab, scratch, data, size, digest, True))
                elif tool == "rsync-direct":
                    results.append(_rsync_direct(lab, scratch, data, size, window_s))
                elif tool == "rsync-two-hop":
                    results.append(_rsync_two_hop(lab, scratch, data, size, digest))
            except (ToolError, LabError) as exc:
                reason = exc.reason if isinstance(exc, ToolError) else str(exc)
                results.append(ToolResult(tool, False, error=reason))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        backend = lab.choice.name
    by_tool = {r.tool: r for r in results}
    prediction = planner_prediction(size_mib)
    measured = None
    direct, relay = by_tool.get("transferd-direct"), by_tool.get("transferd-relay")
    if direct and relay and direct.ok and relay.ok and direct.seconds and relay.seconds:
        measured = direct.seconds / relay.seconds
    return {
        "scenario": SCENARIO,
        "size_mib": size_mib,
        "congestion_control": cc,
        "backend": backend,
        "links": {"A-B": SLOW.describe(), "A-R": FAST.describe(), "R-B": FAST.describe()},
        "planner": prediction,
        "relay_speedup_measured": measured,
        "relay_speedup_goal": prediction["factor"] / 2,
        "command": " ".join(["python -m benchmarks.relay_3site", "--size-mib", str(size_mib),
                             "--window-s", f"{window_s:g}", "--cc", cc]),
        "results": [asdict(r) for r in results],
    }


def table(doc: dict[str, Any]) -> str:
    lines = [f"relay-3site: {doc['size_mib']} MiB A -> B, {doc['congestion_control']}, "
             f"links {doc['links']}",
             f"{'tool':<22}{'seconds':>10}{'Mbit/s':>10}  note"]
    for r in doc["results"]:
        if not r["ok"]:
            lines.append(f"{r['tool']:<22}{'-':>10}{'-':>10}  {r['error']}")
            continue
        note = (f"projected: {r['window_bytes'] / 2**20:.1f} MiB on the link in "
                f"{r['window_s']:g} s"
                if r["projected"] else "measured end to end")
        lines.append(f"{r['tool']:<22}{r['seconds']:>10.1f}{r['goodput_mbit']:>10.1f}  {note}")
    p = doc["planner"]
    lines.append(f"planner: direct {p['direct_s']:.1f} s, via R {p['relay_s']:.1f} s, "
                 f"factor {p['factor']:.1f}x; goal >= {doc['relay_speedup_goal']:.1f}x")
    if doc["relay_speedup_measured"] is not None:
        lines.append(f"measured relay speed-up over direct: {doc['relay_speedup_measured']:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay_3site",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--cc", default="bbr", choices=("bbr", "cubic"))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    doc = run_relay_3site(args.size_mib, args.window_s, args.cc,
                          tuple(t for t in args.tools.split(",") if t))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
