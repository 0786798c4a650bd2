"""Test helpers shipped with transferd: a loopback peer pair, a fake clock, an impaired link.

    async with loopback_pair(tmp_path) as (a, b):      # two real daemons on 127.0.0.1
        ids = a.sender.submit("curated/x.bin", ["B"])
        await wait_for_jobs(a, ids)

`write_site_configs` lays out keys and site YAML files for subprocess daemons; `LinkProxy` sits
between two daemons, on their control plane, their data channels or both, and misbehaves on
request (pace, delay, drop, stall, black-hole, refuse, flip bits in request, reply or chunk
bodies, capture requests and channels for replay);
`CappedFileSystem` is a local fsspec filesystem that runs out of space after a set budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from transferd.config import SiteConfig, load_config
from transferd.daemon import Daemon
from transferd.errors import ProtocolError
from transferd.protocol import channel as ch
from transferd.protocol.local_api import Job
from transferd.site.journal import Journal
from transferd.site.keys import Keyring, keygen
from transferd.site.metrics import Metrics
from transferd.site.receiver import Receiver
from transferd.site.staging import Staging
from transferd.site.storage import LocalStorage

__all__ = [
    "CappedFileSystem",
    "FakeClock",
    "HttpMessage",
    "LinkProxy",
    "MotoS3Server",
    "bound_socket",
    "loopback_pair",
    "loopback_sites",
    "loopback_tls",
    "mounted_tmpfs",
    "receiver_at",
    "running_daemon",
    "staged_upload",
    "wait_for_jobs",
    "write_site_configs",
]


def staged_upload(staging_root: Path, files: dict[str, bytes]) -> Staging:
    """An upload staged under `staging_root` with `files` (one file under '' or folder
    members), ready for `SiteStorage.commit`: for storage tests without a receiver."""
    staging = Staging(
        dir=staging_root / f"upload-{uuid.uuid4().hex[:8]}",
        kind="file" if list(files) == [""] else "folder",
        members=list(files),
        sizes=[len(b) for b in files.values()],
    )
    staging.create()
    for i, data in enumerate(files.values()):
        if data:
            staging.write(i, 0, data)
    return staging


def receiver_at(root: Path, journal: Journal) -> Receiver:
    """Site B's receiving side over `root/data` with keys from `root/keys` (peer A), no
    daemon or sockets: for tests that drive uploads call by call."""
    return Receiver(
        "B",
        LocalStorage(root / "data"),
        journal,
        Keyring.load(root / "keys", "B", ["A"]),
        Metrics(),
        retention=3,
    )


class FakeClock:
    """A clock that moves only when told to: `clock()` is now, `advance(s)` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bound_socket() -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1 with an ephemeral port (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        return int(sock.getsockname()[1])


def write_site_configs(
    root: Path,
    ports: dict[str, int],
    *,
    peer_urls: dict[str, str] | None = None,
    data_ports: dict[str, int] | None = None,
    data_addresses: dict[str, str] | None = None,
    **overrides: Any,
) -> dict[str, Path]:
    """Keys for every site in `ports` plus one YAML config per site, all peers of each other.
    `peer_urls` overrides where a site's control API is reached, `data_addresses` where its
    data channels connect (e.g. through a LinkProxy), `data_ports` where it listens for them."""
    keys = root / "keys"
    keygen(sorted(ports), keys)
    scheme = "https" if "tls" in overrides else "http"
    urls = {site: f"{scheme}://127.0.0.1:{port}" for site, port in ports.items()}
    urls.update(peer_urls or {})
    paths = {}
    data_ports = data_ports or {}
    data_addresses = data_addresses or {}
    for site, port in ports.items():
        doc: dict[str, Any] = {
            "site": site,
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(root / f"site-{site}"),
            "keys_dir": str(keys),
            "peers": {
                other: {"url": urls[other]}
                | ({"data_address": data_addresses[other]} if other in data_addresses else {})
                for other in ports
                if other != site
            },
            **({"data_listen": f"127.0.0.1:{data_ports[site]}"} if site in data_ports else {}),
            **overrides.get(site, {}),
            **{k: v for k, v in overrides.items() if k not in ports},
        }
        path = root / f"site-{site}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths[site] = path
    return paths


@contextlib.asynccontextmanager
async def running_daemon(
    config: SiteConfig, sock: socket.socket | None = None, **kwargs: Any
) -> AsyncIterator[Daemon]:
    """A daemon serving in this event loop until the block exits (then stopped gracefully)."""
    stop = asyncio.Event()
    ready = asyncio.Event()
    daemon = Daemon(config, sock=sock, **kwargs)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(daemon.serve(stop, ready=lambda _d: ready.set()))
        await ready.wait()
        try:
            yield daemon
        finally:
            stop.set()


@contextlib.asynccontextmanager
async def loopback_pair(
    root: Path,
    *,
    proxy: LinkProxy | None = None,
    link: LinkProxy | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """Sites A and B on 127.0.0.1, peers of each other. `overrides` go into both configs
    (or per site: `A={...}`); with `proxy`, A's data channels to B (the bulk bytes) go through
    that LinkProxy; with `link`, both its control requests and its data channels go through
    that one (one link that fails as a whole)."""
    socks = {"A": bound_socket(), "B": bound_socket()}
    ports = {site: s.getsockname()[1] for site, s in socks.items()}
    async with contextlib.AsyncExitStack() as stack:
        data_ports, data_addresses, peer_urls = None, None, None
        if proxy is not None:
            await stack.enter_async_context(proxy)
            data_ports = {"B": free_port()}
            proxy.target_port = data_ports["B"]
            data_addresses = {"B": proxy.address}
        if link is not None:
            await stack.enter_async_context(link)
            data_ports = {"B": free_port()}
            link.target_port, link.data_target_port = ports["B"], data_ports["B"]
            peer_urls, data_addresses = {"B": link.url}, {"B": link.data_address}
        paths = write_site_configs(
            root,
            ports,
            peer_urls=peer_urls,
            data_ports=data_ports,
            data_addresses=data_addresses,
            **overrides,
        )
        # B first, so A (the usual sender) stops first: its chunks in flight land on a live B.
        b = await stack.enter_async_context(running_daemon(load_config(paths["B"]), socks["B"]))
        a = await stack.enter_async_context(running_daemon(load_config(paths["A"]), socks["A"]))
        yield a, b


@contextlib.asynccontextmanager
async def loopback_sites(
    root: Path, sites: tuple[str, ...] = ("A", "R", "B"), **overrides: Any
) -> AsyncIterator[dict[str, Daemon]]:
    """Daemons for `sites` on 127.0.0.1, all peers of each other (e.g. a source, a relay and a
    destination); `overrides` as for `loopback_pair`. Started last to first, so the first
    (the usual sender) stops first."""
    socks = {site: bound_socket() for site in sites}
    ports = {site: s.getsockname()[1] for site, s in socks.items()}
    paths = write_site_configs(root, ports, **overrides)
    daemons: dict[str, Daemon] = {}
    async with contextlib.AsyncExitStack() as stack:
        for site in reversed(sites):
            daemons[site] = await stack.enter_async_context(
                running_daemon(load_config(paths[site]), socks[site])
            )
        yield {site: daemons[site] for site in sites}


async def wait_for_jobs(daemon: Daemon, ids: list[str], timeout_s: float = 60.0) -> list[Job]:
    """Until every job is committed or failed (bounded by timeout_s: a hang guard, not a
    measure, so generous for a slow or loaded machine)."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = [daemon.journal.job(i) for i in ids]
            jobs = [j for j in found if j is not None and not j.state.active]
            if len(jobs) == len(ids):
                return jobs
            await asyncio.sleep(0.02)


BURST_S = 0.002  # LinkProxy: how much an idle rate-limited link may send at once (seconds' worth)


@dataclass
class HttpMessage:
    """One HTTP/1.1 message a LinkProxy saw go by: a request (`kind` from its path: chunk,
    control, message, local or other) or a reply, its body length, and what the proxy did."""

    start_line: str
    kind: str
    length: int
    flip_at: int | None = None  # body offset of the bit flipped in it, if any
    status: int | None = None  # requests: the status of the reply that answered it
    raw: bytearray | None = None  # requests, when capturing: head and body as forwarded
    seq: int | None = None  # data channel frames: the chunk's (or its receipt's) sequence number

    @property
    def path(self) -> str:
        parts = self.start_line.split(" ")
        return parts[1] if len(parts) > 1 else ""


def _request_kind(start_line: str) -> str:
    path = start_line.split(" ")[1] if " " in start_line else ""
    if path.startswith("/v1/uploads"):
        return "control"
    if path.startswith("/v1/peer/messages"):
        return "message"
    return "local" if path.startswith(("/v1/local", "/v1/messages", "/v1/inbox")) else "other"


class _HttpFlow:
    """Follows the HTTP/1.1 messages in one direction of a connection (Content-Length framing,
    as transferd speaks it) and says which bytes of each forwarded piece are body bytes."""

    def __init__(self, requests: bool, on_message: Callable[[HttpMessage], None]) -> None:
        self.requests = requests
        self.on_message = on_message
        self._head = bytearray()
        self.current: HttpMessage | None = None
        self._pos = 0  # body bytes of `current` seen so far

    def feed(self, data: bytes) -> list[tuple[HttpMessage, int, int, int]]:
        """Body pieces in `data`: (message, start, end, body offset at start)."""
        pieces: list[tuple[HttpMessage, int, int, int]] = []
        i = 0
        while i < len(data):
            if self.current is None:
                had = len(self._head)
                self._head += data[i:]
                end = self._head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._head) > 64 * 1024:
                        self._head.clear()  # not HTTP (or lost track): stop following
                    return pieces
                head = bytes(self._head[: end + 4])
                i += end + 4 - had
                self._head.clear()
                self._start(head)
                continue
            i = _take_body(self, data, i, pieces)
        return pieces

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        kind = _request_kind(lines[0]) if self.requests else "reply"
        message = HttpMessage(lines[0], kind, length)
        self.on_message(message)
        if message.raw is not None:
            message.raw += head
        self.current, self._pos = message, 0
        if length == 0:
            self.current = None


def _take_body(
    flow: _HttpFlow | _ChannelFlow,
    data: bytes,
    i: int,
    pieces: list[tuple[HttpMessage, int, int, int]],
) -> int:
    """The part of `data` from `i` that belongs to the body of `flow.current`: recorded as a
    piece (and in the capture); returns where the body ends in `data`."""
    current = flow.current
    assert current is not None
    take = min(len(data) - i, current.length - flow._pos)
    pieces.append((current, i, i + take, flow._pos))
    if current.raw is not None:
        current.raw += data[i : i + take]
    flow._pos += take
    if flow._pos >= current.length:
        flow.current = None
    return i + take


_RECEIPT_HTTP_STATUS = {0: 204, 1: 422, 2: 403, 3: 507}  # a receipt's status as an HTTP one


class _ChannelFlow:
    """Follows one direction of a data channel (`protocol.channel`) the way `_HttpFlow`
    follows HTTP: client -> server, the opening then chunk headers and bodies (a chunk body is
    a message of kind "chunk"); server -> client, the opening's answer then receipts (a
    receipt is a message of kind "receipt" whose `status` is the receipt's as an HTTP one).
    It reads the bytes as sent (before any flip); on a frame it cannot read it stops following."""

    def __init__(self, requests: bool, on_message: Callable[[HttpMessage], None]) -> None:
        self.requests = requests
        self.on_message = on_message
        self._buf = bytearray()
        self._state = "hello" if requests else "challenge"
        self._need = ch.HELLO_FIXED.size if requests else ch.CHALLENGE_BYTES + ch.ACCEPT_BYTES
        # seq, body length, address, one pass (a trailer follows the body)
        self._head: tuple[int, int, bytes, bool] | None = None
        self.current: HttpMessage | None = None
        self._pos = 0

    def feed(self, data: bytes) -> list[tuple[HttpMessage, int, int, int]]:
        pieces: list[tuple[HttpMessage, int, int, int]] = []
        i = 0
        while i < len(data) and self._state != "lost":
            if self.current is not None:
                i = _take_body(self, data, i, pieces)
                continue
            take = min(len(data) - i, self._need - len(self._buf))
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._need:
                frame = bytes(self._buf)
                self._buf.clear()
                try:
                    self._advance(frame)
                except ProtocolError:
                    self._state = "lost"
        return pieces

    def _advance(self, frame: bytes) -> None:
        state = self._state
        if state == "hello":
            n_src, n_dst, _nonce = ch.decode_hello(frame)
            self._state, self._need = "sites", n_src + n_dst
        elif state == "sites":
            self._state, self._need = "proof", ch.PROOF_BYTES
        elif state in ("proof", "challenge"):
            self._next_frame()
        elif state == "head":
            partial, rest = ch.decode_chunk_head(frame)
            self._head = (partial.seq, partial.body_length, partial.digest, partial.trailed)
            self._state, self._need = "rest", rest
        elif state == "rest":
            assert self._head is not None
            seq, length, digest, trailed = self._head
            name = "one-pass" if trailed else digest.hex()[:16]
            message = HttpMessage(f"CHUNK {name}", "chunk", length, seq=seq)
            self.on_message(message)
            self.current, self._pos = message, 0
            if trailed:
                self._state, self._need = "trailer", ch.TRAILER_BYTES
            else:
                self._next_frame()
        elif state == "trailer":
            self._next_frame()
        elif state == "receipt":
            status, rest = ch.decode_receipt_fixed(frame)
            seq = ch.RECEIPT_FIXED.unpack(frame)[3]
            self.on_message(
                HttpMessage(f"RECEIPT {_RECEIPT_HTTP_STATUS[status]}", "receipt", 0, seq=seq)
            )
            self._state, self._need = "receipt-rest", rest
        elif state == "receipt-rest":
            self._next_frame()

    def _next_frame(self) -> None:
        if self.requests:
            self._state, self._need = "head", ch.CHUNK_FIXED.size
        else:
            self._state, self._need = "receipt", ch.RECEIPT_FIXED.size


class _Sniffed:
    """A data channel or HTTP, told by the connection's first bytes (a channel opens with
    its magic; HTTP requests with a method, replies with "HTTP/")."""

    def __init__(self, requests: bool, on_message: Callable[[HttpMessage], None]) -> None:
        self.requests = requests
        self.on_message = on_message
        self.flow: _HttpFlow | _ChannelFlow | None = None
        self._told = False

    def feed(self, data: bytes) -> list[tuple[HttpMessage, int, int, int]]:
        if not self._told:
            self._told = True
            if len(data) >= 4:  # (both send more than that at once: else, follow nothing)
                if self.requests:
                    channel = data.startswith(ch.MAGIC)
                else:
                    channel = not data.startswith(b"HTTP")
                flow = _ChannelFlow if channel else _HttpFlow
                self.flow = flow(self.requests, self.on_message)
        return self.flow.feed(data) if self.flow is not None else []


@dataclass
class LinkProxy:
    """A TCP proxy to `target_port` on 127.0.0.1 (connections to `port`), and to
    `data_target_port` (connections to `data_port`), that misbehaves on request, as links and
    middleboxes do: one link that a pair's control and data planes can both cross
    (`loopback_pair(link=...)`). What it can do:

    - pace the client -> server direction (`rate_bytes_per_s`) and delay both (`delay_s`);
    - drop every connection at once (`drop()`, a reset as a dying NAT or peer gives), stall
      (`stall()` / `resume()`: bytes stop moving, connections stay open), refuse new
      connections (`down()` / `up()`);
    - flip one bit at byte `flip_at` of the client -> server stream (the first connection
      that gets that far), or, following the framing (HTTP/1.1 for control requests, the
      data channel's frames for chunks), flip one bit in a request or chunk body with
      probability `corrupt_requests[kind]` (kind: chunk, control, message) and in an HTTP
      reply body with probability `corrupt_replies` (seeded by `seed`), and always the first
      `corrupt_first[part]` requests whose path contains `part` (e.g. {"/commit": 1});
    - keep every request and chunk it forwarded (`capture`) for replay tests.
    It counts what it forwarded (`bytes_up`, `bytes_down`; with `follow`, body bytes by kind
    in `body_bytes`: chunk bodies on data channels, control and message request bodies), what
    it corrupted (`corrupted`: each request or chunk with the status its reply or receipt
    gave, None when none came), drops and flips.
    """

    target_port: int = 0
    rate_bytes_per_s: float | None = None
    flip_at: int | None = None
    flipped: int = 0
    port: int = 0
    delay_s: float = 0.0
    seed: int = 0
    corrupt_requests: dict[str, float] = field(default_factory=dict)
    corrupt_replies: float = 0.0
    corrupt_first: dict[str, int] = field(default_factory=dict)
    capture: bool = False
    follow: bool = False
    body_bytes: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    drops: int = 0
    corrupted: list[HttpMessage] = field(default_factory=list)
    corrupted_replies: int = 0
    captured: list[HttpMessage] = field(default_factory=list)
    # capture: each data-plane connection's client -> server bytes as forwarded (for replay)
    captured_streams: list[bytearray] = field(default_factory=list)
    data_target_port: int = 0  # a second plane: what connects to `data_port` goes there
    data_port: int = 0
    _server: asyncio.Server | None = None
    _data_server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _data_writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _held: set[asyncio.StreamWriter] = field(default_factory=set)
    _held_released: asyncio.Event = field(default_factory=asyncio.Event)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)
    _refusing: bool = False
    _rng: random.Random = field(default_factory=random.Random)

    async def __aenter__(self) -> LinkProxy:
        self._rng.seed(self.seed)
        self._flowing.set()
        self._server = await asyncio.start_server(
            lambda r, w: self._handle(r, w, self.target_port), "127.0.0.1", 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._data_server = await asyncio.start_server(
            lambda r, w: self._handle(r, w, self.data_target_port), "127.0.0.1", 0
        )
        self.data_port = self._data_server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._data_server is not None
        self._held_released.set()
        self._server.close()
        self._data_server.close()
        self._flowing.set()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        await self._data_server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_address(self) -> str:
        return f"127.0.0.1:{self.data_port}"

    # -- faults on demand ----------------------------------------------------------------------
    def drop(self) -> int:
        """Reset every open connection now; returns how many were dropped."""
        writers, self._writers = list(self._writers), set()
        for writer in writers:
            writer.transport.abort()
        self.drops += len(writers) // 2
        return len(writers) // 2

    def stall(self) -> None:
        """Stop moving bytes (both ways) until `resume()`; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def down(self) -> None:
        """Refuse new connections and drop the open ones (the peer is gone)."""
        self._refusing = True
        self.drop()

    def up(self) -> None:
        self._refusing = False

    def black_hole(self) -> int:
        """The data-plane connections open now stop moving bytes for good, without a reset
        (a middlebox that lost their state); new connections flow. Returns how many."""
        self._held = set(self._data_writers)
        return len(self._held) // 2

    # -- forwarding ----------------------------------------------------------------------------
    @property
    def _follows(self) -> bool:
        return bool(
            self.follow
            or self.corrupt_requests
            or self.corrupt_replies
            or self.corrupt_first
            or self.capture
        )

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target_port: int
    ) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}
        if target_port == self.data_target_port:
            self._data_writers |= {writer, up_w}
        waiting: list[HttpMessage] = []  # requests on this connection awaiting their reply

        def on_request(message: HttpMessage) -> None:
            waiting.append(message)
            if self.capture:
                message.raw = bytearray()
                self.captured.append(message)
            forced = [p for p, n in self.corrupt_first.items() if n > 0 and p in message.path]
            chance = self._rng.random() < self.corrupt_requests.get(message.kind, 0.0)
            if (forced or chance) and message.length:
                for part in forced:
                    self.corrupt_first[part] -= 1
                message.flip_at = self._rng.randrange(message.length)
                self.corrupted.append(message)

        def on_reply(message: HttpMessage) -> None:
            status = int(message.start_line.split(" ")[1])
            if message.kind == "receipt":  # data channel: receipts say which chunk they answer
                for i, request in enumerate(waiting):
                    if request.seq == message.seq:
                        waiting.pop(i).status = status
                        break
                return
            if waiting:
                waiting.pop(0).status = status
            if message.length and self._rng.random() < self.corrupt_replies:
                message.flip_at = self._rng.randrange(message.length)
                self.corrupted_replies += 1

        requests = _Sniffed(True, on_request) if self._follows else None
        replies = _Sniffed(False, on_reply) if self._follows else None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_w, True, requests))
                tg.create_task(self._pipe(up_r, writer, False, replies))
        finally:
            self._writers -= {writer, up_w}
            self._data_writers -= {writer, up_w}
            self._held -= {writer, up_w}

    def _corrupt(self, data: bytes, flow: _Sniffed | None, seen: int, upstream: bool) -> bytes:
        buf: bytearray | None = None
        if upstream and self.flip_at is not None and not self.flipped:
            if seen <= self.flip_at < seen + len(data):
                buf = bytearray(data)
                buf[self.flip_at - seen] ^= 0x01
                self.flipped += 1
        if flow is not None:
            for message, start, end, at in flow.feed(data):
                if upstream:
                    self.body_bytes[message.kind] = (
                        self.body_bytes.get(message.kind, 0) + end - start
                    )
                if message.flip_at is not None and at <= message.flip_at < at + (end - start):
                    buf = buf if buf is not None else bytearray(data)
                    buf[start + message.flip_at - at] ^= 1 << self._rng.randrange(8)
                    self.flipped += 1
                    if message.raw is not None:  # keep the capture as forwarded
                        message.raw[len(message.raw) - (end - start) + message.flip_at - at] = buf[
                            start + message.flip_at - at
                        ]
        return bytes(buf) if buf is not None else data

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: bool,
        flow: _Sniffed | None,
    ) -> None:
        """Forward one direction. With a delay, a second task writes each piece `delay_s`
        after it arrived (latency, not a throughput cap)."""
        loop = asyncio.get_running_loop()
        late: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def write_late() -> None:
            while (item := await late.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._write(writer, data, upstream)

        try:
            async with asyncio.TaskGroup() as tg:
                if self.delay_s:
                    tg.create_task(write_late())
                await self._read(reader, writer, upstream, flow, late)
                late.put_nowait(None)
        except* (ConnectionError, OSError):
            pass  # either side went away: the daemons' retry logic is what is under test
        finally:
            if writer.transport.is_closing():
                writer.transport.abort()
            else:
                writer.close()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: bool,
        flow: _Sniffed | None,
        late: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        seen = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A rate-limited direction forwards small slices, paced, as a slow link delivers them
        # (256 KiB at once would hand a receiver whole chunk bodies in one burst).
        step = 16 * 1024 if upstream and self.rate_bytes_per_s else 256 * 1024
        stream: bytearray | None = None
        if self.capture and upstream and writer in self._data_writers:
            stream = bytearray()
            self.captured_streams.append(stream)
        while data := await reader.read(step):
            data = self._corrupt(data, flow, seen, upstream)
            if stream is not None:
                stream += data
            seen += len(data)
            if self.delay_s:
                late.put_nowait((loop.time() + self.delay_s, data))
            else:
                await self._write(writer, data, upstream)
            if upstream and self.rate_bytes_per_s:
                ahead = seen / self.rate_bytes_per_s - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif ahead < -BURST_S:
                    # An idle link saves up no more than BURST_S of sending.
                    started += -ahead - BURST_S

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, upstream: bool) -> None:
        await self._flowing.wait()
        if writer in self._held:
            await self._held_released.wait()  # (set as the proxy closes)
        writer.write(data)
        if upstream:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        await writer.drain()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int) -> Iterator[bool]:
    """A tmpfs of `size_bytes` mounted at `path` for the block (a small disk to fill): yields
    False, mounting nothing, where this process may not mount (not root)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def loopback_tls(out: Path) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 / localhost signed by it, for TLS tests:
    returns the site config's `tls` section (cert, key, ca as file paths)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "transferd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    (out / "cert.pem").write_bytes(cert.public_bytes(pem))
    (out / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"cert": str(out / "cert.pem"), "key": str(out / "key.pem"), "ca": str(out / "ca.pem")}


class _CappedOpener(LocalFileOpener):
    def write(self, data: Any) -> int:
        fs: CappedFileSystem = self.fs
        fs.written += len(data)
        if fs.written > fs.capacity_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(super().write(data))


class CappedFileSystem(LocalFileSystem):
    """Local files, but writes fail with ENOSPC once `capacity_bytes` have been written.
    Register as protocol "transferd-capped" with `register()`."""

    protocol = ("transferd-capped",)

    def __init__(self, capacity_bytes: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity_bytes = capacity_bytes
        self.written = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("transferd-capped://"):
            path = path[len("transferd-capped://") :]
        return super()._strip_protocol(path)

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "a" in mode:
            return _CappedOpener(self._strip_protocol(path), mode, fs=self, **kwargs)
        return super()._open(path, mode, **kwargs)

    def put_file(self, lpath: Any, rpath: Any, callback: Any = None, **kwargs: Any) -> None:
        # LocalFileSystem.put_file is a plain copy; route it through _open so the cap applies.
        with open(lpath, "rb") as src, self._open(rpath, "wb") as dst:
            while block := src.read(1024 * 1024):
                dst.write(block)

    @staticmethod
    def register() -> None:
        import fsspec

        fsspec.register_implementation("transferd-capped", CappedFileSystem, clobber=True)


@dataclass
class MotoS3Server:
    """moto's S3 server (`moto[server]`) in a subprocess on 127.0.0.1 and a free port, as s3fs's
    own tests run it: a real S3 endpoint speaking HTTP, with its objects in that process's memory.

        with MotoS3Server() as s3:
            s3.create_bucket("site-b")
            options = s3.storage_options      # endpoint and (dummy) credentials for fsspec

    `start()` raises RuntimeError (with the server's output) when moto is missing or the server
    does not answer within `start_timeout_s`."""

    start_timeout_s: float = 30.0
    port: int = 0
    proc: Any = None
    _log: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        # Explicit credentials: botocore must never go looking for real ones (instance metadata
        # lives outside 127.0.0.0/8).
        return {
            "key": "transferd-test",
            "secret": "transferd-test",
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def start(self) -> MotoS3Server:
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.request

        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"moto[server] is not installed: {exc}") from exc
        self.port = free_port()
        # Its request log goes to a file: a pipe nobody reads fills up and stops the server.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"moto's S3 server exited at start: {err}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto's S3 server did not answer within {self.start_timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (for tests that look at the bucket directly)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="transferd-test",
            aws_secret_access_key="transferd-test",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self, bucket: str) -> list[str]:
        """The requests the server has answered for `bucket` so far, from its request log
        (`"GET /bucket?list-type=2&prefix=... HTTP/1.1" 200`): for tests that count them."""
        import os
        import re

        if self._log is None:
            return []
        # A descriptor of its own: reading must not move the offset the server writes at.
        fd = os.open(f"/proc/self/fd/{self._log.fileno()}", os.O_RDONLY)
        with open(fd, "rb") as fh:
            text = fh.read().decode(errors="replace")
        pattern = re.compile(rf'"([A-Z]+ /{re.escape(bucket)}[/?\s][^"]*)"')
        return pattern.findall(text)
