"""Build the plan (`netplan.plan.Plan`) from an analysis: what each site's transferd must do.

Per site: the sync entries it sends (dataset folders to the sites its rules name), the vector-index
shard replicas it keeps (the shard solver's placement), the checkpoint replication it runs, and per
adjacent link the bulk class weights and rate caps. The contract itself (model, vocabulary,
`schema_version`) is `netplan.plan`; this module only fills it in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netplan.plan import (
    BULK_CLASSES,
    SCHEMA_VERSION,
    CheckpointEntry,
    LinkPolicy,
    Plan,
    RouteShare,
    ShardEntry,
    SitePlan,
    SyncEntry,
    TrafficClass,
    checkpoint_prefix,
    dataset_prefix,
    shard_prefix,
)
from netplan.report import Report
from netplan.routes import Route
from netplan.topology import Topology

__all__ = ["build_plan"]


def _weights(volumes: Mapping[TrafficClass, float]) -> dict[TrafficClass, int]:
    """Bulk class weights in proportion to each class's daily volume on the link (1..100); equal
    when nothing is planned, so an ad-hoc transfer still shares fairly."""
    total = sum(volumes.values())
    if total <= 0:
        return dict.fromkeys(BULK_CLASSES, 1)
    return {c: max(1, round(100 * volumes.get(c, 0.0) / total)) for c in BULK_CLASSES}


def _routes(route: Route) -> tuple[tuple[str, ...], tuple[RouteShare, ...]]:
    """(via, routes) of a transfer: the main path's relays, and for a split every path with its
    share (rounded to 6 digits, the rounding left on the largest so they add up to 1)."""
    via = route.legs[0].path.sites[1:-1]
    if not route.multipath:
        return via, ()
    shares = [round(leg.share, 6) for leg in route.legs]
    shares[0] = round(1.0 - sum(shares[1:]), 6)
    return via, tuple(RouteShare(via=leg.path.sites[1:-1], share=share)
                      for leg, share in zip(route.legs, shares, strict=True))


def build_plan(topo: Topology, report: Report) -> Plan:
    """Turn the report's sync plan and shard placement into per-site entries and per-link class
    policies. `report` is `analyze(topo)`'s."""
    sync = report.sync_plan
    if sync is None:
        raise ValueError("the report has no sync plan")
    by_site: dict[str, dict[str, list[Any]]] = {
        s.id: {"sync": [], "shards": [], "checkpoints": []} for s in topo.sites}
    tiers = {d.id: d.tier for d in topo.datasets}
    residency = {d.id: tuple(d.residency or ()) for d in topo.datasets}
    indexes = {ix.id: ix for ix in topo.vector_indexes}
    for t in sync.transfers:
        via, routes = _routes(t.route)
        if t.shard is not None:
            ix = indexes[t.dataset]
            by_site[t.source]["shards"].append(ShardEntry(
                path_prefix=shard_prefix(ix.tier, ix.id, t.shard), destination=t.destination,
                traffic_class=t.traffic_class, index=ix.id, shard=t.shard, via=via,
                size_gb=ix.shard_sizes()[t.shard], gb_per_day=round(t.gb_per_day, 6),
                routes=routes))
            continue
        by_site[t.source]["sync"].append(SyncEntry(
            path_prefix=dataset_prefix(tiers[t.dataset], t.dataset), destination=t.destination,
            traffic_class=t.traffic_class, dataset=t.dataset, rule=t.rule,
            via=via, gb_per_day=round(t.gb_per_day, 6), routes=routes,
            residency=residency.get(t.dataset, ())))
    for c in sync.checkpoints:
        if c.targets:
            by_site[c.source]["checkpoints"].append(CheckpointEntry(
                workload=c.workload, path_prefix=checkpoint_prefix(c.workload),
                targets=c.targets, every_hours=c.every_hours, retain=c.retain))
    volume = {(load.sender, load.receiver): {TrafficClass.SYNC: load.sync_gb_per_day,
                                             TrafficClass.CHECKPOINT: load.checkpoint_gb_per_day}
              for load in sync.links}
    links: dict[str, list[LinkPolicy]] = {s.id: [] for s in topo.sites}
    for tp in report.links:  # one per direction: the cap is that direction's capacity
        here, peer = tp.between
        cap = round(tp.capacity_gbps * 1000 * sync.bulk_share, 3)
        links[here].append(LinkPolicy(
            peer=peer, class_weights=_weights(volume.get((here, peer), {})),
            rate_caps_mbps=dict.fromkeys(BULK_CLASSES, cap)))
    sites = tuple(
        SitePlan(site=s.id, region=s.region, sync=tuple(by_site[s.id]["sync"]),
                 shards=tuple(by_site[s.id]["shards"]),
                 checkpoints=tuple(by_site[s.id]["checkpoints"]),
                 links=tuple(sorted(links[s.id], key=lambda p: p.peer)))
        for s in topo.sites)
    return Plan(schema_version=SCHEMA_VERSION, topology=topo.name, sites=sites)
