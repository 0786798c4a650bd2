"""`netplan whatif --html`: the what-if document as one page that compares the scenarios.

Pure: the document `netplan whatif --json` prints (`WhatifResult.to_json()`, schema_version 1)
in, HTML out; every number on the page is the document's. Sections: the plan's map (the
baseline's chosen paths, netplan.html.topomap) with the single points of failure marked, when
the topology and its baseline report are given; the scenarios side by side
(workloads and vector indexes lost, budget misses, cost and sync-cost change, worst first), a
scenarios x workloads matrix of what happened to each decision (hover: before and after), the
single points of failure, the baseline, and each scenario in detail: decisions before and after,
inference failover per client against its budget, and each failed training run's standby sites
as a timeline (restore, then compute, against the deadline).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from netplan.html.page import BAD, GOOD, MUTED, WARN, Figure, figure, hours, money, render
from netplan.html.topomap import Hazards, topology_map
from netplan.topology import Topology

__all__ = ["COMPARED", "DETAILED", "whatif_page"]

# The comparison chart and matrix show the scenarios that hurt most, up to COMPARED; the
# scenarios beyond DETAILED get a row in the table, not a section of their own.
COMPARED = 60
DETAILED = 25
_MATRIX_WORKLOADS = 80
_STANDBY_CHARTS = 12

# What happened to a workload in a scenario: matrix value, label, colour.
_STATUS = {"unchanged": (0, "unchanged", "#f6f8fa"), "changed": (1, "changed", "#9ecae1"),
           "not needed": (1, "not needed", "#9ecae1"), "recovered": (2, "recovered", GOOD),
           "still infeasible": (3, "still infeasible", WARN), "lost": (4, "lost", BAD)}


def _order(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Scenarios worst first (the document's ranking), then the rest in the given order."""
    by_name = {s["name"]: s for s in doc["scenarios"]}
    ranked = [by_name[n] for n in doc["ranking"] if n in by_name]
    seen = {s["name"] for s in ranked}
    return ranked + [s for s in doc["scenarios"] if s["name"] not in seen]


def whatif_page(doc: Mapping[str, Any], *, generator: str = "netplan whatif --html",
                topology: Topology | None = None,
                baseline: Mapping[str, Any] | None = None) -> str:
    """The whole page for what-if document `doc`; given the `topology` and its baseline
    report (`Report.to_json()`), a map of the plan with the single points of failure marked."""
    scenarios = _order(doc)
    compared = scenarios[:COMPARED]
    figures: list[Figure] = []
    tmap = None
    if topology is not None and baseline is not None:
        tmap = topology_map(topology, baseline, hazards=Hazards.of(
            doc["single_points_of_failure"]))
        figures.append(tmap.figure)
    comparison = comparison_figure(compared)
    matrix = matrix_figure(doc, compared)
    figures += [f for f in (comparison, matrix) if f is not None]
    details = [scenario_view(s, i) for i, s in enumerate(scenarios[:DETAILED])]
    charts = 0
    for view in details:
        keep = []
        for f in view["figures"]:
            if charts < _STANDBY_CHARTS:
                keep.append(f)
                charts += 1
        view["figures"] = keep
        figures += keep
    return render(
        "whatif.html.j2", title=f"netplan whatif: {doc['topology']}", figures=figures,
        generator=generator, doc=doc, stats=doc["stats"], tiles=summary_tiles(doc),
        scenarios=scenarios, compared=len(compared),
        table=[{"s": s, "cost": _delta(s["cost_delta_usd"]),
                "sync": _delta(s["sync_cost_delta_usd_per_day"])} for s in scenarios],
        comparison=comparison, matrix=matrix,
        details=details, detailed=DETAILED, run=doc.get("run"), tmap=tmap)


