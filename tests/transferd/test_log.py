"""Log lines are JSON, and a peer going away mid-request is one line, not a traceback."""

from __future__ import annotations

import json
import logging

from transferd.site.log import JsonLines, PeerDisconnects


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        import sys

        info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling "
                             "request from %s", ("127.0.0.1",), info)


def test_a_peer_disconnect_is_one_json_line_without_a_traceback() -> None:
    record = _record(ConnectionResetError(104, "Connection reset by peer"))
    assert PeerDisconnects().filter(record)
    line = json.loads(JsonLines().format(record))
    assert line["event"] == "peer.disconnected"
    assert line["level"] == "info"
    assert "exception" not in line
    assert "ConnectionResetError" in line["reason"]


def test_other_errors_keep_their_traceback_inside_the_json() -> None:
    record = _record(ValueError("a bug"))
    assert PeerDisconnects().filter(record)
    line = json.loads(JsonLines().format(record))
    assert line["event"] == "Error handling request from 127.0.0.1"
    assert "ValueError: a bug" in line["exception"]
