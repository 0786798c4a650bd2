"""What-if scenarios: the changes a user asks about (a site or link failing, a link degrading or
losing packets, an egress or GPU price moving, a site losing GPUs), their text form, the YAML
file of named scenarios, the N-1 / N-2 sweeps, and applying a scenario to a frozen `Topology`.

Pure: text and plain data in, frozen objects out (`load_scenario_file` is the one reader, through
`netplan.safeyaml`). Every problem is a `ScenarioError` naming the part that is wrong.

The text form (the same on the command line and in the file):
    fail     site:X | link:A,B
    degrade  link:A,B=30%     the link keeps 30 % of its bandwidth (both directions)
             link:A,B=-70%    the same, said as a drop; link:A,B=2.5gbps sets it
    loss     link:A,B=1%      packet loss becomes 1 % (both directions)
    price    egress:X=x2      every direction leaving X costs twice as much per GB (X may be *);
             egress:X=0.05    or exactly $0.05/GB
             gpu:h100=x1.5    H100 GPU-hours everywhere (gpu:h100@X: only at X); or gpu:h100=3.2
    gpus     site:X=-50%      every GPU type at X (gpu:h100@X=-50%: one type; gpu:h100=-50%:
                              that type everywhere; gpu:h100@X=16: exactly 16)
Applying a site failure keeps the data the plan keeps elsewhere: a dataset or model whose site
fails moves to its best-connected surviving copy (sync-rule destinations, inference replicas);
without one it is lost, and so is every workload that needs it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from netplan.errors import NetplanError
from netplan.safeyaml import DocumentError, Limits, read_text_bounded
from netplan.topology import (
    MAX_QUANTITY,
    MIN_BANDWIDTH_GBPS,
    Dataset,
    Link,
    Model,
    Site,
    Topology,
    Workload,
)
from netplan.yamlpos import format_path, parse

__all__ = [
    "CHANGE_KINDS",
    "AppliedScenario",
    "ElementIndex",
    "Touch",
    "Change",
    "Direction",
    "Scenario",
    "ScenarioError",
    "apply_scenario",
    "check_scenario",
    "load_scenario_file",
    "parse_change",
    "parse_scenarios",
    "scenario_from_options",
    "sweep",
    "touch",
]

ArtifactT = TypeVar("ArtifactT", Dataset, Model)
ChangeKind = Literal["fail", "degrade", "loss", "price", "gpus"]
CHANGE_KINDS: tuple[ChangeKind, ...] = ("fail", "degrade", "loss", "price", "gpus")
Direction = tuple[str, str]  # (sender, receiver) of one link direction

_EXAMPLES: dict[ChangeKind, str] = {
    "fail": "site:X or link:A,B",
    "degrade": "link:A,B=30% (keeps 30 % of the bandwidth), link:A,B=-70% or link:A,B=2.5gbps",
    "loss": "link:A,B=1%",
    "price": "egress:X=x2, egress:*=0.05, gpu:h100=x1.5 or gpu:h100@X=3.2",
    "gpus": "site:X=-50%, gpu:h100=-50% or gpu:h100@X=16",
}


class ScenarioError(NetplanError):
    """A scenario that cannot be read or does not fit the topology: `where` names the option or
    field (`--degrade`, `scenarios[1].price[0]`), `text` what was given, `line` its line."""

    def __init__(self, where: str, text: str | None, message: str,
                 line: int | None = None) -> None:
        self.where = where
        self.text = text
        self.message = message
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        given = f" {self.text!r}" if self.text is not None else ""
        at = f" (line {self.line})" if self.line is not None else ""
        return f"{self.where}{given}: {self.message}{at}"


@dataclass(frozen=True)
class Change:
    """One change. `target` is ("site", X), ("link", A, B), ("egress", X or "*"),
    ("gpu", type, site or "") ; `value` the number and `mode` how it applies:
    "factor" (multiply), "absolute" (set), or "" for a failure."""

    kind: ChangeKind
    target: tuple[str, ...]
    value: float = 0.0
    mode: Literal["factor", "absolute", ""] = ""
    text: str = ""  # as the user wrote it, for tables

    def label(self) -> str:
        return f"{self.kind} {self.text}"


@dataclass(frozen=True)
class Scenario:
    name: str
    changes: tuple[Change, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "changes": [c.label() for c in self.changes]}


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def _number(text: str, where: str, whole: str, what: str) -> float:
    if not re.fullmatch(_NUMBER, text):
        raise ScenarioError(where, whole, f"{what} {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise ScenarioError(where, whole, f"{what} {text!r} is not a finite number")
    return value


def _split_value(kind: ChangeKind, text: str, where: str) -> tuple[str, str]:
    if "=" not in text:
        raise ScenarioError(where, text, f"needs a value after '=' (e.g. {_EXAMPLES[kind]})")
    head, _, value = text.partition("=")
    if not value.strip():
        raise ScenarioError(where, text, f"the value after '=' is empty (e.g. {_EXAMPLES[kind]})")
    return head.strip(), value.strip()


def _link_target(head: str, where: str, whole: str, kind: ChangeKind) -> tuple[str, ...]:
    prefix, sep, rest = head.partition(":")
    if not sep or prefix != "link":
        raise ScenarioError(where, whole, f"{head!r} is not a link (write link:A,B; "
                            f"e.g. {_EXAMPLES[kind]})")
    ends = [e.strip() for e in rest.split(",")]
    if len(ends) != 2 or not all(ends):
        raise ScenarioError(where, whole, f"{head!r} must name two sites: link:A,B")
    if ends[0] == ends[1]:
        raise ScenarioError(where, whole, f"{head!r} names the same site twice")
    return ("link", ends[0], ends[1])


def _percent(value: str, where: str, whole: str, what: str) -> float:
    if not value.endswith("%"):
        raise ScenarioError(where, whole, f"{what} {value!r} needs a % sign (e.g. -50%)")
    return _number(value[:-1].strip(), where, whole, what) / 100.0


def parse_change(kind: str, text: str, where: str | None = None) -> Change:
    """One change from its text form (see the module docstring); `where` names the option or
    field in errors (default `--<kind>`)."""
    where = where or f"--{kind}"
    if kind not in CHANGE_KINDS:
        raise ScenarioError(where, text, f"unknown change {kind!r} (one of "
                            f"{', '.join(CHANGE_KINDS)})")
    k: ChangeKind = next(c for c in CHANGE_KINDS if c == kind)
    text = text.strip()
    if k == "fail":
        prefix, sep, rest = text.partition(":")
        if prefix == "site" and sep:
            if not rest.strip() or "," in rest or "=" in rest:
                raise ScenarioError(where, text, "write site:X with one site id")
            return Change("fail", ("site", rest.strip()), text=text)
        if prefix == "link" and sep:
            if "=" in rest:
                raise ScenarioError(where, text, "a failure takes no value: link:A,B")
            return Change("fail", _link_target(text, where, text, k), text=text)
        raise ScenarioError(where, text, f"{prefix!r} cannot fail: write {_EXAMPLES['fail']}")
    head, value = _split_value(k, text, where)
    if k in ("degrade", "loss"):
        ends = _link_target(head, where, text, k)
        if k == "loss":
            pct = _percent(value, where, text, "loss") * 100
            if not 0 <= pct < 100:
                raise ScenarioError(where, text, f"loss {value} must be >= 0% and < 100%")
            return Change("loss", ends, pct, "absolute", text)
        low = value.lower()
        if low.endswith("gbps"):
            gbps = _number(low[:-4].strip(), where, text, "bandwidth")
            if not MIN_BANDWIDTH_GBPS <= gbps <= MAX_QUANTITY:
                raise ScenarioError(where, text, f"bandwidth {value} must be between "
                                    f"{MIN_BANDWIDTH_GBPS:g} and {MAX_QUANTITY:g} Gbit/s")
            return Change("degrade", ends, gbps, "absolute", text)
        share = _percent(value, where, text, "bandwidth")
        if value.startswith(("-", "+")):
            share = 1.0 + share
        if not 0 < share:
            raise ScenarioError(where, text, f"bandwidth {value} leaves nothing: fail the link "
                                "instead (--fail link:A,B)")
        return Change("degrade", ends, share, "factor", text)
    prefix, sep, rest = head.partition(":")
    if not sep or not rest.strip():
        raise ScenarioError(where, text, f"{head!r}: write {_EXAMPLES[k]}")
    rest = rest.strip()
    if k == "price":
        target: tuple[str, ...]
        if prefix == "egress":
            target = ("egress", rest)
        elif prefix == "gpu":
            gpu, _, at = rest.partition("@")
            if not gpu.strip():
                raise ScenarioError(where, text, "name the GPU type: gpu:TYPE or gpu:TYPE@SITE")
            target = ("gpu", gpu.strip(), at.strip())
        else:
            raise ScenarioError(where, text, f"{prefix!r} has no price here: write "
                                f"{_EXAMPLES['price']}")
        if value.lower().startswith("x"):
            factor = _number(value[1:].strip(), where, text, "multiplier")
            if factor < 0:
                raise ScenarioError(where, text, f"multiplier {value} must be >= 0")
            return Change("price", target, factor, "factor", text)
        price = _number(value.lstrip("$"), where, text, "price")
        if not 0 <= price <= MAX_QUANTITY:
            raise ScenarioError(where, text, f"price {value} must be >= 0 and <= "
                                f"{MAX_QUANTITY:g}")
        return Change("price", target, price, "absolute", text)
    # gpus
    target = ()
    if prefix == "site":
        if "@" in rest:
            raise ScenarioError(where, text, "for one GPU type at a site write gpu:TYPE@SITE")
        target = ("gpu", "", rest)
    elif prefix == "gpu":
        gpu, _, at = rest.partition("@")
        target = ("gpu", gpu.strip(), at.strip())
    else:
        raise ScenarioError(where, text, f"{prefix!r}: write {_EXAMPLES['gpus']}")
    if value.endswith("%"):
        change = _percent(value, where, text, "change")
        if not value.startswith(("-", "+")):
            raise ScenarioError(where, text, f"a relative change needs a sign: -{value} or "
                                f"+{value}")
        if change < -1:
            raise ScenarioError(where, text, f"change {value} is below -100%")
        return Change("gpus", target, 1.0 + change, "factor", text)
    if not target[2] or not target[1]:
        raise ScenarioError(where, text, "an exact GPU count needs one type at one site: "
                            "gpu:TYPE@SITE=N")
    count = _number(value, where, text, "GPU count")
    if not 0 <= count <= MAX_QUANTITY or count != int(count):
        raise ScenarioError(where, text, f"GPU count {value} must be a whole number >= 0 and "
                            f"<= {MAX_QUANTITY:g}")
    return Change("gpus", target, count, "absolute", text)


def scenario_from_options(options: Mapping[str, Sequence[str]], name: str | None = None
                          ) -> Scenario | None:
    """The scenario the command-line options describe (None when there are none)."""
    changes = tuple(parse_change(kind, text) for kind in CHANGE_KINDS
                    for text in options.get(kind, ()))
    if not changes:
        return None
    return Scenario(name or " + ".join(c.label() for c in changes), changes)


_SCENARIO_KEYS = ("name", *CHANGE_KINDS)


def parse_scenarios(data: Any, lines: Mapping[tuple[str | int, ...], int] | None = None
                    ) -> tuple[Scenario, ...]:
    """Named scenarios from a parsed document `{scenarios: [{name, fail: [...], ...}]}`;
    `lines` maps field paths to lines for the errors."""
    lines = lines or {}

    def line(path: tuple[str | int, ...]) -> int | None:
        p = path
        while p:
            if p in lines:
                return lines[p]
            p = p[:-1]
        return None

    def fail(path: tuple[str | int, ...], message: str, text: str | None = None) -> ScenarioError:
        return ScenarioError(format_path(path), text, message, line(path))

    if not isinstance(data, dict):
        raise fail((), "expected a mapping with a `scenarios:` list")
    extra = [k for k in data if k != "scenarios"]
    if extra:
        raise fail((str(extra[0]),), "unknown key (the file holds `scenarios:` only)")
    items = data.get("scenarios")
    if not isinstance(items, list) or not items:
        raise fail(("scenarios",), "must be a non-empty list of scenarios")
    out: list[Scenario] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path: tuple[str | int, ...] = ("scenarios", i)
        if not isinstance(item, dict):
            raise fail(path, "must be a mapping with a name and changes")
        for key in item:
            if key not in _SCENARIO_KEYS:
                raise fail((*path, str(key)), f"unknown key (one of {', '.join(_SCENARIO_KEYS)})")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise fail((*path, "name"), "required: a name for the scenario")
        if name in seen:
            raise fail((*path, "name"), f"duplicate name {name!r} (also scenarios[{seen[name]}])")
        seen[name] = i
        changes: list[Change] = []
        for kind in CHANGE_KINDS:
            given = item.get(kind)
            if given is None:
                continue
            if isinstance(given, str):
                given = [given]
            if not isinstance(given, list):
                raise fail((*path, kind), "must be a list of changes, e.g. "
                           f"[{_EXAMPLES[kind].split(',')[0]}]")
            for j, text in enumerate(given):
                where = (*path, kind, j)
                if not isinstance(text, str):
                    raise fail(where, f"must be text such as {_EXAMPLES[kind].split(',')[0]}")
                try:
                    changes.append(parse_change(kind, text, format_path(where)))
                except ScenarioError as exc:
                    hint = ""
                    if text.strip().startswith("link:") and "," not in text:
                        # [link:A,B=30%] is two items to YAML: the comma ends the first.
                        hint = ("; in a [flow, list] a comma separates items: quote the "
                                "change ('link:A,B=30%') or put it on its own '- ' line")
                    raise ScenarioError(exc.where, exc.text, exc.message + hint,
                                        line(where)) from None
        if not changes:
            raise fail(path, f"scenario {name!r} changes nothing (give one of "
                       f"{', '.join(CHANGE_KINDS)})")
        out.append(Scenario(name, tuple(changes)))
    return tuple(out)


def load_scenario_file(path: str | Path, limits: Limits | None = None) -> tuple[Scenario, ...]:
    """Read a YAML file of named scenarios (bounded, see `netplan.safeyaml`); every error names
    the file, the field and the line."""
    p = Path(path)
    try:
        text = read_text_bounded(p) if limits is None else read_text_bounded(p, limits)
        doc = parse(text) if limits is None else parse(text, limits)
    except DocumentError as exc:
        raise ScenarioError(str(p), None, exc.describe()) from None
    except OSError as exc:
        raise ScenarioError(str(p), None, f"cannot read file: {exc.strerror or exc}") from None
    try:
        return parse_scenarios(doc.data, doc.lines)
    except ScenarioError as exc:
        raise ScenarioError(f"{p}: {exc.where}", exc.text, exc.message, exc.line) from None


# -- checking against a topology and sweeping -------------------------------------------------


class ElementIndex:
    """The topology's links by pair and by site, so a scenario's reach is found without walking
    every link (a sweep asks it thousands of times)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.by_pair: dict[frozenset[str], Link] = {frozenset(k.between): k
                                                    for k in topology.links}
        self.by_site: dict[str, list[Link]] = {}
        for link in topology.links:
            for end in link.between:
                self.by_site.setdefault(end, []).append(link)


