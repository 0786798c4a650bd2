"""Results out: medians over repetitions, failures carried with their reason, side-by-side
ratios, the Markdown table, and plots written as PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.measure import ToolRun
from benchmarks.report import markdown, medians, plot_all, ratios, write_results


def _doc(runs: list[ToolRun]) -> dict[str, Any]:
    return {
        "scenario": "unit", "backend": "userspace-nfqueue", "kernel": "6.x",
        "congestion_control": "bbr",
        "link": {"rate_mbit": 1000, "delay_ms": 20, "jitter_ms": 0, "loss_pct": 0},
        "measured_rtt_ms": 40.8, "rtt_samples_ms": [40.5, 40.8, 41.0], "quick": True,
        "repeat": 3, "command": "python -m benchmarks run unit",
        "runs": [r.to_json() for r in runs],
    }


def _run(tool: str, goodput: float, data: str | None = "incompressible", **kw: Any) -> ToolRun:
    return ToolRun(tool=tool, ok=True, goodput_mbit=goodput, link_pct=goodput / 10, seconds=8.0,
                   bytes_on_wire=1100, bytes_logical=1000, cpu_s=2.0, data=data, **kw)


def test_medians_ratios_and_failures() -> None:
    doc = _doc([
        _run("transferd", 300), _run("transferd", 900), _run("transferd", 600),
        _run("rsync", 200), _run("iperf3-1stream", 900, data=None),
        ToolRun(tool="transferd-1stream", ok=False, data="incompressible",
                error="not yet supported by transferd: no streams key"),
    ])
    rows = {r["tool"]: r for r in medians(doc)}
    assert rows["transferd"]["goodput_mbit"] == 600
    assert rows["transferd"]["n_ok"] == 3
    assert rows["transferd-1stream"]["goodput_mbit"] is None
    assert rows["transferd-1stream"]["error"].startswith("not yet supported by transferd")
    (line,) = ratios(doc)
    assert "3.00x rsync" in line
    assert "0.67x iperf3-1stream" in line
    assert "wire/logical 1.10" in line
    table = markdown(doc)
    assert "| transferd-1stream | incompressible | 0/1 | - |" in table
    assert "`python -m benchmarks run unit`" in table


def test_results_file_is_named_after_the_scenario_and_plots_are_png(tmp_path: Path) -> None:
    doc = _doc([_run("transferd", 500), _run("iperf3-1stream", 900, data=None,
                                              p50_ms=41.0, p99_ms=45.0)])
    path = write_results(doc, tmp_path)
    assert path == tmp_path / "unit.bbr.json"  # one file per scenario and congestion control
    loaded = json.loads(path.read_text())
    assert {"scenario", "backend", "kernel", "congestion_control", "link", "measured_rtt_ms",
            "runs"} <= loaded.keys()
    written = plot_all(tmp_path)
    assert {p.name for p in written} == {"goodput.png", "latency-cdf.png"}
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sustained_rate_skips_the_ramp_and_the_tail() -> None:
    from benchmarks.measure import sustained_rate

    # 1 s slow start at 10 MB/s, then 100 MB/s for 8 s, then a 1 s tail at 10 MB/s.
    samples, t, total = [(0.0, 0)], 0.0, 0
    for rate, seconds in ((10e6, 1.0), (100e6, 8.0), (10e6, 1.0)):
        for _ in range(int(seconds / 0.2)):
            t, total = t + 0.2, total + int(rate * 0.2)
            samples.append((t, total))
    wall = total / t
    sustained = sustained_rate(samples)
    assert sustained is not None
    assert abs(sustained - 100e6) / 100e6 < 0.01  # the bulk of the bytes moved at the link rate
    assert wall < 0.85 * sustained  # the wall-clock average counts the ramp and the tail
    assert sustained_rate(samples[:2]) is None
    assert sustained_rate([(0.0, 5), (1.0, 5), (2.0, 5)]) is None  # nothing moved


def test_without_matplotlib_the_tables_print_and_one_line_says_how_to_get_plots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from benchmarks.__main__ import cli

    write_results(_doc([_run("transferd", 500), _run("rsync", 400)]), tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_all(tmp_path) is None
    got = CliRunner().invoke(cli, ["report", "--output", str(tmp_path)])
    assert got.exit_code == 0, got.output
    assert "transferd" in got.output
    assert "rsync" in got.output
    assert "pip install -e '.[bench]'" in got.output
    assert "Traceback" not in got.output
    assert not (tmp_path / "goodput.png").exists()
