"""`netplan analyze --html`: the analysis report as one page.

Pure: a `Topology` and its report's versioned JSON (`Report.to_json()`, the same document
`--json` prints) in, HTML text out. The topology supplies what the report does not repeat
(each site's kind and region, each workload's deadline, each index's budget); every number on
the page comes from the report document, so the page and `--json` cannot disagree.

Sections: the map (netplan.html.topomap), then per workload the decision, its reason, what lost
and why, and a timeline of transfer, compute and deadline; the cost of each decision (egress per
hop in its hover and table); vector-index shard placement as a shards x sites matrix with each
querying site's p99 against its budget; the sync plan's per-link load against the window's
capacity; latency budgets as waterfalls; and every link's numbers in a table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from netplan.html.page import BAD, GOOD, MUTED, Figure, arrow, figure, gbps, hours, money, render
from netplan.html.topomap import MAP_SITE_LIMIT, moves_of, topology_map
from netplan.topology import Topology

__all__ = ["BUDGET_CHARTS", "INDEX_CHARTS", "analysis_page"]

# Past these, the worst (least headroom) get a chart and the rest a table row.
BUDGET_CHARTS = 12
INDEX_CHARTS = 8
# Past this many link directions the links table keeps those on chosen paths (like the CLI).
_LINK_ROWS = 120

_COST_PARTS = (("compute_usd", "compute", "#4c72b0"), ("egress_usd", "egress", "#dd8452"),
               ("storage_usd", "storage", "#55a868"), ("relay_usd", "relays", "#8172b3"))
_COMPONENT_LABEL = {"dns": "DNS", "tls_handshake": "TLS handshake",
                    "request_routing": "request routing", "feature_lookup": "feature lookup",
                    "model_execution": "model execution", "serialization": "serialization",
                    "network_rtt_p99": "network RTT p99"}


@dataclass(frozen=True)
class Prices:
    """Egress $/GB per direction, from the report's links."""

    per_gb: Mapping[tuple[str, str], float]

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Prices:
        return cls({(d["from"], d["to"]): d["egress_usd_per_gb"]
                    for link in doc["links"] for d in link["directions"]})

    def per_hop(self, decision: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Egress of a decision's movements per hop (sender's price x the GB on that hop)."""
        hops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for m in decision.get("movements") or ():
            for leg in m["routes"]:
                gb = (m["size_gb"] or 0.0) * (leg["share"] or 0.0)
                for hop in zip(leg["path"], leg["path"][1:], strict=False):
                    hops[hop][0] += gb
                    hops[hop][1] += gb * self.per_gb.get(hop, 0.0)
        return [{"hop": f"{a} → {b}", "gb": gb, "usd_per_gb": self.per_gb.get((a, b), 0.0),
                 "usd": usd} for (a, b), (gb, usd) in hops.items()]


def analysis_page(topology: Topology, doc: Mapping[str, Any], *,
                  generator: str = "netplan analyze --html",
                  map_site_limit: int = MAP_SITE_LIMIT) -> str:
    """The whole page for report `doc` over `topology`."""
    prices = Prices.of(doc)
    tmap = topology_map(topology, doc, map_site_limit)
    figures: list[Figure] = [tmap.figure]
    timeline = timeline_figure(topology, doc["decisions"])
    cost = cost_figure(doc["decisions"], prices)
    figures += [f for f in (timeline, cost) if f is not None]
    indexes = [shard_charts(topology, r, i) for i, r in enumerate(doc["shard_replication"])]
    shown_indexes = indexes[:INDEX_CHARTS]
    figures += [f for ix in shown_indexes for f in ix["figures"]]
    sync = sync_figure(doc.get("sync_plan"))
    if sync is not None:
        figures.append(sync)
    budgets = sorted(doc["latency_budgets"], key=lambda b: b["headroom_ms"])
    budget_figs = [budget_figure(b, i) for i, b in enumerate(budgets[:BUDGET_CHARTS])]
    figures += budget_figs
    return render(
        "analysis.html.j2", title=f"netplan analyze: {doc['topology']}", figures=figures,
        generator=generator, doc=doc, topology=topology, tmap=tmap,
        tiles=summary_tiles(topology, doc), decisions=decision_rows(topology, doc, prices),
        timeline=timeline, cost=cost, totals=cost_totals(doc["decisions"]),
        indexes=indexes, shown_indexes=len(shown_indexes), sync=sync,
        budgets=budgets, budget_figs=budget_figs, sites=site_rows(topology, doc),
        links=link_rows(doc), transfer=_transfer_line(doc))


def _transfer_line(doc: Mapping[str, Any]) -> str:
    t, p = doc["transfer"], doc["paths"]
    return (f"TCP model: {t['streams']:g} streams x {t['window_bytes'] / 2**20:g} MiB window, "
            f"MSS {t['mss_bytes']:g} B; bulk paths through up to {p['max_relays']:g} relays, "
            f"multipath {'on' if p['multipath'] else 'off'}")


def summary_tiles(topology: Topology, doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(value, caption, css class) for the tiles at the top."""
    decisions = doc["decisions"]
    feasible = sum(d["feasible"] for d in decisions)
    total = sum((d["cost"] or {}).get("total_usd") or 0.0 for d in decisions if d["feasible"])
    tiles = [(f"{len(topology.sites):,}", "sites", ""),
             (f"{len(doc['links']):,}", "links", ""),
             (f"{feasible:,} / {len(decisions):,}", "workloads feasible",
              "ok" if feasible == len(decisions) else "bad"),
             (money(total), "cost of the feasible decisions", "")]
    if doc.get("sync_plan"):
        tiles.append((money(doc["sync_plan"]["cost_per_day"]["total_usd"]),
                      "sync plan per day", ""))
    if doc["shard_replication"]:
        placed = sum(r["feasible"] for r in doc["shard_replication"])
        tiles.append((f"{placed} / {len(doc['shard_replication'])}", "vector indexes placed",
                      "ok" if placed == len(doc["shard_replication"]) else "bad"))
    tiles.append((f"{len(doc['problems']):,}", "problems", "bad" if doc["problems"] else "ok"))
    return tiles


