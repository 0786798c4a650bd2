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

from netplan._sections import LatencyComponents
from netplan.decisions import (
    ClientLatency,
    Decision,
    Option,
    amended,
    deadline_violation,
    duration,
    evaluate_site,
    group_rejections,
    infeasible_summary,
    money,
    ranked,
    summarize,
)
from netplan.errors import PlanError
from netplan.network import Network
from netplan.topology import Topology, Workload

__all__ = ["decide_placement"]

_EPS_MS = 1e-9
# Up to this many non-dominated coverage classes the cover is found by enumeration; beyond,
# by the 0/1 program (scipy's import alone costs more than enumerating a dozen classes).
_BRUTE_FORCE_CLASSES = 12


def _client_latencies(
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


def decide_placement(topology: Topology, network: Network, workload: Workload) -> Decision:
    """Choose the replica sites for an inference workload."""
    assert workload.latency_budget_ms is not None
    assert workload.model is not None
    budget = workload.latency_budget_ms
    components = topology.request_components(workload)
    model = topology.model(workload.model)
    candidates = [s for s in topology.sites if s.gpu_count(workload.gpu) > 0]
    singles: list[Option] = []
    for site in candidates:
        option = evaluate_site(topology, network, workload, site, "replicate_model",
                               storage_hours=workload.hours_on(workload.min_gpus))
        if option.priced and not option.movements:  # (unpriced: nothing was worked out)
            option = amended(option, action="in_place")
        singles.append(
            amended(
                option, clients=_client_latencies(
                    network, workload, (site.id,), with_paths=False, components=components
                )
            )
        )

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
        anchors = {model.site} | {topology.dataset(d).site for d in workload.datasets}
        causes.append(infeasible_summary(singles, anchors))
    elif missing:
        for client in missing:
            nearest = min(
                (
                    c
                    for o in viable
                    for c in o.clients
                    if c.client == client and c.p99_ms is not None
                ),
                key=lambda c: c.p99_ms or 0.0,
                default=ClientLatency(client=client, site=None, p99_ms=None, path=()),
            )
            if nearest.site is None:
                causes.append(f"client {client} cannot reach any site with {workload.gpu} GPUs")
            else:
                causes.append(_miss_phrase(nearest, budget))
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
            clients=_client_latencies(
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

    rejections = group_rejections(workload, network, alternatives)
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
