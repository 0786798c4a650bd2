"""Selective shard replication for vector indexes: which sites hold a copy of which shard.

Theory of operation. Each index has a primary site and shards k = 1..K. A query from querying site q
fans out to every shard in the index's fanout (all shards by default) in parallel, so q's p99 is the
slowest of its shards: for each shard, the replica that serves q must satisfy
``latency_p99_ms(q, replica) + search_ms <= latency_budget_ms`` (latency = path RTT + jitter p99).
"Served by the nearest replica that fits" is modelled as coverage: for every (q, shard k) at least
one chosen replica of k lies inside q's budget, i.e. ``sum_{s fits q} x[k, s] >= 1``.

Decision variables x[k, s] in {0, 1} (shard k has a replica at site s; x[k, primary] = 1).
Constraints: coverage as above; every shard has replicas in >= replicas_min distinct failure
domains (z[k, d] <= sum_{s in d} x[k, s], z in [0, 1], sum_d z[k, d] >= replicas_min; z may be
continuous because x is integral); stored GB at a site <= its free storage (shared by all indexes).
Objective (USD per day): storage (shard_gb * price per GB-month / 30.4375 days) + sync egress
(every replica other than the primary receives update_gb_per_day / shards per day along the
primary -> site path) + query egress when `response_kb_per_query` > 0 (then assignment variables
y[q, k, s] route each querying site's traffic to one fitting replica, and the response bytes are
charged on replica -> q).

Solved exactly with scipy.optimize.milp (HiGHS); `solve_greedy` is the heuristic, and
`replicate_shards` runs both and reports the optimality gap. Candidate sites are pruned without
losing optimality when storage does not bind: a site that fits no querying site only helps the
failure-domain count, so only the cheapest such site of the cheapest (replicas_min + domains of the
covering sites) domains can be in an optimum (exchange argument). `prune=False` keeps every site.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from netplan._sections import DEFAULT_STORAGE_USD_PER_GB_MONTH
from netplan.network import Network
from netplan.topology import Site, Topology

__all__ = [
    "DAYS_PER_MONTH",
    "MilpStats",
    "CostBreakdown",
    "QueryingSiteLatency",
    "ReplicaSite",
    "ShardMiss",
    "ShardPlacement",
    "ShardReplication",
    "VectorIndexSpec",
    "diagnose",
    "evaluate",
    "index_specs",
    "replica_sites",
    "replicate_shards",
    "shard_replication",
    "solve_greedy",
    "solve_milp",
]

DAYS_PER_MONTH = 365.25 / 12  # cloud storage prices are quoted per GB-month; 30.4375 days
_FIT_EPS_MS = 1e-9


@dataclass(frozen=True)
class ReplicaSite:
    """A site that may hold shard replicas."""

    id: str
    failure_domain: str
    storage_usd_per_gb_month: float
    storage_free_gb: float = math.inf


@dataclass(frozen=True)
class VectorIndexSpec:
    id: str
    primary: str
    shard_gb: tuple[float, ...]
    update_gb_per_day: float
    queries: tuple[tuple[str, float], ...]  # (querying site, qps)
    latency_budget_ms: float
    search_ms: float
    replicas_min: int = 1
    fanout: tuple[int, ...] | None = None  # shard numbers (0-based) a query touches; None = all
    response_kb_per_query: float = 0.0  # 0 = remote query egress not modelled

    @property
    def shards(self) -> int:
        return len(self.shard_gb)

    def fanout_shards(self) -> tuple[int, ...]:
        return tuple(range(self.shards)) if self.fanout is None else self.fanout

    def update_gb_per_shard_day(self) -> float:
        return self.update_gb_per_day / self.shards if self.shards else 0.0

    def response_gb_per_day(self, qps: float) -> float:
        # one response per shard per query: qps * 86400 s * KB / 1e6 KB per GB
        return qps * 86400.0 * self.response_kb_per_query / 1e6


@dataclass(frozen=True, eq=False)
class _Rows:
    """The rows of the network's latency and egress matrices that the solvers read, as arrays
    indexed by the network's site numbers (`Network.site_ids`). Built once per solve from the
    `Network` (`_rows`); the network model itself is `Network`, nothing here recomputes paths.

    `latency_p99_ms[i]`: p99 of one request/response from querying site i (and from each
    primary) to every site (path RTT + jitter; inf when unreachable).
    `egress_usd_per_gb[i]`: price of data sent from i to every site along its bulk path, for
    every primary (and every site when query egress is modelled).
    """

    site_ids: tuple[str, ...]
    index: Mapping[str, int]
    latency_p99_ms: Mapping[int, np.ndarray]
    egress_usd_per_gb: Mapping[int, np.ndarray]

    def latency(self, sources: np.ndarray) -> np.ndarray:
        n = len(self.site_ids)
        if not len(sources):
            return np.zeros((0, n))
        return np.stack([self.latency_p99_ms[int(q)] for q in sources])

    def egress(self, source: int, target: int) -> float:
        return float(self.egress_usd_per_gb[source][target])

    def egress_into(self, sources: np.ndarray, target: int) -> np.ndarray:
        return np.array([self.egress_usd_per_gb[int(s)][target] for s in sources], dtype=float)


def _rows(network: Network, specs: Sequence[VectorIndexSpec]) -> _Rows:
    ids = network.site_ids
    sources = sorted({q for spec in specs for q, _ in spec.queries}
                     | {spec.primary for spec in specs}, key=network.site_index)
    latency = network.p99_ms_matrix(sources)
    senders = ([spec.primary for spec in specs]
               if not any(spec.response_kb_per_query > 0 for spec in specs) else list(ids))
    senders = sorted(set(senders), key=network.site_index)
    egress = network.egress_usd_per_gb_matrix(senders)
    return _Rows(
        ids, {s: i for i, s in enumerate(ids)},
        {network.site_index(s): latency[j] for j, s in enumerate(sources)},
        {network.site_index(s): egress[j] for j, s in enumerate(senders)})


@dataclass(frozen=True)
class ShardPlacement:
    shard: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class QueryingSiteLatency:
    site: str
    p99_ms: float
    headroom_ms: float
    worst_shard: int


@dataclass(frozen=True)
class CostBreakdown:
    storage_usd_per_day: float
    sync_egress_usd_per_day: float
    query_egress_usd_per_day: float

    @property
    def total_usd_per_day(self) -> float:
        return (self.storage_usd_per_day + self.sync_egress_usd_per_day
                + self.query_egress_usd_per_day)


@dataclass(frozen=True)
class ShardMiss:
    """A querying site that no placement can serve for one shard within the budget."""

    querying_site: str
    shard: int
    best_p99_ms: float
    miss_ms: float
    best_site: str | None

    def __str__(self) -> str:
        if self.best_site is None:
            return f"querying site {self.querying_site}: shard {self.shard} has no reachable site"
        return (
            f"querying site {self.querying_site} misses the budget for shard {self.shard} by "
            f"{self.miss_ms:.1f} ms (best p99 {self.best_p99_ms:.1f} ms, from {self.best_site})"
        )


@dataclass(frozen=True)
class ShardReplication:
    """The outcome for one index: placement, per querying site p99, costs, and the greedy gap."""

    index: str
    solver: str
    feasible: bool
    reason: str
    shards: tuple[ShardPlacement, ...] = ()
    latencies: tuple[QueryingSiteLatency, ...] = ()
    cost: CostBreakdown | None = None
    greedy_cost: CostBreakdown | None = None
    misses: tuple[ShardMiss, ...] = ()

    @property
    def objective_usd_per_day(self) -> float | None:
        return None if self.cost is None else self.cost.total_usd_per_day

    @property
    def greedy_objective_usd_per_day(self) -> float | None:
        return None if self.greedy_cost is None else self.greedy_cost.total_usd_per_day

    @property
    def gap(self) -> float | None:
        """(greedy - exact) / exact; 0 when both cost nothing."""
        best, greedy = self.objective_usd_per_day, self.greedy_objective_usd_per_day
        if best is None or greedy is None:
            return None
        return 0.0 if best <= 0 else (greedy - best) / best

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "solver": self.solver,
            "objective_usd_per_day": _round(self.objective_usd_per_day),
            "greedy_objective_usd_per_day": _round(self.greedy_objective_usd_per_day),
            "gap": _round(self.gap),
            "shards": [{"shard": p.shard, "sites": list(p.sites)} for p in self.shards],
            "p99_ms": {q.site: round(q.p99_ms, 3) for q in self.latencies},
            "headroom_ms": {q.site: round(q.headroom_ms, 3) for q in self.latencies},
            "cost": None if self.cost is None else {
                "storage_usd_per_day": _round(self.cost.storage_usd_per_day),
                "sync_egress_usd_per_day": _round(self.cost.sync_egress_usd_per_day),
                "query_egress_usd_per_day": _round(self.cost.query_egress_usd_per_day),
            },
            "feasible": self.feasible,
            "reason": self.reason,
            "misses": [{"querying_site": m.querying_site, "shard": m.shard,
                        "best_p99_ms": _round(m.best_p99_ms if math.isfinite(m.best_p99_ms)
                                              else None),
                        "miss_ms": _round(m.miss_ms if math.isfinite(m.miss_ms) else None),
                        "best_site": m.best_site} for m in self.misses],
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


# --------------------------------------------------------------------------------------------
# Per-index geometry: who fits whom, what a replica costs, which sites are worth considering.


@dataclass
class _Geometry:
    spec: VectorIndexSpec
    primary: int  # network index of the primary
    queriers: np.ndarray  # network indexes of querying sites
    qps: np.ndarray
    fits: np.ndarray  # bool [n_queriers, n_sites]
    latency: np.ndarray  # float [n_queriers, n_sites] incl. search_ms
    replica_cost: np.ndarray  # float [n_shards, n_sites] storage + sync egress per day
    candidates: np.ndarray  # sorted network indexes considered by the solvers


def _geometry(
    spec: VectorIndexSpec,
    sites: Sequence[ReplicaSite],
    network: _Rows,
    site_arrays: _SiteArrays,
    prune: bool,
) -> _Geometry:
    primary = network.index[spec.primary]
    queriers = np.array([network.index[q] for q, _ in spec.queries], dtype=np.int64)
    qps = np.array([v for _, v in spec.queries], dtype=float)
    latency = network.latency(queriers) + spec.search_ms
    fits = latency <= spec.latency_budget_ms + _FIT_EPS_MS
    gb = np.asarray(spec.shard_gb, dtype=float)
    storage = gb[:, None] * (site_arrays.usd_per_gb_month / DAYS_PER_MONTH)[None, :]
    sync = spec.update_gb_per_shard_day() * network.egress_usd_per_gb[primary]
    replica_cost = storage + sync[None, :]
    replica_cost[:, primary] = storage[:, primary]  # the primary is not synced to itself
    n = len(network.site_ids)
    if not prune:
        return _Geometry(spec, primary, queriers, qps, fits, latency, replica_cost,
                         np.arange(n))
    covering = np.zeros(n, dtype=bool)
    if len(queriers):
        covering |= fits.any(axis=0)
    covering[primary] = True
    keep = covering.copy()
    domain = site_arrays.domain
    k_domains = spec.replicas_min + len(np.unique(domain[covering]))
    # cheapest non-covering site per domain, for every distinct shard size
    for row in np.unique(replica_cost, axis=0):
        order = np.lexsort((np.arange(n), row))
        seen: set[int] = set()
        for s in order:
            if covering[s] or domain[s] in seen:
                continue
            seen.add(int(domain[s]))
            keep[s] = True
            if len(seen) >= k_domains:
                break
    return _Geometry(spec, primary, queriers, qps, fits, latency, replica_cost,
                     np.flatnonzero(keep))


@dataclass
class _SiteArrays:
    usd_per_gb_month: np.ndarray
    free_gb: np.ndarray
    domain: np.ndarray  # domain number per network site
    known: np.ndarray  # bool: site is a ReplicaSite (others cannot hold replicas)


def _site_arrays(sites: Sequence[ReplicaSite], network: _Rows) -> _SiteArrays:
    n = len(network.site_ids)
    usd = np.zeros(n)
    free = np.zeros(n)  # a network node that is not a ReplicaSite stores nothing
    domain = np.arange(n) + 10**9
    known = np.zeros(n, dtype=bool)
    domains: dict[str, int] = {}
    for site in sites:
        i = network.index[site.id]
        usd[i] = site.storage_usd_per_gb_month
        free[i] = site.storage_free_gb
        domain[i] = domains.setdefault(site.failure_domain, len(domains))
        known[i] = True
    return _SiteArrays(usd, free, domain, known)


# --------------------------------------------------------------------------------------------
# Evaluation shared by every solver, so objectives are compared on one definition.


def _serving(geo: _Geometry, q: int, replicas: Sequence[int], network: _Rows) -> int | None:
    """The replica serving querying site q: the fitting one with the least response egress,
    nearest first on ties; None when no replica fits."""
    qsite = int(geo.queriers[q])
    best: tuple[float, float, int] | None = None
    for s in replicas:
        if not geo.fits[q, s]:
            continue
        egress = network.egress(s, qsite) if geo.spec.response_kb_per_query > 0 else 0.0
        key = (egress, float(geo.latency[q, s]), s)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def evaluate(
    spec: VectorIndexSpec,
    placement: Sequence[Sequence[str]],
    network: Network,
    sites: Sequence[ReplicaSite],
) -> tuple[CostBreakdown, tuple[QueryingSiteLatency, ...]]:
    """Cost per day and per querying site p99 of a placement (shard -> replica sites)."""
    rows = _rows(network, [spec])
    arrays = _site_arrays(sites, rows)
    geo = _geometry(spec, sites, rows, arrays, prune=False)
    return _evaluate(geo, [[rows.index[s] for s in p] for p in placement], rows, arrays)


def _evaluate(
    geo: _Geometry, placement: Sequence[Sequence[int]], network: _Rows, arrays: _SiteArrays
) -> tuple[CostBreakdown, tuple[QueryingSiteLatency, ...]]:
    spec = geo.spec
    gb = spec.shard_gb
    storage = sync = query = 0.0
    per_shard_update = spec.update_gb_per_shard_day()
    for k, replicas in enumerate(placement):
        for s in replicas:
            storage += gb[k] * arrays.usd_per_gb_month[s] / DAYS_PER_MONTH
            if s != geo.primary:
                sync += per_shard_update * network.egress(geo.primary, s)
    latencies = []
    fanout = spec.fanout_shards()
    for q in range(len(geo.queriers)):
        worst, worst_shard = 0.0, fanout[0] if fanout else 0
        qsite = int(geo.queriers[q])
        for k in fanout:
            served = _serving(geo, q, placement[k], network)
            if served is None:  # nothing fits: report the nearest replica's latency
                s = min(placement[k], key=lambda r: float(geo.latency[q, r]))
            else:
                s = served
                if spec.response_kb_per_query > 0:
                    query += (spec.response_gb_per_day(float(geo.qps[q]))
                              * network.egress(s, qsite))
            ms = float(geo.latency[q, s])
            if ms > worst:
                worst, worst_shard = ms, k
        latencies.append(QueryingSiteLatency(
            site=network.site_ids[qsite], p99_ms=worst,
            headroom_ms=spec.latency_budget_ms - worst, worst_shard=worst_shard))
    return CostBreakdown(storage, sync, query), tuple(latencies)


# --------------------------------------------------------------------------------------------
# Exact MILP.


class _Builder:
    """Accumulates variables and sparse constraint rows for scipy.optimize.milp."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integral: list[int] = []
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []

    def add_vars(self, cost: np.ndarray, lb: float, ub: float, integral: bool) -> int:
        start = len(self.cost)
        self.cost.extend(cost.tolist())
        self.lb.extend([lb] * len(cost))
        self.ub.extend([ub] * len(cost))
        self.integral.extend([1 if integral else 0] * len(cost))
        return start

    def add_row(self, cols: np.ndarray, vals: np.ndarray, lo: float, hi: float) -> None:
        r = len(self.row_lb)
        self.rows.append(np.full(len(cols), r, dtype=np.int64))
        self.cols.append(np.asarray(cols, dtype=np.int64))
        self.vals.append(np.asarray(vals, dtype=float))
        self.row_lb.append(lo)
        self.row_ub.append(hi)

    def solve(self, time_limit_s: float | None, mip_rel_gap: float
              ) -> tuple[np.ndarray | None, bool]:
        """The solution (None if none was found) and whether the time limit cut the search."""
        # Imported here: scipy.optimize takes a second to import and most plans never need it.
        from scipy import sparse
        from scipy.optimize import Bounds, LinearConstraint, milp

        n = len(self.cost)
        a = sparse.csr_matrix(
            (np.concatenate(self.vals) if self.vals else np.zeros(0),
             (np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64),
              np.concatenate(self.cols) if self.cols else np.zeros(0, dtype=np.int64))),
            shape=(len(self.row_lb), n),
        )
        options: dict[str, Any] = {"mip_rel_gap": mip_rel_gap, "presolve": True}
        if time_limit_s is not None:
            options["time_limit"] = time_limit_s
        res = milp(
            c=np.asarray(self.cost),
            integrality=np.asarray(self.integral),
            bounds=Bounds(np.asarray(self.lb), np.asarray(self.ub)),
            constraints=[LinearConstraint(a, np.asarray(self.row_lb), np.asarray(self.row_ub))]
            if self.row_lb else [],
            options=options,
        )
        timed_out = res.status == 1
        if res.x is None or res.status not in (0, 1):  # 1 = time limit (best point found)
            return None, timed_out
        return np.asarray(res.x), timed_out


