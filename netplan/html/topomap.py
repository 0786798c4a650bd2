"""The topology map of a report: where the sites are, which links join them, what each link
really carries and what limits it, and the paths the decisions chose.

Sites stand in columns by region (in the topology's order) and rows by kind (cloud, on-prem,
edge). Each link is a line coloured by what limits its slower direction (capacity, the TCP
window, loss) and as thick as its faster direction is fast, with one hover mark at its middle
carrying both directions' numbers. Each workload's chosen paths are a translucent overlay with
arrows in the direction the bytes travel; sync and checkpoint routes are one more overlay, off
until picked in the legend; a site that relays on a chosen path is ringed.

Past `MAP_SITE_LIMIT` sites a picture of every site is a hairball, so the map shows regions:
one mark per region (sites by kind in its hover), one per pair of regions that links join, and
the chosen paths between regions; the page says so.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from netplan.html.page import Figure, figure, gbps, money
from netplan.topology import Site, Topology

__all__ = ["MAP_SITE_LIMIT", "Hazards", "Move", "TopologyMap", "moves_of", "topology_map"]

MAP_SITE_LIMIT = 150
# Beyond this many links the per-link labels ("25|10 G") would cover the map: hover only.
_LINK_LABEL_LIMIT = 40
# Beyond this many chosen hops, arrows are left out (the overlay still shows the paths).
_ARROW_LIMIT = 120

KIND_ROW = {"edge": 0, "onprem": 1, "cloud": 2}
KIND_LABEL = {"cloud": "cloud", "onprem": "on-prem", "edge": "edge"}
_SYMBOL = {"cloud": "circle", "onprem": "square", "edge": "triangle-up"}
_KIND_COLOUR = {"cloud": "#4c72b0", "onprem": "#55a868", "edge": "#8172b3"}
LIMIT_COLOUR = {"capacity": "#6e7781", "window": "#0969da", "loss": "#bc4c00"}
_RELAY_OUTLINE = "#bf3989"
_PATH_COLOURS = ("#e41a1c", "#ff7f00", "#984ea3", "#4daf4a", "#377eb8", "#a65628", "#f781bf",
                 "#999999", "#1b9e77", "#d95f02")


@dataclass(frozen=True)
class Move:
    """One leg of a chosen route: whose it is, the sites in travel order and what it carries."""

    owner: str
    path: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Hazards:
    """Sites and links to mark on the map (the what-if page's single points of failure), each
    with what its loss breaks; links keyed by their two ends."""

    sites: Mapping[str, str]
    links: Mapping[frozenset[str], str]

    @classmethod
    def of(cls, spofs: Iterable[Mapping[str, Any]]) -> Hazards:
        """From `netplan whatif --json`'s single_points_of_failure (`site:X`, `link:A,B`)."""
        sites: dict[str, str] = {}
        links: dict[frozenset[str], str] = {}
        for p in spofs:
            kind, _, name = p["element"].partition(":")
            breaks = "breaks " + ", ".join(p["breaks"])
            if kind == "site":
                sites[name] = breaks
            elif kind == "link":
                links[frozenset(name.split(","))] = breaks
        return cls(sites, links)


@dataclass(frozen=True)
class TopologyMap:
    figure: Figure
    aggregated: bool
    note: str
    site_marks: int  # sites, or regions when aggregated
    link_marks: int  # links, or region pairs when aggregated


@dataclass
class _Node:
    id: str
    kind: str
    x: float
    y: float
    hover: list[str]
    relay_for: list[str] = field(default_factory=list)
    size: float = 18.0


@dataclass
class _Edge:
    a: str
    b: str
    hover: list[str]
    label: str
    limited_by: str
    slow_gbps: float
    fast_gbps: float


def moves_of(decisions: Iterable[Mapping[str, Any]]) -> list[Move]:
    """Every leg of every chosen movement (a split transfer has one per path)."""
    out = []
    for d in decisions:
        for m in d.get("movements") or ():
            for leg in m["routes"]:
                gb = (m["size_gb"] or 0.0) * (leg["share"] or 0.0)
                share = f", {leg['share']:.0%} of it" if m["multipath"] else ""
                out.append(Move(d["workload"], tuple(leg["path"]),
                                f"{m['kind']} {m['id']} {gb:,.0f} GB{share}"))
    return out


def _sync_moves(sync_plan: Mapping[str, Any] | None) -> list[Move]:
    if not sync_plan:
        return []
    transfers = [*sync_plan["transfers"],
                 *(t for c in sync_plan["checkpoints"] for t in c["transfers"])]
    return [Move(f"{t['rule']}", tuple(r["path"]), f"{t['dataset']} {t['gb_per_day']:,.0f} "
                 "GB/day") for t in transfers for r in t["routes"]]


def topology_map(topology: Topology, doc: Mapping[str, Any],
                 limit: int = MAP_SITE_LIMIT, hazards: Hazards | None = None) -> TopologyMap:
    """The map of report `doc` (`Report.to_json()`) over `topology`, with `hazards` marked
    (on a per-site map; a region map counts them in its regions' hover)."""
    moves = moves_of(doc["decisions"])
    syncs = _sync_moves(doc.get("sync_plan"))
    if len(topology.sites) > limit:
        return _region_map(topology, doc, moves, syncs, limit, hazards)
    nodes = _site_nodes(topology, doc, moves)
    edges = [_site_edge(link, moves) for link in doc["links"]]
    fig = go.Figure()
    _draw_bands(fig, topology)
    _draw_links(fig, nodes, edges)
    _draw_paths(fig, nodes, moves, syncs)
    _draw_link_marks(fig, nodes, edges, labels=len(edges) <= _LINK_LABEL_LIMIT)
    _draw_nodes(fig, nodes, text=True)
    if hazards is not None:
        _draw_hazards(fig, nodes, edges, hazards)
    relays = sum(bool(n.relay_for) for n in nodes.values())
    note = (f"{len(nodes)} sites, {len(edges)} links. A link's colour says what limits its "
            "slower direction, its width how fast its faster direction is; hover a link's "
            "diamond for both directions. Chosen paths are drawn over the links with arrows "
            "the way the bytes go" + (f"; the {relays} site(s) relaying on them are ringed in "
                                      "magenta" if relays else "; none of them uses a relay")
            + ". Sync and checkpoint routes: pick them in the legend.")
    height = 620 if len(nodes) <= 40 else 820
    title = "Sites by region and kind; links by effective throughput and what limits it"
    return TopologyMap(figure(fig, "map", title, height, legend_below=True), False, note,
                       len(nodes), len(edges))


# ---- per-site map

def _site_hover(site: Site, topology: Topology) -> list[str]:
    lines = [f"<b>{site.id}</b> ({KIND_LABEL[site.kind]}, {site.region})"]
    if site.gpus:
        lines.append("GPUs: " + ", ".join(
            f"{n} {g} at {money(site.gpu_hour_usd.get(g))}/h" for g, n in site.gpus.items()))
    held = [d for d in topology.datasets if d.site == site.id]
    if held:
        lines.append("data: " + ", ".join(f"{d.id} ({d.size_gb:,.0f} GB {d.tier})"
                                          for d in held[:4])
                     + (f" and {len(held) - 4} more" if len(held) > 4 else ""))
    if not site.relay:
        lines.append("never relays (relay: false)")
    return lines


def _place(topology: Topology) -> dict[str, tuple[float, float]]:
    """Region columns (as wide as their busiest kind needs), kind rows, sites spread inside."""
    cells: dict[tuple[str, str], list[Site]] = defaultdict(list)
    for s in topology.sites:
        cells[(s.region, s.kind)].append(s)
    where: dict[str, tuple[float, float]] = {}
    x0 = 0.0
    for k, (region, width) in enumerate(_region_widths(topology).items()):
        # Neighbouring regions sit a little higher and lower, so a link across a row does not
        # run through the sites between its ends.
        lift = 0.12 if k % 2 == 0 else -0.12
        for kind, row in KIND_ROW.items():
            sites = cells.get((region, kind), [])
            cols = max(1, min(len(sites), round(2 * width)))
            rows = math.ceil(len(sites) / cols) if sites else 1
            for i, s in enumerate(sites):
                r, c = divmod(i, cols)
                # Alternate rows sit a little apart so labels do not land on each other.
                where[s.id] = (x0 + (c + 0.5 + 0.25 * (r % 2)) / cols * width * 0.92,
                               row + 0.25 + 0.5 * (r + 0.5) / rows + lift)
        x0 += width
    return where


def _region_widths(topology: Topology) -> dict[str, float]:
    counts: Counter[tuple[str, str]] = Counter((s.region, s.kind) for s in topology.sites)
    regions = list(dict.fromkeys(s.region for s in topology.sites))
    return {r: max(1.0, max(counts[(r, k)] for k in KIND_ROW) / 2) for r in regions}


def _site_nodes(topology: Topology, doc: Mapping[str, Any],
                moves: Sequence[Move]) -> dict[str, _Node]:
    where = _place(topology)
    nodes = {s.id: _Node(s.id, s.kind, *where[s.id], _site_hover(s, topology))
             for s in topology.sites}
    runs: dict[str, list[str]] = defaultdict(list)
    for d in doc["decisions"]:
        for site in (d.get("sites") or ([d["site"]] if d.get("site") else [])):
            runs[site].append(d["workload"])
    for site, workloads in runs.items():
        nodes[site].hover.append("runs: " + ", ".join(workloads))
    for m in moves:
        for relay in m.path[1:-1]:
            nodes[relay].relay_for.append(f"{m.owner} ({m.what})")
    return nodes


def _direction_line(d: Mapping[str, Any]) -> str:
    bounds = ", ".join(f"{name} {gbps(d[key])}" for name, key in
                       (("capacity", "capacity_gbps"), ("window", "window_gbps"),
                        ("loss bound", "loss_gbps")) if d[key] is not None)
    return (f"{d['from']} → {d['to']}: <b>{gbps(d['effective_gbps'])}</b> limited by "
            f"{d['limited_by']} ({bounds}); loss {d['loss_pct']:g} %, egress "
            f"${d['egress_usd_per_gb']:g}/GB")


def _short(x: float) -> str:
    return f"{x * 1000:.0f} M" if x < 1 else f"{x:.3g} G"


def _site_edge(link: Mapping[str, Any], moves: Sequence[Move]) -> _Edge:
    there, back = link["directions"]
    slow = min((there, back), key=lambda d: d["effective_gbps"] or 0.0)
    a, b = link["between"]
    hover = [f"<b>{a} ↔ {b}</b>: RTT {link['rtt_ms']:g} ms, jitter {link['jitter_ms']:g} ms",
             _direction_line(there), _direction_line(back)]
    carried = [f"{m.owner}: {m.what} ({m.path[i]} → {m.path[i + 1]})" for m in moves
               for i in range(len(m.path) - 1) if {m.path[i], m.path[i + 1]} == {a, b}]
    if carried:
        hover.append("chosen paths: " + "; ".join(carried[:6])
                     + (f" and {len(carried) - 6} more" if len(carried) > 6 else ""))
    rates = (there["effective_gbps"] or 0.0, back["effective_gbps"] or 0.0)
    label = (_short(rates[0]) if math.isclose(*rates, rel_tol=0.005)
             else f"{_short(rates[0])}|{_short(rates[1])}")
    return _Edge(a, b, hover, label, slow["limited_by"], min(rates), max(rates))


def _draw_bands(fig: go.Figure, topology: Topology) -> None:
    """Region columns as shaded bands with their name on top; kind rows as the y axis."""
    x0 = 0.0
    for i, (region, width) in enumerate(_region_widths(topology).items()):
        fig.add_shape(type="rect", x0=x0 + 0.02, x1=x0 + width - 0.02, y0=-0.05, y1=3.05,
                      line={"width": 0}, fillcolor="#f6f8fa" if i % 2 == 0 else "#eef1f4",
                      layer="below")
        fig.add_annotation(x=x0 + width / 2, y=3.12, text=f"<b>{region}</b>", showarrow=False)
        x0 += width
    for y in (1, 2):
        fig.add_shape(type="line", x0=0, x1=x0, y0=y, y1=y, layer="below",
                      line={"color": "#d1d9e0", "width": 1, "dash": "dot"})
    fig.update_xaxes(visible=False, range=[-0.05, x0 + 0.05])
    fig.update_yaxes(range=[-0.1, 3.25], showgrid=False, zeroline=False,
                     tickvals=[row + 0.5 for row in KIND_ROW.values()],
                     ticktext=[KIND_LABEL[k] for k in KIND_ROW])


def _width(fast_gbps: float) -> float:
    return 1.5 if fast_gbps < 1.5 else 3.0 if fast_gbps < 15 else 5.0


def _segments(pairs: Iterable[tuple[tuple[float, float], tuple[float, float]]]
              ) -> tuple[list[float | None], list[float | None]]:
    xs: list[float | None] = []
    ys: list[float | None] = []
    for (ax, ay), (bx, by) in pairs:
        xs += [ax, bx, None]
        ys += [ay, by, None]
    return xs, ys


def _draw_links(fig: go.Figure, nodes: Mapping[str, _Node], edges: Sequence[_Edge]) -> None:
    groups: dict[tuple[str, float], list[_Edge]] = defaultdict(list)
    for e in edges:
        groups[(e.limited_by, _width(e.fast_gbps))].append(e)
    shown: set[str] = set()
    for (limit, width), group in sorted(groups.items()):
        xs, ys = _segments(((nodes[e.a].x, nodes[e.a].y), (nodes[e.b].x, nodes[e.b].y))
                           for e in group)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", hoverinfo="skip", legendgroup=limit,
            name=f"link limited by {limit}", showlegend=limit not in shown,
            line={"color": LIMIT_COLOUR[limit], "width": width}, opacity=0.8))
        shown.add(limit)


