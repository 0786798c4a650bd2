"""Calibration: link values the daemons measured (`netplan.telemetry`) laid over a topology's
declared ones. Pure: measurements and a `Topology` in, a `MeasuredOverlay` (the measured.yaml
document), a calibrated `Topology` and the list of what was replaced out.

Which value a measurement gives (see `netplan.telemetry` for how the daemon measures it):
- bandwidth_gbps of the direction site -> peer: the best sustained goodput. A goodput is what
  TCP delivered while the daemon had data to send, so it is a floor of the capacity, and the
  value a planner may count on;
- rtt_ms: the data connections' minimum RTT (both directions measured: their mean);
- jitter_ms: from the control plane's round trips;
- loss_pct of the direction: retransmitted / sent segments.
A direction with fewer than `min_samples` samples is left as declared, and said so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from netplan._sections import Frozen
from netplan.decisions import Decision
from netplan.errors import TopologyError
from netplan.report import Report
from netplan.telemetry import LinkMeasurement
from netplan.topology import MAX_QUANTITY, MIN_BANDWIDTH_GBPS, Link, Topology
from netplan.yamlpos import FieldIssue, YamlDocument, field_issues

__all__ = [
    "MIN_SAMPLES",
    "Applied",
    "DecisionChange",
    "MeasuredLink",
    "MeasuredOverlay",
    "apply_measured",
    "decision_changes",
    "overlay_of",
    "parse_overlay",
]

MIN_SAMPLES = 5  # TCP_INFO samples (one a second) a direction needs before it counts


class _Model(Frozen):
    """A measured.yaml model: held to the topology's rules on numbers (finite, and within
    the same bounds), since its values replace the declared ones."""


class MeasuredLink(_Model):
    """What was measured on one direction of a topology link."""

    between: tuple[str, str]
    from_site: str = Field(alias="from")
    bandwidth_gbps: float | None = Field(default=None, ge=MIN_BANDWIDTH_GBPS, le=MAX_QUANTITY)
    rtt_ms: float | None = Field(default=None, ge=0, le=MAX_QUANTITY)
    jitter_ms: float | None = Field(default=None, ge=0, le=MAX_QUANTITY)
    loss_pct: float | None = Field(default=None, ge=0, le=100)
    samples: int = Field(ge=0)
    control_samples: int = Field(default=0, ge=0)
    first_at: str | None = None  # ISO 8601, UTC
    last_at: str | None = None
    source: str = ""


class MeasuredOverlay(_Model):
    """measured.yaml: `netplan calibrate` writes it, `netplan analyze --measured` reads it."""

    measured_links: list[MeasuredLink]
    skipped: list[str] = Field(default_factory=list)  # measurements left out, and why

    def to_yaml_data(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


@dataclass(frozen=True)
class Applied:
    """One declared value replaced by a measured one."""

    link: tuple[str, str]
    direction: str | None  # the sending site, for per-direction values
    field: str
    declared: float
    measured: float
    samples: int

    @property
    def drift_pct(self) -> float | None:
        if self.declared == 0:
            return None
        return 100.0 * (self.measured - self.declared) / self.declared

    def text(self) -> str:
        where = f"{self.link[0]}-{self.link[1]}"
        if self.direction is not None:
            where += f" (from {self.direction})"
        drift = self.drift_pct
        return (f"{where} {self.field} {self.measured:g} (declared {self.declared:g}"
                + (f", {drift:+.0f} %" if drift is not None else "") + f"; {self.samples} samples)")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _find_link(topology: Topology, a: str, b: str) -> Link | None:
    for link in topology.links:
        if set(link.between) == {a, b}:
            return link
    return None


def overlay_of(measurements: Iterable[tuple[str, LinkMeasurement]], topology: Topology,
               min_samples: int = MIN_SAMPLES) -> MeasuredOverlay:
    """The overlay of the (source, measurement)s that name a link of `topology` and have
    enough samples; the rest are listed in `skipped` with the reason. Several measurements of
    one direction (from several sources): the one with the most samples."""
    best: dict[tuple[str, str], tuple[str, LinkMeasurement]] = {}
    skipped: list[str] = []
    for source, m in measurements:
        where = f"{m.site} -> {m.peer} ({source})"
        if _find_link(topology, m.site, m.peer) is None:
            skipped.append(f"{where}: no link between them in the topology")
            continue
        if m.samples < min_samples:
            skipped.append(f"{where}: {m.samples} samples with data moving, fewer than "
                           f"{min_samples}")
            continue
        key = (m.site, m.peer)
        if key not in best or m.samples > best[key][1].samples:
            best[key] = (source, m)
    links = []
    for (site, _peer), (source, m) in sorted(best.items()):
        link = _find_link(topology, m.site, m.peer)
        assert link is not None
        goodput = m.best_goodput_bytes_per_s
        links.append(MeasuredLink.model_validate({
            "between": (link.between[0], link.between[1]), "from": site,
            # A trickle below what a topology can state (1 kbit/s) is stated as that.
            "bandwidth_gbps": max(goodput * 8 / 1e9, MIN_BANDWIDTH_GBPS) if goodput else None,
            "rtt_ms": m.rtt_ms, "jitter_ms": m.jitter_ms if m.control_samples >= 2 else None,
            "loss_pct": m.loss_pct, "samples": m.samples, "control_samples": m.control_samples,
            "first_at": _iso(m.first_at), "last_at": _iso(m.last_at), "source": source}))
    return MeasuredOverlay(measured_links=links, skipped=skipped)


def parse_overlay(doc: YamlDocument, source: str) -> MeasuredOverlay:
    """A measured.yaml document, or a TopologyError naming the field and its line."""
    if not isinstance(doc.data, dict):
        raise TopologyError([FieldIssue(
            path=(), message="expected a mapping with a `measured_links:` list "
            "(what `netplan calibrate -o` writes)", line=doc.line_of(()))], source)
    try:
        return MeasuredOverlay.model_validate(doc.data)
    except ValidationError as exc:
        raise TopologyError(field_issues(exc, doc), source) from exc


def _directional(value: Any, ends: tuple[str, str], measured: dict[str, float],
                 default: float | None) -> Any:
    """A per-direction value with the measured directions replaced: one number when both
    ends end up equal, else a map keyed by sending site."""
    def declared(site: str) -> float:
        if isinstance(value, dict):
            got = value.get(site, default)
            return float(got if got is not None else 0.0)
        return float(value)

    per_end = {site: measured.get(site, declared(site)) for site in ends}
    if per_end[ends[0]] == per_end[ends[1]]:
        return per_end[ends[0]]
    return per_end


def apply_measured(topology: Topology, overlay: MeasuredOverlay
                   ) -> tuple[Topology, tuple[Applied, ...]]:
    """The topology with the overlay's measured values in place of the declared ones, and
    what was replaced. A measured link the topology does not have is a TopologyError."""
    by_link: dict[frozenset[str], list[MeasuredLink]] = {}
    for i, m in enumerate(overlay.measured_links):
        if _find_link(topology, *m.between) is None:
            raise TopologyError([FieldIssue(
                path=("measured_links", i, "between"),
                message=f"no link between {m.between[0]} and {m.between[1]} in the topology",
                line=None)], "measured")
        by_link.setdefault(frozenset(m.between), []).append(m)
    applied: list[Applied] = []
    links = []
    for link in topology.links:
        found = by_link.get(frozenset(link.between), [])
        if not found:
            links.append(link)
            continue
        data = link.model_dump()
        ends = (link.between[0], link.between[1])
        bandwidth = {m.from_site: m.bandwidth_gbps for m in found
                     if m.bandwidth_gbps is not None}
        loss = {m.from_site: m.loss_pct for m in found if m.loss_pct is not None}
        for site, value in bandwidth.items():
            applied.append(Applied(ends, site, "bandwidth_gbps", link.bandwidth_from(site),
                                   value, _samples(found, site)))
        for site, value in loss.items():
            applied.append(Applied(ends, site, "loss_pct", link.loss_from(site), value,
                                   _samples(found, site)))
        data["bandwidth_gbps"] = _directional(link.bandwidth_gbps, ends, bandwidth, None)
        data["loss_pct"] = _directional(link.loss_pct, ends, loss, 0.0)
        for name in ("rtt_ms", "jitter_ms"):
            values = [getattr(m, name) for m in found if getattr(m, name) is not None]
            if values:
                value = sum(values) / len(values)
                applied.append(Applied(ends, None, name, float(getattr(link, name)), value,
                                       sum(m.samples for m in found)))
                data[name] = value
        try:
            links.append(Link.model_validate(data))
        except ValidationError as exc:  # a measured value the topology's rules refuse
            raise TopologyError([FieldIssue(
                path=("measured_links", link.between[0] + "-" + link.between[1],
                      *e["loc"]), message=e["msg"], line=None) for e in exc.errors()],
                "measured") from exc
    calibrated = topology.model_copy(update={"links": tuple(links)})
    return Topology.model_validate(calibrated.model_dump()), tuple(applied)


def _samples(found: Sequence[MeasuredLink], site: str) -> int:
    return sum(m.samples for m in found if m.from_site == site)


@dataclass(frozen=True)
class DecisionChange:
    """A workload decided differently on the measured values."""

    workload: str
    declared: str  # "move_data at cloud"
    measured: str


def _decided(decision: Decision | None) -> str:
    if decision is None or decision.option is None:
        return "infeasible"
    return f"{decision.action} at {', '.join(decision.option.sites)}"


def decision_changes(declared: Report, measured: Report) -> tuple[DecisionChange, ...]:
    """The workloads whose action or sites differ between the two reports."""
    after = {d.workload: d for d in measured.decisions}
    changes = []
    for d in declared.decisions:
        before, now = _decided(d), _decided(after.get(d.workload))
        if before != now:
            changes.append(DecisionChange(d.workload, before, now))
    return tuple(changes)
