"""The `netplan` command line: `analyze` (rich tables, --json or --html), `plan`, `whatif`
(tables, --json or --html) and `schema`.

The only place (with the loader) that does I/O; it turns NetplanError into text on stderr and an
exit code (2: the topology or the arguments are wrong; 1: --strict and a workload, vector index or
sync rule is infeasible, or `plan` refusing to write a plan with infeasible entries).
The report is rendered section by section (`SECTIONS`): a new section is one more renderer.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from netplan._plan_build import build_plan
from netplan._sections import PathPolicy
from netplan._shards import ShardPlacement
from netplan.calibrate import (
    MIN_SAMPLES,
    Applied,
    MeasuredOverlay,
    apply_measured,
    decision_changes,
    overlay_of,
    parse_overlay,
)
from netplan.decisions import Option, duration, money
from netplan.errors import Infeasible, InfeasiblePlan, NetplanError, TopologyError
from netplan.loader import load_topology
from netplan.network import LinkThroughput
from netplan.report import Report, analyze
from netplan.safeyaml import DocumentError, read_text_bounded
from netplan.telemetry import LinkMeasurement
from netplan.topology import Topology, TransferSettings
from netplan.yamlpos import FieldIssue
from netplan.yamlpos import parse as parse_yaml

__all__ = ["SECTIONS", "main"]

# Beyond this many link directions the terminal report shows only those on chosen paths (--json
# has all).
_LINK_TABLE_LIMIT = 60
_ALTERNATIVES_SHOWN = 5
# Beyond this many decisions, losing options are shown one per workload and per-transfer path
# comparisons are left to --json.
_DETAILED_DECISIONS = 20
# whatif: scenarios to evaluate x sites below which worker processes are not worth starting (a
# worker spends 1-2 s importing and building its baseline; a scenario on a 1,000-site estate
# takes about 50 ms).
_PROCESSES_PAY_OFF = 50_000


class _Grid:
    """Rows for a rich table that fits the terminal: cells wrap at spaces (and fold a word only
    when it is wider than any column could be) instead of being cut to an ellipsis, with the
    narrow borders that fit 80 columns. Numbers (`right`) keep their width; each text column
    asks for its longest word, shrunk evenly until the row fits."""

    def __init__(self, title: str, *columns: str, right: tuple[str, ...] = ()) -> None:
        self.title = title
        self.columns = columns
        self.right = right
        self.rows: list[tuple[str | Text, ...]] = []

    def add_row(self, *cells: str | Text) -> None:
        self.rows.append(cells)

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def _longest(self, j: int, whole: bool) -> int:
        texts = [self.columns[j], *(c.plain if isinstance(c, Text) else c
                                   for c in (row[j] for row in self.rows))]
        if whole:
            return max(len(t) for t in texts)
        return max((len(w) for t in texts for w in t.split()), default=1)

    def _header_word(self, j: int) -> int:
        return max(len(w) for w in self.columns[j].split())

    def _cell(self, j: int) -> int:
        return max((len(c.plain if isinstance(c, Text) else c) for c in
                    (row[j] for row in self.rows)), default=0)

    def table(self, width: int) -> Table | None:
        """The table laid out for `width` columns, or None when even folded it cannot fit (then
        `print` shows each row as a list of fields)."""
        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD,
                      padding=(0, 1), pad_edge=False, expand=False)
        n = len(self.columns)
        numbers = {j: max(self._cell(j), self._header_word(j))
                   for j, c in enumerate(self.columns) if c in self.right}
        sizes = {j: self._longest(j, True) for j in range(n) if j not in numbers}
        words = {j: self._longest(j, False) for j in sizes}
        # Borders, separators and padding: an edge each side, a space between columns and one
        # padding space each side of every inner cell edge.
        room = width - (3 * n - 1) - sum(numbers.values())
        if room < sum(min(w, 8) for w in words.values()):
            return None
        while sizes and sum(sizes.values()) > room:
            # Narrow the widest column that can still wrap at spaces; fold words only when
            # every column is down to its longest word.
            spare = [j for j in sizes if sizes[j] > words[j]]
            j = max(spare or list(sizes), key=lambda k: sizes[k])
            sizes[j] -= 1
        for j, col in enumerate(self.columns):
            if j in numbers:
                table.add_column(col, justify="right", overflow="fold", width=numbers[j])
            else:
                table.add_column(col, overflow="fold", width=sizes[j])
        for row in self.rows:
            table.add_row(*row)
        return table

    def records(self) -> Table:
        """Each row as a block of `field value` lines: what a terminal too narrow for the
        columns gets."""
        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD,
                      padding=(0, 1), pad_edge=False, show_header=False)
        table.add_column("field", style="dim", no_wrap=True)
        table.add_column("value", overflow="fold")
        for i, row in enumerate(self.rows):
            if i:
                table.add_row("", "")
            for col, cell in zip(self.columns, row, strict=True):
                table.add_row(col, cell)
        return table

    def print(self, console: Console) -> None:
        table = self.table(console.width)
        console.print(table if table is not None else self.records())


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> _Grid:
    return _Grid(title, *columns, right=right)


def _gbps(x: float) -> str:
    """Three significant digits (12.3, 0.25), Mbit/s below 0.1 Gbit/s (12.3 M)."""
    if x == float("inf"):
        return "-"
    if x < 0.1:
        return f"{x * 1000:.3g} M"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _render_header(report: Report, console: Console, show_all_links: bool) -> None:
    s = report.settings
    p = report.paths
    console.print(
        f"[bold]netplan analyze[/bold]: {report.topology}  "
        f"(TCP model: {s.streams} streams x {s.window_bytes / 1024 / 1024:g} MiB window, "
        f"MSS {s.mss_bytes} B, Mathis C {s.mathis_constant:.3f}; bulk paths through up to "
        f"{p.max_relays} relays, multipath {'on' if p.multipath else 'off'})"
    )


def _used_directions(report: Report) -> set[tuple[str, str]]:
    used: set[tuple[str, str]] = set()
    for decision in report.decisions:
        if decision.option:
            for m in decision.option.movements:
                for leg in m.route.legs:
                    sites = leg.path.sites
                    used.update(zip(sites, sites[1:], strict=False))
    return used


def _same(a: LinkThroughput, b: LinkThroughput) -> bool:
    return (a.capacity_gbps, a.loss_pct, a.egress_usd_per_gb) == (
        b.capacity_gbps, b.loss_pct, b.egress_usd_per_gb)


def _render_links(report: Report, console: Console, show_all_links: bool) -> None:
    # One row per link when both directions are alike, else one per direction.
    rows: list[tuple[str, LinkThroughput]] = []
    for there, back in zip(report.links[::2], report.links[1::2], strict=True):
        if _same(there, back):
            rows.append((f"{there.sender} <-> {there.receiver}", there))
        else:
            rows += [(f"{there.sender} -> {there.receiver}", there),
                     (f"{back.sender} -> {back.receiver}", back)]
    title = "Links: effective bulk throughput per direction (Gbit/s; M = Mbit/s)"
    if len(rows) > _LINK_TABLE_LIMIT and not show_all_links:
        # A large estate: the directions the decisions use, slowest first, up to the limit.
        used = _used_directions(report)
        on_paths = sorted((tp for tp in report.links if tp.between in used),
                          key=lambda tp: tp.effective_gbps)
        rows = [(f"{tp.sender} -> {tp.receiver}", tp) for tp in on_paths[:_LINK_TABLE_LIMIT]]
        title += (
            f" - the {len(rows)} slowest of {len(on_paths)} directions on chosen paths "
            f"({len(report.links)} in all: --all-links or --json)"
        )
    numbers = ("cap", "rtt ms", "loss %", "window", "Mathis", "eff", "$/GB")
    title += ("\ncap = capacity, window = N x window / RTT, Mathis = loss bound, eff = effective, "
              "$/GB = egress leaving the sender")
    table = _table(title, "link", *numbers, "limited by", right=numbers)
    for label, link in rows:
        table.add_row(
            label,
            _gbps(link.capacity_gbps),
            f"{link.rtt_ms:g}",
            f"{link.loss_pct:g}",
            _gbps(link.window_gbps),
            _gbps(link.loss_gbps),
            Text(_gbps(link.effective_gbps), style="bold"),
            f"{link.egress_usd_per_gb:g}",
            link.limited_by,
        )
    table.print(console)


def _where(option: Option | None) -> str:
    return ", ".join(option.sites) if option else "-"


def _render_decisions(report: Report, console: Console, show_all_links: bool) -> None:
    costs = ("compute", "egress", "storage", "relays")
    numbers = ("GPUs", "total", "done in")
    # Narrow terminals get the cost breakdown as a table of its own.
    wide = console.width >= 120
    table = _table("Decisions" + (" (total = compute + egress + storage + relays)" if wide
                                  else ""),
                   "workload", "action", "site(s)", *numbers[:1], *(costs if wide else ()),
                   *numbers[1:], right=(*numbers, *costs))
    breakdown = _table("Cost breakdown of each decision", "workload", *costs, "total",
                       right=(*costs, "total"))
    for d in report.decisions:
        o = d.option
        action = Text(d.action, style="bold green" if d.feasible else "bold red")
        if o is None:
            table.add_row(d.workload, action, "-", "-", *(("-",) * 4 if wide else ()), "-", "-")
            continue
        parts = (money(o.compute_usd), money(o.egress_usd), money(o.storage_usd),
                 money(o.relay_usd))
        total = Text(money(o.total_usd), style="bold")
        table.add_row(d.workload, action, _where(o), f"{o.gpus:,}", *(parts if wide else ()),
                      total, duration(o.completion_hours))
        breakdown.add_row(d.workload, *parts, total)
    table.print(console)
    if not wide and breakdown.row_count:
        breakdown.print(console)
    for d in report.decisions:
        style = "green" if d.feasible else "red"
        console.print(Text.assemble((f"{d.workload}: ", f"bold {style}"), d.reason))


def _render_path_alternatives(report: Report, console: Console, show_all_links: bool) -> None:
    if len(report.decisions) > _DETAILED_DECISIONS:
        return
    rows = [(d.workload, m, alt) for d in report.decisions if d.option
            for m in d.option.movements for alt in m.route.alternatives]
    if not rows:
        return
    table = _table("Paths not taken (direct, fastest, cheapest) for the same transfer",
                   "workload: moves", "path", "time", "cost", "lost because",
                   right=("time", "cost"))
    for workload, m, alt in rows:
        table.add_row(f"{workload}: {m.id} ({', '.join(alt.labels)})",
                      " -> ".join(alt.path.sites), duration(alt.seconds / 3600),
                      money(alt.cost_usd), alt.rejected_because)
    table.print(console)


def _alternatives_table(
    title: str, rows: list[tuple[str, Option]], *, with_workload: bool
) -> _Grid:
    cols = ("workload", "action", "site") if with_workload else ("action", "site")
    table = _table(title, *cols, "total", "done in", "rejected because",
                   right=("total", "done in"))
    for workload, alt in rows:
        # Unpriced options failed before any path was searched: their total is unknown.
        cells = [
            alt.action,
            _where(alt),
            money(alt.total_usd) if alt.priced else "-",
            duration(alt.completion_hours) if alt.feasible else "-",
            alt.rejected_because or "",
        ]
        table.add_row(*([workload, *cells] if with_workload else cells))
    return table


def _render_alternatives(report: Report, console: Console, show_all_links: bool) -> None:
    decided = [d for d in report.decisions if d.alternatives]
    if len(decided) > _DETAILED_DECISIONS:
        # A large estate: one table with each workload's runner-up; --json has the rest.
        rows = [(d.workload, d.alternatives[0]) for d in decided]
        title = "Runner-up option per workload (--json: more)"
        _alternatives_table(title, rows, with_workload=True).print(console)
        return
    for d in decided:
        shown = d.alternatives[:_ALTERNATIVES_SHOWN]
        more = len(d.alternatives) - len(shown)
        title = f"Options that lost: {d.workload}" + (f" ({more} more in --json)" if more else "")
        if d.skipped:
            title += f"; {d.skipped} not evaluated (could not win)"
        rows = [(d.workload, alt) for alt in shown]
        _alternatives_table(title, rows, with_workload=False).print(console)


def _shard_groups(shards: tuple[ShardPlacement, ...]) -> list[tuple[str, str]]:
    """Consecutive shards with the same replica sites collapse into one row ("0-63")."""
    rows: list[tuple[str, str]] = []
    start = 0
    for i in range(1, len(shards) + 1):
        if i == len(shards) or shards[i].sites != shards[start].sites:
            label = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            rows.append((label, ", ".join(shards[start].sites)))
            start = i
    return rows


def _render_shards(report: Report, console: Console, show_all_links: bool) -> None:
    for r in report.shard_replication:
        style = "green" if r.feasible else "red"
        console.print(Text.assemble((f"Vector index {r.index}: ", f"bold {style}"), r.reason))
        if not r.feasible:
            continue
        table = _table(f"{r.index}: shard replicas", "shards", "sites")
        for label, sites in _shard_groups(r.shards):
            table.add_row(label, sites)
        table.print(console)
        lat = _table(f"{r.index}: querying sites", "querying site", "p99 ms", "headroom ms",
                     "worst shard", right=("p99 ms", "headroom ms", "worst shard"))
        for q in r.latencies:
            lat.add_row(q.site, f"{q.p99_ms:.1f}", f"{q.headroom_ms:.1f}", str(q.worst_shard))
        lat.print(console)
        if r.cost is not None:
            gap = r.gap
            console.print(
                f"  cost per day: storage {money(r.cost.storage_usd_per_day)} + sync egress "
                f"{money(r.cost.sync_egress_usd_per_day)} + query egress "
                f"{money(r.cost.query_egress_usd_per_day)} = "
                f"[bold]{money(r.cost.total_usd_per_day)}[/bold] ({r.solver}); greedy "
                f"{money(r.greedy_objective_usd_per_day or 0.0)}"
                + (f", gap {gap:.2%}" if gap is not None else ", greedy found no placement")
            )


def _render_sync(report: Report, console: Console, show_all_links: bool) -> None:
    plan = report.sync_plan
    if plan is None or not (plan.transfers or plan.checkpoints or plan.notes):
        return
    cost = plan.cost_per_day()
    table = _table(f"Sync plan: daily transfers ({money(cost['total_usd'])}/day: egress "
                   f"{money(cost['egress_usd'])} + storage {money(cost['storage_usd'])} + relays "
                   f"{money(cost['relay_usd'])})", "rule", "dataset", "from", "to", "route",
                   "GB/day", "class", "$/day", right=("GB/day", "$/day"))
    for t in plan.all_transfers():
        route = (" -> ".join(t.path) if not t.route.multipath else "; ".join(
            f"{leg.share:.0%} via {' -> '.join(leg.path.sites)}" for leg in t.route.legs))
        per_day = t.egress_usd_per_day + t.relay_usd_per_day + t.storage_usd_per_day
        table.add_row(t.rule, t.dataset, t.source, t.destination, route,
                      f"{t.gb_per_day:,.1f}", t.traffic_class.value, money(per_day))
    table.print(console)
    links = _table(f"Sync plan: link load in the {plan.window_hours:g} h window at "
                   f"{plan.bulk_share:.0%} bulk share", "link", "sync GB/day",
                   "checkpoint GB/day", "effective", "capacity GB", "load GB", "shortfall GB",
                   right=("sync GB/day", "checkpoint GB/day", "effective", "capacity GB",
                          "load GB", "shortfall GB"))
    for load in plan.links:
        short = Text(f"{load.shortfall_gb:,.0f}", style="bold red") if load.flagged else "-"
        links.add_row(f"{load.sender} -> {load.receiver}", f"{load.sync_gb_per_day:,.1f}",
                      f"{load.checkpoint_gb_per_day:,.1f}", _gbps(load.effective_gbps),
                      f"{load.capacity_gb:,.0f}", f"{load.load_gb:,.0f}", short)
    links.print(console)
    for c in plan.checkpoints:
        console.print(f"checkpoints of {c.workload}: every {c.every_hours:g} h from {c.source} "
                      f"to {', '.join(c.targets) or '-'}, keep {c.retain}")
    for note in plan.notes:
        console.print(Text(note, style="yellow"))


def _render_budgets(report: Report, console: Console, show_all_links: bool) -> None:
    if not report.latency_budgets:
        return
    names = [c.name for c in report.latency_budgets[0].components]
    numbers = (*(name.replace("_", " ") for name in names), "total", "budget", "headroom")
    table = _table("Latency budgets (ms, worst client)", "workload", "client -> site",
                   *numbers, "largest", right=numbers)
    for b in report.latency_budgets:
        head = Text(f"{b.headroom_ms:.1f}", style="green" if b.fits else "bold red")
        table.add_row(b.workload, f"{b.client} -> {b.serving_site}",
                      *(f"{c.ms:.1f}" for c in b.components), f"{b.total_ms:.1f}",
                      f"{b.budget_ms:g}", head, b.largest.name)
    table.print(console)


Section = Callable[[Report, Console, bool], None]
SECTIONS: list[Section] = [
    _render_header,
    _render_links,
    _render_decisions,
    _render_path_alternatives,
    _render_alternatives,
    _render_shards,
    _render_sync,
    _render_budgets,
]


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Loading and planning a large estate allocate hundreds of thousands of short-lived, acyclic
    objects; the cycle collector's passes over them cost a third of the run and find nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fail(exc: NetplanError, code: int) -> None:
    click.echo(str(exc), err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="netplan-transferd", prog_name="netplan")
def cli() -> None:
    """Plan where AI work runs and what crosses the network."""


def _model_options(command: Callable[..., None]) -> Callable[..., None]:
    """The flags `analyze` and `plan` share: the TCP model and the path policy."""
    for option in reversed([
        click.option("--streams", type=click.IntRange(1, 4096), help="Parallel TCP streams (N)."),
        click.option("--window-bytes", type=click.IntRange(1024),
                     help="Per-stream TCP window, bytes."),
        click.option("--mss-bytes", type=click.IntRange(64, 65495),
                     help="TCP maximum segment, bytes."),
        click.option("--max-relays", type=click.IntRange(0, 6),
                     help="Relay sites a bulk path may pass through (topology paths.max_relays,"
                     " default 2)."),
        click.option("--multipath/--no-multipath", default=None,
                     help="Split transfers over several paths when one cannot meet a deadline "
                     "(topology paths.multipath, default on)."),
    ]):
        command = option(command)
    return command


def _load(topology_file: str) -> Topology:
    """The topology, or exit 2 naming what is wrong with it."""
    with _no_cyclic_gc():
        try:
            return load_topology(topology_file)
        except TopologyError as exc:
            _fail(exc, 2)
    raise AssertionError("unreachable")


def _model(
    topology: Topology,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    max_relays: int | None,
    multipath: bool | None,
) -> tuple[TransferSettings, PathPolicy]:
    """The TCP settings and path policy: the topology's, the flags overriding them."""
    overrides = {
        k: v
        for k, v in (("streams", streams), ("window_bytes", window_bytes), ("mss_bytes", mss_bytes))
        if v is not None
    }
    policy = {k: v for k, v in (("max_relays", max_relays), ("multipath", multipath))
              if v is not None}
    try:
        settings = TransferSettings.model_validate({**topology.transfer.model_dump(), **overrides})
        paths = PathPolicy.model_validate({**topology.paths.model_dump(), **policy})
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    return settings, paths


