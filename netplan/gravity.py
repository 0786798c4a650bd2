"""Data gravity: for a training-style workload, move the data, move the compute, or stage a subset.

Theory of operation.
- Candidate sites: every site with GPUs of the workload's type, plus the sites holding its data
  and model (so an infeasible workload can say why running next to the data fails too).
- At each candidate the options are: `in_place` (nothing moves), `move_compute` (the site holds
  the largest dataset; the model and any other dataset move there), `move_data` (the datasets move
  to the GPUs), and `stage_subset` (like those, but only each moved dataset's `active_fraction`).
- Feasible: the GPU type and count exist at the site; every dataset's residency admits the site
  and every relay hop; raw-tier data never leaves its site; a path exists within the relay limit;
  incoming data fits `storage_tb`; the deadline holds (transfer time + compute hours).
- Objective: least total cost (compute + egress + relay charges + storage of the copies for as
  long as the job holds them; see `netplan.decisions`). Options within 5 % of the cheapest are a
  tie, won by the earliest completion. Every losing option says why it lost.
- Large estates (more than EXHAUSTIVE_OPTIONS options): options failing a check that needs no
  network (GPUs, residency, raw tier), out of reach within the relay limit, or unable to meet
  the deadline even at the most the links into and out of the sites carry, are counted by reason
  without being built. The rest go in order of an admissible lower bound (least compute + each
  moving artifact at the least $/GB to the site within the relay limit + storage for the compute
  hours alone); once a bound is beyond the 5 % band of the best feasible total, the search stops
  and the remaining options are counted, not evaluated.
"""

from __future__ import annotations

import math

import numpy as np

from netplan.decisions import (
    COST_TIE_FRACTION,
    HOURS_PER_MONTH,
    Action,
    Decision,
    Option,
    Rejection,
    RuledOut,
    amended,
    duration,
    evaluate_site,
    group_rejections,
    infeasible_summary,
    least_compute_usd,
    money,
    prefilter_sites,
    ranked,
    ruled_out,
    summarize,
)
from netplan.network import Network
from netplan.topology import Site, Topology, Workload

__all__ = ["decide_gravity"]


def _anchors(topology: Topology, workload: Workload) -> set[str]:
    anchors = {topology.dataset(d).site for d in workload.datasets}
    if workload.model:
        anchors.add(topology.model(workload.model).site)
    return anchors


def _candidate_sites(topology: Topology, workload: Workload) -> list[Site]:
    anchors = _anchors(topology, workload)
    return [s for s in topology.sites if s.gpu_count(workload.gpu) > 0 or s.id in anchors]


# Up to this many options everything is evaluated in full (the alternatives table stays
# complete); beyond it, branch and bound skips options that cannot win (see _options).
EXHAUSTIVE_OPTIONS = 64


def _site_variants(topology: Topology, workload: Workload, site: Site) -> list[tuple[Action,
                                                                                   bool]]:
    """(action, subset) of every option worth evaluating at `site`."""
    datasets = [topology.dataset(d) for d in workload.datasets]
    largest = max(datasets, key=lambda d: d.size_gb) if datasets else None
    model_site = topology.model(workload.model).site if workload.model else None
    moving = [d for d in datasets if d.site != site.id]
    action: Action
    if not moving and (model_site is None or model_site == site.id):
        action = "in_place"
    elif largest is None or largest.site == site.id:
        action = "move_compute"
    else:
        action = "move_data"
    out: list[tuple[Action, bool]] = [(action, False)]
    # A site short of GPUs fails either way: a staged variant would only repeat that.
    if (any(d.active_fraction < 1.0 for d in moving)
            and site.gpu_count(workload.gpu) >= workload.min_gpus):
        out.append(("stage_subset", True))
    return out


def _variants(topology: Topology, workload: Workload) -> list[tuple[Site, Action, bool]]:
    """(site, action, subset) for every option worth evaluating."""
    return [(site, action, subset) for site in _candidate_sites(topology, workload)
            for action, subset in _site_variants(topology, workload, site)]


