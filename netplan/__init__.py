"""netplan: a network-aware planner for AI data and compute across hybrid sites.

The public names are re-exported here; the CLI lives in `netplan.cli`. Typical use:
`analyze(load_topology("topologies/x.yaml")).to_json()`.

The names load on first use (PEP 562): `transferd` imports small parts of netplan (the plan
contract `netplan.plan`, YAML error positions) and should not pay for networkx and scipy at
start-up. netplan never imports transferd: the dependency goes one way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netplan._budgets import LatencyBudget, break_down_budget, latency_budgets
    from netplan._plan_build import build_plan
    from netplan._sections import SyncRule, VectorIndex
    from netplan._shards import ShardReplication, replicate_shards, shard_replication
    from netplan._sync import SyncPlan, plan_sync
    from netplan.decisions import ClientLatency, Decision, Movement, Option
    from netplan.errors import Infeasible, NetplanError, PlanError, TopologyError
    from netplan.executors import DaskExecutor, LocalExecutor, SerialExecutor, run_whatif
    from netplan.loader import load_topology, parse_topology
    from netplan.network import (
        BulkPath,
        LatencyPath,
        LinkThroughput,
        Network,
        PathTree,
        link_throughput,
    )
    from netplan.plan import SCHEMA_VERSION as PLAN_SCHEMA_VERSION
    from netplan.plan import Plan, SitePlan, Tier, TrafficClass
    from netplan.report import SCHEMA_VERSION, Report, analyze
    from netplan.scenarios import Scenario, ScenarioError, load_scenario_file, parse_change
    from netplan.topology import (
        Dataset,
        Link,
        Model,
        Site,
        Topology,
        TransferSettings,
        Workload,
    )
    from netplan.whatif import ScenarioResult, WhatifResult, build_baseline, evaluate

# public name -> (module, attribute in that module)
_EXPORTS: dict[str, tuple[str, str]] = {
    **{n: ("netplan.decisions", n) for n in ("ClientLatency", "Decision", "Movement", "Option")},
    **{
        n: ("netplan.errors", n)
        for n in ("Infeasible", "NetplanError", "PlanError", "TopologyError")
    },
    **{n: ("netplan.loader", n) for n in ("load_topology", "parse_topology")},
    **{
        n: ("netplan.network", n)
        for n in (
            "BulkPath",
            "LatencyPath",
            "LinkThroughput",
            "Network",
            "PathTree",
            "link_throughput",
        )
    },
    **{n: ("netplan.report", n) for n in ("SCHEMA_VERSION", "Report", "analyze")},
    **{
        n: ("netplan.topology", n)
        for n in ("Dataset", "Link", "Model", "Site", "Topology", "TransferSettings", "Workload")
    },
    **{
        n: ("netplan._budgets", n)
        for n in ("LatencyBudget", "break_down_budget", "latency_budgets")
    },
    "PLAN_SCHEMA_VERSION": ("netplan.plan", "SCHEMA_VERSION"),
    **{n: ("netplan.plan", n) for n in ("Plan", "SitePlan", "Tier", "TrafficClass")},
    "build_plan": ("netplan._plan_build", "build_plan"),
    **{n: ("netplan._sections", n) for n in ("SyncRule", "VectorIndex")},
    **{
        n: ("netplan._shards", n)
        for n in ("ShardReplication", "replicate_shards", "shard_replication")
    },
    **{n: ("netplan._sync", n) for n in ("SyncPlan", "plan_sync")},
    **{n: ("netplan.executors", n)
       for n in ("DaskExecutor", "LocalExecutor", "SerialExecutor", "run_whatif")},
    **{n: ("netplan.scenarios", n)
       for n in ("Scenario", "ScenarioError", "load_scenario_file", "parse_change")},
    **{n: ("netplan.whatif", n)
       for n in ("ScenarioResult", "WhatifResult", "build_baseline", "evaluate")},
}

__all__ = [
    "BulkPath",
    "ClientLatency",
    "DaskExecutor",
    "Dataset",
    "Decision",
    "Infeasible",
    "LatencyBudget",
    "LatencyPath",
    "Link",
    "LinkThroughput",
    "LocalExecutor",
    "Model",
    "Movement",
    "NetplanError",
    "Network",
    "Option",
    "PLAN_SCHEMA_VERSION",
    "PathTree",
    "Plan",
    "PlanError",
    "Report",
    "SCHEMA_VERSION",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "SerialExecutor",
    "ShardReplication",
    "Site",
    "SitePlan",
    "SyncPlan",
    "SyncRule",
    "Tier",
    "Topology",
    "TopologyError",
    "TrafficClass",
    "TransferSettings",
    "VectorIndex",
    "WhatifResult",
    "Workload",
    "analyze",
    "break_down_budget",
    "build_baseline",
    "build_plan",
    "evaluate",
    "latency_budgets",
    "link_throughput",
    "load_scenario_file",
    "load_topology",
    "parse_change",
    "parse_topology",
    "plan_sync",
    "replicate_shards",
    "run_whatif",
    "shard_replication",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'netplan' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
