"""The message socket's frames (sans-IO): whole frames out of any split of the stream, requests
and replies round-trip, and bad input only ever raises ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transferd.errors import ProtocolError
from transferd.protocol import message_socket as ms


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.data())
def test_frames_come_out_whole_however_the_stream_is_split(
    bodies: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(ms.encode_send(i, b'{"peer":"B"}', body) for i, body in enumerate(bodies))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = ms.FrameReader()
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        frames += reader.feed(stream[start:end])
    assert [ms.decode_send(p) for _, p in frames] == [
        (i, b'{"peer":"B"}', body) for i, body in enumerate(bodies)]
    assert all(kind is ms.Frame.SEND for kind, _ in frames)


def test_replies_round_trip() -> None:
    [(kind, payload)] = ms.FrameReader().feed(
        ms.encode_reply(ms.Frame.RECEIPT, 7, 202, b'{"id": "x"}'))
    assert kind is ms.Frame.RECEIPT
    assert ms.decode_reply(payload) == (7, 202, b'{"id": "x"}')


def test_oversized_and_unknown_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds 100"):
        ms.FrameReader(max_bytes=100).feed(ms.encode_frame(ms.Frame.SEND, b"x" * 101))
    with pytest.raises(ProtocolError, match="unknown frame kind 99"):
        ms.FrameReader().feed(b"\0\0\0\0\x63")


def test_proofs_differ_by_role_and_nonce() -> None:
    secret, a, b = b"s" * 32, b"a" * 16, b"b" * 16
    assert ms.server_proof(secret, a, b) != ms.client_proof(secret, a, b)
    assert ms.client_proof(secret, a, b) != ms.client_proof(secret, b, a)
    assert ms.client_proof(secret, a, b) != ms.client_proof(b"t" * 32, a, b)


@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_errors(raw: bytes) -> None:
    try:
        for _, payload in ms.FrameReader(max_bytes=1000).feed(raw):
            ms.decode_send(payload)
            ms.decode_reply(payload)
    except ProtocolError:
        pass
