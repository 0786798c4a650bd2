"""netplan: a network-aware planner for AI data and compute across hybrid sites.

The public names are re-exported here; the CLI lives in `netplan.cli`. Typical use:
`analyze(load_topology("topologies/x.yaml")).to_json()`.
"""

from netplan.decisions import ClientLatency, Decision, Movement, Option
from netplan.errors import Infeasible, NetplanError, PlanError, TopologyError
from netplan.loader import load_topology, parse_topology
from netplan.network import (
    LatencyPath,
    LinkThroughput,
    Network,
    PathTree,
    WidestPath,
    link_throughput,
)
from netplan.report import SCHEMA_VERSION, Report, analyze
from netplan.topology import Dataset, Link, Model, Site, Topology, TransferSettings, Workload

__all__ = [
    "SCHEMA_VERSION",
    "ClientLatency",
    "Dataset",
    "Decision",
    "Infeasible",
    "LatencyPath",
    "Link",
    "LinkThroughput",
    "Model",
    "Movement",
    "NetplanError",
    "Network",
    "Option",
    "PathTree",
    "PlanError",
    "Report",
    "Site",
    "Topology",
    "TopologyError",
    "TransferSettings",
    "WidestPath",
    "Workload",
    "analyze",
    "link_throughput",
    "load_topology",
    "parse_topology",
]

# Shard replication, sync rules, latency budgets and the plan file (kept as one block so the
# two halves of the planner merge cleanly).
from netplan._budgets import LatencyBudget, break_down_budget, latency_budgets  # noqa: E402
from netplan._plan import SCHEMA_VERSION as PLAN_SCHEMA_VERSION  # noqa: E402
from netplan._plan import Plan, SitePlan, build_plan  # noqa: E402
from netplan._sections import SyncRule, VectorIndex  # noqa: E402
from netplan._shards import ShardReplication, replicate_shards, shard_replication  # noqa: E402
from netplan._sync import SyncPlan, plan_sync  # noqa: E402

__all__ += [
    "PLAN_SCHEMA_VERSION",
    "LatencyBudget",
    "Plan",
    "ShardReplication",
    "SitePlan",
    "SyncPlan",
    "SyncRule",
    "VectorIndex",
    "break_down_budget",
    "build_plan",
    "latency_budgets",
    "plan_sync",
    "replicate_shards",
    "shard_replication",
]
