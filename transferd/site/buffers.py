"""Page-aligned receive buffers for chunk bodies, shared by the data channels' threads.

A channel thread receives a chunk body straight into one of these (`recv_into`), a worker
hashes it and writes it from there with O_DIRECT (which needs page-aligned memory, offsets and
lengths), and the buffer goes back for the next body: no user-space copy of a raw chunk, and no
fresh memory to fault in per chunk (page faults and zeroing cost more than a copy on small VMs).
The pool's size bounds the bodies a daemon holds at once (its peak RSS); a channel that finds
none free stops reading, and TCP pushes back on the sender.
"""

from __future__ import annotations

import mmap
import threading

__all__ = ["AlignedBuffers"]


class AlignedBuffers:
    def __init__(self, buffer_bytes: int, count: int) -> None:
        if count < 1:
            raise ValueError("a buffer pool holds at least one buffer")
        self.buffer_bytes = buffer_bytes
        self.count = count
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._cond = threading.Condition()

    def acquire(self, timeout_s: float | None = None) -> mmap.mmap | None:
        """A free buffer (anonymous mmap: page-aligned), made on first need; None if none
        came free within `timeout_s`."""
        with self._cond:
            while not self._free and self._made >= self.count:
                if not self._cond.wait(timeout_s):
                    return None
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, self.buffer_bytes)

    def release(self, buf: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for buf in self._free:
                buf.close()
            self._free.clear()
