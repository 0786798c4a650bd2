"""The bulk data channel between two daemons: how it opens, its frames, and the window of chunks
in flight. Sans-I/O: functions turn values into bytes and bytes into values (or a
ProtocolError / AuthError); `net.channels` owns the sockets and threads.

Theory of operation. A data channel is one long-lived TCP connection (TLS when the site
config has `tls`) from the sending daemon to the receiving one, reused for every chunk of every
job to that peer; several run in parallel (the stream controller says how many). Chunks are
pipelined: the sender writes header + body after header + body without waiting, and the
receiver answers each with a receipt as soon as the chunk is verified and staged, so a window
of `window` chunks per channel keeps the pipe full across the round trip (GridFTP's data
channels, Skyplane's gateway sockets).

Opening (the pair's HMAC secret, no clock):
    client -> server  HELLO      magic, version, client nonce, source site, destination site
    server -> client  CHALLENGE  server nonce
    client -> server  PROOF      HMAC(secret, "open" | src | dst | client nonce | server nonce)
    server -> client  ACCEPT     status, HMAC(secret, "accept" | dst | src | server nonce | ...)
Both nonces are fresh per opening, so a recorded opening cannot be replayed (the server's new
nonce makes the old proof worthless), and each side has proved it holds the pair secret. The
channel is then bound to that peer, and every frame after it carries a MAC under the session
key HMAC(secret, "session" | nonces) with a sequence number that must grow: a frame injected
into or replayed on the connection is refused. The chunk bytes themselves are bound by the
header: they must hash to the body blake3 it carries and decode to bytes with the chunk's
address, and the signed manifest checks every chunk again at commit.

Frames (big-endian): CHUNK header + upload id + locations + MAC, then `body_length` bytes of
body; RECEIPT seq + status (+ reason) + MAC, receiver -> sender.

A one-pass chunk (kind TRAILED, identity only) is a fresh upload's chunk read, hashed and sent in
one pass over its bytes: its header carries zeros where the address goes, and TRAILER = address
(32) + MAC follows the body, the MAC taken over "trailer" | the header's MAC | address. Chaining
the header's MAC ties the trailer to that chunk's seq, upload and locations: a trailer moved to
another chunk or replayed fails it (AuthError). The receiver hashes the body as it arrives and
checks it against the trailer's address before a byte is written, as for any chunk.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Generic, TypeVar

from transferd.errors import AuthError, ProtocolError
from transferd.protocol.chunks import MAX_CHUNK_BYTES, MAX_LOCATIONS, Encoding
from transferd.protocol.wire import WireModel

__all__ = [
    "ACCEPT_BYTES",
    "CHALLENGE_BYTES",
    "HELLO_FIXED",
    "CHUNK_FIXED",
    "MAC_BYTES",
    "PROOF_BYTES",
    "RECEIPT_FIXED",
    "ChunkHead",
    "ChannelWindow",
    "DataChannelAnswer",
    "Hello",
    "Receipt",
    "ReceiptStatus",
    "SeqGuard",
    "TRAILER_BYTES",
    "Session",
    "accept_frame",
    "challenge",
    "check_accept",
    "check_proof",
    "check_trailer",
    "chunk_head_rest",
    "decode_chunk_head",
    "decode_hello",
    "decode_receipt",
    "decode_receipt_fixed",
    "encode_chunk_head",
    "encode_receipt",
    "encode_trailer",
    "finish_chunk_head",
    "hello",
    "hello_sites",
    "locations_of",
    "proof",
]

MAGIC = b"TDC1"
VERSION = 1
NONCE_BYTES = 16
MAC_BYTES = 16  # truncated HMAC-SHA256 of a frame under the session key
MAX_SITE_BYTES = 64
MAX_UPLOAD_BYTES = 256
MAX_REASON_BYTES = 1024

HELLO_FIXED = struct.Struct("!4sBBB16s")  # magic, version, len(src), len(dst), client nonce
CHALLENGE_BYTES = NONCE_BYTES
PROOF_BYTES = 32
_ACCEPT = struct.Struct("!B32s")  # status (0 accepted), HMAC proof of the server
# kind, encoding, n locations, len(upload), seq, raw length, body length, address, body blake3
CHUNK_FIXED = struct.Struct("!BBHHQII32s32s")
_LOCATION = struct.Struct("!IQ")  # file index, offset
RECEIPT_FIXED = struct.Struct("!BBHQ")  # kind, status, len(reason), seq
_KIND_CHUNK = 1
_KIND_RECEIPT = 2
_KIND_TRAILED = 3  # a CHUNK whose address comes after the body (one pass)
TRAILER_BYTES = 32 + MAC_BYTES
_NO_DIGEST = bytes(32)
_ENCODINGS: tuple[Encoding, ...] = ("identity", "zstd")


class DataChannelAnswer(WireModel):
    """Where a peer's data listener is (its host is the control URL's, unless the sender's
    config names `data_address`)."""

    port: int


class ReceiptStatus(IntEnum):
    OK = 0  # verified and staged
    DAMAGED = 1  # the body did not hash to what its header says: send it again
    REFUSED = 2  # the receiver refuses the chunk (unknown upload, bad locations): the job fails
    STORAGE = 3  # the receiver cannot stage it (e.g. its disk is full): the job fails
    UNREACHABLE = 4  # a relay could not pass it on to the next hop: send it on another route


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\n".join([b"transferd-data/1", *parts]), hashlib.sha256).digest()


def _site(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not an ASCII site id") from None
    if not text or not text.isprintable():
        raise ProtocolError(f"{what} is not a site id")
    return text


# ---- opening ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    source: str
    dest: str
    client_nonce: bytes


def hello(source: str, dest: str, client_nonce: bytes | None = None) -> tuple[Hello, bytes]:
    """The client's first frame (and what it said, to check the answer against)."""
    src, dst = source.encode("ascii"), dest.encode("ascii")
    if not 0 < len(src) <= MAX_SITE_BYTES or not 0 < len(dst) <= MAX_SITE_BYTES:
        raise ProtocolError("site ids on a data channel are 1-64 ASCII bytes")
    nonce = client_nonce or secrets.token_bytes(NONCE_BYTES)
    frame = HELLO_FIXED.pack(MAGIC, VERSION, len(src), len(dst), nonce) + src + dst
    return Hello(source, dest, nonce), frame


