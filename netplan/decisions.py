"""Decision records and the per-site evaluation that gravity and placement share.

An `Option` is one way to run a workload (where, on how many GPUs, what moves along which
routes, what it costs: compute + egress + storage + relays, and whether it is feasible, with the
binding constraints if not). A `Decision` is the chosen option, the reason in words, every option
that lost with why, and the losers grouped by reason (`Rejection`). Constraint texts are written
once, here.

Theory of operation (`evaluate_site`). The checks that need no network (GPUs, where data may be
processed, raw tier) come first. Then each artifact that must move gets its candidate paths
(`netplan.routes`), and each GPU count worth trying (one for a fixed workload; for an elastic one
the fewest and most the site allows, the count where compute plus storage is least, and for each
route combination the fewest GPUs that still meet the deadline) gets the cheapest combination of
paths whose transfers (one after another: they may share links) fit in the time the compute
leaves, by enumeration over each artifact's time-cost frontier. Total cost = compute (GPU-hours
x price) + egress (per hop and direction) + relay charges + storage (every copy moved in x GB x
the site's price per GB-month, from the start of the move to the end of the job). The least total
wins, 5 % ties to the earlier finish. When no single-path combination meets the deadline, or the
deadline is what makes them dear, the largest transfer may be split over several paths
(`netplan.routes.split`), the others keeping their paths.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from netplan.network import LimitingFactor, Network, Regions
from netplan.routes import (
    COST_TIE_FRACTION,
    Candidate,
    Route,
    candidates,
    duration,
    explain,
    money,
    route_for,
    split,
)
from netplan.topology import Dataset, Model, Site, Topology, Workload, WorkloadKind

__all__ = [
    "COST_TIE_FRACTION",
    "HOURS_PER_MONTH",
    "Action",
    "ClientLatency",
    "CostBreakdown",
    "Decision",
    "Movement",
    "Option",
    "Rejection",
    "RejectionKind",
    "RuledOut",
    "ViolationKind",
    "amended",
    "deadline_violation",
    "duration",
    "evaluate_site",
    "generic_reason",
    "gpu_violation",
    "group_rejections",
    "infeasible_summary",
    "least_compute_usd",
    "prechecks",
    "prefilter_sites",
    "ruled_out",
    "money",
    "ranked",
    "storage_usd",
    "summarize",
]

ViolationKind = Literal["gpu", "residency", "raw", "path", "storage", "deadline"]
RejectionKind = Literal["gpu", "residency", "raw", "path", "storage", "deadline", "cost", "bound"]

Action = Literal["in_place", "move_compute", "move_data", "stage_subset", "replicate_model", "none"]

# Storage is priced per GB-month; a month is 365.25 x 24 / 12 hours.
HOURS_PER_MONTH = 730.5


def storage_usd(size_gb: float, usd_per_gb_month: float, hours: float) -> float:
    """What holding `size_gb` for `hours` costs at `usd_per_gb_month`."""
    return size_gb * usd_per_gb_month * hours / HOURS_PER_MONTH


@dataclass(frozen=True)
class Movement:
    """One artifact (dataset or model) travelling from its site to where the work runs."""

    kind: Literal["dataset", "model"]
    id: str
    source: str
    target: str
    size_gb: float  # what actually moves (a staged subset is smaller than the dataset)
    route: Route

    @property
    def path(self) -> tuple[str, ...]:
        return self.route.path

    @property
    def seconds(self) -> float:
        return self.route.seconds

    @property
    def egress_usd(self) -> float:
        return self.route.egress_usd

    @property
    def relay_usd(self) -> float:
        return self.route.relay_usd

    @property
    def bottleneck_gbps(self) -> float:
        return self.route.rate_gbps

    @property
    def limited_by(self) -> LimitingFactor | None:
        return self.route.limited_by


@dataclass(frozen=True)
class ClientLatency:
    """Inference: a client site, the replica that serves it and its p99 latency: RTT + jitter, plus
    the declared request components (DNS, TLS, model, ...) when the topology declares them."""

    client: str
    site: str | None
    p99_ms: float | None
    path: tuple[str, ...]


@dataclass(frozen=True)
class CostBreakdown:
    compute_usd: float
    egress_usd: float
    storage_usd: float
    relay_usd: float

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.egress_usd + self.storage_usd + self.relay_usd


@dataclass(frozen=True)
class Option:
    action: Action
    sites: tuple[str, ...]
    feasible: bool
    violations: tuple[str, ...]  # binding constraints, empty when feasible
    movements: tuple[Movement, ...]
    compute_usd: float
    hours: float  # compute wall-clock
    rejected_because: str | None = None
    clients: tuple[ClientLatency, ...] = ()
    violation_kinds: tuple[ViolationKind, ...] = ()  # one per violation, for summaries
    # False: failed a check that needs no network, so no paths were searched and transfer,
    # egress and completion are unknown (reported as null); compute_usd is still exact.
    priced: bool = True
    gpus: int = 0  # GPUs used (per replica for inference)
    storage_usd: float = 0.0  # the copies moved in, held until the job ends
    gpus_why: str = ""  # elastic workloads: why this count

    @property
    def transfer_gb(self) -> float:
        return sum(m.size_gb for m in self.movements)

    @property
    def transfer_seconds(self) -> float:
        # Movements run one after another: they may share links, so adding is the safe estimate.
        return sum(m.seconds for m in self.movements)

    @property
    def egress_usd(self) -> float:
        return sum(m.egress_usd for m in self.movements)

    @property
    def relay_usd(self) -> float:
        return sum(m.relay_usd for m in self.movements)

    @property
    def cost(self) -> CostBreakdown:
        return CostBreakdown(self.compute_usd, self.egress_usd, self.storage_usd, self.relay_usd)

    @property
    def total_usd(self) -> float:
        return self.egress_usd + self.relay_usd + self.storage_usd + self.compute_usd

    @property
    def completion_hours(self) -> float:
        return self.transfer_seconds / 3600 + self.hours

    @property
    def path(self) -> tuple[str, ...]:
        """The path of the largest movement (what the data or model travels through)."""
        if not self.movements:
            return self.sites[:1]
        return max(self.movements, key=lambda m: m.size_gb).path

    @property
    def site(self) -> str | None:
        return self.sites[0] if self.sites else None

    @property
    def worst_client(self) -> ClientLatency | None:
        served = [c for c in self.clients if c.p99_ms is not None]
        return max(served, key=lambda c: c.p99_ms or 0.0) if served else None

    def where(self) -> str:
        return f"{self.action} at {', '.join(self.sites)}" if self.sites else self.action


@dataclass(frozen=True)
class Rejection:
    """Options that lost for one reason, counted by site: the whole story of a large estate in a
    few lines ("fewer than 8 l4 GPUs at 531 sites"), where listing every option would not fit."""

    kind: RejectionKind
    reason: str
    count: int
    examples: tuple[str, ...]  # the first few site ids

    def text(self) -> str:
        if self.count == 1 and self.examples:
            return f"{self.reason} at {self.examples[0]}"
        return f"{self.reason} at {self.count:,} sites"


@dataclass(frozen=True)
class Decision:
    workload: str
    kind: WorkloadKind
    option: Option | None  # None when no option is feasible
    reason: str
    alternatives: tuple[Option, ...]  # feasible first, then by total cost
    skipped: int = 0  # options branch and bound proved could not win (not in alternatives)
    rejections: tuple[Rejection, ...] = ()  # every losing site, grouped by why it lost

    @property
    def feasible(self) -> bool:
        return self.option is not None

    @property
    def action(self) -> Action:
        return self.option.action if self.option else "none"

    @property
    def constraints(self) -> tuple[str, ...]:
        """The binding constraints of an infeasible decision, one per distinct cause."""
        exact = _distinct(v for alt in self.alternatives for v in alt.violations)
        grouped = tuple(r.text() for r in self.rejections if r.kind not in ("cost", "bound"))
        return exact if exact and len(exact) <= 6 else (*exact[:6], *grouped)


def ranked(options: Iterable[Option]) -> tuple[Option, ...]:
    """Feasible options first, each group cheapest first."""
    return tuple(sorted(options, key=lambda o: (not o.feasible, o.total_usd)))


def _distinct(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


_EXAMPLES = 5


def generic_reason(kind: ViolationKind, text: str, workload: Workload, network: Network) -> str:
    """The site-independent words for a violation, so equal causes group together."""
    if kind == "gpu":
        return f"fewer than {workload.min_gpus} {workload.gpu} GPUs"
    if kind == "path":
        if "residency" in text:
            return f"out of reach within {network.max_relays} relays inside a dataset's residency"
        return f"out of reach within {network.max_relays} relays"
    if kind == "storage":
        return "not enough storage for the copies"
    if kind == "deadline":
        return f"cannot meet the {workload.deadline_hours:g} h deadline"
    if kind == "residency":
        return text.split(" may not be processed")[0] + " may not be processed there"
    if kind == "raw":
        return "raw-tier data would have to leave its site"
    return text


@dataclass(frozen=True)
class RuledOut:
    """Sites ruled out for one reason without building an option for each: how many, and the
    first few (what a large estate's prefilter hands to `group_rejections`)."""

    kind: RejectionKind
    reason: str
    count: int
    examples: tuple[str, ...]


def ruled_out(kind: RejectionKind, reason: str, idx: np.ndarray, ids: Sequence[str]
              ) -> RuledOut:
    """A group of sites (network indices `idx`) ruled out for one reason."""
    return RuledOut(kind, reason, len(idx), tuple(ids[int(i)] for i in idx[:_EXAMPLES]))


def prefilter_sites(
    topology: Topology, network: Network, workload: Workload, anchors: set[str]
) -> tuple[np.ndarray, list[RuledOut]]:
    """The checks that need no network (`prechecks`), as arrays over every site with the
    workload's GPU type except the `anchors` (the sites holding its data or model, which get
    evaluated in full): (network indices of the sites that pass, the groups that do not), in
    `prechecks`'s order."""
    table = network.site_table
    ids = network.site_ids
    count = table.count(workload.gpu)
    cand = np.flatnonzero(count > 0)
    cand = cand[~np.isin(cand, [network.site_index(a) for a in anchors])]
    out: list[RuledOut] = []
    need = workload.min_gpus
    bad = count[cand] < need
    if bad.any():
        out.append(ruled_out("gpu", f"fewer than {need} {workload.gpu} GPUs", cand[bad], ids))
    cand = cand[~bad]
    for ds_id in workload.datasets:  # (no candidate holds a dataset: all of them would move)
        ds = topology.dataset(ds_id)
        if ds.residency:
            outside = ~table.in_regions(frozenset(ds.residency))[cand]
            if outside.any():
                out.append(ruled_out("residency", f"dataset {ds.id} may not be processed "
                                     "there", cand[outside], ids))
            cand = cand[~outside]
        if ds.tier == "raw" and len(cand):
            out.append(ruled_out("raw", "raw-tier data would have to leave its site", cand,
                                 ids))
            cand = cand[:0]
    return cand, out


def group_rejections(
    workload: Workload,
    network: Network,
    losers: Iterable[Option],
    extra: Iterable[RuledOut] = (),
) -> tuple[Rejection, ...]:
    """Every losing site grouped by why it lost: its option's first violation (in words that
    do not name the site), "cost" for feasible ones; `extra` adds the groups a prefilter ruled
    out without building options. A site counts once per group (its staged and full variants
    may both lose the same way)."""
    groups: dict[tuple[RejectionKind, str], dict[str, None]] = {}
    counts: dict[tuple[RejectionKind, str], int] = {}
    for option in losers:
        key: tuple[RejectionKind, str]
        if option.feasible:
            key = ("cost", "feasible, but lost on cost or finish time")
        else:
            first = option.violation_kinds[0] if option.violation_kinds else "path"
            key = (first, generic_reason(first, option.violations[0] if option.violations else "",
                                         workload, network))
        groups.setdefault(key, {}).update(dict.fromkeys(option.sites))
    for key, sites in groups.items():
        counts[key] = len(sites)
    examples = {key: list(sites)[:_EXAMPLES] for key, sites in groups.items()}
    for r in extra:
        key = (r.kind, r.reason)
        counts[key] = counts.get(key, 0) + r.count
        examples.setdefault(key, [])
        examples[key] += list(r.examples[:_EXAMPLES - len(examples[key])])
    out = [Rejection(kind, reason, counts[(kind, reason)], tuple(examples[(kind, reason)]))
           for (kind, reason) in counts]
    out.sort(key=lambda r: (r.kind in ("cost", "bound"), -r.count))
    return tuple(out)


def infeasible_summary(
    options: Sequence[Option],
    anchors: set[str],
    limit: int = 6,
    rejections: Sequence[Rejection] = (),
) -> str:
    """The binding constraints of a workload no option satisfies. Few distinct causes are listed
    verbatim; many (a large estate) are listed verbatim for the sites holding the data or model
    and counted by reason for every other site ("fewer than 8 l4 GPUs at 531 sites")."""
    distinct = list(dict.fromkeys(v for o in options for v in o.violations))
    if len(distinct) <= limit and not any(r.kind not in ("cost", "bound") and r.count > 1
                                          for r in rejections):
        return "; ".join(distinct)
    exact = [v for o in options if o.sites and o.sites[0] in anchors for v in o.violations]
    exact += [v for o in options for k, v in zip(o.violation_kinds, o.violations, strict=True)
              if k == "raw"]
    parts = list(dict.fromkeys(exact))
    for r in rejections:
        if r.kind in ("cost", "bound"):
            continue
        parts.append(r.text())
    deadline = [o for o in options if "deadline" in o.violation_kinds]
    if deadline:
        closest = min(deadline, key=lambda o: o.completion_hours)
        parts.append(f"closest: {closest.violations[-1]} at {closest.sites[0]}")
    return "; ".join(dict.fromkeys(parts))


def summarize(messages: Sequence[str], limit: int = 6) -> str:
    if len(messages) <= limit:
        return "; ".join(messages)
    return "; ".join([*messages[:limit], f"and {len(messages) - limit} more"])


def gpu_violation(site: Site, workload: Workload) -> str | None:
    have = site.gpu_count(workload.gpu)
    if have == 0:
        return f"no {workload.gpu} GPUs at {site.id}"
    need = workload.min_gpus
    if have < need:
        least = "at least " if workload.elastic else ""
        return f"only {have} {workload.gpu} GPUs at {site.id}, needs {least}{need}"
    return None


def _gpu_counts(workload: Workload, site: Site) -> tuple[int, int]:
    """(fewest, most) GPUs this workload may use at `site` (which has at least the fewest)."""
    if not workload.elastic:
        assert workload.gpus is not None
        return workload.gpus, workload.gpus
    have = site.gpu_count(workload.gpu)
    return workload.min_gpus, min(workload.gpus_max or have, have)


def _compute_usd(workload: Workload, site: Site, gpus: int) -> float:
    return gpus * workload.hours_on(gpus) * site.gpu_hour_usd.get(workload.gpu, 0.0)


def least_compute_usd(workload: Workload, site: Site) -> float:
    """The least compute cost at `site` (a lower bound for pruning): GPU-hours never fall as the
    count grows (scaling efficiency <= 1), so the fewest GPUs cost least."""
    return _compute_usd(workload, site, workload.min_gpus)


def prechecks(topology: Topology, workload: Workload, site: Site) -> list[tuple[ViolationKind,
                                                                               str]]:
    """The checks that need no network: GPU type and count, where each dataset may be processed,
    raw-tier data that would have to leave its site."""
    out: list[tuple[ViolationKind, str]] = []
    if gpu := gpu_violation(site, workload):
        out.append(("gpu", gpu))
    for ds_id in workload.datasets:
        ds = topology.dataset(ds_id)
        if not ds.allowed_in(site.region):
            out.append((
                "residency",
                f"dataset {ds.id} may not be processed in {site.region} "
                f"(residency: {', '.join(ds.residency)})",
            ))
        elif ds.site != site.id and ds.tier == "raw":
            out.append(("raw", f"raw-tier dataset {ds.id} cannot leave {ds.site}"))
    return out


@dataclass(frozen=True)
class _Need:
    kind: Literal["dataset", "model"]
    id: str
    source: str
    size_gb: float
    regions: Regions


@dataclass(frozen=True)
class _Plan:
    """One way to run at a site: GPU count and one candidate (or a split) per movement."""

    gpus: int
    hours: float
    compute_usd: float
    routes: tuple[Route, ...]
    storage_usd: float
    why: str = ""

    @property
    def transfer_s(self) -> float:
        return sum(r.seconds for r in self.routes)

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.storage_usd + sum(r.cost_usd for r in self.routes)

    @property
    def completion_h(self) -> float:
        return self.transfer_s / 3600 + self.hours


def _frontier(cands: Sequence[Candidate]) -> list[Candidate]:
    """The time-cost Pareto front of one movement's candidates (what a combination can use)."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.cost_usd, c.seconds)):
        if not out or c.seconds < out[-1].seconds - 1e-9:
            out.append(c)
    return out


_MAX_COMBINATIONS = 4096


def _combinations(fronts: Sequence[Sequence[Candidate]]) -> Iterable[tuple[Candidate, ...]]:
    if math.prod(len(f) for f in fronts) <= _MAX_COMBINATIONS:
        return itertools.product(*fronts)
    # Too many to enumerate (many movements with many paths): each movement's cheapest, its
    # fastest, and every mix of the two.
    return itertools.product(*[(f[0], f[-1]) if len(f) > 1 else (f[0],) for f in fronts])


def _best_combination(
    fronts: Sequence[Sequence[Candidate]], budget_s: float | None, storage_per_s: float
) -> tuple[Candidate, ...] | None:
    """The combination with the least route cost plus storage held during the transfers, whose
    transfer time fits `budget_s`; 5 % ties to the shortest."""
    best: list[tuple[float, float, tuple[Candidate, ...]]] = []
    for combo in _combinations(fronts):
        seconds = sum(c.seconds for c in combo)
        if budget_s is not None and seconds > budget_s + 1e-9:
            continue
        best.append((sum(c.cost_usd for c in combo) + storage_per_s * seconds, seconds, combo))
    if not best:
        return None
    least = min(b[0] for b in best)
    near = [b for b in best if b[0] <= least * (1 + COST_TIE_FRACTION) + 1e-9]
    return min(near, key=lambda b: (b[1], b[0]))[2]


def _counts_to_try(workload: Workload, site: Site, deadline_h: float | None,
                   transfer_times_s: Iterable[float], storage_per_h: float) -> list[int]:
    lo, hi = _gpu_counts(workload, site)
    if lo >= hi:
        return [lo]
    tries = {lo, hi}
    exponent = math.log2(2 * workload.scaling_efficiency)
    base = workload.min_gpus
    h0 = workload.hours_on(base)
    price = site.gpu_hour_usd.get(workload.gpu, 0.0)
    # Where compute (rising with the count when scaling is sub-linear) plus storage (falling)
    # is least: d/dn [price G (n/base)^(1-a) + k H0 (base/n)^a] = 0.
    if exponent < 1 and price > 0 and storage_per_h > 0:
        gpu_hours = price * workload.hours_on(base) * base
        u = storage_per_h * h0 * exponent / (gpu_hours * (1 - exponent))
        tries.update(min(hi, max(lo, int(n))) for n in (base * u, base * u + 1))
    if deadline_h is not None:
        for t in set(transfer_times_s):
            left = deadline_h - t / 3600
            if left > 0:
                n = math.ceil(base * (h0 / left) ** (1 / exponent) - 1e-9)
                if lo <= n <= hi:
                    tries.add(n)
    return sorted(tries)


def _count_reason(workload: Workload, chosen: _Plan, lo: int, hi: int) -> str:
    """Why an elastic workload runs on `chosen.gpus` GPUs (empty for a fixed count)."""
    n = chosen.gpus
    if not workload.elastic or lo == hi:
        return ""
    head = f"{n} of {lo}-{hi} GPUs"
    deadline = workload.deadline_hours
    one_fewer_misses = n > lo and deadline is not None and (
        workload.hours_on(n - 1) + chosen.transfer_s / 3600 > deadline + 1e-9)
    if n == hi:
        if workload.scaling_efficiency >= 1:
            why = ("GPU-hours cost the same at any count, and fewer hours hold the copies for "
                   "less")
        elif one_fewer_misses:
            why = "the deadline needs them all"
        else:
            why = "the least total cost"
        return f"{head}, the most the site allows: {why}"
    if one_fewer_misses:
        return f"{head}, the fewest that meet the deadline (GPU-hours grow with the count)"
    if n == lo:
        return f"{head}, the fewest: the least total cost"
    return f"{head}: the least total cost"


def evaluate_site(
    topology: Topology,
    network: Network,
    workload: Workload,
    site: Site,
    action: Action,
    *,
    subset: bool = False,
    storage_hours: float | None = None,
) -> Option:
    """Run `workload` at `site`: move the model and every dataset not already there (only each
    dataset's `active_fraction` when `subset`), pick the GPU count and routes, and check GPUs,
    residency (relay hops included), raw tier, storage and the deadline.

    The checks that need no network (GPUs, where data may be processed, raw tier) come first;
    an option failing them is returned unpriced, without path searches: on a large estate most
    options fail that way, and what moving would have cost cannot change that.
    `storage_hours`: how long the copies are held (default: until the job ends)."""
    violations: list[str] = []
    kinds: list[ViolationKind] = []

    def violate(kind: ViolationKind, text: str) -> None:
        kinds.append(kind)
        violations.append(text)

    for kind, text in prechecks(topology, workload, site):
        violate(kind, text)
    datasets: list[Dataset] = [topology.dataset(d) for d in workload.datasets]
    least = workload.min_gpus
    if violations:
        return Option(
            action=action,
            sites=(site.id,),
            feasible=False,
            violations=tuple(violations),
            movements=(),
            compute_usd=_compute_usd(workload, site, least),
            hours=workload.hours_on(least),
            violation_kinds=tuple(kinds),
            priced=False,
            gpus=least,
        )

    needs: list[_Need] = []
    for ds in datasets:
        if ds.site != site.id:
            regions = frozenset(ds.residency) if ds.residency else None
            size_gb = ds.size_gb * ds.active_fraction if subset else ds.size_gb
            needs.append(_Need("dataset", ds.id, ds.site, size_gb, regions))
    model: Model | None = topology.model(workload.model) if workload.model else None
    if model is not None and model.site != site.id:
        needs.append(_Need("model", model.id, model.site, model.size_gb, None))

    options: list[tuple[_Need, tuple[Candidate, ...]]] = []
    for need in needs:
        cands = candidates(network, need.source, site.id, need.size_gb, need.regions)
        if cands:
            options.append((need, cands))
        elif need.regions is not None and network.paths(need.source, site.id):
            violate("path", f"no path from {need.source} to {site.id} within "
                    f"{network.max_relays} relays stays within dataset {need.id}'s residency "
                    f"({', '.join(sorted(need.regions))})")
        else:
            violate("path", f"no path from {need.source} to {site.id} within "
                    f"{network.max_relays} relays")
    incoming_gb = sum(n.size_gb for n in needs)
    if site.storage_tb is not None and incoming_gb > site.storage_tb * 1000:
        violate(
            "storage",
            f"{site.id} has {site.storage_tb:g} TB of storage, needs {incoming_gb / 1000:,.1f} TB",
        )
    lo, hi = _gpu_counts(workload, site)
    if violations:
        return Option(action=action, sites=(site.id,), feasible=False,
                      violations=tuple(violations), movements=(),
                      compute_usd=_compute_usd(workload, site, lo), hours=workload.hours_on(lo),
                      violation_kinds=tuple(kinds), gpus=lo)

    plan = _plan(network, workload, site, options, incoming_gb, storage_hours)
    if isinstance(plan, str):
        violate("deadline", plan)
        fastest = [max(c, key=lambda c: c.path.bottleneck_gbps) for _, c in options]
        routes = [route_for(c, n.size_gb, n.source, site.id) for (n, _), c in
                  zip(options, fastest, strict=True)]
        return Option(
            action=action, sites=(site.id,), feasible=False, violations=tuple(violations),
            movements=tuple(Movement(n.kind, n.id, n.source, site.id, n.size_gb, r)
                            for (n, _), r in zip(options, routes, strict=True)),
            compute_usd=_compute_usd(workload, site, hi), hours=workload.hours_on(hi),
            violation_kinds=tuple(kinds), gpus=hi)
    return Option(
        action=action,
        sites=(site.id,),
        feasible=True,
        violations=(),
        movements=tuple(Movement(n.kind, n.id, n.source, site.id, n.size_gb, r)
                        for (n, _), r in zip(options, plan.routes, strict=True)),
        compute_usd=plan.compute_usd,
        hours=plan.hours,
        gpus=plan.gpus,
        storage_usd=plan.storage_usd,
        gpus_why=plan.why,
    )


def _plan(
    network: Network,
    workload: Workload,
    site: Site,
    options: Sequence[tuple[_Need, tuple[Candidate, ...]]],
    incoming_gb: float,
    storage_hours: float | None,
) -> _Plan | str:
    """The least-cost GPU count and routes at `site`, or the deadline text when none meets it."""
    deadline_h = workload.deadline_hours
    price_h = incoming_gb * site.storage_price / HOURS_PER_MONTH  # storage $ per hour held
    fronts = [_frontier(c) for _, c in options]
    times = {sum(c.seconds for c in combo) for combo in _combinations(fronts)}
    lo, hi = _gpu_counts(workload, site)

    def held(transfer_s: float, hours: float) -> float:
        return price_h * (storage_hours if storage_hours is not None
                          else transfer_s / 3600 + hours)

    plans: list[_Plan] = []
    for gpus in _counts_to_try(workload, site, deadline_h, times, price_h):
        hours = workload.hours_on(gpus)
        budget = None if deadline_h is None else (deadline_h - hours) * 3600
        if budget is not None and budget < 0:
            continue
        combo = _best_combination(fronts, budget, 0.0 if storage_hours is not None
                                  else price_h / 3600)
        if combo is None:
            continue
        routes = _explained(options, combo, budget, site.id)
        transfer_s = sum(r.seconds for r in routes)
        plans.append(_Plan(gpus, hours, _compute_usd(workload, site, gpus), routes,
                           held(transfer_s, hours)))
    chosen = _pick(plans)
    if deadline_h is not None and network.policy.multipath and options:
        cheapest_routes = sum(f[0].cost_usd for f in fronts)
        dear = chosen is not None and not (
            sum(r.cost_usd for r in chosen.routes)
            <= cheapest_routes * (1 + COST_TIE_FRACTION) + 1e-9)
        if chosen is None or dear:
            split_plan = _split_largest(network, workload, site, options, fronts, chosen,
                                        held, hi)
            if split_plan is not None and (
                chosen is None
                or split_plan.total_usd < chosen.total_usd * (1 - COST_TIE_FRACTION)
            ):
                network.solver_stats.splits_chosen += 1
                chosen = split_plan
    if chosen is None:
        hours = workload.hours_on(hi)
        fastest_s = sum(min(c.seconds for c in f) for f in fronts)
        assert deadline_h is not None
        return _deadline_text(deadline_h, fastest_s / 3600 + hours, fastest_s / 3600, hours)
    why = _count_reason(workload, chosen, lo, hi)
    return _Plan(chosen.gpus, chosen.hours, chosen.compute_usd, chosen.routes,
                 chosen.storage_usd, why)


def _pick(plans: Sequence[_Plan]) -> _Plan | None:
    if not plans:
        return None
    least = min(p.total_usd for p in plans)
    near = [p for p in plans if p.total_usd <= least * (1 + COST_TIE_FRACTION) + 1e-9]
    return min(near, key=lambda p: (p.completion_h, p.total_usd))


def _explained(options: Sequence[tuple[_Need, tuple[Candidate, ...]]],
               combo: Sequence[Candidate], budget_s: float | None, target: str) -> tuple[
                   Route, ...]:
    """Each movement's route with its alternatives; a movement's deadline budget is what the
    others' transfers leave of `budget_s`."""
    total = sum(c.seconds for c in combo)
    routes = []
    for (need, cands), cand in zip(options, combo, strict=True):
        mine = None if budget_s is None else budget_s - (total - cand.seconds)
        routes.append(explain(route_for(cand, need.size_gb, need.source, target), cands, mine,
                              cand))
    return tuple(routes)


def _split_largest(network: Network, workload: Workload, site: Site,
                   options: Sequence[tuple[_Need, tuple[Candidate, ...]]],
                   fronts: Sequence[Sequence[Candidate]], chosen: _Plan | None,
                   held: Callable[[float, float], float], most: int) -> _Plan | None:
    """Split the largest transfer over several paths, the others keeping their cheapest paths
    (or their paths in `chosen`), at `chosen`'s GPU count or else the most GPUs allowed."""
    assert workload.deadline_hours is not None
    big = max(range(len(options)), key=lambda i: options[i][0].size_gb)
    gpus = chosen.gpus if chosen is not None else most
    hours = workload.hours_on(gpus)
    others = [
        (route_for(f[0], options[i][0].size_gb, options[i][0].source, site.id)
         if chosen is None else chosen.routes[i])
        for i, f in enumerate(fronts)
    ]
    others_s = sum(r.seconds for i, r in enumerate(others) if i != big)
    budget = (workload.deadline_hours - hours) * 3600 - others_s
    need, cands = options[big]
    if budget <= 0:
        return None
    result = split(network, need.source, site.id, need.size_gb, budget, need.regions)
    if not isinstance(result, Route) or not result.multipath:
        return None
    cheapest_ok = next((c for c in cands if c.seconds <= budget + 1e-9), None)
    routes = list(others)
    routes[big] = explain(result, cands, budget, cheapest_ok)
    transfer_s = sum(r.seconds for r in routes)
    return _Plan(gpus, hours, _compute_usd(workload, site, gpus), tuple(routes),
                 held(transfer_s, hours))


def deadline_violation(option: Option, deadline_hours: float) -> str:
    return _deadline_text(
        deadline_hours, option.completion_hours, option.transfer_seconds / 3600, option.hours
    )


def _deadline_text(
    deadline_h: float, completion_h: float, transfer_h: float, compute_h: float
) -> str:
    return (
        f"deadline {deadline_h:g} h missed: {duration(completion_h)} "
        f"(transfer {duration(transfer_h)} + compute {duration(compute_h)})"
    )


def amended(option: Option, **changes: object) -> Option:
    """A copy of `option` with some fields changed (dataclasses.replace re-runs __init__ and is
    the slowest thing in a 100,000-option analysis)."""
    new = object.__new__(Option)
    new.__dict__.update(option.__dict__)
    new.__dict__.update(changes)
    return new

