"""The framed peer hop for interactive messages: one long-lived connection from a daemon to
each peer's daemon, carrying message SENDs and their signed ACKs pipelined, instead of one
aiohttp request per message. Sans-IO; the adapters are `net.message_hop`.

Why: on the HTTP path each message crossed aiohttp on both daemons (client request, server
parser, middleware, signed reply), ~1.7 ms of event-loop CPU per message in the two daemons
(benchmarks/README.md, issue 11 rounds 10 and 13), CPU that on a loaded host also queues
behind the bulk threads for the GIL. A frame costs a `struct.pack`, one blake3 and one HMAC.

Opening, on the daemon's HTTP port (no new port or firewall rule): an HTTP/1.1 `Upgrade`
request `GET /v1/peer/message-hop?nonce=<client nonce>` with `Upgrade: transferd-messages/1`,
signed like every peer request (`protocol.auth`: the pair secret, a timestamp and a nonce the
receiver has not seen, so a recorded request is refused). The receiver answers `101 Switching
Protocols` with its own fresh nonce and its proof over both nonces (the data channel's
`protocol.channel.accept_frame`); the sender checks that proof before it sends anything, then
sends AUTH, its proof over both nonces (`protocol.channel.proof`), and may pipeline SENDs
right behind it; the receiver checks AUTH before it reads a SEND. That is the data channel's
mutual challenge-response (fresh nonces from both ends, bound to the sending and receiving
site ids) and its per-connection session key; the proofs are the data channel's own, which is
safe because a hop opening needs a signed request to start and each side proves itself only
after the other has (no side can be used to answer the other protocol's challenge). An older
peer does not know the route (404) and the sender keeps the HTTP path.

Frames: `protocol.message_socket`'s framing (u32 length, u8 kind, payload). After AUTH,
    SEND     seq u64, len(envelope) u16, MessageEnvelope JSON, body, MAC
    RECEIPT  seq u64, request seq u64, status u16, MessageAck JSON, MAC
    ERROR    seq u64, request seq u64, status u16, error JSON (ErrorBody), MAC
    PING     seq u64, MAC (answered by a RECEIPT, status 204, empty body)
A sender with messages in flight that hears nothing from the peer for a while sends a PING,
and closes the hop when that stays unanswered too (a peer gone without a FIN, a NAT that
dropped the flow): its messages then go on the HTTP path within their retry budget. An idle
hop is pinged now and then for the same reason.
Each side numbers its own frames from 1 and the other refuses a number that does not grow
(`channel.SeqGuard`): a frame replayed or reordered on the connection is refused. The MAC is
the session key's over the kind, the frame's fixed part and JSON, and the body's blake3: a
frame injected into the connection, or a body damaged in flight, is refused too. A refused
frame closes the connection (its framing can no longer be trusted); the sender's message then
goes again (the one retry) on the HTTP path.
"""

from __future__ import annotations

import hmac
import json
import struct
from dataclasses import dataclass

import blake3

from transferd.errors import AuthError, ProtocolError
from transferd.protocol import channel as ch
from transferd.protocol import message_socket as ms
from transferd.protocol.messages import MessageEnvelope
from transferd.protocol.wire import parse_query

__all__ = [
    "HEAD_MAX_BYTES",
    "H_ACCEPT",
    "H_CHALLENGE",
    "HOP_MAX_BODY_BYTES",
    "HOP_MAX_FRAME_BYTES",
    "UPGRADE",
    "HopReply",
    "HopSend",
    "Upgraded",
    "decode_ping",
    "decode_reply",
    "decode_send",
    "envelope_json",
    "parse_envelope",
    "encode_ping",
    "encode_reply",
    "encode_send",
    "parse_response_head",
    "upgrade_request",
]

UPGRADE = "transferd-messages/1"
H_CHALLENGE = "X-Transferd-Hop-Challenge"  # the receiver's nonce (hex)
H_ACCEPT = "X-Transferd-Hop-Accept"  # the receiver's proof (hex of channel.accept_frame)
# A message larger than this goes on the HTTP path. The hop is one FIFO connection: a frame
# being written holds every frame behind it, whatever their deadlines, so the scheduler's
# earliest-deadline-first order would end at the socket. 64 KiB is ~5 ms at 100 Mbit/s (one
# 50 ms-deadline message can wait behind it); 1 MiB was ~84 ms, past such a deadline by
# itself. Larger bodies take the HTTP pool, a connection per message, beside the hop.
HOP_MAX_BODY_BYTES = 64 << 10
HEAD_MAX_BYTES = 16 << 10  # the 101 answer's head (a few hundred bytes)

_SEND = struct.Struct("!QH")  # seq, length of the envelope JSON
# The largest frame a receiver reads after AUTH: a SEND of the largest envelope and body.
HOP_MAX_FRAME_BYTES = _SEND.size + 0xFFFF + HOP_MAX_BODY_BYTES + ch.MAC_BYTES
_REPLY = struct.Struct("!QQH")  # seq, the SEND's seq, HTTP-like status
_PING = struct.Struct("!Q")  # seq


def _mac(session: ch.Session, kind: ms.Frame, fixed_and_json: bytes, body: bytes) -> bytes:
    digest = blake3.blake3(body).digest() if body else b""
    return session.mac(bytes((kind,)) + fixed_and_json + digest)


@dataclass(frozen=True)
class HopSend:
    seq: int
    envelope_json: bytes
    body: bytes


@dataclass(frozen=True)
class HopReply:
    seq: int
    request_seq: int
    status: int
    body: bytes  # MessageAck JSON, or the error's JSON
    error: bool


