"""The one way the daemon reads the documents users hand it (the site config, a plan): hostile
or broken input becomes a ConfigError naming the file, in bounded time and memory, never a
traceback.

Theory of operation. Before anything is built from a document: its size is checked against a
limit before it is read; its bytes must be UTF-8 (a bad byte is named by offset and line); a
YAML document is composed into its node graph (what the text costs) and one iterative walk
with a memo per node counts how deep it nests and how many nodes it has with every alias
expanded, so a "billion laughs" alias bomb or a deeply nested list is refused before pydantic
or a line-number walk would expand it; JSON is parsed by Python (its RecursionError becomes a
depth error) and walked for depth the same way. Only then is the document validated.

netplan has the same reader for its topologies (netplan.safeyaml, on its way to main); when it
lands, `_check_yaml` and `_json_depth` give way to it and this module keeps only the mapping to
ConfigError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from netplan import yamlpos
from transferd.errors import ConfigError

__all__ = ["MAX_DEPTH", "load_json_document", "parse_yaml_document", "read_document_text"]

# libyaml's loader when PyYAML has it: the checks compose every document once more.
_FastLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # a site config nests 4 levels and a plan 6: far inside
MAX_EXPANDED_NODES = 1_000_000  # nodes with aliases expanded; a 10,000-site plan is ~1.5 M
ALIAS_ALLOWANCE = 10_000  # aliases may add this many nodes beyond twice what is written


def read_document_text(path: Path, what: str, max_bytes: int) -> str:
    """The text of the file at `path` (`what` names it in errors: "site config", "plan")."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise ConfigError(
                    f"{path}: the {what} is {size:,} bytes, more than the {max_bytes:,} limit",
                    path=path,
                )
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", path=path) from exc
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: the {what} is larger than {max_bytes:,} bytes", path=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: the {what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} (line {line})",
            path=path,
            line=line,
        ) from None


def parse_yaml_document(text: str, source: str) -> yamlpos.YamlDocument:
    """One YAML document with the line of every node, after the checks above."""
    try:
        node = yaml.compose(text, Loader=_FastLoader)
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own limit (1000 levels)
            raise _too_deep(source) from None
        err = yamlpos.YamlSyntaxError(str(exc), None)
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            err = yamlpos.YamlSyntaxError(
                str(exc.problem or exc.context or "invalid YAML"),
                mark.line + 1 if mark is not None else None,
            )
        raise ConfigError(f"{source}: {err}", issues=[str(err)], line=err.line) from None
    except RecursionError:
        raise _too_deep(source) from None
    if node is not None:
        _check_yaml(node, source)
    try:
        return yamlpos.parse(text)
    except yamlpos.YamlSyntaxError as exc:
        raise ConfigError(f"{source}: {exc}", issues=[str(exc)], line=exc.line) from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # e.g. a timestamp out of range, an integer too long for int(), an unhashable key
        raise ConfigError(f"{source}: cannot read a value: {exc}") from None


def load_json_document(text: str, source: str, what: str = "document") -> Any:
    """One JSON document as plain data, after the checks above."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: the {what} is not JSON: {exc.msg} (line {exc.lineno})", line=exc.lineno
        ) from None
    except RecursionError:
        raise _too_deep(source) from None
    except ValueError as exc:  # e.g. an integer beyond int()'s digit limit
        raise ConfigError(f"{source}: cannot read a value: {exc}") from None
    if not _json_depth_ok(data):
        raise _too_deep(source)
    return data


def _too_deep(source: str) -> ConfigError:
    return ConfigError(f"{source}: nesting is deeper than {MAX_DEPTH} levels")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_yaml(root: yaml.Node, source: str) -> None:
    """Depth and expanded size of the node graph, without expanding anything."""
    expanded: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    written = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            expanded[key] = 1 + sum(expanded[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_DEPTH:
                raise _too_deep(source)
            if expanded[key] > MAX_EXPANDED_NODES:
                raise ConfigError(
                    f"{source}: aliases expand the document past {MAX_EXPANDED_NODES:,} nodes "
                    f"(line {node.start_mark.line + 1}): is it an alias bomb?"
                )
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: an alias refers to a node that contains it")
        if len(on_path) >= MAX_DEPTH:
            raise _too_deep(source)
        written += 1
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in expanded)
    if expanded[id(root)] > 2 * written + ALIAS_ALLOWANCE:
        raise ConfigError(
            f"{source}: aliases expand {written:,} written nodes into {expanded[id(root)]:,}: "
            "is it an alias bomb?"
        )


def _json_depth_ok(data: Any) -> bool:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if level > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return True