def summary_tiles(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    st = doc["stats"]
    hurt = len(doc["ranking"])
    worst = max((len(s["workloads_lost"]) + len(s["indexes_lost"]) for s in doc["scenarios"]),
                default=0)
    spofs = len(doc["single_points_of_failure"])
    base = doc["baseline"]
    return [
        (f"{st['scenarios']:,}", "scenarios" + (f" ({doc['sweep']} sweep)" if doc["sweep"]
                                                else ""), ""),
        (f"{st['scenarios_with_effect']:,}", "change the plan", ""),
        (f"{hurt:,}", "hurt (lose, miss a budget or cost more)", "bad" if hurt else "ok"),
        (f"{worst:,}", "most workloads and indexes lost in one scenario",
         "bad" if worst else "ok"),
        (f"{spofs:,}", "single points of failure", "bad" if spofs else "ok"),
        (money(base["total_usd"]), "baseline cost", ""),
        (f"{st['workloads_replanned']:,} / {st['workloads_replanned'] + st['workloads_skipped']:,}",
         "workload decisions re-planned (the rest: not reached)", ""),
    ]


def _lost(s: Mapping[str, Any]) -> list[str]:
    return [*s["workloads_lost"], *s["indexes_lost"]]


def comparison_figure(scenarios: Sequence[Mapping[str, Any]]) -> Figure | None:
    """The scenarios side by side, one row each: what they lose, the budgets they miss, what
    they cost more (or less) per run and per day of sync."""
    if not scenarios:
        return None
    names = [s["name"] for s in scenarios]
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=("workloads and indexes lost, budget misses",
                                        "cost change of the decisions (USD)",
                                        "sync plan cost change (USD/day)"))
    lost = [len(_lost(s)) for s in scenarios]
    fig.add_trace(go.Bar(
        y=names, x=lost, orientation="h", name="lost", marker_color=BAD,
        hovertext=[f"<b>{s['name']}</b>: {n} lost" + (": " + ", ".join(_lost(s)[:8])
                                                     if n else "")
                   for s, n in zip(scenarios, lost, strict=True)], hoverinfo="text"),
        row=1, col=1)
    fig.add_trace(go.Bar(
        y=names, x=[s["budget_misses"] for s in scenarios], orientation="h",
        name="budget misses", marker_color=WARN,
        hovertext=[f"<b>{s['name']}</b>: {s['budget_misses']} latency budget miss(es)"
                   for s in scenarios], hoverinfo="text"), row=1, col=1)
    for col, key, label in ((2, "cost_delta_usd", "decisions"),
                            (3, "sync_cost_delta_usd_per_day", "sync per day")):
        values = [s[key] or 0.0 for s in scenarios]
        fig.add_trace(go.Bar(
            y=names, x=values, orientation="h", name=f"cost change: {label}",
            showlegend=False, marker_color=[BAD if v > 0.005 else GOOD if v < -0.005 else MUTED
                                            for v in values],
            hovertext=[f"<b>{s['name']}</b>: {label} {_delta(v)}"
                       for s, v in zip(scenarios, values, strict=True)],
            hoverinfo="text"), row=1, col=col)
    fig.update_layout(barmode="group")
    fig.update_yaxes(autorange="reversed", automargin=True, row=1, col=1)
    fig.update_xaxes(showgrid=True, gridcolor="#eaeef2", zeroline=True,
                     zerolinecolor="#8c959f")
    fig.update_annotations(font_size=12)
    return figure(fig, "scenario-chart", "The scenarios side by side, worst first",
                  140 + 26 * len(scenarios), legend_below=True, margin_top=30)


def _delta(usd: float | None) -> str:
    if usd is None or abs(usd) < 0.005:
        return "no change"
    return ("+" if usd > 0 else "-") + money(abs(usd))


def _decision_line(d: Mapping[str, Any]) -> str:
    if not d["feasible"]:
        return "infeasible"
    parts = [f"{d['action']} at {', '.join(d['sites']) or '-'}"]
    if len(d["path"]) > 1:
        parts.append("via " + " → ".join(d["path"]))
    if d["total_usd"] is not None:
        parts.append(money(d["total_usd"]))
    if d["completion_hours"] is not None:
        parts.append(hours(d["completion_hours"]))
    return ", ".join(parts)


