"""The network model: what a bulk TCP transfer really gets out of each link, and the best paths.

Theory of operation.
- Per link, N parallel TCP streams reach
  min(capacity, N * window / RTT, N * MSS * C / (RTT * sqrt(p)))
  - the window bound: one stream never has more than a receive window in flight per round trip;
  - the loss bound: Mathis et al. 1997, loss-limited congestion avoidance, C = sqrt(3/2);
  - `limited_by` names the smallest term ("capacity", "window" or "loss").
- Paths for bulk data are widest paths (maximum bottleneck of effective throughput), found with a
  Dijkstra variant over the networkx graph; a relay through a third site wins when its worst hop is
  faster than the direct link, which happens because each relay hop is its own TCP connection with a
  shorter RTT (Skyplane's overlay, NSDI 2023). Among equally wide paths the cheaper, then the
  shorter-RTT one wins.
- Relays forward chunks as they arrive (pipelined), so a transfer takes size / bottleneck plus one
  path RTT to start; egress is the sum over hops of the price of leaving each hop's sending site.
- Paths for requests are min-latency paths over RTT + jitter (p99 approximated as RTT + jitter).
Every path query may be confined to a set of regions (data residency covers relay hops too), and
a site with `relay: false` ends paths but never forwards them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from netplan.errors import PlanError
from netplan.topology import Link, Topology, TransferSettings

__all__ = [
    "LatencyPath",
    "LimitingFactor",
    "LinkThroughput",
    "Network",
    "WidestPath",
    "link_throughput",
]

LimitingFactor = Literal["capacity", "window", "loss"]


@dataclass(frozen=True)
class LinkThroughput:
    """Effective bulk throughput of one link and the three bounds it is the minimum of."""

    between: tuple[str, str]
    capacity_gbps: float
    window_gbps: float  # math.inf when RTT is 0
    loss_gbps: float  # math.inf when loss is 0 or RTT is 0
    effective_gbps: float
    limited_by: LimitingFactor
    rtt_ms: float
    jitter_ms: float
    loss_pct: float


def link_throughput(link: Link, settings: TransferSettings) -> LinkThroughput:
    """min(capacity, N*window/RTT, N*MSS*C/(RTT*sqrt(p))) for `settings.streams` streams."""
    rtt_s = link.rtt_ms / 1000.0
    n = settings.streams
    window_gbps = n * settings.window_bytes * 8 / rtt_s / 1e9 if rtt_s > 0 else math.inf
    p = link.loss_pct / 100.0
    if rtt_s > 0 and p > 0:
        per_stream_bps = settings.mss_bytes * 8 * settings.mathis_constant / (rtt_s * math.sqrt(p))
        loss_gbps = n * per_stream_bps / 1e9
    else:
        loss_gbps = math.inf
    # Ties go to the earlier factor: exactly window- and capacity-bound reads "capacity".
    bounds: list[tuple[float, LimitingFactor]] = [
        (link.bandwidth_gbps, "capacity"),
        (window_gbps, "window"),
        (loss_gbps, "loss"),
    ]
    effective, limited_by = min(bounds, key=lambda b: b[0])
    return LinkThroughput(
        between=link.between,
        capacity_gbps=link.bandwidth_gbps,
        window_gbps=window_gbps,
        loss_gbps=loss_gbps,
        effective_gbps=effective,
        limited_by=limited_by,
        rtt_ms=link.rtt_ms,
        jitter_ms=link.jitter_ms,
        loss_pct=link.loss_pct,
    )


@dataclass(frozen=True)
class WidestPath:
    """The path bulk data takes from `sites[0]` to `sites[-1]` (one site: nothing moves)."""

    sites: tuple[str, ...]
    bottleneck_gbps: float  # math.inf for a one-site path
    limited_by: LimitingFactor | None  # factor of the bottleneck hop
    bottleneck_link: tuple[str, str] | None
    rtt_ms: float
    egress_usd_per_gb: float

    @property
    def hops(self) -> int:
        return len(self.sites) - 1

    def transfer_seconds(self, size_gb: float) -> float:
        if self.hops == 0 or size_gb <= 0:
            return 0.0
        return size_gb * 8 / self.bottleneck_gbps + self.rtt_ms / 1000.0

    def egress_usd(self, size_gb: float) -> float:
        return size_gb * self.egress_usd_per_gb


@dataclass(frozen=True)
class LatencyPath:
    """The lowest-latency path for requests between two sites."""

    sites: tuple[str, ...]
    rtt_ms: float
    jitter_ms: float

    @property
    def p99_ms(self) -> float:
        return self.rtt_ms + self.jitter_ms


Regions = frozenset[str] | None


@dataclass(frozen=True)
class _Hop:
    to: str
    gbps: float
    rtt_ms: float
    egress_usd_per_gb: float
    link: LinkThroughput


class Network:
    """Per-link throughput and cached path queries over one topology and one set of TCP settings.

    Pure: built from frozen inputs, answers are deterministic; the caches only save work.
    """

    def __init__(self, topology: Topology, settings: TransferSettings | None = None) -> None:
        self.topology = topology
        self.settings = settings if settings is not None else topology.transfer
        self.links: tuple[LinkThroughput, ...] = tuple(
            link_throughput(link, self.settings) for link in topology.links
        )
        self._region = {s.id: s.region for s in topology.sites}
        self._relays = frozenset(s.id for s in topology.sites if s.relay)
        self.graph: nx.Graph = nx.Graph()
        self.graph.add_nodes_from((s.id, {"region": s.region}) for s in topology.sites)
        self._adjacency: dict[str, list[_Hop]] = {s.id: [] for s in topology.sites}
        self._by_pair: dict[frozenset[str], LinkThroughput] = {}
        for link, tp in zip(topology.links, self.links, strict=True):
            a, b = link.between
            self.graph.add_edge(
                a,
                b,
                effective_gbps=tp.effective_gbps,
                rtt_ms=link.rtt_ms,
                jitter_ms=link.jitter_ms,
                latency_ms=link.rtt_ms + link.jitter_ms,
            )
            for here, there in ((a, b), (b, a)):
                hop = _Hop(there, tp.effective_gbps, link.rtt_ms, link.egress_from(here), tp)
                self._adjacency[here].append(hop)
            self._by_pair[frozenset((a, b))] = tp
        self._widest: dict[tuple[str, Regions], dict[str, WidestPath]] = {}
        self._latency: dict[tuple[str, Regions], dict[str, LatencyPath]] = {}

    # -- links ---------------------------------------------------------------------------------
    def link(self, a: str, b: str) -> LinkThroughput | None:
        """The direct link between two sites, if there is one."""
        self._require(a, b)
        return self._by_pair.get(frozenset((a, b)))

    # -- bulk paths ----------------------------------------------------------------------------
    def widest_path(self, source: str, target: str, regions: Regions = None) -> WidestPath | None:
        """The widest path from `source` to `target` through sites in `regions` (None: anywhere);
        None when there is no such path."""
        self._require(source, target)
        return self.widest_paths_from(source, regions).get(target)

    def widest_paths_from(self, source: str, regions: Regions = None) -> dict[str, WidestPath]:
        """Widest paths from `source` to every reachable site (only through `regions`)."""
        self._require(source)
        key = (source, regions)
        cached = self._widest.get(key)
        if cached is None:
            cached = self._widest[key] = self._single_source_widest(source, regions)
        return cached

    def _allowed(self, site: str, regions: Regions) -> bool:
        return regions is None or self._region[site] in regions

    def _single_source_widest(self, source: str, regions: Regions) -> dict[str, WidestPath]:
        if not self._allowed(source, regions):
            return {}
        # Label: (bottleneck, egress per GB, rtt). Order: wider, then cheaper, then shorter.
        # Dijkstra is exact for the bottleneck; the cost/RTT tie-breaks are greedy.
        best: dict[str, tuple[float, float, float]] = {source: (math.inf, 0.0, 0.0)}
        parent: dict[str, tuple[str, _Hop] | None] = {source: None}
        done: set[str] = set()
        counter = itertools.count()
        heap: list[tuple[float, float, float, int, str]] = [(-math.inf, 0.0, 0.0, 0, source)]
        while heap:
            neg_b, cost, rtt, _, node = heapq.heappop(heap)
            if node in done:
                continue
            done.add(node)
            if node != source and node not in self._relays:
                continue
            for hop in self._adjacency[node]:
                nxt = hop.to
                if nxt in done or not self._allowed(nxt, regions):
                    continue
                label = (min(-neg_b, hop.gbps), cost + hop.egress_usd_per_gb, rtt + hop.rtt_ms)
                old = best.get(nxt)
                if old is None or (-label[0], label[1], label[2]) < (-old[0], old[1], old[2]):
                    best[nxt] = label
                    parent[nxt] = (node, hop)
                    heapq.heappush(heap, (-label[0], label[1], label[2], next(counter), nxt))
        paths: dict[str, WidestPath] = {}
        for target, (bottleneck, egress, rtt) in best.items():
            sites: list[str] = [target]
            narrowest: _Hop | None = None
            step = parent[target]
            while step is not None:
                prev, hop = step
                if narrowest is None or hop.gbps < narrowest.gbps:
                    narrowest = hop
                sites.append(prev)
                step = parent[prev]
            sites.reverse()
            paths[target] = WidestPath(
                sites=tuple(sites),
                bottleneck_gbps=bottleneck,
                limited_by=narrowest.link.limited_by if narrowest else None,
                bottleneck_link=narrowest.link.between if narrowest else None,
                rtt_ms=rtt,
                egress_usd_per_gb=egress,
            )
        return paths

    # -- request paths -------------------------------------------------------------------------
    def latency_path(self, source: str, target: str, regions: Regions = None) -> LatencyPath | None:
        """The min-latency (RTT + jitter) path between two sites, or None if unreachable."""
        self._require(source, target)
        return self.latency_paths_from(source, regions).get(target)

    def latency_paths_from(self, source: str, regions: Regions = None) -> dict[str, LatencyPath]:
        self._require(source)
        key = (source, regions)
        cached = self._latency.get(key)
        if cached is None:
            cached = self._latency[key] = self._single_source_latency(source, regions)
        return cached

    def _single_source_latency(self, source: str, regions: Regions) -> dict[str, LatencyPath]:
        if not self._allowed(source, regions):
            return {}

        def weight(u: str, v: str, attrs: dict[str, float]) -> float | None:
            if u != source and u not in self._relays:
                return None
            return attrs["latency_ms"] if self._allowed(v, regions) else None

        _, routes = nx.single_source_dijkstra(self.graph, source, weight=weight)
        out: dict[str, LatencyPath] = {}
        for target, route in routes.items():
            rtt = jitter = 0.0
            for u, v in itertools.pairwise(route):
                edge = self.graph.edges[u, v]
                rtt += edge["rtt_ms"]
                jitter += edge["jitter_ms"]
            out[target] = LatencyPath(sites=tuple(route), rtt_ms=rtt, jitter_ms=jitter)
        return out

    def _require(self, *sites: str) -> None:
        for site in sites:
            if site not in self._adjacency:
                raise PlanError(f"unknown site {site!r}")