def _draw_link_marks(fig: go.Figure, nodes: Mapping[str, _Node], edges: Sequence[_Edge],
                     labels: bool) -> None:
    """One hover mark per link, near its middle, coloured like the line. The marks sit at
    staggered points along their lines: two links crossing at their middles would otherwise
    hide one mark under the other."""
    where = [0.5 + 0.16 * ((i * 0.618) % 1 - 0.5) for i in range(len(edges))]
    fig.add_trace(go.Scatter(
        x=[nodes[e.a].x + t * (nodes[e.b].x - nodes[e.a].x) for e, t in zip(edges, where,
                                                                             strict=True)],
        y=[nodes[e.a].y + t * (nodes[e.b].y - nodes[e.a].y) for e, t in zip(edges, where,
                                                                             strict=True)],
        mode="markers+text" if labels else "markers", meta="links", name="link (hover)",
        text=[e.label for e in edges] if labels else None, textposition="middle right",
        textfont={"size": 10, "color": "#424a53"},
        hovertext=["<br>".join(e.hover) for e in edges], hoverinfo="text",
        marker={"symbol": "diamond", "size": 9, "line": {"width": 1, "color": "white"},
                "color": [LIMIT_COLOUR[e.limited_by] for e in edges]}))


def _offset(a: _Node, b: _Node, k: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The segment a-b moved sideways by k (so two workloads on one link stay apart)."""
    dx, dy = b.x - a.x, b.y - a.y
    norm = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / norm * k, dx / norm * k
    return (a.x + ox, a.y + oy), (b.x + ox, b.y + oy)


def _hops(path: Sequence[str]) -> Iterator[tuple[str, str]]:
    return zip(path, path[1:], strict=False)


def _draw_paths(fig: go.Figure, nodes: Mapping[str, _Node], moves: Sequence[Move],
                syncs: Sequence[Move]) -> None:
    owners = list(dict.fromkeys(m.owner for m in moves))
    arrows = sum(len(m.path) - 1 for m in moves) <= _ARROW_LIMIT
    for k, owner in enumerate(owners):
        colour = _PATH_COLOURS[k % len(_PATH_COLOURS)]
        shift = 0.035 * (k - (len(owners) - 1) / 2)
        hops = list(dict.fromkeys(h for m in moves if m.owner == owner for h in _hops(m.path)))
        segs = [_offset(nodes[a], nodes[b], shift) for a, b in hops]
        xs, ys = _segments(segs)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", opacity=0.45,
                                 name=f"{owner}: chosen path", legendgroup=f"path-{owner}",
                                 line={"color": colour, "width": 7}))
        for (ax, ay), (bx, by) in segs if arrows else ():
            fig.add_annotation(x=ax + 0.62 * (bx - ax), y=ay + 0.62 * (by - ay),
                               ax=ax + 0.45 * (bx - ax), ay=ay + 0.45 * (by - ay),
                               axref="x", ayref="y", showarrow=True, arrowhead=2,
                               arrowsize=1.2, arrowwidth=2, arrowcolor=colour, text="")
    if syncs:
        hops = list(dict.fromkeys(h for m in syncs for h in _hops(m.path)))
        xs, ys = _segments(_offset(nodes[a], nodes[b], -0.05) for a, b in hops)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip",
                                 visible="legendonly", name="sync and checkpoint routes",
                                 line={"color": "#1b7c83", "width": 4, "dash": "dash"}))


def _draw_nodes(fig: go.Figure, nodes: Mapping[str, _Node], text: bool) -> None:
    by_kind: dict[str, list[_Node]] = defaultdict(list)
    for n in nodes.values():
        by_kind[n.kind].append(n)
    for kind, group in by_kind.items():
        fig.add_trace(go.Scatter(
            x=[n.x for n in group], y=[n.y for n in group], meta="sites",
            mode="markers+text" if text else "markers", text=[n.id for n in group],
            textposition="top center", textfont={"size": 11},
            name=KIND_LABEL.get(kind, kind) + (" site" if kind in KIND_LABEL else ""),
            hovertext=["<br>".join(n.hover) for n in group], hoverinfo="text",
            marker={"symbol": _SYMBOL.get(kind, "circle"),
                    "color": _KIND_COLOUR.get(kind, "#4c72b0"), "size": [n.size for n in group],
                    "line": {"width": 1, "color": "white"}}))
    relays = [n for n in nodes.values() if n.relay_for]
    if relays:  # a ring around each relay, on top of its site mark
        fig.add_trace(go.Scatter(
            x=[n.x for n in relays], y=[n.y for n in relays], mode="markers", meta="relays",
            name="relay on a chosen path",
            hovertext=[f"<b>{n.id}</b> relays for " + "; ".join(n.relay_for[:6])
                       + (f" and {len(n.relay_for) - 6} more" if len(n.relay_for) > 6 else "")
                       for n in relays], hoverinfo="text",
            marker={"symbol": "circle-open", "size": [n.size + 12 for n in relays],
                    "line": {"width": 3, "color": _RELAY_OUTLINE}, "color": _RELAY_OUTLINE}))


def _draw_hazards(fig: go.Figure, nodes: Mapping[str, _Node], edges: Sequence[_Edge],
                  hazards: Hazards) -> None:
    """A red square around each hazardous site, a red cross on each hazardous link (beside its
    hover mark), what its loss breaks in the hover."""
    sites = [nodes[s] for s in hazards.sites if s in nodes]
    if sites:
        fig.add_trace(go.Scatter(
            x=[n.x for n in sites], y=[n.y for n in sites], mode="markers",
            meta="hazard-sites", name="single point of failure (site)",
            hovertext=[f"<b>{n.id}</b>: its failure alone {hazards.sites[n.id]}"
                       for n in sites], hoverinfo="text",
            marker={"symbol": "square-open", "size": [n.size + 22 for n in sites],
                    "line": {"width": 3, "color": "#cf222e"}, "color": "#cf222e"}))
    links = [e for e in edges if frozenset((e.a, e.b)) in hazards.links]
    if links:
        fig.add_trace(go.Scatter(
            x=[nodes[e.a].x + 0.38 * (nodes[e.b].x - nodes[e.a].x) for e in links],
            y=[nodes[e.a].y + 0.38 * (nodes[e.b].y - nodes[e.a].y) for e in links],
            mode="markers", meta="hazard-links", name="single point of failure (link)",
            hovertext=[f"<b>{e.a} ↔ {e.b}</b>: its failure alone "
                       f"{hazards.links[frozenset((e.a, e.b))]}" for e in links],
            hoverinfo="text",
            marker={"symbol": "x", "size": 14, "color": "#cf222e",
                    "line": {"width": 1, "color": "white"}}))


# ---- per-region map (large estates)

def _region_map(topology: Topology, doc: Mapping[str, Any], moves: Sequence[Move],
                syncs: Sequence[Move], limit: int, hazards: Hazards | None) -> TopologyMap:
    region_of = {s.id: s.region for s in topology.sites}
    regions = list(dict.fromkeys(region_of.values()))
    kinds: dict[str, Counter[str]] = {
        r: Counter(s.kind for s in topology.sites if s.region == r) for r in regions}
    biggest = max(sum(c.values()) for c in kinds.values())
    nodes: dict[str, _Node] = {}
    for i, r in enumerate(regions):
        angle = 2 * math.pi * i / len(regions)
        n = sum(kinds[r].values())
        gpus = sum(sum(s.gpus.values()) for s in topology.sites if s.region == r)
        hover = [f"<b>{r}</b>: {n:,} sites (" + ", ".join(
            f"{kinds[r][k]:,} {KIND_LABEL[k]}" for k in KIND_ROW if kinds[r][k]) + ")",
            f"{gpus:,} GPUs"]
        nodes[r] = _Node(r, "region", math.cos(angle), math.sin(angle), hover,
                         size=10 + 26 * math.sqrt(n / biggest))
    pairs: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    inside: Counter[str] = Counter()
    for link in doc["links"]:
        a, b = (region_of[s] for s in link["between"])
        if a == b:
            inside[a] += 1
        else:
            pairs[(a, b) if regions.index(a) < regions.index(b) else (b, a)].append(link)
    for r, count in inside.items():
        nodes[r].hover.append(f"{count:,} links inside the region")
    if hazards is not None:
        weak = Counter(region_of[s] for s in hazards.sites if s in region_of)
        for r, count in weak.items():
            nodes[r].hover.append(f"{count:,} sites whose failure alone breaks a workload "
                                  "or an index")
    region_moves = [Move(m.owner, _region_path(m.path, region_of), m.what) for m in moves]
    for m, orig in zip(region_moves, moves, strict=True):
        for relay in orig.path[1:-1]:
            nodes[region_of[relay]].relay_for.append(f"{m.owner} via {relay}")
    carried = Counter(frozenset(h) for m in region_moves for h in _hops(m.path))
    edges = [_region_edge(a, b, links, carried[frozenset((a, b))], region_of)
             for (a, b), links in pairs.items()]
    fig = go.Figure()
    _draw_links(fig, nodes, edges)
    hops = list(dict.fromkeys(h for m in region_moves for h in _hops(m.path)))
    if hops:
        xs, ys = _segments((((nodes[a].x, nodes[a].y), (nodes[b].x, nodes[b].y))
                            for a, b in hops))
        # Green, thinner and lighter than a site map's paths: at this scale they cross most
        # region pairs, and the links' colours (what limits them) must show through.
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", opacity=0.35,
                                 name="chosen paths between regions",
                                 line={"color": "#1b9e77", "width": 4}))
    _draw_link_marks(fig, nodes, edges, labels=False)
    _draw_nodes(fig, nodes, text=True)
    fig.update_xaxes(visible=False, range=[-1.35, 1.35])
    fig.update_yaxes(visible=False, range=[-1.2, 1.2], scaleanchor="x")
    note = (f"This estate has {len(topology.sites):,} sites and {len(doc['links']):,} links, "
            f"more than the {limit} a readable map of every site allows, so the map is "
            f"aggregated by region: one mark per region ({len(regions)}; its size grows with "
            f"its site count) and one per pair of regions that links join ({len(edges):,}; "
            f"{sum(inside.values()):,} links inside a region are counted on the region). "
            "Hover a mark for the sites, link counts and summed throughput; the tables below "
            "name every workload.")
    title = "Regions (sites aggregated by region) and the links between them"
    return TopologyMap(figure(fig, "map", title, 760, legend_below=True), True, note,
                       len(nodes), len(edges))


def _region_path(path: Sequence[str], region_of: Mapping[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for site in path:
        if not out or out[-1] != region_of[site]:
            out.append(region_of[site])
    return tuple(out)


def _region_edge(a: str, b: str, links: Sequence[Mapping[str, Any]], moves: int,
                 region_of: Mapping[str, str]) -> _Edge:
    limits = Counter(min(link["directions"], key=lambda d: d["effective_gbps"] or 0.0)
                     ["limited_by"] for link in links)
    sums = {(a, b): 0.0, (b, a): 0.0}
    for link in links:
        for d in link["directions"]:
            sums[(region_of[d["from"]], region_of[d["to"]])] += d["effective_gbps"] or 0.0
    hover = [f"<b>{a} ↔ {b}</b>: {len(links):,} links",
             f"summed effective {a} → {b} {gbps(sums[(a, b)])}, {b} → {a} "
             f"{gbps(sums[(b, a)])}",
             "slower direction limited by " + ", ".join(f"{k} {n}" for k, n in
                                                       limits.most_common())]
    if moves:
        hover.append(f"{moves} chosen path hop(s) between these regions")
    # The line's width: the faster direction's average per link (the sums are in the hover).
    slow, fast = sorted(sums.values())
    return _Edge(a, b, hover, "", limits.most_common(1)[0][0], slow, fast / len(links))