def encode_send(session: ch.Session, seq: int, envelope_json: bytes, body: bytes) -> bytes:
    if len(envelope_json) > 0xFFFF:
        raise ProtocolError(f"message hop: envelope of {len(envelope_json)} bytes")
    head = _SEND.pack(seq, len(envelope_json)) + envelope_json
    return ms.encode_frame(ms.Frame.SEND, head, body, _mac(session, ms.Frame.SEND, head, body))


def decode_send(session: ch.Session, payload: bytes) -> HopSend:
    """A SEND's parts, its MAC checked (AuthError: injected or damaged)."""
    if len(payload) < _SEND.size + ch.MAC_BYTES:
        raise ProtocolError("message hop: SEND frame too short")
    seq, n_json = _SEND.unpack_from(payload)
    end = _SEND.size + n_json
    if len(payload) < end + ch.MAC_BYTES:
        raise ProtocolError("message hop: SEND envelope longer than its frame")
    head, body, mac = payload[:end], payload[end:-ch.MAC_BYTES], payload[-ch.MAC_BYTES:]
    _check(_mac(session, ms.Frame.SEND, head, body), mac)
    return HopSend(seq, head[_SEND.size:], body)


def encode_ping(session: ch.Session, seq: int) -> bytes:
    head = _PING.pack(seq)
    return ms.encode_frame(ms.Frame.PING, head, _mac(session, ms.Frame.PING, head, b""))


def decode_ping(session: ch.Session, payload: bytes) -> int:
    """A PING's seq, its MAC checked."""
    if len(payload) != _PING.size + ch.MAC_BYTES:
        raise ProtocolError("message hop: PING frame of the wrong size")
    head, mac = payload[:_PING.size], payload[_PING.size:]
    _check(_mac(session, ms.Frame.PING, head, b""), mac)
    (seq,) = _PING.unpack(head)
    return int(seq)


def encode_reply(session: ch.Session, seq: int, request_seq: int, status: int, body: bytes,
                 *, error: bool = False) -> bytes:
    kind = ms.Frame.ERROR if error else ms.Frame.RECEIPT
    head = _REPLY.pack(seq, request_seq, status) + body
    return ms.encode_frame(kind, head, _mac(session, kind, head, b""))


def decode_reply(session: ch.Session, kind: ms.Frame, payload: bytes) -> HopReply:
    if kind not in (ms.Frame.RECEIPT, ms.Frame.ERROR):
        raise ProtocolError(f"message hop: {kind.name} frame where a reply was expected")
    if len(payload) < _REPLY.size + ch.MAC_BYTES:
        raise ProtocolError("message hop: reply frame too short")
    head, mac = payload[:-ch.MAC_BYTES], payload[-ch.MAC_BYTES:]
    _check(_mac(session, kind, head, b""), mac)
    seq, request_seq, status = _REPLY.unpack_from(head)
    return HopReply(seq, request_seq, status, head[_REPLY.size:], kind is ms.Frame.ERROR)


def _check(want: bytes, got: bytes) -> None:
    if not hmac.compare_digest(want, got):
        raise AuthError("message hop frame fails its MAC (injected or damaged)")


def envelope_json(envelope: MessageEnvelope) -> bytes:
    """A SEND's envelope: the HTTP path's message headers, as a JSON object."""
    return json.dumps(envelope.headers(), separators=(",", ":")).encode()


def parse_envelope(raw: bytes) -> MessageEnvelope:
    """The envelope of a SEND, validated as the HTTP path validates its headers."""
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (nested past the C stack)
        raise ProtocolError("message hop: envelope is not JSON") from None
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise ProtocolError("message hop: envelope is not an object of strings")
    return parse_query(MessageEnvelope, fields)


# ---- opening ---------------------------------------------------------------------------------


def _ascii_host(netloc: str) -> str:
    """The Host header of `netloc` (host[:port]): an internationalised name as its IDNA
    A-labels (`bücher.example` -> `xn--bcher-kva.example`), as aiohttp sends it."""
    if netloc.isascii():
        return netloc
    name, sep, port = netloc.rpartition(":")
    if not sep or not port.isdigit():
        name, sep, port = netloc, "", ""
    try:
        return name.encode("idna").decode("ascii") + sep + port
    except UnicodeError:
        raise ProtocolError(f"message hop: host {netloc!r} is not a valid name") from None


def upgrade_request(host: str, path_qs: str, signed: dict[str, str]) -> bytes:
    """The sender's HTTP/1.1 Upgrade request, its signature headers in `signed`."""
    lines = [f"GET {path_qs} HTTP/1.1", f"Host: {_ascii_host(host)}", "Connection: Upgrade",
             f"Upgrade: {UPGRADE}", "Content-Length: 0",
             *(f"{k}: {v}" for k, v in signed.items()), "", ""]
    return "\r\n".join(lines).encode("ascii")


@dataclass(frozen=True)
class Upgraded:
    """The receiver's answer to the Upgrade request."""

    status: int
    headers: dict[str, str]  # lower-case names
    body_start: bytes  # bytes after the head (frames already sent, or an error body's start)


def parse_response_head(buf: bytes) -> Upgraded | None:
    """The status and headers of an HTTP/1.1 answer once its head is whole in `buf` (None:
    not yet); ProtocolError for anything that is not HTTP."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > HEAD_MAX_BYTES:
            raise ProtocolError("message hop: answer head too long")
        return None
    try:
        lines = buf[:end].decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ", 2)[:2]
        if not version.startswith("HTTP/1."):
            raise ValueError(version)
        status = int(status_text)
    except (ValueError, IndexError):
        raise ProtocolError("message hop: the peer did not answer HTTP/1.1") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Upgraded(status, headers, buf[end + 4:])
