"""Impairment backends behind one interface, picked by probing the kernel at start-up:

- ``netem``: ``tc qdisc add dev X root netem delay D J loss P rate R limit Q`` on both ends.
- ``userspace-nfqueue``: tbf for the rate and the bottleneck queue, plus the pure-Python NFQUEUE
  delay/loss emulator (benchmarks._nfqueue) for kernels without sch_netem (this machine's).
- ``userspace-tun``: where no NFQUEUE rule can be installed (no iptables/nft), a TUN pair with
  the same delay line forwarding between the sites (benchmarks._tun), tbf for the rate.

The chosen backend's name and the probe's reasons are recorded with every result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from benchmarks.errors import LabError
from benchmarks.linkspec import LinkSpec

if TYPE_CHECKING:
    from benchmarks.lab import Lab, LinkEnds

__all__ = [
    "BACKENDS",
    "BackendChoice",
    "EmulatorSample",
    "ImpairmentBackend",
    "probe_backend",
]

MTU_BYTES = 1514  # an Ethernet frame: the unit of `queue_limit_pkts`
# An emulator above this share of one core is the bottleneck, not the link: reject the run.
EMULATOR_CPU_LIMIT = 0.85

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_cmd(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a key of BACKENDS: "netem" | "userspace-nfqueue" | "userspace-tun"
    reasons: tuple[str, ...]  # what the probe found, recorded with the results
    rule_tool: str | None = None  # "nft" | "iptables": what installs the NFQUEUE rules


def _tun_device_exists() -> bool:
    return os.path.exists("/dev/net/tun")


def probe_backend(run: Runner = run_cmd, which: Callable[[str], str | None] = shutil.which,
                  tun_available: Callable[[], bool] = _tun_device_exists) -> BackendChoice:
    """netem when the kernel can add a netem qdisc (tried on `lo` of a throwaway namespace);
    else the NFQUEUE emulator when nft or iptables can install a queue rule there; else the
    TUN-pair emulator when /dev/net/tun exists."""
    reasons: list[str] = []
    if which("ip") is None or which("tc") is None:
        raise LabError("iproute2 (ip, tc) is not installed: cannot build emulated links")
    ns = f"nbprobe-{uuid.uuid4().hex[:8]}"
    created = run(["ip", "netns", "add", ns])
    if created.returncode != 0:
        raise LabError(f"cannot create a network namespace: {created.stderr.strip()}",
                       command=["ip", "netns", "add", ns])
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        netem = run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        if netem.returncode == 0:
            return BackendChoice("netem", ("sch_netem: available",))
        reasons.append(f"sch_netem: {netem.stderr.strip() or 'unavailable'}")
        tbf = run(["tc", "-n", ns, "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
                   "1000mbit", "burst", "256kb", "limit", "1mb"])
        if tbf.returncode != 0:
            reasons.append(f"sch_tbf: {tbf.stderr.strip()}")
            raise LabError("neither netem nor tbf is available: " + "; ".join(reasons))
        reasons.append("sch_tbf: available")
        for tool, rule in (
            ("nft", ["ip", "netns", "exec", ns, "nft", "add table inet nbprobe; "
                     "add chain inet nbprobe out { type filter hook output priority 0; }; "
                     "add rule inet nbprobe out oifname \"nonexistent0\" queue num 9"]),
            ("iptables", ["ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A", "OUTPUT",
                          "-o", "nonexistent0", "-j", "NFQUEUE", "--queue-num", "9"]),
        ):
            if which(tool) is None:
                reasons.append(f"{tool}: not installed")
                continue
            done = run(rule)
            if done.returncode == 0:
                reasons.append(f"NFQUEUE via {tool}: available")
                return BackendChoice("userspace-nfqueue", tuple(reasons), rule_tool=tool)
            reasons.append(f"NFQUEUE via {tool}: " + done.stderr.strip().splitlines()[0]
                           if done.stderr.strip() else f"NFQUEUE via {tool}: failed")
        if tun_available():
            reasons.append("/dev/net/tun: available")
            return BackendChoice("userspace-tun", tuple(reasons))
        reasons.append("/dev/net/tun: missing")
        raise LabError("no impairment backend: " + "; ".join(reasons))
    finally:
        run(["ip", "netns", "del", ns])


@dataclass(frozen=True)
class EmulatorSample:
    """Counters of the userspace emulator processes (one per namespace) at one moment."""

    cpu_s: tuple[float, ...]  # per process
    wall_s: tuple[float, ...]
    received: int
    lost: int
    self_dropped: int  # kernel queue full + socket overruns + rejected verdicts

    def cpu_share_since(self, before: EmulatorSample) -> float | None:
        """The busiest process's share of one core over the interval."""
        shares = [(c1 - c0) / (w1 - w0) for c0, c1, w0, w1
                  in zip(before.cpu_s, self.cpu_s, before.wall_s, self.wall_s, strict=True)
                  if w1 - w0 > 0.5]
        return max(shares) if shares else None