def _add_index(b: _Builder, geo: _Geometry, arrays: _SiteArrays, network: _Rows,
               capacity_terms: dict[int, list[tuple[int, float]]]) -> Callable[[np.ndarray],
                                                                                list[list[int]]]:
    spec = geo.spec
    cand = geo.candidates
    m = len(cand)
    pos = {int(s): j for j, s in enumerate(cand)}
    x0 = b.add_vars(geo.replica_cost[:, cand].reshape(-1), 0.0, 1.0, True)
    pj = pos[geo.primary]
    for k in range(spec.shards):
        b.lb[x0 + k * m + pj] = 1.0  # the primary always holds every shard
        for j, s in enumerate(cand):
            if arrays.known[s] or s == geo.primary:
                capacity_terms.setdefault(int(s), []).append((x0 + k * m + j, spec.shard_gb[k]))
            else:
                b.ub[x0 + k * m + j] = 0.0
    fanout = spec.fanout_shards()
    fit_cols = [np.array([pos[int(s)] for s in np.flatnonzero(geo.fits[q]) if int(s) in pos],
                         dtype=np.int64) for q in range(len(geo.queriers))]
    egress_modelled = spec.response_kb_per_query > 0
    for q, cols in enumerate(fit_cols):
        qsite = int(geo.queriers[q])
        for k in fanout:
            xs = x0 + k * m + cols
            if not egress_modelled:
                b.add_row(xs, np.ones(len(cols)), 1.0, math.inf)
                continue
            gb_day = spec.response_gb_per_day(float(geo.qps[q]))
            y0 = b.add_vars(gb_day * network.egress_into(cand[cols], qsite), 0.0, 1.0, False)
            ys = y0 + np.arange(len(cols))
            b.add_row(ys, np.ones(len(cols)), 1.0, 1.0)
            for y, x in zip(ys, xs, strict=True):
                b.add_row(np.array([y, x]), np.array([1.0, -1.0]), -math.inf, 0.0)
    # failure domains
    dom = arrays.domain[cand]
    uniq, counts = np.unique(dom, return_counts=True)
    multi = set(uniq[counts > 1].tolist())
    for k in range(spec.shards):
        count_cols: list[int] = []
        for d in uniq:
            members = np.flatnonzero(dom == d)
            if int(d) not in multi:
                count_cols.append(x0 + k * m + int(members[0]))
                continue
            z = b.add_vars(np.zeros(1), 0.0, 1.0, False)
            b.add_row(np.concatenate(([z], x0 + k * m + members)),
                      np.concatenate(([1.0], -np.ones(len(members)))), -math.inf, 0.0)
            count_cols.append(z)
        b.add_row(np.array(count_cols), np.ones(len(count_cols)), float(spec.replicas_min),
                  math.inf)

    def decode(sol: np.ndarray) -> list[list[int]]:
        xs = sol[x0:x0 + spec.shards * m].reshape(spec.shards, m)
        return [[int(cand[j]) for j in np.flatnonzero(xs[k] > 0.5)] for k in range(spec.shards)]

    return decode


