"""transferd: the site daemon that moves datasets and checkpoints between sites.

Run it with `transferd serve --config site.yaml`; the daemon is `transferd.daemon.Daemon`, the CLI
`transferd.cli`, and test helpers (loopback peer pair, fake clock, impaired link) are in
`transferd.testing`. The names below are the package's public surface.
"""

from transferd._classes import TrafficClass
from transferd.config import SiteConfig, load_config, parse_config
from transferd.errors import (
    AuthError,
    ConfigError,
    IntegrityError,
    PolicyViolation,
    ProtocolError,
    StorageError,
    TransferdError,
    TransportError,
)

__all__ = [
    "AuthError",
    "ConfigError",
    "IntegrityError",
    "PolicyViolation",
    "ProtocolError",
    "SiteConfig",
    "StorageError",
    "TrafficClass",
    "TransferdError",
    "TransportError",
    "load_config",
    "parse_config",
]
