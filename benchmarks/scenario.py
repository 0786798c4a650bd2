"""Scenario files (benchmarks/scenarios/*.yaml): the sites, the link between them, the work
(replicate a checkpoint, sync a dataset, interactive messages during bulk), the tools to compare,
and timed events such as a link flap. Validated once at load; errors name the field and line.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmarks.errors import ScenarioError
from benchmarks.linkspec import LinkSpec, parse_link_spec
from netplan.yamlpos import YamlSyntaxError, field_issues, parse

__all__ = ["DataKind", "RELAY_TOOLS", "Scenario", "WorkKind", "load_scenario", "scenario_path",
           "SCENARIO_DIR"]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

TOOLS = (
    "transferd",
    "transferd-1stream",
    "transferd-warm",  # the timed send after an untimed one and 2 s idle (a daemon in service)
    "transferd-4streams",  # the stream controller starting at 4 (adaptive from there)
    "transferd-8streams",
    "transferd-shared-pool",
    "transferd-normal-loop",  # the event loop left at normal priority (traffic.loop_priority)
    "transferd-idle-bulk",  # bulk threads always at SCHED_IDLE (traffic.bulk_priority)
    "transferd-nice-bulk",  # bulk threads always at nice +10, messages or not (the default)
    "transferd-adaptive-bulk",  # bulk threads at SCHED_IDLE only while messages move
    "transferd-http-messages",  # messages through the local HTTP API, not the message socket
    "iperf3-1stream",
    "iperf3-8streams",
    "rsync",
    "rsync-zstd",
    "rclone",
    "disk-direct",  # the receiving disk's write ceiling (dd oflag=direct), not a network tool
    "disk-buffered",  # the same through the page cache
)
# Tools of a scenario with a third site between the two ends (several links: `relay_3site`).
RELAY_TOOLS = (
    "transferd-direct",  # `transferd send` over the direct link (links[0])
    "transferd-relay",  # `transferd send --via R`
    "transferd-multipath",  # `--via R --multipath`: both paths at once
    "rsync-direct",
    "rsync-two-hop",  # rsync to the relay site, then on to the destination, timed end to end
)


class DataKind(StrEnum):
    INCOMPRESSIBLE = "incompressible"  # random bytes: nothing for a compressor to win
    CHECKPOINT_BF16 = "checkpoint-bf16"  # bf16 weights with many zeros (zstd ratio ~2-3)


class WorkKind(StrEnum):
    REPLICATE = "replicate"  # one file (a checkpoint shard) from A to B
    INTERACTIVE_DURING_BULK = "interactive-during-bulk"  # small messages while bulk saturates


class Work(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: WorkKind = WorkKind.REPLICATE
    data: DataKind = DataKind.INCOMPRESSIBLE
    size_mib: int = Field(gt=0, le=65_536)
    quick_size_mib: int = Field(default=64, gt=0, le=65_536)
    messages: int = Field(default=0, ge=0, le=100_000)  # interactive messages (4 KiB each)
    message_bytes: int = Field(default=4096, gt=0, le=16 * 1024 * 1024)
    deadline_ms: float = Field(default=50, gt=0)


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    between: tuple[str, str]
    spec: LinkSpec


class LinkFlap(BaseModel):
    """Take the link down `down_s` seconds, `at_s` seconds into each transfer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at_s: float = Field(ge=0)
    down_s: float = Field(gt=0)


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = ""
    # loopback: both sites share one namespace's 127.0.0.1 and there is no link to impair.
    loopback: bool = False
    sites: tuple[str, ...] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    # The namespaces' default TCP congestion control, one run of the scenario per entry: cubic
    # is what Linux hosts (and so rsync and rclone users) run by default, bbr what a WAN tool
    # may pick per socket. Empty: both on a link, cubic on loopback (where no queue builds).
    congestion_controls: tuple[str, ...] = ()
    work: tuple[Work, ...] = Field(min_length=1)
    tools: tuple[str, ...] = Field(min_length=1)
    iperf3_seconds: float = Field(default=10, gt=0)
    quick_iperf3_seconds: float = Field(default=4, gt=0)
    flap: LinkFlap | None = None
    peak_rss: bool = False  # record each transferd daemon's peak RSS
    # With several links: a tool too slow to finish on the direct link is timed over this
    # window of steady transfer and its time projected from that rate (the results say so).
    window_s: float = Field(default=30, gt=0)
    quick_window_s: float = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites: each site must be named once")
        known = RELAY_TOOLS if self.relayed else TOOLS
        for tool in self.tools:
            if tool not in known:
                raise ValueError(f"tools: unknown tool {tool!r} (known"
                                 f"{' with several links' if self.relayed else ''}: "
                                 f"{', '.join(known)})")
        if self.relayed:
            if len(self.sites) != 3 or len(self.links) != 3:
                raise ValueError("links: a scenario with several links joins 3 sites pairwise: "
                                 "source-destination first, then through the relay")
            for i, link in enumerate(self.links):
                if not set(link.between) <= set(self.sites) or len(set(link.between)) != 2:
                    raise ValueError(f"links[{i}].between: two different sites of `sites`")
            if len({frozenset(link.between) for link in self.links}) != 3:
                raise ValueError("links: each pair of sites is joined once")
            if self.flap:
                raise ValueError("flap: not supported with several links")
        elif self.loopback:
            if self.links:
                raise ValueError("links: a loopback scenario has no links")
            if self.flap:
                raise ValueError("flap: a loopback scenario has no link to flap")
        else:
            if len(self.sites) != 2 or len(self.links) != 1:
                raise ValueError("links: the harness compares tools over one link between 2 sites")
            if set(self.links[0].between) != set(self.sites):
                raise ValueError("links[0].between: must name both sites")
        return self

    @property
    def relayed(self) -> bool:
        """Several links: the ends joined directly and through a third site."""
        return len(self.links) > 1

    def relay_site(self) -> str:
        return next(s for s in self.sites if s not in self.links[0].between)

    @property
    def ccs(self) -> tuple[str, ...]:
        if self.congestion_controls:
            return self.congestion_controls
        return ("cubic",) if self.loopback else ("cubic", "bbr")

    @property
    def link(self) -> LinkSpec | None:
        return self.links[0].spec if self.links else None

    def source_site(self) -> str:
        return self.links[0].between[0] if self.links else self.sites[0]

    def dest_site(self) -> str:
        return self.links[0].between[1] if self.links else self.sites[-1]


