"""transferd: the site daemon that moves datasets and checkpoints between sites.

Run it with `transferd serve --config site.yaml`; the daemon is `transferd.daemon.Daemon`, the CLI
`transferd.cli`, and test helpers (loopback peer pair, fake clock, impaired link) are in
`transferd.testing`. The layout is the architecture: `transferd.protocol` is the sans-I/O core
(wire models, auth, chunks, scheduling, the upload state machines), `transferd.site` the
blocking local I/O (storage, journal, keys, metrics), `transferd.net` the asyncio adapters
(server, clients, pumps, runners). The names below are the package's public surface; they load
on first use (PEP 562), so the CLI starts without importing what a command does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netplan.plan import BULK_CLASSES, TrafficClass
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
    from transferd.net.local_client import MessageSocket, read_inbox, send_message
    from transferd.protocol.auth import local_signer
    from transferd.protocol.messages import InboxMessage, MessageReceipt

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BULK_CLASSES", "TrafficClass"), "netplan.plan"),
    **dict.fromkeys(("InboxMessage", "MessageReceipt"), "transferd.protocol.messages"),
    "local_signer": "transferd.protocol.auth",
    **dict.fromkeys(("MessageSocket", "read_inbox", "send_message"),
                    "transferd.net.local_client"),
    **dict.fromkeys(("SiteConfig", "load_config", "parse_config"), "transferd.config"),
    **dict.fromkeys(
        (
            "AuthError",
            "ConfigError",
            "IntegrityError",
            "PolicyViolation",
            "ProtocolError",
            "StorageError",
            "TransferdError",
            "TransportError",
        ),
        "transferd.errors",
    ),
}

__all__ = [
    "BULK_CLASSES",
    "AuthError",
    "ConfigError",
    "InboxMessage",
    "IntegrityError",
    "MessageReceipt",
    "MessageSocket",
    "PolicyViolation",
    "ProtocolError",
    "SiteConfig",
    "StorageError",
    "TrafficClass",
    "TransferdError",
    "TransportError",
    "load_config",
    "local_signer",
    "parse_config",
    "read_inbox",
    "send_message",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transferd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