def _moving(topology: Topology, workload: Workload, site: Site, subset: bool
            ) -> list[tuple[str, float, frozenset[str] | None]]:
    """(source site, GB, residency regions) of every artifact that must move to `site`."""
    out: list[tuple[str, float, frozenset[str] | None]] = []
    for ds_id in workload.datasets:
        ds = topology.dataset(ds_id)
        if ds.site != site.id:
            size = ds.size_gb * ds.active_fraction if subset else ds.size_gb
            out.append((ds.site, size, frozenset(ds.residency) if ds.residency else None))
    if workload.model:
        model = topology.model(workload.model)
        if model.site != site.id:
            out.append((model.site, model.size_gb, None))
    return out


def _lower_bound_usd(
    topology: Topology,
    network: Network,
    workload: Workload,
    site: Site,
    subset: bool,
    confined: bool = True,
) -> float:
    """Least compute, plus each artifact that must move at the least $/GB from its site to this
    one within the relay limit (inf when out of reach), plus storage of the copies for the
    compute hours alone: no option here costs less, so the bound is admissible. `confined`
    False prices paths outside the data's residency too (what the option would cost if the
    residency allowed it)."""
    bound = least_compute_usd(workload, site)
    incoming = 0.0
    index = network.site_index(site.id)
    for source, size, regions in _moving(topology, workload, site, subset):
        usd = network.min_usd_per_gb_from(source, regions if confined else None)[index]
        if math.isinf(usd):
            return math.inf
        bound += size * usd
        incoming += size
    most = min(workload.gpus_max or site.gpu_count(workload.gpu), site.gpu_count(workload.gpu))
    hours = workload.hours_on(max(most, workload.min_gpus))
    return bound + incoming * site.storage_price * hours / HOURS_PER_MONTH


def _options(
    topology: Topology, network: Network, workload: Workload
) -> tuple[list[Option], int, list[RuledOut]]:
    """Evaluated options, how many were skipped by the bound, and the groups of sites ruled
    out without building an option.

    Small candidate sets are evaluated exhaustively. Larger ones are prefiltered as arrays
    (`_prefilter`), then go in order of an admissible lower bound on total cost; once a bound
    exceeds the best feasible total by more than the 5 % tie band, no remaining option can be
    the cheapest or tie with it, so the search stops.
    """
    table = network.site_table
    anchors = _anchors(topology, workload)
    n_candidates = int(np.count_nonzero(table.count(workload.gpu) > 0)) + len(anchors)
    if n_candidates * (2 if any(topology.dataset(d).active_fraction < 1
                                for d in workload.datasets) else 1) <= EXHAUSTIVE_OPTIONS:
        variants = _variants(topology, workload)
        if len(variants) <= EXHAUSTIVE_OPTIONS:
            return [
                evaluate_site(topology, network, workload, site, action, subset=subset)
                for site, action, subset in variants
            ], 0, []
    options = [
        evaluate_site(topology, network, workload, site, action, subset=subset)
        for site in (topology.site(a) for a in sorted(anchors, key=network.site_index))
        for action, subset in _site_variants(topology, workload, site)
    ]
    bounded, ruled_out = _prefilter(topology, network, workload, anchors)
    best = min((o.total_usd for o in options if o.feasible), default=None)
    sites = topology.sites
    for done, (bound, i, subset) in enumerate(bounded):
        if best is not None and bound > best * (1 + COST_TIE_FRACTION) + 1e-9:
            return options, len(bounded) - done, ruled_out
        action: Action = "stage_subset" if subset else "move_data"
        option = evaluate_site(topology, network, workload, sites[i], action, subset=subset)
        options.append(option)
        if option.feasible and (best is None or option.total_usd < best):
            best = option.total_usd
    return options, 0, ruled_out


def _hours(workload: Workload, gpus: np.ndarray) -> np.ndarray:
    """`Workload.hours_on` for many counts at once."""
    if not workload.elastic:
        return np.full(len(gpus), workload.hours_on(workload.min_gpus))
    assert workload.gpu_hours is not None
    base = workload.min_gpus
    exponent = math.log2(2 * workload.scaling_efficiency)
    safe = np.maximum(gpus, 1)
    return workload.gpu_hours / base * (base / safe) ** exponent