def scenario_path(name_or_path: str) -> Path:
    """`clean-10ms` -> benchmarks/scenarios/clean-10ms.yaml; a path is taken as it is."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        return candidate
    return SCENARIO_DIR / f"{name_or_path}.yaml"


def load_scenario(name_or_path: str) -> Scenario:
    path = scenario_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as exc:
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
        raise ScenarioError(str(path), [f"cannot read ({exc.strerror}); known: {known}"]) from exc
    return parse_scenario(text, source=str(path))


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    try:
        doc = parse(text)
    except YamlSyntaxError as exc:
        raise ScenarioError(source, [str(exc)]) from exc
    data: Any = doc.data
    if not isinstance(data, dict):
        raise ScenarioError(source, ["<document>: must be a mapping"])
    links = data.get("links")
    if isinstance(links, list):
        # Each link's impairment is a LinkSpec written inline beside `between`; parse it with the
        # link spec parser so its errors carry the same field paths and lines.
        parsed = []
        for index, link in enumerate(links):
            if not isinstance(link, dict):
                parsed.append(link)
                continue
            spec_fields = {k: v for k, v in link.items() if k != "between"}
            spec = parse_link_spec(spec_fields, doc=doc, path=("links", index), source=source)
            parsed.append({"between": link.get("between"), "spec": spec})
        data = {**data, "links": parsed}
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(source, field_issues(exc, doc)) from exc
