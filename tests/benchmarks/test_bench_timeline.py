"""The run timeline (`python -m benchmarks.timeline`) and `benchmarks merge`: what a kept run's
files say, read back the way the README's analysis reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from benchmarks.__main__ import cli
from benchmarks.timeline import parse_ss, render

# Two snapshots of `ss -tinmH state established` as the sampler writes them: a data channel
# that carries a job and the idle control connection beside it.
_SS = """# t0_wall 1000.000
@ 0.100
0      0      198.18.0.1:43372 198.18.0.2:38159
\t skmem:(r0,rb131072,t0,tb131072) bbr rtt:40.3/20.1 mss:1448 cwnd:12 bytes_sent:25 \
pacing_rate 8202728bps delivery_rate 287920bps app_limited busy:80ms
0      0      198.18.0.1:50000 198.18.0.2:7702
\t skmem:(r0) bbr cwnd:10 bytes_sent:900 pacing_rate 1000bps
@ 0.200
0      194032 198.18.0.1:43372 198.18.0.2:38159
\t skmem:(r0,tb248832) bbr rtt:40.2/20.1 cwnd:3700 bytes_sent:16777216 pacing_rate 500000000bps \
delivery_rate 480000000bps busy:172ms rwnd_limited:68ms(7.9%) retrans:0/61 notsent:156384
0      0      198.18.0.1:50000 198.18.0.2:7702
\t skmem:(r0) bbr cwnd:10 bytes_sent:900 pacing_rate 1000bps
"""
_TX = "0.100 0\n0.200 12500000\n"
_LOG = "\n".join(json.dumps(r) for r in (
    {"ts": 999.0, "event": "job.started"},  # an earlier job: only the last one is shown
    {"ts": 1000.05, "event": "job.started", "job": "j"},
    {"ts": 1000.15, "event": "chunk.receipt", "chunk": "ab", "seconds": 0.1},
    {"ts": 1000.25, "event": "job.committed", "job": "j"},
))


def test_the_timeline_shows_each_data_channel_and_the_jobs_events(tmp_path: Path) -> None:
    t0_wall, samples = parse_ss(_SS)
    assert t0_wall == 1000.0
    busy = [s for s in samples if s.t == 0.2 and s.conn.endswith(":38159")][0]
    assert (busy.cwnd, busy.retrans, busy.rwnd_limited_ms, busy.notsent_bytes) == (
        3700, 61, 68, 156384)
    assert busy.pacing_mbit == 500
    assert not busy.app_limited
    (tmp_path / "transferd-ss.log").write_text(_SS)
    (tmp_path / "transferd-tx.log").write_text(_TX)
    (tmp_path / "transferd-A.log").write_text(_LOG)
    out = render(tmp_path).splitlines()
    assert out[0].startswith("1 data channel(s)")  # the control connection carried < a chunk
    rows = {line.split()[0]: line for line in out[1:]}
    assert "job.started" in rows["0.000"]
    assert "chunk.receipt" in rows["0.100"]
    assert "1000 Mbit/s" in rows["0.150"]
    assert " 3700 " in rows["0.150"]
    assert "job.committed" in rows["0.200"]


def _part(tool: str, goodput: float, **lab: Any) -> dict[str, Any]:
    return {"scenario": "lossy-0.5pct", "congestion_control": "cubic",
            "backend": "userspace-nfqueue", "quick": False, "kernel": "6.x", "cpus": 2,
            "link": {"rate_mbit": 1000, "delay_ms": 20, "jitter_ms": 0, "loss_pct": 0.5},
            "measured_rtt_ms": 40.7, "repeat": 1, "command": f"run --tools {tool}",
            "date_utc": "2026-11-30T15:00:00Z", "git_commit": "abc", "error": None,
            "runs": [{"tool": tool, "ok": True, "goodput_mbit": goodput, "seconds": 1.0,
                      "data": "incompressible"}], **lab}


def test_merge_joins_the_runs_of_one_lab_and_refuses_another(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_part("transferd", 700)))
    b.write_text(json.dumps(_part("rsync", 5)))
    c.write_text(json.dumps(_part("rsync", 5, congestion_control="bbr")))
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["merge", str(a), str(b), "--output", str(out)])
    assert done.exit_code == 0, done.output
    merged = json.loads((out / "lossy-0.5pct.cubic.json").read_text())
    assert [r["tool"] for r in merged["runs"]] == ["transferd", "rsync"]
    assert merged["command"] == "run --tools transferd && run --tools rsync"
    assert len(merged["parts"]) == 2
    refused = CliRunner().invoke(cli, ["merge", str(a), str(c), "--output", str(out)])
    assert refused.exit_code != 0
    assert "congestion_control" in refused.output