def _load_overlay(measured_file: str) -> MeasuredOverlay:
    """A measured.yaml (`netplan calibrate -o`), or exit 2 naming what is wrong with it."""
    try:
        text = read_text_bounded(measured_file)
        return parse_overlay(parse_yaml(text), measured_file)
    except DocumentError as exc:
        _fail(TopologyError([FieldIssue(path=(), message=exc.summary, line=exc.line)],
                            measured_file), 2)
    except OSError as exc:
        click.echo(f"{measured_file}: cannot read file: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except NetplanError as exc:
        _fail(exc, 2)
    raise AssertionError("unreachable")


def _analyze(
    topology_file: str,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    max_relays: int | None,
    multipath: bool | None,
    measured_file: str | None = None,
) -> tuple[Topology, Report, tuple[Applied, ...]]:
    """Load (with `measured_file`: the measured link values laid over the declared ones) and
    analyze, the flags overriding the topology; exit 2 on bad input."""
    topology = _load(topology_file)
    applied: tuple[Applied, ...] = ()
    try:
        if measured_file is not None:
            topology, applied = apply_measured(topology, _load_overlay(measured_file))
        settings, paths = _model(topology, streams, window_bytes, mss_bytes, max_relays,
                                 multipath)
        with _no_cyclic_gc():
            report = analyze(topology, settings, paths)
    except NetplanError as exc:
        _fail(exc, 2)
    return topology, report, applied


def _print_applied(applied: tuple[Applied, ...], measured_file: str) -> None:
    click.echo(f"Measured link values used (from {measured_file}):")
    for a in applied:
        click.echo(f"  {a.text()}")
    if not applied:
        click.echo("  none: every link keeps its declared values")


@cli.command("analyze")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@_model_options
@click.option("--all-links", is_flag=True, help="List every link, however many.")
@click.option(
    "--max-alternatives",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="JSON: losing options kept per decision, best first (0: none; every losing site is "
    "still counted in `rejections`).",
)
@click.option("--all-alternatives", is_flag=True,
              help="JSON: keep every losing option (overrides --max-alternatives).")
@click.option("--strict", is_flag=True,
              help="Exit 1 if any workload, vector index or sync rule is infeasible.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the report as one self-contained HTML page (map, timelines, "
              "costs, charts; opens offline) and print a one-line summary instead of tables.")
@click.option("--measured", "measured_file", type=click.Path(dir_okay=False, path_type=str),
              help="Plan on the link values `netplan calibrate` measured (its -o file) where "
              "they exist; says which it used.")
def analyze_command(
    topology_file: str,
    as_json: bool,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    max_relays: int | None,
    multipath: bool | None,
    all_links: bool,
    max_alternatives: int,
    all_alternatives: bool,
    strict: bool,
    html_file: str | None,
    measured_file: str | None,
) -> None:
    """Decide where each workload runs and what moves, with reasons.

    TCP settings come from the topology's `transfer:` section and the path policy from its
    `paths:` section; the flags override them.
    """
    topology, report, applied = _analyze(topology_file, streams, window_bytes, mss_bytes,
                                         max_relays, multipath, measured_file)
    keep = None if all_alternatives else max_alternatives
    doc = report.to_json(max_alternatives=keep) if as_json or html_file is not None else {}
    if measured_file is not None:
        doc["measured"] = {"file": measured_file, "used": [
            {"between": list(a.link), "from": a.direction, "field": a.field,
             "declared": a.declared, "measured": a.measured, "samples": a.samples}
            for a in applied]}
        if not as_json:
            _print_applied(applied, measured_file)
    if html_file is not None:
        feasible = sum(d.feasible for d in report.decisions)
        _write_html(html_file, lambda html: html.analysis_page(
            topology, doc, generator=f"netplan {_version()} analyze --html"),
            f"{len(topology.sites):,} sites, {feasible}/{len(report.decisions)} workloads "
            "feasible")
    if as_json:
        for chunk in json.JSONEncoder(indent=2).iterencode(doc):  # (tens of MB: no one string)
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
    elif html_file is None:
        # Piped output still gets readable tables unless COLUMNS says otherwise.
        wide = sys.stdout.isatty() or "COLUMNS" in os.environ
        console = Console(width=None if wide else 160)
        for section in SECTIONS:
            section(report, console, all_links)
    if strict:
        try:
            report.require_feasible()
        except Infeasible as exc:
            _fail(exc, 1)


def _write_html(path: str, build: Callable[[Any], str], summary: str) -> None:
    """The page `build(netplan.html)` returns, written whole or not at all; plotly and Jinja2
    load only here, so the commands without --html start without them."""
    try:
        from netplan import html
    except ImportError as exc:
        click.echo(f"--html needs plotly and jinja2 ({exc}): pip install "
                   "'netplan-transferd[html]'", err=True)
        sys.exit(2)
    page = build(html)
    _write_atomically(path, page)
    click.echo(f"wrote {path}: {len(page.encode()) / 1e6:.1f} MB, {summary}", err=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netplan-transferd")
    except PackageNotFoundError:
        return "(not installed)"


# Names of a descriptor this process already holds (`-o /dev/stdout >> out.json`): written
# where the descriptor points and as it was opened (appended to), never replaced.
_DESCRIPTOR_PATHS = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/")
_MAX_LINKS = 40  # the kernel's own limit on links followed in one path (ELOOP)


def _write_atomically(path: str, text: str) -> None:
    """`text` at `path` via a temporary file beside it and a rename: a reader (or a crash)
    never sees half a file; exit 2 naming the path when it cannot be written.

    A link of this user's is written through: the file it names is replaced, the link stays.
    A link of another user's is replaced itself, as a rename does: following it (a link
    planted in /tmp by someone else) would let a root run overwrite any file, which the
    kernel's fs.protected_symlinks refuses when the kernel is the one to follow it. A device,
    FIFO or socket (/dev/null, a pipe) and a descriptor's name (/dev/stdout) are written to
    as they are: the rename replaced them with a regular file."""
    tmp: str | None = None
    try:
        if path.startswith(_DESCRIPTOR_PATHS) and os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        target = _own_link_target(path)
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG  # nothing there yet: made here
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        # mkstemp: a name nobody can guess and create first (<path>.tmp-PID could be).
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".",
                                   prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it; mkstemp makes it 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        click.echo(f"cannot write {path}: {exc.strerror or exc}", err=True)
        sys.exit(2)


def _own_link_target(path: str) -> str:
    """`path`, with the links this user owns at its end followed one by one (a link's target
    is read relative to the link's folder; the folders on the way are the kernel's to
    resolve). It stops at the first name that is not such a link: another user's link is
    returned as it is, to be replaced rather than followed."""
    for _ in range(_MAX_LINKS):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path
        if not stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            return path
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


@cli.command("plan")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=str),
              required=True, help="Where to write the plan JSON (- for stdout).")
