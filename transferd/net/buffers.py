"""Reusable receive buffers for chunk bodies.

Freshly allocated memory is expensive to touch (page faults and zeroing cost more than the copy
itself on small VMs), and aiohttp's `request.read()` allocates twice per body. Chunk bodies are
read into a bounded pool of warm bytearrays instead; the pool size also caps how many bodies a
daemon holds in memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import AsyncIterator

from aiohttp import web

from transferd.errors import ProtocolError

__all__ = ["BufferPool"]


class BufferPool:
    def __init__(self, buffer_bytes: int, count: int) -> None:
        self.buffer_bytes = buffer_bytes
        # Anonymous mmaps: page-aligned, so chunk writes can go to disk with O_DIRECT.
        self._free: list[mmap.mmap] = []
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
            if not pooled:
                buf = mmap.mmap(-1, max(declared, 1))
            elif self._free:
                buf = self._free.pop()
            else:
                buf = mmap.mmap(-1, self.buffer_bytes)
            view = memoryview(buf)
            try:
                pos = 0
                empty = 0
                while True:
                    # readchunk hands over aiohttp's buffered pieces one by one; readany would
                    # first join them (one more copy of the body).
                    piece, _ = await request.content.readchunk()
                    if not piece:
                        empty += 1
                        if request.content.at_eof() or empty > 64:
                            break
                        continue
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
                else:
                    buf.close()
