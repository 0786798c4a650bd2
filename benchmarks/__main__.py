"""`python -m benchmarks run SCENARIO... [--quick] [--output DIR]`: run scenarios on emulated
links, print the comparison, write results/<scenario>.json and the plots. Ctrl-C and SIGTERM tear
the lab down before exiting.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console

from benchmarks.backends import BACKENDS, BackendChoice, probe_backend
from benchmarks.errors import BenchError
from benchmarks.goals import evaluate, goals_markdown, print_goals, summary_markdown
from benchmarks.report import (
    PLOTS_NEED,
    load_results,
    markdown,
    plot_all,
    print_table,
    write_results,
)
from benchmarks.runner import run_scenario
from benchmarks.scenario import SCENARIO_DIR, load_scenario

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
FULL_SIZE = "full-size"  # beside the results: full-size runs of scenarios kept there as quick runs


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every Lab's teardown


@click.group()
def cli() -> None:
    """Network impairment benchmarks: transferd against iperf3, rsync and rclone."""


@cli.command()
@click.argument("scenarios", nargs=-1, required=True)
@click.option("--quick", is_flag=True, help="Small data: each scenario in about a minute.")
@click.option("--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Where results/<scenario>.json and the plots go.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Runs per tool; the table shows medians.")
@click.option("--tools", default=None, help="Comma-separated subset of each scenario's tools.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=None,
              help="Force an impairment backend instead of probing.")
@click.option("--cc", "ccs", default=None,
              help="Comma-separated congestion controls to run (default: each scenario's own, "
              "cubic and bbr on a link).")
def run(scenarios: tuple[str, ...], quick: bool, output: Path, repeat: int,
        tools: str | None, backend: str | None, ccs: str | None) -> None:
    """Run SCENARIOS (names in benchmarks/scenarios/ or YAML paths)."""
    console = Console() if sys.stdout.isatty() else Console(width=200)
    signal.signal(signal.SIGTERM, _sigterm)
    command = "python -m benchmarks " + shlex.join(sys.argv[1:])
    try:
        loaded = [load_scenario(name) for name in scenarios]
        if tools:
            wanted = [t.strip() for t in tools.split(",") if t.strip()]
            loaded = [s.model_copy(update={"tools": tuple(t for t in s.tools if t in wanted)})
                      for s in loaded]
        choice = probe_backend()
        if backend and backend != choice.name:
            choice = BackendChoice(backend, (*choice.reasons, f"{backend}: forced by --backend"),
                                   rule_tool=choice.rule_tool or "iptables")
        found = "; ".join(choice.reasons)
        console.print(f"impairment backend: [bold]{choice.name}[/bold] ({found})")
        only = [c.strip() for c in ccs.split(",") if c.strip()] if ccs else None
        docs = []
        for scenario in loaded:
            for cc in only or scenario.ccs:
                doc = run_scenario(scenario, choice, quick=quick, repeat=repeat, command=command,
                                   congestion_control=cc, log=console.print)
                path = write_results(doc, output)
                print_table(doc, console)
                console.print(f"wrote {path}")
                docs.append(doc)
        print_goals(evaluate(docs), console)
        _plots(output, console)
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: lab torn down[/yellow]")
        sys.exit(130)


# What must agree for runs of one scenario made in several invocations to share a table.
SAME_LAB = ("scenario", "congestion_control", "backend", "quick", "kernel", "cpus")


@cli.command()
@click.argument("parts", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Where the merged results/<scenario>.json goes.")
def merge(parts: tuple[Path, ...], output: Path) -> None:
    """One results file from PARTS: runs of the same scenario, congestion control and backend
    made in several invocations (a run set longer than one hold of the bench lock: lossy
    cubic's rsync takes ~450 s a run). Each part's command, date and commit are kept under
    `parts`; the median of a tool is over all its runs."""
    docs = [json.loads(p.read_text()) for p in parts]
    first = docs[0]
    for path, doc in zip(parts, docs, strict=True):
        for key in SAME_LAB:
            if doc.get(key) != first.get(key):
                raise click.ClickException(f"{path}: {key} is {doc.get(key)!r}, "
                                           f"not {first.get(key)!r} as in {parts[0]}")
    merged = {**first, "runs": [run for doc in docs for run in doc["runs"]],
              "repeat": max(doc["repeat"] for doc in docs),
              "command": " && ".join(doc["command"] for doc in docs),
              "date_utc": max(doc["date_utc"] for doc in docs),
              "parts": [{key: doc.get(key) for key in ("command", "date_utc", "git_commit",
                                                        "measured_rtt_ms")} for doc in docs],
              "error": "; ".join(doc["error"] for doc in docs if doc.get("error")) or None}
    console = Console() if sys.stdout.isatty() else Console(width=200)
    path = write_results(merged, output)
    print_table(merged, console)
    console.print(f"wrote {path}")


@cli.command()
@click.option("--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Where the results are.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Markdown tables (for README).")
@click.option("--html", "html_file", is_flag=False, flag_value="", default=None,
              type=click.Path(dir_okay=False, path_type=str), metavar="[FILE]",
              help="Also write the results as one self-contained HTML page (FILE, or "
              "report.html beside the results).")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("NB_KEEP_LOGS") or None,
              help="Daemon logs kept by a run (NB_KEEP_LOGS=DIR): the page charts the stream "
              "controller's decisions. [default: $NB_KEEP_LOGS]")
def report(output: Path, as_markdown: bool, html_file: str | None, logs: Path | None) -> None:
    """Print the tables of existing results and the goals again, and redraw the plots."""
    console = Console() if sys.stdout.isatty() else Console(width=200)
    docs = load_results(output)
    if html_file is not None:
        _html(docs, Path(html_file) if html_file else output / "report.html", logs)
    if as_markdown:
        click.echo(summary_markdown(docs))
        click.echo(goals_markdown(evaluate(docs, load_results(output / FULL_SIZE))))
    for doc in docs:
        if as_markdown:
            click.echo(markdown(doc))
        else:
            print_table(doc, console)
    if not as_markdown:
        print_goals(evaluate(docs, load_results(output / FULL_SIZE)), console)
    _plots(output, console)


@cli.command()
@click.option("--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="Where the results are.")
@click.option("--markdown", "as_markdown", is_flag=True, help="A Markdown table.")
def goals(output: Path, as_markdown: bool) -> None:
    """The data plane's goals against the results: goal, measured, met?"""
    found = evaluate(load_results(output), load_results(output / FULL_SIZE))
    if as_markdown:
        click.echo(goals_markdown(found))
    else:
        print_goals(found, Console() if sys.stdout.isatty() else Console(width=200))


def _html(docs: list[dict[str, Any]], path: Path, logs: Path | None) -> None:
    """The page, written whole (a temporary file renamed into place); plotly and Jinja2 load
    only here."""
    try:
        from benchmarks.html_report import benchmarks_page, load_stream_logs
    except ImportError as exc:
        click.echo(f"--html needs plotly and jinja2 ({exc}): pip install -e '.[html]'",
                   err=True)
        sys.exit(2)
    changes = load_stream_logs(logs) if logs is not None and logs.is_dir() else []
    page = benchmarks_page(docs, changes, logs=str(logs) if logs else None,
                           generator="python -m benchmarks " + shlex.join(sys.argv[1:]))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        click.echo(f"cannot write {path}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {path}: {len(page.encode()) / 1e6:.1f} MB, {len(docs)} results files, "
               f"{len(changes)} stream decisions", err=True)


def _plots(output: Path, console: Console) -> None:
    written = plot_all(output)
    if written is None:
        console.print(f"no plots: {PLOTS_NEED}", markup=False)
        return
    for path in written:
        console.print(f"wrote {path}")


@cli.command("list")
def list_scenarios() -> None:
    """List the shipped scenarios."""
    for path in sorted(SCENARIO_DIR.glob("*.yaml")):
        scenario = load_scenario(str(path))
        click.echo(f"{scenario.scenario:26} {scenario.description}")


if __name__ == "__main__":
    cli()
