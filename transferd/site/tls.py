"""TLS contexts from a site config: the daemon's server side, and the client side that both the
daemon (to its peers) and the CLI (to its own daemon) use."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from transferd.errors import ConfigError

if TYPE_CHECKING:
    from transferd.client_settings import ClientSettings
    from transferd.config import SiteConfig

__all__ = ["client_ssl_context", "server_ssl_context"]


def client_ssl_context(config: SiteConfig | ClientSettings) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    try:
        ctx = ssl.create_default_context(
            cafile=str(config.resolve(config.tls.ca)) if config.tls.ca else None
        )
        ctx.load_cert_chain(config.resolve(config.tls.cert), config.resolve(config.tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate, key or CA: {exc}") from exc
    return ctx


def server_ssl_context(config: SiteConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.resolve(config.tls.cert), config.resolve(config.tls.key))
        if config.tls.ca:
            # With a CA, peers must present a certificate it signed (mutual TLS), on top of the
            # per-pair HMAC on every request.
            ctx.load_verify_locations(config.resolve(config.tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate or key: {exc}") from exc
    return ctx
