"""deploy/: the Grafana dashboard loads and every query in it names a series a live daemon
exports (its /metrics); the systemd unit is Type=notify with ExecReload as SIGHUP around
`transferd serve`, and its limits let the loop run real-time and the bulk threads switch; the
container definition copies what exists and runs `transferd serve`."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from netplan.telemetry import SERIES
from transferd.site.threads import BULK_THREAD_NICENESS, LOOP_RT_PRIORITY
from transferd.testing import loopback_pair

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "gauge": ("",), "summary": ("_count", "_sum", "")}


def _queries(dashboard: dict[str, object]) -> list[str]:
    panels = dashboard["panels"]
    assert isinstance(panels, list)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    templating = dashboard["templating"]
    assert isinstance(templating, dict)
    exprs += [v["definition"] for v in templating["list"] if v["type"] == "query"]
    return exprs


async def test_every_dashboard_query_names_a_series_the_daemon_exports(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] and p["title"] for p in panels)
    async with loopback_pair(tmp_path) as (a, _b):
        async with aiohttp.ClientSession() as session, session.get(a.url + "/metrics") as r:
            assert r.status == 200
            exposition = await r.text()
    exported = {family.name + suffix
                for family in text_string_to_metric_families(exposition)
                for suffix in SUFFIXES.get(family.type, ("",))}
    used = {name for expr in _queries(dashboard)
            for name in re.findall(r"\btransferd_[a-z0-9_]+", expr)}
    assert used, "no transferd series in the dashboard"
    assert sorted(used - exported) == []
    # The measured link values netplan calibrates from are all on the dashboard.
    shown = {"transferd_link_best_goodput_bytes_per_second", "transferd_link_rtt_seconds",
             "transferd_link_jitter_seconds", "transferd_link_loss_ratio"}
    assert shown <= used & set(SERIES)


def test_systemd_unit_is_type_notify_and_reloads_with_sighup() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "transferd.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    start = shlex.split(service["ExecStart"])
    assert start[0].endswith("/transferd")
    assert start[1:4] == ["serve", "--config", "/etc/transferd/site.yaml"]
    assert service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def _nice_floor(limit: str) -> int:
    """The lowest nice value systemd's LimitNICE= lets a thread take: "+N"/"-N" is a nice
    value, a bare number the raw RLIMIT_NICE (20 - nice; 0 counts as 1)."""
    if limit[0] in "+-":
        return int(limit)
    return 20 - max(1, int(limit))


def test_systemd_unit_lets_the_loop_run_real_time_and_bulk_threads_leave_sched_idle() -> None:
    """Under the unit (no capabilities, NoNewPrivileges), the loop's SCHED_RR needs an
    RLIMIT_RTPRIO of at least its priority, and a bulk thread at nice +10 (over the unit's
    Nice=, 0 unless set) leaving SCHED_IDLE (bulk_priority adaptive) an RLIMIT_NICE that
    allows that nice value; RestrictRealtime= would refuse the loop outright."""
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "transferd.service")
    service = unit["Service"]
    assert int(service["LimitRTPRIO"]) >= LOOP_RT_PRIORITY
    bulk_nice = min(19, int(service.get("Nice", "0")) + BULK_THREAD_NICENESS)
    assert _nice_floor(service["LimitNICE"]) <= bulk_nice
    assert service.get("RestrictRealtime", "no") == "no"


def test_container_copies_what_exists_and_runs_transferd_serve() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    root = DEPLOY.parent
    for line in lines:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            assert all((root / s).exists() for s in sources), line
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD"))[len("CMD"):])
    assert entry + cmd == ["transferd", "serve", "--config", "/etc/transferd/site.yaml"]
    assert "STOPSIGNAL SIGTERM" in lines
