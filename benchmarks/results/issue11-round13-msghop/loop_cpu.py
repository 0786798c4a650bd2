"""Event-loop CPU per interactive message, hop vs HTTP, measured in one process: two loopback
daemons (transferd.testing.loopback_pair) share one uvloop thread, so that thread's CPU time
per message is what A's and B's loops spend on it together (no bulk, no client: messages go
in through `MessageService.send`). Blocks of N messages alternate between the paths.

    PYTHONPATH=<tree> python benchmarks/results/issue11-round13-msghop/loop_cpu.py [N] [BLOCKS]
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from transferd.protocol.messages import MessageQuery
from transferd.testing import loopback_pair


async def main(n: int, blocks: int) -> None:
    logging.disable(logging.WARNING)
    body = b"m" * 4096
    query = MessageQuery(deadline_ms=1000)
    with tempfile.TemporaryDirectory() as tmp:
        async with loopback_pair(Path(tmp)) as (a, b):
            hops = dict(a.messages.hops)
            per: dict[str, list[float]] = {"hop": [], "http": []}
            for _ in range(blocks):
                for path in ("hop", "http"):
                    a.messages.hops.clear()
                    if path == "hop":
                        a.messages.hops.update(hops)
                    for _ in range(50):  # warm: the path's connections open
                        await a.messages.send("B", body, query)
                    await b.messages.inbox.get(0, 100_000)
                    t0 = time.thread_time()
                    for _ in range(n):
                        await a.messages.send("B", body, query)
                    per[path].append((time.thread_time() - t0) / n * 1e3)
                    await b.messages.inbox.get(0, 100_000)
            for path, values in per.items():
                print(f"{path}: loop CPU per message, A + B, ms: median "
                      f"{statistics.median(values):.3f} (blocks: "
                      f"{', '.join(f'{v:.3f}' for v in values)})")
            hop_n = a.metrics.value("transferd_message_paths_total", peer="B", path="hop")
            http_n = a.metrics.value("transferd_message_paths_total", peer="B", path="http")
            print(f"messages by path: hop {hop_n:.0f}, http {http_n:.0f}")


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
                    int(sys.argv[2]) if len(sys.argv) > 2 else 3))
