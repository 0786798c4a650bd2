"""Reusable receive buffers for chunk bodies.

Freshly allocated memory is expensive to touch (page faults and zeroing cost more than the copy
itself on small VMs), and aiohttp's `request.read()` allocates twice per body. Chunk bodies are
read into a bounded pool of warm bytearrays instead; the pool size also caps how many bodies a
daemon holds in memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from transferd.errors import ProtocolError

__all__ = ["BufferPool"]


class BufferPool:
    def __init__(self, buffer_bytes: int, count: int) -> None:
        self.buffer_bytes = buffer_bytes
        self._free: list[bytearray] = []
        self._slots = asyncio.Semaphore(count)

    @contextlib.asynccontextmanager
    async def body(self, request: web.Request, limit: int) -> AsyncIterator[memoryview]:
        """The request body (at most `limit` bytes) in a pooled buffer, valid inside the block."""
        declared = request.content_length
        if declared is None:
            raise ProtocolError("chunk bodies need a Content-Length")
        if declared > limit:
            raise ProtocolError(f"chunk body of {declared} bytes exceeds the {limit} byte limit")
        async with self._slots:
            pooled = declared <= self.buffer_bytes
            buf = (
                (self._free.pop() if self._free else bytearray(self.buffer_bytes))
                if pooled
                else bytearray(declared)
            )
            view = memoryview(buf)
            try:
                pos = 0
                while piece := await request.content.readany():
                    n = len(piece)
                    if pos + n > declared:
                        raise ProtocolError("chunk body is longer than its Content-Length")
                    view[pos : pos + n] = piece
                    pos += n
                if pos != declared:
                    raise ProtocolError("chunk body ended before its Content-Length")
                body = view[:pos]
                try:
                    yield body
                finally:
                    body.release()
            finally:
                view.release()
                if pooled:
                    self._free.append(buf)
