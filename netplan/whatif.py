"""What if a site or link fails, a link degrades, prices move or GPUs get scarce: every
workload's decision before and after, what becomes infeasible and why, inference clients after
failover, vector-index shards and sync rules that no longer hold, where a failed training run
should resume, and across many scenarios the ones that hurt most and the single points of
failure.

Theory of operation.
- Baseline. `analyze()` of the topology, plus per decision its footprint: the sites and link
  directions whose change can alter it. For a feasible training-style decision: its site, the
  sites holding its data and model, and every candidate path (`Network.paths`, the Pareto set
  the route choice draws from) of every movement of the chosen option and of the cheapest
  feasible option. Why that suffices when a scenario only makes things worse (failures, less
  bandwidth, more loss, higher prices, fewer GPUs): every other option can only get dearer,
  slower or infeasible, so the cheapest total stays where it was, the 5 % tie band keeps its
  bound, and the chosen option keeps its cost and finish time while its rivals only lose ground;
  the route and GPU-count choices inside an option draw only on those candidate paths. For
  inference: the replica sites, the clients, the shipped model's candidate paths and each
  client's request path to every replica (a replica's coverage depends on them). An infeasible
  decision can only change when a client or the site holding its data fails (a client gone, an
  artifact served from a copy). The sync plan and the shard placement get footprints the same
  way (every transfer's legs, ends and candidate paths; replicas, querying sites, their request
  paths and the update paths).
- A scenario re-plans the workloads whose footprint it reaches (`netplan.scenarios.touch`); the
  rest keep their baseline decision without being evaluated. A scenario that makes anything
  better (a price cut, more GPUs, more bandwidth, less loss) re-plans everything. A scenario
  that reaches nothing is answered without building its network (`Baseline.needs_work`).
  `tests/netplan/test_whatif.py` holds the incremental answers to a full re-analysis.
- Failed sites lose what only they held; an artifact the plan keeps elsewhere (a sync-rule
  destination's copy, an inference replica's model) is served from its best-connected
  surviving copy (`netplan.scenarios.apply_scenario`).
- Inference failover: each surviving client goes to its nearest surviving replica, on the
  changed network; its p99 (request components included when declared) against the budget.
- Training failover, for a pretraining or fine-tuning run whose site fails or loses the GPUs it
  needs, `failure_at` of the way through its compute: every surviving site that could run it,
  ranked by what it already holds. The newest checkpoint a site can start from is the one the
  `checkpoint_replication` targets hold; at worst it is `every_hours` + the time one checkpoint
  takes to reach that target old (RPO, the work lost). Restoring (RTO) moves the checkpoint (or,
  with none left, the model: the run restarts) and every dataset the site lacks from the nearest
  surviving holder, each on its fastest path, one after another. Then the lost and the remaining
  work run at the site's GPU count. Ranked: those meeting the deadline first, by the planner's
  rule (least cost to finish, 5 % ties to the earlier finish), then the rest by finish time.
  When no site meets the deadline with the checkpoints as replicated (or the best one loses
  more than `rpo_hours`), the cheapest site that would meet it with a fresher checkpoint is
  recommended with a cadence: every E <= R - r, where R is the most work the deadline (or
  `rpo_hours`) lets the run lose there and r the time one checkpoint takes to reach it.
- Harm, for ranking scenarios: workloads lost (feasible before, infeasible after), then budget
  misses (inference clients over budget after failover, querying sites over an index's budget,
  failed runs that cannot meet their deadline anywhere), then the cost delta (the re-planned
  workloads' totals plus 30 days of the sync plan's daily change). A single point of
  failure is a site or link whose loss alone loses a workload or a vector index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from netplan._sections import PathPolicy
from netplan._shards import ShardReplication, shard_replication
from netplan._sync import SyncPlan, plan_sync
from netplan.decisions import COST_TIE_FRACTION, HOURS_PER_MONTH, Decision, duration, money
from netplan.errors import NetplanError
from netplan.gravity import decide_gravity
from netplan.network import Network
from netplan.placement import client_latencies, decide_placement
from netplan.report import Report, analyze, workload_sites
from netplan.routes import Candidate, candidates
from netplan.scenarios import (
    AppliedScenario,
    Direction,
    ElementIndex,
    Scenario,
    apply_scenario,
    touch,
)
from netplan.topology import Site, Topology, TransferSettings, Workload

__all__ = [
    "WHATIF_SCHEMA_VERSION",
    "Baseline",
    "ClientImpact",
    "DecisionSummary",
    "Footprint",
    "InferenceFailover",
    "ScenarioResult",
    "ShardImpact",
    "SinglePointOfFailure",
    "Standby",
    "TrainingFailover",
    "WhatifOptions",
    "WhatifResult",
    "WorkloadChange",
    "build_baseline",
    "evaluate",
    "summarize_sweep",
]

# 1: the first version (see `WhatifResult.to_json` and netplan.whatif_schema).
WHATIF_SCHEMA_VERSION = 1

TRAINING_KINDS = ("pretraining", "fine_tuning")
_STANDBYS_KEPT = 10  # standby sites kept per failed run (the best first); the count says the rest


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)


@dataclass(frozen=True)
class WhatifOptions:
    """`failure_at`: how far through its compute a training run is when its site fails
    (0.5: half way); `incremental` False re-plans every workload in every scenario."""

    failure_at: float = 0.5
    incremental: bool = True


# -- decisions, compared ----------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionSummary:
    """What a user compares between before and after: where, how, what it costs, when done."""

    workload: str
    kind: str
    feasible: bool
    action: str
    sites: tuple[str, ...]
    gpus: int | None
    path: tuple[str, ...]
    total_usd: float | None
    completion_hours: float | None
    reason: str
    worst_client: str | None = None
    worst_p99_ms: float | None = None

    @classmethod
    def of(cls, d: Decision) -> DecisionSummary:
        o = d.option
        worst = o.worst_client if o is not None else None
        return cls(d.workload, d.kind, d.feasible, d.action, o.sites if o else (),
                   o.gpus if o else None, o.path if o else (), o.total_usd if o else None,
                   o.completion_hours if o else None, d.reason,
                   worst.client if worst else None, worst.p99_ms if worst else None)

    @classmethod
    def gone(cls, workload: Workload, reason: str) -> DecisionSummary:
        return cls(workload.id, workload.kind, False, "none", (), None, (), None, None, reason)

    def same_plan(self, other: DecisionSummary) -> bool:
        """Same outcome (the reason's wording aside)."""
        return (self.feasible, self.action, self.sites, self.gpus, self.path,
                _r(self.total_usd), _r(self.completion_hours)) == (
            other.feasible, other.action, other.sites, other.gpus, other.path,
            _r(other.total_usd), _r(other.completion_hours))

    def where(self) -> str:
        return f"{self.action} at {', '.join(self.sites)}" if self.sites else self.action

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "kind": self.kind, "feasible": self.feasible,
                "action": self.action, "sites": list(self.sites), "gpus": self.gpus,
                "path": list(self.path), "total_usd": _r(self.total_usd),
                "completion_hours": _r(self.completion_hours), "reason": self.reason,
                "worst_client": self.worst_client, "worst_p99_ms": _r(self.worst_p99_ms)}