def _add_capacity(b: _Builder, arrays: _SiteArrays, terms: dict[int, list[tuple[int, float]]],
                  free_gb: np.ndarray) -> None:
    for s, items in terms.items():
        if math.isinf(free_gb[s]):
            continue
        cols = np.array([c for c, _ in items], dtype=np.int64)
        vals = np.array([v for _, v in items])
        b.add_row(cols, vals, -math.inf, float(free_gb[s]))


def _shard_classes(spec: VectorIndexSpec) -> list[list[int]]:
    """Shards with the same size and the same fanout membership are interchangeable."""
    fan = set(spec.fanout_shards())
    classes: dict[tuple[float, bool], list[int]] = {}
    for k, gb in enumerate(spec.shard_gb):
        classes.setdefault((gb, k in fan), []).append(k)
    return list(classes.values())


def _representatives(spec: VectorIndexSpec, classes: list[list[int]]) -> VectorIndexSpec:
    reps = [c[0] for c in classes]
    fan = set(spec.fanout_shards())
    return replace(
        spec,
        shard_gb=tuple(spec.shard_gb[k] for k in reps),
        update_gb_per_day=spec.update_gb_per_shard_day() * len(reps),  # same GB per shard
        fanout=tuple(i for i, k in enumerate(reps) if k in fan),
    )


