"""One hardened reader for YAML and JSON documents that users hand us (topologies, site configs,
plans): hostile or broken input fails fast, in bounded time and memory, with an error naming the
file and saying what was wrong, never a traceback or a MemoryError.

Theory of operation.
- Size: a file is refused before it is read when it is larger than `Limits.max_bytes` (and the
  bytes actually read are counted again, for files that grow or lie about their size).
- Encoding: UTF-8 (a byte-order mark is allowed); a bad byte is reported by offset and line.
- YAML: the parser composes the node graph first. An alias is a reference to an already composed
  node, so composing costs what the text costs; the danger (the "billion laughs" alias bomb) is
  what comes after, when every alias is expanded into its own copy (pydantic validating, JSON
  printing, a walk over the tree). Before any Python object is built, one iterative walk with a
  memo per node counts the nodes the document has with every alias expanded, and its depth (a
  text without an `&` has no anchor, hence no alias: then one pass level by level finds the
  depth).
  Refused: more expanded nodes than `max_nodes`, aliases that add more nodes than the document
  itself has plus `alias_allowance` (merge keys and a reused block are fine; exponential
  reuse is not), nesting deeper than `max_depth`, and an alias that contains itself. Only then
  is the document constructed.
- JSON: the same size and encoding checks, Python's parser (its RecursionError on deep nesting
  becomes a depth error), and the same depth limit.
Everything raises `DocumentError` (a ValueError with `message`, `line`, `source`, `kind`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DEFAULT_LIMITS",
    "DocumentError",
    "ErrorKind",
    "Limits",
    "compose_bounded",
    "decode_text",
    "load_json_bounded",
    "load_yaml_bounded",
    "read_document",
    "read_text_bounded",
]

ErrorKind = Literal["syntax", "size", "encoding", "depth", "aliases", "value"]

# libyaml's loader when PyYAML has it (about 4x faster on large files); same safe semantics.
_FastLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Limits:
    """What a document may cost. The defaults leave a 10,000-site, 50,000-link topology (about
    20 MB and 1.5 M nodes) far inside every limit."""

    max_bytes: int = 64 * 1024 * 1024
    # Topologies nest about 6 levels; 64 leaves room for any hand-written document.
    max_depth: int = 64
    # Expanded nodes in all; pydantic validates about a million nodes a second.
    max_nodes: int = 20_000_000
    # Aliases may add at most as many nodes as the document has, plus this many.
    alias_allowance: int = 100_000


DEFAULT_LIMITS = Limits()


class DocumentError(ValueError):
    """A document that cannot be read: `kind` says why (syntax, size, encoding, depth, aliases,
    value), `line` is 1-based or None, `source` names the file (or None for text)."""

    def __init__(
        self,
        message: str,
        line: int | None = None,
        *,
        kind: ErrorKind = "syntax",
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.kind: ErrorKind = kind
        self.source = source

    def located(self, source: str) -> DocumentError:
        """The same error, naming `source`."""
        return DocumentError(self.message, self.line, kind=self.kind, source=source)

    @property
    def summary(self) -> str:
        """The message, saying "YAML syntax error" when that is what it is; no line, no file."""
        return ("YAML syntax error: " if self.kind == "syntax" else "") + self.message

    def describe(self) -> str:
        """The summary with its line, without the source."""
        return self.summary + (f" (line {self.line})" if self.line is not None else "")

    def __str__(self) -> str:
        return (f"{self.source}: " if self.source else "") + self.describe()


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f} MiB"


def read_text_bounded(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> str:
    """The file's text, or DocumentError (size, encoding) or OSError (cannot read it)."""
    p = Path(path)
    with p.open("rb") as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError:
            size = 0
        if size > limits.max_bytes:
            raise DocumentError(
                f"the file is {_mib(size)}, more than the {_mib(limits.max_bytes)} limit",
                kind="size", source=str(p))
        data = fh.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise DocumentError(f"the file is larger than the {_mib(limits.max_bytes)} limit",
                            kind="size", source=str(p))
    return decode_text(data, source=str(p))


