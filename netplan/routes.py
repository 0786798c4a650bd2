"""How one bulk transfer travels: the path (or split over several paths) that moves S GB from a
source to a target, chosen on cost and time, with the alternatives a user wants to compare.

Theory of operation.
- Candidates: `Network.paths` (direct, and through up to `paths.max_relays` relays: the Pareto
  set over $/GB, bottleneck, gateway $/h and hops). A path moves S GB in
  8 S / (bottleneck x rate_scale) + RTT seconds (rate_scale < 1 when only a share of each link
  is for bulk, as in the nightly sync window) and costs S x (egress + relay $/GB) plus every
  relay gateway's $/h for those seconds.
- The rule: the cheapest candidate that meets the deadline, where candidates within 5 % of its
  cost tie and the earliest finish among them wins; with no deadline, the same rule over every
  candidate (so speed is bought only within 5 % of the least cost).
- Multipath (`paths.multipath`, and only against a deadline): when no single path meets it, or
  the cheapest that does costs more than 5 % above the cheapest path (the deadline is what sets
  the price), a min-cost flow decides a split. Path formulation over every simple path within
  `max_relays` (paths that lose alone may still add capacity): x_p >= 0 Gbit/s on path p,
    minimise   sum_p x_p * T / 8 * usd_per_gb_p  +  sum_v gateway_usd_per_h_v * T_h * y_v
    subject to sum_p x_p = r = 8 S / T              (the demand: S GB in T seconds)
               sum_{p through e} x_p <= cap_e * rate_scale   for every link direction e
               x_p <= r * y_v, y_v in {0, 1}          for every priced gateway v on p
  with T the deadline less the slowest candidate's RTT. Without priced gateways it is an LP;
  with them a MILP (each gateway is a fixed charge); both go to HiGHS through
  `scipy.optimize.milp`, as the shard solver does. A split is kept when it meets a deadline no
  single path meets, or costs more than 5 % less than the best single path that meets it.
  Every leg of a split finishes together: leg p carries x_p / r of the bytes at x_p Gbit/s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from netplan.network import BulkPath, LimitingFactor, Network, Regions

__all__ = [
    "COST_TIE_FRACTION",
    "Candidate",
    "PathAlternative",
    "Route",
    "RouteLeg",
    "SplitFailure",
    "candidates",
    "choose",
    "choose_route",
    "duration",
    "money",
    "route_for",
    "split",
]

# Ties "within 5 %" go to the earlier completion (issue 2).
COST_TIE_FRACTION = 0.05
_HOUR = 3600.0


def money(usd: float) -> str:
    return f"${usd:,.0f}" if abs(usd) >= 100 else f"${usd:,.2f}"


def duration(h: float) -> str:
    return f"{h:,.1f} h" if h >= 0.1 else f"{h * 60:,.1f} min"


def _within_tie(cost: float, cheapest: float) -> bool:
    return cost <= cheapest * (1 + COST_TIE_FRACTION) + 1e-9


@dataclass(frozen=True)
class Candidate:
    """One single path, priced for one transfer."""

    path: BulkPath
    seconds: float
    egress_usd: float
    relay_usd: float

    @property
    def cost_usd(self) -> float:
        return self.egress_usd + self.relay_usd


def candidates(
    network: Network,
    source: str,
    target: str,
    size_gb: float,
    regions: Regions = None,
    rate_scale: float = 1.0,
) -> tuple[Candidate, ...]:
    """Every candidate path for this transfer, priced (cheapest first); empty if unreachable."""
    out = []
    for path in network.paths(source, target, regions):
        seconds = path.transfer_seconds(size_gb, rate_scale)
        out.append(Candidate(path, seconds, path.egress_usd(size_gb),
                             path.relay_usd(size_gb, seconds)))
    out.sort(key=lambda c: (c.cost_usd, c.seconds, c.path.hops))
    return tuple(out)


def choose(cands: Sequence[Candidate], budget_s: float | None) -> Candidate | None:
    """The rule: the cheapest candidate meeting `budget_s`, 5 % ties to the earlier finish."""
    ok = [c for c in cands if budget_s is None or c.seconds <= budget_s + 1e-9]
    if not ok:
        return None
    cheapest = min(ok, key=lambda c: (c.cost_usd, c.seconds))
    near = [c for c in ok if _within_tie(c.cost_usd, cheapest.cost_usd)]
    return min(near, key=lambda c: (c.seconds, c.cost_usd, c.path.hops))


@dataclass(frozen=True)
class RouteLeg:
    """One path of a route: the share of the bytes it carries and at what rate."""

    path: BulkPath
    share: float
    rate_gbps: float


@dataclass(frozen=True)
class PathAlternative:
    """A path the route did not take (the direct link, the fastest, the cheapest), with its
    time and cost for the same transfer and why the route beat it."""

    labels: tuple[str, ...]  # "direct", "fastest", "cheapest"
    candidate: Candidate
    meets_deadline: bool
    rejected_because: str

    @property
    def path(self) -> BulkPath:
        return self.candidate.path

    @property
    def seconds(self) -> float:
        return self.candidate.seconds

    @property
    def egress_usd(self) -> float:
        return self.candidate.egress_usd

    @property
    def relay_usd(self) -> float:
        return self.candidate.relay_usd

    @property
    def cost_usd(self) -> float:
        return self.candidate.cost_usd


@dataclass(frozen=True)
class Route:
    """How one transfer travels: one leg, or a split (`solver` then says "lp" or "milp")."""

    source: str
    target: str
    size_gb: float
    legs: tuple[RouteLeg, ...]
    seconds: float
    egress_usd: float
    relay_usd: float
    why: str = ""
    alternatives: tuple[PathAlternative, ...] = ()
    solver: str | None = None

    @property
    def cost_usd(self) -> float:
        return self.egress_usd + self.relay_usd

    @property
    def path(self) -> tuple[str, ...]:
        """The sites of the leg carrying the largest share."""
        return self.legs[0].path.sites if self.legs else (self.source,)

    @property
    def multipath(self) -> bool:
        return len(self.legs) > 1

    @property
    def rate_gbps(self) -> float:
        return sum(leg.rate_gbps for leg in self.legs)

    @property
    def limited_by(self) -> LimitingFactor | None:
        return self.legs[0].path.limited_by if len(self.legs) == 1 else None


def route_for(candidate: Candidate, size_gb: float, source: str, target: str,
              rate_scale: float = 1.0) -> Route:
    """A one-leg route along `candidate` (without the comparison: see `explain`)."""
    rate = candidate.path.bottleneck_gbps * rate_scale
    return Route(source, target, size_gb, (RouteLeg(candidate.path, 1.0, rate),),
                 candidate.seconds, candidate.egress_usd, candidate.relay_usd)


def _via(path: BulkPath) -> str:
    return " -> ".join(path.sites)


def _compare(alt_cost: float, alt_s: float, cost: float, seconds: float) -> str:
    """Why a route costing `cost` and taking `seconds` beat an alternative (both meet any
    deadline)."""
    if not _within_tie(alt_cost, cost) and alt_cost > cost:
        text = f"costs {money(alt_cost - cost)} more ({money(alt_cost)} vs {money(cost)})"
        if alt_s < seconds - 1e-9:
            return text + f" to finish {duration((seconds - alt_s) / _HOUR)} sooner"
        return text + " and is no faster"
    if alt_s > seconds + 1e-9:
        if alt_cost < cost - 1e-9:
            return (f"costs {money(cost - alt_cost)} less but finishes "
                    f"{duration((alt_s - seconds) / _HOUR)} later (within 5% of the cost, "
                    "the earlier finish wins)")
        return f"finishes {duration((alt_s - seconds) / _HOUR)} later for no less money"
    return "same cost and time; a cheaper or shorter path sorts first"


def explain(route: Route, cands: Sequence[Candidate], budget_s: float | None,
            cheapest_meeting: Candidate | None = None) -> Route:
    """`route` with its reason and its alternatives: the direct link, the fastest and the
    cheapest single path, each with time, cost and why the route beat it."""
    if not cands:
        return route
    direct = [c for c in cands if c.path.hops == 1]
    fastest = max(cands, key=lambda c: (c.path.bottleneck_gbps, -c.cost_usd))
    cheapest = cands[0]
    chosen_sites = route.path if not route.multipath else None
    labelled: dict[tuple[str, ...], tuple[list[str], Candidate]] = {}
    for label, cand in (("direct", direct[0] if direct else None), ("fastest", fastest),
                        ("cheapest", cheapest)):
        if cand is None or cand.path.sites == chosen_sites:
            continue
        labelled.setdefault(cand.path.sites, ([], cand))[0].append(label)
    alternatives = []
    for labels, cand in labelled.values():
        meets = budget_s is None or cand.seconds <= budget_s + 1e-9
        if not meets:
            assert budget_s is not None
            why = (f"misses the deadline: {duration(cand.seconds / _HOUR)} of transfer, "
                   f"{duration(max(budget_s, 0.0) / _HOUR)} available")
        else:
            why = _compare(cand.cost_usd, cand.seconds, route.cost_usd, route.seconds)
        alternatives.append(PathAlternative(tuple(labels), cand, meets, why))
    return Route(route.source, route.target, route.size_gb, route.legs, route.seconds,
                 route.egress_usd, route.relay_usd, _why(route, cands, budget_s,
                                                         cheapest_meeting),
                 tuple(alternatives), route.solver)


def _why(route: Route, cands: Sequence[Candidate], budget_s: float | None,
         cheapest_meeting: Candidate | None) -> str:
    cheapest = cands[0]
    if route.multipath:
        n = len(route.legs)
        if cheapest_meeting is None:
            fastest = max(cands, key=lambda c: c.path.bottleneck_gbps)
            return (f"split over {n} paths ({route.solver}): no single path meets the deadline "
                    f"(the fastest, {_via(fastest.path)}, takes "
                    f"{duration(fastest.seconds / _HOUR)})")
        return (f"split over {n} paths ({route.solver}): {money(cheapest_meeting.cost_usd)} "
                f"on the cheapest single path that meets the deadline, "
                f"{money(route.cost_usd)} split")
    sites = route.path
    if sites == cheapest.path.sites:
        kind = "direct" if len(sites) == 2 else f"{len(sites) - 2} relay(s)"
        return f"the cheapest path ({kind})" + (", meets the deadline" if budget_s else "")
    best = min(cands, key=lambda c: (c.cost_usd, c.seconds))
    meeting = [c for c in cands if budget_s is None or c.seconds <= budget_s + 1e-9]
    cheapest_ok = min(meeting, key=lambda c: (c.cost_usd, c.seconds)) if meeting else None
    if cheapest_ok is not None and cheapest_ok.path.sites != sites:
        return (f"within 5% of the cheapest path that meets the deadline "
                f"({money(cheapest_ok.cost_usd)} via {_via(cheapest_ok.path)}) and "
                f"{duration((cheapest_ok.seconds - route.seconds) / _HOUR)} sooner")
    assert budget_s is not None
    return (f"the cheapest path that meets the deadline: the cheapest ({_via(best.path)}, "
            f"{money(best.cost_usd)}) takes {duration(best.seconds / _HOUR)} of the "
            f"{duration(budget_s / _HOUR)} available")


@dataclass(frozen=True)
class SplitFailure:
    """Why no split carries the transfer in time: the most all paths together carry."""

    max_rate_gbps: float
    needed_gbps: float
    reason: str


def _capacity(network: Network, a: str, b: str) -> float:
    link = network.link(a, b)
    assert link is not None  # (paths only use existing links)
    return link.effective_gbps


def split(
    network: Network,
    source: str,
    target: str,
    size_gb: float,
    budget_s: float,
    regions: Regions = None,
    rate_scale: float = 1.0,
) -> Route | SplitFailure | None:
    """The min-cost split of `size_gb` over every path within the relay limit that finishes
    within `budget_s`; None when there are fewer than two paths (nothing to split over)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    paths = network.all_paths(source, target, regions)
    if len(paths) < 2 or size_gb <= 0:
        return None
    start_s = max(p.rtt_ms for p in paths) / 1000.0
    window_s = budget_s - start_s
    if window_s <= 0:
        return SplitFailure(0.0, math.inf, "the deadline leaves no time after the first RTT")
    need = size_gb * 8 / window_s
    out_cap, in_cap = network.capacity_gbps(regions)
    cut = min(out_cap[network.site_index(source)], in_cap[network.site_index(target)])
    cut *= rate_scale
    if need > cut + 1e-9:
        end = source if out_cap[network.site_index(source)] <= in_cap[
            network.site_index(target)] else target
        return SplitFailure(cut, need, f"needs {need:,.2f} Gbit/s, and at most {cut:,.2f} "
                            f"Gbit/s can {'leave' if end == source else 'reach'} {end}")
    edges: dict[tuple[str, str], int] = {}
    rows, cols = [], []
    for j, path in enumerate(paths):
        for hop in zip(path.sites, path.sites[1:], strict=False):
            rows.append(edges.setdefault(hop, len(edges)))
            cols.append(j)
    cap = np.array([_capacity(network, a, b) * rate_scale for a, b in edges], dtype=float)
    n_paths = len(paths)
    gates = sorted({v for p in paths for v in p.relays
                    if network.relay_usd_per_hour(v) > 0})
    gate_col = {v: n_paths + i for i, v in enumerate(gates)}
    n_vars = n_paths + len(gates)
    objective = np.zeros(n_vars)
    objective[:n_paths] = [p.usd_per_gb * window_s / 8 for p in paths]
    for v, col in gate_col.items():
        objective[col] = network.relay_usd_per_hour(v) * budget_s / _HOUR
    capacity = coo_array((np.ones(len(rows)), (rows, cols)), shape=(len(edges), n_vars))
    demand = np.zeros((1, n_vars))
    demand[0, :n_paths] = 1.0
    constraints = [LinearConstraint(capacity.tocsr(), -np.inf, cap),
                   LinearConstraint(demand, need, need)]
    links_rows: list[int] = []
    links_cols: list[int] = []
    links_vals: list[float] = []
    n_gate_rows = 0
    for j, path in enumerate(paths):
        for v in path.relays:
            if v in gate_col:
                links_rows += [n_gate_rows, n_gate_rows]
                links_cols += [j, gate_col[v]]
                links_vals += [1.0, -need]
                n_gate_rows += 1
    if n_gate_rows:
        gate_rows = coo_array((links_vals, (links_rows, links_cols)),
                              shape=(n_gate_rows, n_vars)).tocsr()
        constraints.append(LinearConstraint(gate_rows, -np.inf, 0.0))
    integrality = np.zeros(n_vars)
    integrality[n_paths:] = 1
    upper = np.full(n_vars, np.inf)
    upper[n_paths:] = 1.0
    network.solver_stats.record(n_vars, len(edges) + 1 + n_gate_rows, len(gates))
    result = milp(objective, constraints=constraints, integrality=integrality,
                  bounds=Bounds(np.zeros(n_vars), upper))
    if result.x is None:
        # The cut above is only a bound: shared links can bind first.
        return SplitFailure(cut, need, f"needs {need:,.2f} Gbit/s, more than the paths "
                            f"within {network.max_relays} relays carry together")
    x = result.x[:n_paths]
    legs = sorted(
        (RouteLeg(paths[j], float(x[j] / need), float(x[j]))
         for j in range(n_paths) if x[j] > need * 1e-6),
        key=lambda leg: -leg.share,
    )
    total = sum(leg.share for leg in legs)
    legs = [RouteLeg(leg.path, leg.share / total, leg.rate_gbps) for leg in legs]
    seconds = window_s + max(leg.path.rtt_ms for leg in legs) / 1000.0
    used_gates = {v for leg in legs for v in leg.path.relays if v in gate_col}
    egress = size_gb * sum(leg.share * leg.path.egress_usd_per_gb for leg in legs)
    relay = size_gb * sum(leg.share * leg.path.relay_usd_per_gb for leg in legs)
    relay += sum(network.relay_usd_per_hour(v) for v in used_gates) * seconds / _HOUR
    return Route(source, target, size_gb, tuple(legs), seconds, egress, relay,
                 solver="milp" if gates else "lp")


