"""Reading topology files: YAML text -> a validated, frozen `Topology`, or a `TopologyError`.

This is one of the two places in netplan that touches the filesystem (the CLI is the other). Every
problem becomes an issue naming the field path and its YAML line; nothing else escapes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from netplan.errors import TopologyError
from netplan.topology import Topology
from netplan.yamlpos import (
    FieldIssue,
    YamlDocument,
    YamlSyntaxError,
    field_issues,
    load_data,
    parse,
)

__all__ = ["load_topology", "parse_topology"]


def _positions(text: str) -> YamlDocument:
    """Line numbers for an error message. libyaml accepted the text, so the pure-Python parser
    should too; if the two ever disagree, the message goes without lines rather than crash."""
    try:
        return parse(text)
    except YamlSyntaxError:
        return YamlDocument(data=None, lines={})


def parse_topology(text: str, source: str | None = None) -> Topology:
    """Validate one YAML document as a topology; `source` names it in error messages."""
    try:
        data = load_data(text)
    except YamlSyntaxError as exc:
        # The parser reports end-of-stream problems one line past the text; point at the last.
        line = min(exc.line, max(1, len(text.splitlines()))) if exc.line is not None else None
        raise TopologyError(
            [FieldIssue(path=(), message=f"YAML syntax error: {exc.message}", line=line)],
            source,
        ) from exc
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise TopologyError(
            [FieldIssue(path=(), message=f"expected a mapping at the top, got {kind}", line=1)],
            source,
        )
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        # Only now pay for a second parse that records where every node is.
        raise TopologyError(field_issues(exc, _positions(text)), source) from exc
    except TopologyError as exc:
        doc = _positions(text)
        located = [
            FieldIssue(path=i.path, message=i.message, line=doc.line_of(i.path)) for i in exc.issues
        ]
        raise TopologyError(located, source) from exc
    except (TypeError, ValueError, RecursionError) as exc:
        # Defensive: the YAML parser can build shapes pydantic refuses in unexpected ways
        # (e.g. unhashable keys); the user still gets a message, never a traceback.
        raise TopologyError(
            [FieldIssue(path=(), message=f"cannot read document: {exc}", line=None)], source
        ) from exc


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(
            [FieldIssue(path=(), message=f"cannot read file: {exc}", line=None)], str(p)
        ) from exc
    return parse_topology(text, source=str(p))
