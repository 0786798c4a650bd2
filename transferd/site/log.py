"""Structured log lines: one JSON object per line on stderr (`ts`, `level`, `event`, fields).

Every logger writes through the one JSON handler (aiohttp's and asyncio's too, which would
otherwise print plain tracebacks into the log), and a peer that goes away mid-request is one
`peer.disconnected` line, not aiohttp's "Error handling request" traceback: it happens on every
dropped connection, and the peer retries.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

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


# By name: this layer does not import the event loop (tests/transferd/test_layers.py).
_DISCONNECT_NAMES = {"CancelledError", "IncompleteReadError", "ClientPayloadError"}


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError) or type(exc).__name__ in _DISCONNECT_NAMES


class PeerDisconnects(logging.Filter):
    """Turns a server-side traceback caused by the client going away into one short line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cause = exc
        while cause is not None and not _is_disconnect(cause):
            cause = cause.__cause__ or cause.__context__
        if cause is not None or "Connection lost" in str(exc or ""):
            record.msg, record.args, record.exc_info = "peer.disconnected", (), None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.fields = {"reason": f"{type(cause or exc).__name__}: {cause or exc}"[:200]}
        return True


def setup_logging(level: int | None = None) -> None:
    """JSON lines on stderr at `level`, else at $TRANSFERD_LOG_LEVEL (`debug`, `info`, ...),
    else info. Debug adds per-request lines (e.g. each S3 PUT and GET with its timing)."""
    if level is None:
        name = os.environ.get("TRANSFERD_LOG_LEVEL", "info").upper()
        level = logging.getLevelNamesMapping().get(name, logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(PeerDisconnects())
    ours = logging.getLogger("transferd")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    # Everything else (aiohttp, asyncio) in the same JSON lines, warnings and up.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # A thread (a data channel's, a worker's) that dies of an uncaught error says so in a JSON
    # line too, not in a plain traceback.
    threading.excepthook = _thread_died


def _thread_died(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("transferd.threads").error(
        "thread.died",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"fields": {"thread": args.thread.name if args.thread else "?"}},
    )
