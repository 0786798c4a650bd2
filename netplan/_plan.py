"""The plan file: what each site's transferd must do, as versioned data (`schema_version`).

A `Plan` is built from the topology and its sync plan, and is all a daemon needs: per site, the
sync entries it sends (path prefix, destination, traffic class, relay path), the checkpoint
replication it runs (targets, cadence, retention), and per adjacent link the bulk class weights and
rate caps. `Plan.to_json()` / `Plan.from_json()` round-trip it; a plan with an unknown
`schema_version` or a malformed field is a `PlanError` naming the field. The format is described
field by field in docs/plan-format.md. transferd executes a plan; it never re-derives policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from netplan._sync import SyncPlan
from netplan.errors import PlanError
from netplan.network import Network
from netplan.topology import Topology
from netplan.yamlpos import format_path
from transferd._classes import BULK_CLASSES, TrafficClass

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointEntry",
    "LinkPolicy",
    "Plan",
    "SitePlan",
    "SyncEntry",
    "build_plan",
    "dataset_prefix",
    "checkpoint_prefix",
]

SCHEMA_VERSION = 1

_STRICT = ConfigDict(extra="forbid")


def dataset_prefix(tier: str, dataset: str) -> str:
    """Where a dataset lives under a site's data root: transferd's tier folder, then its id
    (`approved/claims/`), so the daemon's tier policy applies to exactly what the plan names."""
    return f"{tier}/{dataset}/"


def checkpoint_prefix(workload: str) -> str:
    return f"checkpoints/{workload}/"


@dataclass(frozen=True, config=_STRICT)
class SyncEntry:
    """Send everything under `path_prefix` (relative to the site's data root) to `destination`."""

    path_prefix: str
    destination: str
    traffic_class: TrafficClass
    dataset: str
    rule: str
    via: tuple[str, ...] = ()  # relay sites between this site and the destination, in order
    gb_per_day: float = Field(default=0.0, ge=0)


@dataclass(frozen=True, config=_STRICT)
class CheckpointEntry:
    """Replicate each new checkpoint under `path_prefix` to every target; keep `retain` there."""

    workload: str
    path_prefix: str
    targets: tuple[str, ...]
    every_hours: float = Field(gt=0)
    retain: int = Field(ge=1)


@dataclass(frozen=True, config=_STRICT)
class LinkPolicy:
    """Traffic-class shares on the link from this site to `peer`.

    `class_weights`: relative weights of the bulk classes when both have data queued (control
    keeps strict priority and interactive goes earliest-deadline-first, so they carry no weight).
    `rate_caps_mbps`: the most each bulk class may send on this link, so bulk never takes the
    share inference traffic needs.
    """

    peer: str
    class_weights: dict[TrafficClass, int]
    rate_caps_mbps: dict[TrafficClass, float]


@dataclass(frozen=True, config=_STRICT)
class SitePlan:
    site: str
    sync: tuple[SyncEntry, ...] = ()
    checkpoints: tuple[CheckpointEntry, ...] = ()
    links: tuple[LinkPolicy, ...] = ()


@dataclass(frozen=True, config=_STRICT)
class Plan:
    schema_version: int
    topology: str
    sites: tuple[SitePlan, ...]

    def site(self, site_id: str) -> SitePlan:
        for s in self.sites:
            if s.site == site_id:
                return s
        raise PlanError(f"the plan has no site {site_id!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _ADAPTER.dump_python(self, mode="json")
        return out

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> Plan:
        """Parse and validate a plan; any problem is a `PlanError` naming the field."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise PlanError(f"plan is not JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise PlanError("plan: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"schema_version: {version!r} is not supported (this version reads "
                            f"{SCHEMA_VERSION})")
        try:
            return _ADAPTER.validate_python(dict(data))
        except ValidationError as exc:
            problems = [f"{format_path(tuple(e['loc']))}: {e['msg']}"
                        for e in exc.errors(include_url=False)]
            raise PlanError("invalid plan: " + "; ".join(problems)) from exc


_ADAPTER: TypeAdapter[Plan] = TypeAdapter(Plan)


def _weights(volumes: Mapping[TrafficClass, float]) -> dict[TrafficClass, int]:
    """Bulk class weights in proportion to each class's daily volume on the link (1..100); equal
    when nothing is planned, so an ad-hoc transfer still shares fairly."""
    total = sum(volumes.values())
    if total <= 0:
        return dict.fromkeys(BULK_CLASSES, 1)
    return {c: max(1, round(100 * volumes.get(c, 0.0) / total)) for c in BULK_CLASSES}


def build_plan(topo: Topology, network: Network, sync: SyncPlan) -> Plan:
    """Turn the sync plan into per-site entries and per-link class policies."""
    by_site: dict[str, dict[str, list[Any]]] = {
        s.id: {"sync": [], "checkpoints": []} for s in topo.sites}
    tiers = {d.id: d.tier for d in topo.datasets}
    for t in sync.transfers:
        by_site[t.source]["sync"].append(SyncEntry(
            path_prefix=dataset_prefix(tiers[t.dataset], t.dataset), destination=t.destination,
            traffic_class=t.traffic_class, dataset=t.dataset, rule=t.rule,
            via=t.path[1:-1], gb_per_day=round(t.gb_per_day, 6)))
    for c in sync.checkpoints:
        if c.targets:
            by_site[c.source]["checkpoints"].append(CheckpointEntry(
                workload=c.workload, path_prefix=checkpoint_prefix(c.workload),
                targets=c.targets, every_hours=c.every_hours, retain=c.retain))
    volume = {(load.sender, load.receiver): {TrafficClass.SYNC: load.sync_gb_per_day,
                                             TrafficClass.CHECKPOINT: load.checkpoint_gb_per_day}
              for load in sync.links}
    links: dict[str, list[LinkPolicy]] = {s.id: [] for s in topo.sites}
    for tp in network.links:
        for here, peer in (tp.between, tp.between[::-1]):
            cap = round(tp.capacity_gbps * 1000 * sync.bulk_share, 3)
            links[here].append(LinkPolicy(
                peer=peer, class_weights=_weights(volume.get((here, peer), {})),
                rate_caps_mbps=dict.fromkeys(BULK_CLASSES, cap)))
    sites = tuple(
        SitePlan(site=s.id, sync=tuple(by_site[s.id]["sync"]),
                 checkpoints=tuple(by_site[s.id]["checkpoints"]),
                 links=tuple(sorted(links[s.id], key=lambda p: p.peer)))
        for s in topo.sites)
    return Plan(schema_version=SCHEMA_VERSION, topology=topo.name, sites=sites)
