"""`netplan whatif` in the terminal: a few scenarios in detail (every workload before and
after, failover of inference clients and training runs, vector indexes, sync), many as a
ranking of the ones that hurt most and the single points of failure. Rendering only: the
numbers come from `netplan.whatif.WhatifResult`, the same object `--json` prints.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from netplan.cli import _table
from netplan.decisions import duration, money
from netplan.whatif import DecisionSummary, ScenarioResult, WhatifResult

__all__ = ["render"]

# Up to this many scenarios each is shown in full; beyond, the ranking and --json.
_DETAILED = 3


def _cell(d: DecisionSummary, path: bool = False) -> str:
    if not d.feasible:
        return "infeasible" if d.action == "none" else d.where()
    parts = [d.where() + (f" via {' -> '.join(d.path)}" if path and len(d.path) > 1 else "")]
    if d.total_usd is not None:
        parts.append(money(d.total_usd))
    if d.completion_hours is not None:
        parts.append(duration(d.completion_hours))
    return ", ".join(parts)


def _delta(usd: float) -> str:
    if abs(usd) < 0.005:
        return "-"
    return ("+" if usd > 0 else "-") + money(abs(usd))


def _header(result: WhatifResult, console: Console, run: dict[str, Any]) -> None:
    st = result.stats()
    what = f"sweep {result.sweep}, " if result.sweep else ""
    workers = f" x{run['workers']}" if run.get("workers", 1) > 1 else ""
    console.print(
        f"[bold]netplan whatif[/bold]: {result.topology}  ({what}{st['scenarios']:,} "
        f"scenario{'s' if st['scenarios'] != 1 else ''}: {st['scenarios_evaluated']:,} "
        f"evaluated, {st['scenarios_skipped']:,} reach nothing the plan uses; "
        f"{st['workloads_replanned']:,} workload decision"
        f"{'s' if st['workloads_replanned'] != 1 else ''} re-planned, "
        f"{st['workloads_skipped']:,} kept; {run['executor']}{workers}, {run['seconds']:.1f} s)")


def _scenario(result: WhatifResult, r: ScenarioResult, console: Console) -> None:
    console.print(Text.assemble(("Scenario: ", "bold"), (r.scenario.name, "bold cyan")))
    if r.error:
        console.print(Text(f"  could not be evaluated: {r.error}", style="red"))
        return
    for _, why in r.lost:
        console.print(Text(f"  lost: {why}", style="red"))
    for ident, old, new in r.rehomed:
        console.print(f"  {ident}: served from its copy at {new} ({old} failed)")
    for note in r.notes:
        console.print(Text(f"  {note}", style="yellow"))
    changed = {c.workload: c for c in r.changes}
    table = _table("Workloads: before -> after", "workload", "before", "after", "cost",
                   "status", right=("cost",))
    for before in result.baseline:
        c = changed.get(before.workload)
        if c is None:
            table.add_row(before.workload, _cell(before), Text("unchanged", style="dim"), "-",
                          "replanned" if before.workload in r.replanned else "not reached")
            continue
        style = {"lost": "bold red", "recovered": "bold green"}.get(c.status, "yellow")
        moved = c.after.path != before.path
        table.add_row(before.workload, _cell(before, moved), _cell(c.after, moved),
                      _delta(c.cost_delta_usd),
                      Text(c.status, style=style))
    table.print(console)
    for c in r.changes:
        if not c.after.feasible:
            console.print(Text.assemble((f"{c.workload}: ", "bold red"), c.after.reason))
    for f in r.inference:
        clients = _table(f"Inference failover: {f.workload} (replicas "
                         f"{', '.join(f.replicas_before)}; left: "
                         f"{', '.join(f.replicas_left) or 'none'})", "client", "served by",
                         "p99 ms",
                         "budget ms", "", right=("p99 ms", "budget ms"))
        for ci in f.clients:
            clients.add_row(ci.client, ci.site or "-",
                            "-" if ci.p99_ms is None else f"{ci.p99_ms:.1f}",
                            f"{ci.budget_ms:g}",
                            Text("misses", style="bold red") if ci.misses else "ok")
        clients.print(console)
    _training(r, console)
    _indexes(r, console)
    for p in r.sync_problems:
        console.print(Text(f"sync: {p}", style="red"))
    if abs(r.sync_cost_delta_usd_per_day) > 0.005:
        console.print(f"sync plan cost: {_delta(r.sync_cost_delta_usd_per_day)}/day")
    if not r.has_effect:
        console.print(Text("  no effect: every decision, sync transfer and shard replica "
                           "stays as planned", style="green"))


def _training(r: ScenarioResult, console: Console) -> None:
    for t in r.failovers:
        dl = f", deadline {t.deadline_hours:g} h" if t.deadline_hours is not None else ""
        if not t.standbys:
            console.print(Text.assemble((f"Training failover: {t.workload}: ", "bold red"),
                                        t.recommendation or "nowhere to resume"))
            continue
        grid = _table(f"Training failover: {t.workload} ({t.failed_site} fails "
                      f"{duration(t.progress_hours)} into its compute, "
                      f"{duration(t.elapsed_hours)} after the job started{dl}; "
                      f"best {len(t.standbys)} of {t.standbys_considered} standby sites)",
                      "#", "site", "RPO", "RTO", "compute", "finish", "cost", "deadline",
                      "what it holds and restores",
                      right=("#", "RPO", "RTO", "compute", "finish", "cost"))
        for n, s in enumerate(t.standbys, 1):
            if not s.feasible:
                grid.add_row(str(n), s.site, "-", "-", "-", "-", "-", "-", s.why)
                continue
            grid.add_row(str(n), s.site, duration(s.lost_hours), duration(s.restore_hours),
                         duration(s.compute_hours), duration(s.finish_hours), money(s.cost_usd),
                         Text("meets", style="green") if s.meets_deadline
                         else Text("misses", style="bold red"), s.why)
        grid.print(console)
        if t.recommendation:
            console.print(Text.assemble(("  recommendation: ", "bold"), t.recommendation))


def _indexes(r: ScenarioResult, console: Console) -> None:
    for ix in r.shards:
        parts = []
        if ix.lost_shards:
            parts.append(f"shards {_ranges(ix.lost_shards)} have no replica left")
        if ix.below_replicas_min:
            parts.append(f"shards {_ranges(ix.below_replicas_min)} are below replicas_min")
        parts += [f"misses: {m}" for m in ix.querying_misses]
        now = ("re-planned: " + ix.replanned_reason if ix.replanned_feasible
               else "no placement fits now: " + ix.replanned_reason)
        style = "red" if not ix.replanned_feasible or ix.querying_misses else "yellow"
        console.print(Text.assemble((f"Vector index {ix.index}: ", f"bold {style}"),
                                    "; ".join([*parts, now])))


def _ranges(items: tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = items[0]
    for k in (*items[1:], None):
        if k is not None and k == prev + 1:
            prev = k
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return ", ".join(out)


def _ranking(result: WhatifResult, console: Console, top: int) -> None:
    ranked = result.ranking
    if not ranked:
        console.print(Text("No scenario loses a workload, misses a budget or costs more.",
                           style="green"))
        return
    table = _table(f"Scenarios that hurt most ({min(top, len(ranked))} of {len(ranked)}; "
                   "--json has every scenario)", "scenario", "lost", "budget misses", "cost",
                   "sync $/day", "what breaks",
                   right=("lost", "budget misses", "cost", "sync $/day"))
    for r in ranked[:top]:
        lost = (*r.workloads_lost, *r.indexes_lost)
        first = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
        if not first:
            misses = r.budget_miss_texts()
            moved = [c.workload for c in r.changes]
            first = (misses[0] + (f" and {len(misses) - 1} more" if len(misses) > 1 else "")
                     if misses else ("re-planned: " + ", ".join(moved[:4])) if moved
                     else "; ".join(r.sync_problems[:1]))
        table.add_row(r.scenario.name, str(len(lost)), str(r.budget_misses),
                      _delta(r.cost_delta_usd), _delta(r.sync_cost_delta_usd_per_day), first)
    table.print(console)


def _spofs(result: WhatifResult, console: Console) -> None:
    if not result.single_points_of_failure:
        if result.sweep:
            console.print(Text("No single site or link failure loses a workload or a vector "
                               "index.", style="green"))
        return
    table = _table("Single points of failure (their loss alone breaks these, with no "
                   "alternative)", "element", "breaks", "why (first)")
    for p in result.single_points_of_failure:
        table.add_row(p.element, ", ".join(p.breaks), p.why[0] if p.why else "")
    table.print(console)


def render(result: WhatifResult, console: Console, run: dict[str, Any], top: int) -> None:
    _header(result, console, run)
    if len(result.scenarios) <= _DETAILED:
        for r in result.scenarios:
            _scenario(result, r, console)
    if len(result.scenarios) > 1:
        _ranking(result, console, top)
        _spofs(result, console)