@dataclass(frozen=True)
class WorkloadChange:
    """A workload whose decision a scenario changed. `status`: `changed` (another plan),
    `lost` (was feasible, is not), `recovered` (was infeasible, is feasible), `still
    infeasible`, or `not needed` (every client site failed)."""

    before: DecisionSummary
    after: DecisionSummary
    status: str

    @property
    def workload(self) -> str:
        return self.before.workload

    @property
    def cost_delta_usd(self) -> float:
        if self.before.total_usd is None or self.after.total_usd is None:
            return 0.0
        return self.after.total_usd - self.before.total_usd

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "status": self.status,
                "before": self.before.to_json(), "after": self.after.to_json(),
                "cost_delta_usd": _r(self.cost_delta_usd)}


# -- footprints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    sites: frozenset[str]
    directions: frozenset[Direction]


class _Reach:
    def __init__(self) -> None:
        self.sites: set[str] = set()
        self.directions: set[Direction] = set()

    def path(self, sites: Sequence[str]) -> None:
        self.sites.update(sites)
        self.directions.update(zip(sites, sites[1:], strict=False))

    def freeze(self) -> Footprint:
        return Footprint(frozenset(self.sites), frozenset(self.directions))


def _regions_of(topology: Topology, kind: str, ident: str) -> frozenset[str] | None:
    if kind != "dataset":
        return None
    ds = topology.dataset(ident)
    return frozenset(ds.residency) if ds.residency else None


def _anchors(topology: Topology, workload: Workload) -> set[str]:
    out = {topology.dataset(d).site for d in workload.datasets}
    if workload.model:
        out.add(topology.model(workload.model).site)
    return out


def _decision_footprint(topology: Topology, network: Network, workload: Workload,
                        decision: Decision) -> Footprint:
    reach = _Reach()
    reach.sites.update(_anchors(topology, workload))
    reach.sites.update(workload.clients)
    chosen = decision.option
    if chosen is None:
        return reach.freeze()
    options = [chosen]
    rivals = [o for o in decision.alternatives if o.feasible]
    if rivals and decision.kind != "inference":
        cheapest = min(rivals, key=lambda o: o.total_usd)
        if cheapest.total_usd < chosen.total_usd:
            options.append(cheapest)
    for option in options:
        reach.sites.update(option.sites)
        for m in option.movements:
            for p in network.paths(m.source, m.target, _regions_of(topology, m.kind, m.id)):
                reach.path(p.sites)
            for leg in m.route.legs:
                reach.path(leg.path.sites)
    for client in workload.clients:
        for site in chosen.sites:
            lp = network.latency_path(client, site)
            if lp is not None:
                reach.path(lp.sites)
    return reach.freeze()


def _sync_footprint(network: Network, plan: SyncPlan | None) -> Footprint:
    reach = _Reach()
    if plan is None:
        return reach.freeze()
    for c in plan.checkpoints:
        reach.sites.add(c.source)
        reach.sites.update(c.targets)
    for t in plan.all_transfers():
        reach.sites.update((t.source, t.destination))
        for leg in t.route.legs:
            reach.path(leg.path.sites)
        for p in network.paths(t.source, t.destination):
            reach.path(p.sites)
    return reach.freeze()


def _shard_footprint(topology: Topology, network: Network,
                     shards: Sequence[ShardReplication]) -> Footprint:
    reach = _Reach()
    indexes = {ix.id: ix for ix in topology.vector_indexes}
    for r in shards:
        ix = indexes[r.index]
        reach.sites.add(ix.site)
        reach.sites.update(ix.queries)
        holders = {s for p in r.shards for s in p.sites}
        reach.sites.update(holders)
        for site in holders:
            for p in network.paths(ix.site, site):
                reach.path(p.sites)
            for q in ix.queries:
                lp = network.latency_path(q, site)
                if lp is not None:
                    reach.path(lp.sites)
                if ix.response_kb_per_query > 0:
                    for p in network.paths(site, q):
                        reach.path(p.sites)
    return reach.freeze()


# -- the baseline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointState:
    """Where a run's checkpoints are kept: each target with the hours one checkpoint takes to
    reach it (at the bulk share, as replicated)."""

    workload: str
    source: str
    size_gb: float
    every_hours: float
    targets: tuple[tuple[str, float], ...]
    rpo_hours: float | None
    regions: frozenset[str] | None


