"""Carrying out a netplan plan (`transferd serve --config site.yaml --plan plan.json`).

`load_site_plan` reads the versioned plan, takes this site's part and checks it against the site
config (every destination and target must be a configured peer); `apply_links` folds the plan's
per-link class weights and rate caps into the peers' settings (plan values win); `SyncRunner`
keeps each sync entry's prefix replicated to its destination without a manual `send`. The daemon
never re-derives policy from the plan: the sender's tier check still refuses raw/ data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netplan._plan import Plan
from netplan.errors import PlanError
from transferd._classes import BULK_CLASSES, TrafficClass
from transferd.config import BulkWeights, PeerConfig, RateCaps, SiteConfig
from transferd.errors import ConfigError, PolicyViolation, TransferdError
from transferd.protocol.policy import Tier, check_may_leave_site, normalize_rel_path
from transferd.site.journal import JobState, Journal
from transferd.site.metrics import Metrics
from transferd.site.storage import FsspecStorage, LocalStorage

__all__ = [
    "CheckpointRoute",
    "SitePlanRun",
    "SyncRoute",
    "SyncRunner",
    "apply_links",
    "load_site_plan",
    "parse_site_plan",
]

log = logging.getLogger("transferd.plan")

# A sync whose job failed (peer down past the sender's retry budget, disk full) is tried again
# after this long, so a plan keeps converging without an operator.
RETRY_FAILED_AFTER_S = 60.0


@dataclass(frozen=True)
class SyncRoute:
    """Keep the folder `prefix` (relative to data_dir) mirrored at `destination`."""

    prefix: str
    destination: str
    traffic_class: TrafficClass
    dataset: str
    rule: str


@dataclass(frozen=True)
class CheckpointRoute:
    """Every complete step of the run folder `run` (`checkpoints/<workload>`) goes to `targets`."""

    run: str
    targets: tuple[str, ...]
    retain: int


@dataclass(frozen=True)
class SitePlanRun:
    """This site's part of a plan, checked against its site config."""

    site: str
    source: str
    sync: tuple[SyncRoute, ...]
    refused: tuple[tuple[str, str], ...]  # (field, reason): sync entries policy refuses
    checkpoints: tuple[CheckpointRoute, ...]
    # Runs this site receives from others and how many steps it keeps of each (the sender's
    # `retain`, the plan's word for the target side).
    incoming_retention: Mapping[str, int]
    link_weights: Mapping[str, Mapping[TrafficClass, int]]
    link_caps_mbps: Mapping[str, Mapping[TrafficClass, float]]

    def checkpoint_targets(self, step: str, default: list[str]) -> list[str]:
        """Where a complete step goes: the plan's targets for its run, else the config's."""
        run = step.rsplit("/", 1)[0]
        for route in self.checkpoints:
            if route.run == run:
                return list(route.targets)
        return default


def _prefix(value: str, where: str) -> str:
    try:
        return normalize_rel_path(value)
    except PolicyViolation as exc:
        raise ConfigError(f"{where}: {exc.message}", field=where) from exc


def parse_site_plan(
    data: str | bytes | Mapping[str, Any], config: SiteConfig, source: str = "<plan>"
) -> SitePlanRun:
    """Validate a plan and take `config.site`'s part; every problem is a ConfigError naming the
    field (`sites[1].sync[0].destination: ...`)."""
    try:
        plan = Plan.from_json(data)
        index = next((i for i, s in enumerate(plan.sites) if s.site == config.site), None)
        if index is None:
            plan.site(config.site)  # raises the planner's own "no site" error
    except PlanError as exc:
        raise ConfigError(f"{source}: {exc}", field="plan") from exc
    assert index is not None
    me = plan.sites[index]
    here = f"sites[{index}]"

    def peer(name: str, where: str) -> str:
        if name not in config.peers:
            raise ConfigError(
                f"{source}: {where}: {name!r} is not a peer in the site config "
                f"(peers: {', '.join(sorted(config.peers)) or 'none'})",
                field=where,
            )
        return name

    sync: list[SyncRoute] = []
    refused: list[tuple[str, str]] = []
    for j, entry in enumerate(me.sync):
        where = f"{here}.sync[{j}]"
        if entry.traffic_class not in BULK_CLASSES:
            raise ConfigError(
                f"{source}: {where}.traffic_class: {entry.traffic_class.value!r} is not a bulk "
                f"class ({', '.join(c.value for c in BULK_CLASSES)})",
                field=f"{where}.traffic_class",
            )
        prefix = _prefix(entry.path_prefix, f"{source}: {where}.path_prefix")
        dest = peer(entry.destination, f"{where}.destination")
        try:
            check_may_leave_site(prefix)
        except PolicyViolation as exc:
            refused.append((f"{where}.path_prefix", exc.message))
            continue
        sync.append(SyncRoute(prefix, dest, entry.traffic_class, entry.dataset, entry.rule))
    checkpoints = []
    for j, ck in enumerate(me.checkpoints):
        where = f"{here}.checkpoints[{j}]"
        run = _prefix(ck.path_prefix, f"{source}: {where}.path_prefix")
        if run.split("/", 1)[0] != Tier.CHECKPOINTS or run.count("/") != 1:
            raise ConfigError(
                f"{source}: {where}.path_prefix: must be checkpoints/<run>/, "
                f"not {ck.path_prefix!r}",
                field=f"{where}.path_prefix",
            )
        targets = tuple(peer(t, f"{where}.targets[{k}]") for k, t in enumerate(ck.targets))
        checkpoints.append(CheckpointRoute(run, targets, ck.retain))
    incoming = {
        normalize_rel_path(ck.path_prefix): ck.retain
        for s in plan.sites
        for ck in s.checkpoints
        if config.site in ck.targets
    }
    for k, lp in enumerate(me.links):
        values: list[tuple[str, TrafficClass, float]] = [
            ("class_weights", c, w) for c, w in lp.class_weights.items()
        ]
        values += [("rate_caps_mbps", c, v) for c, v in lp.rate_caps_mbps.items()]
        for name, cls, value in values:
            where = f"{here}.links[{k}].{name}.{cls.value}"
            if cls not in BULK_CLASSES or not value > 0:
                raise ConfigError(
                    f"{source}: {where}: must be a bulk class with a value > 0, got {value!r}",
                    field=where,
                )
    # Links to sites this daemon has no peer entry for carry none of its traffic: skipped.
    weights = {lp.peer: dict(lp.class_weights) for lp in me.links if lp.peer in config.peers}
    caps = {lp.peer: dict(lp.rate_caps_mbps) for lp in me.links if lp.peer in config.peers}
    return SitePlanRun(
        site=config.site,
        source=source,
        sync=tuple(sync),
        refused=tuple(refused),
        checkpoints=tuple(checkpoints),
        incoming_retention=incoming,
        link_weights=weights,
        link_caps_mbps=caps,
    )


