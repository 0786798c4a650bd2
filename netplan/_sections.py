"""Topology sections for replication and sync: `vector_indexes[]`, `sync_rules[]`,
`checkpoint_replication[]`, `sync_window` and the latency-budget components.

Frozen pydantic models (unknown keys are errors) plus the cross-reference checks that need the
whole topology; `netplan.topology` embeds them and the loader adds YAML lines to every issue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from netplan.plan import Name, SiteId, Tier
from netplan.yamlpos import FieldIssue

if TYPE_CHECKING:
    from netplan.topology import Topology

__all__ = [
    "DEFAULT_STORAGE_USD_PER_GB_MONTH",
    "MAX_QUANTITY",
    "CheckpointReplication",
    "LatencyComponents",
    "PathPolicy",
    "SyncRule",
    "SyncWindow",
    "VectorIndex",
    "section_issues",
]

# AWS EBS gp3 in us-east-1, USD 0.08 per GB-month (aws.amazon.com/ebs/pricing, 2024): vector-index
# shards live on SSD-backed volumes, not object storage.
DEFAULT_STORAGE_USD_PER_GB_MONTH = 0.08

Id = Name  # ids become folder names and metric labels: netplan.plan's one rule
# The largest number a topology may state (GB, USD, hours, ms, GPUs, bytes): far past any real
# estate (1e15 GB is a million exabytes), and small enough that the planner's products of a few
# of them stay finite. A dataset of 1.7e308 GB, finite and so accepted, made a move's bytes inf
# and its cost NaN, and `netplan analyze` raised from inside the planner.
MAX_QUANTITY = 1e15
NonNegative = Annotated[float, Field(ge=0, le=MAX_QUANTITY)]


class Frozen(BaseModel):
    """Base of every topology model: immutable, unknown keys refused, no inf/NaN (and every
    number at most MAX_QUANTITY, field by field)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LatencyComponents(Frozen):
    """Per-request costs besides the network path; each default says where it comes from."""

    # A stub-resolver / node-local cache hit; a cold recursive lookup is 10-50 ms, so raise this
    # for clients that do not keep a resolver cache.
    dns_ms: NonNegative = 1.0
    # TLS 1.3 full handshake: 1 RTT (RFC 8446 section 2). Use 0 for pooled keep-alive
    # connections, 2 for TLS 1.2 (RFC 5246), +1 when the TCP handshake is counted too.
    tls_handshake_rtts: NonNegative = 1.0
    # One L7 load-balancer / API-gateway hop (Envoy-class proxies: about 1 ms at p99).
    request_routing_ms: NonNegative = 1.0
    # Online feature-store read at p99 (Redis-backed online stores serve single-digit ms).
    feature_lookup_ms: NonNegative = 5.0
    # Forward pass of a small ranking/embedding model on a GPU; set it per workload.
    model_execution_ms: NonNegative = 20.0
    # Encode + decode of a few-KB JSON/protobuf request and response.
    serialization_ms: NonNegative = 1.0

    def overhead_ms(self, rtt_ms: float) -> float:
        """Everything a request costs besides the network round trip itself, for a client
        `rtt_ms` away (the TLS handshake grows with the RTT)."""
        return (self.dns_ms + self.tls_handshake_rtts * rtt_ms + self.request_routing_ms
                + self.feature_lookup_ms + self.model_execution_ms + self.serialization_ms)


# A workload whose topology declares no latency_components has a network-only budget: its
# latency_budget_ms is the p99 of RTT + jitter (issue 2's contract), and so is its breakdown.
NETWORK_ONLY = LatencyComponents(dns_ms=0, tls_handshake_rtts=0, request_routing_ms=0,
                                 feature_lookup_ms=0, model_execution_ms=0, serialization_ms=0)


