"""Structured log lines: one JSON object per line on stderr (`ts`, `level`, `event`, fields)."""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["JsonLines", "setup_logging"]


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(
                {
                    k: v if isinstance(v, int | float | bool | None) else str(v)
                    for k, v in fields.items()
                }
            )
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger("transferd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
