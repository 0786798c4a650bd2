"""The transferd error tree: every failure the daemon, its client or its CLI reports.

Errors carry structured fields (`field`, `line`, `path`, `peer`, `status`); only the CLI turns them
into text and exit codes. Foreign exceptions (aiohttp, OSError, zstd, pyarrow, cryptography) are
mapped into this tree at the boundary with `raise ... from exc`.

`transient` says whether asking again (signed afresh) may succeed: the network failed, a body
was damaged in flight, a request was refused as a replay or as signed before the peer's restart.
It crosses the wire with the error, and it is the one thing the retry loops look at.
"""

from __future__ import annotations


class TransferdError(Exception):
    """Base of every transferd error. `kind` names the subclass on the wire and in JSON output."""

    kind = "error"
    http_status = 500
    transient = False

    def __init__(self, message: str, *, transient: bool | None = None, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        if transient is not None:
            self.transient = transient

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "error": self.message,
            **{k: str(v) for k, v in self.fields.items()},
            **({"transient": True} if self.transient else {}),
        }


class ConfigError(TransferdError):
    """The site config (or keys_dir) is invalid; `issues`: one `field: message (line N)` each."""

    kind = "config"
    http_status = 500

    def __init__(self, message: str, issues: list[str] | None = None, **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.issues = issues or []

    def __str__(self) -> str:
        if not self.issues:
            return self.message
        return self.message + "\n" + "\n".join(f"  {issue}" for issue in self.issues)


class ProtocolError(TransferdError):
    """A peer sent something that is not a valid request, response or manifest."""

    kind = "protocol"
    http_status = 400


class AuthError(TransferdError):
    """A request or manifest is unsigned, badly signed, stale, replayed or from an unknown site.
    `status` is 401 (not authenticated) or 403 (authenticated but refused, e.g. bad manifest
    signature)."""

    kind = "auth"
    http_status = 401

    def __init__(
        self, message: str, status: int = 401, *, transient: bool = False, **fields: object
    ) -> None:
        super().__init__(message, transient=transient, **fields)
        self.http_status = status


class IntegrityError(TransferdError):
    """Bytes do not match their blake3 address, a staged chunk no longer matches at commit, or
    the source file changed while it was being sent."""

    kind = "integrity"
    http_status = 422


class PolicyViolation(TransferdError):
    """A transfer breaks policy: raw-tier data leaving its site, or a path escaping data_dir."""

    kind = "policy"
    http_status = 403


class StorageError(TransferdError):
    """The site's storage failed (disk full, permission, I/O error) while staging or committing."""

    kind = "storage"
    http_status = 507


class TransportError(TransferdError):
    """A peer could not be reached or the connection failed mid-request (retried by the sender)."""

    kind = "transport"
    http_status = 502
    transient = True


ERROR_KINDS: dict[str, type[TransferdError]] = {
    cls.kind: cls
    for cls in (
        TransferdError,
        ConfigError,
        ProtocolError,
        AuthError,
        IntegrityError,
        PolicyViolation,
        StorageError,
        TransportError,
    )
}

__all__ = ["ERROR_KINDS", *(cls.__name__ for cls in ERROR_KINDS.values())]
