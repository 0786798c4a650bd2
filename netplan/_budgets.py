"""Latency budget breakdown for inference workloads: where a request's p99 milliseconds go.

A request from a client to the serving site costs DNS + TLS handshake (in round trips, so it grows
with the path RTT) + request routing + feature lookup + model execution + serialization + the
network round trip itself (RTT + jitter p99). The breakdown is a sum, the headroom is the budget
minus that sum, and the largest component is what to attack first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netplan._sections import NETWORK_ONLY, LatencyComponents
from netplan.network import Network
from netplan.topology import Topology

__all__ = ["DEFAULT_COMPONENTS", "BudgetComponent", "LatencyBudget", "LatencyComponents",
           "break_down_budget", "latency_budgets"]


DEFAULT_COMPONENTS = LatencyComponents()


@dataclass(frozen=True)
class BudgetComponent:
    name: str
    ms: float


@dataclass(frozen=True)
class LatencyBudget:
    workload: str
    client: str | None  # the client whose network path is the worst
    serving_site: str | None
    budget_ms: float
    components: tuple[BudgetComponent, ...]

    @property
    def total_ms(self) -> float:
        return sum(c.ms for c in self.components)

    @property
    def headroom_ms(self) -> float:
        return self.budget_ms - self.total_ms

    @property
    def largest(self) -> BudgetComponent:
        return max(self.components, key=lambda c: c.ms)

    @property
    def fits(self) -> bool:
        return self.headroom_ms >= 0

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "client": self.client,
            "serving_site": self.serving_site,
            "budget_ms": self.budget_ms,
            "components_ms": {c.name: round(c.ms, 3) for c in self.components},
            "total_ms": round(self.total_ms, 3),
            "headroom_ms": round(self.headroom_ms, 3),
            "largest": self.largest.name,
            "fits": self.fits,
        }


def break_down_budget(
    workload: str,
    budget_ms: float,
    rtt_ms: float,
    jitter_p99_ms: float,
    components: LatencyComponents = DEFAULT_COMPONENTS,
    *,
    client: str | None = None,
    serving_site: str | None = None,
) -> LatencyBudget:
    """Break `budget_ms` into its components for a client `rtt_ms` away from the serving site."""
    parts = (
        BudgetComponent("dns", components.dns_ms),
        BudgetComponent("tls_handshake", components.tls_handshake_rtts * rtt_ms),
        BudgetComponent("request_routing", components.request_routing_ms),
        BudgetComponent("feature_lookup", components.feature_lookup_ms),
        BudgetComponent("model_execution", components.model_execution_ms),
        BudgetComponent("serialization", components.serialization_ms),
        BudgetComponent("network_rtt_p99", rtt_ms + jitter_p99_ms),
    )
    return LatencyBudget(workload, client, serving_site, budget_ms, parts)


def latency_budgets(topo: Topology, network: Network,
                    serving_sites: Mapping[str, Sequence[str]]) -> tuple[LatencyBudget, ...]:
    """One breakdown per inference workload, for its worst client: each client is served by the
    nearest (lowest RTT + jitter) of the workload's serving sites (from the placement decision;
    the model's site when the workload has none)."""
    out = []
    for wl in topo.workloads:
        if wl.kind != "inference" or wl.latency_budget_ms is None:
            continue
        sites = list(serving_sites.get(wl.id, ()))
        if not sites and wl.model is not None:
            sites = [topo.model(wl.model).site]
        comps = topo.request_components(wl) or NETWORK_ONLY
        worst: tuple[float, str, str, float, float] | None = None
        for client in wl.clients:
            best: tuple[float, str, float, float] | None = None
            for site in sites:
                path = network.latency_path(client, site)
                if path is not None and (best is None or path.p99_ms < best[0]):
                    best = (path.p99_ms, site, path.rtt_ms, path.jitter_ms)
            if best is None:
                best = (math.inf, sites[0] if sites else "", math.inf, 0.0)
            if worst is None or best[0] > worst[0]:
                worst = (best[0], client, best[1], best[2], best[3])
        if worst is None:
            continue
        _, client, site, rtt, jitter = worst
        out.append(break_down_budget(wl.id, wl.latency_budget_ms, rtt, jitter, comps,
                                     client=client, serving_site=site or None))
    return tuple(out)
