"""Decision records and the per-site evaluation that gravity and placement share.

An `Option` is one way to run a workload (where, what moves, along which paths, at what cost, and
whether it is feasible, with the binding constraints if not). A `Decision` is the chosen option,
the reason in words, and every option that lost with why. Constraint texts are written once, here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from netplan.network import LimitingFactor, Network
from netplan.topology import Dataset, Model, Site, Topology, Workload, WorkloadKind

__all__ = [
    "COST_TIE_FRACTION",
    "Action",
    "ClientLatency",
    "Decision",
    "Movement",
    "Option",
    "ViolationKind",
    "amended",
    "deadline_violation",
    "duration",
    "evaluate_site",
    "gpu_violation",
    "infeasible_summary",
    "money",
    "ranked",
    "summarize",
]

ViolationKind = Literal["gpu", "residency", "raw", "path", "storage", "deadline"]

Action = Literal["in_place", "move_compute", "move_data", "stage_subset", "replicate_model", "none"]

# Ties "within 5 %" go to the earlier completion (issue 2).
COST_TIE_FRACTION = 0.05


def money(usd: float) -> str:
    return f"${usd:,.0f}" if abs(usd) >= 100 else f"${usd:,.2f}"


def duration(h: float) -> str:
    return f"{h:,.1f} h" if h >= 0.1 else f"{h * 60:,.1f} min"


@dataclass(frozen=True)
class Movement:
    """One artifact (dataset or model) travelling from its site to where the work runs."""

    kind: Literal["dataset", "model"]
    id: str
    source: str
    target: str
    size_gb: float  # what actually moves (a staged subset is smaller than the dataset)
    path: tuple[str, ...]
    seconds: float
    egress_usd: float
    bottleneck_gbps: float
    limited_by: LimitingFactor | None


@dataclass(frozen=True)
class ClientLatency:
    """Inference: a client site, the replica that serves it and its p99 latency (RTT + jitter)."""

    client: str
    site: str | None
    p99_ms: float | None
    path: tuple[str, ...]


@dataclass(frozen=True)
class Option:
    action: Action
    sites: tuple[str, ...]
    feasible: bool
    violations: tuple[str, ...]  # binding constraints, empty when feasible
    movements: tuple[Movement, ...]
    compute_usd: float
    hours: float  # compute wall-clock
    rejected_because: str | None = None
    clients: tuple[ClientLatency, ...] = ()
    violation_kinds: tuple[ViolationKind, ...] = ()  # one per violation, for summaries
    # False: failed a check that needs no network, so no paths were searched and transfer,
    # egress and completion are unknown (reported as null); compute_usd is still exact.
    priced: bool = True

    @property
    def transfer_gb(self) -> float:
        return sum(m.size_gb for m in self.movements)

    @property
    def transfer_seconds(self) -> float:
        # Movements run one after another: they may share links, so adding is the safe estimate.
        return sum(m.seconds for m in self.movements)

    @property
    def egress_usd(self) -> float:
        return sum(m.egress_usd for m in self.movements)

    @property
    def total_usd(self) -> float:
        return self.egress_usd + self.compute_usd

    @property
    def completion_hours(self) -> float:
        return self.transfer_seconds / 3600 + self.hours

    @property
    def path(self) -> tuple[str, ...]:
        """The path of the largest movement (what the data or model travels through)."""
        if not self.movements:
            return self.sites[:1]
        return max(self.movements, key=lambda m: m.size_gb).path

    @property
    def site(self) -> str | None:
        return self.sites[0] if self.sites else None

    @property
    def worst_client(self) -> ClientLatency | None:
        served = [c for c in self.clients if c.p99_ms is not None]
        return max(served, key=lambda c: c.p99_ms or 0.0) if served else None

    def where(self) -> str:
        return f"{self.action} at {', '.join(self.sites)}" if self.sites else self.action


@dataclass(frozen=True)
class Decision:
    workload: str
    kind: WorkloadKind
    option: Option | None  # None when no option is feasible
    reason: str
    alternatives: tuple[Option, ...]  # feasible first, then by total cost
    skipped: int = 0  # options branch and bound proved could not win (not in alternatives)

    @property
    def feasible(self) -> bool:
        return self.option is not None

    @property
    def action(self) -> Action:
        return self.option.action if self.option else "none"

    @property
    def constraints(self) -> tuple[str, ...]:
        """The binding constraints of an infeasible decision, one per distinct cause."""
        return _distinct(v for alt in self.alternatives for v in alt.violations)


def ranked(options: Iterable[Option]) -> tuple[Option, ...]:
    """Feasible options first, each group cheapest first."""
    return tuple(sorted(options, key=lambda o: (not o.feasible, o.total_usd)))


def _distinct(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def infeasible_summary(options: Sequence[Option], anchors: set[str], limit: int = 6) -> str:
    """The binding constraints of a workload no option satisfies. Few distinct causes are listed
    verbatim; many (a large estate) are listed verbatim for the sites holding the data or model
    and counted by kind for every other site."""
    distinct = list(dict.fromkeys(v for o in options for v in o.violations))
    if len(distinct) <= limit:
        return "; ".join(distinct)
    exact: list[str] = []
    sites_by_kind: dict[ViolationKind, set[str]] = {}
    raw: list[str] = []
    for option in options:
        for kind, text in zip(option.violation_kinds, option.violations, strict=True):
            if kind == "raw":
                raw.append(text)
            elif option.sites[0] in anchors:
                exact.append(text)
            else:
                sites_by_kind.setdefault(kind, set()).update(option.sites)
    counted: dict[ViolationKind, str] = {
        "gpu": "{n} other sites lack the GPUs",
        "residency": "{n} sites are outside a dataset's residency",
        "path": "{n} sites cannot be reached (within residency)",
        "storage": "{n} sites lack the storage",
        "deadline": "the deadline is missed at {n} sites",
    }
    parts = list(dict.fromkeys(exact + raw))
    for kind, template in counted.items():
        if kind in sites_by_kind:
            parts.append(template.format(n=len(sites_by_kind[kind])))
    if "deadline" in sites_by_kind:
        closest = min(
            (o for o in options if "deadline" in o.violation_kinds),
            key=lambda o: o.completion_hours,
        )
        parts[-1] += f" (closest: {closest.violations[-1]} at {closest.sites[0]})"
    return "; ".join(parts)


def summarize(messages: Sequence[str], limit: int = 6) -> str:
    if len(messages) <= limit:
        return "; ".join(messages)
    return "; ".join([*messages[:limit], f"and {len(messages) - limit} more"])


def gpu_violation(site: Site, workload: Workload) -> str | None:
    have = site.gpu_count(workload.gpu)
    if have == 0:
        return f"no {workload.gpu} GPUs at {site.id}"
    if have < workload.gpus:
        return f"only {have} {workload.gpu} GPUs at {site.id}, needs {workload.gpus}"
    return None


def evaluate_site(
    topology: Topology,
    network: Network,
    workload: Workload,
    site: Site,
    action: Action,
    *,
    subset: bool = False,
) -> Option:
    """Run `workload` at `site`: move the model and every dataset not already there (only each
    dataset's `active_fraction` when `subset`), and check GPUs, residency (relay hops included),
    raw tier, storage and the deadline.

    The checks that need no network (GPUs, where data may be processed, raw tier) come first;
    an option failing them is returned unpriced, without path searches: on a large estate most
    options fail that way, and what moving would have cost cannot change that."""
    violations: list[str] = []
    kinds: list[ViolationKind] = []

    def violate(kind: ViolationKind, text: str) -> None:
        kinds.append(kind)
        violations.append(text)

    if gpu := gpu_violation(site, workload):
        violate("gpu", gpu)
    datasets: list[Dataset] = [topology.dataset(d) for d in workload.datasets]
    for ds in datasets:
        if not ds.allowed_in(site.region):
            violate(
                "residency",
                f"dataset {ds.id} may not be processed in {site.region} "
                f"(residency: {', '.join(ds.residency)})",
            )
        elif ds.site != site.id and ds.tier == "raw":
            violate("raw", f"raw-tier dataset {ds.id} cannot leave {ds.site}")
    price = site.gpu_hour_usd.get(workload.gpu, 0.0)
    compute_usd = workload.gpus * workload.hours * price
    if violations:
        return Option(
            action=action,
            sites=(site.id,),
            feasible=False,
            violations=tuple(violations),
            movements=(),
            compute_usd=compute_usd,
            hours=workload.hours,
            violation_kinds=tuple(kinds),
            priced=False,
        )

    movements: list[Movement] = []
    for ds in datasets:
        if ds.site == site.id:
            continue
        regions = frozenset(ds.residency) if ds.residency else None
        size_gb = ds.size_gb * ds.active_fraction if subset else ds.size_gb
        moved = _move(network, "dataset", ds.id, ds.site, site.id, size_gb, regions)
        if moved is not None:
            movements.append(moved)
        elif regions is not None and network.widest_path(ds.site, site.id) is not None:
            violate(
                "path",
                f"no path from {ds.site} to {site.id} stays within dataset {ds.id}'s residency "
                f"({', '.join(ds.residency)})",
            )
        else:
            violate("path", f"no network path from {ds.site} to {site.id}")
    model: Model | None = topology.model(workload.model) if workload.model else None
    if model is not None and model.site != site.id:
        moved = _move(network, "model", model.id, model.site, site.id, model.size_gb, None)
        if moved is not None:
            movements.append(moved)
        else:
            violate("path", f"no network path from {model.site} to {site.id}")

    incoming_gb = sum(m.size_gb for m in movements)
    if site.storage_tb is not None and incoming_gb > site.storage_tb * 1000:
        violate(
            "storage",
            f"{site.id} has {site.storage_tb:g} TB of storage, needs {incoming_gb / 1000:,.1f} TB",
        )
    deadline = workload.deadline_hours
    if not violations and deadline is not None:
        completion = sum(m.seconds for m in movements) / 3600 + workload.hours
        if completion > deadline:
            transfer_h = completion - workload.hours
            violate("deadline", _deadline_text(deadline, completion, transfer_h, workload.hours))
    return Option(
        action=action,
        sites=(site.id,),
        feasible=not violations,
        violations=tuple(violations),
        movements=tuple(movements),
        compute_usd=compute_usd,
        hours=workload.hours,
        violation_kinds=tuple(kinds),
    )


def deadline_violation(option: Option, deadline_hours: float) -> str:
    return _deadline_text(
        deadline_hours, option.completion_hours, option.transfer_seconds / 3600, option.hours
    )


def _deadline_text(
    deadline_h: float, completion_h: float, transfer_h: float, compute_h: float
) -> str:
    return (
        f"deadline {deadline_h:g} h missed: {duration(completion_h)} "
        f"(transfer {duration(transfer_h)} + compute {duration(compute_h)})"
    )


def amended(option: Option, **changes: object) -> Option:
    """A copy of `option` with some fields changed (dataclasses.replace re-runs __init__ and is
    the slowest thing in a 100,000-option analysis)."""
    new = object.__new__(Option)
    new.__dict__.update(option.__dict__)
    new.__dict__.update(changes)
    return new


def _move(
    network: Network,
    kind: Literal["dataset", "model"],
    artifact: str,
    source: str,
    target: str,
    size_gb: float,
    regions: frozenset[str] | None,
) -> Movement | None:
    path = network.widest_path(source, target, regions)
    if path is None:
        return None
    return Movement(
        kind=kind,
        id=artifact,
        source=source,
        target=target,
        size_gb=size_gb,
        path=path.sites,
        seconds=path.transfer_seconds(size_gb),
        egress_usd=path.egress_usd(size_gb),
        bottleneck_gbps=path.bottleneck_gbps,
        limited_by=path.limited_by,
    )