@dataclass
class MilpStats:
    """What the exact solver did, for benchmarks and reports."""

    problems: int = 0
    binaries: int = 0
    constraints: int = 0
    reduced_indexes: int = 0  # indexes solved as one representative per identical-shard class
    timed_out: int = 0
    # Every index solved alone against the full storage, and the union fitted the storage:
    # that is the joint optimum (a relaxation's optimum that is feasible for the joint problem).
    split_certified: bool = False


def solve_milp(
    indexes: Sequence[VectorIndexSpec],
    sites: Sequence[ReplicaSite],
    network: Network,
    **options: Any,
) -> dict[str, tuple[tuple[str, ...], ...] | None]:
    """Exact placement (`_solve_milp`, whose docstring has the options) on `network`."""
    return _solve_milp(indexes, sites, _rows(network, indexes), **options)


def _solve_milp(
    indexes: Sequence[VectorIndexSpec],
    sites: Sequence[ReplicaSite],
    network: _Rows,
    *,
    decompose: bool = False,
    prune: bool = True,
    reduce_identical_shards: bool = True,
    split_when_uncoupled: bool = True,
    time_limit_s: float | None = None,
    mip_rel_gap: float = 1e-7,
    stats: MilpStats | None = None,
) -> dict[str, tuple[tuple[str, ...], ...] | None]:
    """Exact placement. Monolithic (storage shared by all indexes in one MILP) unless `decompose`:
    then one MILP per index in order, each seeing the storage the earlier ones left.

    Identical-shard reduction (exact): when no candidate site's storage can bind (its free GB is
    at least everything the problem could put there), shards are independent, and shards of equal
    size and fanout membership have the same optimum; one representative per class is solved.

    Split certificate (exact, `split_when_uncoupled`): storage is the only thing coupling indexes.
    Each index is first solved alone against the full storage (a relaxation of the joint
    problem); if the union of those optima fits every site's storage, it is the joint optimum and
    the monolithic MILP is never built. Otherwise the monolithic (or sequential) MILP runs.
    """
    arrays = _site_arrays(sites, network)
    stats = stats if stats is not None else MilpStats()
    if split_when_uncoupled and len(indexes) > 1:
        alone: dict[str, tuple[tuple[str, ...], ...] | None] = {}
        used = np.zeros(len(arrays.free_gb))
        for spec in indexes:
            one = _solve_milp([spec], sites, network, prune=prune,
                             reduce_identical_shards=reduce_identical_shards,
                             split_when_uncoupled=False, time_limit_s=time_limit_s,
                             mip_rel_gap=mip_rel_gap, stats=stats)
            alone.update(one)
            for k, holders in enumerate(one[spec.id] or ()):
                for holder in holders:
                    used[network.index[holder]] += spec.shard_gb[k]
        if (all(v is not None for v in alone.values()) and stats.timed_out == 0
                and bool(np.all(used <= arrays.free_gb + 1e-9))):
            stats.split_certified = True
            return alone
    out: dict[str, tuple[tuple[str, ...], ...] | None] = {}
    groups = [[spec] for spec in indexes] if decompose else [list(indexes)]
    free = arrays.free_gb.copy()
    for group in groups:
        geos = [_geometry(spec, sites, network, arrays, prune) for spec in group]
        potential = np.zeros(len(free))
        for geo in geos:
            potential[geo.candidates] += sum(geo.spec.shard_gb)
        b = _Builder()
        terms: dict[int, list[tuple[int, float]]] = {}
        decoders = []
        for spec, geo in zip(group, geos, strict=True):
            classes = _shard_classes(spec)
            bindable = bool(np.any(potential[geo.candidates] > free[geo.candidates] + 1e-9))
            if reduce_identical_shards and not bindable and len(classes) < spec.shards:
                reduced = _representatives(spec, classes)
                decode = _add_index(b, _geometry(reduced, sites, network, arrays, prune), arrays,
                                    network, terms)
                decoders.append((spec, _expand(decode, classes, spec.shards)))
                stats.reduced_indexes += 1
            else:
                decoders.append((spec, _add_index(b, geo, arrays, network, terms)))
        _add_capacity(b, arrays, terms, free)
        stats.problems += 1
        stats.binaries += sum(b.integral)
        stats.constraints += len(b.row_lb)
        sol, timed_out = b.solve(time_limit_s, mip_rel_gap)
        stats.timed_out += int(timed_out)
        for spec, decode in decoders:
            if sol is None:
                out[spec.id] = None
                continue
            placement = decode(sol)
            for k, replicas in enumerate(placement):
                for s in replicas:
                    free[s] -= spec.shard_gb[k]
            out[spec.id] = tuple(tuple(network.site_ids[s] for s in p) for p in placement)
    return out


