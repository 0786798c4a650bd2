"""systemd's service notification protocol (sd_notify(3)) without libsystemd: each state change
is one datagram of newline-separated KEY=VALUE lines to the unix socket named in $NOTIFY_SOCKET
(a leading '@' names the abstract namespace). `Type=notify` units wait for READY=1; a reload is
RELOADING=1 with MONOTONIC_USEC, then READY=1 again; a stop is STOPPING=1. Without
$NOTIFY_SOCKET (not under systemd) nothing is sent."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "reloading"]

log = logging.getLogger("transferd.notify")


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to the service manager; False when there is
    none, or it could not be told (logged: the daemon runs on either way)."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        address = "\0" + path[1:]
    elif path.startswith("/"):
        address = path
    else:
        log.warning("notify.unsupported", extra={"fields": {"socket": path[:200]}})
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("notify.failed", extra={"fields": {"socket": path[:200],
                                                       "error": exc.strerror or str(exc)}})
        return False
    return True


def reloading(environ: Mapping[str, str] | None = None) -> bool:
    """RELOADING=1 with the monotonic time it began (systemd 253's Type=notify-reload wants it;
    plain Type=notify accepts it)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config",
                  environ=environ)
