"""The lab: sites as network namespaces joined by a veth pair with 198.18.0.0/15 addresses (RFC
2544's benchmarking range), TCP tuned and pinned per namespace, the link impaired by a backend,
processes started inside sites; and a teardown that removes all of it (namespaces, veths, qdiscs,
rules, processes), also on Ctrl-C and on failure. Names carry a per-run prefix so parallel runs
never collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.backends import BACKENDS, BackendChoice, EmulatorSample, ImpairmentBackend
from benchmarks.errors import LabError
from benchmarks.linkspec import LinkSpec

__all__ = ["Lab", "LinkEnds", "MeshLink", "NS_PREFIX", "allow_congestion_control",
           "leftover_namespaces", "python_env"]

NS_PREFIX = "nb-"  # every namespace the harness creates starts with this
# Autotuning ceiling for socket buffers: above 1 Gbit/s x 100 ms (12.5 MB) with room to spare.
TCP_MEM = "4096 131072 67108864"


REPO_ROOT = Path(__file__).resolve().parents[1]
ECHO_PORT = 7000  # inside the lab's own namespaces: no other process can hold it


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `python -m benchmarks...` / `-m transferd` children: the repo root on
    PYTHONPATH (harmless when the package is installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


ALLOWED_CC = "net.ipv4.tcp_allowed_congestion_control"
AVAILABLE_CC = "net.ipv4.tcp_available_congestion_control"


class _AllowedCongestionControl:
    """The host's `tcp_allowed_congestion_control`, widened for a run and restored after it.

    A child namespace may only make an algorithm its default when the host lists it as allowed
    (the kernel's TCP_CONG_NON_RESTRICTED flag); Debian's default list has no cubic although
    cubic is what Linux hosts run by default. The harness (root) adds the algorithm for the run
    and puts the old list back when the last lab of this process that needed it closes (a
    namespace keeps the default it was given; only new pins need the list)."""

    def __init__(self) -> None:
        self._users = 0
        self._saved: str | None = None

    def acquire(self, algorithm: str) -> bool:
        """Allow `algorithm`; False (and nothing changed) when the kernel does not have it or it
        is allowed already."""
        allowed = _sysctl(ALLOWED_CC).split()
        if algorithm in allowed or algorithm not in _sysctl(AVAILABLE_CC).split():
            return False
        if self._saved is None:
            self._saved = " ".join(allowed)
        widened = " ".join([*allowed, algorithm])
        done = subprocess.run(["sysctl", "-q", "-w", f"{ALLOWED_CC}={widened}"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LabError(f"cannot allow congestion control {algorithm!r} for namespaces "
                           f"({done.stderr.strip()}): the harness must run as root")
        self._users += 1
        return True

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._saved is not None:
            subprocess.run(["sysctl", "-q", "-w", f"{ALLOWED_CC}={self._saved}"],
                           capture_output=True, text=True, check=False)
            self._saved = None


def _sysctl(name: str) -> str:
    return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                          check=False).stdout.strip()


allow_congestion_control = _AllowedCongestionControl()


def leftover_namespaces(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines()
            if line.startswith(f"{NS_PREFIX}{run_id}-")]


@dataclass(frozen=True)
class LinkEnds:
    site_a: str
    site_b: str
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str


@dataclass(frozen=True)
class MeshLink:
    """One link of a lab with more than two sites (e.g. A-B, A-R, R-B for a relay)."""

    site_a: str
    site_b: str
    spec: LinkSpec


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Lab:
    """Build with `Lab(...).start()` inside `with`; everything goes away on exit."""

    sites: Sequence[str]
    link: LinkSpec | None  # None: all sites share one namespace's loopback
    choice: BackendChoice
    congestion_control: str = "cubic"
    seed: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nb-lab-")))
    ends: LinkEnds | None = None
    mesh_ends: list[LinkEnds] = field(default_factory=list)
    backend: ImpairmentBackend | None = None
    _procs: list[_Proc] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _allowed_cc: bool = False  # this lab widened the host's allowed list (restored at close)
    # Several sites joined by several links (each its own veth pair and /24 in 198.18.0.0/15,
    # the device named `to-<peer>`); `link` is then the first one's spec. The first link is
    # the one `ends`, `link_bytes` and `data_tx_bytes` measure.
    # (Last: callers pass the fields above by position.)
    mesh: Sequence[MeshLink] = ()

    # ---- names and addresses
    def ns(self, site: str) -> str:
        if self.link is None:
            return f"{NS_PREFIX}{self.run_id}-lo"
        return f"{NS_PREFIX}{self.run_id}-{site}"

    def addr(self, site: str) -> str:
        if self.ends is None:
            return "127.0.0.1"
        return self.ends.addr_a if site == self.ends.site_a else self.ends.addr_b

    def addr_on(self, site: str, peer: str) -> str:
        """`site`'s address on its link to `peer` (a mesh lab); the one link's otherwise."""
        for e in self.mesh_ends:
            if {e.site_a, e.site_b} == {site, peer}:
                return e.addr_a if site == e.site_a else e.addr_b
        if self.mesh_ends:
            raise LabError(f"no link between {site} and {peer}")
        return self.addr(site)

    def ends_between(self, site: str, peer: str) -> LinkEnds:
        for e in self.mesh_ends:
            if {e.site_a, e.site_b} == {site, peer}:
                return e
        raise LabError(f"no link between {site} and {peer}")

    # ---- commands
    def must(self, cmd: Sequence[str], timeout: float = 30) -> str:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise LabError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}",
                           command=cmd)
        return done.stdout

    def in_site(self, site: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(site), *cmd]

    def spawn(self, site: str | None, cmd: Sequence[str], *, name: str,
              stdout: int | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process inside a site (None: in the host namespace); stopped at
        teardown. `ip netns exec` execs in place, so the Popen pid is the process itself."""
        log = self.workdir / f"{name}.log"
        with log.open("ab") as log_file:
            popen = subprocess.Popen(
                self.in_site(site, cmd) if site is not None else list(cmd),
                stdout=stdout if stdout is not None else log_file,
                stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True,
                env=env if env is not None else python_env(), cwd=cwd,
            )
        self._procs.append(_Proc(name, popen, log))
        return popen

    def stop(self, popen: subprocess.Popen[bytes], timeout: float = 5) -> None:
        """SIGTERM the process group we started, then SIGKILL after `timeout`."""
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(5)
        if popen.stdout is not None:
            popen.stdout.close()
        self._procs = [p for p in self._procs if p.popen is not popen]

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.workdir / f"{name}.log"
        try:
            return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- build
    def start(self) -> Lab:
        if self.mesh:
            return self._start_mesh()
        if self.link is None:
            self._add_namespace(self.ns(self.sites[0]))
            return self
        if len(self.sites) != 2:
            raise LabError("an emulated link joins exactly two sites")
        site_a, site_b = self.sites
        for site in (site_a, site_b):
            self._add_namespace(self.ns(site))
        self.ends = LinkEnds(site_a, site_b, self.ns(site_a), self.ns(site_b), "wan0", "wan0",
                             "198.18.0.1", "198.18.0.2")
        e = self.ends
        self.backend = BACKENDS[self.choice.name](self.choice.rule_tool)
        self.backend.create_link(self, e, self.link)
        for ns, dev, addr in ((e.ns_a, e.dev_a, e.addr_a), (e.ns_b, e.dev_b, e.addr_b)):
            self.must(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            self.must(["ip", "-n", ns, "link", "set", dev, "up"])
        self.backend.apply(self, e, self.link)
        return self

    def _start_mesh(self) -> Lab:
        for site in self.sites:
            self._add_namespace(self.ns(site))
        self.backend = BACKENDS[self.choice.name](self.choice.rule_tool)
        if sum(1 for m in self.mesh if m.spec.impaired) > 1 and self.choice.name != "netem":
            # The userspace emulator runs one queue per namespace.
            raise LabError("a mesh lab emulates delay or loss on one link at most")
        for i, m in enumerate(self.mesh):
            if m.site_a not in self.sites or m.site_b not in self.sites:
                raise LabError(f"mesh link {m.site_a}-{m.site_b}: not a site of the lab")
            e = LinkEnds(m.site_a, m.site_b, self.ns(m.site_a), self.ns(m.site_b),
                         f"to-{m.site_b}"[:15], f"to-{m.site_a}"[:15],
                         f"198.18.{i + 1}.1", f"198.18.{i + 1}.2")
            self.mesh_ends.append(e)
            self.backend.create_link(self, e, m.spec)
            for ns, dev, addr in ((e.ns_a, e.dev_a, e.addr_a), (e.ns_b, e.dev_b, e.addr_b)):
                self.must(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
                self.must(["ip", "-n", ns, "link", "set", dev, "up"])
            self.backend.apply(self, e, m.spec)
        self.ends = self.mesh_ends[0]
        return self

    def _add_namespace(self, ns: str) -> None:
        self.must(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self.must(["ip", "-n", ns, "link", "set", "lo", "up"])
        if not self._allowed_cc:
            self._allowed_cc = allow_congestion_control.acquire(self.congestion_control)
        pinned = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
             f"net.ipv4.tcp_congestion_control={self.congestion_control}"],
            capture_output=True, text=True, check=False)
        if pinned.returncode != 0:
            allowed = _sysctl(ALLOWED_CC)
            raise LabError(
                f"cannot pin congestion control {self.congestion_control!r} in a namespace "
                f"({pinned.stderr.strip()}); the host allows only: {allowed}")
        self.must(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                   f"net.ipv4.tcp_rmem={TCP_MEM}", f"net.ipv4.tcp_wmem={TCP_MEM}",
                   "net.ipv4.tcp_no_metrics_save=1"])
        got = self.must(["ip", "netns", "exec", ns, "sysctl", "-n",
                         "net.ipv4.tcp_congestion_control"]).strip()
        if got != self.congestion_control:
            raise LabError(f"congestion control is {got!r} in {ns}, not "
                           f"{self.congestion_control!r}")

    # ---- measurements of the link itself
    def link_bytes(self) -> int:
        """Bytes the link (or the loopback) carried so far, both directions."""
        if self.ends is None:
            return self._dev_tx(self.ns(self.sites[0]), "lo")
        return self._dev_tx(self.ends.ns_a, self.ends.dev_a) + self._dev_tx(self.ends.ns_b,
                                                                            self.ends.dev_b)

    def data_tx_bytes(self) -> int | None:
        """Bytes the first site's end of the link sent (the data direction: every tool moves
        data from the first site to the second); None for a loopback lab."""
        if self.ends is None:
            return None
        return self._dev_tx(self.ends.ns_a, self.ends.dev_a)

    def _dev_tx(self, ns: str, dev: str) -> int:
        info: list[dict[str, Any]] = json.loads(
            self.must(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev]))
        return int(info[0]["stats64"]["tx"]["bytes"])

    def tcp_retrans_segs(self, site: str) -> int:
        text = self.must(self.in_site(site, ["cat", "/proc/net/snmp"]))
        rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
        return int(rows[1][rows[0].index("RetransSegs")])

    def echo_rtts_ms(self, count: int = 20) -> list[float]:
        """Round-trip times of `count` small TCP echoes from the first site to the second."""
        if self.ends is None:
            raise LabError("a loopback lab has no link to measure")
        server = self.start_echo_server(self.ends.site_b, "echo-server")
        try:
            cmd = self.in_site(self.ends.site_a, self.echo_client_args(self.ends.site_b, count))
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                                  env=python_env())
            if done.returncode != 0:
                raise LabError(f"TCP echo failed: {done.stderr.strip()[-500:]}", command=cmd)
            rtts: list[float] = json.loads(done.stdout)
            return rtts
        finally:
            self.stop(server)

    def start_echo_server(self, site: str, name: str) -> subprocess.Popen[bytes]:
        """A `benchmarks._echo` server in `site` on ECHO_PORT, returned once it is listening."""
        server = self.spawn(site, [sys.executable, "-m", "benchmarks._echo", "serve", "--host",
                                   self.addr(site), "--port", str(ECHO_PORT)],
                            name=name, stdout=subprocess.PIPE)
        assert server.stdout is not None
        if server.stdout.readline().decode().strip() != "ready":
            self.stop(server)
            raise LabError(f"TCP echo server did not start: {self.log_tail(name)}")
        return server

    def echo_client_args(self, server_site: str, count: int, *extra: str) -> list[str]:
        """The `benchmarks._echo` client command (to run inside a site) for `count` round trips
        to the echo server in `server_site`."""
        return [sys.executable, "-m", "benchmarks._echo", "client", "--host",
                self.addr(server_site), "--port", str(ECHO_PORT), "--count", str(count), *extra]

    def emulator_sample(self) -> EmulatorSample | None:
        return self.backend.sample(self) if self.backend else None

    def set_link_up(self, up: bool) -> None:
        if self.ends is None:
            raise LabError("a loopback lab has no link to flap")
        state = "up" if up else "down"
        for ns, dev in ((self.ends.ns_a, self.ends.dev_a), (self.ends.ns_b, self.ends.dev_b)):
            self.must(["ip", "-n", ns, "link", "set", dev, state])

    # ---- teardown
    def close(self) -> list[str]:
        """Remove everything; returns what could not be removed (empty when clean)."""
        problems: list[str] = []
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc.popen)
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"process {proc.name} ({proc.popen.pid}): {exc}")
        for ns in reversed(self._namespaces):
            # Anything still inside (a tool's forked child) is ours: kill it by pid.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            # Deleting the namespace removes its veth end (and so the pair), qdiscs and rules.
            for _ in range(50):
                done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                      check=False)
                if done.returncode == 0 or ns not in leftover_namespaces(self.run_id):
                    break
                time.sleep(0.1)
            else:
                problems.append(f"namespace {ns}: {done.stderr.strip()}")
        self._namespaces.clear()
        if self._allowed_cc:
            allow_congestion_control.release()
            self._allowed_cc = False
        keep = os.environ.get("NB_KEEP_LOGS")
        if keep:  # the daemons' and tools' logs, for a look after the run
            dest = Path(keep) / self.run_id
            dest.mkdir(parents=True, exist_ok=True)
            for log in self.workdir.glob("*.[loe][ourr][gtr]"):
                shutil.copy2(log, dest / log.name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def __enter__(self) -> Lab:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        problems = self.close()
        if problems and exc[0] is None:
            raise LabError("teardown left things behind: " + "; ".join(problems))