def decode_hello(fixed: bytes) -> tuple[int, int, bytes]:
    """The fixed part of HELLO: (len(src), len(dst), client nonce); the site ids follow."""
    if len(fixed) != HELLO_FIXED.size:
        raise ProtocolError("short data channel opening")
    magic, version, n_src, n_dst, nonce = HELLO_FIXED.unpack(fixed)
    if magic != MAGIC:
        raise ProtocolError("not a transferd data channel")
    if version != VERSION:
        raise ProtocolError(f"data channel version {version} is not spoken here ({VERSION})")
    if not 0 < n_src <= MAX_SITE_BYTES or not 0 < n_dst <= MAX_SITE_BYTES:
        raise ProtocolError("site ids on a data channel are 1-64 ASCII bytes")
    return n_src, n_dst, nonce


def hello_sites(n_src: int, rest: bytes, nonce: bytes) -> Hello:
    return Hello(_site(rest[:n_src], "source site"), _site(rest[n_src:], "destination site"),
                 nonce)


def challenge() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, said: Hello, server_nonce: bytes) -> bytes:
    """The client's proof that it holds the pair secret, bound to both nonces."""
    return _mac(secret, b"open", said.source.encode(), said.dest.encode(), said.client_nonce,
                server_nonce)


def check_proof(secret: bytes, said: Hello, server_nonce: bytes, got: bytes) -> None:
    if not hmac.compare_digest(proof(secret, said, server_nonce), got):
        raise AuthError(f"data channel from {said.source[:64]!r}: bad opening proof")


def accept_frame(secret: bytes, said: Hello, server_nonce: bytes) -> bytes:
    """ACCEPT: the server proves the pair secret too (the client must not stream a checkpoint
    to whoever answered)."""
    mac = _mac(secret, b"accept", said.dest.encode(), said.source.encode(), server_nonce,
               said.client_nonce)
    return _ACCEPT.pack(0, mac)


ACCEPT_BYTES = _ACCEPT.size


def check_accept(secret: bytes, said: Hello, server_nonce: bytes, frame: bytes) -> None:
    status, mac = _ACCEPT.unpack(frame)
    expected = _mac(secret, b"accept", said.dest.encode(), said.source.encode(), server_nonce,
                    said.client_nonce)
    if status != 0 or not hmac.compare_digest(mac, expected):
        raise AuthError(f"data channel to {said.dest[:64]!r}: the peer did not prove the pair "
                        "secret")


@dataclass(frozen=True)
class Session:
    """The per-channel key that authenticates every frame after the opening."""

    key: bytes

    @classmethod
    def derive(cls, secret: bytes, said: Hello, server_nonce: bytes) -> Session:
        return cls(_mac(secret, b"session", said.source.encode(), said.dest.encode(),
                        said.client_nonce, server_nonce))

    def mac(self, frame: bytes) -> bytes:
        return hmac.new(self.key, frame, hashlib.sha256).digest()[:MAC_BYTES]

    def check(self, frame: bytes, mac: bytes) -> None:
        if not hmac.compare_digest(self.mac(frame), mac):
            raise AuthError("data channel frame fails its MAC (injected or damaged)")


