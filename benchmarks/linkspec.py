"""Link specs: what an emulated WAN link does to packets (rate, one-way delay, jitter, loss, queue
limit), from a YAML mapping or a one-line form such as
``rate=1000mbit delay=20ms jitter=2ms loss=0.5% limit=1000``.
Every backend (netem or userspace) takes the same `LinkSpec`, so results are comparable.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from benchmarks.errors import ScenarioError
from netplan.yamlpos import FieldIssue, YamlDocument, field_issues

__all__ = ["LinkSpec", "parse_link_spec"]

# netem's own default `limit` (packets); used for the bottleneck queue when a spec names none.
DEFAULT_QUEUE_LIMIT_PKTS = 1000


class LinkSpec(BaseModel):
    """One direction's impairment, applied to both directions of a link (as netem on both ends).

    `rate_mbit` None means no rate cap; `delay_ms` is one-way (the RTT is twice it);
    `jitter_ms` is the half-width of a uniform spread around the delay (netem's default shape);
    `queue_limit_pkts` is the bottleneck queue in MTU-sized packets.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_mbit: float | None = Field(default=None, gt=0, le=100_000)
    delay_ms: float = Field(default=0.0, ge=0, le=10_000)
    jitter_ms: float = Field(default=0.0, ge=0, le=10_000)
    loss_pct: float = Field(default=0.0, ge=0, le=100)
    queue_limit_pkts: int = Field(default=DEFAULT_QUEUE_LIMIT_PKTS, ge=1, le=1_000_000)

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms

    @property
    def impaired(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    def describe(self) -> str:
        parts = [f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "no rate cap"]
        parts.append(f"{self.delay_ms:g} ms one-way")
        if self.jitter_ms:
            parts.append(f"+-{self.jitter_ms:g} ms jitter")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g}% loss")
        parts.append(f"queue {self.queue_limit_pkts} pkts")
        return ", ".join(parts)

    def summary(self) -> dict[str, float | None]:
        """The `link` object of a results file."""
        return {
            "rate_mbit": self.rate_mbit,
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss_pct": self.loss_pct,
        }


# key -> (field, {unit suffix: factor to the field's unit})
_ONE_LINE_KEYS: dict[str, tuple[str, dict[str, float]]] = {
    "rate": ("rate_mbit", {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "": 1.0}),
    "delay": ("delay_ms", {"us": 1e-3, "ms": 1.0, "s": 1e3, "": 1.0}),
    "jitter": ("jitter_ms", {"us": 1e-3, "ms": 1.0, "s": 1e3, "": 1.0}),
    "loss": ("loss_pct", {"%": 1.0, "": 1.0}),
    "limit": ("queue_limit_pkts", {"": 1.0, "pkts": 1.0}),
}
_TOKEN = re.compile(r"^([a-z_]+)=([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)([a-z%]*)$", re.I)


def _from_one_line(text: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for token in text.split():
        match = _TOKEN.match(token)
        if not match:
            raise ScenarioError("link spec", [f"{token!r}: expected KEY=NUMBER[UNIT]"])
        key, number, unit = match.group(1).lower(), float(match.group(2)), match.group(3).lower()
        if key in {field for field, _ in _ONE_LINE_KEYS.values()}:
            data[key] = number  # the YAML field names are accepted too, in their own unit
            continue
        if key not in _ONE_LINE_KEYS:
            known = ", ".join(_ONE_LINE_KEYS)
            raise ScenarioError("link spec", [f"{key}: unknown key (known: {known})"])
        field, units = _ONE_LINE_KEYS[key]
        if unit not in units:
            raise ScenarioError(
                "link spec", [f"{key}: unknown unit {unit!r} (use one of {sorted(units)})"]
            )
        value = number * units[unit]
        data[field] = int(value) if field == "queue_limit_pkts" else value
    return data


def parse_link_spec(
    spec: str | dict[str, Any],
    *,
    doc: YamlDocument | None = None,
    path: tuple[str | int, ...] = (),
    source: str = "link spec",
) -> LinkSpec:
    """A validated `LinkSpec` from the one-line form or a mapping (with `doc` and `path` when it
    came from a YAML file, so errors name the field and its line)."""
    data = _from_one_line(spec) if isinstance(spec, str) else spec
    if not isinstance(data, dict):
        line = doc.line_of(path) if doc else None
        raise ScenarioError(source, [FieldIssue(path, "must be a mapping", line)])
    try:
        return LinkSpec.model_validate(data)
    except ValidationError as exc:
        if doc is None:
            doc = YamlDocument(data=data, lines={})
        issues = field_issues(exc, doc)
        issues = [
            FieldIssue((*path, *i.path), i.message, doc.line_of((*path, *i.path)))
            for i in issues
        ]
        raise ScenarioError(source, issues) from exc
