"""The control API's server closes every connection it accepted when the daemon stops, also
one accepted while its listener was closing (aiohttp learns of that one only after it closed
the others): the peer's client is hung up on, and no socket of the daemon outlives it."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from transferd.daemon import stop_closing_every_connection


async def test_a_connection_accepted_while_stopping_is_closed_too() -> None:
    runner = web.AppRunner(web.Application(), handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.SockSite(runner, socket.create_server(("127.0.0.1", 0)))
    await site.start()
    port = runner.addresses[0][1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        # The loop accepts the connection in this iteration and makes its transport in the
        # next: the stop starts in between, as a peer's request lands at the wrong moment.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await stop_closing_every_connection(runner)
        # Hung up on (end of stream), not left waiting for an answer that never comes.
        assert await asyncio.to_thread(client.recv, 1) == b""
    finally:
        client.close()
