"""Reading topology files: YAML text -> a validated, frozen `Topology`, or a `TopologyError`.

This is one of the two places in netplan that touches the filesystem (the CLI is the other). Every
problem becomes an issue naming the field path and its YAML line; nothing else escapes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from netplan.errors import TopologyError
from netplan.safeyaml import (
    DEFAULT_LIMITS,
    DocumentError,
    Limits,
    load_json_bounded,
    read_text_bounded,
)
from netplan.topology import Topology
from netplan.yamlpos import FieldIssue, YamlDocument, field_issues, load_data, parse

__all__ = ["load_topology", "parse_topology"]


def _positions(text: str) -> YamlDocument:
    """Line numbers for an error message. libyaml accepted the text, so the pure-Python parser
    should too; if the two ever disagree, the message goes without lines rather than crash."""
    try:
        return parse(text)
    except DocumentError:
        return YamlDocument(data=None, lines={})


def parse_topology(
    text: str,
    source: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    json: bool = False,
) -> Topology:
    """Validate one YAML (or, with `json`, JSON) document as a topology; `source` names it in
    error messages. Hostile documents (alias bombs, deep nesting, oversized text) fail fast: see
    `netplan.safeyaml`. Error lines come from the YAML parser either way (JSON is YAML)."""
    try:
        data = load_json_bounded(text, limits=limits) if json else load_data(text, limits)
    except DocumentError as exc:
        # The parser reports end-of-stream problems one line past the text; point at the last.
        line = min(exc.line, max(1, len(text.splitlines()))) if exc.line is not None else None
        raise TopologyError([FieldIssue(path=(), message=exc.summary, line=line)],
                            source) from exc
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


def load_topology(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Topology:
    """Read and validate a topology file (bounded in size, depth and alias expansion): YAML, or
    JSON when the name ends in `.json` (a generated 10,000-site estate: 1.3 s instead of
    12.7 s, median of 3)."""
    p = Path(path)
    try:
        text = read_text_bounded(p, limits)
    except DocumentError as exc:
        raise TopologyError([FieldIssue(path=(), message=exc.summary, line=exc.line)],
                            str(p)) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TopologyError(
            [FieldIssue(path=(), message=f"cannot read file: {reason}", line=None)], str(p)
        ) from exc
    return parse_topology(text, source=str(p), limits=limits,
                          json=p.suffix.lower() == ".json")
