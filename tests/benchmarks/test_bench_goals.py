"""The issue's goals read from results files: ratios against the best peer of the same run,
link shares, CPU per GiB, and a goal without results says so rather than passing."""

from __future__ import annotations

from typing import Any

from benchmarks.goals import evaluate, goals_markdown, summary_markdown
from benchmarks.measure import ToolRun
from benchmarks.scenario import parse_scenario


def _doc(scenario: str, cc: str, runs: list[ToolRun]) -> dict[str, Any]:
    return {"scenario": scenario, "congestion_control": cc, "backend": "userspace-nfqueue",
            "kernel": "6.x", "link": {"rate_mbit": 1000, "delay_ms": 20, "jitter_ms": 0,
                                      "loss_pct": 0.5},
            "measured_rtt_ms": 40.5, "runs": [r.to_json() for r in runs]}


def _run(tool: str, mbit: float, data: str | None = "incompressible", **kw: Any) -> ToolRun:
    return ToolRun(tool=tool, ok=True, goodput_mbit=mbit, link_pct=mbit / 10, seconds=10,
                   bytes_logical=2**30, data=data, **kw)


def test_lossy_cubic_goals_compare_with_the_best_peer_and_the_link() -> None:
    doc = _doc("lossy-0.5pct", "cubic", [
        _run("transferd", 720), _run("rsync", 5), _run("rsync-zstd", 6), _run("rclone", 80),
        _run("iperf3-1stream", 8, data=None)])
    goals = {g.goal: g for g in evaluate([doc])}
    best = goals["lossy-0.5pct, cubic: transferd >= 1.0x best of rsync, rsync-zstd, rclone"]
    assert best.met is True
    assert "rclone 80" in best.measured
    assert "9.00x" in best.measured
    assert goals["lossy-0.5pct, cubic: transferd >= 70 % of the link"].met is True
    assert goals["lossy-0.5pct, cubic: transferd >= 10x rsync"].met is True
    assert goals["lossy-0.5pct, cubic: transferd >= 10x rclone"].met is False  # 9x
    assert not any("1.2x" in g for g in goals)  # that one is bbr's


def test_a_quick_run_takes_the_link_share_from_a_full_size_run_and_ratios_from_its_own() -> None:
    quick = {**_doc("lossy-2pct", "cubic", [
        _run("transferd", 80), _run("rclone", 5), _run("iperf3-1stream", 3, data=None)]),
        "quick": True}
    full = {**_doc("lossy-2pct", "cubic", [_run("transferd", 430), _run("transferd", 410),
                                           _run("transferd", 450)]), "git_commit": "abc12345"}
    alone = {g.goal: g for g in evaluate([quick])}
    assert alone["lossy-2pct, cubic (quick): transferd >= 40 % of the link"].met is False
    goals = {g.goal: g for g in evaluate([quick], [full])}
    share = goals["lossy-2pct, cubic: transferd >= 40 % of the link"]
    assert share.met is True
    assert share.measured == "43 % (full size, abc12345, 3 runs)"
    best = goals["lossy-2pct, cubic (quick): transferd >= 1.0x best of rsync, rsync-zstd, rclone"]
    assert "80 vs rclone 5" in best.measured  # the peers' ratio stays within the quick run
    # A full-size file never overrides a full-size run's own share.
    own = {**quick, "quick": False}
    kept = {g.goal: g for g in evaluate([own], [full])}
    assert kept["lossy-2pct, cubic: transferd >= 40 % of the link"].measured == "8 %"


def test_missing_results_are_no_data_and_loopback_cpu_is_per_gib() -> None:
    doc = _doc("loopback", "cubic", [
        _run("transferd", 8000, cpu_s=1.0), _run("rclone", 7000, cpu_s=2.0),
        ToolRun(tool="disk-direct", ok=False, data="incompressible", error="dd failed")])
    goals = {g.goal: g for g in evaluate([doc])}
    assert goals["loopback, cubic: transferd >= 1.15x rclone"].met is False  # 1.14x
    assert goals["loopback, cubic: transferd >= 0.65x the disk (dd oflag=direct)"].met is None
    cpu = goals["loopback, cubic: transferd CPU-s/GiB <= 0.7x rclone's"]
    assert cpu.met is True
    assert "0.50x" in cpu.measured
    table = goals_markdown(list(goals.values()))
    assert "| no data |" in table
    assert "| **no** |" in table


def test_summary_shows_each_congestion_control_of_a_scenario() -> None:
    docs = [_doc("cross-region-40ms", cc, [_run("transferd", t), _run("rsync", 870),
                                           _run("iperf3-1stream", 920, data=None)])
            for cc, t in (("cubic", 900), ("bbr", 940))]
    text = summary_markdown(docs)
    assert "| cross-region-40ms | bbr | 940 | 870 (rsync) | 920 | 1.08x | 1.02x |" in text
    assert "| cross-region-40ms | cubic | 900 | 870 (rsync) | 920 | 1.03x | 0.98x |" in text


def test_link_scenarios_run_under_cubic_and_bbr_and_loopback_under_cubic() -> None:
    link = parse_scenario("scenario: s\nsites: [A, B]\nlinks:\n  - {between: [A, B], "
                          "delay_ms: 5}\nwork:\n  - {size_mib: 1}\ntools: [rsync]\n")
    assert link.ccs == ("cubic", "bbr")
    loop = parse_scenario("scenario: s\nloopback: true\nsites: [A, B]\nwork:\n  - {size_mib: 1}"
                          "\ntools: [rsync]\n")
    assert loop.ccs == ("cubic",)
    pinned = parse_scenario("scenario: s\nloopback: true\nsites: [A, B]\nwork:\n  - "
                            "{size_mib: 1}\ntools: [rsync]\ncongestion_controls: [bbr]\n")
    assert pinned.ccs == ("bbr",)