def check_scenario(topology: Topology, scenario: Scenario,
                   index: ElementIndex | None = None) -> None:
    """ScenarioError naming the change whose site, link or GPU type the topology lacks."""
    sites = topology.site_by_id
    links = (index or ElementIndex(topology)).by_pair
    gpu_types = {g for s in topology.sites for g in s.gpus}
    for c in scenario.changes:
        where = f"--{c.kind}"
        kind, *rest = c.target
        if kind == "site" and rest[0] not in sites:
            raise ScenarioError(where, c.text, f"no site {rest[0]!r} in {topology.name}")
        if kind == "link":
            for end in rest:
                if end not in sites:
                    raise ScenarioError(where, c.text, f"no site {end!r} in {topology.name}")
            if frozenset(rest) not in links:
                raise ScenarioError(where, c.text, f"no link between {rest[0]} and {rest[1]}")
        if kind == "egress" and rest[0] != "*" and rest[0] not in sites:
            raise ScenarioError(where, c.text, f"no site {rest[0]!r} in {topology.name}")
        if kind == "gpu":
            gpu, at = rest
            if at and at not in sites:
                raise ScenarioError(where, c.text, f"no site {at!r} in {topology.name}")
            if gpu and gpu not in gpu_types and not (c.kind == "gpus" and c.mode == "absolute"):
                raise ScenarioError(where, c.text, f"no site has GPU type {gpu!r}")


