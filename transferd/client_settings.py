"""What a client command (`transferd send`, `status`, `message`, ...) needs of the site config,
and a cache of it keyed by the config file's exact text.

Validating the config (`transferd.config`) costs a client ~110 ms of imports and model builds
(pydantic, yaml, the line finder), more than the rest of a short `send --wait` together. The
result depends only on the file's text, its real path and the code that validates it, so once a
file has been validated, its `ClientSettings` (the validated values a client reads; no secrets)
are kept as JSON under the user's cache folder, named by a hash of exactly those: an edited
file, a moved one, or a changed transferd, pydantic or PyYAML is a different name, and goes
through the full validation (the same errors, naming the path the user gave, the field and the
line). The file is read once, through one descriptor, and those bytes are what is validated
and hashed; only a regular file that validated is cached (a pipe or FIFO is read as it comes).
An entry is read only from a folder and as a file owned by this user that no one else may
write (anyone else could point the CLI's signed requests elsewhere); anything else, or a cache
that cannot be read or written, is skipped. `TRANSFERD_NO_CLIENT_CACHE=1` turns it off. Paths
are resolved (symlinks, `~`) when used, as `SiteConfig` does, by the same functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import stat
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
# The code whose behaviour decides what a config file validates to: a change to its text is a
# new cache name (an upgrade, or an edited checkout); with the files that carry the versions of
# pydantic and PyYAML (read, not imported: a cache hit imports neither).
_VALIDATING_CODE = (
    ("transferd", "config.py"),
    ("transferd", "client_settings.py"),
    ("transferd", "documents.py"),
    ("transferd", "errors.py"),
    ("transferd/protocol", "wire.py"),
    ("netplan", "ids.py"),
    ("netplan", "safeyaml.py"),
    ("netplan", "yamlpos.py"),
)
_LIBRARY_VERSIONS = (("pydantic", "version.py"), ("yaml", "__init__.py"))


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
    """`$XDG_CACHE_HOME/transferd/client-settings` (default `~/.cache/...`; a relative
    XDG_CACHE_HOME is ignored, as the XDG spec says)."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):
        root = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "transferd" / "client-settings"


def cache_enabled() -> bool:
    """False when TRANSFERD_NO_CLIENT_CACHE is set (to anything but "" or "0")."""
    return os.environ.get("TRANSFERD_NO_CLIENT_CACHE", "") in ("", "0")


def code_stamp() -> bytes:
    """A hash of the text of the validating code and of the files that hold the versions of
    pydantic and PyYAML (empty: a layout this code does not know, never cached)."""
    here = Path(__file__).resolve().parent.parent
    files = [here / package / name for package, name in _VALIDATING_CODE]
    for library, name in _LIBRARY_VERSIONS:
        spec = importlib.util.find_spec(library)  # where it is; nothing is imported
        if spec is None or not spec.submodule_search_locations:
            return b""
        files.append(Path(next(iter(spec.submodule_search_locations))) / name)
    h = hashlib.sha256()
    for file in files:
        try:
            data = file.read_bytes()
        except OSError:
            return b""
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest().encode()


def _cache_name(real: Path, text: str) -> str | None:
    """The entry of the config at `real` (symlinks resolved) whose text is `text`."""
    stamp = code_stamp()
    if not stamp or not cache_enabled():
        return None
    h = hashlib.sha256()
    for part in (str(real).encode(), text.encode("utf-8", "surrogatepass"), stamp):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return f"{h.hexdigest()}.json"