# ---- decisions

def _closest(decision: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """What a timeline shows for a decision: itself, or for an infeasible one the priced
    option that finishes first (how far it misses is the point)."""
    if decision["feasible"]:
        return decision
    priced = [a for a in decision["alternatives"] if a.get("completion_hours") is not None]
    return min(priced, key=lambda a: a["completion_hours"]) if priced else None


def _where(option: Mapping[str, Any]) -> str:
    sites = option.get("sites")
    return ", ".join(sites) if sites is not None else (option.get("site") or "-")


def timeline_figure(topology: Topology, decisions: Sequence[Mapping[str, Any]]
                    ) -> Figure | None:
    """Transfer then compute per workload (inference serves, so it is left out), with the
    deadline as a tick: red when missed, hatched when no option meets the constraints."""
    deadlines = {w.id: w.deadline_hours for w in topology.workloads}
    rows = []
    for d in decisions:
        if d["kind"] == "inference":
            continue
        opt = _closest(d)
        label = f"{d['workload']} ({d['action'] if d['feasible'] else 'infeasible'})"
        rows.append((d, opt, label, deadlines.get(d["workload"])))
    if not rows:
        return None
    labels = [r[2] for r in rows]
    transfer = [(o["transfer_seconds"] or 0.0) / 3600 if o else 0.0 for _, o, _, _ in rows]
    compute = [(o["compute_hours"] or 0.0) if o else 0.0 for _, o, _, _ in rows]
    missed = [dl is not None and o is not None and o["completion_hours"] > dl
              for _, o, _, dl in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(
        y=labels, x=transfer, base=0, orientation="h", name="transfer", marker_color="#4c72b0",
        hovertext=[_transfer_hover(d, o) for d, o, _, _ in rows], hoverinfo="text"))
    fig.add_trace(go.Bar(
        y=labels, x=compute, base=transfer, orientation="h", name="compute",
        marker={"color": [BAD if m or not d["feasible"] else GOOD
                          for m, (d, *_) in zip(missed, rows, strict=True)],
                "pattern": {"shape": ["/" if not d["feasible"] else "" for d, *_ in rows]}},
        hovertext=[_compute_hover(d, o) for d, o, _, _ in rows], hoverinfo="text"))
    with_deadline = [((d, o, label, dl), t + c) for (d, o, label, dl), t, c
                     in zip(rows, transfer, compute, strict=True) if dl is not None]
    fig.add_trace(go.Scatter(
        y=[r[2] for r, _ in with_deadline], x=[r[3] for r, _ in with_deadline],
        mode="markers", name="deadline",
        marker={"symbol": "line-ns-open", "size": 22, "line": {"width": 3},
                "color": [BAD if done > r[3] or not r[0]["feasible"] else "#24292f"
                          for r, done in with_deadline]},
        hovertext=[f"{r[0]['workload']}: deadline {hours(r[3])}, "
                   + (f"done in {hours(done)}" if r[1] else "no option could be priced")
                   for r, done in with_deadline], hoverinfo="text"))
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(showgrid=True, gridcolor="#eaeef2", rangemode="tozero")
    return figure(fig, "timeline", "When each workload finishes: transfer, then compute, "
                  "against its deadline (hours from the start)", 90 + 28 * len(rows))


def _transfer_hover(d: Mapping[str, Any], o: Mapping[str, Any] | None) -> str:
    if o is None:
        return f"{d['workload']}: infeasible, no option could be priced"
    lines = [f"<b>{d['workload']}</b>: transfer {hours((o['transfer_seconds'] or 0) / 3600)}"
             + ("" if d["feasible"] else f" (closest option: {o['action']} at {_where(o)})")]
    lines += [f"{m['kind']} {m['id']}: {m['size_gb']:,.0f} GB via {arrow(m['path'])}, "
              f"{hours(m['seconds'] / 3600)}" for m in o["movements"]]
    return "<br>".join(lines)


def _compute_hover(d: Mapping[str, Any], o: Mapping[str, Any] | None) -> str:
    if o is None:
        return d["reason"]
    line = (f"<b>{d['workload']}</b>: compute {hours(o['compute_hours'])} on {o['gpus']} GPUs "
            f"at {_where(o)}; done in {hours(o['completion_hours'])}")
    if not d["feasible"]:
        line += f"<br>infeasible: {o.get('rejected_because') or d['reason']}"
    return line


def cost_figure(decisions: Sequence[Mapping[str, Any]], prices: Prices) -> Figure | None:
    """Stacked cost of each feasible decision and of all of them, egress per hop in hover."""
    rows = [d for d in decisions if d["feasible"] and d.get("cost")]
    if not rows:
        return None
    labels = ["all workloads", *(d["workload"] for d in rows)]
    totals = cost_totals(decisions)
    fig = go.Figure()
    for key, name, colour in _COST_PARTS:
        values = [totals[key], *((d["cost"][key] or 0.0) for d in rows)]
        hover = [f"all workloads: {name} {money(values[0])}"]
        for d, v in zip(rows, values[1:], strict=True):
            line = f"<b>{d['workload']}</b>: {name} {money(v)}"
            if key == "egress_usd":
                line += "".join(f"<br>{h['hop']}: {h['gb']:,.0f} GB x ${h['usd_per_gb']:g} = "
                                f"{money(h['usd'])}" for h in prices.per_hop(d))
            elif key == "compute_usd":
                line += f" ({d['gpus']} GPUs x {hours(d['compute_hours'])})"
            hover.append(line)
        fig.add_trace(go.Bar(y=labels, x=values, orientation="h", name=name,
                             marker_color=colour, hovertext=hover, hoverinfo="text"))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(showgrid=True, gridcolor="#eaeef2")
    return figure(fig, "cost", "Cost of each decision: compute + egress + storage + relays "
                  "(USD; egress per hop in the hover)", 90 + 28 * len(labels))


def cost_totals(decisions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out = {key: 0.0 for key, _, _ in _COST_PARTS} | {"total_usd": 0.0}
    for d in decisions:
        if d["feasible"] and d.get("cost"):
            for key in out:
                out[key] += d["cost"][key] or 0.0
    return out


def decision_rows(topology: Topology, doc: Mapping[str, Any],
                  prices: Prices) -> list[dict[str, Any]]:
    """What the decisions table and each workload's details show."""
    deadlines = {w.id: w.deadline_hours for w in topology.workloads}
    return [{"d": d, "where": _where(d), "deadline": deadlines.get(d["workload"]),
             "hops": prices.per_hop(d)} for d in doc["decisions"]]


# ---- vector indexes, sync, budgets

def shard_charts(topology: Topology, r: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The shards x sites matrix (primary, replica) and each querying site's p99 vs budget."""
    index = next((ix for ix in topology.vector_indexes if ix.id == r["index"]), None)
    primary = index.site if index else None
    budget = index.latency_budget_ms if index else None
    queries = dict(index.queries) if index else {}
    held: set[str] = {s for sh in r["shards"] for s in sh["sites"]}
    holders = sorted(held | ({primary} if primary is not None else set()))
    columns = holders + sorted(set(queries) - set(holders))
    figures: list[Figure] = []
    if r["shards"]:
        z = [[2 if s == primary else 1 if s in sh["sites"] else 0 for s in columns]
             for sh in r["shards"]]
        text = [[("primary" if v == 2 else "replica" if v == 1 else "none") for v in row]
                for row in z]
        heat = go.Figure(go.Heatmap(
            z=z, x=[c + (" (queries)" if c in queries else "") for c in columns],
            y=[f"shard {sh['shard']}" for sh in r["shards"]], text=text,
            zmin=0, zmax=2, showscale=False, xgap=2, ygap=2,
            colorscale=[[0, "#f6f8fa"], [0.33, "#f6f8fa"], [0.34, "#9ecae1"],
                        [0.66, "#9ecae1"], [0.67, "#08519c"], [1, "#08519c"]],
            hovertemplate="%{y} at %{x}: %{text}<extra></extra>"))
        heat.update_yaxes(autorange="reversed")
        figures.append(figure(heat, f"shards-{i}", f"{r['index']}: shard replicas (dark: "
                              "primary, light: replica)", 80 + 20 * len(r["shards"])))
    if r["p99_ms"]:
        sites = list(r["p99_ms"])
        p99 = [r["p99_ms"][s] for s in sites]
        bars = go.Figure(go.Bar(
            x=sites, y=p99, marker_color=[GOOD if r["headroom_ms"][s] >= 0 else BAD
                                          for s in sites],
            hovertext=[f"{s}: p99 {r['p99_ms'][s]:.1f} ms, headroom "
                       f"{r['headroom_ms'][s]:.1f} ms" for s in sites], hoverinfo="text"))
        if budget is not None:
            bars.add_hline(y=budget, line={"color": BAD, "dash": "dash"},
                           annotation_text=f"budget {budget:g} ms",
                           annotation_position="top left")  # (the tool bar is on the right)
        figures.append(figure(bars, f"p99-{i}", f"{r['index']}: each querying site's p99 "
                              "against the budget (ms)", 300))
    return {"r": r, "figures": figures, "primary": primary, "budget": budget}


def sync_figure(plan: Mapping[str, Any] | None) -> Figure | None:
    """Per link direction: the window's load against its capacity, shortfalls in red."""
    if not plan or not plan["links"]:
        return None
    links = plan["links"]
    labels = [arrow(link["between"]) for link in links]
    hover = [f"<b>{arrow(link['between'])}</b><br>sync {link['sync_gb_per_day']:,.1f} GB/day, "
             f"checkpoints {link['checkpoint_gb_per_day']:,.1f} GB/day<br>"
             f"load in the window {link['window_load_gb']:,.0f} GB of "
             f"{link['window_capacity_gb']:,.0f} GB ({gbps(link['effective_gbps'])} effective "
             f"x {plan['window_hours']:g} h x {plan['bulk_share']:.0%})"
             + (f"<br><b>short by {link['shortfall_gb']:,.0f} GB</b>" if link["flagged"]
                else "") for link in links]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=labels, x=[link["window_capacity_gb"] for link in links],
                         orientation="h", name="capacity in the window", marker_color="#d0d7de",
                         hovertext=hover, hoverinfo="text"))
    fig.add_trace(go.Bar(y=labels, x=[link["window_load_gb"] for link in links],
                         orientation="h", name="load (red: does not fit)", width=0.5,
                         marker_color=[BAD if link["flagged"] else "#4c72b0" for link in links],
                         hovertext=hover, hoverinfo="text"))
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(showgrid=True, gridcolor="#eaeef2")
    return figure(fig, "sync", f"Each link's load in the {plan['window_hours']:g} h window "
                  f"against what it carries at {plan['bulk_share']:.0%} bulk share (GB)",
                  90 + 30 * len(links))


def budget_figure(b: Mapping[str, Any], i: int) -> Figure:
    """One request's p99 as a waterfall of its components against the budget."""
    parts = list(b["components_ms"].items())
    fig = go.Figure(go.Waterfall(
        x=[_COMPONENT_LABEL.get(k, k) for k, _ in parts] + ["total"],
        y=[v for _, v in parts] + [b["total_ms"]],
        measure=["relative"] * len(parts) + ["total"],
        increasing={"marker": {"color": "#4c72b0"}},
        totals={"marker": {"color": GOOD if b["fits"] else BAD}},
        connector={"line": {"color": MUTED, "width": 1}},
        hovertemplate="%{x}: %{y:.1f} ms<extra></extra>"))
    fig.add_hline(y=b["budget_ms"], line={"color": BAD, "dash": "dash"},
                  annotation_text=f"budget {b['budget_ms']:g} ms",
                  annotation_position="top left")
    fig.update_layout(yaxis_title="ms (p99)", showlegend=False)
    return figure(fig, f"budget-{i}", f"{b['workload']}: {b['client']} → {b['serving_site']}, "
                  f"{b['total_ms']:.1f} of {b['budget_ms']:g} ms", 300)


# ---- tables

def site_rows(topology: Topology, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    runs: dict[str, list[str]] = defaultdict(list)
    for d in doc["decisions"]:
        for site in (d.get("sites") or ([d["site"]] if d.get("site") else [])):
            runs[site].append(d["workload"])
    relays: dict[str, set[str]] = defaultdict(set)
    for m in moves_of(doc["decisions"]):
        for site in m.path[1:-1]:
            relays[site].add(m.owner)
    return [{"s": s, "gpus": ", ".join(f"{n} {g}" for g, n in s.gpus.items()),
             "runs": ", ".join(runs.get(s.id, ())), "relays": ", ".join(sorted(relays[s.id]))}
            for s in topology.sites]


def link_rows(doc: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Each link direction with its numbers; past `_LINK_ROWS`, those on chosen paths."""
    rows = [{"link": link, "d": d} for link in doc["links"] for d in link["directions"]]
    if len(rows) <= _LINK_ROWS:
        return rows, ""
    used = {hop for m in moves_of(doc["decisions"])
            for hop in zip(m.path, m.path[1:], strict=False)}
    chosen = sorted((r for r in rows if (r["d"]["from"], r["d"]["to"]) in used),
                    key=lambda r: r["d"]["effective_gbps"] or 0.0)[:_LINK_ROWS]
    return chosen, (f"the {len(chosen)} slowest of the {len(used):,} directions on chosen "
                    f"paths ({len(rows):,} directions in all: --json has every one)")
