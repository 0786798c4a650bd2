"""`python -m benchmarks report --html`: the committed results as one page. Its numbers are the
results files' medians, both congestion controls stand side by side, transferd's multiples are
its goodput over each peer's, message CDFs carry every sample against the echo floor, the stream
controller's decisions come from kept daemon logs, and the page draws in headless Chromium."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchmarks.__main__ import cli
from benchmarks.html_report import benchmarks_page, load_stream_logs, multiples
from benchmarks.report import load_results, medians
from tests.browser import Chromium
from tests.netplan.test_html import element_ids, islands

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    found = load_results(RESULTS)
    assert {d["congestion_control"] for d in found} >= {"bbr", "cubic"}
    return found


def _log_line(ts: float, event: str, **fields: Any) -> str:
    return json.dumps({"ts": ts, "level": "info", "logger": "transferd.streams",
                       "event": event, **fields})


@pytest.fixture
def kept_logs(tmp_path: Path) -> Path:
    """Logs as NB_KEEP_LOGS leaves them: <dir>/<run id>/transferd-<SITE>.log, JSON lines (the
    lines the daemon writes, and one a crashing process left half-written)."""
    run = tmp_path / "logs" / "ab12cd"
    run.mkdir(parents=True)
    change = {"peer": "CORE", "class": "checkpoint"}
    (run / "transferd-EDGE.log").write_text("\n".join([
        _log_line(100.0, "daemon.listening", site="EDGE"),
        _log_line(104.5, "streams.change", **change, **{"from": 2, "to": 4},
                  goodput_mbps=44.8, reason="probing: 45 Mbit/s at 2 streams, no errors"),
        _log_line(107.5, "streams.change", **change, **{"from": 4, "to": 2},
                  goodput_mbps=29.8, reason="no gain: 30 Mbit/s at 4 streams vs 45 at 2"),
        '{"ts": 108.0, "event": "streams.ch',
    ]) + "\n")
    (run / "transferd-CORE.log").write_text(_log_line(100.2, "daemon.listening") + "\n")
    return tmp_path / "logs"


def test_goodput_bars_are_each_files_medians_side_by_side(docs: list[dict[str, Any]]) -> None:
    figs = islands(benchmarks_page(docs))
    for doc in docs:
        i = sorted({d["scenario"] for d in docs}).index(doc["scenario"])
        bars = next(t for t in figs[f"goodput-{i}"]["data"]
                    if t.get("meta") == "goodput" and t["name"] == doc["congestion_control"])
        want = {r["tool"] + (f" ({r['data']})" if r["data"] else ""): r["goodput_mbit"]
                for r in medians(doc) if r["goodput_mbit"] is not None}
        assert dict(zip(bars["y"], bars["x"], strict=True)) == want
        if doc["link"]["rate_mbit"]:
            ceiling = next(t for t in figs[f"goodput-{i}"]["data"]
                           if t.get("meta") == "ceiling" and t["name"].startswith("link rate"))
            assert ceiling["x"] == [doc["link"]["rate_mbit"]] * 2


def test_multiples_are_transferds_goodput_over_each_peers(docs: list[dict[str, Any]]) -> None:
    doc = next(d for d in docs if d["scenario"] == "cross-region-40ms"
               and d["congestion_control"] == "cubic")
    rows = {r["tool"]: r["goodput_mbit"] for r in medians(doc)}
    found = {m["peer"]: m["x"] for m in multiples(doc)}
    assert found["rclone"] == pytest.approx(rows["transferd"] / rows["rclone"])
    assert found["iperf3-1stream"] == pytest.approx(rows["transferd"] / rows["iperf3-1stream"])
    assert "transferd-1stream" not in found  # ours is not its own peer


def test_message_cdfs_pool_every_sample_against_the_echo_floor(
        docs: list[dict[str, Any]]) -> None:
    figs = islands(benchmarks_page(docs))
    i = sorted({d["scenario"] for d in docs}).index("interactive-during-bulk")
    traces = figs[f"latency-{i}"]["data"]
    for doc in (d for d in docs if d["scenario"] == "interactive-during-bulk"):
        cc = doc["congestion_control"]
        pooled = sorted(x for r in doc["runs"] if r["ok"] and r["tool"] == "transferd"
                        for x in r["latencies_ms"])
        cdf = next(t for t in traces if t["name"].startswith(f"transferd messages, {cc} "))
        assert cdf["x"] == pooled
        assert cdf["y"][-1] == 1.0
        echo = next(t for t in traces if t.get("meta") == "echo-load" and cc in t["name"])
        assert echo["x"][0] == pytest.approx(statistics.median(
            r["messages"]["echo_p99_ms"] for r in doc["runs"] if r["ok"]))
        idle = next(t for t in traces if t.get("meta") == "echo" and cc in t["name"])
        assert idle["x"] == sorted(doc["rtt_samples_ms"])


def test_stream_decisions_come_from_the_kept_daemon_logs(kept_logs: Path,
                                                         docs: list[dict[str, Any]]) -> None:
    changes = load_stream_logs(kept_logs)
    assert [(c.site, c.peer, c.from_streams, c.to_streams, c.at_s) for c in changes] == [
        ("EDGE", "CORE", 2, 4, 4.5), ("EDGE", "CORE", 4, 2, 7.5)]
    page = benchmarks_page(docs, changes)
    ids = element_ids(page)
    assert len(ids) == len(set(ids))
    (line,) = islands(page)["stream-decisions"]["data"]
    assert line["x"] == [0.0, 4.5, 7.5]
    assert line["y"] == [2, 4, 2]
    assert "no gain" in line["hovertext"][2]
    assert "stream-decisions" not in islands(benchmarks_page(docs))  # without logs, a note instead


def test_report_html_writes_the_page_beside_the_results(
        kept_logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (The PNGs that `report` redraws have their own tests: not again here, they take seconds.)
    monkeypatch.setattr("benchmarks.__main__.plot_all", lambda output: [])
    results = tmp_path / "results"
    results.mkdir()
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, results)
    got = CliRunner().invoke(cli, ["report", "--output", str(results), "--html",
                                   "--logs", str(kept_logs)])
    assert got.exit_code == 0, got.output
    page = (results / "report.html").read_text()
    assert "wrote " + str(results / "report.html") in got.stderr
    assert "2 stream decisions" in got.stderr
    for doc in load_results(results):
        assert f'<tr data-scenario="{doc["scenario"]}" data-cc="{doc["congestion_control"]}">' \
            in page
    out = tmp_path / "elsewhere.html"
    got = CliRunner().invoke(cli, ["report", "--output", str(results), "--html", str(out)])
    assert got.exit_code == 0, got.output
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_the_benchmarks_page_draws_in_chromium(chromium: Chromium, artifacts: Path,
                                               tmp_path: Path, kept_logs: Path,
                                               docs: list[dict[str, Any]]) -> None:
    out = tmp_path / "benchmarks.html"
    out.write_text(benchmarks_page(docs, load_stream_logs(kept_logs)))
    page = chromium.open(out)
    try:
        assert page.wait_for_charts() == len(islands(out.read_text()))
        assert page.errors == []
        text = page.evaluate("document.body.innerText")
        for doc in docs:
            assert doc["scenario"] in text
        page.screenshot(artifacts / "benchmarks.png")
    finally:
        page.close()
