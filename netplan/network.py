"""The network model: what a bulk TCP transfer really gets out of each link direction, the
candidate paths bulk data may take, and the paths requests take.

Theory of operation.
- Links are directed: each direction has its own capacity, loss and egress price (RTT and
  jitter are round-trip properties, shared). Per direction, N parallel TCP streams reach
  min(capacity, N * window / RTT, N * MSS * C / (RTT * sqrt(p)))
  - the window bound: one stream never has more than a receive window in flight per round trip;
  - the loss bound: Mathis et al. 1997, loss-limited congestion avoidance, C = sqrt(3/2);
  - `limited_by` names the smallest term ("capacity", "window" or "loss").
- Bulk paths are a cost-time choice, so the model offers candidates, not one answer: every
  path from source to target through at most `paths.max_relays` relay sites that no other
  candidate beats on all of $/GB (egress per hop and direction plus each relay's per-GB
  charge), bottleneck throughput, gateway $/h and hop count (a Pareto set; RTT, which adds
  milliseconds to transfers of hours, only breaks ties). Relays forward chunks as they arrive,
  so a path moves S GB in 8 S / bottleneck seconds plus one path RTT, and each relay hop is its
  own TCP connection with a shorter RTT: why a relay can be faster than a lossy or long direct
  link (Skyplane, NSDI 2023). The search meets in the middle: labels forward from the source
  for ceil((k+1)/2) hops and backward from the target for the rest, joined at a shared site,
  each side cached per site, so a pair costs about (in-degree of the target) x (labels per
  site) once the sides exist.
- For bounds, a hop-bounded Bellman-Ford over the directed edge arrays (numpy) gives the least
  $/GB from a source to every site within k + 1 hops, and the capacity into and out of each
  site bounds what any split over several paths can carry.
- Request paths are min-latency paths over RTT + jitter (p99 approximated as RTT + jitter),
  without a relay limit: requests follow the network's routing, not an overlay.
Every path query may be confined to a set of regions (data residency covers relay hops too), and
a site with `relay: false` ends paths but never forwards them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

import networkx as nx
import numpy as np

from netplan._sections import PathPolicy
from netplan.errors import PlanError
from netplan.topology import Link, Topology, TransferSettings

__all__ = [
    "BulkPath",
    "SiteTable",
    "SolverStats",
    "LatencyPath",
    "LimitingFactor",
    "LinkThroughput",
    "Network",
    "PathTree",
    "link_throughput",
]

LimitingFactor = Literal["capacity", "window", "loss"]


@dataclass(frozen=True)
class LinkThroughput:
    """Effective bulk throughput of one link direction (`between` = (sender, receiver)) and the
    three bounds it is the minimum of."""

    between: tuple[str, str]
    capacity_gbps: float
    window_gbps: float  # math.inf when RTT is 0
    loss_gbps: float  # math.inf when loss is 0 or RTT is 0
    effective_gbps: float
    limited_by: LimitingFactor
    rtt_ms: float
    jitter_ms: float
    loss_pct: float
    egress_usd_per_gb: float = 0.0  # price of leaving the sender over this link

    @property
    def sender(self) -> str:
        return self.between[0]

    @property
    def receiver(self) -> str:
        return self.between[1]


def link_throughput(
    link: Link, settings: TransferSettings, sender: str | None = None
) -> LinkThroughput:
    """min(capacity, N*window/RTT, N*MSS*C/(RTT*sqrt(p))) for `settings.streams` streams, in the
    direction leaving `sender` (default: the link's first end)."""
    a = link.between[0] if sender is None else sender
    b = link.other_end(a)
    capacity = link.bandwidth_from(a)
    loss_pct = link.loss_from(a)
    rtt_s = link.rtt_ms / 1000.0
    n = settings.streams
    window_gbps = n * settings.window_bytes * 8 / rtt_s / 1e9 if rtt_s > 0 else math.inf
    p = loss_pct / 100.0
    if rtt_s > 0 and p > 0:
        per_stream_bps = settings.mss_bytes * 8 * settings.mathis_constant / (rtt_s * math.sqrt(p))
        loss_gbps = n * per_stream_bps / 1e9
    else:
        loss_gbps = math.inf
    # Ties go to the earlier factor: exactly window- and capacity-bound reads "capacity".
    bounds: list[tuple[float, LimitingFactor]] = [
        (capacity, "capacity"),
        (window_gbps, "window"),
        (loss_gbps, "loss"),
    ]
    effective, limited_by = min(bounds, key=lambda b: b[0])
    return LinkThroughput(
        between=(a, b),
        capacity_gbps=capacity,
        window_gbps=window_gbps,
        loss_gbps=loss_gbps,
        effective_gbps=effective,
        limited_by=limited_by,
        rtt_ms=link.rtt_ms,
        jitter_ms=link.jitter_ms,
        loss_pct=loss_pct,
        egress_usd_per_gb=link.egress_from(a),
    )


_HOUR = 3600.0


@dataclass(frozen=True)
class BulkPath:
    """One way bulk data can travel from `sites[0]` to `sites[-1]` (one site: nothing moves),
    with what it costs: egress per hop and direction, and at each relay its per-GB charge and
    its gateway's $/h for as long as the transfer runs."""

    sites: tuple[str, ...]
    bottleneck_gbps: float  # math.inf for a one-site path
    limited_by: LimitingFactor | None  # factor of the bottleneck hop
    bottleneck_link: tuple[str, str] | None  # (sender, receiver) of the bottleneck hop
    rtt_ms: float
    egress_usd_per_gb: float
    relay_usd_per_gb: float = 0.0
    relay_usd_per_hour: float = 0.0

    @property
    def hops(self) -> int:
        return len(self.sites) - 1

    @property
    def relays(self) -> tuple[str, ...]:
        return self.sites[1:-1]

    @property
    def usd_per_gb(self) -> float:
        return self.egress_usd_per_gb + self.relay_usd_per_gb

    def transfer_seconds(self, size_gb: float, rate_scale: float = 1.0) -> float:
        """Seconds to move `size_gb` (at `rate_scale` of the bottleneck, e.g. a bulk share)."""
        if self.hops == 0 or size_gb <= 0:
            return 0.0
        return size_gb * 8 / (self.bottleneck_gbps * rate_scale) + self.rtt_ms / 1000.0

    def egress_usd(self, size_gb: float) -> float:
        return size_gb * self.egress_usd_per_gb

    def relay_usd(self, size_gb: float, seconds: float | None = None) -> float:
        """Relay charges: per GB at each relay, plus the gateways' $/h for the transfer's
        duration (`seconds`, default the full-speed transfer time)."""
        if seconds is None:
            seconds = self.transfer_seconds(size_gb)
        return size_gb * self.relay_usd_per_gb + self.relay_usd_per_hour * seconds / _HOUR

    def cost_usd(self, size_gb: float, rate_scale: float = 1.0) -> float:
        seconds = self.transfer_seconds(size_gb, rate_scale)
        return self.egress_usd(size_gb) + self.relay_usd(size_gb, seconds)


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

# A label of the bulk path search: ($/GB, bottleneck Gbit/s, gateway $/h, hops, RTT ms, sites
# as network indices in travel order).
_Label = tuple[float, float, float, int, float, tuple[int, ...]]
_EPS = 1e-12


def _dominates(e: _Label, n: _Label) -> bool:
    """`e` is at least as good as `n` on $/GB, bottleneck, gateway $/h and hops, and better in
    one of them or (all equal) no slower to start."""
    if (e[0] > n[0] + _EPS or e[1] < n[1] - _EPS or e[2] > n[2] + _EPS or e[3] > n[3]):
        return False
    return (e[0] < n[0] - _EPS or e[1] > n[1] + _EPS or e[2] < n[2] - _EPS or e[3] < n[3]
            or e[4] <= n[4])


def _insert(labels: list[_Label], new: _Label) -> bool:
    """Add `new` to a Pareto set unless something there dominates it; drop what it dominates."""
    for old in labels:
        if _dominates(old, new):
            return False
    labels[:] = [old for old in labels if not _dominates(new, old)]
    labels.append(new)
    return True


class PathTree(Mapping[str, PathT], Generic[PathT]):
    """A single-source search result: a read-only map target -> path object, built on demand
    (1,000 path objects per source cost more than the search), plus `score(target)`: the searched
    metric (bottleneck Gbit/s or RTT + jitter ms) without building the path."""

    def __init__(
        self,
        ids: list[str],
        index: dict[str, int],
        parent: Sequence[int] | np.ndarray,
        build: Callable[[int], PathT],
        score: Sequence[float] | np.ndarray,
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
        return float(self._score[i])

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
        while (i := int(self.parent[i])) != _ROOT:
            out.append(i)
        out.reverse()
        return out


class SiteTable:
    """Per-site attributes as arrays in `Network.site_ids` order, for the checks a large estate
    runs on thousands of candidate sites per workload (GPU counts and prices per type, regions,
    storage): one numpy expression instead of a Python loop per site."""

    def __init__(self, topology: Topology, ids: Sequence[str]) -> None:
        sites = [topology.site(i) for i in ids]
        regions = sorted({s.region for s in sites})
        self.region_code = {r: k for k, r in enumerate(regions)}
        self.region = np.array([self.region_code[s.region] for s in sites], dtype=np.int64)
        types = sorted({g for s in sites for g in (*s.gpus, *s.gpu_hour_usd)})
        self.gpu_count = {g: np.array([s.gpus.get(g, 0) for s in sites], dtype=np.int64)
                          for g in types}
        self.gpu_price = {g: np.array([s.gpu_hour_usd.get(g, 0.0) for s in sites])
                          for g in types}
        self.priced = {g: np.array([g in s.gpu_hour_usd for s in sites], dtype=bool)
                       for g in types}
        self.storage_price = np.array([s.storage_price for s in sites])
        self.storage_gb = np.array([math.inf if s.storage_tb is None else s.storage_tb * 1000
                                    for s in sites])
        self._masks: dict[frozenset[str], np.ndarray] = {}
        self._empty = np.zeros(len(sites), dtype=np.int64)

    def count(self, gpu: str) -> np.ndarray:
        return self.gpu_count.get(gpu, self._empty)

    def price(self, gpu: str) -> np.ndarray:
        return self.gpu_price.get(gpu, self._empty.astype(float))

    def in_regions(self, regions: frozenset[str]) -> np.ndarray:
        """True for sites inside `regions`."""
        mask = self._masks.get(regions)
        if mask is None:
            codes = [self.region_code[r] for r in regions if r in self.region_code]
            mask = self._masks[regions] = np.isin(self.region, codes)
        return mask


@dataclass
class SolverStats:
    """What the optimisers solved over one network (counted for the report and benchmarks):
    LP/MILP solves of the multipath flow, and the largest one's size."""

    lp_solves: int = 0
    milp_solves: int = 0
    max_variables: int = 0
    max_constraints: int = 0
    max_integers: int = 0
    splits_chosen: int = 0

    def record(self, variables: int, constraints: int, integers: int) -> None:
        if integers:
            self.milp_solves += 1
        else:
            self.lp_solves += 1
        self.max_variables = max(self.max_variables, variables)
        self.max_constraints = max(self.max_constraints, constraints)
        self.max_integers = max(self.max_integers, integers)


class Network:
    """Per-direction throughput, bulk path candidates and request paths over one topology and
    one set of TCP settings.

    The model: sites with their region and relay flag, one edge per link direction with
    effective throughput, RTT, jitter and the egress price of leaving its sender (`graph` has it
    as a networkx graph). Searches run over integer-indexed adjacency lists, because on large
    estates they run hundreds of thousands of times. Pure: built from frozen
    inputs, answers are deterministic; caches only save work.
    """

    def __init__(
        self,
        topology: Topology,
        settings: TransferSettings | None = None,
        paths: PathPolicy | None = None,
        *,
        reuse: Network | None = None,
    ) -> None:
        """`reuse`: a network over a topology that shares `Link` objects with this one (e.g.
        the same estate with one site failed); their per-direction throughput is taken from it
        instead of computed again, when the TCP settings are the same."""
        self.topology = topology
        self.settings = settings if settings is not None else topology.transfer
        self.policy = paths if paths is not None else topology.paths
        self.max_relays = self.policy.max_relays
        known = (reuse._throughput_by_link if reuse is not None
                 and reuse.settings == self.settings else {})
        # Two directions per link, in topology order: links[2i] leaves between[0].
        directions: list[LinkThroughput] = []
        for link in topology.links:
            same = known.get(id(link))
            if same is not None and same[0] is link:
                directions += same[1:]
            else:
                directions += [link_throughput(link, self.settings, end)
                               for end in link.between]
        self.links: tuple[LinkThroughput, ...] = tuple(directions)
        self._ids: list[str] = [s.id for s in topology.sites]
        self._index = {site: i for i, site in enumerate(self._ids)}
        self._regions: list[str] = [s.region for s in topology.sites]
        self._relay = [bool(s.relay) for s in topology.sites]
        policy = self.policy
        sites = topology.site_by_id
        self._relay_gb = [
            policy.relay_usd_per_gb if (x := sites[s].relay_usd_per_gb) is None else x
            for s in self._ids
        ]
        self._relay_h = [
            policy.relay_usd_per_hour if (x := sites[s].relay_usd_per_hour) is None else x
            for s in self._ids
        ]
        # Out-edges per site: (receiver, effective Gbit/s, egress $/GB leaving this site, rtt,
        # rtt+jitter, direction number in `links`); in-edges the same seen from the receiver.
        self._adjacency: list[list[tuple[int, float, float, float, float, int]]] = [
            [] for _ in self._ids
        ]
        self._incoming: list[list[tuple[int, float, float, float, float, int]]] = [
            [] for _ in self._ids
        ]
        self._direction: dict[tuple[int, int], int] = {}
        for number, tp in enumerate(self.links):
            u, v = self._index[tp.sender], self._index[tp.receiver]
            lat = tp.rtt_ms + tp.jitter_ms
            self._adjacency[u].append(
                (v, tp.effective_gbps, tp.egress_usd_per_gb, tp.rtt_ms, lat, number))
            self._incoming[v].append(
                (u, tp.effective_gbps, tp.egress_usd_per_gb, tp.rtt_ms, lat, number))
            self._direction[(u, v)] = number
        # The same edges as arrays, for the vectorised bounds.
        self._tails = np.array([self._index[tp.sender] for tp in self.links], dtype=np.int64)
        self._heads = np.array([self._index[tp.receiver] for tp in self.links], dtype=np.int64)
        self._edge_gbps = np.array([tp.effective_gbps for tp in self.links], dtype=float)
        egress = np.array([tp.egress_usd_per_gb for tp in self.links], dtype=float)
        self._edge_usd = egress  # leaving the source: egress only
        self._edge_usd_relayed = egress + np.asarray(self._relay_gb, dtype=float)[self._tails]
        self._relay_arr = np.asarray(self._relay, dtype=bool)
        self._masks: dict[Regions, list[bool]] = {}
        self._forward: dict[tuple[int, Regions], dict[int, list[_Label]]] = {}
        self._backward: dict[tuple[int, Regions], list[_Label]] = {}
        self._pairs: dict[tuple[int, int, Regions], tuple[BulkPath, ...]] = {}
        self._min_usd: dict[tuple[int, Regions], np.ndarray] = {}
        self._capacity: dict[Regions, tuple[np.ndarray, np.ndarray]] = {}
        self._latency: dict[tuple[str, Regions], PathTree[LatencyPath]] = {}
        self._p99_rows: dict[int, np.ndarray] = {}
        self._p99_pred: dict[int, np.ndarray] = {}
        self.solver_stats = SolverStats()

    @cached_property
    def _throughput_by_link(self) -> dict[int, tuple[Link, LinkThroughput, LinkThroughput]]:
        """id(link) -> (link, its two directions): what a network built with `reuse=self`
        takes instead of computing them again."""
        return {id(link): (link, self.links[2 * i], self.links[2 * i + 1])
                for i, link in enumerate(self.topology.links)}

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The model as a networkx graph (built when first asked for: the searches below run
        on arrays)."""
        graph = nx.DiGraph()
        graph.add_nodes_from(
            (s.id, {"region": s.region, "relay": s.relay}) for s in self.topology.sites
        )
        for number, tp in enumerate(self.links):
            graph.add_edge(
                tp.sender,
                tp.receiver,
                number=number,
                throughput=tp,
                effective_gbps=tp.effective_gbps,
                rtt_ms=tp.rtt_ms,
                jitter_ms=tp.jitter_ms,
                latency_ms=tp.rtt_ms + tp.jitter_ms,
                egress_usd_per_gb=tp.egress_usd_per_gb,
            )
        return graph

    @cached_property
    def site_table(self) -> SiteTable:
        return SiteTable(self.topology, self._ids)

    # -- links ---------------------------------------------------------------------------------
    def link(self, a: str, b: str) -> LinkThroughput | None:
        """The direction from `a` to `b` of the direct link between them, if there is one."""
        self._require(a, b)
        number = self._direction.get((self._index[a], self._index[b]))
        return None if number is None else self.links[number]

    def relay_usd_per_hour(self, site: str) -> float:
        """What a gateway at `site` costs per hour while it relays (site's or paths' default)."""
        self._require(site)
        return self._relay_h[self._index[site]]

    def relay_usd_per_gb(self, site: str) -> float:
        self._require(site)
        return self._relay_gb[self._index[site]]

    # -- bulk paths ----------------------------------------------------------------------------
    def paths(self, source: str, target: str, regions: Regions = None) -> tuple[BulkPath, ...]:
        """The candidate bulk paths from `source` to `target` through sites in `regions` (None:
        anywhere) and at most `max_relays` relays: the Pareto set over $/GB, bottleneck, gateway
        $/h and hops, cheapest first; the direct link is always among them when it exists and
        is allowed. Empty when there is no such path; one one-site path when source == target."""
        self._require(source, target)
        s, t = self._index[source], self._index[target]
        key = (s, t, regions)
        found = self._pairs.get(key)
        if found is None:
            found = self._pairs[key] = self._candidates(s, t, regions)
        return found

    def fastest_path(self, source: str, target: str, regions: Regions = None) -> BulkPath | None:
        """The widest candidate (ties: cheaper, then fewer hops), or None when unreachable."""
        found = self.paths(source, target, regions)
        if not found:
            return None
        return max(found, key=lambda p: (p.bottleneck_gbps, -p.usd_per_gb, -p.hops))

    def cheapest_path(
        self, source: str, target: str, regions: Regions = None
    ) -> BulkPath | None:
        """The candidate with the least $/GB (ties: wider, then fewer hops), or None."""
        found = self.paths(source, target, regions)
        return found[0] if found else None

    def direct_path(self, source: str, target: str, regions: Regions = None) -> BulkPath | None:
        """The direct link as a path, when it exists and both ends are in `regions`."""
        self._require(source, target)
        s, t = self._index[source], self._index[target]
        mask = self._mask(regions)
        number = self._direction.get((s, t))
        if number is None or not (mask[s] and mask[t]):
            return None
        tp = self.links[number]
        return self._path(
            (tp.egress_usd_per_gb, tp.effective_gbps, 0.0, 1, tp.rtt_ms, (s, t)))

    def _mask(self, regions: Regions) -> list[bool]:
        mask = self._masks.get(regions)
        if mask is None:
            mask = self._masks[regions] = [
                regions is None or region in regions for region in self._regions
            ]
        return mask

    def _depths(self) -> tuple[int, int]:
        hops = self.max_relays + 1
        forward = (hops + 1) // 2
        return forward, hops - forward

    def _forward_labels(self, s: int, regions: Regions) -> dict[int, list[_Label]]:
        """Pareto labels of paths leaving `s` with up to ceil((k+1)/2) hops, per end site."""
        key = (s, regions)
        found = self._forward.get(key)
        if found is None:
            found = self._forward[key] = self._labels(s, regions, self._depths()[0], True)
        return found

    def _backward_labels(self, t: int, regions: Regions) -> list[_Label]:
        """Pareto labels (per start site) of paths into `t` with up to floor((k+1)/2) hops,
        `t` itself included as the empty path."""
        key = (t, regions)
        found = self._backward.get(key)
        if found is None:
            by_site = self._labels(t, regions, self._depths()[1], False)
            found = self._backward[key] = [label for at in by_site.values() for label in at]
        return found

    def _labels(self, root_site: int, regions: Regions, depth: int, forward: bool
                ) -> dict[int, list[_Label]]:
        """Grow paths hop by hop from `root_site`, forward along out-edges (chains in travel
        order, growing at the end) or backward along in-edges (growing at the front), keeping
        per site the Pareto set; a site other than the root extends a path only if it relays."""
        allowed, relay = self._mask(regions), self._relay
        edges = self._adjacency if forward else self._incoming
        relay_gb, relay_h = self._relay_gb, self._relay_h
        root: _Label = (0.0, math.inf, 0.0, 0, 0.0, (root_site,))
        labels: dict[int, list[_Label]] = {root_site: [root]}
        frontier = [root] if allowed[root_site] else []
        for hops in range(1, depth + 1):
            grown: list[_Label] = []
            for cost, width, gate, _h, rtt, chain in frontier:
                u = chain[-1] if forward else chain[0]
                if u == root_site:
                    extra_gb = extra_h = 0.0
                elif relay[u]:
                    extra_gb, extra_h = relay_gb[u], relay_h[u]
                else:
                    continue  # ends paths, never forwards
                for v, gbps, egress, hop_rtt, _lat, _n in edges[u]:
                    if not allowed[v] or v in chain:
                        continue
                    label = (cost + egress + extra_gb, gbps if gbps < width else width,
                             gate + extra_h, hops, rtt + hop_rtt,
                             (*chain, v) if forward else (v, *chain))
                    at = labels.get(v)
                    if at is None:
                        labels[v] = [label]
                        grown.append(label)
                    elif _insert(at, label):
                        grown.append(label)
            frontier = grown
        return labels

    def _candidates(self, s: int, t: int, regions: Regions) -> tuple[BulkPath, ...]:
        mask = self._mask(regions)
        if not (mask[s] and mask[t]):
            return ()
        if s == t:
            return (BulkPath((self._ids[s],), math.inf, None, None, 0.0, 0.0),)
        forward = self._forward_labels(s, regions)
        relay, relay_gb, relay_h = self._relay, self._relay_gb, self._relay_h
        best: list[_Label] = []
        seen: set[tuple[int, ...]] = set()
        for bcost, bwidth, bgate, bhops, brtt, bchain in self._backward_labels(t, regions):
            y = bchain[0]
            ahead = forward.get(y)
            if not ahead:
                continue
            if y != s and y != t:
                if not relay[y]:
                    continue
                extra_gb, extra_h = relay_gb[y], relay_h[y]
            else:
                extra_gb = extra_h = 0.0
            rest = bchain[1:]
            for fcost, fwidth, fgate, fhops, frtt, fchain in ahead:
                if fhops + bhops == 0 or (rest and any(x in rest for x in fchain)):
                    continue
                chain = fchain + rest
                if chain in seen:
                    continue
                seen.add(chain)
                _insert(best, (fcost + bcost + extra_gb, min(fwidth, bwidth),
                               fgate + bgate + extra_h, fhops + bhops, frtt + brtt, chain))
        out = [self._path(label) for label in best]
        direct = self._direction.get((s, t))
        if direct is not None and not any(p.hops == 1 for p in out):
            tp = self.links[direct]
            out.append(self._path(
                (tp.egress_usd_per_gb, tp.effective_gbps, 0.0, 1, tp.rtt_ms, (s, t))))
        out.sort(key=lambda p: (p.usd_per_gb, -p.bottleneck_gbps, p.relay_usd_per_hour,
                                p.hops, p.rtt_ms))
        return tuple(out)

    def _path(self, label: _Label) -> BulkPath:
        chain = label[5]
        hops = [self.links[self._direction[(u, v)]] for u, v in zip(chain, chain[1:],
                                                                    strict=False)]
        narrowest = min(hops, key=lambda tp: tp.effective_gbps)
        egress = sum(tp.egress_usd_per_gb for tp in hops)
        return BulkPath(
            sites=tuple(self._ids[i] for i in chain),
            bottleneck_gbps=narrowest.effective_gbps,
            limited_by=narrowest.limited_by,
            bottleneck_link=narrowest.between,
            rtt_ms=sum(tp.rtt_ms for tp in hops),
            egress_usd_per_gb=egress,
            relay_usd_per_gb=sum((self._relay_gb[i] for i in chain[1:-1]), 0.0),
            relay_usd_per_hour=sum((self._relay_h[i] for i in chain[1:-1]), 0.0),
        )

    def all_paths(
        self, source: str, target: str, regions: Regions = None, limit: int = 4096
    ) -> tuple[BulkPath, ...]:
        """Every simple path within `max_relays` relays (no Pareto pruning: the multipath
        flow needs paths that lose alone but add capacity), up to `limit` of them, cheapest
        first."""
        self._require(source, target)
        s, t = self._index[source], self._index[target]
        mask, relay, out = self._mask(regions), self._relay, self._adjacency
        if s == t or not (mask[s] and mask[t]):
            return ()
        hops = self.max_relays + 1
        found: list[tuple[int, ...]] = []
        stack: list[tuple[int, ...]] = [(s,)]
        while stack and len(found) < limit:
            chain = stack.pop()
            u = chain[-1]
            if u != s and not relay[u]:
                continue
            for v, *_ in out[u]:
                if not mask[v] or v in chain:
                    continue
                if v == t:
                    found.append((*chain, v))
                elif len(chain) < hops:
                    stack.append((*chain, v))
        paths = [self._path((0.0, 0.0, 0.0, 0, 0.0, chain)) for chain in found]
        paths.sort(key=lambda p: (p.usd_per_gb, -p.bottleneck_gbps, p.hops))
        return tuple(paths)

    # -- bounds --------------------------------------------------------------------------------
    def min_usd_per_gb_from(self, source: str, regions: Regions = None) -> np.ndarray:
        """The least $/GB (egress plus relay charges) from `source` to every site through at
        most `max_relays` relays inside `regions`, in `site_ids` order (inf: out of reach; 0 to
        itself). A hop-bounded Bellman-Ford: each round extends every path by one hop, so after
        k + 1 rounds it is exact for paths of at most k + 1 hops."""
        self._require(source)
        s = self._index[source]
        key = (s, regions)
        found = self._min_usd.get(key)
        if found is not None:
            return found
        allowed = np.asarray(self._mask(regions), dtype=bool)
        dist = np.full(len(self._ids), math.inf)
        if allowed[s]:
            tails, heads = self._tails, self._heads
            usable = allowed[tails] & allowed[heads] & (heads != s)
            first = usable & (tails == s)
            onward = usable & (tails != s) & self._relay_arr[tails]
            dist[s] = 0.0
            np.minimum.at(dist, heads[first], self._edge_usd[first])
            on_tails, on_heads = tails[onward], heads[onward]
            on_usd = self._edge_usd_relayed[onward]
            for _ in range(self.max_relays):
                nxt = dist.copy()
                np.minimum.at(nxt, on_heads, dist[on_tails] + on_usd)
                if np.array_equal(nxt, dist):
                    break
                dist = nxt
        self._min_usd[key] = dist
        return dist

    def capacity_gbps(self, regions: Regions = None) -> tuple[np.ndarray, np.ndarray]:
        """(out, in): per site, the sum of effective Gbit/s over its link directions leaving
        (entering) it within `regions`: no split over any number of paths carries more."""
        found = self._capacity.get(regions)
        if found is None:
            allowed = np.asarray(self._mask(regions), dtype=bool)
            usable = allowed[self._tails] & allowed[self._heads]
            n = len(self._ids)
            out = np.bincount(self._tails[usable], self._edge_gbps[usable], minlength=n)
            into = np.bincount(self._heads[usable], self._edge_gbps[usable], minlength=n)
            found = self._capacity[regions] = (out, into)
        return found

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
            if regions is None:  # (scipy's C Dijkstra; a region mask takes the Python one)
                tree = self._latency[key] = self._latency_tree(self._index[source])
            else:
                tree = self._latency[key] = self._single_source_latency(source, regions)
        return tree

    def _latency_tree(self, s: int) -> PathTree[LatencyPath]:
        self._latency_rows([s])
        dist, pred = self._p99_rows[s], self._p99_pred[s]
        # (arrays, not lists: a list of 10,000 ints per client is most of a large estate's
        # memory)
        parent = np.where(pred >= 0, pred, _UNREACHED).astype(np.int32)
        parent[s] = _ROOT

        def build(i: int) -> LatencyPath:
            chain = tree.chain(i)
            hops = [self.links[self._direction[(u, v)]] for u, v in zip(chain, chain[1:],
                                                                         strict=False)]
            return LatencyPath(
                sites=tuple(self._ids[j] for j in chain),
                rtt_ms=sum(h.rtt_ms for h in hops),
                jitter_ms=sum(h.jitter_ms for h in hops),
            )

        tree: PathTree[LatencyPath] = PathTree(self._ids, self._index, parent, build, dist)
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
        fast."""
        self._require(*sources)
        src = [self._index[s] for s in sources]
        self._latency_rows(src)
        out = np.full((len(src), len(self._ids)), math.inf)
        for i, s in enumerate(src):
            out[i] = self._p99_rows[s]
        return out

    @cached_property
    def _latency_graph(self) -> tuple[Any, np.ndarray, dict[int, int]]:
        """The request graph for scipy: edge weights RTT + jitter, and each site with
        `relay: false` split in two, one node that only receives (its own index) and one that
        only sends (n + k), so it starts requests of its own but never forwards others'. Also
        the owner site of every node, and each such site's sending node."""
        from scipy import sparse

        n = len(self._ids)
        senders = {u: n + k for k, u in enumerate(u for u in range(n) if not self._relay[u])}
        rows, cols, weights = [], [], []
        for u, hops in enumerate(self._adjacency):
            start = senders.get(u, u)
            for v, _gbps, _egress, _rtt, lat, _number in hops:
                rows.append(start)
                cols.append(v)
                weights.append(lat or 1e-12)  # csgraph drops explicit zero weights
        size = n + len(senders)
        owner = np.arange(size)
        for u, node in senders.items():
            owner[node] = u
        graph = sparse.csr_matrix((weights, (rows, cols)), shape=(size, size))
        return graph, owner, senders

    def _latency_rows(self, src: Sequence[int]) -> None:
        """Cache the distance and predecessor rows of every source in `src` not yet known."""
        missing = sorted({s for s in src if s not in self._p99_rows})
        if not missing:
            return
        from scipy.sparse.csgraph import dijkstra

        graph, owner, senders = self._latency_graph
        n = len(self._ids)
        starts = [senders.get(s, s) for s in missing]
        dist, pred = dijkstra(graph, directed=True, indices=starts, return_predecessors=True)
        for i, s in enumerate(missing):
            row = dist[i, :n].copy()
            row[s] = 0.0
            back = pred[i, :n]
            self._p99_rows[s] = row
            self._p99_pred[s] = np.where(back >= 0, owner[np.maximum(back, 0)], -1).astype(
                np.int32)

    def egress_usd_per_gb_matrix(self, senders: Sequence[str]) -> np.ndarray:
        """$/GB from each of `senders` to every site along its cheapest bulk path within
        `max_relays` relays (egress plus relay charges; `min_usd_per_gb_from`), one row per
        sender, 0 where out of reach (such a site cannot be synced to, and the sync plan says
        so) or to itself."""
        out = np.zeros((len(senders), len(self._ids)))
        for i, sender in enumerate(senders):
            row = self.min_usd_per_gb_from(sender)
            out[i] = np.where(np.isfinite(row), row, 0.0)
        return out

    def _require(self, *sites: str) -> None:
        for site in sites:
            if site not in self._index:
                raise PlanError(f"unknown site {site!r}")
