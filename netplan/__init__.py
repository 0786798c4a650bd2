"""netplan: a network-aware planner for AI data and compute across hybrid sites.

Public names are re-exported here as the planner grows; the CLI lives in `netplan.cli`.
"""

__all__: list[str] = []
