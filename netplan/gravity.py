"""Data gravity: for a training-style workload, move the data, move the compute, or stage a subset.

Theory of operation.
- Candidate sites: every site with GPUs of the workload's type, plus the sites holding its data
  and model (so an infeasible workload can say why running next to the data fails too).
- At each candidate the options are: `in_place` (nothing moves), `move_compute` (the site holds
  the largest dataset; the model and any other dataset move there), `move_data` (the datasets move
  to the GPUs), and `stage_subset` (like those, but only each moved dataset's `active_fraction`).
- Feasible: the GPU type and count exist at the site; every dataset's residency admits the site
  and every relay hop; raw-tier data never leaves its site; incoming data fits `storage_tb`; the
  deadline holds (transfer time + compute hours).
- Objective: least total cost (egress + GPU-hours at the site's price). Options within 5 % of the
  cheapest are a tie, won by the earliest completion. Every losing option says why it lost.
- Large estates (more than EXHAUSTIVE_OPTIONS options): branch and bound over an admissible lower
  bound (compute + each moving artifact at the cheapest price of leaving its site); options whose
  bound is beyond the 5 % band of the best feasible total are counted, not evaluated.
"""

from __future__ import annotations

from netplan.decisions import (
    COST_TIE_FRACTION,
    Action,
    Decision,
    Option,
    amended,
    duration,
    evaluate_site,
    gpu_violation,
    infeasible_summary,
    money,
    ranked,
    summarize,
)
from netplan.network import Network
from netplan.topology import Site, Topology, Workload

__all__ = ["decide_gravity"]


def _candidate_sites(topology: Topology, workload: Workload) -> list[Site]:
    anchors = {topology.dataset(d).site for d in workload.datasets}
    if workload.model:
        anchors.add(topology.model(workload.model).site)
    return [s for s in topology.sites if s.gpu_count(workload.gpu) > 0 or s.id in anchors]


# Up to this many options everything is evaluated in full (the alternatives table stays
# complete); beyond it, branch and bound skips options that cannot win (see _options).
EXHAUSTIVE_OPTIONS = 64


def _variants(topology: Topology, workload: Workload) -> list[tuple[Site, Action, bool]]:
    """(site, action, subset) for every option worth evaluating."""
    datasets = [topology.dataset(d) for d in workload.datasets]
    largest = max(datasets, key=lambda d: d.size_gb) if datasets else None
    model_site = topology.model(workload.model).site if workload.model else None
    variants: list[tuple[Site, Action, bool]] = []
    for site in _candidate_sites(topology, workload):
        moving = [d for d in datasets if d.site != site.id]
        action: Action
        if not moving and (model_site is None or model_site == site.id):
            action = "in_place"
        elif largest is None or largest.site == site.id:
            action = "move_compute"
        else:
            action = "move_data"
        variants.append((site, action, False))
        # A site short of GPUs fails either way: a staged variant would only repeat that.
        if any(d.active_fraction < 1.0 for d in moving) and gpu_violation(site, workload) is None:
            variants.append((site, "stage_subset", True))
    return variants


def _lower_bound_usd(
    topology: Topology, network: Network, workload: Workload, site: Site, subset: bool
) -> float:
    """Compute cost plus, for each artifact that must move, its size times the cheapest price of
    leaving its site at all: no path can cost less, so the bound is admissible."""
    bound = workload.gpus * workload.hours * site.gpu_hour_usd.get(workload.gpu, 0.0)
    for ds_id in workload.datasets:
        ds = topology.dataset(ds_id)
        if ds.site != site.id:
            size = ds.size_gb * ds.active_fraction if subset else ds.size_gb
            if size > 0:  # (a site without links prices leaving at inf; 0 x inf is nan)
                bound += size * network.min_egress_usd_per_gb(ds.site)
    if workload.model:
        model = topology.model(workload.model)
        if model.site != site.id and model.size_gb > 0:
            bound += model.size_gb * network.min_egress_usd_per_gb(model.site)
    return bound