def sweep(topology: Topology, kind: str, max_scenarios: int = 100_000) -> tuple[Scenario, ...]:
    """`n-1`: every site, then every link, failing alone; `n-2`: every pair of them (a link is
    not paired with one of its own ends, whose failure takes it down anyway)."""
    elements: list[Change] = [Change("fail", ("site", s.id), text=f"site:{s.id}")
                              for s in topology.sites]
    elements += [Change("fail", ("link", *link.between), text=f"link:{','.join(link.between)}")
                 for link in topology.links]
    if kind == "n-1":
        return tuple(Scenario(c.text, (c,)) for c in elements)
    if kind != "n-2":
        raise ScenarioError("--sweep", kind, "must be n-1 or n-2")
    n = len(elements)
    if n * (n - 1) // 2 > max_scenarios:
        raise ScenarioError("--sweep", kind, f"{n:,} sites and links make {n * (n - 1) // 2:,} "
                            f"pairs, more than --max-scenarios {max_scenarios:,}")
    out = []
    for a, b in itertools.combinations(elements, 2):
        if a.target[0] == "site" and b.target[0] == "link" and a.target[1] in b.target[1:]:
            continue
        out.append(Scenario(f"{a.text} + {b.text}", (a, b)))
    return tuple(out)


# -- applying a scenario ----------------------------------------------------------------------


