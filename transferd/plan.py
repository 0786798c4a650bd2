"""What this daemon does from its site config and, given one, a netplan plan
(`transferd serve --config site.yaml --plan plan.json`).

The plan is read as netplan wrote it (`netplan.plan.Plan`) and mapped once to the daemon's own
objects: `SyncRoute`s (a folder kept mirrored at a destination: a dataset's sync entry, or a
vector-index shard replica), `CheckpointRoute`s (a run's
steps to targets), the retention of runs this site receives, and per peer the `LinkSettings`
its scheduler runs on (bulk weights and rate caps; the plan's value wins where both set one).
Every destination and target must be a configured peer (their URLs and keys come from the site
config). The daemon never re-derives policy from the plan: an entry under raw/ is refused here
and the sender's own tier check still refuses raw data on every job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netplan.errors import PlanError
from netplan.plan import BULK_CLASSES, LinkPolicy, MirrorEntry, Plan, SyncEntry, TrafficClass
from transferd.config import SiteConfig
from transferd.documents import PLAN_LIMITS, load_json_document, read_document_text
from transferd.errors import ConfigError, PolicyViolation
from transferd.protocol.local_api import JobRoute
from transferd.protocol.policy import CHECKPOINTS, check_may_leave_site, normalize_rel_path
from transferd.protocol.ratelimit import bytes_per_s

__all__ = [
    "CheckpointRoute",
    "LinkSettings",
    "PlanRun",
    "Refusal",
    "SyncRoute",
    "link_settings",
    "load_plan",
    "parse_plan",
]


@dataclass(frozen=True)
class SyncRoute:
    """Keep the folder `prefix` (relative to data_dir) mirrored at `destination`."""

    prefix: str
    destination: str
    traffic_class: TrafficClass
    dataset: str
    rule: str
    # The planned paths (relays and shares, main first; empty: direct) and the data's residency.
    routes: tuple[JobRoute, ...] = ()
    residency: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointRoute:
    """Every complete step of the run folder `run` (`checkpoints/<workload>`) goes to `targets`."""

    run: str
    targets: tuple[str, ...]
    retain: int


@dataclass(frozen=True)
class Refusal:
    """A plan entry policy refuses (`where`: its field in the plan)."""

    where: str
    reason: str


@dataclass(frozen=True)
class LinkSettings:
    """How the link to one peer is shared: bulk weights, and rate caps in bytes per second."""

    bulk_weights: Mapping[TrafficClass, float]
    class_caps_bytes_per_s: Mapping[TrafficClass, float] = field(default_factory=dict)
    total_cap_bytes_per_s: float | None = None


@dataclass(frozen=True)
class PlanRun:
    """This site's part of a plan, checked against its site config."""

    site: str
    source: str
    region: str | None = None  # the topology's region for this site
    sync: tuple[SyncRoute, ...] = ()
    refused: tuple[Refusal, ...] = ()
    checkpoints: tuple[CheckpointRoute, ...] = ()
    # Runs this site receives from others and how many steps it keeps of each (the sender's
    # `retain`, the plan's word for the target side).
    incoming_retention: Mapping[str, int] = field(default_factory=dict)
    links: Mapping[str, LinkPolicy] = field(default_factory=dict)  # by configured peer

    def routes_for(self, prefix: str, dest: str) -> tuple[JobRoute, ...]:
        """The plan's paths for a sync of `prefix` to `dest` (empty: direct)."""
        for route in self.sync:
            if route.prefix == prefix and route.destination == dest:
                return route.routes
        return ()

    @property
    def residency(self) -> dict[str, list[str]]:
        """Residency by path prefix, from the sync entries that carry one."""
        return {r.prefix: list(r.residency) for r in self.sync if r.residency}

    def checkpoint_targets(self, step: str, default: list[str]) -> list[str]:
        """Where a complete step goes: the plan's targets for its run, else the config's."""
        run = step.rsplit("/", 1)[0]
        for route in self.checkpoints:
            if route.run == run:
                return list(route.targets)
        return default


def link_settings(config: SiteConfig, peer: str, plan: PlanRun | None = None) -> LinkSettings:
    """The config's weights and caps for the link to `peer`, with the plan's link policy on top
    (where both set a value the plan's wins; what the plan leaves out keeps the config's)."""
    pc = config.peers[peer]
    weights = pc.weights or config.traffic.weights
    caps = pc.rate_caps_mbps
    bulk_weights = {TrafficClass.CHECKPOINT: weights.checkpoint, TrafficClass.SYNC: weights.sync}
    class_caps_mbps = caps.per_class()
    policy = plan.links.get(peer) if plan is not None else None
    if policy is not None:
        bulk_weights.update({cls: float(w) for cls, w in policy.class_weights.items()})
        class_caps_mbps.update(policy.rate_caps_mbps)
    return LinkSettings(
        bulk_weights=bulk_weights,
        class_caps_bytes_per_s={cls: bytes_per_s(v) for cls, v in class_caps_mbps.items()},
        total_cap_bytes_per_s=None if caps.total is None else bytes_per_s(caps.total),
    )