def _expand(decode: Callable[[np.ndarray], list[list[int]]], classes: list[list[int]],
            shards: int) -> Callable[[np.ndarray], list[list[int]]]:
    def full(sol: np.ndarray) -> list[list[int]]:
        reps = decode(sol)
        placement: list[list[int]] = [[] for _ in range(shards)]
        for rep, members in zip(reps, classes, strict=True):
            for k in members:
                placement[k] = list(rep)
        return placement

    return full


# --------------------------------------------------------------------------------------------
# Greedy heuristic.


def solve_greedy(
    indexes: Sequence[VectorIndexSpec],
    sites: Sequence[ReplicaSite],
    network: Network,
    *,
    prune: bool = True,
) -> dict[str, tuple[tuple[str, ...], ...] | None]:
    """The greedy heuristic (`_solve_greedy`) on `network`."""
    return _solve_greedy(indexes, sites, _rows(network, indexes), prune=prune)


def _solve_greedy(
    indexes: Sequence[VectorIndexSpec],
    sites: Sequence[ReplicaSite],
    network: _Rows,
    *,
    prune: bool = True,
) -> dict[str, tuple[tuple[str, ...], ...] | None]:
    """Per shard: start at the primary; add the site covering the most still-uncovered querying
    sites per dollar until all are covered; add the cheapest site of a new failure domain until
    replicas_min domains hold a copy; then drop the costliest replicas that became redundant."""
    arrays = _site_arrays(sites, network)
    free = arrays.free_gb.copy()
    out: dict[str, tuple[tuple[str, ...], ...] | None] = {}
    for spec in indexes:
        geo = _geometry(spec, sites, network, arrays, prune)
        cand = np.array([int(s) for s in geo.candidates if arrays.known[s]], dtype=np.int64)
        fits_c = geo.fits[:, cand]
        fanout = set(spec.fanout_shards())
        placement: list[list[int]] | None = []
        # The greedy is deterministic in (size, queried, which candidates still have room, the
        # primary's room): identical shards that meet the same storage repeat its answer.
        memo: dict[tuple[float, bool, bytes, bool], list[int] | None] = {}
        for k in range(spec.shards):
            gb = spec.shard_gb[k]
            key = (gb, k in fanout, (free[cand] >= gb - 1e-9).tobytes(),
                   bool(free[geo.primary] >= gb - 1e-9))
            if key not in memo:
                memo[key] = _greedy_shard(geo, k, k in fanout, cand, fits_c, arrays, free)
            chosen = memo[key]
            if chosen is None:
                placement = None
                break
            for s in chosen:
                free[s] -= spec.shard_gb[k]
            assert placement is not None
            placement.append(chosen)
        if placement is None:
            out[spec.id] = None
        else:
            out[spec.id] = tuple(tuple(network.site_ids[s] for s in p) for p in placement)
    return out