# ---- chunk frames ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkHead:
    """One chunk on a channel: its address, where it goes in the upload, how its body is
    framed. `body_length` bytes of body follow the header."""

    seq: int
    upload: str
    digest: bytes  # blake3 of the raw chunk: its address
    body_blake3: bytes  # blake3 of the body as sent (== digest for identity)
    encoding: Encoding
    raw_length: int
    body_length: int
    locations: tuple[tuple[int, int], ...]
    # One pass: the address follows the body (`digest` and `body_blake3` are zeros until the
    # trailer is checked); `mac` is the header's, which the trailer's MAC chains.
    trailed: bool = False
    mac: bytes = field(default=b"", compare=False)

    @property
    def address(self) -> str:
        return self.digest.hex()


def encode_chunk_head(session: Session, head: ChunkHead) -> bytes:
    upload = head.upload.encode("ascii")
    if not 0 < len(upload) <= MAX_UPLOAD_BYTES:
        raise ProtocolError("upload ids on a data channel are 1-256 ASCII bytes")
    if not 0 < len(head.locations) <= MAX_LOCATIONS:
        raise ProtocolError(f"a chunk names 1-{MAX_LOCATIONS} locations")
    if head.trailed and (head.encoding != "identity" or head.digest != _NO_DIGEST
                         or head.body_blake3 != _NO_DIGEST):
        raise ProtocolError("a one-pass chunk is identity-framed, its address in the trailer")
    frame = b"".join([
        CHUNK_FIXED.pack(_KIND_TRAILED if head.trailed else _KIND_CHUNK,
                         _ENCODINGS.index(head.encoding), len(head.locations),
                         len(upload), head.seq, head.raw_length, head.body_length, head.digest,
                         head.body_blake3),
        upload,
        b"".join(_LOCATION.pack(f, off) for f, off in head.locations),
    ])
    return frame + session.mac(frame)


@dataclass(frozen=True)
class _PartialHead:
    fixed: bytes
    encoding: Encoding
    n_locations: int
    n_upload: int
    seq: int
    raw_length: int
    body_length: int
    digest: bytes
    body_blake3: bytes
    trailed: bool


def decode_chunk_head(fixed: bytes) -> tuple[_PartialHead, int]:
    """The fixed part of a CHUNK header and how many bytes of it follow (upload id, locations,
    MAC); ProtocolError for anything out of bounds."""
    if len(fixed) != CHUNK_FIXED.size:
        raise ProtocolError("short chunk header")
    kind, enc, n_loc, n_up, seq, raw_length, body_length, digest, body_hash = CHUNK_FIXED.unpack(
        fixed)
    if kind not in (_KIND_CHUNK, _KIND_TRAILED):
        raise ProtocolError(f"expected a chunk frame, got kind {kind}")
    if enc >= len(_ENCODINGS):
        raise ProtocolError(f"unknown chunk encoding {enc}")
    if not 0 < n_loc <= MAX_LOCATIONS or not 0 < n_up <= MAX_UPLOAD_BYTES:
        raise ProtocolError("chunk header: locations or upload id out of bounds")
    if not 0 < raw_length <= MAX_CHUNK_BYTES or not 0 < body_length <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk of {raw_length} bytes ({body_length} on the wire) is out of "
                            "range")
    encoding = _ENCODINGS[enc]
    if encoding == "identity" and (body_length != raw_length or body_hash != digest):
        raise ProtocolError("an identity chunk's body is the chunk itself")
    trailed = kind == _KIND_TRAILED
    if trailed and (encoding != "identity" or digest != _NO_DIGEST):
        raise ProtocolError("a one-pass chunk is identity-framed, its address in the trailer")
    partial = _PartialHead(fixed, encoding, n_loc, n_up, seq, raw_length, body_length, digest,
                           body_hash, trailed)
    return partial, chunk_head_rest(partial)


def chunk_head_rest(partial: _PartialHead) -> int:
    return partial.n_upload + partial.n_locations * _LOCATION.size + MAC_BYTES


def finish_chunk_head(session: Session, partial: _PartialHead, rest: bytes) -> ChunkHead:
    """The whole header once `rest` (upload id, locations, MAC) is read: MAC checked first."""
    if len(rest) != chunk_head_rest(partial):
        raise ProtocolError("short chunk header")
    session.check(partial.fixed + rest[:-MAC_BYTES], rest[-MAC_BYTES:])
    try:
        upload = rest[: partial.n_upload].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("upload id is not ASCII") from None
    at = partial.n_upload
    locations = tuple(
        _LOCATION.unpack_from(rest, at + i * _LOCATION.size) for i in range(partial.n_locations)
    )
    return ChunkHead(partial.seq, upload, partial.digest, partial.body_blake3, partial.encoding,
                     partial.raw_length, partial.body_length, locations, partial.trailed,
                     rest[-MAC_BYTES:])