class VectorIndex(Frozen):
    id: Id
    site: SiteId = Field(description="primary site")
    tier: Literal[Tier.CURATED, Tier.APPROVED] = Field(
        default=Tier.APPROVED, description="tier folder the shard replicas live under "
        "(<tier>/<index id>/shard-NNNN/ at every site that holds one)")
    shards: int | None = Field(default=None, ge=1, le=MAX_QUANTITY,
                               description="shard count (with shard_gb)")
    shard_gb: NonNegative | tuple[NonNegative, ...] | None = Field(
        default=None, description="size of every shard, or one size per shard")
    update_gb_per_day: NonNegative = 0.0
    queries: dict[str, NonNegative] = Field(default_factory=dict,
                                            description="querying site -> queries per second")
    latency_budget_ms: float = Field(gt=0, le=MAX_QUANTITY,
                                     description="p99 of a query including the network")
    search_ms: NonNegative = Field(description="search time per shard")
    replicas_min: int = Field(default=1, ge=1, le=MAX_QUANTITY,
                              description="copies in distinct failure domains")
    fanout: Literal["all"] | tuple[Annotated[int, Field(ge=0)], ...] = Field(
        default="all", description="shards a query touches: all, or a list of shard numbers")
    response_kb_per_query: NonNegative = Field(
        default=0.0, description="response size per shard; > 0 charges remote query egress")

    @model_validator(mode="after")
    def _shards_given_once(self) -> VectorIndex:
        if self.shard_gb is None:
            raise ValueError("shard_gb is required (one size with shards, or a list of sizes)")
        if isinstance(self.shard_gb, tuple):
            if self.shards is not None and self.shards != len(self.shard_gb):
                raise ValueError(f"shards is {self.shards} but shard_gb lists "
                                 f"{len(self.shard_gb)} sizes")
            if not self.shard_gb:
                raise ValueError("shard_gb lists no shards")
        elif self.shards is None:
            raise ValueError("shards is required when shard_gb is one size")
        return self

    def shard_sizes(self) -> tuple[float, ...]:
        if isinstance(self.shard_gb, tuple):
            return self.shard_gb
        assert self.shards is not None
        assert self.shard_gb is not None
        return (float(self.shard_gb),) * self.shards


SyncTarget = Literal["consumers", "residency_gpu_sites"]


class SyncRule(Frozen):
    """Rucio-style replication rule: which datasets go where, in how many failure domains."""

    id: Id
    tier: Tier | None = Field(
        default=None, description="select every dataset of this tier")
    datasets: tuple[Id, ...] = Field(default=(), description="or select datasets by id")
    to: SyncTarget | tuple[SiteId, ...] = Field(
        description="consumers: every site running a workload that uses the dataset; "
        "residency_gpu_sites: sites with GPUs in the dataset's residency regions (its own "
        "region when unrestricted); or a list of site ids")
    copies_min: int = Field(default=1, ge=1, le=MAX_QUANTITY,
                            description="copies in distinct failure domains, "
                            "the source included")
    # A nightly sync moves what changed; 1.0 (a full copy every day) is the safe upper bound
    # until the change rate is known.
    change_fraction_per_day: float = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _selects_something(self) -> SyncRule:
        if self.tier is None and not self.datasets:
            raise ValueError("a sync rule needs a tier or a list of datasets")
        return self


class CheckpointReplication(Frozen):
    workload: Id
    size_gb: NonNegative | None = Field(default=None, description="default: the model's size")
    every_hours: float = Field(default=1.0, gt=0, le=MAX_QUANTITY,
                               description="one checkpoint per this many hours")
    to: tuple[SiteId, ...] = Field(default=(), description="target sites; default: chosen to reach "
                               "copies_min failure domains at the least egress")
    copies_min: int = Field(default=2, ge=1, le=MAX_QUANTITY,
                            description="copies in distinct failure domains, "
                            "the training site included")
    retain: int = Field(default=3, ge=1, le=MAX_QUANTITY,
                        description="checkpoints kept at each target")
    rpo_hours: float | None = Field(
        default=None, gt=0, le=MAX_QUANTITY,
        description="the most training progress (hours) a failure of "
        "the training site may lose; `netplan whatif` recommends a cadence and a target "
        "when the replication cannot meet it (default: whatever the deadline allows)")


