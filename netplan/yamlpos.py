"""YAML documents with source positions, and validation errors that name the field and the line.

Both the planner (topology files) and the daemon (site configs) validate YAML with pydantic; this
module owns turning a document into plain data plus a map from field path to line number, and a
pydantic `ValidationError` into messages such as ``links[3].rtt_ms: must be >= 0 (line 41)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from netplan.safeyaml import DEFAULT_LIMITS, DocumentError, Limits, compose_bounded

__all__ = [
    "DocumentError",
    "FieldIssue",
    "YamlDocument",
    "YamlSyntaxError",
    "field_issues",
    "format_path",
    "load_data",
    "parse",
]

Path = tuple[str | int, ...]

# The reader's one error: syntax, size, encoding, depth or alias expansion (see netplan.safeyaml).
# The old name stays, because site-config and scenario loaders catch it.
YamlSyntaxError = DocumentError


@dataclass(frozen=True)
class YamlDocument:
    data: Any
    lines: dict[Path, int]

    def line_of(self, path: Iterable[str | int]) -> int | None:
        """The line of the deepest node on `path` that the document has (a missing key points
        at its parent mapping)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            _walk(value_node, (*path, key), lines)
            # The key's own line is more useful than the value's for block mappings.
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines)


def load_data(text: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse one YAML document (safe loader, bounded: see `netplan.safeyaml`) without recording
    positions: the fast path for documents that turn out valid; call `parse` for line numbers
    when something is wrong."""
    return compose_bounded(text, limits=limits)[1]


def parse(text: str, limits: Limits = DEFAULT_LIMITS) -> YamlDocument:
    """Parse one YAML document (safe loader, bounded) and record the line of every node."""
    node, data = compose_bounded(text, limits=limits, loader=yaml.SafeLoader)
    lines: dict[Path, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return YamlDocument(data=data, lines=lines)


def format_path(path: Iterable[str | int]) -> str:
    """('links', 3, 'rtt_ms') -> 'links[3].rtt_ms'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<document>"


_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^Input should be greater than or equal to (.+)$"), r"must be >= \1"),
    (re.compile(r"^Input should be greater than (.+)$"), r"must be > \1"),
    (re.compile(r"^Input should be less than or equal to (.+)$"), r"must be <= \1"),
    (re.compile(r"^Input should be less than (.+)$"), r"must be < \1"),
    (re.compile(r"^Extra inputs are not permitted$"), "unknown key"),
    (re.compile(r"^Field required$"), "required field is missing"),
    (re.compile(r"^Value error, (.+)$", re.S), r"\1"),
    (re.compile(r"^Assertion failed, (.+)$", re.S), r"\1"),
]


@dataclass(frozen=True)
class FieldIssue:
    path: Path
    message: str
    line: int | None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{format_path(self.path)}: {self.message}{where}"


def _clean_loc(loc: tuple[Any, ...]) -> Path:
    # pydantic inserts union/tag members ("function-after[...]", "float", "dict[str,float]")
    # into loc; keep only the parts that exist in the document.
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif isinstance(part, str) and not any(ch in part for ch in "[]()"):
            out.append(part)
    return tuple(out)


def field_issues(exc: ValidationError, doc: YamlDocument) -> list[FieldIssue]:
    """Turn a pydantic error into one issue per failing field, each with its YAML line."""
    issues: list[FieldIssue] = []
    seen: set[tuple[Path, str]] = set()
    for err in exc.errors(include_url=False):
        path = _clean_loc(tuple(err["loc"]))
        msg = str(err["msg"])
        for pattern, repl in _REWRITES:
            if pattern.match(msg):
                msg = pattern.sub(repl, msg)
                break
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        issues.append(FieldIssue(path=path, message=msg, line=doc.line_of(path)))
    return issues