@dataclass(frozen=True, eq=False)
class Baseline:
    """The topology as planned, with what a scenario needs to re-plan only what it reaches."""

    topology: Topology
    settings: TransferSettings
    paths: PathPolicy
    network: Network
    report: Report
    decision_of: Mapping[str, Decision]
    summaries: Mapping[str, DecisionSummary]
    footprints: Mapping[str, Footprint]
    sync_footprint: Footprint
    shard_footprint: Footprint
    copies: Mapping[str, tuple[str, ...]]  # artifact -> sites keeping a copy (not its own)
    shard_sites: Mapping[str, tuple[tuple[str, ...], ...]]
    checkpoints: Mapping[str, CheckpointState]
    index: ElementIndex
    homes: frozenset[str]  # sites holding a dataset, model or index primary
    by_site: Mapping[str, frozenset[str]]
    by_direction: Mapping[Direction, frozenset[str]]

    @property
    def decisions(self) -> tuple[DecisionSummary, ...]:
        return tuple(self.summaries[w.id] for w in self.topology.workloads)

    def reached(self, scenario: Scenario) -> tuple[set[str], bool, bool]:
        """(workloads whose footprint the scenario reaches, sync reached, shards reached)."""
        reach = touch(self.topology, scenario, self.index)
        if not reach.worsens:
            return {w.id for w in self.topology.workloads}, True, True
        hit: set[str] = set()
        for s in reach.sites:
            hit.update(self.by_site.get(s, ()))
        for d in reach.directions:
            hit.update(self.by_direction.get(d, ()))
        sync = reach.reaches(self.sync_footprint.sites, self.sync_footprint.directions)
        shards = reach.reaches(self.shard_footprint.sites, self.shard_footprint.directions)
        return hit, sync, shards

    def needs_work(self, scenario: Scenario, options: WhatifOptions = WhatifOptions()) -> bool:
        """False when the scenario provably changes nothing (answer: `unchanged`)."""
        if not options.incremental:
            return True
        hit, sync, shards = self.reached(scenario)
        reach = touch(self.topology, scenario, self.index)
        return bool(hit or sync or shards or not reach.failed_sites.isdisjoint(self.homes))

    def unchanged(self, scenario: Scenario) -> ScenarioResult:
        return ScenarioResult(scenario, replanned=(), skipped=len(self.topology.workloads),
                              evaluated=False)


def build_baseline(topology: Topology, settings: TransferSettings | None = None,
                   paths: PathPolicy | None = None) -> Baseline:
    """Analyze `topology` and index every decision's footprint."""
    report = analyze(topology, settings, paths)
    network = Network(topology, report.settings, report.paths)
    workloads = {w.id: w for w in topology.workloads}
    footprints = {d.workload: _decision_footprint(topology, network, workloads[d.workload], d)
                  for d in report.decisions}
    by_site: dict[str, set[str]] = {}
    by_direction: dict[Direction, set[str]] = {}
    for wid, fp in footprints.items():
        for s in fp.sites:
            by_site.setdefault(s, set()).add(wid)
        for d in fp.directions:
            by_direction.setdefault(d, set()).add(wid)
    copies: dict[str, list[str]] = {}
    if report.sync_plan is not None:
        for t in report.sync_plan.transfers:
            if t.shard is None and t.destination not in copies.setdefault(t.dataset, []):
                copies[t.dataset].append(t.destination)
    for decided in report.decisions:
        wl = workloads[decided.workload]
        if decided.kind == "inference" and decided.option is not None and wl.model:
            held = copies.setdefault(wl.model, [])
            held += [s for s in decided.option.sites if s not in held]
    checkpoints: dict[str, CheckpointState] = {}
    declared = {c.workload: c for c in topology.checkpoint_replication}
    if report.sync_plan is not None:
        for c in report.sync_plan.checkpoints:
            hours = {t.destination: t.route.seconds / 3600 for t in c.transfers}
            regions = None
            for ds_id in workloads[c.workload].datasets:
                ds = topology.dataset(ds_id)
                if ds.residency:
                    regions = (frozenset(ds.residency) if regions is None
                               else regions & frozenset(ds.residency))
            checkpoints[c.workload] = CheckpointState(
                c.workload, c.source, c.size_gb, c.every_hours,
                tuple((t, hours[t]) for t in c.targets if t in hours),
                declared[c.workload].rpo_hours, regions)
    homes = ({d.site for d in topology.datasets} | {m.site for m in topology.models}
             | {ix.site for ix in topology.vector_indexes})
    return Baseline(
        topology=topology, settings=report.settings, paths=report.paths, network=network,
        report=report, decision_of={d.workload: d for d in report.decisions},
        summaries={d.workload: DecisionSummary.of(d) for d in report.decisions},
        footprints=footprints,
        sync_footprint=_sync_footprint(network, report.sync_plan),
        shard_footprint=_shard_footprint(topology, network, report.shard_replication),
        copies={k: tuple(v) for k, v in copies.items()},
        shard_sites={r.index: tuple(p.sites for p in r.shards)
                     for r in report.shard_replication if r.feasible},
        checkpoints=checkpoints, index=ElementIndex(topology), homes=frozenset(homes),
        by_site={k: frozenset(v) for k, v in by_site.items()},
        by_direction={k: frozenset(v) for k, v in by_direction.items()})


# -- scenario results -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientImpact:
    client: str
    site: str | None  # the surviving replica serving it (None: none reachable)
    p99_ms: float | None
    budget_ms: float

    @property
    def misses(self) -> bool:
        return self.p99_ms is None or self.p99_ms > self.budget_ms + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "site": self.site, "p99_ms": _r(self.p99_ms),
                "budget_ms": self.budget_ms, "misses": self.misses}


@dataclass(frozen=True)
class InferenceFailover:
    """Clients of an inference workload served by the replicas that survive, before any
    re-planning."""

    workload: str
    replicas_before: tuple[str, ...]
    replicas_left: tuple[str, ...]
    clients: tuple[ClientImpact, ...]

    @property
    def misses(self) -> tuple[ClientImpact, ...]:
        return tuple(c for c in self.clients if c.misses)

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "replicas_before": list(self.replicas_before),
                "replicas_left": list(self.replicas_left),
                "clients": [c.to_json() for c in self.clients],
                "budget_misses": len(self.misses)}


