"""Inference placement: the fewest model-replica sites so every client meets its latency budget.

Theory of operation.
- A client's latency to a site is its min-latency path's RTT + jitter (our p99 estimate).
- A site can host a replica if it has the GPU type and count, its datasets may be there (residency,
  raw tier, relay hops) and the model can reach it. It covers the clients within the budget.
- Objective: a minimum set cover of the clients, then the least cost (GPU-hours + shipping the
  model and data). Sites with the same coverage collapse to their cheapest member, and a class
  another covers at least as well for no more money is dropped. The cover is exact: enumeration
  by increasing size for a few classes, else a 0/1 program with `scipy.optimize.milp` (HiGHS),
  cost scaled below one site.
- If some client is out of every site's reach, say which and by how many milliseconds.
"""

from __future__ import annotations

import itertools

import numpy as np

from netplan._sections import LatencyComponents
from netplan.decisions import (
    HOURS_PER_MONTH,
    ClientLatency,
    Decision,
    Option,
    RuledOut,
    amended,
    deadline_violation,
    duration,
    evaluate_site,
    group_rejections,
    infeasible_summary,
    money,
    prefilter_sites,
    ranked,
    ruled_out,
    summarize,
)
from netplan.errors import PlanError
from netplan.network import Network
from netplan.topology import Site, Topology, Workload

__all__ = ["client_latencies", "decide_placement"]

_EPS_MS = 1e-9
# Up to this many non-dominated coverage classes the cover is found by enumeration; beyond,
# by the 0/1 program (scipy's import alone costs more than enumerating a dozen classes).
_BRUTE_FORCE_CLASSES = 12


def client_latencies(
    network: Network,
    workload: Workload,
    sites: tuple[str, ...],
    *,
    with_paths: bool,
    components: LatencyComponents | None,
) -> tuple[ClientLatency, ...]:
    """Each client served by its nearest site among `sites` (paths only when asked: building
    them for every candidate site is most of the work on a large estate). With declared
    `components` the latency is the whole request's p99, not only the network's."""
    out = []
    for client in workload.clients:
        tree = network.latency_paths_from(client)
        reach = [(p, s) for s in sites if (p := tree.score(s)) is not None]
        if not reach:
            out.append(ClientLatency(client=client, site=None, p99_ms=None, path=()))
            continue
        p99, site = min(reach)
        if components is not None:
            p99 += components.overhead_ms(tree[site].rtt_ms)
        out.append(
            ClientLatency(
                client=client, site=site, p99_ms=p99, path=tree[site].sites if with_paths else ()
            )
        )
    return tuple(out)


