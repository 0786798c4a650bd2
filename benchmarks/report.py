"""Results out: results/<scenario>.json (the issue's format plus context), a rich table with
medians and side-by-side ratios, and PNG plots (goodput per tool per scenario; latency CDFs).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["PLOTS_NEED", "load_results", "markdown", "medians", "plot_all", "print_table",
           "results_name", "write_results"]

# The baseline each tool is compared with, side by side, in the table's last column.
CEILING = "iperf3-1stream"


# What `plot_all` needs, said once where a run without it prints its tables.
PLOTS_NEED = "plots need matplotlib: pip install -e '.[bench]'"


def results_name(doc: dict[str, Any]) -> str:
    """`<scenario>.<congestion control>`: one results file per scenario and algorithm (or
    the name the document gives itself: `relay-3site`, which runs one algorithm)."""
    named: str | None = doc.get("results_name")
    return named or f"{doc['scenario']}.{doc.get('congestion_control') or 'default'}"


def write_results(doc: dict[str, Any], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{results_name(doc)}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_results(output: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(output.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(doc, dict) and "scenario" in doc and "runs" in doc:
            docs.append(doc)
    return docs


def _median(values: Iterable[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def medians(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (tool, data): medians over the ok repetitions; errors listed when none ok."""
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for run in doc["runs"]:
        groups.setdefault((run["tool"], run.get("data")), []).append(run)
    rows = []
    for (tool, data), runs in groups.items():
        ok = [r for r in runs if r["ok"]]
        row: dict[str, Any] = {"tool": tool, "data": data, "n_ok": len(ok), "n": len(runs)}
        for key in ("goodput_mbit", "link_pct", "sustained_mbit", "sustained_link_pct", "seconds",
                    "bytes_on_wire", "cpu_s", "p50_ms", "p99_ms", "bytes_logical", "resent_bytes",
                    "emulator_cpu_pct", "streams"):
            row[key] = _median(r.get(key) for r in ok)
        for key in ("daemon_p50_ms", "daemon_p99_ms", "echo_p50_ms", "echo_p99_ms"):
            row[key] = _median((r.get("messages") or {}).get(key) for r in ok)
        # Event-loop ticks 50 ms or more late, summed over both daemons: median over the runs.
        row["loop_late_50ms"] = _median(
            sum((v or {}).get("late_50ms", 0) for v in lag.values()) if lag else None
            for r in ok
            for lag in [(r.get("messages") or {}).get("loop_late")]
        )
        row["client_late_20ms"] = _median(
            ((r.get("messages") or {}).get("client_loop_late") or {}).get("late_20ms")
            for r in ok
        )
        rss = [max(r["peak_rss_mib"].values()) for r in ok if r.get("peak_rss_mib")]
        row["peak_rss_mib"] = max(rss) if rss else None
        errors = sorted({r["error"] for r in runs if r.get("error")})
        row["error"] = "; ".join(errors) if errors else None
        rows.append(row)
    return rows


def ratios(doc: dict[str, Any], subject: str = "transferd") -> list[str]:
    """Side by side, per data set: `subject`'s median goodput over each other tool's on the same
    data (and over the iperf3 ceilings), and its bytes on the wire over the file size."""
    rows = medians(doc)
    out = []
    for data in sorted({r["data"] for r in rows if r["data"]}):
        mine = next((r for r in rows if r["tool"] == subject and r["data"] == data), None)
        if mine is None or mine["goodput_mbit"] is None:
            continue
        parts = [f"{mine['goodput_mbit'] / other['goodput_mbit']:.2f}x {other['tool']}"
                 for other in rows
                 if other is not mine and other["goodput_mbit"]
                 and other["data"] in (data, None)]
        wire = (f"; wire/logical {mine['bytes_on_wire'] / mine['bytes_logical']:.2f}"
                if mine["bytes_on_wire"] and mine["bytes_logical"] else "")
        out.append(f"{subject} on {data}: " + ", ".join(parts) + wire)
    for row in rows:
        if row["p99_ms"] is None:
            continue
        line = (f"{row['tool']}: messages p50/p99 {_fmt(row['p50_ms'], '.1f')}/"
                f"{_fmt(row['p99_ms'], '.1f')} ms")
        if row["daemon_p99_ms"] is not None:
            line += (f" (inside the sending daemon {_fmt(row['daemon_p50_ms'], '.1f')}/"
                     f"{_fmt(row['daemon_p99_ms'], '.1f')} ms)")
        if row["echo_p99_ms"] is not None:
            line += (f"; a bare TCP echo under the same load {_fmt(row['echo_p50_ms'], '.1f')}/"
                     f"{_fmt(row['echo_p99_ms'], '.1f')} ms")
        if row["loop_late_50ms"] is not None:
            line += (f"; the daemons' event loops ran {row['loop_late_50ms']:.0f} timer ticks "
                     "50 ms or more late")
        if row["client_late_20ms"] is not None:
            line += (f"; the message client's loop {row['client_late_20ms']:.0f} ticks 20 ms or "
                     "more late")
        out.append(line)
    return out


