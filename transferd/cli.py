"""The transferd command line: serve, send, status, message, inbox, keygen.

Only this module turns errors into text and exit codes: 0 ok, 1 transfer failed, 2 bad config
or usage, 3 policy violation, 4 authentication refused, 5 daemon unreachable. With --json an
error is one JSON object on stdout too (`{"error", "kind", "exit_code"}`), so a script that
parses stdout never meets plain text.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from transferd.errors import (
    AuthError,
    ConfigError,
    PolicyViolation,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
)

# Each command imports what it uses, when it runs: `transferd send --wait` is timed by its wall
# clock (benchmarks/tools.py), and the config and wire models, the plan, rich and the daemon's
# modules would otherwise be paid by every command (`--help` included) before its first line.
if TYPE_CHECKING:
    from rich.progress import Progress

    from transferd.client_settings import ClientSettings
    from transferd.config import SiteConfig
    from transferd.net.local_http import JobOutcome, LocalClient
    from transferd.plan import PlanRun
    from transferd.protocol.local_api import JobStatus
    from transferd.site.threads import BulkPriority

__all__ = ["main"]

T = TypeVar("T")

EXIT_FAILED, EXIT_CONFIG, EXIT_POLICY, EXIT_AUTH, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
STARTUP_GRACE_S = 5.0


def _exit_code(exc: TransferdError) -> int:
    return {
        ConfigError: EXIT_CONFIG,
        PolicyViolation: EXIT_POLICY,
        AuthError: EXIT_AUTH,
        TransportError: EXIT_UNREACHABLE,
    }.get(type(exc), EXIT_FAILED)


def _fail(exc: TransferdError, as_json: bool = False) -> NoReturn:
    code = _exit_code(exc)
    click.echo(f"transferd: {exc.kind} error: {exc}", err=True)
    if as_json:
        click.echo(json.dumps({"error": str(exc), "kind": exc.kind, "exit_code": code}))
    sys.exit(code)


def _config(path: str, as_json: bool = False) -> SiteConfig:
    from transferd.client_settings import save_client_settings
    from transferd.config import load_config_and_text

    try:
        config, text = load_config_and_text(path)
    except ConfigError as exc:
        _fail(exc, as_json)
    save_client_settings(path, config, text)  # the first client after this finds them
    return config


def _client_config(path: str, as_json: bool = False) -> ClientSettings:
    """What a client command needs of the config: cached for a file that validated before
    (`transferd.client_settings`), validated in full otherwise (the same errors)."""
    from transferd.client_settings import client_settings

    try:
        return client_settings(path)
    except ConfigError as exc:
        _fail(exc, as_json)


def _run(coro: Any) -> Any:
    import asyncio

    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@click.group()
@click.version_option(package_name="netplan-transferd", prog_name="transferd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """transferd: replicate files, datasets and checkpoints between sites."""
    if ctx.invoked_subcommand != "serve":
        _quick_exit()


def _quick_exit() -> None:
    """A client command leaves without a last garbage collection over every object its
    imports made: the interpreter's shutdown collection of pydantic's schemas and the wire
    models cost ~22 ms per `transferd send` (measured: 25 ms from the last line printed to the
    exit seen by the caller, 7 ms with this). atexit runs before that collection; buffered
    output is still flushed and atexit handlers still run. Not for `serve`, whose shutdown
    may rely on finalizers."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def _keep_heap_warm() -> None:
    """Ask glibc to keep freed heap memory instead of returning it to the kernel.

    Every received body arrives as a series of 64-256 KiB pieces; with the default trim rules
    the heap top is handed back and re-faulted over and over, and on VMs that back guest memory
    lazily each fresh page costs more than the copy into it (measured: ~0.2 s of kernel time per
    GiB received). Peak RSS is unchanged (pieces are freed as fast as they arrive)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_trim_threshold, 256 * 1024 * 1024)
    mallopt(m_top_pad, 64 * 1024 * 1024)
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)


GIL_SWITCH_S = 0.0005


def _short_gil_turns() -> None:
    """Hand the GIL over after 0.5 ms instead of CPython's 5 ms.

    The event loop (control requests, interactive messages) shares the interpreter with the
    bulk threads. Those spend most of their time in calls that release the GIL (sendfile,
    recv_into, blake3, zstd, pwrite), but each takes it back between calls; a loop thread that
    wants it then waits a whole switch interval, and again at its next system call. Measured
    on interactive-during-bulk: loop stalls of 20-140 ms in the sending daemon."""
    sys.setswitchinterval(GIL_SWITCH_S)


def _loop_priority(wanted: str) -> None:
    """The daemon's event loop (this thread) at real-time priority where the host allows it
    (`traffic.loop_priority`); one log line says which policy is in effect and why."""
    import logging

    from transferd.site.threads import raise_loop_priority

    logging.getLogger("transferd.daemon").info(
        "loop.priority", extra={"fields": {"policy": raise_loop_priority(wanted)}}
    )


def _bulk_priority(wanted: BulkPriority) -> None:
    """The policy of the daemon's bulk threads (`traffic.bulk_priority`), logged once."""
    import logging

    from transferd.site.threads import set_bulk_priority

    logging.getLogger("transferd.daemon").info(
        "bulk.priority", extra={"fields": {"policy": set_bulk_priority(wanted)}}
    )


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(dir_okay=False),
    help="a `netplan plan` file: replicate this site's sync and checkpoint entries by itself",
)
def serve(config_path: str, plan_path: str | None) -> None:
    """Run this site's daemon until SIGTERM or SIGINT (then exit 0). SIGHUP re-reads the
    config and the plan and applies them without dropping a transfer (rate caps, weights,
    watch mode, the plan's routes); a config that cannot be applied live is refused and the
    daemon runs on as it was. Under systemd (Type=notify) it reports readiness, reloads and
    its stop on $NOTIFY_SOCKET."""
    from transferd.config import load_config
    from transferd.daemon import Daemon
    from transferd.site.log import setup_logging
    from transferd.site.notify import notify, reloading

    setup_logging()
    _keep_heap_warm()
    _short_gil_turns()
    config = _config(config_path)
    _loop_priority(config.traffic.loop_priority)
    _bulk_priority(config.traffic.bulk_priority)
    plan = None
    if plan_path is not None:
        try:
            plan = _load_plan(plan_path, config)
        except ConfigError as exc:
            _fail(exc)

    import asyncio
    import logging

    log = logging.getLogger("transferd.cli")

    def reload(daemon: Daemon) -> None:
        reloading()
        try:
            new_config = load_config(config_path)
            new_plan = _load_plan(plan_path, new_config) if plan_path is not None else None
        except ConfigError as exc:
            log.error("config.reload_failed", extra={"fields": {"error": exc.message}})
            refused = [exc.message]
        else:
            refused = daemon.reload(new_config, new_plan)
        status = ("reload refused: " + ", ".join(refused)[:200]) if refused else "reloaded"
        notify("READY=1", f"STATUS={status}; serving {daemon.url}")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        daemon = Daemon(config, plan=plan)
        loop.add_signal_handler(signal.SIGHUP, reload, daemon)

        def ready(d: Daemon) -> None:
            notify("READY=1", f"STATUS=serving {d.url}", f"MAINPID={os.getpid()}")

        try:
            await daemon.serve(stop, ready=ready)
        finally:
            notify("STOPPING=1")

    try:
        _run(run())
    except TransferdError as exc:
        _fail(exc)


