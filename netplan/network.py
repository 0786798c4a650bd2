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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import networkx as nx
import numpy as np

from netplan.errors import PlanError
from netplan.topology import Link, Topology, TransferSettings

__all__ = [
    "LatencyPath",
    "LimitingFactor",
    "LinkThroughput",
    "Network",
    "PathTree",
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


PathT = TypeVar("PathT")

_UNREACHED = -2
_ROOT = -1


class PathTree(Mapping[str, PathT], Generic[PathT]):
    """A single-source search result: a read-only map target -> path object, built on demand
    (1,000 path objects per source cost more than the search), plus `score(target)`: the searched
    metric (bottleneck Gbit/s or RTT + jitter ms) without building the path."""

    def __init__(
        self,
        ids: list[str],
        index: dict[str, int],
        parent: list[int],
        build: Callable[[int], PathT],
        score: list[float],
    ) -> None:
        self._ids = ids
        self._index = index
        self.parent = parent
        self._build = build
        self._built: dict[int, PathT] = {}
        self._score = score  # the searched metric per site, readable without building a path

    def score(self, target: str) -> float | None:
        i = self._index.get(target)
        if i is None or self.parent[i] == _UNREACHED:
            return None
        return self._score[i]

    def __getitem__(self, target: str) -> PathT:
        i = self._index.get(target)
        if i is None or self.parent[i] == _UNREACHED:
            raise KeyError(target)
        path = self._built.get(i)
        if path is None:
            path = self._built[i] = self._build(i)
        return path

    def __contains__(self, target: object) -> bool:
        i = self._index.get(target) if isinstance(target, str) else None
        return i is not None and self.parent[i] != _UNREACHED

    def __iter__(self) -> Iterator[str]:
        return (self._ids[i] for i, p in enumerate(self.parent) if p != _UNREACHED)

    def __len__(self) -> int:
        return sum(1 for p in self.parent if p != _UNREACHED)

    def chain(self, i: int) -> list[int]:
        """Site indices from the source to `i`."""
        out = [i]
        while (i := self.parent[i]) != _ROOT:
            out.append(i)
        out.reverse()
        return out


class Network:
    """Per-link throughput and cached path queries over one topology and one set of TCP settings.

    The networkx graph (`graph`) carries the model: sites with their region and relay flag, links
    with effective throughput, RTT, jitter and per-direction egress price. Path searches run over
    an integer-indexed adjacency list derived from it, because on large estates they run hundreds
    of times. Pure: built from frozen inputs, answers are deterministic; caches only save work.
    """

    def __init__(self, topology: Topology, settings: TransferSettings | None = None) -> None:
        self.topology = topology
        self.settings = settings if settings is not None else topology.transfer
        self.links: tuple[LinkThroughput, ...] = tuple(
            link_throughput(link, self.settings) for link in topology.links
        )
        self.graph: nx.Graph = nx.Graph()
        self.graph.add_nodes_from(
            (s.id, {"region": s.region, "relay": s.relay}) for s in topology.sites
        )
        for number, (link, tp) in enumerate(zip(topology.links, self.links, strict=True)):
            a, b = link.between
            self.graph.add_edge(
                a,
                b,
                number=number,
                throughput=tp,
                effective_gbps=tp.effective_gbps,
                rtt_ms=link.rtt_ms,
                jitter_ms=link.jitter_ms,
                latency_ms=link.rtt_ms + link.jitter_ms,
                egress_usd_per_gb={a: link.egress_from(a), b: link.egress_from(b)},
            )
        self._ids: list[str] = list(self.graph.nodes)
        self._index = {site: i for i, site in enumerate(self._ids)}
        self._regions: list[str] = [self.graph.nodes[s]["region"] for s in self._ids]
        self._relay = [bool(self.graph.nodes[s]["relay"]) for s in self._ids]
        # Per site: (neighbour, effective Gbit/s, egress $/GB leaving this site, rtt, rtt+jitter,
        # link number).
        self._adjacency: list[list[tuple[int, float, float, float, float, int]]] = [
            [
                (
                    self._index[v],
                    e["effective_gbps"],
                    e["egress_usd_per_gb"][u],
                    e["rtt_ms"],
                    e["latency_ms"],
                    e["number"],
                )
                for v, e in self.graph.adj[u].items()
            ]
            for u in self._ids
        ]
        self._min_egress = [
            min((hop[2] for hop in hops), default=math.inf) for hops in self._adjacency
        ]
        self._masks: dict[Regions, list[bool]] = {}
        self._widest: dict[tuple[str, Regions], PathTree[WidestPath]] = {}
        self._latency: dict[tuple[str, Regions], PathTree[LatencyPath]] = {}
        self._p99_rows: dict[int, np.ndarray] = {}

    # -- links ---------------------------------------------------------------------------------
    def link(self, a: str, b: str) -> LinkThroughput | None:
        """The direct link between two sites, if there is one."""
        self._require(a, b)
        edge = self.graph.get_edge_data(a, b)
        return None if edge is None else edge["throughput"]

    def min_egress_usd_per_gb(self, site: str) -> float:
        """The cheapest price of leaving `site` over any of its links (inf with no links)."""
        self._require(site)
        return self._min_egress[self._index[site]]

    # -- bulk paths ----------------------------------------------------------------------------
    def widest_path(self, source: str, target: str, regions: Regions = None) -> WidestPath | None:
        """The widest path from `source` to `target` through sites in `regions` (None: anywhere);
        None when there is no such path."""
        tree = self.widest_paths_from(source, regions)
        self._require(target)
        return tree.get(target)

    def widest_paths_from(self, source: str, regions: Regions = None) -> PathTree[WidestPath]:
        """Widest paths from `source` to every reachable site (only through `regions`)."""
        key = (source, regions)
        tree = self._widest.get(key)
        if tree is None:
            self._require(source)
            tree = self._widest[key] = self._single_source_widest(source, regions)
        return tree

    def _mask(self, regions: Regions) -> list[bool]:
        mask = self._masks.get(regions)
        if mask is None:
            mask = self._masks[regions] = [
                regions is None or region in regions for region in self._regions
            ]
        return mask

    def _single_source_widest(self, source: str, regions: Regions) -> PathTree[WidestPath]:
        # Label per site: (bottleneck, egress per GB, rtt). Order: wider, then cheaper, then
        # shorter. Dijkstra is exact for the bottleneck; the cost/RTT tie-breaks are greedy.
        n = len(self._ids)
        s = self._index[source]
        allowed, relay, adjacency = self._mask(regions), self._relay, self._adjacency
        width = [0.0] * n
        cost = [0.0] * n
        rtt = [0.0] * n
        parent = [_UNREACHED] * n
        via = [-1] * n
        if allowed[s]:
            width[s] = math.inf
            parent[s] = _ROOT
            done = bytearray(n)
            heap: list[tuple[float, float, float, int]] = [(-math.inf, 0.0, 0.0, s)]
            pop, push = heapq.heappop, heapq.heappush
            while heap:
                neg_w, c, r, u = pop(heap)
                if done[u]:
                    continue
                done[u] = 1
                if u != s and not relay[u]:
                    continue
                w = -neg_w
                for v, gbps, egress, hop_rtt, _lat, number in adjacency[u]:
                    if done[v] or not allowed[v]:
                        continue
                    b = gbps if gbps < w else w
                    nc = c + egress
                    nr = r + hop_rtt
                    wv = width[v]
                    if (
                        parent[v] == _UNREACHED
                        or b > wv
                        or (b == wv and (nc < cost[v] or (nc == cost[v] and nr < rtt[v])))
                    ):
                        width[v], cost[v], rtt[v] = b, nc, nr
                        parent[v], via[v] = u, number
                        push(heap, (-b, nc, nr, v))

        def build(i: int) -> WidestPath:
            chain = tree.chain(i)
            narrowest: LinkThroughput | None = None
            for j in chain[1:]:
                tp = self.links[via[j]]
                if narrowest is None or tp.effective_gbps < narrowest.effective_gbps:
                    narrowest = tp
            return WidestPath(
                sites=tuple(self._ids[j] for j in chain),
                bottleneck_gbps=width[i],
                limited_by=narrowest.limited_by if narrowest else None,
                bottleneck_link=narrowest.between if narrowest else None,
                rtt_ms=rtt[i],
                egress_usd_per_gb=cost[i],
            )

        tree: PathTree[WidestPath] = PathTree(self._ids, self._index, parent, build, width)
        return tree

    # -- request paths -------------------------------------------------------------------------
    def latency_path(self, source: str, target: str, regions: Regions = None) -> LatencyPath | None:
        """The min-latency (RTT + jitter) path between two sites, or None if unreachable."""
        tree = self.latency_paths_from(source, regions)
        self._require(target)
        return tree.get(target)

    def p99_ms(self, source: str, target: str, regions: Regions = None) -> float | None:
        """RTT + jitter of the min-latency path (what `latency_path(...).p99_ms` says, cheaper)."""
        tree = self.latency_paths_from(source, regions)
        self._require(target)
        return tree.score(target)

    def latency_paths_from(self, source: str, regions: Regions = None) -> PathTree[LatencyPath]:
        """Min-latency paths from `source` to every reachable site (only through `regions`)."""
        key = (source, regions)
        tree = self._latency.get(key)
        if tree is None:
            self._require(source)
            tree = self._latency[key] = self._single_source_latency(source, regions)
        return tree

    def _single_source_latency(self, source: str, regions: Regions) -> PathTree[LatencyPath]:
        n = len(self._ids)
        s = self._index[source]
        allowed, relay, adjacency = self._mask(regions), self._relay, self._adjacency
        dist = [math.inf] * n
        parent = [_UNREACHED] * n
        via = [-1] * n
        if allowed[s]:
            dist[s] = 0.0
            parent[s] = _ROOT
            done = bytearray(n)
            heap: list[tuple[float, int]] = [(0.0, s)]
            pop, push = heapq.heappop, heapq.heappush
            while heap:
                d, u = pop(heap)
                if done[u]:
                    continue
                done[u] = 1
                if u != s and not relay[u]:
                    continue
                for v, _gbps, _egress, _rtt, lat, number in adjacency[u]:
                    if done[v] or not allowed[v]:
                        continue
                    nd = d + lat
                    if nd < dist[v]:
                        dist[v] = nd
                        parent[v], via[v] = u, number
                        push(heap, (nd, v))

        def build(i: int) -> LatencyPath:
            chain = tree.chain(i)
            hops = [self.links[via[j]] for j in chain[1:]]
            return LatencyPath(
                sites=tuple(self._ids[j] for j in chain),
                rtt_ms=sum(h.rtt_ms for h in hops),
                jitter_ms=sum(h.jitter_ms for h in hops),
            )

        tree: PathTree[LatencyPath] = PathTree(self._ids, self._index, parent, build, dist)
        return tree

    # -- dense rows for the optimisers ---------------------------------------------------------
    @property
    def site_ids(self) -> tuple[str, ...]:
        """Every site, in topology order: the column order of the matrices below."""
        return tuple(self._ids)

    def site_index(self, site: str) -> int:
        self._require(site)
        return self._index[site]

    def p99_ms_matrix(self, sources: Sequence[str]) -> np.ndarray:
        """RTT + jitter of the min-latency path from each of `sources` to every site (one row per
        source, columns in `site_ids` order, inf where unreachable): the answers of
        `p99_ms(source, target)`, computed with scipy's C Dijkstra so thousands of sources stay
        fast. A site with `relay: false` has no outgoing hops, but still sends its own requests:
        its row is the min over its direct neighbours v of w(s, v) + dist(v, .)."""
        self._require(*sources)
        src = [self._index[s] for s in sources]
        missing = sorted({s for s in src if s not in self._p99_rows})
        if missing:
            self._p99_rows.update(zip(missing, self._p99_rows_for(missing), strict=True))
        out = np.full((len(src), len(self._ids)), math.inf)
        for i, s in enumerate(src):
            out[i] = self._p99_rows[s]
        return out

    def _p99_rows_for(self, src: list[int]) -> np.ndarray:
        from scipy import sparse
        from scipy.sparse.csgraph import dijkstra

        n = len(self._ids)
        rows, cols, weights = [], [], []
        for u, hops in enumerate(self._adjacency):
            if not self._relay[u]:
                continue
            for v, _gbps, _egress, _rtt, lat, _number in hops:
                rows.append(u)
                cols.append(v)
                weights.append(lat or 1e-12)  # csgraph drops explicit zero weights
        graph = sparse.csr_matrix((weights, (rows, cols)), shape=(n, n))
        first_hops = {s: [(v, lat or 1e-12) for v, _g, _e, _r, lat, _n in self._adjacency[s]]
                      for s in src if not self._relay[s]}
        needed = sorted(set(src) | {v for hops in first_hops.values() for v, _ in hops})
        out = np.full((len(src), n), math.inf)
        dist = dict(zip(needed, dijkstra(graph, directed=True, indices=needed), strict=True))
        for i, s in enumerate(src):
            row = dist[s].copy()
            for v, w in first_hops.get(s, ()):
                row = np.minimum(row, w + dist[v])
            row[s] = 0.0
            out[i] = row
        return out

    def egress_usd_per_gb_matrix(self, senders: Sequence[str]) -> np.ndarray:
        """Egress price per GB from each of `senders` to every site along its bulk (widest) path,
        one row per sender (0 where unreachable or to itself)."""
        out = np.zeros((len(senders), len(self._ids)))
        for i, sender in enumerate(senders):
            for target, path in self.widest_paths_from(sender).items():
                out[i, self._index[target]] = path.egress_usd_per_gb
        return out

    def _require(self, *sites: str) -> None:
        for site in sites:
            if site not in self._index:
                raise PlanError(f"unknown site {site!r}")