@dataclass(frozen=True)
class Standby:
    """One site a failed run could resume at, and what that takes."""

    site: str
    feasible: bool
    gpus: int
    checkpoint_from: str | None  # the site the newest checkpoint comes from (None: restart)
    lost_hours: float  # work lost (RPO, worst case)
    restore_hours: float  # moving the checkpoint or model and the missing data (RTO)
    restore_gb: float
    compute_hours: float  # the lost and the remaining work, at `gpus`
    cost_usd: float  # to finish: compute + egress + relays + storage of what was restored
    finish_hours: float  # from the failure: restore + compute
    meets_deadline: bool
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "feasible": self.feasible, "gpus": self.gpus,
                "checkpoint_from": self.checkpoint_from, "rpo_hours": _r(self.lost_hours),
                "rto_hours": _r(self.restore_hours), "restore_gb": _r(self.restore_gb),
                "compute_hours": _r(self.compute_hours), "cost_usd": _r(self.cost_usd),
                "finish_hours": _r(self.finish_hours), "meets_deadline": self.meets_deadline,
                "why": self.why}


@dataclass(frozen=True)
class TrainingFailover:
    """Where a run whose site failed (or lost its GPUs) should resume."""

    workload: str
    failed_site: str
    progress_hours: float  # compute done when the site failed
    elapsed_hours: float  # since the job started (transfers included)
    deadline_hours: float | None
    standbys: tuple[Standby, ...]  # ranked, the best `_STANDBYS_KEPT`
    standbys_considered: int
    recommendation: str | None = None
    rpo_target_hours: float | None = None

    @property
    def best(self) -> Standby | None:
        return self.standbys[0] if self.standbys and self.standbys[0].feasible else None

    @property
    def misses_deadline(self) -> bool:
        best = self.best
        return best is None or not best.meets_deadline

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "failed_site": self.failed_site,
                "progress_hours": _r(self.progress_hours),
                "elapsed_hours": _r(self.elapsed_hours),
                "deadline_hours": self.deadline_hours,
                "resume_at": self.best.site if self.best else None,
                "standbys": [s.to_json() for s in self.standbys],
                "standbys_considered": self.standbys_considered,
                "rpo_target_hours": _r(self.rpo_target_hours),
                "recommendation": self.recommendation}


@dataclass(frozen=True)
class ShardImpact:
    """A vector index after the scenario: its current placement's survivors, and whether a
    new placement exists."""

    index: str
    below_replicas_min: tuple[int, ...]  # shards left in fewer failure domains than required
    lost_shards: tuple[int, ...]  # shards with no replica left
    querying_misses: tuple[str, ...]  # "site: shard k at X ms p99 of B"
    replanned_feasible: bool
    replanned_reason: str
    cost_delta_usd_per_day: float | None

    @property
    def budget_misses(self) -> int:
        return len(self.querying_misses)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "below_replicas_min": list(self.below_replicas_min),
                "lost_shards": list(self.lost_shards),
                "querying_misses": list(self.querying_misses),
                "replanned_feasible": self.replanned_feasible,
                "replanned_reason": self.replanned_reason,
                "cost_delta_usd_per_day": _r(self.cost_delta_usd_per_day)}


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    replanned: tuple[str, ...]  # workloads evaluated again
    skipped: int  # workloads whose footprint the scenario does not reach
    changes: tuple[WorkloadChange, ...] = ()
    inference: tuple[InferenceFailover, ...] = ()
    failovers: tuple[TrainingFailover, ...] = ()
    shards: tuple[ShardImpact, ...] = ()
    sync_problems: tuple[str, ...] = ()  # new since the baseline
    sync_cost_delta_usd_per_day: float = 0.0
    lost: tuple[tuple[str, str], ...] = ()  # (artifact, why)
    rehomed: tuple[tuple[str, str, str], ...] = ()  # (artifact, from, to)
    notes: tuple[str, ...] = ()
    error: str | None = None
    evaluated: bool = True  # False: answered from the baseline without building a network

    @property
    def workloads_lost(self) -> tuple[str, ...]:
        return tuple(c.workload for c in self.changes if c.status == "lost")

    @property
    def indexes_lost(self) -> tuple[str, ...]:
        return tuple(s.index for s in self.shards if not s.replanned_feasible)

    @property
    def budget_misses(self) -> int:
        return (sum(len(f.misses) for f in self.inference)
                + sum(s.budget_misses for s in self.shards)
                + sum(1 for f in self.failovers if f.misses_deadline))

    def same_outcome(self, other: ScenarioResult) -> bool:
        """The same answers (decisions compared as `DecisionSummary.same_plan`): what an
        incremental and a full re-analysis of one scenario must agree on."""
        ours = {c.workload: c.after for c in self.changes}
        theirs = {c.workload: c.after for c in other.changes}
        return (ours.keys() == theirs.keys()
                and all(ours[w].same_plan(theirs[w]) for w in ours)
                and (self.sync_problems, self.shards, self.inference, self.failovers, self.lost)
                == (other.sync_problems, other.shards, other.inference, other.failovers,
                    other.lost))

    def budget_miss_texts(self) -> tuple[str, ...]:
        """Each budget miss in words (what `budget_misses` counts)."""
        out = [f"{f.workload}: {c.client} " + (f"at {c.p99_ms:.1f} ms p99 of {c.budget_ms:g}"
                                               if c.p99_ms is not None else "unreachable")
               for f in self.inference for c in f.misses]
        out += [f"{s.index}: {m}" for s in self.shards for m in s.querying_misses]
        out += [f"{f.workload}: " + (f"resumes at {f.best.site} but misses its deadline"
                                     if f.best else "nowhere to resume")
                for f in self.failovers if f.misses_deadline]
        return tuple(out)

    @property
    def cost_delta_usd(self) -> float:
        return sum(c.cost_delta_usd for c in self.changes)

    @property
    def harm(self) -> tuple[int, int, float]:
        """Sort key, larger is worse."""
        return (len(self.workloads_lost) + len(self.indexes_lost), self.budget_misses,
                self.cost_delta_usd + 30 * self.sync_cost_delta_usd_per_day)

    @property
    def has_effect(self) -> bool:
        return bool(self.changes or self.inference or self.failovers or self.shards
                    or self.sync_problems or self.lost or self.error
                    or abs(self.sync_cost_delta_usd_per_day) > 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.scenario.to_json(),
            "evaluated": self.evaluated,
            "replanned_workloads": list(self.replanned),
            "skipped_workloads": self.skipped,
            "workloads_lost": list(self.workloads_lost),
            "indexes_lost": list(self.indexes_lost),
            "budget_misses": self.budget_misses,
            "cost_delta_usd": _r(self.cost_delta_usd),
            "sync_cost_delta_usd_per_day": _r(self.sync_cost_delta_usd_per_day),
            "workload_changes": [c.to_json() for c in self.changes],
            "inference_failover": [f.to_json() for f in self.inference],
            "training_failover": [f.to_json() for f in self.failovers],
            "vector_indexes": [s.to_json() for s in self.shards],
            "sync_problems": list(self.sync_problems),
            "lost": [{"id": a, "why": why} for a, why in self.lost],
            "rehomed": [{"id": a, "from": f, "to": t} for a, f, t in self.rehomed],
            "notes": list(self.notes),
            "error": self.error,
        }