def _load_plan(plan_path: str, config: SiteConfig) -> PlanRun:
    from transferd.plan import load_plan

    return load_plan(plan_path, config)


def _local_client(config: ClientSettings, as_json: bool = False) -> LocalClient:
    from transferd.net.local_http import LocalClient
    from transferd.protocol.auth import local_signer
    from transferd.site.keys import LocalSecret
    from transferd.site.tls import client_ssl_context

    try:
        own = LocalSecret.load(config.keys_path, config.site)
        return LocalClient(config.local_url, local_signer(own), client_ssl_context(config))
    except ConfigError as exc:
        _fail(exc, as_json)


def summarize(path: str, jobs: list[JobOutcome], seconds: float) -> dict[str, Any]:
    """The `send --wait --json` object: one line, the fields the benchmark harness reads.
    `bytes_on_wire` counts every body the jobs put on the wire, re-sent ones included;
    `retries` the requests sent again and the attempts made again after a wait."""
    failed = [j for j in jobs if j.state == "failed"]
    out: dict[str, Any] = {
        "path": path,
        "destinations": [j.dest for j in jobs],
        "state": "failed" if failed else "committed",
        "bytes_logical": max((j.bytes_logical for j in jobs), default=0),
        "bytes_on_wire": sum(j.bytes_on_wire for j in jobs),
        "chunks": max((j.chunks for j in jobs), default=0),
        "chunks_skipped": sum(j.chunks_skipped for j in jobs),
        "retries": sum(j.retries for j in jobs),
        "seconds": round(seconds, 3),
    }
    if failed:
        out["errors"] = [{"dest": j.dest, "kind": j.error_kind, "error": j.error} for j in failed]
    return out