def rejection(before: EmulatorSample | None, after: EmulatorSample | None) -> str | None:
    """Why a run over this interval does not measure the link, or None when it does."""
    if before is None or after is None:
        return None
    dropped = after.self_dropped - before.self_dropped
    if dropped > 0:
        return f"emulator dropped {dropped} packets on its own (queue or socket overrun)"
    share = after.cpu_share_since(before)
    if share is not None and share > EMULATOR_CPU_LIMIT:
        return f"emulator used {share:.0%} of a core (limit {EMULATOR_CPU_LIMIT:.0%})"
    return None


class ImpairmentBackend(Protocol):
    name: str

    def create_link(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None: ...

    def apply(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None: ...

    def sample(self, lab: Lab) -> EmulatorSample | None: ...


def _veth_pair(lab: Lab, ends: LinkEnds) -> None:
    # Created straight inside the namespaces: the device names never touch the host's.
    lab.must(["ip", "link", "add", ends.dev_a, "netns", ends.ns_a, "type", "veth", "peer",
              "name", ends.dev_b, "netns", ends.ns_b])


def _tbf(lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
    """Rate cap and bottleneck queue on each end's egress."""
    if not spec.rate_mbit:
        return
    rate_bytes = spec.rate_mbit * 1e6 / 8
    # tbf must pass a whole 64 KB GSO packet at once, and 2 ms of tokens at high rates.
    burst = max(2 * 65536 + MTU_BYTES, int(rate_bytes * 0.002))
    limit = spec.queue_limit_pkts * MTU_BYTES
    for ns, dev in ((ends.ns_a, ends.dev_a), (ends.ns_b, ends.dev_b)):
        lab.must(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                  f"{spec.rate_mbit}mbit", "burst", str(burst), "limit", str(limit)])


def _sample_stats(pid: int, path: Path) -> dict[str, Any]:
    """Ask an emulator process (SIGUSR1) for fresh counters and read them."""
    try:
        seq = json.loads(path.read_text())["seq"]
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError, KeyError) as exc:
        raise LabError(f"emulator {pid} is gone: {exc}") from exc
    for _ in range(200):  # bounded: 2 s
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"seq": seq}
        if data["seq"] > seq:
            return data
        time.sleep(0.01)
    raise LabError(f"emulator {pid} did not answer for its stats within 2 s")


def _combine(stats: list[dict[str, Any]], extra_dropped: int = 0) -> EmulatorSample:
    return EmulatorSample(
        cpu_s=tuple(s["cpu_s"] for s in stats),
        wall_s=tuple(s["wall_s"] for s in stats),
        received=sum(s["received"] for s in stats),
        lost=sum(s["lost"] for s in stats),
        self_dropped=extra_dropped + sum(s["queue_dropped"] + s["user_dropped"] + s["enobufs"]
                                         + s["verdict_errors"] for s in stats),
    )


def _offloads_off(lab: Lab, ends: LinkEnds) -> None:
    # One dropped TSO/GSO super-packet would be a 64 KB burst loss, not a packet loss.
    for ns, dev in ((ends.ns_a, ends.dev_a), (ends.ns_b, ends.dev_b)):
        lab.must(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
                  "gro", "off"])


