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