def _failed_exit(jobs: list[JobOutcome]) -> int:
    kinds = {j.error_kind for j in jobs if j.state == "failed"}
    return EXIT_POLICY if kinds == {"policy"} else EXIT_AUTH if kinds == {"auth"} else EXIT_FAILED


@main.command()
@click.argument("path")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--to", "to", required=True, help="destination site(s), comma-separated")
@click.option("--wait", is_flag=True, help="wait until every destination has committed")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    help="seconds: a job not committed by then fails (whatever it waits for)",
)
@click.option(
    "--via",
    "via",
    default="",
    help="relay site(s) the bytes go through, in order, comma-separated (a manual route; the "
    "direct path is the fallback if a relay fails)",
)
@click.option(
    "--multipath",
    is_flag=True,
    help="with --via: send over the relayed path and the direct one at once, each chunk on "
    "the path that would finish it first",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def send(
    path: str,
    config_path: str,
    to: str,
    wait: bool,
    timeout_s: float | None,
    via: str,
    multipath: bool,
    as_json: bool,
) -> None:
    """Ask the local daemon to replicate PATH (relative to data_dir) to other sites."""
    from transferd.net.local_http import LocalRequest, job_ids
    from transferd.protocol.http_paths import LOCAL_SEND_ROUTE

    config = _client_config(config_path, as_json)
    dests = [d.strip() for d in to.split(",") if d.strip()]
    unknown = [d for d in dests if d not in config.peers]
    if unknown or not dests:
        problem = f"--to: not a peer in {config_path}: {', '.join(unknown) or '(none)'}"
        _fail(ConfigError(problem), as_json)
    relays = [r.strip() for r in via.split(",") if r.strip()]
    bad = [r for r in relays if r not in config.peers or r in dests]
    if bad:
        problem = f"--via: not a peer in {config_path}, or a destination: {', '.join(bad)}"
        _fail(ConfigError(problem), as_json)
    if multipath and not relays:
        _fail(ConfigError("--multipath: needs a relayed path (--via) beside the direct one"),
              as_json)
    rel = _relative_to_data_dir(config, path)
    try:
        rel.encode()
    except UnicodeEncodeError:  # a name given in bytes that are not UTF-8 (surrogate escapes)
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        _fail(StorageError(f"{shown}: the name is not UTF-8, which transferd cannot carry: "
                           "rename it", path=shown), as_json)

    started = time.monotonic()
    # A SendRequest as JSON, built without the models (the daemon validates it: a field it
    # does not know is refused); its answers are read without them too (`jobs_of`).
    send_jobs = json.dumps(
        {"path": rel, "to": dests, "timeout_s": timeout_s, "via": relays, "multipath": multipath}
    ).encode()
    request = LocalRequest("POST", LOCAL_SEND_ROUTE, job_ids, body=send_jobs, json=True)

    answered: list[float] = []  # when each jobs answer arrived, before it was parsed

    def send_and_poll(client: LocalClient) -> list[JobOutcome]:
        ids = _first_call(lambda: client.call(request))
        return _poll(client, ids, wait=wait, progress=wait and not as_json, answered=answered)

    jobs = _with_daemon(config, config_path, send_and_poll, as_json)
    # The job's time: until the answer that said it ended arrived, not what the CLI does
    # after (parsing, printing, its exit).
    seconds = answered[-1] - started
    failed = [j for j in jobs if j.state == "failed"]
    if as_json and not wait:
        # Queued, not done: nothing has moved yet, so no counters that could pass for a result.
        click.echo(json.dumps(
            {"path": rel, "destinations": dests, "state": "queued", "jobs": [j.id for j in jobs]}
        ))
    elif as_json:
        click.echo(json.dumps(summarize(rel, jobs, seconds)))
    elif not wait:
        for j in jobs:
            click.echo(f"queued {j.path} -> {j.dest} (job {j.id})")
    else:
        for j in jobs:
            click.echo(f"{j.state}: {j.path} -> {j.dest}" + (f" ({j.error})" if j.error else ""))
    for j in failed:
        click.echo(f"transferd: {j.error_kind} error: {j.error}", err=True)
    if failed:
        sys.exit(_failed_exit(failed))


def _jobs(reply: bytes) -> list[JobOutcome]:
    from transferd.net.local_http import jobs_of

    return jobs_of(reply)


def _with_daemon(
    config: ClientSettings, config_path: str, use: Callable[[LocalClient], T], as_json: bool = False
) -> T:
    """`use` a client of this site's own daemon; its errors become exit codes, and a daemon
    that does not answer gets a message saying how to start it."""
    client = _local_client(config, as_json)
    try:
        return use(client)
    except TransportError as exc:
        if exc.fields.get("local_daemon"):
            reason = str(exc.__cause__ or exc)
            exc = TransportError(
                f"the local daemon at {config.local_url} is not answering ({reason}). "
                f"Start it with: transferd serve --config {config_path}"
            )
        _fail(exc, as_json)
    except TransferdError as exc:
        _fail(exc, as_json)
    finally:
        client.close()


def _first_call(call: Callable[[], T]) -> T:
    """The CLI's first request: a daemon that is still starting gets a few seconds to listen,
    and a transient refusal (e.g. signed in the second its daemon restarted) is signed afresh
    and sent again."""
    from transferd.protocol.backoff import backoff_delays

    delays = backoff_delays(STARTUP_GRACE_S)
    while True:
        try:
            return call()
        except TransferdError as exc:
            if not exc.transient:
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            time.sleep(delay)


def _relative_to_data_dir(config: ClientSettings, path: str) -> str:
    """Accept PATH relative to data_dir, or a local path inside data_dir."""
    if config.data_dir_is_local and Path(path).is_absolute():
        try:
            return Path(path).resolve().relative_to(config.data_path.resolve()).as_posix()
        except ValueError:
            pass  # the daemon refuses it with a PolicyViolation naming the path
    return path


POLL_S = 0.05  # the shortest time between two questions to the daemon about the jobs
WAIT_MS = 500  # each question waits up to this long for a job to end (the progress bar's tick)


def _poll(
    client: LocalClient,
    ids: list[str],
    *,
    wait: bool,
    progress: bool,
    answered: list[float] | None = None,
) -> list[JobOutcome]:
    """The jobs `ids`, once (`wait` False) or until none is active; `answered` gets the time
    each answer arrived, before it was parsed."""
    from transferd.net.local_http import LocalRequest
    from transferd.protocol.http_paths import LOCAL_JOBS_ROUTE

    def parse(reply: bytes) -> list[JobOutcome]:
        if answered is not None:
            answered.append(time.monotonic())
        return _jobs(reply)

    def fetch(wait_ms: int = 0) -> list[JobOutcome]:
        path_qs = f"{LOCAL_JOBS_ROUTE}?ids={','.join(ids)}&wait_ms={wait_ms}"
        request = LocalRequest("GET", path_qs, parse)
        jobs = _first_call(lambda: client.call(request))
        # A job the daemon queued and does not report is not one that succeeded.
        lost = sorted(set(ids) - {j.id for j in jobs})
        if lost:
            raise ProtocolError(
                f"the daemon's jobs answer lacks job(s) it queued: {', '.join(lost)}")
        return jobs

    # Without a bar to draw, the first question already waits for a job to end (one request
    # fewer for a short job); with one, it answers at once so the bar appears at once.
    jobs = fetch(WAIT_MS if wait and not progress else 0)
    if not wait:
        return jobs
    bar = _progress_bar() if progress else None  # rich costs ~25 ms of imports: only for a bar
    said: dict[str, str | None] = {}  # per job: the problem last reported
    with bar or contextlib.nullcontext():
        tasks = {j.id: bar.add_task(f"{j.path} -> {j.dest}", total=None)
                 for j in jobs} if bar is not None else {}
        while True:
            for j in jobs:
                waiting = _describe_wait(j)
                if bar is not None:
                    total = j.bytes_logical or None
                    description = f"{j.path} -> {j.dest}" + (f" ({waiting})" if waiting else "")
                    bar.update(
                        tasks[j.id],
                        total=total,
                        completed=min(j.bytes_done, total or 0),
                        description=description,
                    )
                problem = j.note if j.active else None
                if j.active and problem != said.get(j.id) and (problem or said.get(j.id)):
                    said[j.id] = problem
                    line = f"{j.path} -> {j.dest}: " + (waiting or "moving again")
                    if bar is not None:
                        bar.console.print(line)
                    else:
                        click.echo(f"transferd: {line}", err=True)
            if not any(j.active for j in jobs):
                return jobs
            asked = time.monotonic()
            jobs = fetch(WAIT_MS)
            if any(j.active for j in jobs):
                # A daemon that answers at once (one without wait_ms): ask again after POLL_S.
                time.sleep(max(0.0, POLL_S - (time.monotonic() - asked)))


def _progress_bar() -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def _describe_wait(job: JobOutcome | JobStatus) -> str | None:
    """What a job is waiting for, and when it tries next (None: it is not waiting)."""
    from transferd.net.local_http import ACTIVE_JOB_STATES

    if not job.note or job.state not in ACTIVE_JOB_STATES:
        return None
    what = "waiting" if job.state == "waiting" else "retrying"
    note = job.note
    when = ""
    if job.next_attempt_at is not None:
        when = f"; next attempt at {time.strftime('%H:%M:%S', time.localtime(job.next_attempt_at))}"
        if job.attempts:
            when += f" (attempt {job.attempts + 1})"
    return f"{what}: {note}{when}"


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def status(config_path: str, as_json: bool) -> None:
    """Jobs, peers and rates of the local daemon."""
    from transferd.net.local_http import LocalRequest
    from transferd.protocol.local_api import SiteStatus
    from transferd.protocol.wire import LOCAL_STATUS_ROUTE, to_body

    config = _client_config(config_path, as_json)

    request = LocalRequest("GET", LOCAL_STATUS_ROUTE, SiteStatus)
    state = _with_daemon(
        config, config_path, lambda client: _first_call(lambda: client.call(request)), as_json
    )
    if as_json:
        click.echo(to_body(state).decode())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"site [bold]{state.site}[/] at {state.listen}")
    peers = Table(
        "peer",
        "url",
        "sent",
        "received",
        "chunks sent",
        "skipped",
        "retries",
        "link MB/s",
        "streams",
    )
    for name, p in state.peers.items():
        rate = p.link_bytes_per_s
        peers.add_row(
            name,
            p.url,
            _size(p.bytes_sent),
            _size(p.bytes_received),
            str(int(p.chunks_sent)),
            str(int(p.chunks_skipped)),
            str(int(p.retries)),
            f"{rate / 1e6:.0f}" if rate else "-",
            " ".join(f"{cls}={n}" for cls, n in p.streams.items()),
        )
    console.print(peers)
    jobs = Table("job", "path", "to", "state", "done", "wire", "skipped", "error")
    for j in state.jobs:
        jobs.add_row(
            j.id[:8],
            j.path,
            j.dest,
            j.state,
            f"{_size(j.bytes_done)}/{_size(j.bytes_logical)}",
            _size(j.bytes_on_wire),
            f"{j.chunks_skipped}/{j.chunks}",
            (j.error or _describe_wait(j) or "")[:100],
        )
    console.print(jobs)
    routes = Table("job", "route", "state", "chunks", "bytes", "MB/s", "re-sent")
    for j in state.jobs:
        for r in j.route_status:
            rate = r.rate_bytes_per_s
            shown = f"{r.state}: {r.error[:80]}" if r.error else r.state
            routes.add_row(j.id[:8], r.route, shown, str(r.chunks), _size(r.bytes),
                           f"{rate / 1e6:.1f}" if rate else "-", str(r.chunks_resent))
    if routes.row_count:
        console.print(routes)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the TelemetryReport as JSON "
              "(what `netplan calibrate --from` reads)")
