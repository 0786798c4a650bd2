"""The site config: one YAML file per daemon, validated once into a frozen `SiteConfig`.

Errors name the field and its YAML line (`peers.B.url: ... (line 7)`), through netplan.yamlpos;
the file is read by `transferd.documents` (size, encoding, depth and alias bombs checked first).
Relative paths in the file (data_dir, keys_dir, TLS files) are resolved against the file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator

from netplan import yamlpos
from netplan.ids import SiteId, TrafficClass
from transferd.client_settings import data_dir_is_local, local_data_path, local_url, resolve_path
from transferd.documents import CONFIG_LIMITS, parse_yaml_document, read_document_text
from transferd.errors import ConfigError
from transferd.protocol.wire import FrozenModel

__all__ = [
    "BulkWeights",
    "CheckpointSettings",
    "CongestionControl",
    "PeerConfig",
    "RateCapsMbps",
    "RelaySettings",
    "SiteConfig",
    "TlsConfig",
    "TrafficSettings",
    "WatchSettings",
    "load_config",
    "load_config_and_text",
    "parse_config",
]

MiB = 1024 * 1024

# Per data-channel socket (`peers.<p>.congestion_control`): bbr by default, since hosts default
# to cubic, which a lossy long link caps at a few Mbit/s per stream (Mathis et al. 1997);
# `system` keeps the host's default. Here, not in protocol.channel, so that reading a config
# (every `transferd send`) does not build the data-channel models.
CongestionControl = Literal["bbr", "cubic", "system"]


class TlsConfig(FrozenModel):
    cert: str
    key: str
    ca: str | None = None  # peers' CA bundle; None uses the system store


Mbps = Annotated[float, Field(gt=0)]


class RateCapsMbps(FrozenModel):
    """Token-bucket caps toward one peer, in Mbit/s; absent = uncapped. Control is never held."""

    total: Mbps | None = None
    interactive: Mbps | None = None
    checkpoint: Mbps | None = None
    sync: Mbps | None = None

    def per_class(self) -> dict[TrafficClass, float]:
        caps = {
            TrafficClass.INTERACTIVE: self.interactive,
            TrafficClass.CHECKPOINT: self.checkpoint,
            TrafficClass.SYNC: self.sync,
        }
        return {cls: mbps for cls, mbps in caps.items() if mbps is not None}


class BulkWeights(FrozenModel):
    checkpoint: Annotated[float, Field(gt=0)] = 3.0  # issue 4: checkpoint 3 : sync 1
    sync: Annotated[float, Field(gt=0)] = 1.0


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:7701")
    return value


def _split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class PeerConfig(FrozenModel):
    url: str
    rate_caps_mbps: RateCapsMbps = Field(default_factory=RateCapsMbps)
    weights: BulkWeights | None = None  # this link's bulk weights; None: traffic.weights
    # TCP congestion control of the data channels to and from this peer; `system` keeps the
    # host's default (a refused algorithm falls back to it, with a log line).
    congestion_control: CongestionControl = "bbr"
    # Where this peer's data channels connect (host:port), when not the URL's host and the port
    # the peer advertises (e.g. behind NAT or a port-forwarding proxy).
    data_address: str | None = None

    @field_validator("data_address")
    @classmethod
    def _data_host_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_host_port(value)

    @property
    def data_host_port(self) -> tuple[str, int] | None:
        return None if self.data_address is None else _split_host_port(self.data_address)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rate_caps" in data:
            raise ValueError(
                "rate_caps was renamed to rate_caps_mbps, in Mbit/s by class: e.g. "
                "rate_caps_mbps: {total: 900, sync: 200}"
            )
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")


class RelaySettings(FrozenModel):
    """This site passing other sites' transfers on (A -> here -> B): only from the peers in
    `for_peers` to the destinations in `destinations` (both must be configured peers). Each
    chunk is passed on as it arrives from a memory window of `memory_mib`; while the next hop is
    slower than the previous one chunks beyond it wait on disk (`spill_dir`, at most
    `spill_mib`; 0: never), and beyond both the relay stops reading (TCP pushes back on the
    sender). Nothing is kept once the destination has a chunk.

    As a destination, `accept_via` names the relays each source's uploads may come through
    (`{A: [R]}`: A's uploads directly or through R, no other source's through anyone); absent,
    any peer may pass any peer's uploads on (the manifest its source signed still decides what
    is committed)."""

    for_peers: list[SiteId] = Field(default_factory=list)
    destinations: list[SiteId] = Field(default_factory=list)
    memory_mib: Annotated[int, Field(ge=1, le=65536)] = 256
    spill_mib: Annotated[int, Field(ge=0, le=16 << 20)] = 1024  # at most 16 TiB
    # default: <state_dir>/relay-spill; checked writable at start-up on a site that relays
    spill_dir: Annotated[str, Field(min_length=1)] | None = None
    # A chunk whose channel to the next hop has not moved (no byte acknowledged, no receipt)
    # for this long, or that stopped arriving from the previous hop for this long, is answered
    # "unreachable" to the sender, which takes another route (a relay never holds a sender's
    # chunk in silence). Finite: it bounds how long a hung hop holds a chunk; an hour is far
    # beyond any RTO backoff worth waiting out.
    forward_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 20.0
    accept_via: dict[SiteId, list[SiteId]] | None = None


class CheckpointSettings(FrozenModel):
    targets: list[str] = Field(default_factory=list)  # sites that watch mode replicates steps to
    retention: Annotated[int, Field(ge=1)] = 5  # newest K complete steps kept per run, here


class WatchSettings(FrozenModel):
    enabled: bool = False
    marker: str = "COMMITTED"  # a step folder holding this file is complete
    quiet_period_s: Annotated[float, Field(gt=0)] = 30.0  # or: nothing changed for this long
    poll_interval_s: Annotated[float, Field(gt=0)] = 2.0


class TrafficSettings(FrozenModel):
    """Traffic classes: how bulk classes share a link, adaptive streams, interactive messages."""

    weights: BulkWeights = Field(default_factory=BulkWeights)
    adaptive_streams: bool = True  # False: exactly `streams` parallel uploads per peer and class
    streams_min: Annotated[int, Field(ge=1, le=64)] = 1
    streams_max: Annotated[int, Field(ge=1, le=64)] = 32  # GridFTP/FTS3-style upper bound
    message_deadline_ms: Annotated[float, Field(ge=0)] = 1000.0  # when a sender names none
    inbox_hook: list[str] | None = None  # argv run per received message (body on stdin)
    # Benchmark baseline: all classes share one connection pool per peer (no class isolation).
    shared_pool: bool = False
    # The event loop (control, interactive messages) runs at SCHED_RR 1 where the host allows
    # it, so it never waits for a CPU behind bulk work (`site.threads.raise_loop_priority`).
    loop_priority: Literal["realtime", "normal"] = "realtime"
    # Bulk threads (data channels, hashing, zstd, pwrite): "nice" lowers them within the daemon
    # (nice +10); "idle" runs them at SCHED_IDLE, so the host's other processes (an
    # application's requests to this daemon) preempt them the moment they wake, at the risk of
    # starving the bulk, and the loop behind a starved thread that holds the GIL, on a host
    # whose cores are busy with other work; "adaptive" is "idle" while messages are live (one
    # in flight, or sent or received in the last second) and "nice" otherwise (`site.threads`).
    bulk_priority: Literal["adaptive", "idle", "nice"] = "nice"

    @model_validator(mode="after")
    def _bounds(self) -> TrafficSettings:
        if self.streams_min > self.streams_max:
            raise ValueError("streams_min must be <= streams_max")
        return self


class SiteConfig(FrozenModel):
    site: SiteId  # the plan contract's one site-id rule (netplan.plan)
    listen: str
    data_dir: str
    keys_dir: str
    peers: dict[SiteId, PeerConfig] = Field(default_factory=dict)
    state_dir: str | None = None  # journal + staging; default <data_dir>/.transferd (local only)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # passed to fsspec.filesystem
    tls: TlsConfig | None = None
    # The data listener (bulk chunks on data channels) as host:port; default: listen's host,
    # an ephemeral port (peers learn it over the control plane).
    data_listen: str | None = None
    chunk_size: Annotated[int, Field(ge=64 * 1024, le=256 * MiB)] = 8 * MiB
    compression: Literal["auto", "off"] | Annotated[int, Field(ge=1, le=22)] = "auto"
    # Data channels per peer at start; adapts within traffic.streams_*. Two: with bbr per
    # socket one stream fills a clean long link, and on a lossy one 2 bbr streams beat 4 and 8
    # (benchmarks/README.md, the spike); the controller adds streams that are loss-limited.
    streams: Annotated[int, Field(ge=1, le=64)] = 2
    auth_window_s: Annotated[float, Field(gt=0)] = 300.0  # accepted clock skew / replay window
    # An open upload that received nothing for this long is reclaimed at the next start (its
    # sender can still resume it: it starts over).
    staging_ttl_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    # The region this site is in (a netplan topology's site region): checked against a
    # dataset's residency before this site holds any of its bytes, as a relay or a destination.
    region: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # Residency of the data held here, by path prefix (`curated/eu-corpus: [eu]`): the regions
    # its copies may be held in. A plan's sync entries add theirs.
    residency: dict[str, list[Annotated[str, Field(min_length=1, max_length=64)]]] = Field(
        default_factory=dict
    )
    relay: RelaySettings = Field(default_factory=RelaySettings)
    # Where the file lives; set by load_config, not by the YAML.
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, value: Any) -> Any:
        """One message for every wrong value (not pydantic's per-branch union errors)."""
        if value in ("auto", "off") or (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 22
        ):
            return value
        raise ValueError(f"must be auto, off or a zstd level 1-22, not {value!r}")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_host_port(value)

    @field_validator("data_listen")
    @classmethod
    def _data_host_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_host_port(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> SiteConfig:
        if self.site in self.peers:
            raise ValueError(f"peers: a site cannot list itself ({self.site}) as a peer")
        for target in self.checkpoints.targets:
            if target not in self.peers:
                raise ValueError(f"checkpoints.targets: {target!r} is not one of peers")
        if self.traffic.adaptive_streams and not (
            self.traffic.streams_min <= self.streams <= self.traffic.streams_max
        ):
            raise ValueError("streams: must lie within traffic.streams_min..streams_max")
        for name, sites in (("for_peers", self.relay.for_peers),
                            ("destinations", self.relay.destinations)):
            for other in sites:
                if other not in self.peers:
                    raise ValueError(f"relay.{name}: {other!r} is not one of peers")
        for source, relays in (self.relay.accept_via or {}).items():
            for other in (source, *relays):
                if other not in self.peers:
                    raise ValueError(f"relay.accept_via.{source}: {other!r} is not one of peers")
        if self.state_dir is None and not self.data_dir_is_local:
            raise ValueError("state_dir: required when data_dir is not a local path")
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def data_dir_is_local(self) -> bool:
        return data_dir_is_local(self.data_dir)

    def resolve(self, value: str) -> Path:
        return resolve_path(self.base_dir, value)

    @property
    def data_path(self) -> Path:
        """The local data root (only meaningful when data_dir_is_local)."""
        return local_data_path(self.base_dir, self.data_dir)

    @property
    def relay_spill_path(self) -> Path:
        if self.relay.spill_dir is not None:
            return self.resolve(self.relay.spill_dir)
        return self.state_path / "relay-spill"

    @property
    def keys_path(self) -> Path:
        return self.resolve(self.keys_dir)

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.resolve(self.state_dir)
        return self.data_path / ".transferd"

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def data_listen_host_port(self) -> tuple[str, int]:
        if self.data_listen is None:
            return self.listen_host, 0
        return _split_host_port(self.data_listen)

    @property
    def local_url(self) -> str:
        """How the CLI on this machine reaches this daemon."""
        return local_url(self.listen, self.tls is not None)


def parse_config(text: str, base_dir: str | Path = ".", source: str = "<config>") -> SiteConfig:
    """Validate YAML text into a SiteConfig; every problem becomes one `field: msg (line N)`."""
    doc = parse_yaml_document(text, source)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{source}: a site config must be a YAML mapping", issues=["<document>"])
    try:
        return SiteConfig.model_validate({**doc.data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        issues = [str(issue) for issue in yamlpos.field_issues(exc, doc)]
        raise ConfigError(f"{source}: invalid site config", issues=issues) from exc


def load_config(path: str | Path) -> SiteConfig:
    return load_config_and_text(path)[0]


def load_config_and_text(path: str | Path) -> tuple[SiteConfig, str]:
    """The config at `path` and the exact text it was validated from."""
    path = Path(path)
    text = read_document_text(path, "site config", CONFIG_LIMITS)
    return parse_config(text, base_dir=path.resolve().parent, source=str(path)), text