def _prefix(value: str, where: str) -> str:
    try:
        return normalize_rel_path(value)
    except PolicyViolation as exc:
        raise ConfigError(f"{where}: {exc.message}", field=where) from exc


def parse_plan(
    data: str | bytes | Mapping[str, Any], config: SiteConfig, source: str = "<plan>"
) -> PlanRun:
    """Validate a plan and take `config.site`'s part; every problem is a ConfigError naming the
    field (`sites[1].sync[0].destination: ...`). Text is read by `transferd.documents` first
    (size, encoding and depth checked before validation)."""
    if isinstance(data, str | bytes):
        data = load_json_document(data, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a plan must be a JSON object", field="plan")
    try:
        plan = Plan.from_json(data)
        me = plan.site(config.site)  # the planner's own "no site" error
    except PlanError as exc:
        raise ConfigError(f"{source}: {exc}", field="plan") from exc
    here = f"sites[{plan.sites.index(me)}]"

    def peer(name: str, where: str) -> str:
        if name not in config.peers:
            raise ConfigError(
                f"{source}: {where}: {name!r} is not a peer in the site config "
                f"(peers: {', '.join(sorted(config.peers)) or 'none'})",
                field=where,
            )
        return name

    sync: list[SyncRoute] = []
    refused: list[Refusal] = []
    mirrors: list[tuple[str, MirrorEntry]] = [
        (f"{here}.sync[{j}]", e) for j, e in enumerate(me.sync)
    ]
    mirrors += [(f"{here}.shards[{j}]", e) for j, e in enumerate(me.shards)]
    for where, entry in mirrors:
        if entry.traffic_class not in BULK_CLASSES:
            raise ConfigError(
                f"{source}: {where}.traffic_class: {entry.traffic_class.value!r} is not a bulk "
                f"class ({', '.join(c.value for c in BULK_CLASSES)})",
                field=f"{where}.traffic_class",
            )
        prefix = _prefix(entry.path_prefix, f"{source}: {where}.path_prefix")
        dest = peer(entry.destination, f"{where}.destination")
        try:
            check_may_leave_site(prefix)
        except PolicyViolation as exc:
            refused.append(Refusal(f"{where}.path_prefix", exc.message))
            continue
        paths = [(r.via, r.share) for r in entry.routes]
        paths = paths or ([(entry.via, 1.0)] if entry.via else [])
        routes = tuple(
            JobRoute(via=[peer(v, f"{where}.via[{k}]") for k, v in enumerate(via)], share=share)
            for via, share in paths
        )
        if isinstance(entry, SyncEntry):
            sync.append(SyncRoute(prefix, dest, entry.traffic_class, entry.dataset, entry.rule,
                                  routes, tuple(entry.residency)))
        else:  # a vector-index shard replica, mirrored like a dataset folder
            rule = f"shards:{entry.index}"
            sync.append(SyncRoute(prefix, dest, entry.traffic_class, entry.index, rule, routes))
    checkpoints = []
    for j, ck in enumerate(me.checkpoints):
        where = f"{here}.checkpoints[{j}]"
        run = _prefix(ck.path_prefix, f"{source}: {where}.path_prefix")
        if run.split("/", 1)[0] != CHECKPOINTS or run.count("/") != 1:
            raise ConfigError(
                f"{source}: {where}.path_prefix: must be checkpoints/<run>/, "
                f"not {ck.path_prefix!r}",
                field=f"{where}.path_prefix",
            )
        targets = tuple(peer(t, f"{where}.targets[{k}]") for k, t in enumerate(ck.targets))
        checkpoints.append(CheckpointRoute(run, targets, ck.retain))
    # Runs other sites replicate here: their paths are checked like this site's own (another
    # site's entry is still input this daemon acts on).
    incoming = {
        _prefix(ck.path_prefix, f"{source}: sites[{i}].checkpoints[{j}].path_prefix"): ck.retain
        for i, s in enumerate(plan.sites)
        for j, ck in enumerate(s.checkpoints)
        if config.site in ck.targets
    }
    for k, lp in enumerate(me.links):
        values = [("class_weights", c, float(w)) for c, w in lp.class_weights.items()]
        values += [("rate_caps_mbps", c, v) for c, v in lp.rate_caps_mbps.items()]
        for name, cls, value in values:
            where = f"{here}.links[{k}].{name}.{cls.value}"
            if cls not in BULK_CLASSES or not value > 0:
                raise ConfigError(
                    f"{source}: {where}: must be a bulk class with a value > 0, got {value:g}",
                    field=where,
                )
    return PlanRun(
        site=config.site,
        source=source,
        region=me.region,
        sync=tuple(sync),
        refused=tuple(refused),
        checkpoints=tuple(checkpoints),
        incoming_retention=incoming,
        # Links to sites this daemon has no peer entry for carry none of its traffic.
        links={lp.peer: lp for lp in me.links if lp.peer in config.peers},
    )


def load_plan(path: str | Path, config: SiteConfig) -> PlanRun:
    path = Path(path)
    text = read_document_text(path, "plan", PLAN_LIMITS)
    return parse_plan(text, config, source=str(path))
