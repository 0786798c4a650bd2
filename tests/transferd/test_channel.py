"""The data channel's sans-I/O core: the opening proves the pair secret both ways and cannot be
replayed, every frame after it is bound to the session and ordered, headers round-trip, the
window hands back what a broken channel had in flight, and arbitrary bytes only ever raise the
package's own errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transferd.errors import AuthError, ProtocolError
from transferd.protocol import channel as ch

SECRET = b"s" * 32


def _open(secret_client: bytes = SECRET, secret_server: bytes = SECRET,
          server_nonce: bytes | None = None) -> tuple[ch.Hello, bytes, ch.Session]:
    """Both sides of an opening, the way net.channels runs them; the server's session."""
    said, frame = ch.hello("A", "B")
    n_src, n_dst, nonce = ch.decode_hello(frame[: ch.HELLO_FIXED.size])
    heard = ch.hello_sites(n_src, frame[ch.HELLO_FIXED.size :], nonce)
    assert heard == said
    challenge = server_nonce or ch.challenge()
    ch.check_proof(secret_server, heard, challenge, ch.proof(secret_client, said, challenge))
    accept = ch.accept_frame(secret_server, heard, challenge)
    ch.check_accept(secret_client, said, challenge, accept)
    return said, challenge, ch.Session.derive(secret_server, heard, challenge)


def test_both_sides_prove_the_pair_secret_and_agree_on_a_session() -> None:
    said, challenge, server = _open()
    client = ch.Session.derive(SECRET, said, challenge)
    assert client == server
    with pytest.raises(AuthError, match="bad opening proof"):
        _open(secret_client=b"x" * 32)
    said, frame = ch.hello("A", "B")
    challenge = ch.challenge()
    forged_accept = ch.accept_frame(b"x" * 32, said, challenge)
    with pytest.raises(AuthError, match="did not prove the pair secret"):
        ch.check_accept(SECRET, said, challenge, forged_accept)


def test_a_recorded_opening_is_worthless_against_a_fresh_challenge() -> None:
    said, _frame = ch.hello("A", "B")
    recorded = ch.proof(SECRET, said, ch.challenge())
    with pytest.raises(AuthError):
        ch.check_proof(SECRET, said, ch.challenge(), recorded)  # the server's new nonce


def test_chunk_header_round_trip_and_tampering() -> None:
    session = ch.Session(b"k" * 32)
    head = ch.ChunkHead(seq=7, upload="A-job-1", digest=b"\x01" * 32, body_blake3=b"\x02" * 32,
                        encoding="zstd", raw_length=8 << 20, body_length=3 << 20,
                        locations=((0, 0), (2, 8 << 20)))
    frame = ch.encode_chunk_head(session, head)
    partial, rest = ch.decode_chunk_head(frame[: ch.CHUNK_FIXED.size])
    assert ch.CHUNK_FIXED.size + rest == len(frame)
    assert ch.finish_chunk_head(session, partial, frame[ch.CHUNK_FIXED.size :]) == head
    flipped = bytearray(frame)
    flipped[ch.CHUNK_FIXED.size + 2] ^= 1  # inside the upload id
    partial, _ = ch.decode_chunk_head(bytes(flipped[: ch.CHUNK_FIXED.size]))
    with pytest.raises(AuthError, match="MAC"):
        ch.finish_chunk_head(session, partial, bytes(flipped[ch.CHUNK_FIXED.size :]))
    other = ch.Session(b"o" * 32)  # the same frame on another channel
    with pytest.raises(AuthError):
        ch.finish_chunk_head(other, *_split(frame))


def _split(frame: bytes) -> tuple[object, bytes]:
    partial, _ = ch.decode_chunk_head(frame[: ch.CHUNK_FIXED.size])
    return partial, frame[ch.CHUNK_FIXED.size :]


def test_an_identity_chunk_must_be_its_own_body() -> None:
    session = ch.Session(b"k" * 32)
    head = ch.ChunkHead(seq=0, upload="u", digest=b"\x01" * 32, body_blake3=b"\x02" * 32,
                        encoding="identity", raw_length=10, body_length=10, locations=((0, 0),))
    frame = ch.encode_chunk_head(session, head)
    with pytest.raises(ProtocolError, match="identity"):
        ch.decode_chunk_head(frame[: ch.CHUNK_FIXED.size])


def test_replayed_or_reordered_frames_are_refused() -> None:
    guard = ch.SeqGuard()
    guard.check(0)
    guard.check(5)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(5)
    with pytest.raises(ProtocolError):
        guard.check(3)


def test_receipts_round_trip_and_are_bound_to_the_session() -> None:
    session = ch.Session(b"k" * 32)
    receipt = ch.Receipt(41, ch.ReceiptStatus.DAMAGED, "blake3 mismatch")
    frame = ch.encode_receipt(session, receipt)
    fixed, rest = frame[: ch.RECEIPT_FIXED.size], frame[ch.RECEIPT_FIXED.size :]
    assert ch.decode_receipt(session, fixed, rest) == receipt
    with pytest.raises(AuthError):
        ch.decode_receipt(ch.Session(b"o" * 32), fixed, rest)