# -- evaluating one scenario ------------------------------------------------------------------


def _status(before: DecisionSummary, after: DecisionSummary) -> str:
    if before.feasible and not after.feasible:
        return "lost"
    if not before.feasible and after.feasible:
        return "recovered"
    if not before.feasible:
        return "still infeasible"
    return "changed"


def _decide(topology: Topology, network: Network, workload: Workload) -> Decision:
    if workload.kind == "inference":
        return decide_placement(topology, network, workload)
    return decide_gravity(topology, network, workload)


def evaluate(baseline: Baseline, scenario: Scenario,
             options: WhatifOptions = WhatifOptions()) -> ScenarioResult:
    """The outcome of one scenario (pure; `NetplanError`s become the result's `error`)."""
    try:
        return _evaluate(baseline, scenario, options)
    except NetplanError as exc:
        return ScenarioResult(scenario, (), len(baseline.topology.workloads),
                              error=f"{type(exc).__name__}: {exc}")


def _evaluate(baseline: Baseline, scenario: Scenario, options: WhatifOptions
              ) -> ScenarioResult:
    if not baseline.needs_work(scenario, options):
        return baseline.unchanged(scenario)
    topo0 = baseline.topology
    applied = apply_scenario(topo0, scenario, baseline.copies, baseline.shard_sites,
                             baseline.index)
    if options.incremental:
        hit, sync_hit, shards_hit = baseline.reached(scenario)
    else:
        hit, sync_hit, shards_hit = {w.id for w in topo0.workloads}, True, True
    topo = applied.topology
    network = Network(topo, baseline.settings, baseline.paths, reuse=baseline.network)
    present = {w.id: w for w in topo.workloads}
    replanned = [w.id for w in topo0.workloads if w.id in hit or w.id in applied.dropped]
    changes: list[WorkloadChange] = []
    after: dict[str, Decision] = {}
    for w in topo0.workloads:
        if w.id not in replanned:
            continue
        before = baseline.summaries[w.id]
        if w.id in applied.dropped:
            reason = applied.dropped[w.id]
            summary = DecisionSummary.gone(w, reason)
            status = ("not needed" if reason.startswith("every client")
                      else "lost" if before.feasible else "still infeasible")
            changes.append(WorkloadChange(before, summary, status))
            continue
        decision = _decide(topo, network, present[w.id])
        after[w.id] = decision
        summary = DecisionSummary.of(decision)
        if not summary.same_plan(before):
            changes.append(WorkloadChange(before, summary, _status(before, summary)))

    inference = tuple(
        f for w in topo0.workloads
        if w.id in hit and w.kind == "inference" and w.id in present
        and (f := _inference_failover(baseline, topo, network, present[w.id], applied))
        is not None)
    failovers = tuple(
        t for w in topo0.workloads
        if w.id in hit and w.kind in TRAINING_KINDS and w.id in present
        and (t := _training_failover(baseline, topo, network, present[w.id], applied,
                                     options.failure_at)) is not None)

    before_running = workload_sites(baseline.report.decisions)
    running = {w: sites for w, sites in before_running.items() if w in present}
    for wid, decision in after.items():
        if decision.option is not None and decision.feasible:
            running[wid] = decision.option.sites
        else:
            running.pop(wid, None)
    moved = running != before_running

    shards: tuple[ShardImpact, ...] = ()
    new_shards = baseline.report.shard_replication
    if shards_hit or applied.lost:
        new_shards = shard_replication(topo, network) if topo.vector_indexes else ()
        shards = _shard_impacts(baseline, topo, network, applied, new_shards)
    sync_problems: tuple[str, ...] = ()
    sync_delta = 0.0
    if (sync_hit or moved or applied.lost or shards) and baseline.report.sync_plan is not None:
        plan = plan_sync(topo, network, running, [r for r in new_shards if r.feasible])
        known = {str(p) for p in baseline.report.sync_plan.problems}
        sync_problems = tuple(str(p) for p in plan.problems if str(p) not in known)
        sync_delta = (plan.cost_per_day()["total_usd"]
                      - baseline.report.sync_plan.cost_per_day()["total_usd"])
    return ScenarioResult(
        scenario=scenario, replanned=tuple(replanned),
        skipped=len(topo0.workloads) - len(replanned), changes=tuple(changes),
        inference=inference, failovers=failovers, shards=shards,
        sync_problems=sync_problems, sync_cost_delta_usd_per_day=round(sync_delta, 6),
        lost=tuple(sorted(applied.lost.items())),
        rehomed=tuple((a, f, t) for a, (f, t) in sorted(applied.rehomed.items())),
        notes=applied.notes)


def _inference_failover(baseline: Baseline, topo: Topology, network: Network,
                        workload: Workload, applied: AppliedScenario
                        ) -> InferenceFailover | None:
    before = baseline.summaries[workload.id]
    if not before.feasible or workload.latency_budget_ms is None:
        return None
    dead = applied.reach.failed_sites
    left = tuple(s for s in before.sites if s not in dead)
    lat = client_latencies(network, workload, left, with_paths=False,
                           components=topo.request_components(workload))
    clients = tuple(ClientImpact(c.client, c.site, c.p99_ms, workload.latency_budget_ms)
                    for c in lat)
    if left == before.sites and not any(c.misses for c in clients):
        option = baseline.decision_of[workload.id].option
        old = {c.client: c.p99_ms for c in option.clients} if option else {}
        if all(_r(old.get(c.client)) == _r(c.p99_ms) for c in clients):
            return None
    return InferenceFailover(workload.id, before.sites, left, clients)


