"""The daemon's own job sources, each a loop in the daemon's TaskGroup: `SyncRunner` keeps a
plan's sync folders mirrored at their destinations, `CheckpointWatcher` replicates each
complete checkpoint step to its targets. Both submit ordinary jobs to the sender; their
storage scans run on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from netplan.plan import TrafficClass
from transferd.errors import PolicyViolation, StorageError, TransferdError
from transferd.plan import SyncRoute
from transferd.protocol.local_api import JobState
from transferd.site.checkpoints import ready_steps
from transferd.site.journal import Journal
from transferd.site.storage import SiteStorage

__all__ = ["RETRY_FAILED_AFTER_S", "CheckpointWatcher", "FolderState", "SyncRunner"]

log = logging.getLogger("transferd.plan")

# A sync whose job failed (peer down past the sender's retry budget, disk full) is tried again
# after this long, so a plan keeps converging without an operator.
RETRY_FAILED_AFTER_S = 60.0

Submit = Callable[[str, list[str], TrafficClass | None], list[str]]


@dataclass(frozen=True)
class FolderState:
    """What a sync folder looked like: its members with sizes, and its newest mtime."""

    members: tuple[tuple[str, int], ...]
    newest_mtime: float


@dataclass
class _Sent:
    state: FolderState | None
    job: str
    at: float


def _log_error(event: str, path: str | None, exc: TransferdError) -> None:
    log.error(event, extra={"fields": {"path": path, "kind": exc.kind, "error": str(exc)}})


@dataclass
class SyncRunner:
    """Keeps every sync route's folder mirrored at its destination.

    Each poll, a route whose folder changed (members, sizes or newest mtime) and has been quiet
    for `quiet_period_s` is submitted as one folder job: the receiver commits the folder
    atomically, and the have/want exchange moves only chunks the destination lacks, so a re-send
    of a mostly unchanged dataset is cheap (also after a restart, when this in-memory record of
    what was sent starts empty). A route waits while its previous job is still active.
    """

    routes: tuple[SyncRoute, ...]
    storage: SiteStorage
    journal: Journal
    submit: Submit
    clock: Callable[[], float]
    quiet_period_s: float
    poll_interval_s: float
    _sent: dict[tuple[str, str], _Sent] = field(default_factory=dict)

    def _state(self, prefix: str) -> FolderState | None:
        found = self.storage.folder_state(prefix)
        return None if found is None else FolderState(tuple(found[0]), found[1])

    def scan(self) -> dict[str, FolderState | None]:
        """Each route folder's current state (blocking storage calls: run in a thread)."""
        out: dict[str, FolderState | None] = {}
        for route in self.routes:
            if route.prefix in out:
                continue
            try:
                out[route.prefix] = self._state(route.prefix)
            except TransferdError as exc:
                out[route.prefix] = None
                _log_error("plan.sync.error", route.prefix, exc)
        return out

    def _due(self, route: SyncRoute, state: FolderState, now: float) -> bool:
        last = self._sent.get((route.prefix, route.destination))
        if last is None:
            return True
        job = self.journal.job(last.job)
        if job is not None and job.state.active:
            return False
        failed = job is None or job.state is JobState.FAILED
        retry_due = failed and now - last.at >= RETRY_FAILED_AFTER_S
        return last.state != state or retry_due

    def submit_due(self, states: Mapping[str, FolderState | None]) -> list[str]:
        """Queue every route whose folder changed and is quiet; returns the new job ids. Runs on
        the event loop (the sender and the journal belong to it)."""
        now = self.clock()
        queued: list[str] = []
        for route in self.routes:
            state = states.get(route.prefix)
            if state is None or now - state.newest_mtime < self.quiet_period_s:
                continue
            if not self._due(route, state, now):
                continue
            key = (route.prefix, route.destination)
            try:
                [job_id] = self.submit(route.prefix, [route.destination], route.traffic_class)
            except TransferdError as exc:
                # A refusal is counted by the sender; keep serving the other routes.
                _log_error("plan.sync.error", route.prefix, exc)
                self._sent[key] = _Sent(state, "", now)  # no job: tried again like a failed one
                continue
            self._sent[key] = _Sent(state, job_id, now)
            queued.append(job_id)
            log.info(
                "plan.sync.queued",
                extra={
                    "fields": {
                        "path": route.prefix,
                        "to": route.destination,
                        "class": route.traffic_class.value,
                        "rule": route.rule,
                        "job": job_id,
                    }
                },
            )
        return queued

    async def run(self) -> None:
        while True:
            self.submit_due(await asyncio.to_thread(self.scan))
            await asyncio.sleep(self.poll_interval_s)


@dataclass
class CheckpointWatcher:
    """Watch mode: replicate each complete checkpoint step to its targets, once per target
    (a step is complete when it holds the marker file, or nothing in it changed for the quiet
    period; the journal remembers which steps went where, across restarts)."""

    storage: SiteStorage
    journal: Journal
    submit: Submit
    targets: Callable[[str], list[str]]  # step -> destination sites
    clock: Callable[[], float]
    marker: str
    quiet_period_s: float
    poll_interval_s: float
    on_policy_refusal: Callable[[], None] = lambda: None  # counts a refused run or step
    _refused: set[str] = field(default_factory=set)

    def _refused_step(self, rel: str, exc: PolicyViolation | StorageError) -> None:
        """Runs on the scan thread: logged once per path (a policy refusal also counted),
        then skipped."""
        if rel not in self._refused:
            self._refused.add(rel)
            if isinstance(exc, PolicyViolation):
                self.on_policy_refusal()
            _log_error("watch.refused", rel, exc)

    def submit_ready(self, steps: list[str]) -> None:
        for step in steps:
            dests = [d for d in self.targets(step) if not self.journal.watch_seen(step, d)]
            if not dests:
                continue
            try:
                jobs = self.submit(step, dests, None)
            except TransferdError as exc:
                # A step that cannot be sent (a FIFO in it, a policy refusal, which the sender
                # counts) is logged once and tried again each poll; the steps after it go on.
                if step not in self._refused:
                    self._refused.add(step)
                    _log_error("watch.error", step, exc)
                continue
            for dest, job in zip(dests, jobs, strict=True):
                self.journal.mark_watch_seen(step, dest, job)
            log.info("watch.step", extra={"fields": {"path": step, "to": ",".join(dests)}})

    async def run(self) -> None:
        while True:
            try:
                steps = await asyncio.to_thread(
                    ready_steps,
                    self.storage,
                    self.marker,
                    self.quiet_period_s,
                    self.clock(),
                    self._refused_step,
                )
                self.submit_ready(steps)
            except TransferdError as exc:
                _log_error("watch.error", None, exc)
            await asyncio.sleep(self.poll_interval_s)
