"""The message socket: a site's light local path for messages to peers, beside the HTTP local
API. A unix-domain socket (0600, in a 0700 directory of the daemon's user) carries small
frames: one authentication when the connection opens, then pipelined SEND requests, each
answered by its RECEIPT or ERROR (the same bodies as `POST /v1/messages/{peer}`), in any order.

Why: a message from a local program to a peer crossed aiohttp twice on this host (client and
daemon), ~0.65 ms of client CPU per message, paid again in scheduling delay on busy cores; a
frame costs a `struct.pack` and one `write`.

Authentication is the local API's (the site's own pair secret) as a mutual challenge-response
once per connection, instead of a signature per request: the client sends a nonce, the daemon
answers its own nonce with HMAC(secret, "server" | both nonces), the client answers HMAC(secret,
"client" | both nonces). Nonces are fresh per connection, so nothing recorded can be replayed;
the daemon proves it holds the secret before the client sends anything. The socket's file
permissions (and the peer's uid, SO_PEERCRED) keep other users off it before that.

Frame: u32 payload length, u8 kind, payload. Sans-IO: `FrameReader.feed` takes bytes and
returns whole frames; the adapters are `net.messages.MessageSocketServer` (daemon) and
`net.local_client.MessageSocket` (client).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import IntEnum

from transferd.errors import ProtocolError

__all__ = [
    "HANDSHAKE_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "NONCE_BYTES",
    "Frame",
    "FrameReader",
    "client_proof",
    "decode_reply",
    "decode_send",
    "encode_frame",
    "encode_reply",
    "encode_send",
    "server_proof",
]

NONCE_BYTES = 16
MAGIC = b"TDMS1"  # in HELLO: a client of this protocol and version
# A message body (protocol.messages.MAX_MESSAGE_BYTES, 16 MiB) and its small JSON header.
MAX_FRAME_BYTES = (16 << 20) + (64 << 10)
# Before a connection is authenticated: HELLO (magic + nonce) and AUTH (a proof) are < 64 bytes,
# so a client that has not proved the secret cannot make the daemon buffer a large frame.
HANDSHAKE_FRAME_BYTES = 256

_HEADER = struct.Struct("!IB")
_REQUEST = struct.Struct("!IH")  # request id, length of the JSON header that follows
_REPLY = struct.Struct("!IH")  # request id, HTTP-like status


class Frame(IntEnum):
    HELLO = 1  # client: MAGIC + nonce
    CHALLENGE = 2  # daemon: nonce + server proof
    AUTH = 3  # client: client proof
    READY = 4  # daemon: authenticated, send away
    SEND = 16  # client: request id, JSON header (peer, class, deadline_ms, wait), body
    RECEIPT = 17  # daemon: request id, status, MessageReceipt JSON
    ERROR = 18  # daemon: request id (0: the connection), status, error JSON (ErrorBody)
    PING = 19  # the peer hop only (protocol.message_hop): "are you there", answered by RECEIPT


_KINDS = frozenset(Frame)


def encode_frame(kind: Frame, *parts: bytes) -> bytes:
    size = sum(map(len, parts))
    return b"".join((_HEADER.pack(size, kind), *parts))


class FrameReader:
    """Whole frames out of a byte stream; ProtocolError for an unknown kind or a frame past
    `max_bytes` (the connection is then closed: its framing can no longer be trusted)."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES, name: str = "message socket") -> None:
        self.max_bytes = max_bytes
        self.name = name  # in its errors: the message socket, or the peer hop that reuses it
        self._buf = bytearray()

    def feed(self, data: bytes, max_frames: int | None = None) -> list[tuple[Frame, bytes]]:
        """The whole frames in the buffer, at most `max_frames` of them: the rest stays
        buffered, unchecked, for the next call (a handshake takes one frame, then raises
        `max_bytes` for the frames a client may pipeline behind it)."""
        self._buf += data
        frames: list[tuple[Frame, bytes]] = []
        at = 0
        while len(self._buf) - at >= _HEADER.size and (
                max_frames is None or len(frames) < max_frames):
            size, kind = _HEADER.unpack_from(self._buf, at)
            if kind not in _KINDS:
                raise ProtocolError(f"{self.name}: unknown frame kind {kind}")
            if size > self.max_bytes:
                raise ProtocolError(f"{self.name}: frame of {size} bytes exceeds "
                                    f"{self.max_bytes}")
            end = at + _HEADER.size + size
            if len(self._buf) < end:
                break
            frames.append((Frame(kind), bytes(self._buf[at + _HEADER.size:end])))
            at = end
        del self._buf[:at]
        return frames


def _proof(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, b"transferd-message-socket\0" + role + b"\0" + client_nonce
                    + server_nonce, hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _proof(secret, b"server", client_nonce, server_nonce)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _proof(secret, b"client", client_nonce, server_nonce)


def encode_send(request_id: int, header_json: bytes, body: bytes) -> bytes:
    if len(header_json) > 0xFFFF:
        raise ProtocolError(f"message socket: SEND header of {len(header_json)} bytes exceeds "
                            f"{0xFFFF}")
    return encode_frame(Frame.SEND, _REQUEST.pack(request_id, len(header_json)), header_json,
                        body)


def decode_send(payload: bytes) -> tuple[int, bytes, bytes]:
    """(request id, JSON header, body) of a SEND payload."""
    if len(payload) < _REQUEST.size:
        raise ProtocolError("message socket: SEND frame too short")
    request_id, header_len = _REQUEST.unpack_from(payload)
    end = _REQUEST.size + header_len
    if len(payload) < end:
        raise ProtocolError("message socket: SEND header longer than its frame")
    return request_id, payload[_REQUEST.size:end], payload[end:]


def encode_reply(kind: Frame, request_id: int, status: int, body: bytes) -> bytes:
    return encode_frame(kind, _REPLY.pack(request_id, status), body)


def decode_reply(payload: bytes) -> tuple[int, int, bytes]:
    """(request id, status, JSON body) of a RECEIPT or ERROR payload."""
    if len(payload) < _REPLY.size:
        raise ProtocolError("message socket: reply frame too short")
    request_id, status = _REPLY.unpack_from(payload)
    return request_id, status, payload[_REPLY.size:]
