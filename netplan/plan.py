"""The plan contract: what netplan writes and each site's transferd reads (`plan.json`).

This module is the one place both sides agree on: the plan's model and its `schema_version`, the
traffic-class and tier vocabulary, and the rule for site ids and names that become path
components (those three defined in `netplan.ids`, re-exported here). It imports nothing from
transferd and nothing heavy (no networkx, no scipy), so a daemon loads it cheaply; netplan
builds plans in `netplan._plan_build`. The format is described field by field in
docs/plan-format.md. transferd executes a plan; it never re-derives policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

from netplan.errors import PlanError
from netplan.ids import (
    BULK_CLASSES,
    NAME_PATTERN,
    SITE_ID_PATTERN,
    Name,
    SiteId,
    Tier,
    TrafficClass,
    check_name,
    check_site_id,
)
from netplan.yamlpos import format_path

__all__ = [
    "BULK_CLASSES",
    "NAME_PATTERN",
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "SITE_ID_PATTERN",
    "CheckpointEntry",
    "LinkPolicy",
    "MirrorEntry",
    "Name",
    "Plan",
    "RouteShare",
    "ShardEntry",
    "SiteId",
    "SitePlan",
    "SyncEntry",
    "Tier",
    "TrafficClass",
    "check_name",
    "check_site_id",
    "checkpoint_prefix",
    "dataset_prefix",
    "shard_prefix",
]

# 3: sync and shard entries carry `routes` (relay paths with shares) for multipath transfers.
SCHEMA_VERSION = 3
# A version 2 plan is a version 3 plan without routes, so it is read as it is.
READABLE_SCHEMA_VERSIONS = (2, 3)


def dataset_prefix(tier: str, dataset: str) -> str:
    """Where a dataset lives under a site's data root: its tier folder, then its id
    (`approved/claims/`), so the daemon's tier policy applies to exactly what the plan names."""
    return f"{tier}/{dataset}/"


def checkpoint_prefix(workload: str) -> str:
    return f"checkpoints/{workload}/"


def shard_prefix(tier: str, index: str, shard: int) -> str:
    """Where shard `shard` (0-based) of vector index `index` lives: `approved/<index>/shard-0003/`
    (zero-padded so a listing sorts by shard number)."""
    return f"{tier}/{index}/shard-{shard:04d}/"


_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class RouteShare:
    """One path of a multipath transfer: the relay sites in order (empty: the direct link) and
    the share of the bytes it carries (0 < share <= 1)."""

    via: tuple[SiteId, ...]
    share: float = Field(gt=0, le=1)


_SHARE_TOLERANCE = 1e-6


def _check_routes(via: tuple[str, ...], routes: tuple[RouteShare, ...]) -> None:
    """Empty `routes`: one path, `via`. Otherwise the shares add up to 1, the largest comes
    first, and `via` repeats it (so a reader that only knows `via` takes the main path)."""
    if not routes:
        return
    total = sum(r.share for r in routes)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ValueError(f"routes: the shares add up to {total:g}, not 1")
    if any(b.share > a.share + _SHARE_TOLERANCE for a, b in zip(routes, routes[1:],
                                                                strict=False)):
        raise ValueError("routes: the largest share comes first")
    if tuple(routes[0].via) != tuple(via):
        raise ValueError(f"via {list(via)} is not the first route's via {list(routes[0].via)}")
    if len({tuple(r.via) for r in routes}) != len(routes):
        raise ValueError("routes: the same path is listed twice")


