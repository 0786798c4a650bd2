"""`netplan calibrate` and `analyze --measured` without daemons: measured values laid over a
topology (which values, per direction, what drifted, which decision changes), measured.yaml
errors naming the field, and `--prometheus` against a small real HTTP server on 127.0.0.1
that answers the Prometheus query API (`/api/v1/query`, instant vectors) from stored series."""

from __future__ import annotations

import json
import re
import statistics
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from click.testing import CliRunner

from netplan.calibrate import apply_measured, overlay_of
from netplan.cli import cli
from netplan.loader import parse_topology
from netplan.telemetry import LinkMeasurement
from tests.benchmarks.test_bench_calibrate import TOPOLOGY

NOW = 1_800_000_000.0


def _measured(**fields: object) -> LinkMeasurement:
    base: dict[str, object] = {"site": "A", "peer": "B", "samples": 30,
                               "best_goodput_bytes_per_s": 25e6, "rtt_ms": 31.0,
                               "loss_pct": 0.8, "control_samples": 10, "jitter_ms": 0.4,
                               "first_at": NOW - 60, "last_at": NOW - 30}
    return LinkMeasurement.model_validate(base | fields)


def test_measured_values_replace_the_declared_ones_per_direction() -> None:
    topology = parse_topology(TOPOLOGY)
    overlay = overlay_of([("d", _measured()), ("d", _measured(site="B", peer="A", samples=2)),
                          ("d", _measured(peer="C"))], topology)
    assert [(m.from_site, m.bandwidth_gbps) for m in overlay.measured_links] == [("A", 0.2)]
    assert any("B -> A (d): 2 samples" in s for s in overlay.skipped)
    assert any("A -> C (d): no link" in s for s in overlay.skipped)
    calibrated, applied = apply_measured(topology, overlay)
    [link] = calibrated.links
    # Only A -> B was measured: B -> A keeps its declared 10 Gbit/s and no loss.
    assert link.bandwidth_from("A") == pytest.approx(0.2)
    assert link.bandwidth_from("B") == 10
    assert link.loss_from("A") == pytest.approx(0.8)
    assert link.loss_from("B") == 0
    assert link.rtt_ms == 31
    assert link.jitter_ms == pytest.approx(0.4)
    drifts = {(a.field, a.direction): round(a.drift_pct or 0) for a in applied}
    assert drifts[("bandwidth_gbps", "A")] == -98
    assert drifts[("rtt_ms", None)] == 520


