"""`python -m benchmarks.message_client` runs end to end on loopback (a few messages, both
paths) and writes one row per path and round; its numbers are read from the README's run."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import message_client


def test_message_client_compares_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert message_client.main(["--count", "5", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["transport"] for r in rows] == ["http", "socket"]
    assert all(r["cpu_ms_per_message"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