class NetemBackend:
    name = "netem"

    def __init__(self, rule_tool: str | None = None) -> None:
        del rule_tool  # netem needs no filter rules

    def create_link(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        _veth_pair(lab, ends)

    def apply(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        if spec.loss_pct:
            _offloads_off(lab, ends)
        # netem's limit counts packets held for delay as well as queued for the rate.
        bdp_pkts = int((spec.rate_mbit or 1000) * 1e6 / 8 * spec.rtt_ms / 1e3 / MTU_BYTES)
        args = ["netem", "delay", f"{spec.delay_ms}ms", f"{spec.jitter_ms}ms"]
        if spec.loss_pct:
            args += ["loss", f"{spec.loss_pct}%"]
        if spec.rate_mbit:
            args += ["rate", f"{spec.rate_mbit}mbit"]
        args += ["limit", str(spec.queue_limit_pkts + bdp_pkts)]
        for ns, dev in ((ends.ns_a, ends.dev_a), (ends.ns_b, ends.dev_b)):
            lab.must(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *args])

    def sample(self, lab: Lab) -> EmulatorSample | None:
        return None  # in-kernel: nothing of ours to run out of CPU


class NfqueueBackend:
    """tbf on each end's egress (rate and bottleneck queue), then one Python emulator per
    namespace delays and drops what arrives there (PREROUTING on the link's device).

    Why at the receiving end: a packet held in the sender's OUTPUT hook stays charged to its
    socket, so TCP Small Queues (about 1 ms of pacing rate per socket) stalls the sender and
    throughput collapses; veth orphans the skb on the way across, as netem does itself.
    """

    name = "userspace-nfqueue"

    def __init__(self, rule_tool: str | None = "iptables") -> None:
        self.rule_tool = rule_tool
        self._emulators: list[tuple[int, Path]] = []  # (pid, stats file)

    def create_link(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        _veth_pair(lab, ends)

    def apply(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        _tbf(lab, ends, spec)
        if not spec.impaired:
            return
        if spec.loss_pct:
            _offloads_off(lab, ends)
        for index, (site, ns, dev) in enumerate(((ends.site_a, ends.ns_a, ends.dev_a),
                                                  (ends.site_b, ends.ns_b, ends.dev_b))):
            stats = lab.workdir / f"nfqueue-{site}.json"
            name = f"nfqueue-emulator-{site}"
            proc = lab.spawn(
                site,
                [sys.executable, "-m", "benchmarks._nfqueue", "--queue", "0",
                 "--delay-ms", str(spec.delay_ms), "--jitter-ms", str(spec.jitter_ms),
                 "--loss-pct", str(spec.loss_pct), "--seed", str(lab.seed + index),
                 "--stats", str(stats)],
                name=name,
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            if proc.stdout.readline().decode().strip() != "ready":
                raise LabError(f"NFQUEUE emulator did not start: {lab.log_tail(name)}")
            self._emulators.append((proc.pid, stats))
            if self.rule_tool == "nft":
                lab.must(["ip", "netns", "exec", ns, "nft",
                          "add table inet nbemu; add chain inet nbemu in "
                          "{ type filter hook prerouting priority 0; }; "
                          f"add rule inet nbemu in iifname \"{dev}\" queue num 0"])
            else:
                lab.must(["ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A",
                          "PREROUTING", "-i", dev, "-j", "NFQUEUE", "--queue-num", "0"])

    def sample(self, lab: Lab) -> EmulatorSample | None:
        if not self._emulators:
            return None
        return _combine([_sample_stats(pid, path) for pid, path in self._emulators])


class TunBackend:
    """The fallback where no NFQUEUE rule can be installed: the link is a TUN pair owned by the
    benchmarks._tun process (in the host namespace), which delays, drops and forwards every
    packet; tbf on each TUN device caps the rate. Packets cross at MTU size (no GSO), so this
    carries less than the NFQUEUE emulator before it runs out of CPU."""

    name = "userspace-tun"

    def __init__(self, rule_tool: str | None = None) -> None:
        del rule_tool
        self._emulator: tuple[int, Path] | None = None
        self._ends: LinkEnds | None = None

    def create_link(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        stats = lab.workdir / "tun-stats.json"
        proc = lab.spawn(
            None,
            [sys.executable, "-m", "benchmarks._tun", "--ns-a", ends.ns_a, "--ns-b", ends.ns_b,
             "--dev", ends.dev_a, "--delay-ms", str(spec.delay_ms), "--jitter-ms",
             str(spec.jitter_ms), "--loss-pct", str(spec.loss_pct), "--seed", str(lab.seed),
             "--stats", str(stats)],
            name="tun-emulator",
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().decode().strip() != "ready":
            raise LabError(f"TUN emulator did not start: {lab.log_tail('tun-emulator')}")
        self._emulator = (proc.pid, stats)
        self._ends = ends

    def apply(self, lab: Lab, ends: LinkEnds, spec: LinkSpec) -> None:
        _tbf(lab, ends, spec)

    def sample(self, lab: Lab) -> EmulatorSample | None:
        if self._emulator is None or self._ends is None:
            return None
        # The kernel drops at a TUN's transmit ring when the emulator reads too slowly.
        ring_drops = 0
        for ns in (self._ends.ns_a, self._ends.ns_b):
            info = json.loads(lab.must(["ip", "-n", ns, "-j", "-s", "link", "show", "dev",
                                        self._ends.dev_a]))
            ring_drops += int(info[0]["stats64"]["tx"]["dropped"])
        return _combine([_sample_stats(*self._emulator)], extra_dropped=ring_drops)


BACKENDS: dict[str, Callable[[str | None], ImpairmentBackend]] = {
    "netem": NetemBackend,
    "userspace-nfqueue": NfqueueBackend,
    "userspace-tun": TunBackend,
}