def _prefilter(
    topology: Topology, network: Network, workload: Workload, anchors: set[str]
) -> tuple[list[tuple[float, int, bool]], list[RuledOut]]:
    """Every candidate site that holds none of the workload's data or model, checked as arrays:
    (lower bound, site index, subset) of the options worth evaluating, sorted, and the groups
    ruled out (GPUs, residency, raw tier, out of reach within the relay limit, too slow for the
    deadline even at full link capacity). The same checks `evaluate_site` makes, in its
    order, so the outcome is the same as evaluating every option (tested)."""
    table = network.site_table
    ids = network.site_ids
    count = table.count(workload.gpu)
    cand, out = prefilter_sites(topology, network, workload, anchors)
    if not len(cand):
        return [], out
    datasets = [topology.dataset(d) for d in workload.datasets]
    need = workload.min_gpus
    moving: list[tuple[str, float, float, frozenset[str] | None]] = [
        (ds.site, ds.size_gb, ds.size_gb * ds.active_fraction,
         frozenset(ds.residency) if ds.residency else None) for ds in datasets]
    if workload.model:
        model = topology.model(workload.model)
        moving.append((model.site, model.size_gb, model.size_gb, None))
    most = np.minimum(count[cand], workload.gpus_max or count[cand])
    hours_most = _hours(workload, most)
    compute = need * workload.hours_on(need) * table.price(workload.gpu)[cand]
    variants = [False]
    if any(ds.active_fraction < 1 for ds in datasets):
        variants.append(True)
    bounded: list[tuple[float, int, bool]] = []
    reach = f"out of reach within {network.max_relays} relays"
    for subset in variants:
        usd = compute.copy()
        incoming = 0.0
        seconds = hours_most * 3600
        for source, full, part, regions in moving:
            size = part if subset else full
            usd += size * network.min_usd_per_gb_from(source, regions)[cand]
            incoming += size
            out_cap, in_cap = network.capacity_gbps(regions)
            rate = np.minimum(out_cap[network.site_index(source)], in_cap[cand])
            if size > 0:
                with np.errstate(divide="ignore"):
                    seconds = seconds + size * 8 / rate
        usd += incoming * table.storage_price[cand] * hours_most / HOURS_PER_MONTH
        unreachable = np.isinf(usd)
        slow = ~unreachable & (workload.deadline_hours is not None) & (
            seconds > (workload.deadline_hours or 0) * 3600 + 1e-6)
        if not subset:  # (a staged variant fails the same way: counted once per site)
            if unreachable.any():
                out.append(ruled_out("path", reach, cand[unreachable], ids))
            if slow.any():
                out.append(ruled_out("deadline", f"cannot meet the {workload.deadline_hours:g}"
                                      " h deadline even at full link capacity", cand[slow], ids))
        keep = ~unreachable & ~slow
        bounded += zip(usd[keep].tolist(), cand[keep].tolist(), [subset] * int(keep.sum()),
                       strict=True)
    bounded.sort()
    return bounded, out


def _moves_phrase(option: Option) -> str:
    if not option.movements:
        return "nothing moves"
    parts = []
    for m in sorted(option.movements, key=lambda m: -m.size_gb):
        route = m.route
        if route.multipath:
            via = " + ".join(f"{leg.share:.0%} via {' -> '.join(leg.path.sites)}"
                             for leg in route.legs)
        else:
            via = "via " + " -> ".join(m.path)
        parts.append(
            f"{m.kind} {m.id} ({m.size_gb:,.0f} GB {via}, {duration(m.seconds / 3600)}: "
            f"{route.why})"
        )
    return "moves " + ", ".join(parts)


def _cost_phrase(option: Option) -> str:
    parts = [f"compute {money(option.compute_usd)}", f"egress {money(option.egress_usd)}"]
    if option.storage_usd:
        parts.append(f"storage {money(option.storage_usd)}")
    if option.relay_usd:
        parts.append(f"relays {money(option.relay_usd)}")
    return (f"{money(option.total_usd)} ({' + '.join(parts)}), done in "
            f"{duration(option.completion_hours)}")


def choose(options: list[Option]) -> tuple[Option | None, Option | None]:
    """(chosen, cheapest) among feasible options: least cost, 5 % ties to the earlier finish."""
    feasible = [o for o in options if o.feasible]
    if not feasible:
        return None, None
    cheapest = min(feasible, key=lambda o: (o.total_usd, o.completion_hours))
    limit = cheapest.total_usd * (1 + COST_TIE_FRACTION) + 1e-9
    near = [o for o in feasible if o.total_usd <= limit]
    chosen = min(near, key=lambda o: (o.completion_hours, o.total_usd))
    return chosen, cheapest


