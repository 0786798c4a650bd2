"""Traffic classes on loopback with real sockets: interactive messages keep flowing while a large
checkpoint streams through the scheduler, and a per-class rate cap holds over a real 10 s window.

The bulk sender is the scheduler-driven `StreamPool` PUTting blake3-addressed chunks to a minimal
receiver app that verifies each chunk; messages go through `MessageService` on their own pool,
sharing the peer's scheduler with the bulk class.
"""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import blake3
from aiohttp import payload, web

from transferd._classes import TrafficClass
from transferd._messages import MessageService, add_message_routes, send_message
from transferd._ratelimit import PeerRateLimiter, RateCap
from transferd._sched import ClassScheduler, ScheduledItem, SchedulerPump
from transferd._streams import StreamChange, StreamController, StreamPool
from transferd.errors import IntegrityError, TransportError

MB = 1_000_000
MiB = 1 << 20


class TrustLoopback:
    """Both apps run in this process on 127.0.0.1; authentication is covered elsewhere."""

    def __init__(self, site: str) -> None:
        self.site = site

    def sign(self, peer: str, method: str, path_qs: str, body: bytes) -> Mapping[str, str]:
        return {"X-Test-Site": self.site}

    def verify(self, headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
        return headers["X-Test-Site"]


@dataclass
class ChunkSink:
    """The receiving side of bulk chunks: verifies each body's blake3, stamps arrivals."""

    verified: dict[str, int] = field(default_factory=dict)
    arrivals: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    async def put(self, request: web.Request) -> web.Response:
        cls = request.match_info["cls"]
        hasher = blake3.blake3()
        stamps = self.arrivals.setdefault(cls, [])
        async for data in request.content.iter_chunked(256 * 1024):
            hasher.update(data)
            stamps.append((time.monotonic(), len(data)))
            if len(stamps) == 1:
                await self._notify()
        if hasher.hexdigest() != request.headers["X-Blake3"]:
            return web.json_response({"kind": "integrity", "error": "chunk hash"}, status=422)
        self.verified[cls] = self.verified.get(cls, 0) + 1
        await self._notify()
        return web.json_response({"ok": True})

    def bytes_in_window(self, cls: str, seconds: float, skip_s: float = 0.0) -> int:
        stamps = self.arrivals.get(cls, [])
        start = stamps[0][0] + skip_s
        return sum(n for t, n in stamps if start <= t < start + seconds)


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve(app: web.Application, sock: socket.socket) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


class Body(payload.Payload):
    """A chunk written as one buffer with Content-Length (BytesPayload warns above 1 MiB)."""

    def __init__(self, value: memoryview) -> None:
        super().__init__(value, content_type="application/octet-stream")
        self._size = value.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("binary chunk")

    async def write(self, writer: Any) -> None:
        await writer.write(self._value)


class ChunkSource:
    """Chunks cut from one reused random buffer (fresh memory is slow to touch on this VM)."""

    def __init__(self, chunk_bytes: int, seed: int = 1) -> None:
        self.chunk_bytes = chunk_bytes
        self.buffer = random.Random(seed).randbytes(chunk_bytes + 64 * 1024)
        self.view = memoryview(self.buffer)
        self._hashes: dict[int, str] = {}

    def chunk(self, index: int) -> tuple[memoryview, str]:
        offset = (index * 4096) % (64 * 1024)
        if offset not in self._hashes:
            self._hashes[offset] = blake3.blake3(
                self.view[offset : offset + self.chunk_bytes]
            ).hexdigest()
        return self.view[offset : offset + self.chunk_bytes], self._hashes[offset]


def bulk_pool(
    pump: SchedulerPump[int],
    cls: TrafficClass,
    session: aiohttp.ClientSession,
    sink_url: str,
    source: ChunkSource,
    changes: list[StreamChange],
) -> StreamPool[int]:
    async def send(item: ScheduledItem[int]) -> int:
        body, digest = source.chunk(item.payload)
        try:
            async with session.put(
                f"{sink_url}/chunks/{cls.value}", data=Body(body), headers={"X-Blake3": digest}
            ) as resp:
                if resp.status == 422:
                    raise IntegrityError(f"chunk {item.payload} failed verification")
                resp.raise_for_status()
        except aiohttp.ClientError as exc:
            raise TransportError(f"chunk {item.payload}: {exc!r}") from exc
        return len(body)

    controller = StreamController(pump.now(), initial_streams=2, max_streams=8)
    return StreamPool(pump, cls, controller, send, on_change=changes.append)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def test_interactive_messages_all_arrive_while_a_checkpoint_replicates() -> None:
    chunk_bytes, chunks = 8 * MiB, 64  # a 512 MiB checkpoint
    messages, concurrency = 500, 8
    sock_a, sock_b = _socket(), _socket()
    url_b_guess = f"http://127.0.0.1:{sock_b.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    pump: SchedulerPump[int] = SchedulerPump(ClassScheduler(loop.time()))
    a = MessageService("A", {"B": url_b_guess}, TrustLoopback("A"), pumps={"B": pump})
    b = MessageService("B", {}, TrustLoopback("B"))
    app_a, app_b = web.Application(), web.Application()
    add_message_routes(app_a, a)
    add_message_routes(app_b, b)
    sink = ChunkSink()
    app_b.router.add_put("/chunks/{cls}", sink.put)
    source = ChunkSource(chunk_bytes)
    changes: list[StreamChange] = []
    async with (
        serve(app_a, sock_a) as url_a,
        serve(app_b, sock_b) as url_b,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as bulk_http,
        aiohttp.ClientSession() as local_http,
    ):
        pool = bulk_pool(pump, TrafficClass.CHECKPOINT, bulk_http, url_b, source, changes)
        for index in range(chunks):
            await pump.put(TrafficClass.CHECKPOINT, chunk_bytes, index)
        latencies: list[float] = []
        during_bulk = 0

        async def sender(worker: int) -> None:
            nonlocal during_bulk
            for i in range(worker, messages, concurrency):
                body = i.to_bytes(4, "big") * 1024  # 4 KiB, unique per message
                receipt = await send_message(url_a, "B", body, deadline_ms=50, session=local_http)
                assert receipt.delivered
                assert receipt.latency_ms is not None
                latencies.append(receipt.latency_ms)
                during_bulk += sink.verified.get("checkpoint", 0) < chunks

        async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
            bulk = tg.create_task(pool.run())
            await sink.wait_for(lambda: bool(sink.arrivals.get("checkpoint")))
            started = time.monotonic()
            await asyncio.gather(*(sender(w) for w in range(concurrency)))
            messages_done = time.monotonic() - started
            await sink.wait_for(lambda: sink.verified.get("checkpoint", 0) == chunks)
            bulk_done = time.monotonic() - started
            bulk.cancel()
        received = await b.inbox.get(0, messages + 1)

    assert sorted(m.body[:4] for m in received) == [i.to_bytes(4, "big") for i in range(messages)]
    assert sink.verified["checkpoint"] == chunks
    assert len(latencies) == messages
    print(
        f"\n{messages} interactive 4 KiB messages during a {chunks * chunk_bytes >> 20} MiB"
        f" checkpoint: p50 {statistics.median(latencies):.2f} ms,"
        f" p99 {_percentile(latencies, 99):.2f} ms, max {max(latencies):.2f} ms;"
        f" {during_bulk} sent while the checkpoint was still streaming;"
        f" budget misses {a.metrics.total_budget_misses()};"
        f" messages took {messages_done:.2f} s, checkpoint {bulk_done:.2f} s;"
        f" stream changes {[(c.from_streams, c.to_streams) for c in changes]}"
    )


async def test_per_class_rate_caps_hold_over_a_real_ten_second_window() -> None:
    # sync is capped at 20 MB/s inside a 120 MB/s total; checkpoint has no class cap, so it gets
    # the rest of the total (work conservation) although its 3:1 weight alone would give it 90.
    sync_cap, total_cap, seconds, skip_s = 20 * MB, 120 * MB, 10.0, 1.0
    chunk_bytes = 1 * MiB
    loop = asyncio.get_running_loop()
    limiter = PeerRateLimiter(
        loop.time(),
        class_caps={TrafficClass.SYNC: RateCap.from_rate(sync_cap)},
        total_cap=RateCap.from_rate(total_cap),
    )
    pump: SchedulerPump[int] = SchedulerPump(ClassScheduler(loop.time(), limiter=limiter))
    sink = ChunkSink()
    app = web.Application()
    app.router.add_put("/chunks/{cls}", sink.put)
    source = ChunkSource(chunk_bytes)
    changes: list[StreamChange] = []
    enough = int((total_cap * (seconds + skip_s + 1)) // chunk_bytes)
    for index in range(enough):
        await pump.put(TrafficClass.SYNC, chunk_bytes, index)
        await pump.put(TrafficClass.CHECKPOINT, chunk_bytes, index)
    async with (
        serve(app, _socket()) as url,
        aiohttp.ClientSession() as http_sync,
        aiohttp.ClientSession() as http_cp,
    ):
        pools = [
            bulk_pool(pump, TrafficClass.SYNC, http_sync, url, source, changes),
            bulk_pool(pump, TrafficClass.CHECKPOINT, http_cp, url, source, changes),
        ]
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(pool.run()) for pool in pools]
            await sink.wait_for(lambda: bool(sink.arrivals.get("sync")))
            await asyncio.sleep(seconds + skip_s + 0.2)
            for task in tasks:
                task.cancel()
    # Measure 10 s starting 1 s in: the buckets' initial bursts (16 MiB each) land before that.
    sync_bytes = sink.bytes_in_window("sync", seconds, skip_s=skip_s)
    cp_bytes = sink.bytes_in_window("checkpoint", seconds, skip_s=skip_s)
    want_sync = sync_cap * seconds
    want_total = total_cap * seconds
    print(
        f"\nsync {sync_bytes / seconds / MB:.2f} MB/s (cap {sync_cap / MB:.0f}),"
        f" total {(sync_bytes + cp_bytes) / seconds / MB:.2f} MB/s"
        f" (cap {total_cap / MB:.0f}) over {seconds:.0f} s"
    )
    assert abs(sync_bytes - want_sync) <= 0.05 * want_sync
    assert abs(sync_bytes + cp_bytes - want_total) <= 0.05 * want_total
