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
from netplan._shards import ShardReplication, shard_replication
from netplan._sync import SyncPlan, plan_sync
from netplan.decisions import Decision, Option
from netplan.errors import Infeasible
from netplan.gravity import decide_gravity
from netplan.network import LinkThroughput, Network
from netplan.placement import decide_placement
from netplan.topology import Topology, TransferSettings

__all__ = ["SCHEMA_VERSION", "Report", "analyze", "workload_sites"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Report:
    topology: str
    settings: TransferSettings
    links: tuple[LinkThroughput, ...]
    decisions: tuple[Decision, ...]
    shard_replication: tuple[ShardReplication, ...] = ()
    sync_plan: SyncPlan | None = None
    latency_budgets: tuple[LatencyBudget, ...] = ()

    def infeasible(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.feasible)

    def require_feasible(self) -> None:
        """Raise `Infeasible` for the first workload that has no feasible option."""
        for decision in self.infeasible():
            raise Infeasible(decision.workload, decision.constraints or (decision.reason,))

    def to_json(self, max_alternatives: int | None = None) -> dict[str, Any]:
        """The versioned JSON form; `max_alternatives` keeps only the best N losing options per
        decision (feasible first, cheapest first) and counts the rest in `alternatives_omitted`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "topology": self.topology,
            "transfer": self.settings.model_dump(),
            "decisions": [_decision_json(d, max_alternatives) for d in self.decisions],
            "links": [_link_json(link) for link in self.links],
            "shard_replication": [r.to_json() for r in self.shard_replication],
            "sync_plan": self.sync_plan.to_json() if self.sync_plan else None,
            "latency_budgets": [b.to_json() for b in self.latency_budgets],
        }


def analyze(topology: Topology, settings: TransferSettings | None = None) -> Report:
    """Decide every workload of `topology`; `settings` overrides the topology's `transfer:`."""
    network = Network(topology, settings)
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
    )


def workload_sites(decisions: tuple[Decision, ...]) -> dict[str, tuple[str, ...]]:
    """Workload id -> the sites it runs at, for the feasible decisions."""
    return {d.workload: d.option.sites for d in decisions if d.feasible and d.option}


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


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
            path=[],
            transfer_gb=None,
            transfer_seconds=None,
            egress_usd=None,
            compute_usd=None,
            total_usd=None,
            completion_hours=None,
            movements=[],
        )
        return out
    priced = option.priced  # (unpriced: failed a check that needs no network; see Option)
    out.update(
        feasible=option.feasible,
        priced=priced,
        path=list(option.path) if priced else [],
        transfer_gb=_finite(option.transfer_gb) if priced else None,
        transfer_seconds=_finite(option.transfer_seconds) if priced else None,
        egress_usd=_finite(option.egress_usd) if priced else None,
        compute_usd=_finite(option.compute_usd),
        total_usd=_finite(option.total_usd) if priced else None,
        completion_hours=_finite(option.completion_hours) if priced else None,
        movements=[
            {
                "kind": m.kind,
                "id": m.id,
                "from": m.source,
                "to": m.target,
                "size_gb": _finite(m.size_gb),
                "path": list(m.path),
                "seconds": _finite(m.seconds),
                "egress_usd": _finite(m.egress_usd),
                "bottleneck_gbps": _finite(m.bottleneck_gbps),
                "limited_by": m.limited_by,
            }
            for m in option.movements
        ],
    )
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
    return out


def _link_json(link: LinkThroughput) -> dict[str, Any]:
    return {
        "between": list(link.between),
        "effective_gbps": _finite(link.effective_gbps),
        "limited_by": link.limited_by,
        "capacity_gbps": _finite(link.capacity_gbps),
        "window_gbps": _finite(link.window_gbps),
        "loss_gbps": _finite(link.loss_gbps),
        "rtt_ms": link.rtt_ms,
        "jitter_ms": link.jitter_ms,
        "loss_pct": link.loss_pct,
    }