@dataclass(frozen=True)
class Touch:
    """What a scenario reaches: the sites and link directions whose change can alter a decision
    that uses them, and whether every change only makes things worse (`worsens`; otherwise any
    decision may change, since a cheaper or faster option may appear anywhere)."""

    sites: frozenset[str]
    directions: frozenset[Direction]
    worsens: bool
    failed_sites: frozenset[str]
    failed_links: frozenset[frozenset[str]]

    def reaches(self, sites: Iterable[str], directions: Iterable[Direction]) -> bool:
        return (not self.worsens or not self.sites.isdisjoint(sites)
                or not self.directions.isdisjoint(directions))


def touch(topology: Topology, scenario: Scenario, index: ElementIndex | None = None) -> Touch:
    """The reach of `scenario` on `topology` (see `Touch`), without applying it."""
    index = index or ElementIndex(topology)
    dead = frozenset(c.target[1] for c in scenario.changes
                     if c.kind == "fail" and c.target[0] == "site")
    dead_links = frozenset(frozenset(c.target[1:]) for c in scenario.changes
                           if c.kind == "fail" and c.target[0] == "link")
    sites: set[str] = set(dead)
    directions: set[Direction] = set()
    worsens = True

    def both(link: Link) -> None:
        a, b = link.between
        directions.update({(a, b), (b, a)})

    for failed in dead:
        for link in index.by_site.get(failed, ()):
            both(link)
    for pair in dead_links:
        both(index.by_pair[pair])
    old: float
    new: float
    for c in scenario.changes:
        kind = c.target[0]
        if c.kind in ("degrade", "loss"):
            link = index.by_pair[frozenset(c.target[1:])]
            for end in link.between:
                old = link.bandwidth_from(end) if c.kind == "degrade" else link.loss_from(end)
                new = (old * c.value if c.mode == "factor" else c.value)
                if (new > old + 1e-12) if c.kind == "degrade" else (new < old - 1e-12):
                    worsens = False
            both(link)
        elif c.kind == "price" and kind == "egress":
            who = c.target[1]
            links = (topology.links if who == "*" else index.by_site.get(who, ()))
            for link in links:
                for sender in link.between:
                    if who in ("*", sender):
                        old = link.egress_from(sender)
                        new = old * c.value if c.mode == "factor" else c.value
                        worsens = worsens and new >= old - 1e-12
                        directions.add((sender, link.other_end(sender)))
        elif kind == "gpu":
            gpu, at = c.target[1], c.target[2]
            for site in ([topology.site(at)] if at else topology.sites):
                table = site.gpus if c.kind == "gpus" else site.gpu_hour_usd
                for g in ([gpu] if gpu else list(table)):
                    if c.kind == "gpus":
                        old = site.gpus.get(g, 0)
                        new = (math.floor(old * c.value + 1e-9) if c.mode == "factor"
                               else int(c.value))
                    elif g in site.gpu_hour_usd:
                        old = site.gpu_hour_usd[g]
                        new = old * c.value if c.mode == "factor" else c.value
                    else:
                        continue
                    if new != old:
                        worsens = worsens and (new < old if c.kind == "gpus" else new > old)
                        sites.add(site.id)
    return Touch(frozenset(sites), frozenset(directions), worsens, dead, dead_links)


