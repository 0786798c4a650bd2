"""Tiered sync rules (Rucio-style) and checkpoint replication: what moves where every day, and
whether each link can carry it.

Theory of operation. Each `sync_rules[]` entry selects datasets (by tier or id) and resolves its
destinations: `consumers` = every site running a workload that reads the dataset (from the
placement decisions), `residency_gpu_sites` = sites with GPUs inside the dataset's residency
regions (its own region when unrestricted), or an explicit list. Residency always filters the
destinations and the relay hops. When source + destinations span fewer than `copies_min`
failure domains, the allowed sites in new domains that cost least per day are added (the daily
volume at the least $/GB within the relay limit, plus storing the copy there).
Raw-tier data never leaves its site: a rule that would move it is a `PlanError` (the loader
already rejects such rules with their YAML line).
Each transfer takes the route `netplan.routes` chooses for its daily volume with the sync window
as its deadline and the bulk share of each link (the cheapest path that fits, 5 % ties to the
earlier finish; split over several paths when no single one fits or splitting is cheaper); every
hop of every leg carries its share of size_gb * change_fraction_per_day in the `sync` class, and
the copy at the destination costs its storage every day (size x the site's $/GB-month).
Every vector-index shard replica away from its primary (the shard solver's
placement) receives update_gb_per_day / shards per day in the `sync` class too. Checkpoints add
size_gb * 24 / every_hours per target in the `checkpoint` class, routed so one checkpoint
reaches each target before the next is written (at the bulk share), and `retain` copies held
there.
Per link direction, the capacity is effective_gbps * bulk_share * window_hours (the sync window);
the load is the sync volume plus the checkpoint volume that falls inside the window
(window_hours / 24 of the day's). A link whose load exceeds its capacity is flagged with the
shortfall in GB. Flagged links, unreachable destinations and copies_min shortfalls are the sync
plan's `problems` (`netplan analyze --strict` exits 1 on them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netplan._sections import SyncRule
from netplan._shards import DAYS_PER_MONTH, ShardReplication
from netplan.errors import Infeasible, PlanError
from netplan.network import Network
from netplan.plan import TrafficClass
from netplan.routes import Route, SplitFailure, candidates, choose_route, route_for
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
    route: Route
    gb_per_day: float
    traffic_class: TrafficClass
    shard: int | None = None  # set for a vector-index shard replica (`dataset` is the index)
    storage_usd_per_day: float = 0.0  # the copy at the destination (shards: in their own cost)
    fits: bool = True  # the route meets its deadline (the window, or the checkpoint cadence)

    @property
    def path(self) -> tuple[str, ...]:
        """The path of the leg carrying the largest share."""
        return self.route.path

    @property
    def egress_usd_per_day(self) -> float:
        return self.route.egress_usd

    @property
    def relay_usd_per_day(self) -> float:
        return self.route.relay_usd

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule, "dataset": self.dataset, "source": self.source,
            "destination": self.destination, "path": list(self.path),
            "routes": [{"path": list(leg.path.sites), "share": round(leg.share, 6),
                        "rate_gbps": round(leg.rate_gbps, 6)} for leg in self.route.legs],
            "gb_per_day": round(self.gb_per_day, 6), "class": self.traffic_class.value,
            "hours": round(self.route.seconds / 3600, 6), "fits": self.fits,
            "why": self.route.why,
            "cost_per_day": {"egress_usd": round(self.egress_usd_per_day, 6),
                             "relay_usd": round(self.relay_usd_per_day, 6),
                             "storage_usd": round(self.storage_usd_per_day, 6),
                             "total_usd": round(self.egress_usd_per_day
                                                + self.relay_usd_per_day
                                                + self.storage_usd_per_day, 6)}}
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
    # rules that could not reach copies_min, unreachable destinations, transfers that miss
    # their window, checkpoint runs without a placement: each also an `Infeasible` in `issues`
    notes: tuple[str, ...]
    issues: tuple[Infeasible, ...] = ()

    def all_transfers(self) -> tuple[SyncTransfer, ...]:
        return (*self.transfers, *(m for c in self.checkpoints for m in c.transfers))

    @property
    def problems(self) -> tuple[Infeasible, ...]:
        """What makes this sync plan infeasible: every issue (an unreachable destination, a
        copies_min shortfall, a transfer that misses its window) and every flagged link."""
        flagged = [Infeasible(f"{x.sender} -> {x.receiver}", [
            f"carries {x.load_gb:,.0f} GB in the {self.window_hours:g} h window at "
            f"{self.bulk_share:.0%} bulk share, which holds {x.capacity_gb:,.0f} GB"],
            kind="sync link") for x in self.links if x.flagged]
        return (*self.issues, *flagged)

    def cost_per_day(self) -> dict[str, float]:
        moved = self.all_transfers()
        egress = sum(t.egress_usd_per_day for t in moved)
        relay = sum(t.relay_usd_per_day for t in moved)
        storage = sum(t.storage_usd_per_day for t in moved)
        return {"egress_usd": round(egress, 6), "relay_usd": round(relay, 6),
                "storage_usd": round(storage, 6), "total_usd": round(egress + relay + storage, 6)}

    def to_json(self) -> dict[str, Any]:
        return {
            "window_hours": self.window_hours,
            "bulk_share": self.bulk_share,
            "cost_per_day": self.cost_per_day(),
            "problems": [str(p) for p in self.problems],
            "transfers": [t.to_json() for t in self.transfers],
            "checkpoints": [{"workload": c.workload, "source": c.source,
                             "targets": list(c.targets), "size_gb": c.size_gb,
                             "every_hours": c.every_hours, "retain": c.retain,
                             "transfers": [t.to_json() for t in c.transfers]}
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
                 copies_min: int, regions: frozenset[str] | None, gb_per_day: float,
                 held_gb: float) -> tuple[list[str], int]:
    """Extend `targets` with sites in new failure domains, cheapest first per day: the daily
    volume at the least $/GB within the relay limit plus storing `held_gb` there."""
    domain = {s.id: s.failure_domain for s in topo.sites}
    have = {domain[source], *(domain[t] for t in targets)}
    if len(have) >= copies_min:
        return targets, len(have)
    usd = network.min_usd_per_gb_from(source, regions)
    allowed = regions
    spare = sorted(
        (gb_per_day * float(usd[i]) + held_gb * site.storage_price / DAYS_PER_MONTH, i, site.id)
        for i, site in enumerate(topo.sites)
        if site.id != source and site.id not in targets and math.isfinite(usd[i])
        and (allowed is None or site.region in allowed)
    )
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
    issues: list[Infeasible] = []
    window = topo.sync_window

    def problem(kind: str, subject: str, text: str) -> None:
        notes.append(f"{kind} {subject}: {text}")
        issues.append(Infeasible(subject, [text], kind=kind))
    sites = topo.site_by_id

    def route(rule: str, artifact: str, source: str, dest: str, gb: float,
              cls: TrafficClass, regions: frozenset[str] | None, *, deadline_h: float,
              move_gb: float, held_gb: float, shard: int | None = None) -> SyncTransfer | None:
        """Route `move_gb` (one day's sync, or one checkpoint) within `deadline_h` at the bulk
        share; the daily volume `gb` then follows the route's legs."""
        chosen = choose_route(network, source, dest, move_gb, regions,
                              deadline_s=deadline_h * 3600, rate_scale=window.bulk_share)
        if chosen is None:
            where = f" inside regions [{', '.join(sorted(regions))}]" if regions else ""
            problem("sync rule", rule, f"no path from {source} to {dest} within "
                    f"{network.max_relays} relays{where} for {artifact}")
            return None
        fits = not isinstance(chosen, SplitFailure)
        if isinstance(chosen, SplitFailure):
            cands = candidates(network, source, dest, move_gb, regions, window.bulk_share)
            fastest = max(cands, key=lambda c: c.path.bottleneck_gbps)
            chosen = route_for(fastest, move_gb, source, dest, window.bulk_share)
            problem("sync rule", rule, f"{artifact} from {source} to {dest} cannot move "
                    f"{move_gb:,.1f} GB in {deadline_h:g} h at the {window.bulk_share:.0%} "
                    f"bulk share (fastest path: {chosen.seconds / 3600:,.1f} h)")
        scale = gb / move_gb if move_gb > 0 else 0.0
        daily = Route(chosen.source, chosen.target, gb, chosen.legs, chosen.seconds,
                      chosen.egress_usd * scale, chosen.relay_usd * scale, chosen.why,
                      chosen.alternatives, chosen.solver)
        storage = held_gb * sites[dest].storage_price / DAYS_PER_MONTH
        return SyncTransfer(rule, artifact, source, dest, daily, gb, cls, shard, storage, fits)

    for rule in topo.sync_rules:
        for ds in _selected(topo, rule):
            regions = _regions(ds)
            gb = ds.size_gb * rule.change_fraction_per_day
            dests = _destinations(topo, rule, ds, workload_sites)
            dests, domains = _add_domains(topo, network, ds.site, dests, rule.copies_min,
                                          regions, gb, ds.size_gb)
            if domains < rule.copies_min:
                problem("sync rule", rule.id, f"dataset {ds.id} reaches only {domains} "
                        f"failure domain(s) of copies_min {rule.copies_min}")
            for dest in dests:
                t = route(rule.id, ds.id, ds.site, dest, gb, TrafficClass.SYNC, regions,
                          deadline_h=window.hours, move_gb=gb, held_gb=ds.size_gb)
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
                # (the replica's storage is in the shard placement's own cost)
                t = route(f"shards:{ix.id}", ix.id, ix.site, dest, per_shard, TrafficClass.SYNC,
                          None, deadline_h=window.hours, move_gb=per_shard, held_gb=0.0,
                          shard=placement.shard)
                if t is not None:
                    transfers.append(t)

    checkpoints: list[CheckpointPlan] = []
    workloads = {w.id: w for w in topo.workloads}
    for ck in topo.checkpoint_replication:
        wl = workloads[ck.workload]
        size = ck.size_gb if ck.size_gb is not None else topo.model(wl.model or "").size_gb
        runs_at = list(workload_sites.get(wl.id, ()))
        if not runs_at:
            problem("checkpoint replication", wl.id, "the workload has no feasible placement")
            continue
        source = runs_at[0]
        # A checkpoint may carry the training data's residency: keep it where every dataset
        # it was trained on may be.
        regions = _checkpoint_regions(topo, wl.datasets)
        daily = size * 24.0 / ck.every_hours
        targets, domains = _add_domains(topo, network, source,
                                        [t for t in ck.to if t != source], ck.copies_min,
                                        regions, daily, size * ck.retain)
        if domains < ck.copies_min:
            problem("checkpoint replication", wl.id, f"only {domains} failure domain(s) of "
                    f"copies_min {ck.copies_min}")
        moved = []
        for dest in targets:
            t = route(f"checkpoints:{wl.id}", wl.id, source, dest, daily,
                      TrafficClass.CHECKPOINT, regions, deadline_h=ck.every_hours,
                      move_gb=size, held_gb=size * ck.retain)
            if t is not None:
                moved.append(t)
        checkpoints.append(CheckpointPlan(wl.id, source, tuple(targets), size, ck.every_hours,
                                          ck.retain, tuple(moved)))

    volume: dict[tuple[str, str], list[float]] = {}
    for t in [*transfers, *(m for c in checkpoints for m in c.transfers)]:
        for leg in t.route.legs:
            hops = leg.path.sites
            for a, b in zip(hops, hops[1:], strict=False):
                v = volume.setdefault((a, b), [0.0, 0.0])
                v[0 if t.traffic_class is TrafficClass.SYNC else 1] += t.gb_per_day * leg.share
    links = []
    for (a, b), (sync_gb, ckpt_gb) in sorted(volume.items()):
        tp = network.link(a, b)
        assert tp is not None  # paths only use existing links
        capacity = tp.effective_gbps * window.bulk_share * window.hours * 3600 / 8
        load = sync_gb + ckpt_gb * window.hours / 24.0
        links.append(LinkLoad(a, b, sync_gb, ckpt_gb, tp.effective_gbps, capacity, load))
    return SyncPlan(tuple(transfers), tuple(checkpoints), tuple(links), window.hours,
                    window.bulk_share, tuple(notes), tuple(issues))


def _checkpoint_regions(topo: Topology, dataset_ids: Sequence[str]) -> frozenset[str] | None:
    regions: frozenset[str] | None = None
    for d in dataset_ids:
        ds = topo.dataset(d)
        if ds.residency:
            regions = (frozenset(ds.residency) if regions is None
                       else regions & frozenset(ds.residency))
    return regions
