"""The one way the daemon reads the documents users hand it (the site config, a plan): through
netplan's hardened reader (`netplan.safeyaml`: size checked before reading, UTF-8 with the bad
byte named, depth and alias expansion counted on the node graph before anything is built, JSON
depth bounded), so hostile or broken input is a ConfigError naming the file, in bounded time
and memory, never a traceback. This module keeps the daemon's limits and the mapping of
`DocumentError` to ConfigError (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from netplan import safeyaml, yamlpos
from transferd.errors import ConfigError

__all__ = [
    "CONFIG_LIMITS",
    "PLAN_LIMITS",
    "load_json_document",
    "parse_yaml_document",
    "read_document_text",
]

# A site config is a few hundred bytes and nests 4 levels; a 10,000-site plan is ~20 MB.
CONFIG_LIMITS = safeyaml.Limits(max_bytes=1024 * 1024, max_nodes=1_000_000)
PLAN_LIMITS = safeyaml.Limits(max_bytes=64 * 1024 * 1024)


def _config_error(exc: safeyaml.DocumentError, source: str) -> ConfigError:
    located = exc if exc.source else exc.located(source)
    return ConfigError(str(located), path=source, line=exc.line)


def read_document_text(path: Path, what: str, limits: safeyaml.Limits) -> str:
    """The text of the file at `path` (`what` names it when it cannot be read)."""
    try:
        return safeyaml.read_text_bounded(path, limits)
    except safeyaml.DocumentError as exc:
        raise _config_error(exc, str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", path=path) from exc


def parse_yaml_document(
    text: str, source: str, limits: safeyaml.Limits = CONFIG_LIMITS
) -> yamlpos.YamlDocument:
    """One YAML document with the line of every node, after the reader's checks."""
    try:
        return yamlpos.parse(text, limits)
    except safeyaml.DocumentError as exc:
        raise _config_error(exc, source) from None
    except yaml.YAMLError as exc:
        # PyYAML's pure-Python reader refuses some characters (NUL, other controls) as the
        # loader is made, before netplan.safeyaml's own mapping of its errors applies.
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: YAML syntax error: {problem}", path=source) from None


def load_json_document(
    text: str | bytes, source: str, limits: safeyaml.Limits = PLAN_LIMITS
) -> Any:
    """One JSON document as plain data, after the reader's checks."""
    try:
        return safeyaml.load_json_bounded(text, source=source, limits=limits)
    except safeyaml.DocumentError as exc:
        raise _config_error(exc, source) from None