def load_site_plan(path: str | Path, config: SiteConfig) -> SitePlanRun:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read plan {path}: {exc.strerror}", path=path) from exc
    return parse_site_plan(text, config, source=str(path))


def apply_links(config: SiteConfig, plan: SitePlanRun) -> SiteConfig:
    """The site config with the plan's per-link class weights and rate caps on its peers. Where
    both set a value the plan's wins; what the plan leaves out keeps the config's value."""
    peers: dict[str, PeerConfig] = {}
    for name, pc in config.peers.items():
        weights = plan.link_weights.get(name, {})
        caps = plan.link_caps_mbps.get(name, {})
        if not weights and not caps:
            peers[name] = pc
            continue
        try:
            base = pc.weights or config.traffic.weights
            new_weights = BulkWeights.model_validate(
                {**base.model_dump(), **{c.value: w for c, w in weights.items()}}
            )
            new_caps = RateCaps.model_validate(
                {**pc.rate_caps.model_dump(), **{f"{c.value}_mbit_s": v for c, v in caps.items()}}
            )
        except ValueError as exc:
            raise ConfigError(
                f"{plan.source}: links to {name}: {exc}", field=f"links[{name}]"
            ) from exc
        peers[name] = pc.model_copy(update={"weights": new_weights, "rate_caps": new_caps})
    return config.model_copy(update={"peers": peers})


@dataclass
class _Sent:
    signature: tuple[Any, ...]
    job: str
    at: float


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
    storage: LocalStorage | FsspecStorage
    journal: Journal
    metrics: Metrics
    submit: Callable[[str, list[str], TrafficClass], list[str]]
    clock: Callable[[], float]
    quiet_period_s: float
    poll_interval_s: float
    _sent: dict[tuple[str, str], _Sent] = field(default_factory=dict)

    def _signature(self, prefix: str) -> tuple[Any, ...] | None:
        if not self.storage.exists(prefix):
            return None
        _kind, members = self.storage.list_source(prefix)
        return tuple(members), self.storage.newest_mtime(prefix)

    def signatures(self) -> dict[str, tuple[Any, ...] | None]:
        """Each route folder's current state (blocking storage calls: run in a thread)."""
        out: dict[str, tuple[Any, ...] | None] = {}
        for route in self.routes:
            if route.prefix in out:
                continue
            try:
                out[route.prefix] = self._signature(route.prefix)
            except TransferdError as exc:
                out[route.prefix] = None
                log.error(
                    "plan.sync.error",
                    extra={"fields": {"path": route.prefix, "kind": exc.kind, "error": str(exc)}},
                )
        return out

    def submit_due(self, signatures: Mapping[str, tuple[Any, ...] | None]) -> list[str]:
        """Queue every route whose folder changed and is quiet; returns the new job ids. Runs on
        the event loop (the sender and the journal belong to it)."""
        now = self.clock()
        queued: list[str] = []
        for route in self.routes:
            sig = signatures.get(route.prefix)
            if sig is None or now - sig[1] < self.quiet_period_s:
                continue
            key = (route.prefix, route.destination)
            last = self._sent.get(key)
            if last is not None:
                job = self.journal.job(last.job)
                if job is not None and job.state in JobState.ACTIVE:
                    continue
                failed = job is None or job.state == JobState.FAILED
                retry_due = failed and now - last.at >= RETRY_FAILED_AFTER_S
                if last.signature == sig and not retry_due:
                    continue
            try:
                [job_id] = self.submit(route.prefix, [route.destination], route.traffic_class)
            except TransferdError as exc:
                # A refusal is counted by the sender; keep serving the other routes.
                log.error(
                    "plan.sync.error",
                    extra={"fields": {"path": route.prefix, "kind": exc.kind, "error": str(exc)}},
                )
                self._sent[key] = _Sent(sig, "", now)  # no job: tried again like a failed one
                continue
            self._sent[key] = _Sent(sig, job_id, now)
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
            self.submit_due(await asyncio.to_thread(self.signatures))
            await asyncio.sleep(self.poll_interval_s)