def _counts(sizes: set[int]) -> str:
    return (str(min(sizes)) if len(sizes) == 1 else f"{min(sizes)}-{max(sizes)}") if sizes else "0"


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    link = doc["link"]
    rate = f"{link['rate_mbit']:g} Mbit/s" if link["rate_mbit"] else "no cap"
    title = (f"{doc['scenario']}: {rate}, {link['delay_ms']:g} ms one-way, jitter "
             f"{link['jitter_ms']:g} ms, loss {link['loss_pct']:g} %; RTT measured "
             f"{doc['measured_rtt_ms'] if doc['measured_rtt_ms'] is not None else '-'} ms; "
             f"{doc['backend']}, {doc['congestion_control']}, kernel {doc['kernel']}"
             + (" (quick)" if doc.get("quick") else ""))
    table = Table(title=title, title_justify="left")
    for name in ("tool", "data", "ok", "Mbit/s", "% link", "sust. % link", "s", "wire MiB",
                 "wire/logical",
                 "CPU s", "p50 ms", "p99 ms", "RSS MiB", f"x {CEILING}", "error"):
        table.add_column(name, overflow="fold")
    rows = medians(doc)
    ceiling = next((r["goodput_mbit"] for r in rows if r["tool"] == CEILING), None)
    for row in rows:
        ratio = (row["goodput_mbit"] / ceiling
                 if ceiling and row["goodput_mbit"] is not None else None)
        wire_ratio = (row["bytes_on_wire"] / row["bytes_logical"]
                      if row["bytes_on_wire"] and row["bytes_logical"] else None)
        table.add_row(
            row["tool"], row["data"] or "-", f"{row['n_ok']}/{row['n']}",
            _fmt(row["goodput_mbit"], ".0f"), _fmt(row["link_pct"], ".0f"),
            _fmt(row["sustained_link_pct"], ".0f"), _fmt(row["seconds"], ".1f"),
            _fmt(row["bytes_on_wire"] / 2**20 if row["bytes_on_wire"] else None, ".0f"),
            _fmt(wire_ratio, ".2f"), _fmt(row["cpu_s"], ".1f"), _fmt(row["p50_ms"], ".1f"),
            _fmt(row["p99_ms"], ".1f"), _fmt(row["peak_rss_mib"], ".0f"), _fmt(ratio, ".2f"),
            (row["error"] or "")[:160],
        )
    console.print(table)
    for line in ratios(doc):
        console.print(line)
    if doc.get("error"):
        console.print(f"[red]{doc['scenario']}: {doc['error']}[/red]")