def decode_text(data: bytes, source: str | None = None) -> str:
    """UTF-8 (with or without a byte-order mark), or DocumentError naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DocumentError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}",
            line, kind="encoding", source=source) from None


def _text(data: str | bytes, limits: Limits, source: str | None) -> str:
    """`data` as text within the size limit (bytes: counted, then decoded as UTF-8)."""
    if isinstance(data, bytes):
        if len(data) > limits.max_bytes:
            raise DocumentError(f"the document is larger than the {_mib(limits.max_bytes)} "
                                "limit", kind="size", source=source)
        data = decode_text(data, source)
    _check_size(data, limits, source)
    return data


def _check_size(text: str, limits: Limits, source: str | None) -> None:
    # A character is at least one byte: only long texts need the exact count.
    if len(text) > limits.max_bytes or (
        len(text) * 4 > limits.max_bytes
        and len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes
    ):
        raise DocumentError(f"the document is larger than the {_mib(limits.max_bytes)} limit",
                            kind="size", source=source)


def _syntax_error(exc: yaml.YAMLError, source: str | None) -> DocumentError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        return DocumentError(str(exc.problem or exc.context or "invalid YAML"), line,
                             source=source)
    return DocumentError(str(exc), None, source=source)


def _line(node: yaml.Node) -> int | None:
    mark = node.start_mark
    return mark.line + 1 if mark is not None else None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_tree(root: yaml.Node, limits: Limits, source: str | None) -> None:
    """The depth of a document without anchors (a tree: nothing to expand), level by level:
    a million-node topology in a fifth of a second."""
    level = [root]
    depth = 0
    while level:
        depth += 1
        if depth > limits.max_depth:
            raise DocumentError(f"nesting is deeper than {limits.max_depth} levels",
                                _line(level[0]), kind="depth", source=source)
        deeper: list[yaml.Node] = []
        for node in level:
            if node.__class__ is yaml.MappingNode:
                deeper += [v for _, v in node.value if v.__class__ is not yaml.ScalarNode]
                deeper += [k for k, _ in node.value if k.__class__ is not yaml.ScalarNode]
            elif node.__class__ is yaml.SequenceNode:
                deeper += [v for v in node.value if v.__class__ is not yaml.ScalarNode]
        level = deeper


def _check_graph(root: yaml.Node, limits: Limits, source: str | None) -> None:
    """Count expanded nodes and depth without expanding anything (memo per node), iteratively,
    so neither an alias bomb nor deep nesting costs more than the composed graph."""
    expanded: dict[int, int] = {}  # id(node) -> nodes below and including it, aliases expanded
    depth: dict[int, int] = {}
    unique = 0
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            total = 1 + sum(expanded[id(k)] for k in kids)
            deep = 1 + max((depth[id(k)] for k in kids), default=0)
            expanded[key], depth[key] = total, deep
            if deep > limits.max_depth:
                raise DocumentError(f"nesting is deeper than {limits.max_depth} levels",
                                    _line(node), kind="depth", source=source)
            if total > limits.max_nodes:
                raise DocumentError(
                    f"aliases expand the document to more than {limits.max_nodes:,} nodes "
                    f"({unique:,} written): is it an alias bomb?",
                    _line(node), kind="aliases", source=source)
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise DocumentError("an alias refers to a node that contains it (a recursive "
                                "structure)", _line(node), kind="aliases", source=source)
        unique += 1
        if len(on_path) >= limits.max_depth:
            raise DocumentError(f"nesting is deeper than {limits.max_depth} levels",
                                _line(node), kind="depth", source=source)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in expanded)
    total = expanded[id(root)]
    if total > 2 * unique + limits.alias_allowance:
        raise DocumentError(
            f"aliases expand {unique:,} nodes into {total:,} (more than "
            f"{2 * unique + limits.alias_allowance:,} allowed: is it an alias bomb?)",
            _line(root), kind="aliases", source=source)


def compose_bounded(
    text: str,
    *,
    source: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    loader: type[yaml.SafeLoader] = _FastLoader,
) -> tuple[yaml.Node | None, Any]:
    """(node graph, constructed data) of one YAML document, after the checks above. `loader`
    is PyYAML's pure-Python SafeLoader when exact node marks matter (it is 4x slower)."""
    _check_size(text, limits, source)
    ld = loader(text)
    try:
        try:
            node = ld.get_single_node()
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, source) from None
        except RecursionError:
            raise DocumentError(f"nesting is deeper than {limits.max_depth} levels",
                                kind="depth", source=source) from None
        if node is None:
            return None, None
        if "&" in text:
            _check_graph(node, limits, source)
        else:  # no anchor, so no alias: nothing can expand
            _check_tree(node, limits, source)
        try:
            return node, ld.construct_document(node)
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, source) from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # e.g. an integer with more digits than int() accepts, a timestamp out of range,
            # an unhashable mapping key
            raise DocumentError(f"cannot read a value: {exc}", _line(node), kind="value",
                                source=source) from None
    finally:
        ld.dispose()


def load_yaml_bounded(
    text: str | bytes, *, source: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> Any:
    """One YAML document as plain data (safe types only), or DocumentError."""
    return compose_bounded(_text(text, limits, source), source=source, limits=limits)[1]


def _json_depth(data: Any, limit: int) -> bool:
    """True when `data` nests no deeper than `limit` (iteratively)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return True


def load_json_bounded(
    text: str | bytes, *, source: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> Any:
    """One JSON document, or DocumentError (size, encoding, syntax with its line, depth)."""
    text = _text(text, limits, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"JSON syntax error: {exc.msg}", exc.lineno, kind="value",
                            source=source) from None
    except RecursionError:
        raise DocumentError(f"nesting is deeper than {limits.max_depth} levels", kind="depth",
                            source=source) from None
    except ValueError as exc:  # e.g. an integer beyond int()'s digit limit
        raise DocumentError(f"cannot read a value: {exc}", kind="value",
                            source=source) from None
    if not _json_depth(data, limits.max_depth):
        raise DocumentError(f"nesting is deeper than {limits.max_depth} levels", kind="depth",
                            source=source)
    return data


def read_document(
    path: str | Path,
    *,
    kind: Literal["yaml", "json"] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Read and parse a YAML or JSON file (by `kind`, else by its extension: `.json` is JSON,
    anything else YAML). DocumentError for anything wrong with the content, naming the file;
    OSError when the file cannot be opened."""
    p = Path(path)
    text = read_text_bounded(p, limits)
    if kind == "json" or (kind is None and p.suffix.lower() == ".json"):
        return load_json_bounded(text, source=str(p), limits=limits)
    return load_yaml_bounded(text, source=str(p), limits=limits)
