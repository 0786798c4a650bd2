"""`python -m benchmarks report --html`: the results files (results/<scenario>.<cc>.json) as one
self-contained page, on netplan's report shell (netplan.html.page: Jinja2, plotly.js inlined).

Per scenario, both congestion controls side by side: each tool's median goodput (the range of
its repetitions as error bars) against the link's rate and, where the scenario measured them,
the disk's ceilings; transferd as a multiple of each peer; message latency CDFs against the bare
TCP echo floor (the idle echo RTT samples as a CDF, the echo under the same load as its
p50/p99); and, where the daemons' logs were kept (`NB_KEEP_LOGS=DIR`, then `--logs DIR`), the
stream controller's decisions over time. At the top: every scenario in one table and the data
plane's goals. Numbers are the results files' (medians via benchmarks.report.medians).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from benchmarks.goals import PEERS, evaluate
from benchmarks.report import CEILING, medians
from netplan.html.page import BAD, MUTED, Figure, figure, render

__all__ = ["StreamChange", "benchmarks_page", "load_stream_logs"]

TEMPLATES = Path(__file__).resolve().parent
_CC_COLOUR = {"cubic": "#4c72b0", "bbr": "#dd8452"}
_OTHER_CC = "#8172b3"
_DISKS = ("disk-direct", "disk-buffered")


@dataclass(frozen=True)
class StreamChange:
    """One `streams.change` line of a daemon's log: when (seconds since the log's first line),
    which run, site, peer and traffic class, from how many streams to how many, and why."""

    run: str
    site: str
    peer: str
    traffic_class: str
    at_s: float
    from_streams: int
    to_streams: int
    goodput_mbps: float
    reason: str

    @property
    def series(self) -> str:
        return f"run {self.run}: {self.site} → {self.peer} ({self.traffic_class})"


def load_stream_logs(root: Path) -> list[StreamChange]:
    """Every stream-controller decision in the daemons' logs under `root` (as NB_KEEP_LOGS
    leaves them: `<root>/<run id>/transferd-<SITE>.log`, JSON lines). Lines that are not JSON
    are skipped: a log holds whatever a crashing process printed too."""
    out: list[StreamChange] = []
    for path in sorted(root.glob("**/transferd-*.log")):
        t0: float | None = None
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or not isinstance(event.get("ts"), int | float):
                continue
            t0 = event["ts"] if t0 is None else min(t0, event["ts"])
            if event.get("event") != "streams.change":
                continue
            out.append(StreamChange(
                run=path.parent.name, site=path.stem.removeprefix("transferd-"),
                peer=str(event.get("peer")), traffic_class=str(event.get("class")),
                at_s=event["ts"] - t0, from_streams=int(event["from"]),
                to_streams=int(event["to"]), goodput_mbps=float(event["goodput_mbps"]),
                reason=str(event.get("reason", ""))))
    return out


def _label(row: Mapping[str, Any]) -> str:
    return row["tool"] + (f" ({row['data']})" if row["data"] else "")


def _cc(doc: Mapping[str, Any]) -> str:
    return str(doc.get("congestion_control") or "default")


def _colour(cc: str) -> str:
    return _CC_COLOUR.get(cc, _OTHER_CC)


def _runs_of(doc: Mapping[str, Any], tool: str, data: str | None) -> list[float]:
    return [r["goodput_mbit"] for r in doc["runs"]
            if r["tool"] == tool and r.get("data") == data and r["ok"]
            and r.get("goodput_mbit") is not None]


def goodput_figure(name: str, docs: Sequence[Mapping[str, Any]], i: int) -> Figure | None:
    """Each tool's median goodput per congestion control (bars side by side; error bars span
    the repetitions), the link rate and the disk ceilings as lines."""
    fig = go.Figure()
    order: list[str] = []
    for doc in docs:
        rows = [r for r in medians(dict(doc)) if r["goodput_mbit"] is not None]
        for r in rows:
            if _label(r) not in order:
                order.append(_label(r))
        runs = [_runs_of(doc, r["tool"], r["data"]) for r in rows]
        cc = _cc(doc)
        fig.add_trace(go.Bar(
            y=[_label(r) for r in rows], x=[r["goodput_mbit"] for r in rows], orientation="h",
            name=cc, marker_color=_colour(cc), meta="goodput",
            error_x={"type": "data", "symmetric": False, "thickness": 1, "width": 3,
                     "array": [max(v) - r["goodput_mbit"] if v else 0
                               for r, v in zip(rows, runs, strict=True)],
                     "arrayminus": [r["goodput_mbit"] - min(v) if v else 0
                                    for r, v in zip(rows, runs, strict=True)]},
            hovertext=[_goodput_hover(doc, r, v) for r, v in zip(rows, runs, strict=True)],
            hoverinfo="text"))
    if not order:
        return None
    # The ceilings, as vertical lines named in the legend with their value.
    ceilings: list[tuple[str, float, str]] = []
    link = docs[0]["link"] or {}
    if link.get("rate_mbit"):
        ceilings.append((f"link rate {link['rate_mbit']:,.0f} Mbit/s", link["rate_mbit"], BAD))
    for disk in _DISKS:
        for data in sorted({r["data"] for doc in docs for r in medians(dict(doc))
                            if r["tool"] == disk and r["goodput_mbit"]}):
            best = max(r["goodput_mbit"] for doc in docs for r in medians(dict(doc))
                       if r["tool"] == disk and r["data"] == data and r["goodput_mbit"])
            ceilings.append((f"{disk} ceiling ({data}) {best:,.0f} Mbit/s", best, MUTED))
    for k, (label, x, colour) in enumerate(ceilings):
        fig.add_trace(go.Scatter(
            x=[x, x], y=[order[0], order[-1]], mode="lines", name=label, meta="ceiling",
            line={"color": colour, "dash": ("dash", "dot", "dashdot")[k % 3], "width": 2},
            hovertemplate=f"{label}<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(autorange="reversed", automargin=True, categoryorder="array",
                     categoryarray=order)
    fig.update_xaxes(title_text="goodput, Mbit/s (median; bars: min-max of the runs)",
                     showgrid=True, gridcolor="#eaeef2", rangemode="tozero")
    return figure(fig, f"goodput-{i}", f"{name}: goodput per tool, each congestion control",
                  130 + 18 * len(order) * max(1, len(docs)), legend_below=True)


def _goodput_hover(doc: Mapping[str, Any], row: Mapping[str, Any], runs: list[float]) -> str:
    lines = [f"<b>{_label(row)}</b>, {_cc(doc)}: {row['goodput_mbit']:,.0f} Mbit/s median of "
             f"{row['n_ok']}/{row['n']} ok"]
    if runs:
        lines.append("runs: " + ", ".join(f"{v:,.0f}" for v in runs))
    if row["link_pct"] is not None:
        lines.append(f"{row['link_pct']:.0f} % of the link")
    if row["cpu_s"] is not None:
        lines.append(f"CPU {row['cpu_s']:.1f} s")
    if row["bytes_on_wire"] and row["bytes_logical"]:
        lines.append(f"wire/logical {row['bytes_on_wire'] / row['bytes_logical']:.2f}")
    if row["error"]:
        lines.append(f"error: {row['error'][:200]}")
    return "<br>".join(lines)


def multiples(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """transferd's median goodput over each other tool's, on the same data (or against the
    data-less iperf3 runs): one row per (data, peer)."""
    rows = medians(dict(doc))
    out = []
    for mine in rows:
        if mine["tool"] != "transferd" or not mine["goodput_mbit"]:
            continue
        for other in rows:
            if other["tool"].startswith("transferd") or not other["goodput_mbit"]:
                continue
            if other["data"] not in (mine["data"], None):
                continue
            out.append({"data": mine["data"], "peer": other["tool"],
                        "mine": mine["goodput_mbit"], "theirs": other["goodput_mbit"],
                        "x": mine["goodput_mbit"] / other["goodput_mbit"]})
    return out


def multiples_figure(name: str, docs: Sequence[Mapping[str, Any]], i: int) -> Figure | None:
    fig = go.Figure()
    peers: list[str] = []
    for doc in docs:
        found = multiples(doc)
        if not found:
            continue
        cc = _cc(doc)
        labels = [m["peer"] + (f" ({m['data']})" if len({x['data'] for x in found}) > 1
                               else "") for m in found]
        peers += [p for p in labels if p not in peers]
        fig.add_trace(go.Bar(
            x=labels, y=[m["x"] for m in found], name=cc, marker_color=_colour(cc),
            meta="multiples", text=[f"{m['x']:.2f}x" for m in found], textposition="outside",
            hovertext=[f"<b>{cc}</b>: transferd {m['mine']:,.0f} / {m['peer']} "
                       f"{m['theirs']:,.0f} Mbit/s = {m['x']:.2f}x" for m in found],
            hoverinfo="text"))
    if not peers:
        return None
    fig.add_hline(y=1, line={"color": MUTED, "dash": "dash"}, annotation_text="as fast",
                  annotation_position="top left")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="transferd ÷ peer (median goodput)", rangemode="tozero",
                     showgrid=True, gridcolor="#eaeef2")
    fig.update_xaxes(categoryorder="array", categoryarray=peers)
    return figure(fig, f"multiples-{i}", f"{name}: transferd as a multiple of each peer", 340,
                  legend_below=True)


def _cdf(samples: Iterable[float]) -> tuple[list[float], list[float]]:
    xs = sorted(samples)
    return xs, [(k + 1) / len(xs) for k in range(len(xs))]


def latency_figure(name: str, docs: Sequence[Mapping[str, Any]], i: int) -> Figure | None:
    """Message latency CDFs (every ok run's messages pooled) per tool and congestion control,
    against the bare TCP echo: its idle RTT samples as a CDF, its p99 under the same load as a
    line."""
    fig = go.Figure()
    drew = False
    for doc in docs:
        cc = _cc(doc)
        pooled: dict[str, list[float]] = defaultdict(list)
        loaded: dict[str, list[float]] = defaultdict(list)
        for r in doc["runs"]:
            if r["ok"] and r.get("latencies_ms"):
                pooled[r["tool"]] += r["latencies_ms"]
                echo = (r.get("messages") or {}).get("echo_p99_ms")
                if echo is not None:
                    loaded[r["tool"]].append(echo)
        for k, (tool, samples) in enumerate(pooled.items()):
            xs, ys = _cdf(samples)
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", line={"shape": "hv", "color": _colour(cc),
                                                "dash": ("solid", "dashdot", "longdash")[k % 3]},
                name=f"{tool} messages, {cc} (n={len(xs):,})", meta="messages",
                hovertemplate=f"{tool}, {cc}: %{{y:.1%}} of messages within %{{x:.1f}} ms"
                              "<extra></extra>"))
            drew = True
        if loaded:
            echo = statistics.median(v for p99s in loaded.values() for v in p99s)
            fig.add_trace(go.Scatter(
                x=[echo, echo], y=[0, 1], mode="lines", meta="echo-load",
                line={"color": _colour(cc), "dash": "dot", "width": 1.5},
                name=f"bare TCP echo p99 under the same load, {cc}: {echo:.1f} ms",
                hovertemplate=f"echo p99 under load, {cc}: {echo:.1f} ms<extra></extra>"))
    if not drew:
        return None
    for doc in docs:
        rtts = doc.get("rtt_samples_ms") or []
        if rtts:
            xs, ys = _cdf(rtts)
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", line={"shape": "hv", "color": MUTED, "width": 1},
                name=f"bare TCP echo RTT, idle link, {_cc(doc)} (n={len(xs)})", meta="echo",
                hovertemplate="idle echo: %{y:.0%} within %{x:.1f} ms<extra></extra>"))
    fig.update_xaxes(title_text="latency, ms", showgrid=True, gridcolor="#eaeef2",
                     rangemode="tozero")
    fig.update_yaxes(title_text="fraction ≤ x", range=[0, 1.02], showgrid=True,
                     gridcolor="#eaeef2")
    return figure(fig, f"latency-{i}", f"{name}: message latency CDFs against the bare TCP "
                  "echo", 520, legend_below=True)


def streams_figure(changes: Sequence[StreamChange]) -> Figure | None:
    """The stream controller's target over time, one step line per run, site, peer and class;
    each decision's reason in its hover."""
    if not changes:
        return None
    series: dict[str, list[StreamChange]] = defaultdict(list)
    for c in changes:
        series[c.series].append(c)
    fig = go.Figure()
    for label, steps in series.items():
        steps = sorted(steps, key=lambda c: c.at_s)
        fig.add_trace(go.Scatter(
            x=[0.0, *(c.at_s for c in steps)],
            y=[steps[0].from_streams, *(c.to_streams for c in steps)],
            mode="lines+markers", line={"shape": "hv"}, name=label, meta="streams",
            hovertext=["start"] + [f"{c.at_s:.1f} s: {c.from_streams} → {c.to_streams} "
                                   f"streams at {c.goodput_mbps:,.0f} Mbit/s<br>{c.reason}"
                                   for c in steps], hoverinfo="text"))
    fig.update_xaxes(title_text="seconds since the daemon's first log line", showgrid=True,
                     gridcolor="#eaeef2")
    fig.update_yaxes(title_text="parallel streams", rangemode="tozero", dtick=2)
    return figure(fig, "stream-decisions", "The stream controller's decisions over time", 360,
                  legend_below=True)


def summary_rows(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario, congestion control and data set: transferd, the best peer, iperf3."""
    out = []
    for doc in docs:
        rows = medians(dict(doc))
        for data in sorted({r["data"] for r in rows if r["data"]}):
            mine = next((r for r in rows if r["tool"] == "transferd" and r["data"] == data
                         and r["goodput_mbit"]), None)
            peers = [r for r in rows if r["tool"] in PEERS and r["data"] == data
                     and r["goodput_mbit"]]
            best = max(peers, key=lambda r: r["goodput_mbit"]) if peers else None
            iperf = next((r for r in rows if r["tool"] == CEILING and r["goodput_mbit"]), None)
            out.append({"scenario": doc["scenario"], "cc": _cc(doc), "data": data,
                        "quick": bool(doc.get("quick")), "mine": mine, "best": best,
                        "iperf": iperf, "link": (doc["link"] or {}).get("rate_mbit")})
    return out


def benchmarks_page(docs: Sequence[Mapping[str, Any]],
                    changes: Sequence[StreamChange] = (), *,
                    generator: str = "python -m benchmarks report --html",
                    logs: str | None = None) -> str:
    """The page for results `docs` (as benchmarks.report.load_results reads them) and the
    stream decisions found in kept logs."""
    by_scenario: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for doc in sorted(docs, key=lambda d: (d["scenario"], _cc(d))):
        by_scenario[doc["scenario"]].append(doc)
    figures: list[Figure] = []
    sections = []
    for i, (name, group) in enumerate(by_scenario.items()):
        charts = [f for f in (goodput_figure(name, group, i), multiples_figure(name, group, i),
                              latency_figure(name, group, i)) if f is not None]
        figures += charts
        sections.append({"name": name, "docs": group, "charts": charts,
                         "multiples": {_cc(d): multiples(d) for d in group}})
    streams = streams_figure(changes)
    if streams is not None:
        figures.append(streams)
    goals = evaluate([dict(d) for d in docs])
    return render(
        "html_report.html.j2", template_dirs=(TEMPLATES,), title="transferd benchmarks",
        figures=figures, generator=generator, sections=sections, summary=summary_rows(
            [d for s in sections for d in s["docs"]]), goals=goals,
        goals_met=sum(g.met is True for g in goals), streams=streams, changes=changes,
        logs=logs)