def _trailer_mac(session: Session, head_mac: bytes, digest: bytes) -> bytes:
    return session.mac(b"trailer" + head_mac + digest)


def encode_trailer(session: Session, head_frame: bytes, digest: bytes) -> bytes:
    """What follows a one-pass chunk's body: its address, MAC'd with its header's MAC
    (`head_frame`: the header as `encode_chunk_head` made it)."""
    if len(digest) != 32:
        raise ProtocolError("a chunk address is 32 bytes")
    return digest + _trailer_mac(session, head_frame[-MAC_BYTES:], digest)


def check_trailer(session: Session, head: ChunkHead, trailer: bytes) -> ChunkHead:
    """The header of a one-pass chunk completed by its trailer (AuthError if the trailer's MAC
    does not chain to this header: taken from another chunk, or forged)."""
    if not head.trailed or len(trailer) != TRAILER_BYTES:
        raise ProtocolError("a trailer follows only a one-pass chunk's body")
    digest, mac = trailer[:32], trailer[32:]
    if not hmac.compare_digest(_trailer_mac(session, head.mac, digest), mac):
        raise AuthError("data channel trailer fails its MAC (moved, injected or damaged)")
    return replace(head, digest=digest, body_blake3=digest)


class SeqGuard:
    """Each side's frames carry growing sequence numbers: a replayed or reordered frame on one
    channel is a protocol error."""

    def __init__(self) -> None:
        self.last = -1

    def check(self, seq: int) -> None:
        if seq <= self.last:
            raise ProtocolError(f"frame {seq} after {self.last}: replayed or reordered")
        self.last = seq


# ---- receipts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    seq: int
    status: ReceiptStatus
    reason: str = ""


def encode_receipt(session: Session, receipt: Receipt) -> bytes:
    reason = receipt.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    frame = RECEIPT_FIXED.pack(_KIND_RECEIPT, receipt.status, len(reason), receipt.seq) + reason
    return frame + session.mac(frame)


def decode_receipt_fixed(fixed: bytes) -> tuple[int, int]:
    """(status, bytes that follow: reason + MAC) of a RECEIPT's fixed part."""
    if len(fixed) != RECEIPT_FIXED.size:
        raise ProtocolError("short receipt")
    kind, status, n_reason, _seq = RECEIPT_FIXED.unpack(fixed)
    if kind != _KIND_RECEIPT:
        raise ProtocolError(f"expected a receipt, got kind {kind}")
    if status not in ReceiptStatus._value2member_map_:
        raise ProtocolError(f"unknown receipt status {status}")
    if n_reason > MAX_REASON_BYTES:
        raise ProtocolError("receipt reason too long")
    return status, n_reason + MAC_BYTES


def decode_receipt(session: Session, fixed: bytes, rest: bytes) -> Receipt:
    status, n_rest = decode_receipt_fixed(fixed)
    if len(rest) != n_rest:
        raise ProtocolError("short receipt")
    session.check(fixed + rest[:-MAC_BYTES], rest[-MAC_BYTES:])
    _kind, _status, _n, seq = RECEIPT_FIXED.unpack(fixed)
    return Receipt(seq, ReceiptStatus(status), rest[:-MAC_BYTES].decode("utf-8", "replace"))


# ---- the sender's window -----------------------------------------------------------------------

T = TypeVar("T")


@dataclass
class ChannelWindow(Generic[T]):
    """The chunks one channel has sent and not yet seen receipts for. `window` of them may be
    in flight (`has_room`); receipts complete them in any order; when the channel breaks,
    `drain` hands every one back to be sent again on another channel."""

    window: int
    _next_seq: int = 0
    _in_flight: dict[int, T] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("a channel window holds at least one chunk")

    def has_room(self) -> bool:
        return len(self._in_flight) < self.window

    def __len__(self) -> int:
        return len(self._in_flight)

    def sent(self, item: T) -> int:
        """Record `item` as sent; returns its sequence number."""
        if not self.has_room():
            raise ProtocolError("channel window is full")
        seq = self._next_seq
        self._next_seq += 1
        self._in_flight[seq] = item
        return seq

    def completed(self, seq: int) -> T:
        try:
            return self._in_flight.pop(seq)
        except KeyError:
            raise ProtocolError(f"receipt for chunk {seq}, which is not in flight") from None

    def drain(self) -> list[T]:
        items = list(self._in_flight.values())
        self._in_flight.clear()
        return items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._in_flight.values()))


def locations_of(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(f), int(off)) for f, off in pairs)
