"""The data plane's goals (issue 11) checked against the results files of one run: each goal,
what was measured (medians, ratios taken within one results file, i.e. one lab and one run), and
whether it is met; plus the summary table of every WAN scenario under both congestion controls.
A goal whose results are missing says so instead of passing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.report import medians

__all__ = ["Goal", "evaluate", "goals_markdown", "print_goals", "summary_markdown", "PEERS"]

PEERS = ("rsync", "rsync-zstd", "rclone")  # the tools people already use
WAN = ("clean-10ms", "cross-region-40ms", "lossy-0.5pct", "lossy-2pct", "edge-jitter",
       "link-flap")
CLEAN = ("clean-10ms", "cross-region-40ms")
CHUNK_BYTES = 8 * 2**20  # transferd's default chunk_size: what one re-sent chunk costs
RSS_LIMIT_MIB = 512
RSS_SCENARIO = "rss-10gib"
INTERACTIVE_SLACK_MS = 10.0


@dataclass(frozen=True)
class Goal:
    goal: str
    measured: str
    met: bool | None  # None: the results needed are missing


def _rows(doc: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(r["tool"], r["data"]): r for r in medians(doc)}


def _good(rows: dict[tuple[str, str | None], dict[str, Any]], tool: str,
          data: str | None) -> dict[str, Any] | None:
    row = rows.get((tool, data))
    return row if row is not None and row["goodput_mbit"] else None


def _best_peer(rows: dict[tuple[str, str | None], dict[str, Any]],
               data: str | None) -> dict[str, Any] | None:
    found = [r for p in PEERS if (r := _good(rows, p, data)) is not None]
    return max(found, key=lambda r: r["goodput_mbit"]) if found else None


def _ratio_goal(name: str, mine: dict[str, Any] | None, other: dict[str, Any] | None,
                floor: float) -> Goal:
    if mine is None or other is None:
        return Goal(name, "no result", None)
    ratio = mine["goodput_mbit"] / other["goodput_mbit"]
    return Goal(name, f"{mine['goodput_mbit']:.0f} vs {other['tool']} "
                f"{other['goodput_mbit']:.0f} Mbit/s: {ratio:.2f}x", ratio >= floor)


def _scenario_goals(doc: dict[str, Any], full: dict[str, Any] | None = None) -> list[Goal]:
    """The goals one results file decides; `full`: a full-size run of the same scenario and
    congestion control (`results/full-size/`), which decides the goals on the link's share
    when `doc` was a quick run (the ratios to the peers stay within `doc`)."""
    scenario, cc = doc["scenario"], doc.get("congestion_control")
    where = f"{scenario}, {cc}" + (" (quick)" if doc.get("quick") else "")
    rows = _rows(doc)
    datas = sorted({d for _t, d in rows if d})
    out: list[Goal] = []
    for data in datas:
        mine = _good(rows, "transferd", data)
        if scenario in WAN:
            best = _best_peer(rows, data)
            out.append(_ratio_goal(f"{where}: transferd >= 1.0x best of rsync, rsync-zstd, "
                                   "rclone", mine, best, 1.0))
            if scenario in CLEAN:
                out.append(_ratio_goal(f"{where}: transferd >= 0.95x iperf3 one stream", mine,
                                       _good(rows, "iperf3-1stream", None), 0.95))
            if scenario.startswith("lossy-") and cc == "bbr":
                out.append(_ratio_goal(f"{where}: transferd >= 1.2x best peer", mine, best, 1.2))
            if cc == "cubic" and scenario in ("lossy-0.5pct", "lossy-2pct"):
                out.append(_link_goal(where, scenario, mine, full, data))
                if scenario == "lossy-0.5pct":
                    for peer in ("rsync", "rclone"):
                        out.append(_ratio_goal(f"{where}: transferd >= 10x {peer}", mine,
                                               _good(rows, peer, data), 10.0))
            if scenario == "link-flap":
                out.append(_flap_goal(where, rows.get(("transferd", data))))
        if scenario == "loopback" and data == "incompressible":
            rclone = _good(rows, "rclone", data)
            out.append(_ratio_goal(f"{where}: transferd >= 1.15x rclone", mine, rclone, 1.15))
            out.append(_ratio_goal(f"{where}: transferd >= 0.65x the disk (dd oflag=direct)",
                                   mine, _good(rows, "disk-direct", data), 0.65))
            out.append(_cpu_goal(where, mine, rclone))
        if scenario == RSS_SCENARIO:
            out.append(_rss_goal(where, rows.get(("transferd", data))))
    if scenario == "interactive-during-bulk":
        out += _interactive_goals(where, rows)
    return out


def _link_goal(where: str, scenario: str, mine: dict[str, Any] | None,
               full: dict[str, Any] | None, data: str) -> Goal:
    floor = 70.0 if scenario == "lossy-0.5pct" else 40.0
    name = f"{where}: transferd >= {floor:.0f} % of the link"
    at = ""
    if full is not None and (row := _good(_rows(full), "transferd", data)) is not None:
        mine, at = row, f" (full size, {full.get('git_commit', '?')[:8]}, {row['n']} runs)"
        name = name.replace(" (quick)", "")
    pct = mine["link_pct"] if mine else None
    return Goal(name, "no result" if pct is None else f"{pct:.0f} %{at}",
                None if pct is None else pct >= floor)


def _cpu_goal(where: str, mine: dict[str, Any] | None, rclone: dict[str, Any] | None) -> Goal:
    name = f"{where}: transferd CPU-s/GiB <= 0.7x rclone's"
    if not mine or not rclone or not mine["cpu_s"] or not rclone["cpu_s"]:
        return Goal(name, "no result", None)
    per = [r["cpu_s"] / (r["bytes_logical"] / 2**30) for r in (mine, rclone)]
    return Goal(name, f"{per[0]:.2f} vs {per[1]:.2f}: {per[0] / per[1]:.2f}x",
                per[0] <= 0.7 * per[1])


def _flap_goal(where: str, row: dict[str, Any] | None) -> Goal:
    name = f"{where}: transferd completes, re-sent <= one chunk per stream"
    if row is None or not row["n_ok"]:
        return Goal(name, "did not complete" if row else "no result", False if row else None)
    resent, streams = row["resent_bytes"], row.get("streams")
    if resent is None or not streams:
        return Goal(name, f"completed {row['n_ok']}/{row['n']}; re-sent or stream count not "
                    "recorded", None)
    limit = CHUNK_BYTES * streams
    return Goal(name, f"{row['n_ok']}/{row['n']} completed; re-sent {resent / 2**20:.1f} MiB, "
                f"limit {streams} x 8 MiB", row["n_ok"] == row["n"] and resent <= limit)


def _rss_goal(where: str, row: dict[str, Any] | None) -> Goal:
    name = f"{where}: peak RSS of each daemon < {RSS_LIMIT_MIB} MiB"
    if row is None or row["peak_rss_mib"] is None:
        return Goal(name, "no result", None)
    return Goal(name, f"{row['peak_rss_mib']:.0f} MiB", row["peak_rss_mib"] < RSS_LIMIT_MIB)


def _interactive_goals(where: str,
                       rows: dict[tuple[str, str | None], dict[str, Any]]) -> list[Goal]:
    row = next((r for (t, _d), r in rows.items() if t == "transferd"), None)
    name = f"{where}: message p99 <= bare TCP echo p99 + {INTERACTIVE_SLACK_MS:g} ms"
    bulk = f"{where}: bulk keeps >= 85 % of the link"
    if row is None or row["p99_ms"] is None or row["echo_p99_ms"] is None:
        return [Goal(name, "no result", None), Goal(bulk, "no result", None)]
    p99, echo = row["p99_ms"], row["echo_p99_ms"]
    pct = row["link_pct"]
    return [Goal(name, f"{p99:.1f} vs echo {echo:.1f} ms", p99 <= echo + INTERACTIVE_SLACK_MS),
            Goal(bulk, "no result" if pct is None else f"{pct:.0f} %",
                 None if pct is None else pct >= 85)]


def evaluate(docs: Iterable[dict[str, Any]], full: Iterable[dict[str, Any]] = ()) -> list[Goal]:
    """Each file's goals; `full`: full-size runs (`results/full-size/`) that decide the link's
    share for a scenario whose file in `docs` is a quick run."""
    sized = {(d["scenario"], d.get("congestion_control")): d for d in full if not d.get("quick")}
    out: list[Goal] = []
    for doc in sorted(docs, key=lambda d: (d["scenario"], d.get("congestion_control") or "")):
        key = (doc["scenario"], doc.get("congestion_control"))
        out += _scenario_goals(doc, sized.get(key) if doc.get("quick") else None)
    return out


def _met(goal: Goal) -> str:
    return "no data" if goal.met is None else "yes" if goal.met else "**no**"


def goals_markdown(goals: list[Goal]) -> str:
    lines = ["| goal | measured | met? |", "|---|---|---|"]
    lines += [f"| {g.goal} | {g.measured} | {_met(g)} |" for g in goals]
    return "\n".join(lines) + "\n"


def print_goals(goals: list[Goal], console: Console | None = None) -> None:
    if not goals:
        return
    console = console or Console()
    table = Table(title="issue 11 goals (medians; ratios within one results file)",
                  title_justify="left")
    for name in ("goal", "measured", "met?"):
        table.add_column(name, overflow="fold")
    for g in goals:
        table.add_row(g.goal, g.measured, _met(g).replace("**", ""))
    console.print(table)


def summary_markdown(docs: Iterable[dict[str, Any]]) -> str:
    """Every scenario under each congestion control: transferd, the best peer, iperf3."""
    lines = ["| scenario | CC | transferd Mbit/s | best peer | iperf3 1 stream | x best peer "
             "| x iperf3 |", "|---|---|---:|---|---:|---:|---:|"]
    for doc in sorted(docs, key=lambda d: (d["scenario"], d.get("congestion_control") or "")):
        rows = _rows(doc)
        for data in sorted({d for _t, d in rows if d}):
            mine = _good(rows, "transferd", data)
            best = _best_peer(rows, data)
            iperf = _good(rows, "iperf3-1stream", None)
            lines.append(
                f"| {doc['scenario']}{'' if len({d for _t, d in rows if d}) == 1 else ' ' + data}"
                f" | {doc.get('congestion_control')} "
                f"| {_num(mine)} | {_num(best)}{' (' + best['tool'] + ')' if best else ''} "
                f"| {_num(iperf)} | {_x(mine, best)} | {_x(mine, iperf)} |")
    return "\n".join(lines) + "\n"


def _num(row: dict[str, Any] | None) -> str:
    return "-" if row is None else f"{row['goodput_mbit']:.0f}"


def _x(mine: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
    if mine is None or other is None:
        return "-"
    return f"{mine['goodput_mbit'] / other['goodput_mbit']:.2f}x"
