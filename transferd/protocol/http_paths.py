"""The HTTP paths of the peer and local APIs (`transferd.protocol.wire` documents each one and
its bodies). Apart from the models, so that a client command can name its route before it
imports pydantic."""

from __future__ import annotations

__all__ = [
    "ABORT_ROUTE",
    "COMMIT_ROUTE",
    "DATA_CHANNEL_ROUTE",
    "HAVE_ROUTE",
    "INBOX_ROUTE",
    "LOCAL_JOBS_ROUTE",
    "LOCAL_SEND_ROUTE",
    "LOCAL_STATUS_ROUTE",
    "MESSAGES_ROUTE",
    "MESSAGE_HOP_ROUTE",
    "MESSAGE_SOCKET_ROUTE",
    "PEER_MESSAGES_ROUTE",
    "TELEMETRY_ROUTE",
    "UPLOADS_ROUTE",
]

UPLOADS_ROUTE = "/v1/uploads"
HAVE_ROUTE = "/v1/uploads/{upload}/have"
DATA_CHANNEL_ROUTE = "/v1/data-channel"
COMMIT_ROUTE = "/v1/uploads/{upload}/commit"
ABORT_ROUTE = "/v1/uploads/{upload}/abort"
PEER_MESSAGES_ROUTE = "/v1/peer/messages"
MESSAGE_HOP_ROUTE = "/v1/peer/message-hop"  # peer API: the framed hop (protocol.message_hop)
LOCAL_SEND_ROUTE = "/v1/local/send"
LOCAL_JOBS_ROUTE = "/v1/local/jobs"
LOCAL_STATUS_ROUTE = "/v1/local/status"
MESSAGES_ROUTE = "/v1/messages/{peer}"
INBOX_ROUTE = "/v1/inbox"
MESSAGE_SOCKET_ROUTE = "/v1/local/message-socket"  # local API: where the message socket is
TELEMETRY_ROUTE = "/v1/telemetry"  # local API: the links as this daemon measured them