def choose_route(
    network: Network,
    source: str,
    target: str,
    size_gb: float,
    regions: Regions = None,
    *,
    deadline_s: float | None = None,
    rate_scale: float = 1.0,
) -> Route | SplitFailure | None:
    """The route for one transfer under the rule above: None when the target is out of reach
    within the relay limit; a `SplitFailure` (with the best time possible) when neither one
    path nor a split meets the deadline; else the route, explained."""
    cands = candidates(network, source, target, size_gb, regions, rate_scale)
    if not cands:
        return None
    picked = choose(cands, deadline_s)
    if deadline_s is not None and network.policy.multipath and (
        picked is None or not _within_tie(picked.cost_usd, cands[0].cost_usd)
    ):
        result = split(network, source, target, size_gb, deadline_s, regions, rate_scale)
        if isinstance(result, Route) and result.multipath and (
            picked is None or result.cost_usd < picked.cost_usd * (1 - COST_TIE_FRACTION)
        ):
            network.solver_stats.splits_chosen += 1
            return explain(result, cands, deadline_s, picked)
        if picked is None:
            fastest = max(cands, key=lambda c: c.path.bottleneck_gbps)
            if isinstance(result, SplitFailure):
                return result
            return SplitFailure(fastest.path.bottleneck_gbps * rate_scale,
                                size_gb * 8 / deadline_s,
                                f"the fastest path takes {duration(fastest.seconds / _HOUR)}")
    if picked is None:
        fastest = max(cands, key=lambda c: c.path.bottleneck_gbps)
        return SplitFailure(fastest.path.bottleneck_gbps * rate_scale,
                            size_gb * 8 / (deadline_s or math.inf),
                            f"the fastest path takes {duration(fastest.seconds / _HOUR)}")
    return explain(route_for(picked, size_gb, source, target, rate_scale), cands, deadline_s,
                   picked)
