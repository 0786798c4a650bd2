"""The topology model: sites, links, datasets, models, workloads and TCP transfer settings.

Frozen pydantic v2 models with units in the field names; unknown keys are errors. Cross-references
(ids that must exist, duplicates, a link's egress map naming its own ends) are checked once the
whole document has parsed, and reported as `TopologyError` issues with field paths; the loader
(`netplan.loader`) attaches YAML line numbers.
`netplan schema` prints `Topology.model_json_schema()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from netplan._sections import (
    DEFAULT_STORAGE_USD_PER_GB_MONTH,
    MAX_QUANTITY,
    CheckpointReplication,
    Frozen,
    LatencyComponents,
    PathPolicy,
    SyncRule,
    SyncWindow,
    VectorIndex,
    section_issues,
)
from netplan.errors import TopologyError
from netplan.plan import Name, SiteId, Tier
from netplan.yamlpos import FieldIssue

__all__ = [
    "DEFAULT_MATHIS_CONSTANT",
    "DEFAULT_MSS_BYTES",
    "DEFAULT_STREAMS",
    "DEFAULT_WINDOW_BYTES",
    "MAX_QUANTITY",
    "MIN_BANDWIDTH_GBPS",
    "Dataset",
    "Link",
    "Model",
    "PathPolicy",
    "Site",
    "SiteKind",
    "Tier",
    "Topology",
    "TransferSettings",
    "Workload",
    "WorkloadKind",
]

SiteKind = Literal["onprem", "cloud", "edge"]
WorkloadKind = Literal[
    "pretraining", "fine_tuning", "inference", "batch_inference", "embedding", "evaluation"
]

# Ids appear in paths, tables and error messages: one printable token (netplan.plan's rule).
Id = Name
NonNegative = Annotated[float, Field(ge=0, le=MAX_QUANTITY)]

# Defaults for the TCP model, each from somewhere a reader can check:
# 16 streams = rclone's defaults (--transfers 4 x --multi-thread-streams 4); aws-cli uses 10.
DEFAULT_STREAMS = 16
# Linux's default net.ipv4.tcp_rmem max is 6 MiB; with tcp_adv_win_scale=1 half of it is advertised.
DEFAULT_WINDOW_BYTES = 3 * 1024 * 1024
# Ethernet MTU 1500 minus 20 bytes IPv4 and 20 bytes TCP header.
DEFAULT_MSS_BYTES = 1460
# Mathis, Semke, Mahdavi, Ott 1997, "The macroscopic behavior of the TCP congestion avoidance
# algorithm": rate = MSS * C / (RTT * sqrt(p)); C = sqrt(3/2) for periodic loss, no delayed ACKs.
DEFAULT_MATHIS_CONSTANT = math.sqrt(1.5)


class TransferSettings(Frozen):
    """How a bulk transfer uses TCP: N parallel streams, each with this window and MSS."""

    streams: int = Field(
        default=DEFAULT_STREAMS, ge=1, le=4096, description="parallel TCP streams (N)"
    )
    window_bytes: int = Field(
        default=DEFAULT_WINDOW_BYTES, ge=1024, le=MAX_QUANTITY,
        description="per-stream receive window in bytes"
    )
    mss_bytes: int = Field(
        default=DEFAULT_MSS_BYTES, ge=64, le=65495, description="TCP maximum segment"
    )
    mathis_constant: float = Field(
        default=DEFAULT_MATHIS_CONSTANT,
        gt=0,
        le=10,
        description="C in Mathis et al. MSS*C/(RTT*sqrt(p))",
    )


def _gpu_table_default() -> dict[str, Any]:
    return {}


class Site(Frozen):
    id: SiteId
    kind: SiteKind
    region: Id
    failure_domain: Id | None = Field(default=None, description="default: the site id")
    gpus: dict[str, Annotated[int, Field(ge=0, le=MAX_QUANTITY)]] = Field(
        default_factory=_gpu_table_default, description="GPU type -> count available"
    )
    gpu_hour_usd: dict[str, NonNegative] = Field(
        default_factory=_gpu_table_default, description="GPU type -> price per GPU-hour (USD)"
    )
    storage_tb: NonNegative | None = None
    storage_usd_per_gb_month: NonNegative | None = Field(
        default=None, description="default: netplan._sections.DEFAULT_STORAGE_USD_PER_GB_MONTH"
    )
    relay: bool = Field(
        default=True,
        description="may forward other sites' traffic (a path may pass through it); "
        "false for e.g. a point of presence that only originates requests",
    )
    relay_usd_per_hour: NonNegative | None = Field(
        default=None, description="gateway cost per hour while this site relays a transfer "
        "(default: paths.relay_usd_per_hour)")
    relay_usd_per_gb: NonNegative | None = Field(
        default=None, description="per-GB charge for data this site relays "
        "(default: paths.relay_usd_per_gb)")

    @model_validator(mode="before")
    @classmethod
    def _failure_domain_defaults_to_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("failure_domain") is None and "id" in data:
            data = {**data, "failure_domain": data["id"]}
        return data

    def gpu_count(self, gpu: str) -> int:
        return self.gpus.get(gpu, 0)

    @property
    def storage_price(self) -> float:
        """USD per GB-month of storage here (the documented default when the site sets none)."""
        if self.storage_usd_per_gb_month is None:
            return DEFAULT_STORAGE_USD_PER_GB_MONTH
        return self.storage_usd_per_gb_month


def _check_egress(value: Any) -> Any:
    """One clear message instead of pydantic's per-union-member pair."""

    def ok(x: Any) -> bool:
        return (
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and 0 <= x <= MAX_QUANTITY
        )

    if ok(value):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) and ok(v) for k, v in value.items()):
        return value
    raise ValueError(f"must be a number >= 0 or a map of site id -> number >= 0 (each at most "
                     f"{MAX_QUANTITY:g})")