def rejection(option: Option, chosen: Option | None, cheapest: Option | None) -> str:
    if not option.feasible:
        return summarize(option.violations)
    assert chosen is not None  # a feasible option exists, so one was chosen
    assert cheapest is not None
    if option.total_usd <= cheapest.total_usd * (1 + COST_TIE_FRACTION) + 1e-9:
        # In the 5 % tie band with the chosen option, which finishes first.
        return (
            f"within 5% of the cheapest cost ({money(option.total_usd)} vs "
            f"{money(cheapest.total_usd)}) but finishes later "
            f"({duration(option.completion_hours)} vs {duration(chosen.completion_hours)})"
        )
    return (
        f"costs {money(option.total_usd - chosen.total_usd)} more "
        f"({money(option.total_usd)} vs {money(chosen.total_usd)})"
    )


def decide_gravity(topology: Topology, network: Network, workload: Workload) -> Decision:
    """Choose where a non-inference workload runs, on how many GPUs, and what moves how."""
    options, skipped, ruled_out = _options(topology, network, workload)
    chosen, cheapest = choose(options)
    alternatives = ranked(
        amended(o, rejected_because=rejection(o, chosen, cheapest))
        for o in options
        if o is not chosen
    )
    rejections = group_rejections(workload, network, alternatives, ruled_out)
    if skipped:
        rejections = (*rejections, Rejection(
            "bound", "not evaluated: compute plus the cheapest way in alone costs over 5% more "
            "than the choice", skipped, ()))
    anchors = _anchors(topology, workload)
    if chosen is None or cheapest is None:
        summary = (infeasible_summary(options, anchors, rejections=rejections)
                   or f"no site has {workload.gpu} GPUs")
        return Decision(
            workload=workload.id,
            kind=workload.kind,
            option=None,
            reason="infeasible: " + summary,
            alternatives=alternatives,
            rejections=rejections,
        )  # (nothing is skipped when no option is feasible: there is no bound to prune with)

    where = chosen.where()
    if chosen.gpus_why:
        where += f" on {chosen.gpus_why}"
    reason = f"{where}: {_moves_phrase(chosen)}; least total cost {_cost_phrase(chosen)}"
    if chosen is not cheapest:
        reason = (
            f"{where}: {_moves_phrase(chosen)}; {_cost_phrase(chosen)}, within 5% of "
            f"the cheapest ({cheapest.where()}, {money(cheapest.total_usd)}) and finishes "
            f"{duration(cheapest.completion_hours - chosen.completion_hours)} earlier"
        )
    # Name what kept cheaper options out: that is the binding constraint on this decision.
    # (Only sites that price the GPU type: a site without those GPUs is not "cheaper".)
    table = network.site_table
    priced_mask = table.priced.get(workload.gpu)

    # An unpriced option's total is unknown: compare its admissible lower bound instead, and
    # say "from" so the claim stays true.
    def at_least(o: Option) -> float:
        if o.priced:
            return o.total_usd
        site = topology.site(o.sites[0])
        return _lower_bound_usd(topology, network, workload, site, o.action == "stage_subset",
                                confined=False)

    cheaper_blocked = sorted(
        ((at_least(o), o) for o in options
         if not o.feasible and priced_mask is not None
         and priced_mask[network.site_index(o.sites[0])]),
        key=lambda pair: pair[0],
    )
    if cheaper_blocked and cheaper_blocked[0][0] < chosen.total_usd:
        bound, best = cheaper_blocked[0]
        price = money(bound) if best.priced else f"from {money(bound)}"
        reason += (
            f"; cheaper {best.where()} ({price}) ruled out: {summarize(best.violations, limit=3)}"
        )
    if skipped:
        reason += (
            f"; {skipped} more options not evaluated: their compute plus the cheapest way in "
            "alone costs over 5% more"
        )
    return Decision(
        workload=workload.id,
        kind=workload.kind,
        option=chosen,
        reason=reason,
        alternatives=alternatives,
        skipped=skipped,
        rejections=rejections,
    )
