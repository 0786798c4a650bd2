"""The shape of `netplan analyze --json` (report `schema_version` 2), as pydantic models: what
`netplan schema --report` prints as JSON Schema, and what the tests hold every report to (unknown
keys are errors, so the documentation cannot drift from the output). `netplan.report` writes the
JSON; this module only describes it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["REPORT_SCHEMA_VERSION", "ReportDocument"]

REPORT_SCHEMA_VERSION = 2

Usd = float
Seconds = float


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cost(_Doc):
    """One objective: every decision's total and its parts, USD."""

    compute_usd: Usd = Field(description="GPU-hours x the site's price")
    egress_usd: Usd = Field(description="egress per hop and direction, at the sending site's price")
    storage_usd: Usd = Field(description="the copies moved in, GB x the site's $/GB-month, from "
                             "the start of the move to the end of the job (inference: the "
                             "serving hours)")
    relay_usd: Usd = Field(description="relay charges: per-GB at each relay plus each relay "
                           "gateway's $/h while the transfer runs")
    total_usd: Usd


class RouteLeg(_Doc):
    path: list[str] = Field(description="sites in travel order")
    share: float = Field(description="fraction of the bytes on this path (all legs add up to 1)")
    rate_gbps: float = Field(description="the rate this path carries")
    egress_usd: Usd


class PathAlternative(_Doc):
    """A path the transfer did not take, priced for the same transfer."""

    labels: list[Literal["direct", "fastest", "cheapest"]]
    path: list[str]
    seconds: Seconds
    egress_usd: Usd
    relay_usd: Usd
    cost_usd: Usd
    meets_deadline: bool
    rejected_because: str


class Movement(_Doc):
    """One artifact moving to where the work runs, and how."""

    kind: Literal["dataset", "model"]
    id: str
    from_: str = Field(alias="from")
    to: str
    size_gb: float
    path: list[str] = Field(description="the path of the largest leg")
    seconds: Seconds = Field(description="8 x GB / rate + the path RTT (a split: all legs "
                             "finish together)")
    egress_usd: Usd
    relay_usd: Usd
    bottleneck_gbps: float = Field(description="the rate of the route (a split: all legs)")
    limited_by: Literal["capacity", "window", "loss"] | None = Field(
        description="what limits a one-path route's bottleneck hop; null for a split")
    multipath: bool
    solver: Literal["lp", "milp"] | None = Field(description="the flow that decided a split")
    routes: list[RouteLeg]
    why: str = Field(description="why this route: the rule that chose it, in words")
    path_alternatives: list[PathAlternative] = Field(
        default=[], description="the direct, fastest and cheapest paths it beat (chosen "
        "options only)")


class WorstClient(_Doc):
    client: str
    site: str | None
    p99_ms: float | None


class ClientLatency(_Doc):
    client: str
    site: str | None
    p99_ms: float | None
    path: list[str]


class _OptionFields(_Doc):
    site: str | None = Field(default=None, description="where it runs (non-inference)")
    sites: list[str] | None = Field(default=None, description="replica sites (inference)")
    feasible: bool
    priced: bool | None = Field(default=None, description="false: failed a check that needs "
                                "no network, so paths, transfer and totals are null")
    gpus: int | None = Field(description="GPUs used (per replica for inference; elastic "
                             "workloads: the count the planner chose at that site)")
    gpus_why: str | None = Field(default=None, description="elastic workloads: why this count")
    compute_hours: float | None
    path: list[str]
    transfer_gb: float | None
    transfer_seconds: Seconds | None
    egress_usd: Usd | None
    compute_usd: Usd | None
    total_usd: Usd | None
    completion_hours: float | None
    cost: Cost | None
    movements: list[Movement]
    worst_client: WorstClient | None = None
    clients: list[ClientLatency] | None = None


class Alternative(_OptionFields):
    action: str
    rejected_because: str | None


class Rejection(_Doc):
    """Every losing site, grouped by why it lost ("fewer than 8 l4 GPUs" at 531 sites)."""

    kind: Literal["gpu", "residency", "raw", "path", "storage", "deadline", "cost", "bound"]
    reason: str
    sites: int = Field(description="how many sites lost this way")
    examples: list[str] = Field(description="the first few of them")


class DecisionDoc(_OptionFields):
    workload: str
    kind: str
    action: str
    reason: str
    alternatives: list[Alternative] = Field(description="the best losing options, feasible "
                                            "first, cheapest first (--max-alternatives)")
    alternatives_omitted: int
    options_not_evaluated: int = Field(description="options branch and bound proved could "
                                       "not win")
    rejections: list[Rejection]


class Direction(_Doc):
    from_: str = Field(alias="from")
    to: str
    effective_gbps: float | None
    limited_by: Literal["capacity", "window", "loss"]
    capacity_gbps: float | None
    window_gbps: float | None = Field(description="N x window / RTT (null: RTT 0)")
    loss_gbps: float | None = Field(description="Mathis et al. bound (null: no loss)")
    loss_pct: float
    egress_usd_per_gb: float = Field(description="price of leaving `from` over this link")


class LinkDoc(_Doc):
    between: list[str]
    rtt_ms: float
    jitter_ms: float
    directions: list[Direction] = Field(description="between[0] -> [1], then back")


class TransferCost(_Doc):
    egress_usd: Usd
    relay_usd: Usd
    storage_usd: Usd
    total_usd: Usd


class SyncRoute(_Doc):
    path: list[str]
    share: float
    rate_gbps: float


class SyncTransferDoc(_Doc):
    rule: str
    dataset: str
    source: str
    destination: str
    path: list[str]
    routes: list[SyncRoute]
    gb_per_day: float
    class_: Literal["sync", "checkpoint"] = Field(alias="class")
    hours: float = Field(description="time to move one day's volume (a checkpoint: one "
                         "checkpoint) at the bulk share")
    fits: bool = Field(description="it fits its window (sync) or cadence (checkpoints)")
    why: str
    cost_per_day: TransferCost
    shard: int | None = None


class CheckpointDoc(_Doc):
    workload: str
    source: str
    targets: list[str]
    size_gb: float
    every_hours: float
    retain: int
    transfers: list[SyncTransferDoc]


class LinkLoadDoc(_Doc):
    between: list[str]
    sync_gb_per_day: float
    checkpoint_gb_per_day: float
    effective_gbps: float
    window_capacity_gb: float
    window_load_gb: float
    shortfall_gb: float
    flagged: bool


class SyncPlanDoc(_Doc):
    window_hours: float
    bulk_share: float
    cost_per_day: TransferCost
    problems: list[str]
    transfers: list[SyncTransferDoc]
    checkpoints: list[CheckpointDoc]
    links: list[LinkLoadDoc]
    notes: list[str]


class Solver(_Doc):
    lp_solves: int
    milp_solves: int
    max_variables: int
    max_constraints: int
    max_integer_variables: int
    splits_chosen: int


class ReportDocument(_Doc):
    """`netplan analyze --json`."""

    schema_version: Literal[2]
    topology: str
    transfer: dict[str, float]
    paths: dict[str, float | bool] = Field(description="the path policy in force")
    decisions: list[DecisionDoc]
    links: list[LinkDoc]
    shard_replication: list[dict[str, object]] = Field(
        description="per vector index: placement, p99 per querying site, cost, greedy gap")
    sync_plan: SyncPlanDoc | None
    latency_budgets: list[dict[str, object]]
    problems: list[str] = Field(description="everything infeasible: workloads, vector indexes, "
                                "sync rules and links (what --strict exits 1 on)")
    solver: Solver | None