@dataclass(frozen=True, config=_STRICT)
class SyncEntry:
    """Keep everything under `path_prefix` (relative to the site's data root) mirrored at
    `destination`."""

    path_prefix: str
    destination: SiteId
    traffic_class: TrafficClass
    dataset: Name
    rule: str
    via: tuple[SiteId, ...] = ()  # relay sites between this site and the destination, in order
    gb_per_day: float = Field(default=0.0, ge=0)
    # Several paths with shares (largest first, `via` = the first's); empty: all along `via`.
    routes: tuple[RouteShare, ...] = ()
    # The dataset's residency (regions its copies may be held in; empty: anywhere): every relay
    # and the destination's daemon check their own region against it before holding a byte.
    residency: tuple[Name, ...] = ()

    @model_validator(mode="after")
    def _routes_agree(self) -> SyncEntry:
        _check_routes(self.via, self.routes)
        return self


@dataclass(frozen=True, config=_STRICT)
class ShardEntry:
    """Keep the replica of one vector-index shard (`path_prefix`) mirrored at `destination`: the
    placement the shard solver chose, carried out like a sync entry."""

    path_prefix: str
    destination: SiteId
    traffic_class: TrafficClass
    index: Name
    shard: int = Field(ge=0)
    via: tuple[SiteId, ...] = ()
    size_gb: float = Field(default=0.0, ge=0)
    gb_per_day: float = Field(default=0.0, ge=0)  # the index's daily update volume per shard
    routes: tuple[RouteShare, ...] = ()  # as for sync entries

    @model_validator(mode="after")
    def _routes_agree(self) -> ShardEntry:
        _check_routes(self.via, self.routes)
        return self


MirrorEntry = SyncEntry | ShardEntry


@dataclass(frozen=True, config=_STRICT)
class CheckpointEntry:
    """Replicate each new checkpoint under `path_prefix` to every target; keep `retain` there."""

    workload: Name
    path_prefix: str
    targets: tuple[SiteId, ...]
    every_hours: float = Field(gt=0)
    retain: int = Field(ge=1)


@dataclass(frozen=True, config=_STRICT)
class LinkPolicy:
    """Traffic-class shares on the link from this site to `peer`.

    `class_weights`: relative weights of the bulk classes when both have data queued (control
    keeps strict priority and interactive goes earliest-deadline-first, so they carry no weight).
    `rate_caps_mbps`: the most each bulk class may send on this link (Mbit/s), so bulk never
    takes the share inference traffic needs.
    """

    peer: SiteId
    class_weights: dict[TrafficClass, int]
    rate_caps_mbps: dict[TrafficClass, float]


@dataclass(frozen=True, config=_STRICT)
class SitePlan:
    site: SiteId
    region: Name | None = None  # the topology's region of the site (its daemon's, if unset there)
    sync: tuple[SyncEntry, ...] = ()
    shards: tuple[ShardEntry, ...] = ()
    checkpoints: tuple[CheckpointEntry, ...] = ()
    links: tuple[LinkPolicy, ...] = ()

    def mirrors(self) -> Iterator[MirrorEntry]:
        """Every folder this site keeps mirrored somewhere: dataset sync, then shard replicas."""
        yield from self.sync
        yield from self.shards


@dataclass(frozen=True, config=_STRICT)
class Plan:
    schema_version: int
    topology: str
    sites: tuple[SitePlan, ...]

    def site(self, site_id: str) -> SitePlan:
        for s in self.sites:
            if s.site == site_id:
                return s
        raise PlanError(f"the plan has no site {site_id!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _ADAPTER.dump_python(self, mode="json")
        return out

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> Plan:
        """Parse and validate a plan; any problem is a `PlanError` naming the field."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise PlanError(f"plan is not JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise PlanError("plan: expected a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
            raise PlanError(f"schema_version: {version!r} is not supported (this version reads "
                            f"{' and '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
        try:
            return _ADAPTER.validate_python(dict(data))
        except ValidationError as exc:
            problems = [f"{format_path(tuple(e['loc']))}: {_message(e['msg'])}"
                        for e in exc.errors(include_url=False)]
            raise PlanError("invalid plan: " + "; ".join(problems)) from exc


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


_ADAPTER: TypeAdapter[Plan] = TypeAdapter(Plan)
