"""The analysis report: one `analyze()` over a topology, and its versioned JSON form.

`Report` is plain frozen data; `Report.to_json()` is the only JSON shape (`SCHEMA_VERSION` lives
here and nowhere else). New report sections are new fields plus a few lines in `to_json()` and a
renderer in the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from netplan._budgets import LatencyBudget, latency_budgets
from netplan._sections import PathPolicy
from netplan._shards import ShardReplication, shard_replication
from netplan._sync import SyncPlan, plan_sync
from netplan.decisions import Decision, Movement, Option
from netplan.errors import Infeasible, InfeasiblePlan
from netplan.gravity import decide_gravity
from netplan.network import LinkThroughput, Network, SolverStats
from netplan.placement import decide_placement
from netplan.routes import PathAlternative
from netplan.topology import Topology, TransferSettings

__all__ = ["SCHEMA_VERSION", "Report", "analyze", "workload_sites"]

# 2: directed links (`links[].directions`), routes with shares and path alternatives per
# movement, the cost breakdown and GPU count per decision, grouped rejections, `problems`.
# The shape is described (and tested) in netplan.report_schema.
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Report:
    topology: str
    settings: TransferSettings
    links: tuple[LinkThroughput, ...]  # two per topology link: between[0] -> [1], then back
    decisions: tuple[Decision, ...]
    shard_replication: tuple[ShardReplication, ...] = ()
    sync_plan: SyncPlan | None = None
    latency_budgets: tuple[LatencyBudget, ...] = ()
    paths: PathPolicy = PathPolicy()
    solver_stats: SolverStats | None = None

    def infeasible(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.feasible)

    def problems(self) -> tuple[Infeasible, ...]:
        """Everything the plan cannot do: infeasible workloads, vector indexes without a
        placement, and the sync plan's problems (unreachable destinations, copies_min
        shortfalls, transfers and links that do not fit their window)."""
        out = [Infeasible(d.workload, d.constraints or (d.reason,)) for d in self.infeasible()]
        out += [Infeasible(r.index, [r.reason], kind="vector index")
                for r in self.shard_replication if not r.feasible]
        if self.sync_plan is not None:
            out += self.sync_plan.problems
        return tuple(out)

    def require_feasible(self) -> None:
        """Raise `InfeasiblePlan` (an `Infeasible` naming the first) listing every problem."""
        problems = self.problems()
        if problems:
            raise InfeasiblePlan(problems)

    def to_json(self, max_alternatives: int | None = None) -> dict[str, Any]:
        """The versioned JSON form; `max_alternatives` keeps only the best N losing options per
        decision (feasible first, cheapest first; 0 keeps none) and counts the rest in
        `alternatives_omitted`; `rejections` always groups every losing site by reason."""
        return {
            "schema_version": SCHEMA_VERSION,
            "topology": self.topology,
            "transfer": self.settings.model_dump(),
            "paths": self.paths.model_dump(),
            "decisions": [_decision_json(d, max_alternatives) for d in self.decisions],
            "links": _links_json(self.links),
            "shard_replication": [r.to_json() for r in self.shard_replication],
            "sync_plan": self.sync_plan.to_json() if self.sync_plan else None,
            "latency_budgets": [b.to_json() for b in self.latency_budgets],
            "problems": [str(p) for p in self.problems()],
            "solver": None if self.solver_stats is None else {
                "lp_solves": self.solver_stats.lp_solves,
                "milp_solves": self.solver_stats.milp_solves,
                "max_variables": self.solver_stats.max_variables,
                "max_constraints": self.solver_stats.max_constraints,
                "max_integer_variables": self.solver_stats.max_integers,
                "splits_chosen": self.solver_stats.splits_chosen,
            },
        }


def analyze(
    topology: Topology,
    settings: TransferSettings | None = None,
    paths: PathPolicy | None = None,
) -> Report:
    """Decide every workload of `topology`; `settings` overrides the topology's `transfer:`,
    `paths` its `paths:` section."""
    network = Network(topology, settings, paths)
    decisions = tuple(
        decide_placement(topology, network, w)
        if w.kind == "inference"
        else decide_gravity(topology, network, w)
        for w in topology.workloads
    )
    running_at = workload_sites(decisions)
    shards = shard_replication(topology, network)
    return Report(
        topology=topology.name,
        settings=network.settings,
        links=network.links,
        decisions=decisions,
        shard_replication=shards,
        sync_plan=plan_sync(topology, network, running_at,
                            [r for r in shards if r.feasible]),
        latency_budgets=latency_budgets(topology, network, running_at),
        paths=network.policy,
        solver_stats=network.solver_stats,
    )


def workload_sites(decisions: tuple[Decision, ...]) -> dict[str, tuple[str, ...]]:
    """Workload id -> the sites it runs at, for the feasible decisions."""
    return {d.workload: d.option.sites for d in decisions if d.feasible and d.option}


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def _route_json(m: Movement, alternative: bool) -> dict[str, Any]:
    r = m.route
    out: dict[str, Any] = {
        "kind": m.kind,
        "id": m.id,
        "from": m.source,
        "to": m.target,
        "size_gb": _finite(m.size_gb),
        "path": list(m.path),
        "seconds": _finite(m.seconds),
        "egress_usd": _finite(m.egress_usd),
        "relay_usd": _finite(m.relay_usd),
        "bottleneck_gbps": _finite(m.bottleneck_gbps),
        "limited_by": m.limited_by,
        "multipath": r.multipath,
        "solver": r.solver,
        "routes": [
            {
                "path": list(leg.path.sites),
                "share": _finite(leg.share),
                "rate_gbps": _finite(leg.rate_gbps),
                "egress_usd": _finite(m.size_gb * leg.share * leg.path.egress_usd_per_gb),
            }
            for leg in r.legs
        ],
        "why": r.why,
    }
    if not alternative:  # (the paths a losing option's transfers did not take: not useful)
        out["path_alternatives"] = [_path_alternative_json(a) for a in r.alternatives]
    return out


def _path_alternative_json(a: PathAlternative) -> dict[str, Any]:
    return {
        "labels": list(a.labels),
        "path": list(a.path.sites),
        "seconds": _finite(a.seconds),
        "egress_usd": _finite(a.egress_usd),
        "relay_usd": _finite(a.relay_usd),
        "cost_usd": _finite(a.cost_usd),
        "meets_deadline": a.meets_deadline,
        "rejected_because": a.rejected_because,
    }


def _cost_json(option: Option) -> dict[str, Any]:
    return {
        "compute_usd": _finite(option.compute_usd),
        "egress_usd": _finite(option.egress_usd),
        "storage_usd": _finite(option.storage_usd),
        "relay_usd": _finite(option.relay_usd),
        "total_usd": _finite(option.total_usd),
    }


def _option_json(
    option: Option | None, inference: bool, alternative: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if inference:
        out["sites"] = list(option.sites) if option else []
    else:
        out["site"] = option.site if option else None
    if option is None:
        out.update(
            gpus=None,
            compute_hours=None,
            path=[],
            transfer_gb=None,
            transfer_seconds=None,
            egress_usd=None,
            compute_usd=None,
            total_usd=None,
            completion_hours=None,
            cost=None,
            movements=[],
        )
        return out
    priced = option.priced  # (unpriced: failed a check that needs no network; see Option)
    out.update(
        feasible=option.feasible,
        priced=priced,
        gpus=option.gpus,
        compute_hours=_finite(option.hours),
        path=list(option.path) if priced else [],
        transfer_gb=_finite(option.transfer_gb) if priced else None,
        transfer_seconds=_finite(option.transfer_seconds) if priced else None,
        egress_usd=_finite(option.egress_usd) if priced else None,
        compute_usd=_finite(option.compute_usd),
        total_usd=_finite(option.total_usd) if priced else None,
        completion_hours=_finite(option.completion_hours) if priced else None,
        cost=_cost_json(option) if priced else None,
        movements=[_route_json(m, alternative) for m in option.movements],
    )
    if option.gpus_why:
        out["gpus_why"] = option.gpus_why
    if inference:
        worst = option.worst_client
        out["worst_client"] = (
            {"client": worst.client, "site": worst.site, "p99_ms": _finite(worst.p99_ms or 0.0)}
            if worst
            else None
        )
        if not alternative:  # (per-client paths are worked out for the chosen replicas only)
            out["clients"] = [
                {
                    "client": c.client,
                    "site": c.site,
                    "p99_ms": None if c.p99_ms is None else _finite(c.p99_ms),
                    "path": list(c.path),
                }
                for c in option.clients
            ]
    return out


def _decision_json(decision: Decision, max_alternatives: int | None) -> dict[str, Any]:
    inference = decision.kind == "inference"
    out: dict[str, Any] = {
        "workload": decision.workload,
        "kind": decision.kind,
        "action": decision.action,
    }
    out.update(_option_json(decision.option, inference))
    out["feasible"] = decision.feasible
    out["reason"] = decision.reason
    kept = decision.alternatives
    if max_alternatives is not None:
        kept = kept[:max_alternatives]
    out["alternatives"] = [
        {
            "action": alt.action,
            **_option_json(alt, inference, alternative=True),
            "rejected_because": alt.rejected_because,
        }
        for alt in kept
    ]
    out["alternatives_omitted"] = len(decision.alternatives) - len(kept)
    out["options_not_evaluated"] = decision.skipped
    out["rejections"] = [
        {"kind": r.kind, "reason": r.reason, "sites": r.count, "examples": list(r.examples)}
        for r in decision.rejections
    ]
    return out


def _direction_json(link: LinkThroughput) -> dict[str, Any]:
    return {
        "from": link.sender,
        "to": link.receiver,
        "effective_gbps": _finite(link.effective_gbps),
        "limited_by": link.limited_by,
        "capacity_gbps": _finite(link.capacity_gbps),
        "window_gbps": _finite(link.window_gbps),
        "loss_gbps": _finite(link.loss_gbps),
        "loss_pct": link.loss_pct,
        "egress_usd_per_gb": link.egress_usd_per_gb,
    }


def _links_json(links: tuple[LinkThroughput, ...]) -> list[dict[str, Any]]:
    """One entry per topology link, its two directions inside."""
    out = []
    for there, back in zip(links[::2], links[1::2], strict=True):
        out.append({
            "between": list(there.between),
            "rtt_ms": there.rtt_ms,
            "jitter_ms": there.jitter_ms,
            "directions": [_direction_json(there), _direction_json(back)],
        })
    return out