def _real_path(path: str | Path) -> Path:
    """The file's real path (symlinks resolved, as `load_config` resolves the folder relative
    paths are read against): a link moved to an identical file elsewhere is another name."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(path).absolute()


def _trusted(st: os.stat_result) -> bool:
    """Written by this user only: owned by the effective user, not group- or world-writable.
    Anything else (a shared XDG_CACHE_HOME, `sudo -E`) could point the CLI's signed requests
    elsewhere, so it is not read."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_cache_dir(folder: Path) -> int | None:
    """A descriptor of the cache folder, when it is a folder this user alone writes to."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _trusted(os.fstat(fd)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _read_cached(name: str) -> ClientSettings | None:
    """The entry `name`, when it is a regular file this user alone wrote and one this code
    reads; None otherwise (the caller validates in full)."""
    dir_fd = _open_cache_dir(cache_dir())
    if dir_fd is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or not _trusted(st):
                return None
            return ClientSettings.from_json(json.loads(fh.read(MAX_CONFIG_BYTES)))
    except (OSError, ValueError):
        return None


class _ConfigFile(NamedTuple):
    raw: bytes  # at most MAX_CONFIG_BYTES + 1: more is a file over the limit
    size: int  # st_size (0 for a pipe)
    regular: bool  # a regular file: the only kind cached (a pipe's bytes are read once)


def _read_config(path: str | Path) -> _ConfigFile:
    """The bytes of the config at `path`, read once through one descriptor (a FIFO or
    `<(...)` is read as it comes, and never again); ConfigError when it cannot be read."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for its writer; reads then block again.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode)
            if stat.S_ISFIFO(st.st_mode):
                _wait_for_writer(fd)
            if not regular:
                os.set_blocking(fd, True)
            raw = b"" if st.st_size > MAX_CONFIG_BYTES else fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        from transferd.errors import ConfigError

        raise ConfigError(f"cannot read site config {path}: {exc.strerror or exc}",
                          path=path) from exc
    return _ConfigFile(raw, st.st_size, regular)


def _wait_for_writer(fd: int) -> None:
    """Until the FIFO opened (O_NONBLOCK) as `fd` has data or a writer that came and left, as a
    blocking open would have waited for its writer (`cat site.yaml > fifo.yaml &` may open it
    after this process does): read before then, it would look empty."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass


def _config_text(read: _ConfigFile, source: str) -> str:
    """The text of `read` as `transferd.documents.read_document_text` gives it (the same
    errors: over the size limit, not UTF-8)."""
    from netplan import safeyaml
    from transferd.documents import CONFIG_LIMITS, _config_error

    limit = CONFIG_LIMITS.max_bytes
    try:
        if read.size > limit:
            raise safeyaml.DocumentError(
                f"the file is {read.size / 1024 / 1024:,.1f} MiB, more than the "
                f"{limit / 1024 / 1024:,.1f} MiB limit", kind="size", source=source)
        if len(read.raw) > limit:
            raise safeyaml.DocumentError(
                f"the file is larger than the {limit / 1024 / 1024:,.1f} MiB limit",
                kind="size", source=source)
        return safeyaml.decode_text(read.raw, source=source)
    except safeyaml.DocumentError as exc:
        raise _config_error(exc, source) from None


def _validated(path: str | Path, read: _ConfigFile, real: Path) -> tuple[SiteConfig, str]:
    from transferd.config import parse_config

    text = _config_text(read, str(path))
    return parse_config(text, base_dir=real.parent, source=str(path)), text


def client_settings(path: str | Path) -> ClientSettings:
    """The client settings of the config file at `path`: from the cache when this exact file
    validated before, otherwise validated in full (ConfigError naming `path` and the field for
    a bad one) and then cached. The file is read once; only a regular file is cached."""
    read = _read_config(path)
    real = _real_path(path)
    name = None
    if read.regular and len(read.raw) <= MAX_CONFIG_BYTES:
        try:
            name = _cache_name(real, read.raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            name = None  # the full validation says where
    if name is not None:
        cached = _read_cached(name)
        if cached is not None:
            return cached
    config, _text = _validated(path, read, real)
    settings = ClientSettings.of(config)
    if name is not None:
        _write(name, settings)
    return settings


def save_client_settings(path: str | Path, config: SiteConfig, text: str) -> None:
    """Cache the settings of `config`, validated from `text` (the content of `path` that the
    caller read: the file is not opened again; the daemon does this, so that the first client
    after its start finds them). Only a regular file is cached."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return
    except OSError:
        return
    real = _real_path(path)
    if str(real.parent) != config.base_dir:
        return  # the link moved since it was read
    name = _cache_name(real, text)
    if name is not None:
        _write(name, ClientSettings.of(config))


def _make_private_dirs(folder: Path) -> None:
    """`folder` and each missing folder above it, created 0700 (the XDG spec's mode)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):
            each.mkdir(mode=0o700)


def _write(name: str, settings: ClientSettings) -> None:
    folder = cache_dir()
    try:
        _make_private_dirs(folder)
        dir_fd = _open_cache_dir(folder)
        if dir_fd is None:
            return  # not a folder this user alone writes to: its entries would not be read
        os.close(dir_fd)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(settings.to_json(), fh)
            os.replace(tmp, folder / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only or full cache folder: the next client validates in full again
