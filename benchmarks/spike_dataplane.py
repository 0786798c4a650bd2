"""Spike for issue 11: three candidate bulk data paths as standalone prototypes, timed by the
benchmark harness (its labs, links, counters and tables) beside iperf3, rsync and rclone:

    python -m benchmarks.spike_dataplane run loopback cross-region-40ms [--quick] [--repeat 3]

Each candidate moves one file from the first site to the second, checks every chunk against
its blake3 before writing it, and fsyncs before answering the end (as a commit does):

- `spike-threads`: raw framed long-lived channels, opened with an HMAC challenge-response (both
  nonces fresh, so a recorded opening cannot be replayed), TCP_CONGESTION per socket. Sender: a
  thread hashes chunks from mmap windows ahead of the channels; one thread per channel sends a
  32-byte-digest header and the chunk with `sendfile` (no user-space copy), up to `window` chunks
  before their receipts, which a second thread per channel reads back. Receiver: one thread per
  channel `recv_into` page-aligned buffers (three per channel), workers hash each and `pwrite`
  it (O_DIRECT when aligned) while the next one is received; receipts go back as they finish.
- `spike-http`: today's shape, one HTTP/1.1 PUT per chunk from aiohttp, but received by an
  asyncio `BufferedProtocol` (uvloop) that reads bodies straight into aligned buffers; hash and
  pwrite in worker threads.
- `spike-zmq`: pyzmq, one DEALER socket (one TCP connection) per stream to a ROUTER, zero-copy
  frames (`copy=False` from the mmap window on send, libzmq's message buffer on receive),
  receipts back on the same sockets. libzmq does the socket I/O in its own threads; it offers no
  TCP_CONGESTION option, so it runs with the namespace's default.

`serve` and `send` are the two halves (run inside the lab's namespaces by the adapters below).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import mmap
import os
import queue
import secrets
import shlex
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import click

CHUNK = 8 * 2**20
HEADER = struct.Struct("!QQI32s")  # seq, offset, length, blake3 digest
RECEIPT = struct.Struct("!QB")  # seq, status (0 ok, 1 hash mismatch)
FIN = 2**64 - 1
OPEN_MAGIC = b"TDC1"
ALIGN = 4096
SPIKE_PORT = 7801
SECRET = b"spike pair secret: the real channel uses the pair's HMAC secret from keys_dir"


# ---- shared pieces ----------------------------------------------------------------------------

def spans(size: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    return [(off, min(chunk, size - off)) for off in range(0, size, chunk)]


Hashed = tuple[int, int, int, bytes]  # seq, offset, length, blake3 digest


def hashed_chunks(fd: int, size: int, ahead: int) -> queue.Queue[Hashed | None]:
    """A thread hashing the file's chunks from mmap windows, at most `ahead` in front of the
    senders; None once all are queued."""
    out: queue.Queue[Hashed | None] = queue.Queue(maxsize=ahead)

    def run() -> None:
        for seq, (off, n) in enumerate(spans(size)):
            with mmap.mmap(fd, n, prot=mmap.PROT_READ, offset=off) as m:
                digest = blake3.blake3(m).digest()
            out.put((seq, off, n, digest))
        out.put(None)

    threading.Thread(target=run, name="hasher", daemon=True).start()
    return out


class Sink:
    """The receiving file: preallocated, written by offset (O_DIRECT for aligned pieces from
    aligned buffers), fsynced at the end."""

    def __init__(self, path: Path, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if size:
            os.posix_fallocate(self.fd, 0, size)
        os.ftruncate(self.fd, size)
        try:
            self.direct_fd: int | None = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            self.direct_fd = None
        self.failures = 0

    def verify_and_write(self, view: memoryview, offset: int, digest: bytes,
                         aligned: bool) -> bool:
        if blake3.blake3(view).digest() != digest:
            self.failures += 1
            return False
        fd = (self.direct_fd if aligned and self.direct_fd is not None and not offset % ALIGN
              and not len(view) % ALIGN else self.fd)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        return True

    def finish(self) -> None:
        os.fsync(self.fd)


def set_congestion_control(sock: socket.socket, cc: str) -> str:
    if cc != "system":
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        except OSError as exc:
            print(f"TCP_CONGESTION {cc} refused ({exc.strerror}): system default",
                  file=sys.stderr)
    got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return got.split(b"\0", 1)[0].decode()


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False on a clean end of stream before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("channel closed mid-frame")
        got += n
    return True


# ---- candidate 1: threads on raw framed channels ------------------------------------------

def _mac(label: bytes, *parts: bytes) -> bytes:
    return hmac.new(SECRET, b"\n".join([b"transferd-data/1", label, *parts]),
                    hashlib.sha256).digest()


def open_channel(addr: tuple[str, int], site: str, peer: str, cc: str) -> socket.socket:
    sock = socket.create_connection(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_congestion_control(sock, cc)
    client_nonce = secrets.token_bytes(16)
    sock.sendall(OPEN_MAGIC + bytes([len(site)]) + site.encode() + client_nonce)
    server_nonce = bytearray(16)
    if not recv_exact(sock, memoryview(server_nonce)):
        raise ConnectionError("receiver closed at open")
    sock.sendall(_mac(b"open", site.encode(), peer.encode(), client_nonce, bytes(server_nonce)))
    proof = bytearray(32)
    if not recv_exact(sock, memoryview(proof)) or not hmac.compare_digest(
            proof, _mac(b"accept", peer.encode(), site.encode(), bytes(server_nonce),
                        client_nonce)):
        raise ConnectionError("receiver did not prove the pair secret")
    return sock


def accept_channel(sock: socket.socket, site: str) -> str:
    head = bytearray(5)
    if not recv_exact(sock, memoryview(head)) or head[:4] != OPEN_MAGIC:
        raise ConnectionError("not a data channel")
    rest = bytearray(head[4] + 16)
    recv_exact(sock, memoryview(rest))
    peer, client_nonce = bytes(rest[:-16]), bytes(rest[-16:])
    server_nonce = secrets.token_bytes(16)
    sock.sendall(server_nonce)
    mac = bytearray(32)
    recv_exact(sock, memoryview(mac))
    if not hmac.compare_digest(mac, _mac(b"open", peer, site.encode(), client_nonce,
                                         server_nonce)):
        raise ConnectionError("bad channel opening")
    sock.sendall(_mac(b"accept", site.encode(), peer, server_nonce, client_nonce))
    return peer.decode()


def serve_threads(listen: tuple[str, int], sink: Sink, cc: str, ready: Callable[[], None],
                  buffers: int = 3, workers: int = 2) -> None:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="verify-write")
    done = threading.Event()
    server = socket.create_server(listen, reuse_port=False)
    ready()

    def channel(conn: socket.socket) -> None:
        with conn:
            set_congestion_control(conn, cc)
            accept_channel(conn, "B")
            free: queue.Queue[mmap.mmap] = queue.Queue()
            for _ in range(buffers):
                free.put(mmap.mmap(-1, CHUNK))
            send_lock = threading.Lock()
            pending: list[Future[None]] = []
            head = bytearray(HEADER.size)
            while recv_exact(conn, memoryview(head)):
                seq, off, n, digest = HEADER.unpack(head)
                if seq == FIN:
                    for fut in pending:
                        fut.result()
                    sink.finish()
                    conn.sendall(RECEIPT.pack(FIN, 0))
                    done.set()
                    return
                buf = free.get()  # all buffers busy: stop reading, TCP pushes back
                view = memoryview(buf)[:n]
                recv_exact(conn, view)

                def finish(seq: int = seq, off: int = off, view: memoryview = view,
                           digest: bytes = digest, buf: mmap.mmap = buf) -> None:
                    ok = sink.verify_and_write(view, off, digest, aligned=True)
                    view.release()
                    free.put(buf)
                    with send_lock:
                        conn.sendall(RECEIPT.pack(seq, 0 if ok else 1))

                pending = [f for f in pending if not f.done()]
                pending.append(pool.submit(finish))

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=channel, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    done.wait()
    server.close()


def send_threads(addr: tuple[str, int], path: Path, streams: int, cc: str,
                 window: int = 4) -> dict[str, Any]:
    t0 = time.perf_counter()
    timeline: list[tuple[float, int]] = []  # (seconds since start, bytes receipted)
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    work = hashed_chunks(fd, size, ahead=2 * streams)
    lowat = int(os.environ.get("SPIKE_NOTSENT_LOWAT", "0"))
    # In parallel: on a lossy link one lost SYN costs a 1 s retransmission timeout, and opening
    # one channel after the other adds those up (8 channels took 3 s at 2 % loss).
    with ThreadPoolExecutor(streams) as opener:
        channels = list(opener.map(lambda _i: open_channel(addr, "A", "B", cc), range(streams)))
    if lowat:
        for c in channels:
            c.setsockopt(socket.IPPROTO_TCP, 25, lowat)  # TCP_NOTSENT_LOWAT
    opened = time.perf_counter() - t0
    ccs = {set_congestion_control(c, "system") for c in channels}
    resent = 0
    fin = threading.Event()
    lock = threading.Lock()
    redo: list[tuple[int, int, int, bytes]] = []

    def run_channel(sock: socket.socket) -> None:
        nonlocal resent
        slots = threading.Semaphore(window)
        inflight: dict[int, tuple[int, int, int, bytes]] = {}

        def receipts() -> None:
            nonlocal resent
            r = bytearray(RECEIPT.size)
            while recv_exact(sock, memoryview(r)):
                seq, status = RECEIPT.unpack(r)
                if seq == FIN:
                    fin.set()
                    return
                item = inflight.pop(seq)
                with lock:
                    timeline.append((round(time.perf_counter() - t0, 3),
                                     (timeline[-1][1] if timeline else 0) + item[2]))
                if status:
                    with lock:
                        redo.append(item)
                        resent += item[2]
                slots.release()

        reader = threading.Thread(target=receipts, daemon=True)
        reader.start()
        while True:
            item = work.get()
            if item is None:
                work.put(None)  # for the other channels
                with lock:
                    item = redo.pop() if redo else None
                if item is None:
                    break
            slots.acquire()
            seq, off, n, digest = item
            inflight[seq] = item
            sock.sendall(HEADER.pack(seq, off, n, digest))
            sent = 0
            while sent < n:
                sent += os.sendfile(sock.fileno(), fd, off + sent, n - sent)
        for _ in range(window):
            slots.acquire()  # every receipt is in

    threads = [threading.Thread(target=run_channel, args=(c,)) for c in channels]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channels[0].sendall(HEADER.pack(FIN, 0, 0, bytes(32)))
    fin.wait(60)
    for c in channels:
        c.close()
    return {"bytes": size, "streams": streams, "congestion_control": sorted(ccs),
            "resent_bytes": resent, "opened_s": round(opened, 3),
            "done_s": round(time.perf_counter() - t0, 3), "timeline": timeline}


# ---- candidate 2: HTTP PUT per chunk, BufferedProtocol receiver ----------------------------

class _PutProtocol(asyncio.BufferedProtocol):
    """HTTP/1.1 PUT /chunk (X-Offset, X-Blake3, Content-Length) with the body read straight into
    an aligned buffer; POST /fin fsyncs. The request head lands in a small buffer (a piece of
    the body read with it is copied over once)."""

    def __init__(self, sink: Sink, pool: ThreadPoolExecutor, done: asyncio.Event) -> None:
        self.sink, self.pool, self.done = sink, pool, done
        self.head = bytearray(16384)
        self.head_len = 0
        self.body = mmap.mmap(-1, CHUNK)
        self.body_view = memoryview(self.body)
        self.need = 0  # body bytes still to read (0: reading a head)
        self.got = 0
        self.request: dict[str, str] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are no asyncio.Transport subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.need:
            return self.body_view[self.got:self.got + self.need]
        return memoryview(self.head)[self.head_len:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.need:
            self.got += nbytes
            self.need -= nbytes
            if not self.need:
                self._body_done()
            return
        self.head_len += nbytes
        end = self.head.find(b"\r\n\r\n", 0, self.head_len)
        if end < 0:
            return
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":")
                                                                for ln in lines[1:])}
        extra = self.head_len - (end + 4)
        length = int(fields.get("content-length", "0"))
        self.request = {"method": method, "target": target, **fields}
        if extra:
            self.body_view[:extra] = self.head[end + 4:self.head_len]
        self.head_len = 0
        self.got, self.need = extra, length - extra
        if not self.need:
            self._body_done()

    def _body_done(self) -> None:
        req, n = self.request, self.got
        self.need, self.got = 0, 0
        self.transport.pause_reading()
        loop = asyncio.get_running_loop()
        if req["target"] == "/fin":
            fut = loop.run_in_executor(self.pool, self.sink.finish)
            fut.add_done_callback(lambda _f: (self._answer(200), self.done.set()))
            return
        view = self.body_view[:n]
        fut = loop.run_in_executor(self.pool, self.sink.verify_and_write, view,
                                   int(req["x-offset"]), bytes.fromhex(req["x-blake3"]), True)
        fut.add_done_callback(lambda f: self._answer(204 if f.result() else 422))

    def _answer(self, status: int) -> None:
        reason = {200: "OK", 204: "No Content", 422: "Unprocessable"}[status]
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n".encode())
        self.transport.resume_reading()


def serve_http(listen: tuple[str, int], sink: Sink, ready: Callable[[], None]) -> None:
    import uvloop

    async def main() -> None:
        done = asyncio.Event()
        pool = ThreadPoolExecutor(2, thread_name_prefix="verify-write")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _PutProtocol(sink, pool, done), *listen)
        ready()
        await done.wait()
        server.close()

    uvloop.run(main())


def send_http(addr: tuple[str, int], path: Path, streams: int) -> dict[str, Any]:
    import aiohttp
    import uvloop
    from aiohttp import payload

    class Body(payload.Payload):
        def __init__(self, value: memoryview) -> None:
            super().__init__(value, content_type="application/octet-stream")
            self._size = value.nbytes

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            return ""

        async def write(self, writer: Any) -> None:
            writer.send_headers()
            await writer.write(self._value)

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    url = f"http://{addr[0]}:{addr[1]}"

    async def main() -> None:
        work = hashed_chunks(fd, size, ahead=2 * streams)
        connector = aiohttp.TCPConnector(limit=streams)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker() -> None:
                while (item := await asyncio.to_thread(work.get)) is not None:
                    seq, off, n, digest = item
                    # The mapping goes with the last reference (aiohttp may hold the view).
                    m = mmap.mmap(fd, n, prot=mmap.PROT_READ, offset=off)
                    async with session.put(url + "/chunk", data=Body(memoryview(m)),
                                           headers={"X-Offset": str(off),
                                                    "X-Blake3": digest.hex()}) as resp:
                        await resp.read()
                        if resp.status != 204:
                            raise RuntimeError(f"chunk {seq}: {resp.status}")
                work.put(None)

            await asyncio.gather(*(worker() for _ in range(streams)))
            async with session.post(url + "/fin") as resp:
                await resp.read()

    uvloop.run(main())
    return {"bytes": size, "streams": streams}


# ---- candidate 3: pyzmq zero-copy frames ------------------------------------------------------

def serve_zmq(listen: tuple[str, int], sink: Sink, ready: Callable[[], None]) -> None:
    import zmq

    ctx = zmq.Context(io_threads=2)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 16)
    router.bind(f"tcp://{listen[0]}:{listen[1]}")
    ready()
    pool = ThreadPoolExecutor(2, thread_name_prefix="verify-write")
    finished: queue.Queue[tuple[bytes, int, bool]] = queue.Queue()
    pending = 0
    fin_from: bytes | None = None
    while True:
        while not finished.empty():
            ident, seq, ok = finished.get()
            pending -= 1
            router.send_multipart([ident, RECEIPT.pack(seq, 0 if ok else 1)])
        if fin_from is not None and pending == 0:
            sink.finish()
            router.send_multipart([fin_from, RECEIPT.pack(FIN, 0)])
            break
        if not router.poll(5):
            continue
        frames = router.recv_multipart(copy=False)
        ident = frames[0].bytes
        seq, off, _n, digest = HEADER.unpack(frames[1].bytes)
        if seq == FIN:
            fin_from = ident
            continue
        body = frames[2]

        def work(ident: bytes = ident, seq: int = seq, off: int = off, body: Any = body,
                 digest: bytes = digest) -> None:
            # libzmq's buffer is not page-aligned: a buffered write
            finished.put((ident, seq, sink.verify_and_write(memoryview(body.buffer), off,
                                                            digest, aligned=False)))

        pending += 1
        pool.submit(work)
    router.close(linger=1000)
    ctx.term()


def send_zmq(addr: tuple[str, int], path: Path, streams: int, window: int = 4) -> dict[str, Any]:
    import zmq

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    work = hashed_chunks(fd, size, ahead=2 * streams)
    ctx = zmq.Context(io_threads=2)
    dealers = []
    for _ in range(streams):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.SNDHWM, window + 1)
        d.connect(f"tcp://{addr[0]}:{addr[1]}")
        dealers.append(d)
    poller = zmq.Poller()
    for d in dealers:
        poller.register(d, zmq.POLLIN)
    inflight: dict[int, dict[int, mmap.mmap]] = {i: {} for i in range(len(dealers))}
    exhausted = False
    while True:
        if not exhausted:
            for i, d in enumerate(dealers):
                while len(inflight[i]) < window:
                    item = work.get()
                    if item is None:
                        exhausted = True
                        break
                    seq, off, n, digest = item
                    m = mmap.mmap(fd, n, prot=mmap.PROT_READ, offset=off)
                    inflight[i][seq] = m
                    d.send_multipart([HEADER.pack(seq, off, n, digest), memoryview(m)],
                                     copy=False)
                if exhausted:
                    break
        if exhausted and not any(inflight.values()):
            break
        for sock, _ev in poller.poll(100):
            i = dealers.index(sock)
            seq, status = RECEIPT.unpack(sock.recv())
            if status:
                raise RuntimeError(f"chunk {seq} failed verification")
            inflight[i].pop(seq)  # the mmap goes when libzmq lets go of the frame
    dealers[0].send_multipart([HEADER.pack(FIN, 0, 0, bytes(32))])
    seq, _ = RECEIPT.unpack(dealers[0].recv())
    for d in dealers:
        d.close(linger=0)
    ctx.term()
    return {"bytes": size, "streams": streams}


# ---- the two halves as commands ---------------------------------------------------------------

@click.group()
def cli() -> None:
    """The spike's candidates, and a harness run of them."""


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@cli.command()
@click.option("--impl", type=click.Choice(["threads", "http", "zmq"]), required=True)
@click.option("--listen", required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--size", type=int, required=True)
@click.option("--cc", default="bbr")
def serve(impl: str, listen: str, out: Path, size: int, cc: str) -> None:
    sink = Sink(out, size)

    def ready() -> None:
        print("ready", flush=True)

    if impl == "threads":
        serve_threads(_addr(listen), sink, cc, ready)
    elif impl == "http":
        serve_http(_addr(listen), sink, ready)
    else:
        serve_zmq(_addr(listen), sink, ready)
    if sink.failures:
        print(f"{sink.failures} chunks failed verification", file=sys.stderr)


@cli.command()
@click.option("--impl", type=click.Choice(["threads", "http", "zmq"]), required=True)
@click.option("--to", "to", required=True)
@click.option("--file", "path", type=click.Path(path_type=Path), required=True)
@click.option("--streams", type=int, default=4)
@click.option("--cc", default="bbr")
def send(impl: str, to: str, path: Path, streams: int, cc: str) -> None:
    t0 = time.perf_counter()
    if impl == "threads":
        report = send_threads(_addr(to), path, streams, cc)
    elif impl == "http":
        report = send_http(_addr(to), path, streams)
    else:
        report = send_zmq(_addr(to), path, streams)
    report["seconds"] = time.perf_counter() - t0
    print(json.dumps(report))


# ---- harness adapters -------------------------------------------------------------------------

CANDIDATES = {
    # tool: (impl, streams, congestion control for the channels)
    "spike-threads": ("threads", 4, "bbr"),
    "spike-threads-cubic": ("threads", 4, "cubic"),
    "spike-threads-1stream": ("threads", 1, "bbr"),
    "spike-threads-2streams": ("threads", 2, "bbr"),
    "spike-threads-8streams": ("threads", 8, "bbr"),
    "spike-http": ("http", 4, "system"),
    "spike-zmq": ("zmq", 4, "system"),
}


def _adapter(tool: str) -> Callable[[Any], Any]:
    from benchmarks.errors import ToolError
    from benchmarks.lab import python_env
    from benchmarks.measure import ToolRun
    from benchmarks.tools import _client_run, _copied, wait_listening

    impl, streams, cc = CANDIDATES[tool]

    def run(ctx: Any) -> ToolRun:
        lab = ctx.lab
        dest = ctx.scratch / f"{tool}-dest"
        dest.mkdir(parents=True)
        out = dest / ctx.data_path.name
        me = [sys.executable, "-m", "benchmarks.spike_dataplane"]
        server = lab.spawn(ctx.dst, [*me, "serve", "--impl", impl, "--listen",
                                     f"{lab.addr(ctx.dst)}:{SPIKE_PORT}", "--out", str(out),
                                     "--size", str(ctx.size_bytes()), "--cc", cc],
                           name=f"{tool}-server")
        try:
            wait_listening(lab.in_site(ctx.dst, []), SPIKE_PORT, alive=server, what=tool)
            cmd = [*me, "send", "--impl", impl, "--to", f"{lab.addr(ctx.dst)}:{SPIKE_PORT}",
                   "--file", str(ctx.data_path), "--streams", str(streams), "--cc", cc]
            got, cpu = _client_run(ctx, tool, server, ctx.src, cmd, env=python_env())
            try:
                server.wait(30)
            except Exception as exc:  # noqa: BLE001 - any failure to end is the tool's
                raise ToolError(tool, f"receiver did not finish: {exc}") from exc
        finally:
            lab.stop(server)
        run = _copied(ctx, tool, got, dest, cpu)
        try:
            report = json.loads(got.stdout.strip().splitlines()[-1])
            run.streams = report.get("streams")
            if report.get("resent_bytes"):
                run.resent_bytes = report["resent_bytes"]
        except (ValueError, IndexError):
            pass
        return run

    return run


def _register() -> None:
    from benchmarks.tools import ADAPTERS

    for tool in CANDIDATES:
        ADAPTERS[tool] = _adapter(tool)


@cli.command("run")
@click.argument("scenarios", nargs=-1, required=True)
@click.option("--quick", is_flag=True)
@click.option("--repeat", type=int, default=1)
@click.option("--cc", "ccs", default=None, help="Namespace default(s), comma-separated.")
@click.option("--tools", default="spike-threads,spike-threads-cubic,spike-http,spike-zmq,"
              "iperf3-1stream,rsync,rclone")
@click.option("--output", type=click.Path(path_type=Path),
              default=Path(__file__).resolve().parent / "results" / "spike")
def run_spike(scenarios: tuple[str, ...], quick: bool, repeat: int, ccs: str | None,
              tools: str, output: Path) -> None:
    """Run the candidates (and peers) on SCENARIOS' first work item, in the harness."""
    from rich.console import Console

    from benchmarks.backends import probe_backend
    from benchmarks.report import print_table, write_results
    from benchmarks.runner import run_scenario
    from benchmarks.scenario import load_scenario

    _register()
    console = Console(width=200)
    choice = probe_backend()
    command = "python -m benchmarks.spike_dataplane " + shlex.join(sys.argv[1:])
    wanted = tuple(t.strip() for t in tools.split(",") if t.strip())
    for name in scenarios:
        scenario = load_scenario(name)
        scenario = scenario.model_copy(update={"tools": wanted, "work": scenario.work[:1]})
        for cc in (ccs.split(",") if ccs else scenario.ccs):
            doc = run_scenario(scenario, choice, quick=quick, repeat=repeat, command=command,
                               congestion_control=cc, log=console.print)
            doc["spike"] = True
            print_table(doc, console)
            console.print(f"wrote {write_results(doc, output)}")


if __name__ == "__main__":
    cli()