def test_analyze_measured_changes_the_decision_and_says_which_values(tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    overlay = overlay_of([("d", _measured())], parse_topology(TOPOLOGY))
    measured = tmp_path / "measured.yaml"
    measured.write_text(yaml.safe_dump(overlay.to_yaml_data()))
    runner = CliRunner()
    declared = runner.invoke(cli, ["analyze", str(topology)])
    assert declared.exit_code == 0, declared.output
    assert "move_data" in declared.output
    got = runner.invoke(cli, ["analyze", str(topology), "--measured", str(measured)])
    assert got.exit_code == 0, got.output
    assert f"Measured link values used (from {measured})" in got.output
    assert "A-B (from A) bandwidth_gbps 0.2 (declared 10, -98 %; 30 samples)" in got.output
    assert "in_place" in got.output


def test_a_bad_measured_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    bad = tmp_path / "measured.yaml"
    bad.write_text("measured_links:\n  - {between: [A, B], from: A, rtt_ms: -3, samples: 9}\n")
    got = CliRunner().invoke(cli, ["analyze", str(topology), "--measured", str(bad)])
    assert got.exit_code == 2
    assert "measured_links[0].rtt_ms" in got.output
    unknown = tmp_path / "other.yaml"
    unknown.write_text("measured_links:\n  - {between: [A, Z], from: A, samples: 9}\n")
    got = CliRunner().invoke(cli, ["analyze", str(topology), "--measured", str(unknown)])
    assert got.exit_code == 2
    assert "no link between A and Z" in got.output


# ---- a Prometheus HTTP API over stored series ---------------------------------------------

Series = dict[str, list[tuple[dict[str, str], list[tuple[float, float]]]]]
LABELS = {"site": "A", "peer": "B", "instance": "a:8080"}


def _stored() -> Series:
    t = [NOW - 600 + 15 * i for i in range(40)]  # 10 min of 15 s scrapes
    old = NOW - 7200  # two hours back: outside a 30 min range
    return {
        "transferd_link_best_goodput_bytes_per_second": [
            (LABELS, [(old, 900e6), *[(x, 20e6 + 1e5 * i) for i, x in enumerate(t)]])],
        "transferd_link_rtt_seconds": [(LABELS, [(x, 0.030 + 0.001 * (i % 3))
                                                 for i, x in enumerate(t)])],
        "transferd_link_jitter_seconds": [(LABELS, [(x, 0.002) for x in t])],
        "transferd_link_samples": [(LABELS, [(x, float(min(i, 30))) for i, x in enumerate(t)])],
        "transferd_link_control_samples": [(LABELS, [(x, 12.0) for x in t])],
        "transferd_link_data_segments_out_total": [(LABELS, [(x, 1000.0 * i)
                                                             for i, x in enumerate(t)])],
        "transferd_link_retransmitted_segments_total": [(LABELS, [(x, 15.0 * i)
                                                                  for i, x in enumerate(t)])],
        "transferd_link_first_sample_timestamp_seconds": [(LABELS, [(x, NOW - 590) for x in t])],
        "transferd_link_last_sample_timestamp_seconds": [(LABELS, [(x, x) for x in t])],
    }


def _evaluate(series: Series, query: str, at: float) -> list[dict[str, object]] | None:
    """The handful of PromQL shapes calibrate sends; None for anything else."""
    def window(name: str, seconds: str) -> list[tuple[dict[str, str], list[float]]]:
        lo = at - float(seconds)
        return [(labels, [v for t, v in points if lo < t <= at])
                for labels, points in series.get(name, [])]

    def vector(rows: list[tuple[dict[str, str], float]]) -> list[dict[str, object]]:
        return [{"metric": labels, "value": [at, repr(v)]} for labels, v in rows]

    if m := re.fullmatch(r"(max|min)_over_time\((\w+)\[(\d+)s\]\)", query):
        fn = max if m[1] == "max" else min
        return vector([(lab, fn(vs)) for lab, vs in window(m[2], m[3]) if vs])
    if m := re.fullmatch(r"quantile_over_time\(0\.5, (\w+)\[(\d+)s\]\)", query):
        return vector([(lab, statistics.median(vs)) for lab, vs in window(m[1], m[2]) if vs])
    ratio = (r"sum by \(site, peer\) \(increase\((\w+)\[(\d+)s\]\)\) / "
             r"sum by \(site, peer\) \(increase\((\w+)\[(\d+)s\]\)\)")
    if m := re.fullmatch(ratio, query):
        top, bottom = window(m[1], m[2]), window(m[3], m[4])
        rows = []
        for (lab, a), (_lab, b) in zip(top, bottom, strict=True):
            keep = {"site": lab["site"], "peer": lab["peer"]}
            rows.append((keep, (a[-1] - a[0]) / (b[-1] - b[0])))
        return vector(rows)
    return None


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    series, queries = _stored(), []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parts = urlsplit(self.path)
            args = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path != "/api/v1/query":
                self.send_error(404)
                return
            queries.append(args["query"])
            result = _evaluate(series, args["query"], float(args["time"]))
            if result is None:
                body, status = {"status": "error", "errorType": "bad_data",
                                "error": f"unsupported query {args['query']}"}, 400
            else:
                body, status = {"status": "success",
                                "data": {"resultType": "vector", "result": result}}, 200
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", queries
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_calibrate_from_prometheus_reads_the_range_and_changes_the_decision(
    tmp_path: Path, prometheus: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, queries = prometheus
    monkeypatch.setattr("netplan.collect.time.time", lambda: NOW)
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    out = tmp_path / "measured.yaml"
    got = CliRunner().invoke(cli, ["calibrate", str(topology), "--prometheus", url,
                                   "--range", "30m", "-o", str(out)])
    assert got.exit_code == 0, got.output
    assert all("[1800s]" in q for q in queries)
    [link] = yaml.safe_load(out.read_text())["measured_links"]
    # The best goodput in the last 30 min (the 900 MB/s two hours ago is out of range).
    assert link["bandwidth_gbps"] == pytest.approx((20e6 + 39 * 1e5) * 8 / 1e9)
    assert link["rtt_ms"] == pytest.approx(31.0)
    assert link["jitter_ms"] == pytest.approx(2.0)
    assert link["loss_pct"] == pytest.approx(1.5)
    assert link["samples"] == 30
    assert link["source"] == url
    assert link["first_at"] == "2027-01-15T07:50:10+00:00"
    assert "tune: move_data at B -> in_place at A" in got.output


def test_calibrate_names_the_source_that_failed(
    tmp_path: Path, prometheus: tuple[str, list[str]]
) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    url, _ = prometheus
    got = CliRunner().invoke(cli, ["calibrate", str(topology), "--prometheus", url + "/nope",
                                   "-o", str(tmp_path / "m.yaml")])
    assert got.exit_code == 2
    assert f"{url}/nope: HTTP 404" in got.output
    got = CliRunner().invoke(cli, ["calibrate", str(topology), "--from", "http://127.0.0.1:9",
                                   "-o", str(tmp_path / "m.yaml")])
    assert got.exit_code == 2
    assert "http://127.0.0.1:9: cannot reach it" in got.output
    assert not (tmp_path / "m.yaml").exists()
