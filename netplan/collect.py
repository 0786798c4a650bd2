"""Where `netplan calibrate` reads link measurements from (the only place in netplan that
talks to the network): a daemon's `/metrics` (a URL), a saved `TelemetryReport` (a .json
file, as `transferd telemetry --json` prints it), a site config (through `transferd
telemetry`, the daemon's signed local API: netplan never imports transferd), or a Prometheus
server's HTTP API over a time range. Each gives `netplan.telemetry.LinkMeasurement`s; any
failure is a TelemetryError naming the source.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from netplan.errors import TelemetryError
from netplan.telemetry import SERIES, SERIES_SCALE, LinkMeasurement, TelemetryReport

__all__ = ["from_prometheus", "from_source", "parse_exposition"]

TIMEOUT_S = 30.0
MAX_BYTES = 64 * 1024 * 1024


def _get(url: str, source: str) -> bytes:
    """The body of a GET; errors name `source` (the URL the user gave, not the query)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (http(s) only)
            return bytes(resp.read(MAX_BYTES))
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(ValueError, AttributeError):
            detail = ": " + str(json.loads(exc.read(64_000)).get("error", ""))[:300]
        raise TelemetryError(source, f"HTTP {exc.code} {exc.reason}{detail}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TelemetryError(source, f"cannot reach it: {reason}") from exc


def _report(text: str | bytes, source: str) -> list[LinkMeasurement]:
    try:
        return list(TelemetryReport.model_validate_json(text).links)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise TelemetryError(source, f"not a telemetry report: {where}: {first['msg']}"
                             ) from exc


def _measurement(site: str, peer: str, values: dict[str, float]) -> LinkMeasurement:
    fields: dict[str, Any] = {"site": site, "peer": peer}
    for series, name in SERIES.items():
        if series in values and not math.isnan(values[series]):
            value = values[series] / SERIES_SCALE.get(name, 1.0)
            fields[name] = int(value) if name in ("samples", "control_samples") else value
    fields.setdefault("samples", 0)
    return LinkMeasurement.model_validate(fields)


def parse_exposition(text: str, source: str) -> list[LinkMeasurement]:
    """The link measurements in a daemon's Prometheus text (`transferd_link_*{site,peer}`)."""
    from prometheus_client.parser import text_string_to_metric_families

    links: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in SERIES and {"site", "peer"} <= sample.labels.keys():
                    key = (sample.labels["site"], sample.labels["peer"])
                    links.setdefault(key, {})[sample.name] = sample.value
    except ValueError as exc:
        raise TelemetryError(source, f"not Prometheus text: {exc}") from exc
    if not links:
        raise TelemetryError(source, "no transferd_link_* series (is it a transferd daemon "
                             "with telemetry?)")
    return [_measurement(site, peer, values) for (site, peer), values in sorted(links.items())]


def from_source(source: str) -> list[LinkMeasurement]:
    """One `--from`: an http(s) URL of a daemon, a .json TelemetryReport, or a site config."""
    if source.startswith(("http://", "https://")):
        url = source.rstrip("/")
        if not url.endswith("/metrics"):
            url += "/metrics"
        return parse_exposition(_get(url, source).decode(errors="replace"), source)
    path = Path(source)
    if not path.is_file():
        raise TelemetryError(source, "no such file (give a daemon URL, a telemetry .json or "
                             "a site config)")
    if path.suffix.lower() == ".json":
        return _report(path.read_bytes(), source)
    done = subprocess.run([sys.executable, "-m", "transferd", "telemetry", "--config",
                           str(path), "--json"], capture_output=True, text=True,
                          timeout=TIMEOUT_S * 2, check=False)
    if done.returncode != 0:
        raise TelemetryError(source, "transferd telemetry failed: "
                             + (done.stderr.strip() or done.stdout.strip())[-500:])
    return _report(done.stdout, source)


# PromQL per LinkMeasurement field over the range: the best goodput seen, medians of the
# delays, loss from the counters' increase, the widest sample span.
_PROMQL: dict[str, str] = {
    "best_goodput_bytes_per_s": "max_over_time(transferd_link_best_goodput_bytes_per_second[{r}])",
    "goodput_bytes_per_s": "max_over_time(transferd_link_goodput_bytes_per_second[{r}])",
    "rtt_ms": "quantile_over_time(0.5, transferd_link_rtt_seconds[{r}])",
    "srtt_ms": "quantile_over_time(0.5, transferd_link_srtt_seconds[{r}])",
    "rttvar_ms": "quantile_over_time(0.5, transferd_link_rttvar_seconds[{r}])",
    "jitter_ms": "quantile_over_time(0.5, transferd_link_jitter_seconds[{r}])",
    "loss_pct": ("sum by (site, peer) (increase(transferd_link_retransmitted_segments_total"
                 "[{r}])) / sum by (site, peer) (increase("
                 "transferd_link_data_segments_out_total[{r}]))"),
    "samples": "max_over_time(transferd_link_samples[{r}])",
    "control_samples": "max_over_time(transferd_link_control_samples[{r}])",
    "first_at": "min_over_time(transferd_link_first_sample_timestamp_seconds[{r}])",
    "last_at": "max_over_time(transferd_link_last_sample_timestamp_seconds[{r}])",
}
_FIELD_SERIES = {name: series for series, name in SERIES.items()}


def _vector(base: str, query: str, at: float) -> list[tuple[dict[str, str], float]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
    raw = _get(url, base)
    try:
        doc = json.loads(raw)
        if doc.get("status") != "success":
            raise TelemetryError(base, f"query {query!r}: {doc.get('errorType', 'error')}: "
                                 f"{doc.get('error', '')}")
        data = doc["data"]
        if data["resultType"] != "vector":
            raise TelemetryError(base, f"query {query!r}: a {data['resultType']}, not a vector")
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise TelemetryError(base, f"not a Prometheus query answer: {exc}") from exc


def from_prometheus(url: str, range_s: float, now: float | None = None
                    ) -> list[LinkMeasurement]:
    """The links' values over the last `range_s` from a Prometheus server's HTTP API."""
    base = url.rstrip("/")
    at = time.time() if now is None else now
    window = f"{max(1, round(range_s))}s"
    values: dict[tuple[str, str], dict[str, float]] = {}
    for name, template in _PROMQL.items():
        for labels, value in _vector(base, template.format(r=window), at):
            if "site" in labels and "peer" in labels:
                series = _FIELD_SERIES[name]
                values.setdefault((labels["site"], labels["peer"]), {})[series] = value
    if not values:
        raise TelemetryError(url, f"no transferd_link_* series in the last {window}")
    return [_measurement(site, peer, v) for (site, peer), v in sorted(values.items())]