def telemetry(config_path: str, as_json: bool) -> None:
    """The links to each peer as the local daemon measured them (TCP_INFO of the data
    channels, control-plane round trips, chunk failures; its rolling window)."""
    from netplan.telemetry import TelemetryReport
    from transferd.net.local_http import LocalRequest
    from transferd.protocol.wire import TELEMETRY_ROUTE

    config = _client_config(config_path, as_json)
    request = LocalRequest("GET", TELEMETRY_ROUTE, TelemetryReport)
    report = _with_daemon(
        config, config_path, lambda client: _first_call(lambda: client.call(request)), as_json
    )
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    def num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    table = Table("peer", "samples", "best Mbit/s", "now Mbit/s", "RTT ms", "srtt ms",
                  "jitter ms", "loss %", "streams", "failures",
                  title=f"links of {report.site} (window {report.window_s:g} s)")
    for link in report.links:
        failures = ", ".join(f"{k}={int(v)}" for k, v in link.chunk_failures.items() if v)
        table.add_row(link.peer, str(link.samples), num(link.best_goodput_bytes_per_s, 8e-6),
                      num(link.goodput_bytes_per_s, 8e-6), num(link.rtt_ms),
                      num(link.srtt_ms), num(link.jitter_ms, digits=2),
                      num(link.loss_pct, digits=2), str(len(link.streams)), failures or "-")
    Console().print(table)


