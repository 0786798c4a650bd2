"""The `netplan` command line: `analyze` (rich tables or --json), `plan` and `schema`.

The only place (with the loader) that does I/O; it turns NetplanError into text on stderr and an
exit code (2: the topology or the arguments are wrong; 1: --strict and a workload is infeasible).
The report is rendered section by section (`SECTIONS`): a new section is one more renderer.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from netplan._plan_build import build_plan
from netplan._shards import ShardPlacement
from netplan.decisions import Option, duration, money
from netplan.errors import Infeasible, NetplanError, TopologyError
from netplan.loader import load_topology
from netplan.report import Report, analyze
from netplan.topology import Topology, TransferSettings

__all__ = ["SECTIONS", "main"]

# Beyond this many links the terminal report shows only links on chosen paths (--json has all).
_LINK_TABLE_LIMIT = 60
_ALTERNATIVES_SHOWN = 5
# Beyond this many decisions, losing options are shown one per workload.
_DETAILED_DECISIONS = 20


def _gbps(x: float) -> str:
    if x == float("inf"):
        return "-"
    return f"{x:,.2f}" if x >= 0.1 else f"{x * 1000:,.1f} M"


def _render_header(report: Report, console: Console, show_all_links: bool) -> None:
    s = report.settings
    console.print(
        f"[bold]netplan analyze[/bold]: {report.topology}  "
        f"(TCP model: {s.streams} streams x {s.window_bytes / 1024 / 1024:g} MiB window, "
        f"MSS {s.mss_bytes} B, Mathis C {s.mathis_constant:.3f})"
    )


def _used_links(report: Report) -> set[frozenset[str]]:
    used: set[frozenset[str]] = set()
    for decision in report.decisions:
        if decision.option:
            for m in decision.option.movements:
                used.update(frozenset(pair) for pair in zip(m.path, m.path[1:], strict=False))
    return used


def _render_links(report: Report, console: Console, show_all_links: bool) -> None:
    links = report.links
    title = "Links: effective bulk throughput (Gbit/s; M = Mbit/s)"
    if len(links) > _LINK_TABLE_LIMIT and not show_all_links:
        # A large estate: the links the decisions use, slowest first, up to the limit.
        used = _used_links(report)
        on_paths = sorted(
            (link for link in links if frozenset(link.between) in used),
            key=lambda link: link.effective_gbps,
        )
        links = tuple(on_paths[:_LINK_TABLE_LIMIT])
        title += (
            f" - the {len(links)} slowest of {len(on_paths)} links on chosen paths "
            f"({len(report.links)} in all: --all-links or --json)"
        )
    table = Table(title=title, title_justify="left")
    for col in ("between", "capacity", "rtt ms", "loss %", "window bound", "loss bound"):
        table.add_column(col, justify="left" if col == "between" else "right")
    table.add_column("effective", justify="right", style="bold")
    table.add_column("limited by")
    for link in links:
        table.add_row(
            " - ".join(link.between),
            _gbps(link.capacity_gbps),
            f"{link.rtt_ms:g}",
            f"{link.loss_pct:g}",
            _gbps(link.window_gbps),
            _gbps(link.loss_gbps),
            _gbps(link.effective_gbps),
            link.limited_by,
        )
    console.print(table)


def _where(option: Option | None) -> str:
    return ", ".join(option.sites) if option else "-"


def _render_decisions(report: Report, console: Console, show_all_links: bool) -> None:
    table = Table(title="Decisions", title_justify="left")
    for col in ("workload", "kind", "action", "site(s)", "path"):
        table.add_column(col)
    for col in ("moves", "transfer", "egress", "compute", "total", "done in"):
        table.add_column(col, justify="right")
    for d in report.decisions:
        o = d.option
        action = Text(d.action, style="bold green" if d.feasible else "bold red")
        if o is None:
            table.add_row(d.workload, d.kind, action, "-", "-", "-", "-", "-", "-", "-", "-")
            continue
        table.add_row(
            d.workload,
            d.kind,
            action,
            _where(o),
            " -> ".join(o.path),
            f"{o.transfer_gb:,.0f} GB",
            duration(o.transfer_seconds / 3600),
            money(o.egress_usd),
            money(o.compute_usd),
            money(o.total_usd),
            duration(o.completion_hours),
        )
    console.print(table)
    for d in report.decisions:
        style = "green" if d.feasible else "red"
        console.print(Text.assemble((f"{d.workload}: ", f"bold {style}"), d.reason))


def _alternatives_table(
    title: str, rows: list[tuple[str, Option]], *, with_workload: bool
) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("workload", "action", "site") if with_workload else ("action", "site"):
        table.add_column(col)
    table.add_column("total", justify="right")
    table.add_column("done in", justify="right")
    table.add_column("rejected because", overflow="fold")
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
        console.print(_alternatives_table(title, rows, with_workload=True))
        return
    for d in decided:
        shown = d.alternatives[:_ALTERNATIVES_SHOWN]
        more = len(d.alternatives) - len(shown)
        title = f"Options that lost: {d.workload}" + (f" ({more} more in --json)" if more else "")
        if d.skipped:
            title += f"; {d.skipped} not evaluated (could not win)"
        rows = [(d.workload, alt) for alt in shown]
        console.print(_alternatives_table(title, rows, with_workload=False))


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
        table = Table(title=f"{r.index}: shard replicas", title_justify="left")
        table.add_column("shards")
        table.add_column("sites")
        for label, sites in _shard_groups(r.shards):
            table.add_row(label, sites)
        console.print(table)
        lat = Table(title=f"{r.index}: querying sites", title_justify="left")
        for col in ("querying site", "p99 ms", "headroom ms", "worst shard"):
            lat.add_column(col, justify="left" if col == "querying site" else "right")
        for q in r.latencies:
            lat.add_row(q.site, f"{q.p99_ms:.1f}", f"{q.headroom_ms:.1f}", str(q.worst_shard))
        console.print(lat)
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
    table = Table(title="Sync plan: daily transfers", title_justify="left")
    for col in ("rule", "dataset", "from", "to", "path", "GB/day", "class"):
        table.add_column(col, justify="right" if col == "GB/day" else "left")
    for t in (*plan.transfers, *(m for c in plan.checkpoints for m in c.transfers)):
        table.add_row(t.rule, t.dataset, t.source, t.destination, " -> ".join(t.path),
                      f"{t.gb_per_day:,.1f}", t.traffic_class.value)
    console.print(table)
    links = Table(title=f"Sync plan: link load in the {plan.window_hours:g} h window at "
                  f"{plan.bulk_share:.0%} bulk share", title_justify="left")
    for col in ("link", "sync GB/day", "checkpoint GB/day", "effective", "capacity GB",
                "load GB", "shortfall GB"):
        links.add_column(col, justify="left" if col == "link" else "right")
    for load in plan.links:
        short = Text(f"{load.shortfall_gb:,.0f}", style="bold red") if load.flagged else "-"
        links.add_row(f"{load.sender} -> {load.receiver}", f"{load.sync_gb_per_day:,.1f}",
                      f"{load.checkpoint_gb_per_day:,.1f}", _gbps(load.effective_gbps),
                      f"{load.capacity_gb:,.0f}", f"{load.load_gb:,.0f}", short)
    console.print(links)
    for c in plan.checkpoints:
        console.print(f"checkpoints of {c.workload}: every {c.every_hours:g} h from {c.source} "
                      f"to {', '.join(c.targets) or '-'}, keep {c.retain}")
    for note in plan.notes:
        console.print(Text(note, style="yellow"))


def _render_budgets(report: Report, console: Console, show_all_links: bool) -> None:
    if not report.latency_budgets:
        return
    names = [c.name for c in report.latency_budgets[0].components]
    table = Table(title="Latency budgets (ms, worst client)", title_justify="left")
    table.add_column("workload")
    table.add_column("client -> site")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    for col in ("total", "budget", "headroom"):
        table.add_column(col, justify="right")
    table.add_column("largest")
    for b in report.latency_budgets:
        head = Text(f"{b.headroom_ms:.1f}", style="green" if b.fits else "bold red")
        table.add_row(b.workload, f"{b.client} -> {b.serving_site}",
                      *(f"{c.ms:.1f}" for c in b.components), f"{b.total_ms:.1f}",
                      f"{b.budget_ms:g}", head, b.largest.name)
    console.print(table)


Section = Callable[[Report, Console, bool], None]
SECTIONS: list[Section] = [
    _render_header,
    _render_links,
    _render_decisions,
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
def cli() -> None:
    """Plan where AI work runs and what crosses the network."""


@cli.command("analyze")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--streams", type=click.IntRange(1, 4096), help="Parallel TCP streams (N).")
@click.option("--window-bytes", type=click.IntRange(1024), help="Per-stream TCP window, bytes.")
@click.option("--mss-bytes", type=click.IntRange(64, 65495), help="TCP maximum segment, bytes.")
@click.option("--all-links", is_flag=True, help="List every link, however many.")
@click.option(
    "--max-alternatives",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="JSON: losing options kept per decision, best first (0: all).",
)
@click.option("--strict", is_flag=True, help="Exit 1 if any workload is infeasible.")
def analyze_command(
    topology_file: str,
    as_json: bool,
    streams: int | None,
    window_bytes: int | None,
    mss_bytes: int | None,
    all_links: bool,
    max_alternatives: int,
    strict: bool,
) -> None:
    """Decide where each workload runs and what moves, with reasons.

    TCP settings come from the topology's `transfer:` section; the flags override them.
    """
    with _no_cyclic_gc():
        try:
            topology: Topology = load_topology(topology_file)
        except TopologyError as exc:
            _fail(exc, 2)
    overrides = {
        k: v
        for k, v in (("streams", streams), ("window_bytes", window_bytes), ("mss_bytes", mss_bytes))
        if v is not None
    }
    try:
        settings = TransferSettings.model_validate({**topology.transfer.model_dump(), **overrides})
        with _no_cyclic_gc():
            report = analyze(topology, settings)
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    except NetplanError as exc:
        _fail(exc, 2)
    if as_json:
        doc = report.to_json(max_alternatives=max_alternatives or None)
        click.echo(json.dumps(doc, indent=2))
    else:
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


@cli.command("plan")
@click.argument("topology_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=str),
              required=True, help="Where to write the plan JSON (- for stdout).")
def plan_command(topology_file: str, output: str) -> None:
    """Write the versioned plan (plan.json) that each site's transferd executes."""
    try:
        topology = load_topology(topology_file)
        plan = build_plan(topology, analyze(topology))
    except NetplanError as exc:
        _fail(exc, 2)
    text = plan.to_json_text()
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        click.echo(f"cannot write {output}: {exc}", err=True)
        sys.exit(2)
    entries = sum(len(s.sync) + len(s.checkpoints) for s in plan.sites)
    click.echo(f"wrote {output}: {len(plan.sites)} sites, {entries} sync/checkpoint entries "
               f"(schema_version {plan.schema_version})")


@cli.command("schema")
def schema_command() -> None:
    """Print the topology format's JSON Schema."""
    click.echo(json.dumps(Topology.model_json_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="netplan")
