"""A folder or checkpoint step committed again over itself is never seen missing: a reader
polling the folder, or following LATEST to its step, always finds the old or the new copy
whole (the commit swaps them with one renameat2 exchange)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from tests.faults.conftest import Tally
from transferd.site import storage as storage_mod
from transferd.site.checkpoints import update_run
from transferd.site.staging import Staging
from transferd.site.storage import LocalStorage

READS = "reads while a folder or step is re-committed"
FIGURE = READS  # what a failure here counts against (conftest.tally)


def _commit_folder(storage: LocalStorage, rel: str, version: int) -> None:
    files = {"a.bin": bytes([version % 256]) * 4096, "sub/b.bin": b"b" * 100}
    staging = Staging(
        dir=storage.staging_root / f"upload-{uuid.uuid4().hex[:8]}",
        kind="folder",
        members=list(files),
        sizes=[len(b) for b in files.values()],
    )
    staging.create()
    for i, data in enumerate(files.values()):
        staging.write(i, 0, data)
    storage.commit(staging, rel)
    staging.discard()


class _Reader(threading.Thread):
    """Polls until stopped; counts the checks and the times `present()` was False."""

    def __init__(self, present: object) -> None:
        super().__init__(daemon=True)
        self.present = present
        self.checks = 0
        self.missing = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.checks += 1
            if not self.present():  # type: ignore[operator]
                self.missing += 1


def _recommit_while_reading(tmp_path: Path, commits: int) -> tuple[int, int]:
    storage = LocalStorage(tmp_path / "data")
    folder = tmp_path / "data" / "approved" / "ds"
    _commit_folder(storage, "approved/ds", 0)
    reader = _Reader(lambda: os.path.isfile(folder / "a.bin"))
    reader.start()
    try:
        for version in range(1, commits + 1):
            _commit_folder(storage, "approved/ds", version)
    finally:
        reader.stop.set()
        reader.join()
    assert (folder / "a.bin").read_bytes() == bytes([commits % 256]) * 4096
    return reader.checks, reader.missing


def _recommit_step_while_following_latest(tmp_path: Path, commits: int) -> tuple[int, int]:
    storage = LocalStorage(tmp_path / "data")
    run = tmp_path / "data" / "checkpoints" / "run1"

    def step_named_by_latest_is_there() -> bool:
        try:
            step = (run / "LATEST").read_text().strip()
        except FileNotFoundError:
            return True  # before the first commit
        return os.path.isfile(run / step / "a.bin")

    _commit_folder(storage, "checkpoints/run1/step-1", 0)
    update_run(storage, "checkpoints/run1", 3, lambda _p: None)
    reader = _Reader(step_named_by_latest_is_there)
    reader.start()
    try:
        for version in range(1, commits + 1):
            _commit_folder(storage, "checkpoints/run1/step-1", version)
            update_run(storage, "checkpoints/run1", 3, lambda _p: None)
    finally:
        reader.stop.set()
        reader.join()
    return reader.checks, reader.missing


@pytest.mark.parametrize("what", ["folder", "latest"])
def test_recommit_is_never_seen_missing(tmp_path: Path, what: str, tally: Tally) -> None:
    run = _recommit_while_reading if what == "folder" else _recommit_step_while_following_latest
    checks, missing = run(tmp_path, 150)
    tally(READS, checks - missing, checks)
    assert checks > 150
    assert missing == 0


@pytest.mark.long
@pytest.mark.parametrize("what", ["folder", "latest"])
def test_recommit_is_never_seen_missing_long(tmp_path: Path, what: str, tally: Tally) -> None:
    run = _recommit_while_reading if what == "folder" else _recommit_step_while_following_latest
    checks, missing = run(tmp_path, 3000)
    tally(READS, checks - missing, checks)
    assert missing == 0


def test_without_an_exchange_the_gap_is_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same reader catches the old two-rename commit (what a filesystem without renameat2
    exchange still gets): the test above can fail."""
    monkeypatch.setattr(storage_mod, "_renameat2", None)
    missing = 0
    for attempt in range(5):
        missing += _recommit_while_reading(tmp_path / str(attempt), 150)[1]
        if missing:
            break
    assert missing > 0