class PathPolicy(Frozen):
    """How bulk data may travel (the `paths:` section): through at most `max_relays` relay sites,
    split over several paths when that meets a deadline one path cannot (or meets it for less),
    and what a relay costs when a site does not say (`sites[].relay_usd_per_hour`, ...)."""

    # Skyplane's planner considers overlay paths with one or two relays; beyond that the extra
    # egress per hop rarely pays, and the path search grows with the degree to this power.
    max_relays: int = Field(default=2, ge=0, le=6, description="relay sites a bulk path may "
                            "pass through (0: direct links only)")
    multipath: bool = Field(default=True, description="split a transfer over several paths "
                            "(a min-cost flow) when one path cannot meet its deadline or "
                            "splitting meets it for less")
    # Default 0: a relay costs its egress unless the topology prices the gateway (an on-prem
    # router is a sunk cost; a cloud relay VM is not: set it per site).
    relay_usd_per_hour: NonNegative = Field(default=0.0, description="gateway cost per hour "
                                            "at a relay site while it forwards a transfer")
    relay_usd_per_gb: NonNegative = Field(default=0.0, description="per-GB processing charge "
                                          "at a relay site (e.g. a transit gateway's)")


class SyncWindow(Frozen):
    # Bulk sync runs overnight: 8 hours, and may take half of each link so inference and
    # checkpoint traffic keep the rest (the article's "separate paths for control and bulk").
    hours: float = Field(default=8.0, gt=0, le=24)
    bulk_share: float = Field(default=0.5, gt=0, le=1)


def section_issues(topo: Topology) -> Iterator[FieldIssue]:
    """Cross-reference problems in the sections above (paths only; the loader adds lines)."""

    def issue(path: tuple[str | int, ...], message: str) -> FieldIssue:
        return FieldIssue(path=path, message=message, line=None)

    sites = topo.site_by_id
    seen: set[str] = set()
    for i, ix in enumerate(topo.vector_indexes):
        if ix.id in seen:
            yield issue(("vector_indexes", i, "id"), f"duplicate id {ix.id!r}")
        seen.add(ix.id)
        if ix.site not in sites:
            yield issue(("vector_indexes", i, "site"), f"unknown site {ix.site!r}")
        for q in ix.queries:
            if q not in sites:
                yield issue(("vector_indexes", i, "queries", q), f"unknown site {q!r}")
        if ix.fanout != "all":
            n = len(ix.shard_sizes())
            for j, k in enumerate(ix.fanout):
                if k >= n:
                    yield issue(("vector_indexes", i, "fanout", j),
                                f"shard {k} does not exist (the index has {n} shards)")

    datasets = topo.dataset_by_id
    seen = set()
    for i, rule in enumerate(topo.sync_rules):
        if rule.id in seen:
            yield issue(("sync_rules", i, "id"), f"duplicate id {rule.id!r}")
        seen.add(rule.id)
        if rule.tier == "raw":
            yield issue(("sync_rules", i, "tier"),
                        "raw-tier data never leaves its site; a sync rule cannot move it")
        for j, ds in enumerate(rule.datasets):
            if ds not in datasets:
                yield issue(("sync_rules", i, "datasets", j), f"unknown dataset {ds!r}")
            elif datasets[ds].tier == "raw":
                yield issue(("sync_rules", i, "datasets", j),
                            f"dataset {ds!r} is raw-tier: raw data never leaves its site")
        if isinstance(rule.to, tuple):
            for j, site in enumerate(rule.to):
                if site not in sites:
                    yield issue(("sync_rules", i, "to", j), f"unknown site {site!r}")
                    continue
                for ds in rule.datasets:
                    d = datasets.get(ds)
                    if d is not None and not d.allowed_in(sites[site].region):
                        yield issue(("sync_rules", i, "to", j),
                                    f"site {site} is in region {sites[site].region}, outside "
                                    f"dataset {ds}'s residency [{', '.join(d.residency)}]")

    workloads = {w.id: w for w in topo.workloads}
    for i, ck in enumerate(topo.checkpoint_replication):
        wl = workloads.get(ck.workload)
        if wl is None:
            yield issue(("checkpoint_replication", i, "workload"),
                        f"unknown workload {ck.workload!r}")
        elif ck.size_gb is None and wl.model is None:
            yield issue(("checkpoint_replication", i, "size_gb"),
                        f"workload {wl.id} has no model to take the checkpoint size from")
        for j, site in enumerate(ck.to):
            if site not in sites:
                yield issue(("checkpoint_replication", i, "to", j), f"unknown site {site!r}")