@dataclass(frozen=True)
class AppliedScenario:
    """A scenario applied to a topology: the changed topology, its reach, and what it took
    away."""

    scenario: Scenario
    topology: Topology
    reach: Touch
    lost: Mapping[str, str] = field(default_factory=dict)  # artifact id -> why it is gone
    rehomed: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # id -> (old, new)
    dropped: Mapping[str, str] = field(default_factory=dict)  # workload id -> why
    notes: tuple[str, ...] = ()


def _best_copy(index: ElementIndex, holders: Sequence[str], reach: Touch) -> str | None:
    """The surviving copy with the most link capacity leaving it (ties: topology order)."""
    alive = [s for s in holders if s not in reach.failed_sites]
    if not alive:
        return None

    def capacity(site: str) -> float:
        return sum(link.bandwidth_from(site) for link in index.by_site.get(site, ())
                   if frozenset(link.between) not in reach.failed_links
                   and link.other_end(site) not in reach.failed_sites)

    order = {s.id: i for i, s in enumerate(index.topology.sites)}
    return max(alive, key=lambda s: (capacity(s), -order[s]))


def _new_value(old: float, change: Change, least: float = 0.0) -> float:
    """The changed value, kept within what a topology may state (`least` to MAX_QUANTITY): a
    factor such as x1e300 or -99.9999999999999 % stops there, where past it the planner's
    sums turned inf and its costs NaN."""
    new = old * change.value if change.mode == "factor" else change.value
    return min(max(new, least), MAX_QUANTITY)