def _greedy_shard(geo: _Geometry, k: int, queried: bool, cand: np.ndarray, fits_c: np.ndarray,
                  arrays: _SiteArrays, free: np.ndarray) -> list[int] | None:
    gb = geo.spec.shard_gb[k]
    if free[geo.primary] < gb - 1e-9:
        return None
    cost_c = geo.replica_cost[k, cand]
    usable = (free[cand] >= gb - 1e-9) & (cand != geo.primary)
    picked = np.zeros(len(cand), dtype=bool)
    chosen = [geo.primary]
    n_q = len(geo.queriers) if queried else 0
    covered = geo.fits[:, geo.primary].copy() if n_q else np.ones(0, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        while n_q and not covered.all():
            gain = (fits_c & ~covered[:, None]).sum(axis=0)
            valid = usable & ~picked & (gain > 0)
            if not valid.any():
                return None
            score = np.where(cost_c > 0, gain / cost_c, np.inf)
            score[~valid] = -1.0
            j = int(np.argmax(score))  # first best: lowest site index on ties
            picked[j] = True
            chosen.append(int(cand[j]))
            covered |= fits_c[:, j]
    domain_c = arrays.domain[cand]
    domains = {int(arrays.domain[s]) for s in chosen}
    while len(domains) < geo.spec.replicas_min:
        options = usable & ~picked & ~np.isin(domain_c, list(domains))
        if not options.any():
            return None
        idx = np.flatnonzero(options)
        j = int(idx[np.lexsort((cand[idx], cost_c[idx]))[0]])
        picked[j] = True
        chosen.append(int(cand[j]))
        domains.add(int(domain_c[j]))
    cost = geo.replica_cost[k]
    for s in sorted(chosen[1:], key=lambda s: -cost[s]):
        rest = [r for r in chosen if r != s]
        if len({int(arrays.domain[r]) for r in rest}) < geo.spec.replicas_min:
            continue
        if n_q and not geo.fits[:, rest].any(axis=1).all():
            continue
        chosen = rest
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# Diagnosis and the report-level entry point.


def diagnose(spec: VectorIndexSpec, sites: Sequence[ReplicaSite], network: Network) -> str:
    """Why no placement exists: the querying site and shard that miss and by how much, too few
    failure domains, or storage."""
    return _diagnose(spec, sites, _rows(network, [spec]))


def _diagnose(spec: VectorIndexSpec, sites: Sequence[ReplicaSite], network: _Rows) -> str:
    arrays = _site_arrays(sites, network)
    geo = _geometry(spec, sites, network, arrays, prune=False)
    misses = _misses(geo, arrays, network)
    if misses:
        return "; ".join(str(m) for m in misses)
    gb_max = max(spec.shard_gb, default=0.0)
    able = [s for s in range(len(network.site_ids))
            if (arrays.known[s] or s == geo.primary) and arrays.free_gb[s] >= gb_max - 1e-9]
    n_domains = len({int(arrays.domain[s]) for s in able})
    if n_domains < spec.replicas_min:
        return (f"replicas_min is {spec.replicas_min} but only {n_domains} failure domain(s) "
                f"have sites with room for a {gb_max:g} GB shard")
    if arrays.free_gb[geo.primary] < sum(spec.shard_gb) - 1e-9:
        return (f"primary site {spec.primary} has {arrays.free_gb[geo.primary]:g} GB free, "
                f"the index needs {sum(spec.shard_gb):g} GB")
    return "site storage cannot hold every replica the latency budget and replicas_min require"


def _misses(geo: _Geometry, arrays: _SiteArrays, network: _Rows) -> tuple[ShardMiss, ...]:
    spec = geo.spec
    out = []
    n = len(network.site_ids)
    for k in spec.fanout_shards():
        holders = np.array([s for s in range(n) if (arrays.known[s] or s == geo.primary)
                            and arrays.free_gb[s] >= spec.shard_gb[k] - 1e-9], dtype=np.int64)
        for q in range(len(geo.queriers)):
            if len(holders) and geo.fits[q, holders].any():
                continue
            qsite = network.site_ids[int(geo.queriers[q])]
            if not len(holders) or math.isinf(float(geo.latency[q, holders].min())):
                out.append(ShardMiss(qsite, k, math.inf, math.inf, None))
                continue
            j = int(holders[int(np.argmin(geo.latency[q, holders]))])
            best = float(geo.latency[q, j])
            out.append(ShardMiss(qsite, k, best, best - spec.latency_budget_ms,
                                 network.site_ids[j]))
    return tuple(out)


def replicate_shards(
    indexes: Sequence[VectorIndexSpec],
    sites: Sequence[ReplicaSite],
    network: Network,
    *,
    decompose: bool = False,
    time_limit_s: float | None = None,
) -> tuple[ShardReplication, ...]:
    """Solve exactly and greedily, and report each index's placement, p99s, costs and gap."""
    rows = _rows(network, indexes)
    stats = MilpStats()
    exact = _solve_milp(indexes, sites, rows, decompose=decompose, time_limit_s=time_limit_s,
                        stats=stats)
    if not decompose and len(indexes) > 1 and any(v is None for v in exact.values()):
        # one infeasible index makes the joint MILP infeasible: solve per index so the others
        # still get their placement and the failing one its own diagnosis
        decompose = True
        stats = MilpStats()
        exact = _solve_milp(indexes, sites, rows, decompose=True, time_limit_s=time_limit_s,
                            stats=stats)
    greedy = _solve_greedy(indexes, sites, rows)
    arrays = _site_arrays(sites, rows)
    solver = "milp-per-index" if decompose else "milp"
    if stats.timed_out:
        solver += " (time limit: best found, not proven optimal)"
    out = []
    for spec in indexes:
        geo = _geometry(spec, sites, rows, arrays, prune=False)
        g = greedy.get(spec.id)
        greedy_cost = None
        if g is not None:
            greedy_cost, _ = _evaluate(geo, [[rows.index[s] for s in p] for p in g], rows, arrays)
        e = exact.get(spec.id)
        if e is None:
            misses = _misses(geo, arrays, rows)
            out.append(ShardReplication(
                index=spec.id, solver=solver, feasible=False,
                reason=(f"the MILP hit its {time_limit_s:g} s time limit without a placement"
                        if stats.timed_out and not misses else _diagnose(spec, sites, rows)),
                misses=misses, greedy_cost=greedy_cost))
            continue
        placement = [[rows.index[s] for s in p] for p in e]
        cost, lat = _evaluate(geo, placement, rows, arrays)
        extra = sum(len(p) - 1 for p in e)
        worst = max(lat, key=lambda q: q.p99_ms, default=None)
        reason = (f"{extra} replica(s) beyond the primary across {spec.shards} shard(s); "
                  + (f"worst querying site {worst.site} at {worst.p99_ms:.1f} ms p99 of "
                     f"{spec.latency_budget_ms:g} ms" if worst else "no querying sites"))
        out.append(ShardReplication(
            index=spec.id, solver=solver, feasible=True, reason=reason,
            shards=tuple(ShardPlacement(k, tuple(sorted(p))) for k, p in enumerate(e)),
            latencies=lat, cost=cost, greedy_cost=greedy_cost))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# From a topology: sites, network matrices and index specs.


def _free_storage_gb(topo: Topology, site: Site) -> float:
    """storage_tb minus the datasets and models already stored there (no storage_tb: no limit)."""
    if site.storage_tb is None:
        return math.inf
    used = sum(d.size_gb for d in topo.datasets if d.site == site.id)
    used += sum(m.size_gb for m in topo.models if m.site == site.id)
    return max(0.0, site.storage_tb * 1000.0 - used)


def replica_sites(topo: Topology) -> tuple[ReplicaSite, ...]:
    return tuple(
        ReplicaSite(
            id=s.id,
            failure_domain=s.failure_domain or s.id,
            storage_usd_per_gb_month=(s.storage_usd_per_gb_month
                                      if s.storage_usd_per_gb_month is not None
                                      else DEFAULT_STORAGE_USD_PER_GB_MONTH),
            storage_free_gb=_free_storage_gb(topo, s),
        )
        for s in topo.sites
    )


def index_specs(topo: Topology) -> tuple[VectorIndexSpec, ...]:
    return tuple(
        VectorIndexSpec(
            id=ix.id, primary=ix.site, shard_gb=ix.shard_sizes(),
            update_gb_per_day=ix.update_gb_per_day, queries=tuple(ix.queries.items()),
            latency_budget_ms=ix.latency_budget_ms, search_ms=ix.search_ms,
            replicas_min=ix.replicas_min, fanout=None if ix.fanout == "all" else ix.fanout,
            response_kb_per_query=ix.response_kb_per_query)
        for ix in topo.vector_indexes
    )


def shard_replication(topo: Topology, network: Network, *, decompose: bool = False,
                      time_limit_s: float | None = None) -> tuple[ShardReplication, ...]:
    """`replicate_shards` for every index in the topology."""
    specs = index_specs(topo)
    if not specs:
        return ()
    return replicate_shards(specs, replica_sites(topo), network, decompose=decompose,
                            time_limit_s=time_limit_s)