# -- training failover ------------------------------------------------------------------------


def _fastest(cands: Sequence[Candidate]) -> Candidate | None:
    """A failover races its deadline: the fastest path, the cheaper of equally fast ones."""
    if not cands:
        return None
    return min(cands, key=lambda c: (c.seconds, c.cost_usd, c.path.hops))


@dataclass(frozen=True)
class _Artifact:
    """Something a standby must hold before the run resumes there."""

    kind: str  # "checkpoint", "model" or "dataset"
    id: str
    size_gb: float
    holders: tuple[str, ...]  # surviving sites with a copy
    regions: frozenset[str] | None  # where it may travel (residency)


@dataclass(frozen=True)
class _Restore:
    seconds: float
    gb: float
    usd: float
    parts: tuple[str, ...]
    problem: str | None = None


def _restore(network: Network, needs: Sequence[_Artifact], site: str) -> _Restore:
    """Move each artifact `site` lacks from its nearest holder, one after another."""
    seconds = gb = usd = 0.0
    parts: list[str] = []
    for need in needs:
        if site in need.holders or need.size_gb <= 0:
            continue
        best: tuple[Candidate, str] | None = None
        for h in need.holders:
            c = _fastest(candidates(network, h, site, need.size_gb, need.regions))
            if c is not None and (best is None or c.seconds < best[0].seconds):
                best = (c, h)
        if best is None:
            return _Restore(seconds, gb, usd, tuple(parts),
                            f"no path brings {need.kind} {need.id} to {site}")
        c, h = best
        seconds += c.seconds
        gb += need.size_gb
        usd += c.cost_usd
        parts.append(f"{need.kind} {need.id} ({need.size_gb:,.0f} GB) from {h} in "
                     f"{duration(c.seconds / 3600)}")
    return _Restore(seconds, gb, usd, tuple(parts))


@dataclass(frozen=True)
class _FailedRun:
    """A training run at the moment its site fails: how far it got, and what survives of
    its checkpoints, model and data."""

    workload: Workload
    home: str
    hours: float  # compute hours at the baseline GPU count
    gpus: int
    progress: float  # compute hours done
    elapsed: float  # hours since the job started (its first transfers included)
    checkpoints: CheckpointState | None
    holders: tuple[tuple[str, float], ...]  # surviving checkpoint targets, hours to reach them
    checkpoint_gb: float
    model: _Artifact | None  # to restart from, when no checkpoint survives
    data: tuple[_Artifact, ...]

    def lost_at(self, target_hours: float) -> float:
        """Work lost resuming from a target a checkpoint takes `target_hours` to reach."""
        if self.checkpoints is None:
            return self.progress
        return min(self.checkpoints.every_hours + target_hours, self.progress)


def _failed_run(baseline: Baseline, topo: Topology, workload: Workload,
                applied: AppliedScenario, failure_at: float) -> _FailedRun | None:
    """The run, if the scenario takes its site or the GPUs it runs on."""
    o0 = baseline.decision_of[workload.id].option
    if o0 is None or not o0.sites:
        return None
    home = o0.sites[0]
    dead = applied.reach.failed_sites
    still = topo.site_by_id.get(home)
    if home not in dead and still is not None and still.gpu_count(workload.gpu) >= o0.gpus:
        return None
    ck = baseline.checkpoints.get(workload.id)
    subset = o0.action == "stage_subset"
    data = []
    for ds_id in workload.datasets:
        ds = topo.dataset(ds_id)
        where = [ds.site, *(s for s in baseline.copies.get(ds_id, ()) if s not in dead)]
        data.append(_Artifact("dataset", ds_id,
                              ds.size_gb * (ds.active_fraction if subset else 1.0),
                              tuple(dict.fromkeys(where)),
                              frozenset(ds.residency) if ds.residency else None))
    model = None
    if workload.model and workload.model in topo.model_by_id:
        m = topo.model(workload.model)
        model = _Artifact("model", m.id, m.size_gb, (m.site,), None)
    progress = failure_at * o0.hours
    return _FailedRun(
        workload=workload, home=home, hours=o0.hours, gpus=o0.gpus, progress=progress,
        elapsed=o0.transfer_seconds / 3600 + progress, checkpoints=ck,
        holders=tuple((t, h) for t, h in (ck.targets if ck else ()) if t not in dead),
        checkpoint_gb=ck.size_gb if ck else (model.size_gb if model else 0.0),
        model=model, data=tuple(data))


def _standby(run: _FailedRun, site: Site, network: Network) -> Standby:
    """What resuming `run` at `site` takes: the checkpoint (or, with none left, the model: a
    restart) from the holder that lets it start soonest, the data it lacks, the work."""
    w = run.workload
    gpus = _run_gpus(w, site.gpu_count(w.gpu), run.gpus)
    scale = w.hours_on(gpus) / w.hours_on(run.gpus)
    regions = run.checkpoints.regions if run.checkpoints else None
    starts: list[tuple[float, float, str | None, _Restore]] = []
    for target, hours in run.holders:
        lost = run.lost_at(hours)
        r = _restore(network, [_Artifact("checkpoint", w.id, run.checkpoint_gb, (target,),
                                         regions)], site.id)
        if r.problem is None:
            starts.append((lost + r.seconds / 3600, lost, target, r))
    if not starts:
        if run.model is None:
            return _infeasible(site.id, gpus, "no checkpoint survives and the model is lost")
        r = _restore(network, [run.model], site.id)
        if r.problem is not None:
            return _infeasible(site.id, gpus, r.problem)
        starts.append((run.progress + r.seconds / 3600, run.progress, None, r))
    _, lost, source, first = min(starts, key=lambda x: (x[0], x[3].usd))
    data = _restore(network, run.data, site.id)
    if data.problem is not None:
        return _infeasible(site.id, gpus, data.problem)
    restore_h = (first.seconds + data.seconds) / 3600
    compute_h = (run.hours - run.progress + lost) * scale
    storage = ((first.gb + data.gb) * site.storage_price
               * (restore_h + compute_h) / HOURS_PER_MONTH)
    cost = compute_h * gpus * site.gpu_hour_usd.get(w.gpu, 0.0) + first.usd + data.usd + storage
    finish = restore_h + compute_h
    meets = w.deadline_hours is None or run.elapsed + finish <= w.deadline_hours + 1e-9
    held = (f"holds the checkpoint ({duration(lost)} of work lost)" if source == site.id
            else f"checkpoint from {source} ({duration(lost)} of work lost)" if source
            else f"no checkpoint left: restarts ({duration(lost)} of work lost)")
    moves = [*first.parts, *data.parts]
    why = held + ("; restores " + ", ".join(moves) if moves else "; nothing to restore")
    return Standby(site.id, True, gpus, source, lost, restore_h, first.gb + data.gb,
                   compute_h, cost, finish, meets, why)


