"""netplan: a network-aware planner for AI data and compute across hybrid sites.

The public names are re-exported here; the CLI lives in `netplan.cli`.
"""

from netplan.errors import Infeasible, NetplanError, PlanError, TopologyError
from netplan.loader import load_topology, parse_topology
from netplan.network import LatencyPath, LinkThroughput, Network, WidestPath, link_throughput
from netplan.topology import Dataset, Link, Model, Site, Topology, TransferSettings, Workload

__all__ = [
    "Dataset",
    "Infeasible",
    "LatencyPath",
    "Link",
    "LinkThroughput",
    "Model",
    "NetplanError",
    "Network",
    "PlanError",
    "Site",
    "Topology",
    "TopologyError",
    "TransferSettings",
    "WidestPath",
    "Workload",
    "link_throughput",
    "load_topology",
    "parse_topology",
]