@main.command()
@click.argument("peer")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data", help="the message text (default: read the body from stdin)")
@click.option("--file", "file_path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--class",
    "class_name",
    type=click.Choice(["interactive", "control"]),
    default="interactive",
    show_default=True,
)
@click.option("--deadline-ms", type=click.FloatRange(min=0), help="latency budget (ms)")
@click.option("--json", "as_json", is_flag=True, help="print the receipt as one JSON object")
def message(
    peer: str,
    config_path: str,
    data: str | None,
    file_path: str | None,
    class_name: str,
    deadline_ms: float | None,
    as_json: bool,
) -> None:
    """Deliver a small object to PEER's inbox through the local daemon, with a deadline."""
    from urllib.parse import quote, urlencode

    from transferd.net.local_http import LocalRequest
    from transferd.protocol.messages import MessageReceipt
    from transferd.protocol.wire import MESSAGES_ROUTE, to_body

    config = _client_config(config_path, as_json)
    if peer not in config.peers:
        _fail(ConfigError(f"PEER: {peer!r} is not a peer in {config_path}"), as_json)
    if data is not None and file_path is not None:
        _fail(ConfigError("usage: give --data or --file, not both"), as_json)
    if data is not None:
        body = data.encode()
    elif file_path is not None:
        body = Path(file_path).read_bytes()
    else:
        body = sys.stdin.buffer.read()
    query = {"class": class_name}
    if deadline_ms is not None:
        query["deadline_ms"] = f"{deadline_ms:g}"
    path_qs = MESSAGES_ROUTE.format(peer=quote(peer, safe="")) + "?" + urlencode(query)

    request = LocalRequest("POST", path_qs, MessageReceipt, body=body)
    receipt = _with_daemon(config, config_path, lambda client: client.call(request), as_json)
    if as_json:
        click.echo(to_body(receipt).decode())
    else:
        click.echo(
            f"delivered {len(body)} bytes to {receipt.peer} in {receipt.latency_ms or 0:.1f} ms"
            + (" (late)" if receipt.late else "")
        )
    if receipt.budget_miss:
        click.echo(f"transferd: budget miss: {receipt.budget_miss}", err=True)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--wait-ms", type=click.FloatRange(min=0, max=60_000), default=0.0)