def test_window_bounds_in_flight_and_hands_back_what_a_broken_channel_held() -> None:
    window: ch.ChannelWindow[str] = ch.ChannelWindow(2)
    first, second = window.sent("a"), window.sent("b")
    assert not window.has_room()
    with pytest.raises(ProtocolError):
        window.sent("c")
    assert window.completed(second) == "b"  # receipts come in any order
    assert window.has_room()
    with pytest.raises(ProtocolError, match="not in flight"):
        window.completed(second)  # a receipt replayed on the channel
    window.sent("c")
    assert sorted(window.drain()) == ["a", "c"]
    assert len(window) == 0
    assert first == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=ch.CHUNK_FIXED.size, max_size=ch.CHUNK_FIXED.size + 200))
def test_arbitrary_header_bytes_raise_only_protocol_or_auth_errors(data: bytes) -> None:
    session = ch.Session(b"k" * 32)
    try:
        partial, rest = ch.decode_chunk_head(data[: ch.CHUNK_FIXED.size])
        ch.finish_chunk_head(session, partial, data[ch.CHUNK_FIXED.size :][:rest])
    except (ProtocolError, AuthError):
        pass
    try:
        ch.decode_hello(data[: ch.HELLO_FIXED.size])
    except ProtocolError:
        pass
    try:
        ch.decode_receipt(session, data[: ch.RECEIPT_FIXED.size], data[ch.RECEIPT_FIXED.size :])
    except (ProtocolError, AuthError):
        pass


def _one_pass_frame(session: ch.Session, seq: int, upload: str = "A-job-1",
                    at: tuple[int, int] = (0, 0)) -> bytes:
    head = ch.ChunkHead(seq=seq, upload=upload, digest=bytes(32), body_blake3=bytes(32),
                        encoding="identity", raw_length=10, body_length=10, locations=(at,),
                        trailed=True)
    return ch.encode_chunk_head(session, head)


def test_a_one_pass_trailer_completes_its_own_header_and_no_other() -> None:
    """The address after a one-pass body is bound to that chunk's header (seq, upload,
    locations) and session: a trailer moved to another chunk, or replayed, fails its MAC."""
    session = ch.Session(b"k" * 32)
    digest = b"\x07" * 32
    frame = _one_pass_frame(session, 3)
    head = ch.finish_chunk_head(session, *_split(frame))  # type: ignore[arg-type]
    assert head.trailed
    assert head.digest == bytes(32)
    done = ch.check_trailer(session, head, ch.encode_trailer(session, frame, digest))
    assert (done.digest, done.body_blake3, done.seq, done.locations) == (
        digest, digest, 3, ((0, 0),))
    for other in (_one_pass_frame(session, 4), _one_pass_frame(session, 3, at=(0, 10)),
                  _one_pass_frame(session, 3, upload="A-job-2")):
        trailer = ch.encode_trailer(session, other, digest)  # another chunk's (or seq's)
        with pytest.raises(AuthError, match="trailer"):
            ch.check_trailer(session, head, trailer)
    forged = bytearray(ch.encode_trailer(session, frame, digest))
    forged[0] ^= 1  # another address under the same MAC
    with pytest.raises(AuthError):
        ch.check_trailer(session, head, bytes(forged))
    with pytest.raises(AuthError):  # the same trailer on another channel
        ch.check_trailer(ch.Session(b"o" * 32), head, ch.encode_trailer(session, frame, digest))


def test_only_a_one_pass_chunk_takes_a_trailer_and_it_names_no_address() -> None:
    session = ch.Session(b"k" * 32)
    plain = ch.ChunkHead(seq=0, upload="u", digest=b"\x01" * 32, body_blake3=b"\x01" * 32,
                         encoding="identity", raw_length=10, body_length=10, locations=((0, 0),))
    frame = ch.encode_chunk_head(session, plain)
    head = ch.finish_chunk_head(session, *_split(frame))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="trailer"):
        ch.check_trailer(session, head, ch.encode_trailer(session, frame, b"\x01" * 32))
    with pytest.raises(ProtocolError, match="one-pass"):
        ch.encode_chunk_head(session, ch.ChunkHead(
            seq=0, upload="u", digest=b"\x01" * 32, body_blake3=b"\x01" * 32,
            encoding="identity", raw_length=10, body_length=10, locations=((0, 0),),
            trailed=True))
    # A one-pass header whose address field is not zero (bytes edited, MAC aside) is refused.
    raw = bytearray(_one_pass_frame(session, 0))
    raw[ch.CHUNK_FIXED.size - 64] = raw[ch.CHUNK_FIXED.size - 32] = 1
    with pytest.raises(ProtocolError, match="one-pass"):
        ch.decode_chunk_head(bytes(raw[: ch.CHUNK_FIXED.size]))
