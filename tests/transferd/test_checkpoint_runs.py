"""Checkpoint runs at a destination (LATEST, retention) and step readiness at a source."""

from __future__ import annotations

import os
from pathlib import Path

from transferd.site.checkpoints import ready_steps, step_order, update_run
from transferd.site.storage import LocalStorage


def test_steps_sort_naturally() -> None:
    assert sorted(["step-10", "step-9", "step-100", "step-09a"], key=step_order) == [
        "step-9",
        "step-09a",
        "step-10",
        "step-100",
    ]


def test_latest_points_at_newest_step_and_retention_drops_the_oldest(tmp_path: Path) -> None:
    for step in ("s1", "s2", "s3", "s10"):
        (tmp_path / "checkpoints" / "r" / step).mkdir(parents=True)
    removed: list[str] = []
    newest = update_run(LocalStorage(tmp_path), "checkpoints/r", keep=2, on_removed=removed.append)
    assert newest == "s10"
    assert (tmp_path / "checkpoints" / "r" / "LATEST").read_text() == "s10\n"
    assert sorted(os.listdir(tmp_path / "checkpoints" / "r")) == ["LATEST", "s10", "s3"]
    assert removed == ["checkpoints/r/s1", "checkpoints/r/s2"]


def test_a_step_is_ready_with_its_marker_or_after_the_quiet_period(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints" / "r"
    (run / "s1").mkdir(parents=True)
    (run / "s1" / "w.bin").write_bytes(b"x")
    (run / "s2").mkdir()
    (run / "s2" / "w.bin").write_bytes(b"y")
    (run / "s2" / "COMMITTED").write_bytes(b"")
    storage = LocalStorage(tmp_path)
    written = max(os.stat(run / s / "w.bin").st_mtime for s in ("s1", "s2"))
    assert ready_steps(storage, "COMMITTED", quiet_period_s=30, now=written + 1) == [
        "checkpoints/r/s2"
    ]
    assert ready_steps(storage, "COMMITTED", quiet_period_s=30, now=written + 31) == [
        "checkpoints/r/s1",
        "checkpoints/r/s2",
    ]