def matrix_figure(doc: Mapping[str, Any], scenarios: Sequence[Mapping[str, Any]]
                  ) -> Figure | None:
    """Scenarios x workloads: what became of each decision (unchanged, changed, recovered,
    still infeasible, lost), the decision before and after in the hover."""
    workloads = [d["workload"] for d in doc["baseline"]["decisions"]][:_MATRIX_WORKLOADS]
    if not scenarios or not workloads:
        return None
    baseline = {d["workload"]: d for d in doc["baseline"]["decisions"]}
    z, hover = [], []
    for s in scenarios:
        changes = {c["workload"]: c for c in s["workload_changes"]}
        row, text = [], []
        for w in workloads:
            c = changes.get(w)
            status = c["status"] if c else "unchanged"
            row.append(_STATUS[status][0])
            line = f"<b>{s['name']}</b>, {w}: {status}"
            if c:
                line += (f"<br>before: {_decision_line(c['before'])}<br>after: "
                         f"{_decision_line(c['after'])}")
                if not c["after"]["feasible"]:
                    line += f"<br>{c['after']['reason'][:300]}"
            else:
                line += f"<br>{_decision_line(baseline[w])}"
            text.append(line)
        z.append(row)
        hover.append(text)
    colours = {value: colour for value, _, colour in _STATUS.values()}
    top = max(colours)
    # A stepped scale: each status's value owns the band around it.
    scale: list[list[float | str]] = []
    for value in sorted(colours):
        scale += [[max(0.0, (value - 0.5) / top), colours[value]],
                  [min(1.0, (value + 0.5) / top), colours[value]]]
    fig = go.Figure(go.Heatmap(
        z=z, x=workloads, y=[s["name"] for s in scenarios], zmin=0, zmax=top,
        colorscale=scale, xgap=2, ygap=2, text=hover, hoverinfo="text",
        colorbar={"tickvals": [0, 1, 2, 3, 4], "ticktext": ["unchanged", "changed",
                                                            "recovered", "still infeasible",
                                                            "lost"], "thickness": 12}))
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(automargin=True, tickangle=-30, side="top")
    more = len(doc["baseline"]["decisions"]) - len(workloads)
    title = "What each scenario does to each workload's decision" + (
        f" (the first {len(workloads)} workloads; {more} more in the tables)" if more else "")
    return figure(fig, "scenario-matrix", title, 140 + 24 * len(scenarios))


def standby_figure(t: Mapping[str, Any], scenario: str, i: int, k: int) -> Figure | None:
    """A failed training run's standby sites as timelines from the failure: restore (RTO),
    then compute, against the deadline; work lost (RPO) in the hover."""
    standbys = [s for s in t["standbys"] if s["feasible"]]
    if not standbys:
        return None
    labels = [s["site"] for s in standbys]
    rto = [s["rto_hours"] or 0.0 for s in standbys]
    compute = [s["compute_hours"] or 0.0 for s in standbys]
    hover = [f"<b>{s['site']}</b>: restore {hours(s['rto_hours'])} "
             f"({s['restore_gb'] or 0:,.0f} GB from {s['checkpoint_from'] or 'the start'}), "
             f"then {hours(s['compute_hours'])} of compute on {s['gpus']} GPUs<br>"
             f"work lost (RPO) {hours(s['rpo_hours'])}; finishes {hours(s['finish_hours'])} "
             f"after the failure; {money(s['cost_usd'])}<br>{s['why']}" for s in standbys]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=labels, x=rto, orientation="h", name="restore (RTO)",
                         marker_color="#4c72b0", hovertext=hover, hoverinfo="text"))
    fig.add_trace(go.Bar(y=labels, x=compute, base=rto, orientation="h", name="compute",
                         marker_color=[GOOD if s["meets_deadline"] else BAD for s in standbys],
                         hovertext=hover, hoverinfo="text"))
    if t["deadline_hours"] is not None and t["elapsed_hours"] is not None:
        left = t["deadline_hours"] - t["elapsed_hours"]
        fig.add_vline(x=left, line={"color": BAD, "dash": "dash"},
                      annotation_text=f"deadline ({hours(left)} left)")
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(title_text="hours after the failure", showgrid=True, gridcolor="#eaeef2")
    return figure(fig, f"standby-{i}-{k}", f"{scenario}: where {t['workload']} resumes after "
                  f"{t['failed_site']} fails", 110 + 30 * len(labels))


def scenario_view(s: Mapping[str, Any], i: int) -> dict[str, Any]:
    """What a scenario's section shows: its rows and its standby charts."""
    figures = [f for k, t in enumerate(s["training_failover"])
               if (f := standby_figure(t, s["name"], i, k)) is not None]
    rows = [{"c": c, "before": _decision_line(c["before"]),
             "after": _decision_line(c["after"]), "delta": _delta(c["cost_delta_usd"])}
            for c in s["workload_changes"]]
    return {"s": s, "i": i, "rows": rows, "figures": figures}