def _changed_link(link: Link, changes: Sequence[Change]) -> Link:
    pair = frozenset(link.between)
    update: dict[str, Any] = {}
    for c in changes:
        if c.target[0] == "link" and frozenset(c.target[1:]) == pair:
            if c.kind == "degrade":
                update["bandwidth_gbps"] = {
                    e: _new_value(link.bandwidth_from(e), c, MIN_BANDWIDTH_GBPS)
                    for e in link.between}
            elif c.kind == "loss":
                update["loss_pct"] = c.value
        elif c.kind == "price" and c.target[0] == "egress":
            prices = dict(update.get("egress_usd_per_gb")
                          or {e: link.egress_from(e) for e in link.between})
            for sender in link.between:
                if c.target[1] in ("*", sender):
                    prices[sender] = _new_value(prices[sender], c)
            update["egress_usd_per_gb"] = prices
    return link.model_copy(update=update) if update else link


def _changed_site(site: Site, changes: Sequence[Change], notes: list[str]) -> Site:
    gpus, prices = dict(site.gpus), dict(site.gpu_hour_usd)
    for c in changes:
        if c.target[0] != "gpu" or (c.target[2] and c.target[2] != site.id):
            continue
        gpu = c.target[1]
        if c.kind == "gpus":
            for g in ([gpu] if gpu else list(gpus)):
                old = gpus.get(g, 0)
                gpus[g] = math.floor(_new_value(old, c) + 1e-9)
                if g not in prices:
                    notes.append(f"{site.id} gets {gpus[g]} {g} GPUs without a price: "
                                 "priced at $0")
                    prices[g] = 0.0
        elif gpu in prices:
            prices[gpu] = _new_value(prices[gpu], c)
    if gpus == site.gpus and prices == site.gpu_hour_usd:
        return site
    return site.model_copy(update={"gpus": gpus, "gpu_hour_usd": prices})