def _run_gpus(workload: Workload, count: int, baseline_gpus: int) -> int:
    if not workload.elastic:
        return baseline_gpus
    most = min(count, workload.gpus_max or count)
    return max(most, workload.min_gpus)


def _training_failover(baseline: Baseline, topo: Topology, network: Network,
                       workload: Workload, applied: AppliedScenario, failure_at: float
                       ) -> TrainingFailover | None:
    run = _failed_run(baseline, topo, workload, applied, failure_at)
    if run is None:
        return None
    standbys = [
        _standby(run, site, network) for site in topo.sites
        if site.gpu_count(workload.gpu) >= workload.min_gpus and site.id != run.home
        and all(topo.dataset(x).allowed_in(site.region) for x in workload.datasets)]
    deadline = workload.deadline_hours
    if not standbys:
        allowed = (f" where {', '.join(workload.datasets)} may be processed"
                   if workload.datasets else "")
        return TrainingFailover(workload.id, run.home, run.progress, run.elapsed, deadline,
                                (), 0, f"nowhere to resume: no surviving site has "
                                f"{workload.min_gpus} {workload.gpu} GPUs{allowed}")
    ranked = _rank(standbys)
    target, advice = _recommend(baseline, run, ranked, topo, network)
    return TrainingFailover(workload.id, run.home, run.progress, run.elapsed, deadline,
                            tuple(ranked[:_STANDBYS_KEPT]), len(standbys), advice, target)


def _infeasible(site: str, gpus: int, why: str) -> Standby:
    return Standby(site, False, gpus, None, math.inf, math.inf, 0.0, 0.0, math.inf, math.inf,
                   False, why)


def _rank(standbys: Sequence[Standby]) -> list[Standby]:
    """Meeting the deadline first, by the planner's rule (least cost, 5 % ties to the earlier
    finish); then the rest by finish time; infeasible last."""
    meets = sorted((s for s in standbys if s.feasible and s.meets_deadline),
                   key=lambda s: (s.cost_usd, s.finish_hours, s.site))
    if meets:
        band = [s for s in meets if s.cost_usd <= meets[0].cost_usd * (1 + COST_TIE_FRACTION)
                + 1e-9]
        first = min(band, key=lambda s: (s.finish_hours, s.cost_usd, s.site))
        meets.remove(first)
        meets.insert(0, first)
    late = sorted((s for s in standbys if s.feasible and not s.meets_deadline),
                  key=lambda s: (s.finish_hours, s.cost_usd, s.site))
    rest = [s for s in standbys if not s.feasible]
    return [*meets, *late, *rest]


@dataclass(frozen=True, order=True)
class _Cadence:
    cost_usd: float  # to finish there after losing `rpo_hours` of work (first: sorts by it)
    every_hours: float
    rpo_hours: float
    site: str
    usd_per_gb: float  # egress of one checkpoint's path there


def _recommend(baseline: Baseline, run: _FailedRun, ranked: Sequence[Standby],
               topo: Topology, network: Network) -> tuple[float | None, str | None]:
    """(RPO target, advice) when the replication as planned cannot meet the deadline (or the
    declared `rpo_hours`) after this failure: the standby where a fresher checkpoint meets it
    for the least cost, and how often to send it one."""
    w, ck = run.workload, run.checkpoints
    deadline = w.deadline_hours
    declared = ck.rpo_hours if ck else None
    best = ranked[0] if ranked and ranked[0].feasible else None
    ok_deadline = best is not None and best.meets_deadline
    ok_rpo = declared is None or (best is not None and best.lost_hours <= declared + 1e-9)
    if (deadline is None and declared is None) or (ok_deadline and ok_rpo):
        return declared, None
    share = baseline.topology.sync_window.bulk_share
    picks: list[_Cadence] = []
    for standby in ranked:
        if not standby.feasible:
            continue
        scale = w.hours_on(standby.gpus) / w.hours_on(run.gpus)
        data = _restore(network, run.data, standby.site)
        allowed = declared if declared is not None else math.inf
        if deadline is not None:
            slack = (deadline - run.elapsed - data.seconds / 3600
                     - (run.hours - run.progress) * scale)
            allowed = min(allowed, slack / scale)
        if allowed <= 0:
            continue
        # One checkpoint from the training site to the standby, at the bulk share (as the
        # replication runs before the failure).
        c = _fastest(candidates(baseline.network, run.home, standby.site, run.checkpoint_gb,
                                ck.regions if ck else None, share))
        if c is None or (allowed - c.seconds / 3600) * 60 < 1:
            continue
        price = topo.site(standby.site).gpu_hour_usd.get(w.gpu, 0.0)
        picks.append(_Cadence(
            (run.hours - run.progress + allowed) * scale * standby.gpus * price + data.usd,
            allowed - c.seconds / 3600, allowed, standby.site, c.path.egress_usd_per_gb))
    goal = "the deadline" if declared is None else f"RPO <= {declared:g} h"
    if not picks:
        return declared, (f"no checkpoint cadence lets {w.id} meet {goal} after {run.home} "
                          f"fails {duration(run.progress)} into its compute: the standbys "
                          "need longer than that to restore its data and finish")
    pick = min(picks)
    minutes = int(pick.every_hours * 60)
    per_day = run.checkpoint_gb * 24 * 60 / minutes * pick.usd_per_gb
    now = (f"every {ck.every_hours:g} h to {', '.join(t for t, _ in ck.targets) or 'nowhere'}"
           if ck else "not replicated")
    return pick.rpo_hours, (
        f"pre-replicate checkpoints of {w.id} to {pick.site} every {minutes} min to meet RPO "
        f"<= {duration(pick.rpo_hours)} (what {goal} allows after {run.home} fails there; "
        f"now: {now}); {run.checkpoint_gb:,.0f} GB each, {money(per_day)}/day of egress")


