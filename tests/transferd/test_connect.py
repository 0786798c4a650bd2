"""Opening a data channel's TCP connection with racing attempts (`net.channels.connect_racing`)."""

from __future__ import annotations

import errno
import socket

import pytest

from transferd.net.channels import connect_racing


def test_connects_and_leaves_one_connection_with_the_opening_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sock = connect_racing("127.0.0.1", port, timeout_s=5.0)
        with sock:
            assert sock.gettimeout() == 5.0
            conn, _ = server.accept()
            with conn:
                sock.sendall(b"hello")
                assert conn.recv(5) == b"hello"
            server.settimeout(0.3)
            with pytest.raises(TimeoutError):
                server.accept()  # no sibling attempt left behind on an answered connect


def test_a_refused_connect_is_not_retried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as caught:
        connect_racing("127.0.0.1", port, timeout_s=5.0)
    assert caught.value.errno == errno.ECONNREFUSED
