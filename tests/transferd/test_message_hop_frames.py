"""The message hop's frames and opening, without sockets: round trips, MACs that bind kind,
sequence, envelope and body, and decoders that only ever raise the package's errors."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netplan.plan import TrafficClass
from transferd.errors import AuthError, ProtocolError, TransferdError
from transferd.protocol import channel as ch
from transferd.protocol import message_hop as mh
from transferd.protocol import message_socket as ms
from transferd.protocol.messages import MessageEnvelope

SESSION = ch.Session(b"k" * 32)


def _frames(data: bytes) -> list[tuple[ms.Frame, bytes]]:
    return ms.FrameReader(name="message hop").feed(data)


def _envelope() -> MessageEnvelope:
    now = round(time.time(), 3)  # the envelope carries microseconds as text, as in HTTP headers
    return MessageEnvelope(id="A-1-0-abcd", traffic_class=TrafficClass.INTERACTIVE,
                           sent_at=now, deadline=round(now + 0.05, 3))


def test_a_send_round_trips_with_its_envelope_and_body() -> None:
    envelope = _envelope()
    [(kind, payload)] = _frames(mh.encode_send(SESSION, 7, mh.envelope_json(envelope), b"hi"))
    assert kind is ms.Frame.SEND
    send = mh.decode_send(SESSION, payload)
    assert (send.seq, send.body) == (7, b"hi")
    assert mh.parse_envelope(send.envelope_json) == envelope


@pytest.mark.parametrize("where", ["seq", "envelope", "body", "mac"])
def test_a_send_changed_anywhere_fails_its_mac(where: str) -> None:
    frame = bytearray(mh.encode_send(SESSION, 7, mh.envelope_json(_envelope()), b"body!"))
    at = {"seq": 5 + 7, "envelope": 5 + 10 + 3, "body": len(frame) - 16 - 2,
          "mac": len(frame) - 1}[where]
    frame[at] ^= 0x01
    [(_kind, payload)] = _frames(bytes(frame))
    with pytest.raises(AuthError):
        mh.decode_send(SESSION, payload)


def test_a_send_under_another_session_is_refused() -> None:
    frame = mh.encode_send(ch.Session(b"x" * 32), 1, b"{}", b"body")
    [(_kind, payload)] = _frames(frame)
    with pytest.raises(AuthError):
        mh.decode_send(SESSION, payload)


def test_replies_round_trip_and_bind_their_kind() -> None:
    [(kind, payload)] = _frames(mh.encode_reply(SESSION, 3, 9, 200, b'{"ok":1}'))
    reply = mh.decode_reply(SESSION, kind, payload)
    assert (reply.seq, reply.request_seq, reply.status, reply.body, reply.error) == (
        3, 9, 200, b'{"ok":1}', False)
    # The same bytes presented as an ERROR (or an ERROR as a RECEIPT) fail the MAC.
    with pytest.raises(AuthError):
        mh.decode_reply(SESSION, ms.Frame.ERROR, payload)
    with pytest.raises(ProtocolError):
        mh.decode_reply(SESSION, ms.Frame.SEND, payload)


def test_the_opening_proofs_are_the_data_channels_and_bind_both_nonces() -> None:
    secret = b"s" * 32
    said = ch.Hello("A", "B", ch.challenge())
    server_nonce = ch.challenge()
    ch.check_accept(secret, said, server_nonce, ch.accept_frame(secret, said, server_nonce))
    proof = ch.proof(secret, said, server_nonce)
    ch.check_proof(secret, said, server_nonce, proof)
    with pytest.raises(AuthError):  # a recorded proof against a fresh challenge
        ch.check_proof(secret, said, ch.challenge(), proof)
    with pytest.raises(AuthError):  # another sender's name
        ch.check_proof(secret, ch.Hello("C", "B", said.client_nonce), server_nonce, proof)


def test_the_upgrade_answer_head_is_parsed_once_whole() -> None:
    head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: transferd-messages/1\r\n"
            b"X-Transferd-Hop-Challenge: ab\r\n\r\nFRAMES")
    assert mh.parse_response_head(head[:20]) is None
    answer = mh.parse_response_head(head)
    assert answer is not None
    assert answer.status == 101
    assert answer.headers["upgrade"] == mh.UPGRADE
    assert answer.body_start == b"FRAMES"
    with pytest.raises(ProtocolError):
        mh.parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ProtocolError):
        mh.parse_response_head(b"x" * (mh.HEAD_MAX_BYTES + 1))


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"X-Transferd-Message-Id": 1}',
                                 b'{"X-Transferd-Message-Id": "a"}'])
def test_a_bad_envelope_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        mh.parse_envelope(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(list(ms.Frame)))
def test_decoders_only_raise_the_packages_errors(data: bytes, kind: ms.Frame) -> None:
    for decode in (lambda: mh.decode_send(SESSION, data),
                   lambda: mh.decode_reply(SESSION, kind, data),
                   lambda: mh.parse_envelope(data),
                   lambda: mh.parse_response_head(data + b"\r\n\r\n")):
        try:
            decode()
        except TransferdError:
            pass


def test_a_ping_round_trips_and_its_mac_binds_its_seq() -> None:
    [(kind, payload)] = _frames(mh.encode_ping(SESSION, 9))
    assert kind is ms.Frame.PING
    assert mh.decode_ping(SESSION, payload) == 9
    forged = payload[:7] + bytes([payload[7] ^ 1]) + payload[8:]
    with pytest.raises(AuthError):
        mh.decode_ping(SESSION, forged)
    with pytest.raises(ProtocolError):
        mh.decode_ping(SESSION, payload[:-1])


def test_the_upgrade_names_an_internationalised_host_by_its_idna_labels() -> None:
    request = mh.upgrade_request("bücher.example:8443", "/v1/peer/message-hop?nonce=00", {})
    assert b"\r\nHost: xn--bcher-kva.example:8443\r\n" in request
    assert b"\r\nHost: 127.0.0.1:80\r\n" in mh.upgrade_request("127.0.0.1:80", "/", {})
    with pytest.raises(ProtocolError):
        mh.upgrade_request("a..b\u00fc", "/", {})


def test_an_envelope_nested_past_the_parsers_recursion_limit_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        mh.parse_envelope(b"[" * 60_000 + b"]" * 60_000)