# -- vector indexes ---------------------------------------------------------------------------


def _shard_impacts(baseline: Baseline, topo: Topology, network: Network,
                   applied: AppliedScenario, new: Sequence[ShardReplication]
                   ) -> tuple[ShardImpact, ...]:
    dead = applied.reach.failed_sites
    old_ix = {ix.id: ix for ix in baseline.topology.vector_indexes}
    new_by_id = {r.index: r for r in new}
    domain = {s.id: s.failure_domain or s.id for s in topo.sites}
    out = []
    for r in baseline.report.shard_replication:
        if not r.feasible:
            continue
        ix = old_ix[r.index]
        below, gone, misses = [], [], []
        left = [tuple(s for s in p.sites if s not in dead) for p in r.shards]
        for k, sites in enumerate(left):
            if not sites:
                gone.append(k)
            elif len({domain[s] for s in sites}) < ix.replicas_min:
                below.append(k)
        fanout = range(len(left)) if ix.fanout == "all" else ix.fanout
        for q in ix.queries:
            if q in dead:
                continue
            for k in fanout:
                p99 = min((x for s in left[k] if (x := network.p99_ms(q, s)) is not None),
                          default=None)
                total = None if p99 is None else p99 + ix.search_ms
                if total is None or total > ix.latency_budget_ms + 1e-9:
                    misses.append(f"{q}: shard {k} " + ("unreachable" if total is None else
                                  f"at {total:.1f} ms p99 of {ix.latency_budget_ms:g}"))
                    break
        now = new_by_id.get(r.index)
        if ix.id in applied.lost:
            feasible, reason, delta = False, applied.lost[ix.id], None
        elif now is None:
            feasible, reason, delta = False, "no longer in the topology", None
        else:
            feasible, reason = now.feasible, now.reason
            delta = (None if now.objective_usd_per_day is None
                     or r.objective_usd_per_day is None
                     else now.objective_usd_per_day - r.objective_usd_per_day)
        if not (below or gone or misses) and feasible and (delta is None or abs(delta) < 1e-9):
            continue
        out.append(ShardImpact(r.index, tuple(below), tuple(gone), tuple(misses), feasible,
                               reason, delta))
    return tuple(out)


# -- many scenarios ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SinglePointOfFailure:
    element: str  # "site:X" or "link:A,B"
    breaks: tuple[str, ...]  # workloads and vector indexes lost
    why: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"element": self.element, "breaks": list(self.breaks), "why": list(self.why)}


@dataclass(frozen=True)
class WhatifResult:
    """Every scenario's outcome against one baseline, ranked, with the single points of
    failure. Versioned JSON: `to_json()`; the shape is in netplan.whatif_schema."""

    topology: str
    baseline: tuple[DecisionSummary, ...]
    baseline_sync_usd_per_day: float
    scenarios: tuple[ScenarioResult, ...]
    sweep: str | None = None
    single_points_of_failure: tuple[SinglePointOfFailure, ...] = field(default=())

    @property
    def ranking(self) -> tuple[ScenarioResult, ...]:
        """The scenarios that hurt, worst first."""
        hurt = [s for s in self.scenarios if s.has_effect and s.harm > (0, 0, 1e-9)]
        return tuple(sorted(hurt, key=lambda s: s.harm, reverse=True))

    def stats(self) -> dict[str, int]:
        evaluated = [s for s in self.scenarios if s.evaluated]
        return {
            "scenarios": len(self.scenarios),
            "scenarios_evaluated": len(evaluated),
            "scenarios_skipped": len(self.scenarios) - len(evaluated),
            "workloads_replanned": sum(len(s.replanned) for s in self.scenarios),
            "workloads_skipped": sum(s.skipped for s in self.scenarios),
            "scenarios_with_effect": sum(1 for s in self.scenarios if s.has_effect),
            "errors": sum(1 for s in self.scenarios if s.error),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": WHATIF_SCHEMA_VERSION,
            "topology": self.topology,
            "sweep": self.sweep,
            "baseline": {"decisions": [d.to_json() for d in self.baseline],
                         "total_usd": _r(sum(d.total_usd or 0.0 for d in self.baseline)),
                         "sync_usd_per_day": _r(self.baseline_sync_usd_per_day)},
            "stats": self.stats(),
            "ranking": [s.scenario.name for s in self.ranking],
            "single_points_of_failure": [p.to_json() for p in self.single_points_of_failure],
            "scenarios": [s.to_json() for s in self.scenarios],
        }


def summarize_sweep(baseline: Baseline, results: Iterable[ScenarioResult],
                    sweep: str | None = None) -> WhatifResult:
    """Collect results (in scenario order) into one `WhatifResult` with the single points of
    failure: elements whose failure alone loses a workload or a vector index."""
    results = tuple(results)
    spofs = []
    for r in results:
        changes = r.scenario.changes
        if len(changes) != 1 or changes[0].kind != "fail":
            continue
        breaks = (*r.workloads_lost, *r.indexes_lost)
        if not breaks:
            continue
        why = tuple(f"{c.workload}: {c.after.reason}" for c in r.changes if c.status == "lost")
        why += tuple(f"{s.index}: {s.replanned_reason}" for s in r.shards
                     if not s.replanned_feasible)
        spofs.append(SinglePointOfFailure(changes[0].text, breaks, why))
    plan = baseline.report.sync_plan
    return WhatifResult(
        topology=baseline.topology.name, baseline=baseline.decisions,
        baseline_sync_usd_per_day=plan.cost_per_day()["total_usd"] if plan else 0.0,
        scenarios=results, sweep=sweep, single_points_of_failure=tuple(spofs))