@_model_options
@click.option("--allow-infeasible", is_flag=True,
              help="Write the plan even when workloads, vector indexes or sync rules are "
              "infeasible (their entries are left out or fall short; the problems are listed).")
@click.option("--measured", "measured_file", type=click.Path(dir_okay=False, path_type=str),
              help="Plan on the link values `netplan calibrate` measured (its -o file).")
def plan_command(
    topology_file: str,
    output: str,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    max_relays: int | None,
    multipath: bool | None,
    allow_infeasible: bool,
    measured_file: str | None,
) -> None:
    """Write the versioned plan (plan.json) that each site's transferd executes.

    A plan with infeasible entries is refused (exit 1, each problem listed) unless
    --allow-infeasible says to write it anyway.
    """
    topology, report, applied = _analyze(topology_file, streams, window_bytes, mss_bytes,
                                         max_relays, multipath, measured_file)
    if measured_file is not None and output != "-":
        _print_applied(applied, measured_file)
    problems = report.problems()
    if problems and not allow_infeasible:
        click.echo(f"{InfeasiblePlan(problems)}\nno plan written: fix the topology, or write "
                   "it anyway with --allow-infeasible", err=True)
        sys.exit(1)
    try:
        plan = build_plan(topology, report)
    except NetplanError as exc:
        _fail(exc, 2)
    text = plan.to_json_text()
    if problems:
        click.echo(f"{InfeasiblePlan(problems)}\nwriting the plan anyway (--allow-infeasible)",
                   err=True)
    if output == "-":
        click.echo(text, nl=False)
        return
    _write_atomically(output, text)
    entries = sum(len(s.sync) + len(s.shards) + len(s.checkpoints) for s in plan.sites)
    click.echo(f"wrote {output}: {len(plan.sites)} sites, {entries} sync/shard/checkpoint "
               f"entries (schema_version {plan.schema_version})")


