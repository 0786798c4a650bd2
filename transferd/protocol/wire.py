"""The HTTP API between daemons and from the CLI: routes, headers, and how bodies are parsed.

Every body that crosses the wire is a frozen pydantic model (`WireModel`), validated once at the
edge by `parse_body` (a ProtocolError naming the field otherwise) and written with `to_body`.
An answer outside the accepted statuses carries the sender's error as `ErrorBody`, rebuilt into
the package's own error by `check_reply`.

Peer API (signed with the pair secret):
    POST /v1/uploads                      UploadIntent -> OpenAnswer, or OpenRequest (the
                                          intent + have/want of the first chunks) -> OfferAnswer
    POST /v1/uploads/{upload}/have        HaveRequest -> HaveAnswer
    GET  /v1/data-channel                 -> DataChannelAnswer: the port of the data listener,
                                          where the chunks go (`protocol.channel`)
    POST /v1/uploads/{upload}/commit      SignedManifest -> CommitAnswer (200, or 409 + want);
                                          ?wait_ms=N: sent ahead of the last chunks, answered
                                          when they land (or none landed for N ms)
    POST /v1/uploads/{upload}/abort       (no body) -> 204: the sender gave the upload up
    POST /v1/peer/messages                message body (MessageEnvelope headers) -> MessageAck
    GET  /v1/peer/messages                204: a peer opening its interactive pool
    GET  /v1/peer/message-hop?nonce=...   Upgrade -> 101: the framed hop for interactive
                                          messages (`protocol.message_hop`)
Local API (signed with the site's own secret, used by the CLI and `transferd.send_message`):
    POST /v1/local/send                   SendRequest -> SendAnswer
    GET  /v1/local/jobs?ids=...           JobsAnswer
    GET  /v1/local/status                 SiteStatus
    POST /v1/messages/{peer}?class=...    message body (MessageQuery) -> MessageReceipt
    GET  /v1/inbox?wait_ms=...&max=...    InboxQuery -> InboxAnswer
GET /metrics is Prometheus text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from transferd.errors import ERROR_KINDS, AuthError, ProtocolError, TransferdError, TransportError
from transferd.protocol import http_paths

# The routes live in a module without pydantic (a client names its route before any model is
# built); re-exported here, beside the bodies.
from transferd.protocol.http_paths import *  # noqa: F403

__all__ = [
    "ErrorBody",
    "FrozenModel",
    "WireModel",
    "check_reply",
    "parse_body",
    "parse_query",
    "to_body",
]
__all__ += http_paths.__all__


class FrozenModel(BaseModel):
    """transferd's one base for validated documents: immutable, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WireModel(FrozenModel):
    """A body on the wire: also strict (JSON types are not coerced), once parsed at the edge."""

    model_config = ConfigDict(strict=True)


M = TypeVar("M", bound=BaseModel)


def _problem(model: type[BaseModel], exc: ValidationError) -> ProtocolError:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "<body>"
    return ProtocolError(f"invalid {model.__name__}: {where}: {first['msg']}")


def parse_body(model: type[M], body: bytes | str) -> M:
    """Validate a JSON body into `model`; any problem is a ProtocolError naming the field."""
    try:
        return model.model_validate_json(body, strict=False)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ProtocolError(f"invalid {model.__name__}: not JSON") from exc
        raise _problem(model, exc) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid {model.__name__}: not JSON") from exc


def parse_query(model: type[M], query: Mapping[str, str]) -> M:
    """Validate query parameters (or headers) into `model` (strings are coerced to its types);
    any problem is a ProtocolError naming the parameter."""
    try:
        return model.model_validate(dict(query), strict=False)
    except ValidationError as exc:
        raise _problem(model, exc) from exc


def to_body(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


class ErrorBody(FrozenModel):
    """What an error answer carries: the error's kind, its message and its structured fields."""

    model_config = ConfigDict(extra="allow")

    kind: str
    error: str = "peer reported an error"
    transient: bool = False

    def rebuild(self, status: int) -> TransferdError:
        cls = ERROR_KINDS.get(self.kind, TransferdError)
        if cls is AuthError:
            return AuthError(self.error, status=status, transient=self.transient)
        err = cls(self.error)
        err.transient = err.transient or self.transient
        # Structured fields travel too (e.g. `hop`: which relay or destination refused).
        err.fields.update({k: v for k, v in (self.model_extra or {}).items() if k != "peer"})
        return err


_GATEWAY_STATUSES = (502, 503, 504)


def check_reply(status: int, raw: bytes, accept: tuple[int, ...], peer: str) -> None:
    """Nothing for an accepted status; otherwise raise the error the peer (or the local daemon)
    reported, tagged with `peer`."""
    if status in accept:
        return
    try:
        err = ErrorBody.model_validate_json(raw).rebuild(status)
    except (ValidationError, ValueError, json.JSONDecodeError):
        if status in _GATEWAY_STATUSES:
            # Something in between (a proxy, a load balancer) could not reach the daemon.
            err = TransportError(f"{peer} answered HTTP {status} (gateway): not reachable")
        else:
            err = ProtocolError(f"peer answered HTTP {status} without a transferd error body")
    err.fields.setdefault("peer", peer)
    raise err
