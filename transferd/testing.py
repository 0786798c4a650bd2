"""Test helpers shipped with transferd: a loopback peer pair, a fake clock, an impaired link.

    async with loopback_pair(tmp_path) as (a, b):      # two real daemons on 127.0.0.1
        ids = a.sender.submit("curated/x.bin", ["B"])
        await wait_for_jobs(a, ids)

`write_site_configs` lays out keys and site YAML files for subprocess daemons; `LinkProxy` sits
between two daemons and can slow the stream down or flip one byte in flight;
`CappedFileSystem` is a local fsspec filesystem that runs out of space after a set budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from transferd.config import SiteConfig, load_config
from transferd.daemon import Daemon
from transferd.protocol.local_api import Job
from transferd.site.journal import Journal
from transferd.site.keys import Keyring, keygen
from transferd.site.metrics import Metrics
from transferd.site.receiver import Receiver
from transferd.site.storage import LocalStorage

__all__ = [
    "CappedFileSystem",
    "FakeClock",
    "LinkProxy",
    "bound_socket",
    "loopback_pair",
    "loopback_tls",
    "receiver_at",
    "running_daemon",
    "wait_for_jobs",
    "write_site_configs",
]


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
    root: Path, *, proxy: LinkProxy | None = None, **overrides: Any
) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """Sites A and B on 127.0.0.1, peers of each other. `overrides` go into both configs
    (or per site: `A={...}`); with `proxy`, A's data channels to B go through that LinkProxy
    (the bulk bytes; control requests go direct)."""
    socks = {"A": bound_socket(), "B": bound_socket()}
    ports = {site: s.getsockname()[1] for site, s in socks.items()}
    async with contextlib.AsyncExitStack() as stack:
        data_ports, data_addresses = None, None
        if proxy is not None:
            await stack.enter_async_context(proxy)
            data_ports = {"B": free_port()}
            proxy.target_port = data_ports["B"]
            data_addresses = {"B": f"127.0.0.1:{proxy.port}"}
        paths = write_site_configs(
            root, ports, data_ports=data_ports, data_addresses=data_addresses, **overrides
        )
        a = await stack.enter_async_context(running_daemon(load_config(paths["A"]), socks["A"]))
        b = await stack.enter_async_context(running_daemon(load_config(paths["B"]), socks["B"]))
        yield a, b


async def wait_for_jobs(daemon: Daemon, ids: list[str], timeout_s: float = 20.0) -> list[Job]:
    """Until every job is committed or failed (bounded by timeout_s)."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = [daemon.journal.job(i) for i in ids]
            jobs = [j for j in found if j is not None and not j.state.active]
            if len(jobs) == len(ids):
                return jobs
            await asyncio.sleep(0.02)


BURST_S = 0.002  # LinkProxy: how much an idle rate-limited link may send at once (seconds' worth)


@dataclass
class LinkProxy:
    """A TCP proxy to `target_port` on 127.0.0.1: optionally rate-limited (client -> server
    bytes per second), and optionally flipping one bit at byte `flip_at` of the client -> server
    stream of the first connection that gets that far."""

    target_port: int = 0
    rate_bytes_per_s: float | None = None
    flip_at: int | None = None
    flipped: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def __aenter__(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipe(reader, up_w, upstream=True))
            tg.create_task(self._pipe(up_r, writer, upstream=False))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        seen = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A rate-limited direction forwards small slices, paced, as a slow link delivers them
        # (256 KiB at once would hand a receiver whole chunk bodies in one burst).
        step = 16 * 1024 if upstream and self.rate_bytes_per_s else 256 * 1024
        try:
            while data := await reader.read(step):
                if (
                    upstream
                    and self.flip_at is not None
                    and not self.flipped
                    and seen <= self.flip_at < seen + len(data)
                ):
                    buf = bytearray(data)
                    buf[self.flip_at - seen] ^= 0x01
                    data = bytes(buf)
                    self.flipped += 1
                seen += len(data)
                writer.write(data)
                await writer.drain()
                if upstream and self.rate_bytes_per_s:
                    ahead = seen / self.rate_bytes_per_s - (loop.time() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                    elif ahead < -BURST_S:
                        # An idle link saves up no more than BURST_S of sending.
                        started += -ahead - BURST_S
        except (ConnectionError, OSError):
            pass  # either side went away: the daemons' retry logic is what is under test
        finally:
            writer.close()


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