class _Remains:
    """What is left of each section once the failed sites are gone: artifacts served from a
    surviving copy or lost, workloads without lost inputs or failed clients, indexes, rules
    and checkpoint targets without failed sites. Collects what was lost, moved and dropped."""

    def __init__(self, index: ElementIndex, reach: Touch, copies: Mapping[str, Sequence[str]],
                 shard_sites: Mapping[str, Sequence[Sequence[str]]]) -> None:
        self.index = index
        self.reach = reach
        self.dead = reach.failed_sites
        self.copies = copies
        self.shard_sites = shard_sites
        self.order = {s.id: i for i, s in enumerate(index.topology.sites)}
        self.lost: dict[str, str] = {}
        self.rehomed: dict[str, tuple[str, str]] = {}
        self.dropped: dict[str, str] = {}
        self.notes: list[str] = []

    def _home(self, kind: str, ident: str, home: str) -> str | None:
        if home not in self.dead:
            return home
        held = [s for s in self.copies.get(ident, ()) if s != home]
        best = _best_copy(self.index, held, self.reach)
        if best is None:
            self.lost[ident] = (
                f"{kind} {ident} had no copy outside {home}" if not held else
                f"{kind} {ident}: {home} and every copy ({', '.join(held)}) failed")
            return None
        self.rehomed[ident] = (home, best)
        return best

    def artifacts(self, kind: str, items: Sequence[ArtifactT]) -> tuple[ArtifactT, ...]:
        """Datasets or models that survive, each at its own site or its best copy."""
        out = []
        for item in items:
            home = self._home(kind, item.id, item.site)
            if home is not None:
                out.append(item if home == item.site else item.model_copy(update={"site": home}))
        return tuple(out)

    def workloads(self, topology: Topology) -> tuple[Workload, ...]:
        """(after `artifacts`, which decides what is lost)"""
        out: list[Workload] = []
        for wl in topology.workloads:
            needs = [d for d in (*wl.datasets, *([wl.model] if wl.model else []))
                     if d in self.lost]
            if needs:
                self.dropped[wl.id] = "; ".join(self.lost[d] for d in needs)
                continue
            if wl.clients and self.dead.intersection(wl.clients):
                clients = tuple(c for c in wl.clients if c not in self.dead)
                if not clients:
                    self.dropped[wl.id] = "every client site failed: nothing left to serve"
                    continue
                wl = wl.model_copy(update={"clients": clients})
            out.append(wl)
        return tuple(out)

    def indexes(self, topology: Topology) -> tuple[Any, ...]:
        out = []
        for ix in topology.vector_indexes:
            update: dict[str, Any] = {}
            if self.dead.intersection(ix.queries):
                update["queries"] = {q: v for q, v in ix.queries.items() if q not in self.dead}
            if ix.site in self.dead:
                placed = self.shard_sites.get(ix.id, ())
                if not placed or any(all(s in self.dead for s in shard) for shard in placed):
                    self.lost[ix.id] = (f"vector index {ix.id}: a shard had no replica "
                                        f"outside {', '.join(sorted(self.dead))}")
                    continue
                held: dict[str, int] = {}
                for shard in placed:
                    for s in shard:
                        if s not in self.dead:
                            held[s] = held.get(s, 0) + 1
                best = max(held, key=lambda s: (held[s], -self.order[s]))
                self.rehomed[ix.id] = (ix.site, best)
                update["site"] = best
            out.append(ix.model_copy(update=update) if update else ix)
        return tuple(out)

    def rules(self, topology: Topology) -> tuple[Any, ...]:
        out = []
        for rule in topology.sync_rules:
            update: dict[str, Any] = {}
            if any(d in self.lost for d in rule.datasets):
                update["datasets"] = tuple(d for d in rule.datasets if d not in self.lost)
                if not update["datasets"] and rule.tier is None:
                    self.notes.append(f"sync rule {rule.id}: every dataset it selects is lost")
                    continue
            if isinstance(rule.to, tuple) and self.dead.intersection(rule.to):
                update["to"] = tuple(s for s in rule.to if s not in self.dead)
            out.append(rule.model_copy(update=update) if update else rule)
        return tuple(out)

    def checkpoints(self, topology: Topology, kept: set[str]) -> tuple[Any, ...]:
        out = []
        for ck in topology.checkpoint_replication:
            if ck.workload not in kept:
                continue
            if self.dead.intersection(ck.to):
                ck = ck.model_copy(update={"to": tuple(s for s in ck.to if s not in self.dead)})
            out.append(ck)
        return tuple(out)