def _min_cover(classes: list[tuple[frozenset[str], Option]], clients: tuple[str, ...]) -> list[int]:
    """Indices of the fewest classes covering all clients, cheapest among equally few."""
    everyone = frozenset(clients)
    # Drop a class another covers at least as well for no more money: it is never needed.
    useful = [
        j
        for j, (cover, opt) in enumerate(classes)
        if not any(
            k != j
            and other >= cover
            and (other != cover or k < j)
            and rival.total_usd <= opt.total_usd
            for k, (other, rival) in enumerate(classes)
        )
    ]
    if len(useful) <= _BRUTE_FORCE_CLASSES:
        # Few candidates (the usual case): try 1, 2, ... sites, cheapest combination first.
        for size in range(1, len(useful) + 1):
            covers = [
                combo
                for combo in itertools.combinations(useful, size)
                if frozenset().union(*(classes[j][0] for j in combo)) >= everyone
            ]
            if covers:
                return list(min(covers, key=lambda c: sum(classes[j][1].total_usd for j in c)))
    # Imported here: scipy.optimize takes a second to import and most plans never need it.
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(classes)
    a = np.zeros((len(clients), n))
    for j, (covered, _) in enumerate(classes):
        for i, client in enumerate(clients):
            if client in covered:
                a[i, j] = 1.0
    costs = np.array([opt.total_usd for _, opt in classes])
    # Count dominates: the whole cost term sums to < 1, one site's weight.
    objective = 1.0 + costs / (costs.sum() + 1.0)
    result = milp(
        objective,
        constraints=LinearConstraint(a, lb=np.ones(len(clients)), ub=np.full(len(clients), np.inf)),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    if not result.success or result.x is None:
        raise PlanError(f"set cover solver failed: {result.message}")
    return [j for j in range(n) if result.x[j] > 0.5]


def _miss_phrase(c: ClientLatency, budget_ms: float) -> str:
    if c.p99_ms is None or c.site is None:
        return f"client {c.client} cannot reach the site"
    return (
        f"client {c.client} misses the {budget_ms:g} ms budget by {c.p99_ms - budget_ms:,.1f} ms "
        f"({c.p99_ms:,.1f} ms p99 to {c.site})"
    )


def _single(topology: Topology, network: Network, workload: Workload, site: Site,
            components: LatencyComponents | None) -> Option:
    """One replica at `site`: the model (and data) shipped there, and each client's latency."""
    option = evaluate_site(topology, network, workload, site, "replicate_model",
                           storage_hours=workload.hours_on(workload.min_gpus))
    if option.priced and not option.movements:  # (unpriced: nothing was worked out)
        option = amended(option, action="in_place")
    return amended(option, clients=client_latencies(
        network, workload, (site.id,), with_paths=False, components=components))


# Up to this many candidate sites every one is evaluated (the alternatives stay complete);
# beyond, sites are prefiltered as arrays and each coverage class searched by a lower bound.
EXHAUSTIVE_SITES = 64


def _in_order(topology: Topology, network: Network, ids: set[str]) -> list[Site]:
    """The sites `ids` in topology order."""
    return [topology.site(i) for i in sorted(ids, key=network.site_index)]


def _large_singles(
    topology: Topology, network: Network, workload: Workload, anchors: set[str],
    components: LatencyComponents | None,
) -> tuple[list[Option], list[RuledOut], dict[str, ClientLatency]]:
    """A large estate's candidate replicas: the anchors (sites holding the model or data) in
    full; every other GPU site checked as arrays (`prefilter_sites`), then by coverage (the
    clients within the budget, from the p99 matrix; with declared request components the TLS
    handshake grows with the RTT, so the matrix only rules out, and covering sites get their
    exact latencies). Within each coverage class, sites go in order of an admissible lower bound
    (compute + shipping at the least $/GB + storage), until a bound exceeds the cheapest feasible
    site of the class: only that one can be in a cheapest cover. Also returns each client's
    nearest GPU site that passed the prefilter (for the reason when a client is out of reach)."""
    assert workload.latency_budget_ms is not None
    budget = workload.latency_budget_ms
    table, ids = network.site_table, network.site_ids
    singles = [_single(topology, network, workload, site, components)
               for site in _in_order(topology, network, anchors)
               if site.gpu_count(workload.gpu) > 0]
    cand, out = prefilter_sites(topology, network, workload, anchors)
    clients = list(workload.clients)
    p99 = network.p99_ms_matrix(clients)[:, cand] if len(cand) else np.zeros((len(clients), 0))
    fixed = 0.0 if components is None else components.overhead_ms(0.0)
    exact = components is not None and components.tls_handshake_rtts > 0
    nearest: dict[str, ClientLatency] = {}
    for row, client in enumerate(clients):
        if len(cand) and np.isfinite(p99[row]).any():
            j = int(np.argmin(p99[row]))
            nearest[client] = ClientLatency(client, ids[int(cand[j])], float(p99[row, j]) + fixed,
                                            ())
    covers = (p99 + fixed) <= budget + _EPS_MS
    useless = ~covers.any(axis=0)
    if useless.any():
        out.append(ruled_out("path", f"no client within the {budget:g} ms budget",
                             cand[useless], ids))
    cand, covers = cand[~useless], covers[:, ~useless]
    if not len(cand):
        return singles, out, nearest
    # Lower bound per site: compute, then the model and data at the least $/GB, then storage.
    hours = workload.hours_on(workload.min_gpus)
    bound = workload.min_gpus * hours * table.price(workload.gpu)[cand]
    incoming = 0.0
    model = topology.model(workload.model or "")
    moving: list[tuple[str, float, frozenset[str] | None]] = [(model.site, model.size_gb, None)]
    moving += [(ds.site, ds.size_gb, frozenset(ds.residency) if ds.residency else None)
               for ds in map(topology.dataset, workload.datasets)]
    for source, size, regions in moving:
        bound = bound + size * network.min_usd_per_gb_from(source, regions)[cand]
        incoming += size
    bound = bound + incoming * table.storage_price[cand] * hours / HOURS_PER_MONTH
    unreachable = np.isinf(bound)
    if unreachable.any():
        out.append(ruled_out("path", f"out of reach within {network.max_relays} relays",
                             cand[unreachable], ids))
    keys = [frozenset(c for c, hit in zip(clients, col, strict=True) if hit) for col in covers.T]
    by_class: dict[frozenset[str], list[tuple[float, int]]] = {}
    for j in np.flatnonzero(~unreachable).tolist():
        by_class.setdefault(keys[j], []).append((float(bound[j]), int(cand[j])))
    skipped = 0
    for entries in by_class.values():
        entries.sort()
        best: float | None = None
        for done, (lower, i) in enumerate(entries):
            if best is not None and lower > best + 1e-9:
                skipped += len(entries) - done
                break
            option = _single(topology, network, workload, topology.sites[i], components)
            singles.append(option)
            if option.feasible and not exact and (best is None or option.total_usd < best):
                best = option.total_usd
    if skipped:
        out.append(RuledOut("bound", "not evaluated: a site covering the same clients costs "
                            "less", skipped, ()))
    return singles, out, nearest


def _missing_cause(workload: Workload, client: str, singles: list[Option], viable: list[Option],
                   nearest_gpu_site: dict[str, ClientLatency] | None, max_relays: int) -> str:
    """Why no replica can serve `client`: sites within its budget that cannot host one (and
    why), or else how far the nearest site with the GPUs misses the budget."""
    assert workload.latency_budget_ms is not None
    budget = workload.latency_budget_ms
    within = [o for o in singles if not o.feasible and any(
        c.client == client and c.p99_ms is not None and c.p99_ms <= budget + _EPS_MS
        for c in o.clients)]
    if within:
        first = within[0]
        return (f"client {client} is within the {budget:g} ms budget of {len(within)} site(s) "
                f"with {workload.gpu} GPUs that cannot host a replica ({first.sites[0]}: "
                f"{first.violations[0] if first.violations else 'infeasible'})")
    nearest = min(
        (c for o in viable for c in o.clients if c.client == client and c.p99_ms is not None),
        key=lambda c: c.p99_ms or 0.0,
        default=ClientLatency(client=client, site=None, p99_ms=None, path=()),
    )
    other = (nearest_gpu_site or {}).get(client)
    if other is not None and other.p99_ms is not None and other.p99_ms <= budget + _EPS_MS:
        # (a site within the budget that passed the checks needing no network and was not
        # evaluated: its lower bound was infinite, so something cannot reach it)
        return (f"client {client} is within the {budget:g} ms budget of {other.site}, which "
                f"the model or data cannot reach within {max_relays} relays")
    if other is not None and other.p99_ms is not None and other.p99_ms > budget + _EPS_MS and (
            nearest.p99_ms is None or other.p99_ms < nearest.p99_ms):
        nearest = other
    if nearest.site is None:
        return f"client {client} cannot reach any site with {workload.gpu} GPUs"
    return _miss_phrase(nearest, budget)


def decide_placement(topology: Topology, network: Network, workload: Workload) -> Decision:
    """Choose the replica sites for an inference workload."""
    assert workload.latency_budget_ms is not None
    assert workload.model is not None
    budget = workload.latency_budget_ms
    components = topology.request_components(workload)
    model = topology.model(workload.model)
    anchors = {model.site} | {topology.dataset(d).site for d in workload.datasets}
    with_gpus = np.flatnonzero(network.site_table.count(workload.gpu) > 0)
    candidates = [topology.sites[int(i)] for i in with_gpus[:EXHAUSTIVE_SITES + 1]]
    ruled: list[RuledOut] = []
    nearest_gpu_site: dict[str, ClientLatency] | None = None
    if len(with_gpus) <= EXHAUSTIVE_SITES:
        singles = [_single(topology, network, workload, site, components)
                   for site in candidates]
    else:
        singles, ruled, nearest_gpu_site = _large_singles(topology, network, workload, anchors,
                                                          components)

    def covered(option: Option) -> frozenset[str]:
        return frozenset(
            c.client
            for c in option.clients
            if c.p99_ms is not None and c.p99_ms <= budget + _EPS_MS
        )

    viable = [o for o in singles if o.feasible]
    by_coverage: dict[frozenset[str], Option] = {}
    for option in viable:
        cover = covered(option)
        if not cover:
            continue
        kept = by_coverage.get(cover)
        if kept is None or option.total_usd < kept.total_usd:
            by_coverage[cover] = option

    reachable = frozenset().union(*by_coverage) if by_coverage else frozenset()
    missing = [c for c in workload.clients if c not in reachable]
    chosen: Option | None = None
    causes: list[str] = []
    if not candidates:
        causes.append(f"no site has {workload.gpu} GPUs")
    elif not viable:
        causes.append(infeasible_summary(
            singles, anchors, rejections=group_rejections(workload, network, singles, ruled)))
    elif missing:
        for client in missing:
            causes.append(_missing_cause(workload, client, singles, viable, nearest_gpu_site,
                                         network.max_relays))
    else:
        classes = list(by_coverage.items())
        picked = [classes[j][1] for j in _min_cover(classes, workload.clients)]
        order = {s.id: i for i, s in enumerate(topology.sites)}
        picked.sort(key=lambda o: order[o.sites[0]])
        sites = tuple(o.sites[0] for o in picked)
        movements = tuple(m for o in picked for m in o.movements)
        combined = Option(
            action="in_place" if sites == (model.site,) and not movements else "replicate_model",
            sites=sites,
            feasible=True,
            violations=(),
            movements=movements,
            compute_usd=sum(o.compute_usd for o in picked),
            hours=workload.hours_on(workload.min_gpus),
            gpus=workload.min_gpus,
            storage_usd=sum(o.storage_usd for o in picked),
            clients=client_latencies(
                network, workload, sites, with_paths=True, components=components
            ),
        )
        deadline = workload.deadline_hours
        if deadline is not None and combined.completion_hours > deadline:
            causes.append(deadline_violation(combined, deadline))
        else:
            chosen = combined

    n_clients = len(workload.clients)
    alternatives = []
    for option in singles:
        if chosen is not None and option.sites[0] in chosen.sites:
            continue
        if not option.feasible:
            why = summarize(option.violations)
        else:
            misses = [c for c in option.clients if c.p99_ms is None or c.p99_ms > budget + _EPS_MS]
            if misses:
                farthest = max(misses, key=lambda c: float("inf") if c.p99_ms is None else c.p99_ms)
                why = (
                    f"covers {n_clients - len(misses)} of {n_clients} clients: "
                    f"{_miss_phrase(farthest, budget)}"
                )
            elif chosen is not None:
                why = (
                    f"costs {money(option.total_usd - chosen.total_usd)} more "
                    f"({money(option.total_usd)} vs {money(chosen.total_usd)})"
                )
            else:
                why = summarize(causes)
        alternatives.append(amended(option, rejected_because=why))

    rejections = group_rejections(workload, network, alternatives, ruled)
    if chosen is None:
        return Decision(
            workload=workload.id,
            kind=workload.kind,
            option=None,
            reason="infeasible: " + summarize(causes),
            alternatives=ranked(alternatives),
            rejections=rejections,
        )

    worst = chosen.worst_client
    assert worst is not None
    assert worst.p99_ms is not None
    count = len(chosen.sites)
    scope = "request" if components is not None else "network"
    reason = (
        f"{count} replica{'s' if count > 1 else ''} at {', '.join(chosen.sites)}: every client "
        f"within the {budget:g} ms {scope} p99 budget (worst: {worst.client} "
        f"{worst.p99_ms:,.1f} ms to {worst.site})"
    )
    shipped = [m for m in chosen.movements if m.kind == "model"]
    if shipped:
        reason += (
            f"; ships model {model.id} ({model.size_gb:,.0f} GB) to {len(shipped)} site"
            f"{'s' if len(shipped) > 1 else ''} for {money(sum(m.egress_usd for m in shipped))} "
            f"in {duration(sum(m.seconds for m in shipped) / 3600)}"
        )
    else:
        reason += f"; model {model.id} is already there"
    reason += f"; compute {money(chosen.compute_usd)}"
    if chosen.storage_usd:
        reason += f", storage {money(chosen.storage_usd)}"
    if count > 1:
        best_single = max(
            (o for o in singles if o.feasible), key=lambda o: (len(covered(o)), -o.total_usd)
        )
        misses = [c for c in best_single.clients if c.client not in covered(best_single)]
        worst_miss = max(misses, key=lambda c: float("inf") if c.p99_ms is None else c.p99_ms)
        reason += (
            f"; no single site covers all {n_clients} clients (best: {best_single.sites[0]} "
            f"covers {len(covered(best_single))}; {_miss_phrase(worst_miss, budget)})"
        )
    return Decision(
        workload=workload.id,
        kind=workload.kind,
        option=chosen,
        reason=reason,
        alternatives=ranked(alternatives),
        rejections=rejections,
    )
