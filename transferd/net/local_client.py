"""The CLI's requests to its own daemon, over the standard library's http.client.

They are signed like every request between daemons (HMAC with the site's own pair secret), but
need no event loop: `transferd send` and `status` start without importing aiohttp, which is a
fifth of the CLI's start-up and so of every short `send --wait` measured by its wall clock.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from transferd.errors import ProtocolError, TransportError, decode_reply
from transferd.protocol.auth import EMPTY_BODY_BLAKE3, sign_headers
from transferd.protocol.chunks import blake3_hex

__all__ = ["LocalClient"]

TIMEOUT_S = 120.0


class LocalClient:
    def __init__(
        self, site: str, url: str, secret: bytes, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ProtocolError(f"no host in {url!r}")
        self.site = site
        self._secret = secret
        if parts.scheme == "https":
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=TIMEOUT_S, context=ssl_context
            )
        else:
            self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)

    def close(self) -> None:
        self._conn.close()

    def call(
        self,
        method: str,
        path_qs: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        accept: tuple[int, ...] = (200,),
    ) -> tuple[int, Any]:
        """One signed request: (status, decoded JSON) for accepted statuses; the daemon's error
        (ProtocolError, AuthError, ...) otherwise; TransportError when it cannot be reached."""
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
        headers = sign_headers(
            self._secret,
            method=method,
            path_qs=path_qs,
            body_blake3=EMPTY_BODY_BLAKE3 if body is None else blake3_hex(body),
            src=self.site,
            dst=self.site,
            now=time.time(),
        )
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, path_qs, body=body, headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()  # the next call reconnects
            reason = f"{self.site}: {type(exc).__name__}: {exc}"
            raise TransportError(reason, peer=self.site) from exc
        return decode_reply(status, raw, accept, self.site)
