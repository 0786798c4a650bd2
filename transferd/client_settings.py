"""What a client command (`transferd send`, `status`, `message`, ...) needs of the site config,
and a cache of it keyed by the config file's exact bytes.

Validating the config (`transferd.config`) costs a client ~110 ms of imports and model builds
(pydantic, yaml, the line finder), more than the rest of a short `send --wait` together. The
result depends only on the file's bytes, its path and the code that validates it, so once a
file has been validated, its `ClientSettings` (the validated values a client reads) are kept
as JSON under the user's cache folder, named by a hash of exactly those: an edited file, a
moved one, or a changed transferd is a different name, and goes through the full validation
(the same errors, naming the field and line). Only a file that validated is ever cached; a
cache that cannot be read or written is skipped. Paths are resolved (symlinks, `~`) when used,
as `SiteConfig` does, by the same functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from transferd.config import SiteConfig

__all__ = [
    "ClientSettings",
    "TlsFiles",
    "cache_dir",
    "client_settings",
    "code_stamp",
    "data_dir_is_local",
    "local_url",
    "resolve_path",
    "save_client_settings",
]

CACHE_FORMAT = 1
MAX_CONFIG_BYTES = 1024 * 1024  # transferd.documents.CONFIG_LIMITS: larger files take the full path
# The code whose behaviour decides what a config file validates to: a changed file here is a
# new cache name (an upgrade, or an edited checkout).
_VALIDATING_CODE = (
    ("transferd", "config.py"),
    ("transferd", "client_settings.py"),
    ("transferd", "documents.py"),
    ("netplan", "ids.py"),
    ("netplan", "safeyaml.py"),
    ("netplan", "yamlpos.py"),
)


# -- derived values, shared with SiteConfig ----------------------------------------------------
def resolve_path(base_dir: str, value: str) -> Path:
    """A path of the config file: `~` expanded, relative to the file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path(base_dir) / path).resolve()


def data_dir_is_local(data_dir: str) -> bool:
    protocol = urlsplit(data_dir).scheme
    return protocol in ("", "file") or (len(protocol) == 1 and protocol.isalpha())


def local_data_path(base_dir: str, data_dir: str) -> Path:
    value = data_dir[len("file://"):] if data_dir.startswith("file://") else data_dir
    return resolve_path(base_dir, value)


def local_url(listen: str, tls: bool) -> str:
    """How a client on this machine reaches the daemon listening on `listen`."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{'https' if tls else 'http'}://{host}:{port}"


class TlsFiles(NamedTuple):
    cert: str
    key: str
    ca: str | None


@dataclass(frozen=True)
class ClientSettings:
    """The validated values of a site config that a client command reads (from `SiteConfig`,
    or from the cache of a file that validated)."""

    site: str
    peers: tuple[str, ...]
    listen: str
    data_dir: str
    keys_dir: str
    base_dir: str
    tls: TlsFiles | None

    @classmethod
    def of(cls, config: SiteConfig) -> ClientSettings:
        tls = config.tls
        return cls(
            site=config.site,
            peers=tuple(config.peers),
            listen=config.listen,
            data_dir=config.data_dir,
            keys_dir=config.keys_dir,
            base_dir=config.base_dir,
            tls=None if tls is None else TlsFiles(tls.cert, tls.key, tls.ca),
        )

    def resolve(self, value: str) -> Path:
        return resolve_path(self.base_dir, value)

    @property
    def data_dir_is_local(self) -> bool:
        return data_dir_is_local(self.data_dir)

    @property
    def data_path(self) -> Path:
        return local_data_path(self.base_dir, self.data_dir)

    @property
    def keys_path(self) -> Path:
        return self.resolve(self.keys_dir)

    @property
    def local_url(self) -> str:
        return local_url(self.listen, self.tls is not None)

    def to_json(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> ClientSettings | None:
        """The settings a cache file holds, or None when it is not one this code wrote."""
        try:
            if data.get("format") != CACHE_FORMAT:
                return None
            tls = data["tls"]
            settings = cls(
                site=data["site"],
                peers=tuple(data["peers"]),
                listen=data["listen"],
                data_dir=data["data_dir"],
                keys_dir=data["keys_dir"],
                base_dir=data["base_dir"],
                tls=None if tls is None else TlsFiles(*tls),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        strings = (settings.site, settings.listen, settings.data_dir, settings.keys_dir,
                   settings.base_dir, *settings.peers, *(settings.tls or ()))
        if not all(isinstance(s, str) for s in strings if s is not None):
            return None
        return settings


# -- the cache ---------------------------------------------------------------------------------
def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/transferd` (default `~/.cache/transferd`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "transferd" / "client-settings"


def code_stamp() -> bytes:
    """The size and mtime of each file of the validating code (empty: an unknown layout)."""
    here = Path(__file__).resolve().parent.parent
    parts = []
    for package, name in _VALIDATING_CODE:
        try:
            st = os.stat(here / package / name)
        except OSError:
            return b""  # not a layout we know: never cached
        parts.append(f"{package}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts).encode()


def _cache_file(path: Path, raw: bytes) -> Path | None:
    stamp = code_stamp()
    if not stamp:
        return None
    h = hashlib.sha256()
    for part in (str(path).encode(), raw, stamp):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return cache_dir() / f"{h.hexdigest()}.json"


def _real_path(path: str | Path) -> Path:
    """The file's real path (symlinks resolved, as `load_config` resolves the folder relative
    paths are read against): a link moved to an identical file elsewhere is another name."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(path).absolute()


def _read_raw(path: Path) -> bytes | None:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    return raw if len(raw) <= MAX_CONFIG_BYTES else None


def client_settings(path: str | Path) -> ClientSettings:
    """The client settings of the config file at `path`: from the cache when this exact file
    validated before, otherwise validated in full (`load_config`: ConfigError naming the field
    for a bad one) and then cached."""
    path = _real_path(path)
    raw = _read_raw(path)
    where = _cache_file(path, raw) if raw is not None else None
    if where is not None:
        with contextlib.suppress(OSError, ValueError):
            cached = ClientSettings.from_json(json.loads(where.read_bytes()))
            if cached is not None:
                return cached
    from transferd.config import load_config_and_text

    config, text = load_config_and_text(path)
    settings = ClientSettings.of(config)
    # Cached only if what was validated is exactly the bytes the name was made of (the file
    # may have changed between the two reads).
    if where is not None and raw is not None and raw.decode("utf-8-sig", "replace") == text:
        _write(where, settings)
    return settings


def save_client_settings(path: str | Path, config: SiteConfig, text: str) -> None:
    """Cache the settings of `config`, validated from `text`, the content of `path` (the
    daemon does, so that the first client after its start finds them)."""
    path = _real_path(path)
    raw = _read_raw(path)
    where = _cache_file(path, raw) if raw is not None else None
    if where is not None and raw is not None and raw.decode("utf-8-sig", "replace") == text:
        _write(where, ClientSettings.of(config))


def _write(where: Path, settings: ClientSettings) -> None:
    try:
        where.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(settings.to_json(), fh)
            os.replace(tmp, where)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only or full cache folder: the next client validates in full again
