"""One scenario end to end: build the lab, check the achieved RTT with a TCP echo, run every tool
on the same data over the same link, and return the results document (results/<scenario>.json).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Any

from benchmarks.backends import BackendChoice
from benchmarks.datasets import dataset, file_blake3
from benchmarks.errors import LabError
from benchmarks.lab import REPO_ROOT, Lab
from benchmarks.measure import ToolRun
from benchmarks.scenario import Scenario
from benchmarks.tools import RunContext, run_tool

__all__ = ["check_rtt", "run_scenario", "rtt_tolerance_ms"]

ECHO_COUNT = 30


def rtt_tolerance_ms(expected_ms: float, jitter_ms: float) -> float:
    """How far the echo's median RTT may stray: 5 ms (the smoke test's bound) or 10 %, plus the
    jitter of both directions."""
    return max(5.0, 0.1 * expected_ms) + 2 * jitter_ms


def check_rtt(rtts_ms: list[float], expected_ms: float, jitter_ms: float = 0.0) -> float:
    median = statistics.median(rtts_ms)
    tolerance = rtt_tolerance_ms(expected_ms, jitter_ms)
    if abs(median - expected_ms) > tolerance:
        raise LabError(f"TCP echo RTT is {median:.1f} ms, expected {expected_ms:.1f} "
                       f"+- {tolerance:.1f} ms: the link is not what the scenario asks for")
    return median


def run_scenario(scenario: Scenario, choice: BackendChoice, *, quick: bool, repeat: int,
                 command: str, congestion_control: str, log: Any = print) -> dict[str, Any]:
    """One run of `scenario` with the namespaces' default congestion control set to
    `congestion_control` (the results document records it)."""
    if scenario.relayed:  # a third site between the ends: its own tools (`relay_3site`)
        from benchmarks.relay_3site import run_relay_scenario

        return run_relay_scenario(scenario, choice, quick=quick, repeat=repeat, command=command,
                                  congestion_control=congestion_control, log=log)
    link = scenario.link
    doc: dict[str, Any] = {
        "scenario": scenario.scenario,
        "description": scenario.description,
        "backend": "none (loopback)" if link is None else choice.name,
        "backend_probe": list(choice.reasons),
        "kernel": platform.release(),
        "congestion_control": congestion_control,
        "link": (link.summary() if link else
                 {"rate_mbit": None, "delay_ms": 0.0, "jitter_ms": 0.0, "loss_pct": 0.0}),
        "queue_limit_pkts": link.queue_limit_pkts if link else None,
        "measured_rtt_ms": None,
        "rtt_samples_ms": [],
        "command": command,
        "quick": quick,
        "repeat": repeat,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "cpus": os.cpu_count(),
        "runs": [],
        "error": None,
    }
    runs: list[ToolRun] = []
    tag = f"[{scenario.scenario}/{congestion_control}]"
    try:
        with Lab(scenario.sites, link, choice, congestion_control) as lab:
            namespaces = sorted({lab.ns(site) for site in scenario.sites})
            log(f"{tag} lab up: run {lab.run_id}, namespaces "
                + ", ".join(namespaces))
            if link is not None:
                rtts = lab.echo_rtts_ms(ECHO_COUNT)
                doc["rtt_samples_ms"] = [round(r, 3) for r in rtts]
                doc["measured_rtt_ms"] = round(check_rtt(rtts, link.rtt_ms, link.jitter_ms), 2)
                log(f"{tag} {link.describe()}; TCP echo RTT median "
                    f"{doc['measured_rtt_ms']} ms ({choice.name}, {congestion_control})")
            iperf_done = False
            for work in scenario.work:
                size_mib = work.quick_size_mib if quick else work.size_mib
                data_path = dataset(work.data, size_mib)
                data_hash = file_blake3(data_path)
                # Round-robin over the tools, one run each per round: on a shared, noisy host
                # a load that comes and goes then falls on every tool alike, not on one.
                for attempt in range(repeat):
                    for tool in scenario.tools:
                        if tool.startswith("iperf3") and iperf_done:
                            continue  # iperf3 sends no file: once per scenario is the ceiling
                        ctx = RunContext(lab, scenario, quick, work, data_path, data_hash,
                                         lab.workdir / "scratch")
                        ctx.scratch.mkdir(parents=True, exist_ok=True)
                        run = run_tool(tool, ctx)
                        runs.append(run)
                        log(f"{tag} {tool} {run.data or ''} #{attempt + 1}: "
                            + (f"{run.goodput_mbit:.0f} Mbit/s in {run.seconds:.1f} s"
                               if run.ok and run.goodput_mbit and run.seconds
                               else f"error: {run.error}"))
                iperf_done = True
    except LabError as exc:
        doc["error"] = str(exc)
        log(f"{tag} lab error: {exc}")
    doc["runs"] = [r.to_json() for r in runs]
    return doc


def _git_commit() -> str | None:
    """The checkout's commit (with `+dirty` for uncommitted changes to transferd or the harness,
    not to results or prose): which code ran."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no", "--", "transferd", "benchmarks",
                               # outputs and prose do not change what runs
                               ":(exclude)benchmarks/results", ":(exclude)*.md"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
