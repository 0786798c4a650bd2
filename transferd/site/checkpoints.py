"""Checkpoint folders `checkpoints/<run>/<step>/`: step order, LATEST, retention, readiness.

At a destination a step appears by one directory rename (complete or not at all); afterwards
LATEST (a one-line file naming the step) is rewritten atomically to the newest step present, and
only the newest `keep` steps stay. At a source, watch mode asks `ready_steps` which step folders
are complete: they hold the marker file, or nothing in them changed for the quiet period.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from transferd.errors import PolicyViolation, StorageError
from transferd.protocol.policy import CHECKPOINTS
from transferd.site.storage import SiteStorage, check_utf8_name

__all__ = ["LATEST", "is_step_root", "ready_steps", "step_order", "update_run"]

LATEST = "LATEST"
_NUM = re.compile(r"(\d+)")


def step_order(name: str) -> tuple[object, ...]:
    """Natural order: step-9 < step-10; numbers compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _NUM.split(name) if p)


def is_step_root(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == CHECKPOINTS


Refused = Callable[[str, PolicyViolation | StorageError], None]


def _named(parent: str, name: str, on_refused: Refused | None) -> bool:
    """A name that can be carried (UTF-8 text: it goes into jobs, the journal and JSON); one
    that cannot is reported under its escaped form, then skipped."""
    try:
        check_utf8_name(parent, name)
    except StorageError as exc:
        if on_refused is not None:
            on_refused(str(exc.fields["path"]), exc)
        return False
    return True


def _is_dir(storage: SiteStorage, rel: str, on_refused: Refused | None) -> bool:
    """A folder policy lets us use (a link into raw/ is no step: reported, then skipped)."""
    try:
        return storage.is_dir(rel)
    except PolicyViolation as exc:
        if on_refused is not None:
            on_refused(rel, exc)
        return False


def _steps(storage: SiteStorage, run: str, on_refused: Refused | None = None) -> list[str]:
    names = [
        n
        for n in storage.list_dir(run)
        if n != LATEST
        and not n.startswith(".")
        and ".transferd-" not in n
        and _named(run, n, on_refused)
        and _is_dir(storage, f"{run}/{n}", on_refused)
    ]
    return sorted(names, key=step_order)


def update_run(
    storage: SiteStorage, run: str, keep: int, on_removed: Callable[[str], None]
) -> str | None:
    """Point LATEST at the newest step of `run` and drop steps beyond the newest `keep`."""
    steps = _steps(storage, run)
    if not steps:
        return None
    newest = steps[-1]
    if storage.read_text(f"{run}/{LATEST}") != newest + "\n":
        storage.write_text_atomic(f"{run}/{LATEST}", newest + "\n")
    for old in steps[:-keep]:
        storage.remove_tree(f"{run}/{old}")
        on_removed(f"{run}/{old}")
    return newest


def ready_steps(
    storage: SiteStorage,
    marker: str,
    quiet_period_s: float,
    now: float,
    on_refused: Refused | None = None,
) -> list[str]:
    """Step folders under checkpoints/ that are complete at this (source) site. A run or step
    that leads into raw/ (or out of data_dir) through a link, or whose name is not UTF-8,
    goes to `on_refused` instead."""
    ready: list[str] = []
    for run in storage.list_dir(CHECKPOINTS):
        run_rel = f"{CHECKPOINTS}/{run}"
        if (run.startswith(".") or not _named(CHECKPOINTS, run, on_refused)
                or not _is_dir(storage, run_rel, on_refused)):
            continue
        for step in _steps(storage, run_rel, on_refused):
            rel = f"{run_rel}/{step}"
            if marker in storage.list_dir(rel) or now - storage.newest_mtime(rel) >= quiet_period_s:
                ready.append(rel)
    return ready