def apply_scenario(topology: Topology, scenario: Scenario,
                   copies: Mapping[str, Sequence[str]] | None = None,
                   shard_sites: Mapping[str, Sequence[Sequence[str]]] | None = None,
                   index: ElementIndex | None = None) -> AppliedScenario:
    """`topology` with `scenario` applied. `copies`: artifact id (dataset or model) -> the sites
    the plan keeps a copy at besides its own site (a failed site's artifacts move to the
    best-connected surviving copy); `shard_sites`: vector index -> replica sites per shard (a
    failed primary moves to the surviving site holding the most shards)."""
    index = index or ElementIndex(topology)
    check_scenario(topology, scenario, index)
    reach = touch(topology, scenario, index)
    dead, dead_links = reach.failed_sites, reach.failed_links
    left = _Remains(index, reach, copies or {}, shard_sites or {})
    edits = [c for c in scenario.changes if c.kind != "fail"]
    links = tuple(
        _changed_link(link, edits) if edits else link for link in topology.links
        if frozenset(link.between) not in dead_links and not dead.intersection(link.between))
    sites = tuple(_changed_site(site, edits, left.notes) if edits else site
                  for site in topology.sites if site.id not in dead)
    fields = {name: getattr(topology, name) for name in type(topology).model_fields}
    fields.update(sites=sites, links=links, datasets=left.artifacts("dataset", topology.datasets),
                  models=left.artifacts("model", topology.models))
    fields["workloads"] = workloads = left.workloads(topology)
    fields.update(vector_indexes=left.indexes(topology), sync_rules=left.rules(topology),
                  checkpoint_replication=left.checkpoints(topology, {w.id for w in workloads}))
    # (model_construct: every reference above stays valid by construction, and validating a
    # 1,000-site topology again for each of thousands of scenarios would cost more than the
    # re-planning)
    changed = Topology.model_construct(**fields)
    return AppliedScenario(scenario, changed, reach, left.lost, left.rehomed, left.dropped,
                           tuple(left.notes))
