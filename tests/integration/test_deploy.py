"""deploy/: the Grafana dashboard loads and every query in it names a series a live daemon
exports (its /metrics); the systemd unit is Type=notify with ExecReload as SIGHUP around
`transferd serve`; the container definition copies what exists and runs `transferd serve`."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from netplan.telemetry import SERIES
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
