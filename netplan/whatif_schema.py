"""The shape of `netplan whatif --json` (`schema_version` 1), as pydantic models: what
`netplan schema --whatif` prints as JSON Schema and what the tests hold every what-if document
to (unknown keys are errors). `netplan.whatif` writes the JSON; this module only describes it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["WHATIF_DOCUMENT_VERSION", "WhatifDocument"]

WHATIF_DOCUMENT_VERSION = 1


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decision(_Doc):
    """One workload's decision, as a user compares it: where, how, cost, finish."""

    workload: str
    kind: str
    feasible: bool
    action: str = Field(description="in_place, move_compute, move_data, stage_subset, "
                        "replicate_model, or none when infeasible")
    sites: list[str]
    gpus: int | None
    path: list[str] = Field(description="the path of the largest movement")
    total_usd: float | None
    completion_hours: float | None = Field(description="transfers + compute")
    reason: str
    worst_client: str | None = Field(description="inference: the client with the highest p99")
    worst_p99_ms: float | None


class Baseline(_Doc):
    decisions: list[Decision]
    total_usd: float | None
    sync_usd_per_day: float | None


class Stats(_Doc):
    scenarios: int
    scenarios_evaluated: int = Field(description="built a network and re-planned what they "
                                     "reach")
    scenarios_skipped: int = Field(description="reach no site, link direction or client any "
                                   "decision, sync transfer or shard replica uses: answered "
                                   "without re-planning")
    workloads_replanned: int
    workloads_skipped: int
    scenarios_with_effect: int
    errors: int


class Change(_Doc):
    workload: str
    status: Literal["changed", "lost", "recovered", "still infeasible", "not needed"]
    before: Decision
    after: Decision
    cost_delta_usd: float | None = Field(description="after - before when both are feasible, "
                                         "else 0")


class Client(_Doc):
    client: str
    site: str | None = Field(description="the surviving replica serving it")
    p99_ms: float | None
    budget_ms: float
    misses: bool


class InferenceFailover(_Doc):
    """Clients served by the replicas that survive, before any re-planning."""

    workload: str
    replicas_before: list[str]
    replicas_left: list[str]
    clients: list[Client]
    budget_misses: int


class Standby(_Doc):
    site: str
    feasible: bool
    gpus: int
    checkpoint_from: str | None = Field(description="where the newest checkpoint comes from "
                                        "(this site when it holds one; null: the run restarts)")
    rpo_hours: float | None = Field(description="work lost, worst case: the replication "
                                    "cadence + one checkpoint's transfer")
    rto_hours: float | None = Field(description="moving the checkpoint (or model) and the data "
                                    "this site lacks, each on its fastest path")
    restore_gb: float | None
    compute_hours: float | None = Field(description="the lost and the remaining work here")
    cost_usd: float | None = Field(description="to finish: compute + egress + relays + "
                                   "storage of what was restored")
    finish_hours: float | None = Field(description="from the failure: RTO + compute")
    meets_deadline: bool
    why: str


class TrainingFailover(_Doc):
    workload: str
    failed_site: str
    progress_hours: float | None
    elapsed_hours: float | None
    deadline_hours: float | None
    resume_at: str | None = Field(description="the best standby, if one can run it")
    standbys: list[Standby] = Field(description="ranked: meeting the deadline first (least "
                                    "cost, 5 % ties to the earlier finish), then by finish")
    standbys_considered: int
    rpo_target_hours: float | None
    recommendation: str | None = Field(description="'pre-replicate checkpoints of X to Y "
                                       "every N min to meet RPO <= R' when the replication "
                                       "as planned cannot")


class VectorIndex(_Doc):
    index: str
    below_replicas_min: list[int]
    lost_shards: list[int]
    querying_misses: list[str]
    replanned_feasible: bool
    replanned_reason: str
    cost_delta_usd_per_day: float | None


class Artifact(_Doc):
    id: str
    why: str


class Rehomed(_Doc):
    id: str
    from_: str = Field(alias="from")
    to: str


class Scenario(_Doc):
    name: str
    changes: list[str] = Field(description="each change as '<kind> <text>', e.g. 'fail "
                               "site:aws-euc1'")
    evaluated: bool
    replanned_workloads: list[str]
    skipped_workloads: int
    workloads_lost: list[str]
    indexes_lost: list[str]
    budget_misses: int
    cost_delta_usd: float | None
    sync_cost_delta_usd_per_day: float | None
    workload_changes: list[Change] = Field(description="the workloads whose decision changed "
                                           "(every other keeps its baseline decision)")
    inference_failover: list[InferenceFailover]
    training_failover: list[TrainingFailover]
    vector_indexes: list[VectorIndex]
    sync_problems: list[str] = Field(description="sync-plan problems new in this scenario")
    lost: list[Artifact]
    rehomed: list[Rehomed]
    notes: list[str]
    error: str | None


class SinglePointOfFailure(_Doc):
    element: str
    breaks: list[str]
    why: list[str]


class Run(_Doc):
    executor: Literal["serial", "local", "dask"]
    workers: int
    seconds: float


class WhatifDocument(_Doc):
    schema_version: Literal[1]
    topology: str
    sweep: Literal["n-1", "n-2"] | None
    baseline: Baseline
    stats: Stats
    ranking: list[str] = Field(description="names of the scenarios that hurt, worst first: "
                               "workloads and indexes lost, then budget misses, then cost")
    single_points_of_failure: list[SinglePointOfFailure]
    scenarios: list[Scenario]
    run: Run | None = Field(default=None, description="how this run went (not part of the "
                            "results: the same scenarios give the same results on any "
                            "executor)")