@click.option("--max", "max_messages", type=click.IntRange(min=1, max=10_000), default=100)
def inbox(config_path: str, wait_ms: float, max_messages: int) -> None:
    """Take messages from the local daemon's inbox: one JSON object per line."""
    from transferd.net.local_http import LocalRequest
    from transferd.protocol.messages import InboxAnswer
    from transferd.protocol.wire import INBOX_ROUTE, to_body

    config = _client_config(config_path)

    path_qs = f"{INBOX_ROUTE}?wait_ms={wait_ms:g}&max={max_messages}"
    request = LocalRequest("GET", path_qs, InboxAnswer)
    answer = _with_daemon(config, config_path, lambda client: client.call(request))
    for m in answer.messages:
        click.echo(to_body(m).decode())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@main.command("keygen")
@click.option("--sites", required=True, help="site ids, comma-separated, e.g. A,B,C")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="overwrite existing keys (rotates them)")
def keygen_cmd(sites: str, out: str, force: bool) -> None:
    """Write an Ed25519 key pair per site and an HMAC secret per pair of sites."""
    from transferd.site.keys import keygen

    names = [s.strip() for s in sites.split(",") if s.strip()]
    try:
        written = keygen(names, Path(out), overwrite=force)
    except TransferdError as exc:
        _fail(exc)
    click.echo(f"wrote {len(written)} key files for {', '.join(names)} to {out}")