EgressPrice = Annotated[float | dict[str, float], BeforeValidator(_check_egress)]


def _per_direction(name: str, ok: Any, rule: str) -> Any:
    def check(value: Any) -> Any:
        def good(x: Any) -> bool:
            return number(x) and bool(ok(x))

        def number(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if good(value):
            return value
        if number(value):
            raise ValueError(f"must be {rule}")
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            bad = [k for k, v in value.items() if not good(v)]
            if not bad:
                return value
            raise ValueError(f"{bad[0]}: must be a number {rule}")
        raise ValueError(f"must be a number {rule} or a map of site id -> number {rule} "
                         f"(the {name} of the direction leaving that site)")

    return check


# The least bandwidth a link may have, 1 kbit/s: with sizes up to MAX_QUANTITY GB, a move's
# seconds stay finite (a link of 1e-300 Gbit/s made them inf, and the planner's costs NaN).
MIN_BANDWIDTH_GBPS = 1e-6
Bandwidth = Annotated[float | dict[str, float],
                      BeforeValidator(_per_direction(
                          "bandwidth", lambda x: MIN_BANDWIDTH_GBPS <= x <= MAX_QUANTITY,
                          f">= {MIN_BANDWIDTH_GBPS:g} and <= {MAX_QUANTITY:g}"))]
LossPct = Annotated[float | dict[str, float],
                    BeforeValidator(_per_direction("loss", lambda x: 0 <= x < 100,
                                                   ">= 0 and < 100"))]


class Link(Frozen):
    """A network link between two sites. RTT and jitter are round-trip properties, the same
    both ways; bandwidth, loss and egress price may differ by direction (measured inter-region
    grids differ by a median 19 %), given as a map keyed by the sending site."""

    between: tuple[SiteId, SiteId]
    bandwidth_gbps: Bandwidth = Field(
        description="Gbit/s: one number for both directions, or a map site id -> capacity of "
        "the direction leaving that site (both ends required)")
    rtt_ms: NonNegative
    jitter_ms: NonNegative = 0.0
    loss_pct: LossPct = Field(
        default=0.0, description="packet loss %: one number, or a map site id -> loss of the "
        "direction leaving that site (an end not named: 0)")
    egress_usd_per_gb: EgressPrice = Field(
        default=0.0,
        description="USD per GB leaving a site over this link: one number for both directions, "
        "or a map site id -> price of data leaving that site (an end not named: 0)",
    )

    def egress_from(self, site: str) -> float:
        """Price per GB of data leaving `site` over this link."""
        if isinstance(self.egress_usd_per_gb, dict):
            return float(self.egress_usd_per_gb.get(site, 0.0))
        return float(self.egress_usd_per_gb)

    def bandwidth_from(self, site: str) -> float:
        """Capacity in Gbit/s of the direction from `site` to the other end."""
        if isinstance(self.bandwidth_gbps, dict):
            return float(self.bandwidth_gbps[site])
        return float(self.bandwidth_gbps)

    def loss_from(self, site: str) -> float:
        """Loss % of the direction from `site` to the other end."""
        if isinstance(self.loss_pct, dict):
            return float(self.loss_pct.get(site, 0.0))
        return float(self.loss_pct)

    def other_end(self, site: str) -> str:
        a, b = self.between
        return b if site == a else a


class Dataset(Frozen):
    id: Id
    site: SiteId
    size_gb: NonNegative
    tier: Tier
    residency: tuple[Id, ...] = Field(
        default=(), description="regions it may be stored or processed in"
    )
    active_fraction: float = Field(
        default=1.0, gt=0, le=1, description="share a job actually reads"
    )

    def allowed_in(self, region: str) -> bool:
        return not self.residency or region in self.residency


class Model(Frozen):
    id: Id
    site: SiteId
    size_gb: NonNegative


class Workload(Frozen):
    id: Id
    kind: WorkloadKind
    model: Id | None = Field(default=None, description="required for inference")
    datasets: tuple[Id, ...] = ()
    gpu: Id = Field(description="GPU type")
    gpus: int | None = Field(default=None, ge=1, le=MAX_QUANTITY,
                             description="GPU count (per replica for inference); with hours. "
                             "Or give gpu_hours for an elastic count")
    hours: float | None = Field(default=None, gt=0, le=MAX_QUANTITY,
                                description="wall-clock hours at that GPU count")
    gpu_hours: float | None = Field(
        default=None, gt=0, le=MAX_QUANTITY,
        description="elastic count: the work in GPU-hours (on gpus_min "
        "GPUs); the planner picks the count per site between gpus_min and gpus_max")
    gpus_min: int | None = Field(default=None, ge=1, le=MAX_QUANTITY,
                                 description="elastic: fewest GPUs (default 1)")
    gpus_max: int | None = Field(default=None, ge=1, le=MAX_QUANTITY,
                                 description="elastic: most GPUs "
                                 "(default: all the site has)")
    scaling_efficiency: float = Field(
        default=1.0, gt=0, le=1, description="elastic: speed-up per doubling of GPUs as a "
        "fraction of 2x (1: linear, the GPU-hours stay the same at any count)")
    deadline_hours: float | None = Field(default=None, gt=0, le=MAX_QUANTITY)
    clients: tuple[SiteId, ...] = Field(
        default=(), description="inference: sites where requests originate"
    )
    latency_budget_ms: float | None = Field(default=None, gt=0, le=MAX_QUANTITY,
                                            description="inference: p99 budget")
    latency_components: LatencyComponents | None = Field(
        default=None, description="inference: overrides the topology's latency_components"
    )

    @model_validator(mode="after")
    def _fixed_or_elastic(self) -> Workload:
        elastic = (self.gpu_hours, self.gpus_min, self.gpus_max)
        if self.gpu_hours is not None:
            if self.gpus is not None or self.hours is not None:
                raise ValueError("give either gpus and hours, or gpu_hours (with gpus_min/"
                                 "gpus_max), not both")
            if self.kind == "inference":
                raise ValueError("inference replicas have a fixed size: give gpus and hours")
            if (self.gpus_min is not None and self.gpus_max is not None
                    and self.gpus_min > self.gpus_max):
                raise ValueError(f"gpus_min {self.gpus_min} is more than gpus_max "
                                 f"{self.gpus_max}")
            return self
        if any(x is not None for x in elastic[1:]) or self.scaling_efficiency != 1.0:
            raise ValueError("gpus_min, gpus_max and scaling_efficiency go with gpu_hours")
        if self.gpus is None or self.hours is None:
            raise ValueError("give gpus and hours (a fixed count), or gpu_hours (an elastic "
                             "count)")
        return self

    @property
    def elastic(self) -> bool:
        return self.gpu_hours is not None

    @property
    def min_gpus(self) -> int:
        """The fewest GPUs a site must have for this workload."""
        if self.gpu_hours is not None:
            return self.gpus_min or 1
        assert self.gpus is not None
        return self.gpus

    def hours_on(self, gpus: int) -> float:
        """Wall-clock hours on `gpus` GPUs: the fixed hours, or for an elastic workload
        gpu_hours / gpus_min x (gpus_min / gpus)^a with a = log2(2 x scaling_efficiency)
        (a = 1, linear, at efficiency 1; each doubling gives 2 x efficiency the speed)."""
        if self.gpu_hours is None:
            assert self.hours is not None
            return self.hours
        base = self.gpus_min or 1
        exponent = math.log2(2 * self.scaling_efficiency)
        return self.gpu_hours / base * (base / gpus) ** exponent


def _duplicates(ids: Sequence[str]) -> Iterator[tuple[int, str]]:
    seen: set[str] = set()
    for index, item in enumerate(ids):
        if item in seen:
            yield index, item
        seen.add(item)


class Topology(Frozen):
    name: str = Field(min_length=1)
    description: str | None = None
    transfer: TransferSettings = TransferSettings()
    sites: tuple[Site, ...] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    datasets: tuple[Dataset, ...] = ()
    models: tuple[Model, ...] = ()
    workloads: tuple[Workload, ...] = ()
    vector_indexes: tuple[VectorIndex, ...] = ()
    sync_rules: tuple[SyncRule, ...] = ()
    checkpoint_replication: tuple[CheckpointReplication, ...] = ()
    sync_window: SyncWindow = SyncWindow()
    paths: PathPolicy = PathPolicy()
    # None: budgets are network-only (RTT + jitter p99). Declared (even as `{}`, which takes the
    # documented defaults): every inference budget is end to end, for placement and breakdown.
    latency_components: LatencyComponents | None = None

    def request_components(self, workload: Workload) -> LatencyComponents | None:
        """The non-network request costs that count against `workload`'s latency budget, or
        None when neither the workload nor the topology declares them."""
        return workload.latency_components or self.latency_components

    @model_validator(mode="after")
    def _check_references(self) -> Topology:
        issues = [*_reference_issues(self), *section_issues(self)]
        if issues:
            # Not a ValueError on purpose: pydantic lets it through with our field paths intact.
            raise TopologyError(issues)
        return self

    # Lookups (cached: the model is frozen, so they never go stale).
    @cached_property
    def site_by_id(self) -> dict[str, Site]:
        return {s.id: s for s in self.sites}

    @cached_property
    def dataset_by_id(self) -> dict[str, Dataset]:
        return {d.id: d for d in self.datasets}

    @cached_property
    def model_by_id(self) -> dict[str, Model]:
        return {m.id: m for m in self.models}

    def site(self, site_id: str) -> Site:
        return self.site_by_id[site_id]

    def dataset(self, dataset_id: str) -> Dataset:
        return self.dataset_by_id[dataset_id]

    def model(self, model_id: str) -> Model:
        return self.model_by_id[model_id]


def _reference_issues(topo: Topology) -> Iterator[FieldIssue]:
    def issue(path: tuple[str | int, ...], message: str) -> FieldIssue:
        return FieldIssue(path=path, message=message, line=None)

    for section, items in (
        ("sites", topo.sites),
        ("datasets", topo.datasets),
        ("models", topo.models),
        ("workloads", topo.workloads),
    ):
        for index, dup in _duplicates([item.id for item in items]):
            yield issue((section, index, "id"), f"duplicate id {dup!r}")

    sites = {s.id for s in topo.sites}
    for i, site in enumerate(topo.sites):
        for gpu in site.gpus:
            if gpu not in site.gpu_hour_usd:
                yield issue(
                    ("sites", i, "gpu_hour_usd"),
                    f"no price for GPU type {gpu!r} listed in gpus",
                )

    pairs: dict[frozenset[str], int] = {}
    for i, link in enumerate(topo.links):
        a, b = link.between
        for j, end in enumerate(link.between):
            if end not in sites:
                yield issue(("links", i, "between", j), f"unknown site {end!r}")
        if a == b:
            yield issue(("links", i, "between"), f"a link from site {a!r} to itself")
            continue
        pair = frozenset((a, b))
        if pair in pairs:
            yield issue(
                ("links", i, "between"),
                f"duplicate link between {a!r} and {b!r} (also links[{pairs[pair]}])",
            )
        pairs.setdefault(pair, i)
        for field in ("egress_usd_per_gb", "bandwidth_gbps", "loss_pct"):
            value = getattr(link, field)
            if not isinstance(value, dict):
                continue
            for key in value:
                if key not in link.between:
                    yield issue(
                        ("links", i, field, key),
                        f"site {key!r} is not an end of this link ({a}, {b})",
                    )
            if field == "bandwidth_gbps":
                for end in link.between:
                    if end not in value:
                        yield issue((
                            "links", i, field),
                            f"no bandwidth for the direction leaving {end!r} (a map needs "
                            "both ends)",
                        )

    for i, ds in enumerate(topo.datasets):
        if ds.site not in sites:
            yield issue(("datasets", i, "site"), f"unknown site {ds.site!r}")
        elif not ds.allowed_in(topo.site_by_id[ds.site].region):
            region = topo.site_by_id[ds.site].region
            yield issue(
                ("datasets", i, "residency"),
                f"stored at {ds.site} in region {region}, outside its own residency "
                f"[{', '.join(ds.residency)}]",
            )
    for i, model in enumerate(topo.models):
        if model.site not in sites:
            yield issue(("models", i, "site"), f"unknown site {model.site!r}")

    datasets = {d.id for d in topo.datasets}
    models = {m.id for m in topo.models}
    for i, wl in enumerate(topo.workloads):
        if wl.model is not None and wl.model not in models:
            yield issue(("workloads", i, "model"), f"unknown model {wl.model!r}")
        for j, ds_id in enumerate(wl.datasets):
            if ds_id not in datasets:
                yield issue(("workloads", i, "datasets", j), f"unknown dataset {ds_id!r}")
        for j, dup in _duplicates(wl.datasets):
            yield issue(("workloads", i, "datasets", j), f"dataset {dup!r} listed twice")
        for j, client in enumerate(wl.clients):
            if client not in sites:
                yield issue(("workloads", i, "clients", j), f"unknown site {client!r}")
        if wl.kind == "inference":
            if wl.model is None:
                yield issue(("workloads", i, "model"), "an inference workload needs a model")
            if not wl.clients:
                yield issue(
                    ("workloads", i, "clients"), "an inference workload needs at least one client"
                )
            if wl.latency_budget_ms is None:
                yield issue(
                    ("workloads", i, "latency_budget_ms"),
                    "an inference workload needs a latency budget",
                )
        else:
            for field in ("clients", "latency_budget_ms"):
                if getattr(wl, field):
                    yield issue(("workloads", i, field), f"only inference workloads take {field}")
