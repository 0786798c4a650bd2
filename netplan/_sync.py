"""Tiered sync rules (Rucio-style) and checkpoint replication: what moves where every day, and
whether each link can carry it.

Theory of operation. Each `sync_rules[]` entry selects datasets (by tier or id) and resolves its
destinations: `consumers` = every site running a workload that reads the dataset (from the
placement decisions), `residency_gpu_sites` = sites with GPUs inside the dataset's residency
regions (its own region when unrestricted), or an explicit list. Residency always filters the
destinations and the relay hops. When source + destinations span fewer than `copies_min`
failure domains, the cheapest-egress (then widest) allowed sites in new domains are added.
Raw-tier data never leaves its site: a rule that would move it is a `PlanError` (the loader
already rejects such rules with their YAML line).
Each transfer follows the widest path; every hop carries size_gb * change_fraction_per_day in
the `sync` class. Every vector-index shard replica away from its primary (the shard solver's
placement) receives update_gb_per_day / shards per day in the `sync` class too. Checkpoints add
size_gb * 24 / every_hours per target in the `checkpoint` class.
Per link direction, the capacity is effective_gbps * bulk_share * window_hours (the sync window);
the load is the sync volume plus the checkpoint volume that falls inside the window
(window_hours / 24 of the day's). A link whose load exceeds its capacity is flagged with the
shortfall in GB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netplan._sections import SyncRule
from netplan._shards import ShardReplication
from netplan.errors import PlanError
from netplan.network import Network, WidestPath
from netplan.plan import TrafficClass
from netplan.topology import Dataset, Topology

__all__ = [
    "CheckpointPlan",
    "LinkLoad",
    "SyncPlan",
    "SyncTransfer",
    "plan_sync",
]


@dataclass(frozen=True)
class SyncTransfer:
    rule: str
    dataset: str
    source: str
    destination: str
    path: tuple[str, ...]
    gb_per_day: float
    traffic_class: TrafficClass
    shard: int | None = None  # set for a vector-index shard replica (`dataset` is the index)

    def to_json(self) -> dict[str, Any]:
        out = {"rule": self.rule, "dataset": self.dataset, "source": self.source,
               "destination": self.destination, "path": list(self.path),
               "gb_per_day": round(self.gb_per_day, 6), "class": self.traffic_class.value}
        if self.shard is not None:
            out["shard"] = self.shard
        return out


@dataclass(frozen=True)
class CheckpointPlan:
    workload: str
    source: str
    targets: tuple[str, ...]
    size_gb: float
    every_hours: float
    retain: int
    transfers: tuple[SyncTransfer, ...]


@dataclass(frozen=True)
class LinkLoad:
    """Daily bulk volume over one link in one direction, against what the sync window allows."""

    sender: str
    receiver: str
    sync_gb_per_day: float
    checkpoint_gb_per_day: float
    effective_gbps: float
    capacity_gb: float  # in the sync window at the bulk share
    load_gb: float  # sync + the checkpoint volume inside the window

    @property
    def shortfall_gb(self) -> float:
        return max(0.0, self.load_gb - self.capacity_gb)

    @property
    def flagged(self) -> bool:
        return self.shortfall_gb > 1e-9

    def to_json(self) -> dict[str, Any]:
        return {"between": [self.sender, self.receiver],
                "sync_gb_per_day": round(self.sync_gb_per_day, 6),
                "checkpoint_gb_per_day": round(self.checkpoint_gb_per_day, 6),
                "effective_gbps": round(self.effective_gbps, 6),
                "window_capacity_gb": round(self.capacity_gb, 6),
                "window_load_gb": round(self.load_gb, 6),
                "shortfall_gb": round(self.shortfall_gb, 6), "flagged": self.flagged}


@dataclass(frozen=True)
class SyncPlan:
    transfers: tuple[SyncTransfer, ...]
    checkpoints: tuple[CheckpointPlan, ...]
    links: tuple[LinkLoad, ...]
    window_hours: float
    bulk_share: float
    notes: tuple[str, ...]  # rules that could not reach copies_min, unreachable destinations

    def to_json(self) -> dict[str, Any]:
        return {
            "window_hours": self.window_hours,
            "bulk_share": self.bulk_share,
            "transfers": [t.to_json() for t in self.transfers],
            "checkpoints": [{"workload": c.workload, "source": c.source,
                             "targets": list(c.targets), "size_gb": c.size_gb,
                             "every_hours": c.every_hours, "retain": c.retain}
                            for c in self.checkpoints],
            "links": [link.to_json() for link in self.links],
            "notes": list(self.notes),
        }


def _regions(ds: Dataset) -> frozenset[str] | None:
    return frozenset(ds.residency) if ds.residency else None


def _selected(topo: Topology, rule: SyncRule) -> list[Dataset]:
    chosen = [topo.dataset(d) for d in rule.datasets]
    if rule.tier is not None:
        chosen += [d for d in topo.datasets if d.tier == rule.tier and d not in chosen]
    for ds in chosen:
        if ds.tier == "raw":
            raise PlanError(f"sync rule {rule.id}: raw-tier dataset {ds.id} never leaves "
                            f"{ds.site}")
    return chosen


def _destinations(topo: Topology, rule: SyncRule, ds: Dataset,
                  workload_sites: Mapping[str, Sequence[str]]) -> list[str]:
    if isinstance(rule.to, tuple):
        wanted = list(rule.to)
    elif rule.to == "consumers":
        wanted = [s for w in topo.workloads if ds.id in w.datasets
                  for s in workload_sites.get(w.id, ())]
    else:  # residency_gpu_sites
        home = topo.site(ds.site).region
        regions = set(ds.residency) if ds.residency else {home}
        wanted = [s.id for s in topo.sites if s.region in regions and any(s.gpus.values())]
    out: list[str] = []
    for s in wanted:
        if s != ds.site and s not in out and ds.allowed_in(topo.site(s).region):
            out.append(s)
    return out


def _add_domains(topo: Topology, network: Network, source: str, targets: list[str],
                 copies_min: int, regions: frozenset[str] | None) -> tuple[list[str], int]:
    """Extend `targets` with the cheapest-egress, then widest, sites in new failure domains."""
    domain = {s.id: s.failure_domain for s in topo.sites}
    have = {domain[source], *(domain[t] for t in targets)}
    paths = network.widest_paths_from(source, regions)
    spare = sorted((p.egress_usd_per_gb, -p.bottleneck_gbps, site) for site, p in paths.items()
                   if site != source and site not in targets)
    for _, _, site in spare:
        if len(have) >= copies_min:
            break
        if domain[site] not in have:
            targets.append(site)
            have.add(domain[site])
    return targets, len(have)


def plan_sync(topo: Topology, network: Network,
              workload_sites: Mapping[str, Sequence[str]],
              shards: Sequence[ShardReplication] = ()) -> SyncPlan:
    """Resolve sync rules, checkpoint replication and shard replicas into transfers and per-link
    daily loads.

    `workload_sites`: workload id -> the sites it runs at (from the placement decisions).
    `shards`: the vector-index placements; every replica away from the index's primary site
    receives the index's daily update volume (update_gb_per_day / shards) in the sync class.
    """
    transfers: list[SyncTransfer] = []
    notes: list[str] = []

    def route(rule: str, artifact: str, source: str, dest: str, gb: float,
              cls: TrafficClass, regions: frozenset[str] | None,
              shard: int | None = None) -> SyncTransfer | None:
        path: WidestPath | None = network.widest_path(source, dest, regions)
        if path is None:
            where = f" inside regions [{', '.join(sorted(regions))}]" if regions else ""
            notes.append(f"{rule}: no path from {source} to {dest}{where} for {artifact}")
            return None
        return SyncTransfer(rule, artifact, source, dest, path.sites, gb, cls, shard)

    for rule in topo.sync_rules:
        for ds in _selected(topo, rule):
            regions = _regions(ds)
            dests = _destinations(topo, rule, ds, workload_sites)
            dests, domains = _add_domains(topo, network, ds.site, dests, rule.copies_min,
                                          regions)
            if domains < rule.copies_min:
                notes.append(f"{rule.id}: dataset {ds.id} reaches only {domains} failure "
                             f"domain(s) of copies_min {rule.copies_min}")
            for dest in dests:
                t = route(rule.id, ds.id, ds.site, dest, ds.size_gb * rule.change_fraction_per_day,
                          TrafficClass.SYNC, regions)
                if t is not None:
                    transfers.append(t)

    indexes = {ix.id: ix for ix in topo.vector_indexes}
    for rep in shards:
        ix = indexes[rep.index]
        per_shard = ix.update_gb_per_day / len(rep.shards) if rep.shards else 0.0
        for placement in rep.shards:
            for dest in placement.sites:
                if dest == ix.site:
                    continue
                t = route(f"shards:{ix.id}", ix.id, ix.site, dest, per_shard, TrafficClass.SYNC,
                          None, placement.shard)
                if t is not None:
                    transfers.append(t)

    checkpoints: list[CheckpointPlan] = []
    workloads = {w.id: w for w in topo.workloads}
    for ck in topo.checkpoint_replication:
        wl = workloads[ck.workload]
        size = ck.size_gb if ck.size_gb is not None else topo.model(wl.model or "").size_gb
        runs_at = list(workload_sites.get(wl.id, ()))
        if not runs_at:
            notes.append(f"checkpoints of {wl.id}: the workload has no feasible placement")
            continue
        source = runs_at[0]
        # A checkpoint may carry the training data's residency: keep it where every dataset
        # it was trained on may be.
        regions = _checkpoint_regions(topo, wl.datasets)
        targets, domains = _add_domains(topo, network, source,
                                        [t for t in ck.to if t != source], ck.copies_min,
                                        regions)
        if domains < ck.copies_min:
            notes.append(f"checkpoints of {wl.id}: only {domains} failure domain(s) of "
                         f"copies_min {ck.copies_min}")
        moved = []
        for dest in targets:
            t = route(f"checkpoints:{wl.id}", wl.id, source, dest, size * 24.0 / ck.every_hours,
                      TrafficClass.CHECKPOINT, regions)
            if t is not None:
                moved.append(t)
        checkpoints.append(CheckpointPlan(wl.id, source, tuple(targets), size, ck.every_hours,
                                          ck.retain, tuple(moved)))

    window = topo.sync_window
    volume: dict[tuple[str, str], list[float]] = {}
    for t in [*transfers, *(m for c in checkpoints for m in c.transfers)]:
        for a, b in zip(t.path, t.path[1:], strict=False):
            v = volume.setdefault((a, b), [0.0, 0.0])
            v[0 if t.traffic_class is TrafficClass.SYNC else 1] += t.gb_per_day
    links = []
    for (a, b), (sync_gb, ckpt_gb) in sorted(volume.items()):
        tp = network.link(a, b)
        assert tp is not None  # paths only use existing links
        capacity = tp.effective_gbps * window.bulk_share * window.hours * 3600 / 8
        load = sync_gb + ckpt_gb * window.hours / 24.0
        links.append(LinkLoad(a, b, sync_gb, ckpt_gb, tp.effective_gbps, capacity, load))
    return SyncPlan(tuple(transfers), tuple(checkpoints), tuple(links), window.hours,
                    window.bulk_share, tuple(notes))


def _checkpoint_regions(topo: Topology, dataset_ids: Sequence[str]) -> frozenset[str] | None:
    regions: frozenset[str] | None = None
    for d in dataset_ids:
        ds = topo.dataset(d)
        if ds.residency:
            regions = (frozenset(ds.residency) if regions is None
                       else regions & frozenset(ds.residency))
    return regions
