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


def test_a_thread_that_dies_says_so_in_one_json_line() -> None:
    """A data channel or worker thread killed by a bug: a JSON line with the traceback inside,
    never a plain traceback in the log (run in a child: setup_logging sets process globals)."""
    import subprocess
    import sys

    code = (
        "import threading\n"
        "from transferd.site.log import setup_logging\n"
        "setup_logging()\n"
        "def boom():\n"
        "    raise RuntimeError('a bug in a channel thread')\n"
        "t = threading.Thread(target=boom, name='channel-send-B')\n"
        "t.start(); t.join()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["thread.died"]
    assert lines[0]["thread"] == "channel-send-B"
    assert "RuntimeError: a bug in a channel thread" in lines[0]["exception"]