def _seconds(text: str) -> float:
    """A duration such as 90s, 30m, 6h, 2d (a bare number: seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a duration such as 30m, 6h or 3600"
                                 ) from None


@cli.command("calibrate")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--from", "sources", multiple=True, metavar="CONFIG_OR_URL",
              help="A daemon to read telemetry from: its URL (reads /metrics), a site config "
              "(through `transferd telemetry`), or a saved `transferd telemetry --json` file. "
              "Repeatable.")
@click.option("--prometheus", "prometheus_url", metavar="URL",
              help="Read the transferd_link_* series from a Prometheus server's HTTP API.")
@click.option("--range", "range_text", default="1h", show_default=True,
              help="With --prometheus: how far back to look (30m, 6h, 2d).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=str),
              required=True, help="Where to write the measured overlay (measured.yaml).")
@click.option("--min-samples", type=click.IntRange(1), default=MIN_SAMPLES,
              show_default=True, help="Samples (seconds with data moving) a link direction "
              "needs before its measured values count.")
def calibrate_command(topology_file: str, sources: tuple[str, ...],
                      prometheus_url: str | None, range_text: str, output: str,
                      min_samples: int) -> None:
    """Measure the topology's links from the daemons' telemetry: write the measured values
    (bandwidth = best sustained goodput, RTT, jitter, loss from retransmits) with their sample
    counts and time ranges, print declared vs measured with the drift, and the decisions that
    would change. `netplan analyze --measured FILE` then plans on them."""
    from netplan import collect

    if not sources and prometheus_url is None:
        raise click.UsageError("give --from CONFIG_OR_URL (repeatable) or --prometheus URL")
    topology = _load(topology_file)
    measurements: list[tuple[str, LinkMeasurement]] = []
    try:
        for source in sources:
            measurements += [(source, m) for m in collect.from_source(source)]
        if prometheus_url is not None:
            got = collect.from_prometheus(prometheus_url, _seconds(range_text))
            measurements += [(prometheus_url, m) for m in got]
        overlay = overlay_of(measurements, topology, min_samples)
        calibrated, applied = apply_measured(topology, overlay)
        settings, paths = _model(topology, None, None, None, None, None)
        with _no_cyclic_gc():
            changes = decision_changes(analyze(topology, settings, paths),
                                       analyze(calibrated, settings, paths))
    except NetplanError as exc:
        _fail(exc, 2)
    import yaml

    _write_atomically(output, "# netplan calibrate: measured link values "
                      f"(netplan analyze {topology_file} --measured {output})\n"
                      + yaml.safe_dump(overlay.to_yaml_data(), sort_keys=False))
    table = _table("Declared vs measured", "link", "from", "value", "declared", "measured",
                   "drift", "samples", right=("declared", "measured", "drift", "samples"))
    for a in applied:
        drift = a.drift_pct
        table.add_row(f"{a.link[0]}-{a.link[1]}", a.direction or "both", a.field,
                      f"{a.declared:g}", f"{a.measured:.4g}",
                      "-" if drift is None else f"{drift:+.0f} %", str(a.samples))
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    table.print(console)
    for reason in overlay.skipped:
        click.echo(f"skipped: {reason}")
    if changes:
        click.echo("Decisions that would change on the measured values:")
        for c in changes:
            click.echo(f"  {c.workload}: {c.declared} -> {c.measured}")
    else:
        click.echo("No decision changes on the measured values.")
    click.echo(f"wrote {output}: {len(overlay.measured_links)} measured link directions")


@cli.command("whatif")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--fail", "fail", multiple=True, metavar="site:X|link:A,B",
              help="A site or link fails (repeatable; all given changes form one scenario).")
@click.option("--degrade", multiple=True, metavar="link:A,B=30%",
              help="A link keeps 30 % of its bandwidth (=-70% says the same; =2.5gbps sets "
              "it).")
@click.option("--loss", multiple=True, metavar="link:A,B=1%", help="A link's packet loss "
              "becomes 1 %.")
@click.option("--price", multiple=True, metavar="egress:X=x2|gpu:h100=x1.5",
              help="Egress leaving X (or * for every site), or a GPU type's hourly price "
              "(gpu:h100@X: at X only), times a factor (x2) or set ($/GB, $/GPU-hour).")
@click.option("--gpus", multiple=True, metavar="site:X=-50%",
              help="GPUs at X change by a percentage (gpu:h100=-50%: one type everywhere; "
              "gpu:h100@X=16: exactly 16).")
@click.option("--name", "scenario_name", help="A name for the command-line scenario.")
@click.option("--scenarios", "scenario_file", type=click.Path(dir_okay=False, path_type=str),
              help="A YAML file of named scenarios (see the README).")
@click.option("--sweep", type=click.Choice(["n-1", "n-2"]),
              help="Every site, then every link, failing alone (n-1), or every pair (n-2).")
@click.option("--max-scenarios", type=click.IntRange(1), default=100_000, show_default=True,
              help="Refuse an n-2 sweep with more pairs than this.")
@click.option("--failure-at", default="50%", show_default=True, metavar="PCT",
              help="How far through its compute a training run is when its site fails.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Local worker processes for the scenarios (default: one per CPU when the "
              "sweep is large enough to pay for starting them; 1 runs them in this process).")
@click.option("--dask", "dask_address", metavar="tcp://HOST:PORT",
              help="Run the scenarios on this dask.distributed scheduler's workers instead.")
@click.option("--full", is_flag=True, help="Re-plan every workload in every scenario (slower; "
              "the same answers: a check on the incremental re-planning).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True,
              help="Rows of the ranking of scenarios that hurt most.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the scenarios compared as one self-contained HTML page (opens "
              "offline) instead of printing tables.")
@_model_options
def whatif_command(
    topology_file: str,
    fail: tuple[str, ...],
    degrade: tuple[str, ...],
    loss: tuple[str, ...],
    price: tuple[str, ...],
    gpus: tuple[str, ...],
    scenario_name: str | None,
    scenario_file: str | None,
    sweep: str | None,
    max_scenarios: int,
    failure_at: str,
    workers: int | None,
    dask_address: str | None,
    full: bool,
    top: int,
    as_json: bool,
    html_file: str | None,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    max_relays: int | None,
    multipath: bool | None,
) -> None:
    """What if sites or links fail, links degrade, prices move or GPUs get scarce.

    Each scenario re-plans the workloads it reaches and says what changed, what became
    infeasible and why, which inference clients and vector-index queries miss their budget
    after failover, which sync rules no longer fit, and where a failed training run should
    resume given where its checkpoints and data are. Several scenarios are ranked by harm,
    with the single points of failure.
    """
    from netplan import whatif_tables
    from netplan.executors import (
        DaskExecutor,
        ExecutorError,
        LocalExecutor,
        ScenarioExecutor,
        SerialExecutor,
        run_whatif,
    )
    from netplan.scenarios import (
        ScenarioError,
        check_scenario,
        load_scenario_file,
        scenario_from_options,
    )
    from netplan.scenarios import sweep as sweep_scenarios
    from netplan.whatif import WhatifOptions, build_baseline

    def usage(exc: NetplanError) -> None:
        click.echo(f"Usage error: {exc}", err=True)
        sys.exit(2)

    topology = _load(topology_file)
    settings, paths = _model(topology, streams, window_bytes, mss_bytes, max_relays, multipath)
    scenarios = []
    try:
        given = scenario_from_options({"fail": fail, "degrade": degrade, "loss": loss,
                                       "price": price, "gpus": gpus}, scenario_name)
        if given is not None:
            scenarios.append(given)
        if scenario_file is not None:
            scenarios += load_scenario_file(scenario_file)
        for scenario in scenarios:
            check_scenario(topology, scenario)
        if sweep is not None:
            scenarios += sweep_scenarios(topology, sweep, max_scenarios)
        share = failure_at.strip().rstrip("%")
        try:
            at = float(share) / 100
        except ValueError:
            at = -1.0
        if not 0 <= at <= 1:
            raise ScenarioError("--failure-at", failure_at, "must be a percentage from 0% "
                                "to 100%")
    except ScenarioError as exc:
        usage(exc)
    if not scenarios:
        usage(ScenarioError("netplan whatif", None, "nothing to ask: give --fail, --degrade, "
                            "--loss, --price or --gpus, a --scenarios file, or --sweep n-1"))
    options = WhatifOptions(failure_at=at, incremental=not full)
    started = time.perf_counter()
    try:
        with _no_cyclic_gc():
            baseline = build_baseline(topology, settings, paths)
        work = sum(1 for s in scenarios if baseline.needs_work(s, options))
        executor: ScenarioExecutor
        if dask_address:
            executor = DaskExecutor(dask_address)
        elif workers is None and work * len(topology.sites) < _PROCESSES_PAY_OFF:
            executor = SerialExecutor()  # (starting processes would cost more than the work)
        elif (workers or os.cpu_count() or 1) == 1 or work < 2:
            executor = SerialExecutor()
        else:
            executor = LocalExecutor(workers)
        result = run_whatif(topology, scenarios, executor, options=options, sweep=sweep,
                            baseline=baseline)
    except ExecutorError as exc:
        _fail(exc, 2)
    except NetplanError as exc:
        _fail(exc, 2)
    run = {"executor": executor.name, "workers": executor.workers,
           "seconds": round(time.perf_counter() - started, 3)}
    doc = {**result.to_json(), "run": run} if as_json or html_file is not None else {}
    if html_file is not None:
        _write_html(html_file, lambda html: html.whatif_page(
            doc, generator=f"netplan {_version()} whatif --html", topology=topology,
            baseline=baseline.report.to_json(max_alternatives=0)),
            f"{len(result.scenarios):,} scenarios, {len(result.ranking):,} hurt")
    if as_json:
        for chunk in json.JSONEncoder(indent=2).iterencode(doc):
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
    elif html_file is None:
        wide = sys.stdout.isatty() or "COLUMNS" in os.environ
        console = Console(width=None if wide else 160)
        whatif_tables.render(result, console, run, top)
    errors = [s for s in result.scenarios if s.error]
    if errors:
        click.echo(f"{len(errors)} scenario(s) could not be evaluated; the first: "
                   f"{errors[0].scenario.name}: {errors[0].error}", err=True)
        sys.exit(1)


@cli.command("schema")
@click.option("--report", "report", is_flag=True,
              help="The JSON Schema of `netplan analyze --json` instead.")
@click.option("--whatif", "whatif", is_flag=True,
              help="The JSON Schema of `netplan whatif --json` instead.")
def schema_command(report: bool, whatif: bool) -> None:
    """Print the topology format's JSON Schema (or the analyze report's with --report, the
    what-if document's with --whatif)."""
    if whatif:
        from netplan.whatif_schema import WhatifDocument

        click.echo(json.dumps(WhatifDocument.model_json_schema(by_alias=True), indent=2))
        return
    if report:
        from netplan.report_schema import ReportDocument

        click.echo(json.dumps(ReportDocument.model_json_schema(by_alias=True), indent=2))
        return
    click.echo(json.dumps(Topology.model_json_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="netplan")