def _options(topology: Topology, network: Network, workload: Workload) -> tuple[list[Option], int]:
    """Evaluated options and how many were skipped.

    Small candidate sets are evaluated exhaustively. Larger ones go in order of an admissible
    lower bound on total cost; once a bound exceeds the best feasible total by more than the 5 %
    tie band, no remaining option can be the cheapest or tie with it, so the search stops.
    """
    variants = _variants(topology, workload)
    if len(variants) <= EXHAUSTIVE_OPTIONS:
        return [
            evaluate_site(topology, network, workload, site, action, subset=subset)
            for site, action, subset in variants
        ], 0
    bounded = sorted(
        (
            (_lower_bound_usd(topology, network, workload, site, subset), n)
            for n, (site, _action, subset) in enumerate(variants)
        )
    )
    options: list[Option] = []
    best: float | None = None
    for done, (bound, n) in enumerate(bounded):
        if best is not None and bound > best * (1 + COST_TIE_FRACTION) + 1e-9:
            return options, len(bounded) - done
        site, action, subset = variants[n]
        option = evaluate_site(topology, network, workload, site, action, subset=subset)
        options.append(option)
        if option.feasible and (best is None or option.total_usd < best):
            best = option.total_usd
    return options, 0


def _moves_phrase(option: Option) -> str:
    if not option.movements:
        return "nothing moves"
    parts = []
    for m in sorted(option.movements, key=lambda m: -m.size_gb):
        via = " -> ".join(m.path)
        parts.append(
            f"{m.kind} {m.id} ({m.size_gb:,.0f} GB via {via}, {duration(m.seconds / 3600)})"
        )
    return "moves " + ", ".join(parts)


def _cost_phrase(option: Option) -> str:
    return (
        f"{money(option.total_usd)} (egress {money(option.egress_usd)} + compute "
        f"{money(option.compute_usd)}), done in {duration(option.completion_hours)}"
    )


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
    """Choose where a non-inference workload runs and what moves."""
    options, skipped = _options(topology, network, workload)
    chosen, cheapest = choose(options)
    alternatives = ranked(
        amended(o, rejected_because=rejection(o, chosen, cheapest))
        for o in options
        if o is not chosen
    )
    if chosen is None or cheapest is None:
        anchors = {topology.dataset(d).site for d in workload.datasets}
        if workload.model:
            anchors.add(topology.model(workload.model).site)
        summary = infeasible_summary(options, anchors) or f"no site has {workload.gpu} GPUs"
        return Decision(
            workload=workload.id,
            kind=workload.kind,
            option=None,
            reason="infeasible: " + summary,
            alternatives=alternatives,
        )  # (nothing is skipped when no option is feasible: there is no bound to prune with)

    reason = f"{chosen.where()}: {_moves_phrase(chosen)}; least total cost {_cost_phrase(chosen)}"
    if chosen is not cheapest:
        reason = (
            f"{chosen.where()}: {_moves_phrase(chosen)}; {_cost_phrase(chosen)}, within 5% of "
            f"the cheapest ({cheapest.where()}, {money(cheapest.total_usd)}) and finishes "
            f"{duration(cheapest.completion_hours - chosen.completion_hours)} earlier"
        )
    # Name what kept cheaper options out: that is the binding constraint on this decision.
    # (Only sites that price the GPU type: a site without those GPUs is not "cheaper".)
    priced = {s.id for s in topology.sites if workload.gpu in s.gpu_hour_usd}

    # An unpriced option's total is unknown: compare its admissible lower bound instead, and
    # say "from" so the claim stays true.
    def at_least(o: Option) -> float:
        if o.priced:
            return o.total_usd
        site = topology.site(o.sites[0])
        return _lower_bound_usd(topology, network, workload, site, o.action == "stage_subset")

    cheaper_blocked = sorted(
        ((at_least(o), o) for o in options if not o.feasible and o.sites[0] in priced),
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
            f"; {skipped} more options not evaluated: their compute plus the cheapest way out of "
            f"the data's site alone costs over 5% more"
        )
    return Decision(
        workload=workload.id,
        kind=workload.kind,
        option=chosen,
        reason=reason,
        alternatives=alternatives,
        skipped=skipped,
    )
