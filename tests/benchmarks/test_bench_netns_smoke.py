"""The CI-sized smoke test: two namespaces, 20 ms one-way delay with whatever backend this kernel
offers, a TCP echo sees 40 ms +- 5 ms, iperf3 runs through the harness into the results format,
and teardown leaves nothing behind (also when building the lab fails half-way)."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.backends import BACKENDS, BackendChoice
from benchmarks.errors import LabError
from benchmarks.lab import Lab, leftover_namespaces
from benchmarks.linkspec import parse_link_spec
from benchmarks.runner import check_rtt
from benchmarks.scenario import parse_scenario
from benchmarks.tools import RunContext, run_tool

pytestmark: list[pytest.MarkDecorator] = [pytest.mark.netns]

RESULT_KEYS = {"tool", "ok", "goodput_mbit", "link_pct", "seconds", "bytes_on_wire", "cpu_s",
               "p50_ms", "p99_ms", "error"}


@pytest.fixture(scope="module")
def lab_20ms(lab_backend: BackendChoice) -> Iterator[Lab]:
    lab = Lab(["A", "B"], parse_link_spec("rate=200mbit delay=20ms"), lab_backend)
    with lab:
        yield lab
    assert leftover_namespaces(lab.run_id) == []


def test_real_probe_on_this_machine_names_a_registered_backend(
    lab_backend: BackendChoice,
) -> None:
    assert lab_backend.name in BACKENDS
    assert lab_backend.reasons
    if lab_backend.name != "netem":
        assert any(r.startswith("sch_netem:") for r in lab_backend.reasons)  # says why not netem


def _pids_alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_tcp_echo_sees_40ms_and_teardown_removes_everything(lab_backend: BackendChoice) -> None:
    lab = Lab(["A", "B"], parse_link_spec("delay=20ms"), lab_backend)
    with lab:
        assert sorted(leftover_namespaces(lab.run_id)) == [lab.ns("A"), lab.ns("B")]
        rtts = lab.echo_rtts_ms(count=15)
        assert abs(statistics.median(rtts) - 40) <= 5, rtts
        assert check_rtt(rtts, 40) == statistics.median(rtts)
        started = [p.popen.pid for p in lab._procs]
        workdir = lab.workdir
    assert leftover_namespaces(lab.run_id) == []
    assert _pids_alive(started) == []
    assert not workdir.exists()


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")
def test_tun_fallback_also_gives_40ms_and_cleans_up() -> None:
    lab = Lab(["A", "B"], parse_link_spec("rate=100mbit delay=20ms"),
              BackendChoice("userspace-tun", ("forced by the test",)))
    with lab:
        rtts = lab.echo_rtts_ms(count=15)
        assert abs(statistics.median(rtts) - 40) <= 5, rtts
        sample = lab.emulator_sample()
        assert sample is not None
        assert sample.received >= 30  # every echo crossed the emulator both ways
        assert sample.self_dropped == 0
        started = [p.popen.pid for p in lab._procs]
    assert leftover_namespaces(lab.run_id) == []
    assert _pids_alive(started) == []


def test_a_lab_that_fails_half_way_leaves_nothing(lab_backend: BackendChoice) -> None:
    lab = Lab(["A", "B"], parse_link_spec("delay=5ms"), lab_backend,
              congestion_control="no-such-algorithm")
    with pytest.raises(LabError, match="cannot pin congestion control 'no-such-algorithm'"):
        with lab:
            pass
    assert leftover_namespaces(lab.run_id) == []


def test_parallel_labs_do_not_collide(lab_backend: BackendChoice) -> None:
    one = Lab(["A", "B"], parse_link_spec("delay=1ms"), lab_backend)
    two = Lab(["A", "B"], parse_link_spec("delay=1ms"), lab_backend)
    with one, two:
        assert one.ns("A") != two.ns("A")
        assert len(leftover_namespaces(one.run_id) + leftover_namespaces(two.run_id)) == 4
    assert leftover_namespaces(one.run_id) == leftover_namespaces(two.run_id) == []


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
def test_iperf3_through_the_harness_fills_the_results_format(lab_20ms: Lab, tmp_path: Path) -> None:
    scenario = parse_scenario(
        "scenario: smoke\nsites: [A, B]\nlinks:\n  - {between: [A, B], rate_mbit: 200, "
        "delay_ms: 20}\nwork:\n  - {size_mib: 1}\ntools: [iperf3-1stream]\n"
        "quick_iperf3_seconds: 2\n")
    data = tmp_path / "data.bin"
    data.write_bytes(b"\0" * 1024)
    ctx = RunContext(lab_20ms, scenario, True, scenario.work[0], data, "", tmp_path / "scratch")
    run = run_tool("iperf3-1stream", ctx).to_json()
    assert RESULT_KEYS <= run.keys()
    assert run["ok"], run["error"]
    assert 0 < run["goodput_mbit"] <= 200 * 1.05  # never above the tbf rate cap
    assert run["link_pct"] == pytest.approx(100 * run["goodput_mbit"] / 200)
    # The link carried at least what iperf3 says it received.
    assert run["bytes_on_wire"] >= run["goodput_mbit"] * 1e6 / 8 * run["seconds"] * 0.95
    assert run["cpu_s"] > 0


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed (the run "
                    "interrupted here is an iperf3 one)")
def test_ctrl_c_mid_run_tears_everything_down(tmp_path: Path) -> None:
    scenario = tmp_path / "interrupted.yaml"
    scenario.write_text(
        "scenario: interrupted\nsites: [A, B]\nlinks:\n  - {between: [A, B], rate_mbit: 100, "
        "delay_ms: 5}\nwork:\n  - {size_mib: 1, quick_size_mib: 1}\ntools: [iperf3-1stream]\n"
        "quick_iperf3_seconds: 60\ncongestion_controls: [cubic]\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # Ctrl-C as in a terminal: a shell's background job (a CI script's `cmd &`) starts with
    # SIGINT ignored, which the run would inherit and so never see the signal. Handled here
    # while it starts, SIGINT is back to its default in the run.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", "run", str(scenario), "--quick", "--output",
             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert proc.stdout is not None
        run_id = None
        for _ in range(200):  # bounded: the lab is up within a few lines
            line = proc.stdout.readline()
            if not line:
                break
            if "lab up: run " in line:
                run_id = line.split("lab up: run ")[1].split(",")[0]
            if run_id and "TCP echo RTT" in line:
                break
        assert run_id, "the run never reported its lab"
        namespaces = leftover_namespaces(run_id)
        assert len(namespaces) == 2
        time.sleep(1.0)  # iperf3 is now sending
        inside = [int(pid) for ns in namespaces for pid in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True,
            check=False).stdout.split()]
        assert inside, "iperf3 and the emulators should be running in the lab"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "interrupted: lab torn down" in out
        assert leftover_namespaces(run_id) == []
        assert _pids_alive(inside) == []
    finally:
        # Whatever failed above, the run (and its lab) must not outlive the test.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        elif proc.stdout is not None:
            proc.stdout.close()


def test_cubic_is_allowed_for_the_run_and_the_host_list_restored(
    lab_backend: BackendChoice,
) -> None:
    """The host allows only some algorithms to namespaces (here "reno bbr"): the lab adds cubic
    while it runs, a namespace then pins it, and teardown puts the host's list back."""
    allowed = "net.ipv4.tcp_allowed_congestion_control"
    available = subprocess.run(["sysctl", "-n", "net.ipv4.tcp_available_congestion_control"],
                               capture_output=True, text=True, check=True).stdout.split()
    if "cubic" not in available:
        pytest.skip("this kernel has no cubic")
    before = subprocess.run(["sysctl", "-n", allowed], capture_output=True, text=True,
                            check=True).stdout.strip()
    lab = Lab(["A", "B"], parse_link_spec("delay=1ms"), lab_backend, congestion_control="cubic")
    with lab:
        pinned = subprocess.run(["ip", "netns", "exec", lab.ns("A"), "sysctl", "-n",
                                 "net.ipv4.tcp_congestion_control"], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert pinned == "cubic"
    after = subprocess.run(["sysctl", "-n", allowed], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert after == before
