"""sd_notify to a real unix datagram socket in the abstract namespace ('@' in $NOTIFY_SOCKET),
nothing without one; which config changes a reload applies and which need a restart."""

from __future__ import annotations

import os
import socket
import textwrap

from transferd.config import parse_config
from transferd.daemon import restart_fields
from transferd.site.notify import notify, reloading


def test_notify_reaches_an_abstract_socket_and_is_silent_without_one() -> None:
    name = f"transferd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(1024) == b"READY=1\nSTATUS=up"
        assert reloading(environ={"NOTIFY_SOCKET": "@" + name})
        lines = sock.recv(1024).decode().splitlines()
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=")
    assert not notify("READY=1", environ={})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})  # nobody listens


BASE = textwrap.dedent("""\
    site: A
    listen: 127.0.0.1:7001
    data_dir: /tmp/a
    keys_dir: /tmp/keys
    peers:
      B: {url: "http://127.0.0.1:7002", rate_caps_mbps: {total: 100}}
""")


def test_rate_caps_weights_and_watch_reload_live_the_rest_needs_a_restart() -> None:
    old = parse_config(BASE)
    live = parse_config(BASE.replace("total: 100", "total: 900, sync: 50")
                        + "watch: {enabled: true}\ntraffic: {weights: {sync: 3}}\n")
    assert restart_fields(old, live) == []
    moved = parse_config(BASE.replace("7002", "7003").replace("7001", "7009")
                         + "chunk_size: 1048576\n")
    assert restart_fields(old, moved) == ["chunk_size", "listen", "peers.B"]
    more = parse_config(BASE + '  C: {url: "http://127.0.0.1:7004"}\n')
    assert restart_fields(old, more) == ["peers"]