def markdown(doc: dict[str, Any]) -> str:
    """The scenario's medians as a Markdown table (what benchmarks/README.md shows)."""
    link = doc["link"]
    rate = f"{link['rate_mbit']:g} Mbit/s" if link["rate_mbit"] else "no rate cap"
    lines = [
        f"### {doc['scenario']}, {doc.get('congestion_control')}"
        + (" (quick sizes)" if doc.get("quick") else ""),
        "",
        f"{rate}, {link['delay_ms']:g} ms one-way, jitter {link['jitter_ms']:g} ms, loss "
        f"{link['loss_pct']:g} %; TCP echo RTT {doc['measured_rtt_ms'] or '-'} ms; backend "
        f"`{doc['backend']}`, congestion control `{doc['congestion_control']}`, kernel "
        f"{doc['kernel']}, {doc.get('cpus')} CPUs, {doc.get('date_utc')}. Medians of "
        f"{doc.get('repeat', 1)} runs. Command: `{doc.get('command')}`",
        "",
        "| tool | data | ok | Mbit/s | % link | sustained Mbit/s | s | wire/logical | CPU s "
        f"| p50 ms | p99 ms | peak RSS MiB | re-sent KiB | x {CEILING} | error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = medians(doc)
    ceiling = next((r["goodput_mbit"] for r in rows if r["tool"] == CEILING), None)
    for row in rows:
        ratio = (row["goodput_mbit"] / ceiling
                 if ceiling and row["goodput_mbit"] is not None else None)
        wire = (row["bytes_on_wire"] / row["bytes_logical"]
                if row["bytes_on_wire"] and row["bytes_logical"] else None)
        lines.append(
            f"| {row['tool']} | {row['data'] or '-'} | {row['n_ok']}/{row['n']} "
            f"| {_fmt(row['goodput_mbit'], '.0f')} | {_fmt(row['link_pct'], '.0f')} "
            f"| {_fmt(row['sustained_mbit'], '.0f')} | {_fmt(row['seconds'], '.1f')} "
            f"| {_fmt(wire, '.2f')} | {_fmt(row['cpu_s'], '.1f')} "
            f"| {_fmt(row['p50_ms'], '.1f')} | {_fmt(row['p99_ms'], '.1f')} "
            f"| {_fmt(row['peak_rss_mib'], '.0f')} "
            f"| {_fmt(_kib(row['resent_bytes']), '.0f')} "
            f"| {_fmt(ratio, '.2f')} "
            f"| {(row['error'] or '').replace('|', '/')} |")
    found = ratios(doc)
    if found:
        lines += ["", *[f"- {line}" for line in found]]
    if doc.get("error"):
        lines += ["", f"Scenario error: {doc['error']}"]
    return "\n".join(lines) + "\n"


def plot_all(output: Path) -> list[Path] | None:
    """goodput.png (every scenario's tools, medians) and latency-cdf.png (TCP echo RTT samples
    per scenario, and interactive message latencies where a run has them). None when
    matplotlib is not installed (the `bench` extra): the tables do not need it."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = load_results(output)
    written: list[Path] = []
    if not docs:
        return written
    per_doc = [[r for r in medians(doc) if r["goodput_mbit"] is not None] for doc in docs]
    heights = [max(len(rows), 1) for rows in per_doc]
    fig, axes = plt.subplots(len(docs), 1, figsize=(9, 0.9 * len(docs) + 0.3 * sum(heights)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, doc, rows in zip(axes[:, 0], docs, per_doc, strict=True):
        labels = [r["tool"] + (f" ({r['data']})" if r["data"] else "") for r in rows]
        values = [r["goodput_mbit"] for r in rows]
        colors = ["tab:orange" if r["tool"].startswith("transferd") else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        rate = doc["link"]["rate_mbit"]
        if rate:
            ax.axvline(rate, color="tab:red", linestyle="--", linewidth=1, label="link rate")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{results_name(doc)} ({doc['backend']}"
                     + (", quick" if doc.get("quick") else "") + ")", fontsize=9)
        ax.set_xlabel("goodput, Mbit/s (median)", fontsize=8)
    fig.tight_layout()
    path = output / "goodput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(12, 5.5))
    plotted = False
    echoes: set[int] = set()
    messages: set[int] = set()
    for doc in docs:
        name = results_name(doc)
        echo = doc.get("rtt_samples_ms") or []
        series = [(f"{name} idle TCP echo RTT (n={len(echo)})", echo, echoes)]
        series += [(f"{name} {r['tool']} messages (n={len(r['latencies_ms'])})",
                    r["latencies_ms"], messages) for r in doc["runs"] if r.get("latencies_ms")]
        for label, samples, counts in series:
            if not samples:
                continue
            xs = sorted(samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=label)
            counts.add(len(xs))
            plotted = True
    if plotted:
        ax.set_xlabel("latency, ms")
        ax.set_ylabel("fraction <= x")
        # Say what is drawn: a few dozen echo samples per link, and message latencies only
        # where a scenario sent messages.
        title = f"Latency CDFs: idle TCP echo RTT per link ({_counts(echoes)} samples each)"
        if messages:
            title += (f"\nand interactive messages under bulk ({_counts(messages)} per run)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot
        fig.tight_layout()
        path = output / "latency-cdf.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)
    return written
