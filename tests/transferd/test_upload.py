"""The upload state machines without sockets or files: what the sender offers and sends, what
the receiver still lacks, and when a commit may happen."""

from __future__ import annotations

import pytest

from transferd.errors import PolicyViolation, ProtocolError
from transferd.protocol.chunks import blake3_hex
from transferd.protocol.manifest import (
    ChunkRef,
    CommitAnswer,
    HaveAnswer,
    HaveRequest,
    OfferAnswer,
    OpenAnswer,
    OpenRequest,
    UploadIntent,
)
from transferd.protocol.upload import (
    ChunkTarget,
    Staged,
    answer_have,
    check_intent,
    check_manifest,
    chunk_targets,
    commit_wait_s,
    missing,
    one_pass_files,
    open_request,
    plan_offer,
    refused,
    resend,
    upload_intent,
    upload_manifest,
)
from transferd.protocol.wire import parse_body, to_body

A, B, Z = (blake3_hex(x) for x in (b"a", b"b", b"z"))
INTENT = upload_intent("A-job-0001", "A", "B", "curated/d", "folder", [("x", 30), ("y", 10)])


def _ref(file: int, offset: int, digest: str, length: int = 10) -> ChunkRef:
    return ChunkRef(file=file, offset=offset, length=length, hash=digest)


def test_the_receiver_skips_staged_chunks_copies_held_ones_and_wants_the_rest() -> None:
    request = HaveRequest(chunks=[_ref(0, 0, A), _ref(0, 10, B), _ref(0, 20, Z), _ref(1, 0, Z)])
    staged = {(0, 0): Staged(10, A), (0, 10): Staged(10, A)}  # (0, 10) holds other bytes
    decision = answer_have(INTENT, staged, request, held_here=lambda h, n: h == Z)
    assert decision.want == [1]
    assert decision.copies == {Z: [ChunkTarget(0, 20, 10), ChunkTarget(1, 0, 10)]}


def test_an_offered_chunk_outside_its_file_is_a_protocol_error() -> None:
    request = HaveRequest(chunks=[_ref(1, 5, A)])  # file 1 is 10 bytes long
    with pytest.raises(ProtocolError, match=r"chunks\[0\] lies outside file 1"):
        answer_have(INTENT, {}, request, held_here=lambda h, n: False)
    with pytest.raises(ProtocolError, match="1:5 lies outside"):
        chunk_targets(INTENT, 10, [(0, 0), (1, 5)])


@pytest.mark.parametrize(
    ("source", "dest", "root", "match"),
    [
        ("C", "B", "curated/d", "claims source 'C'"),
        ("A", "C", "curated/d", "addressed to 'C'"),
        ("A", "B", "raw/d", "raw-tier"),
        ("A", "B", "curated//d", "normal form"),
    ],
)
def test_the_receiver_refuses_an_intent_policy_forbids(
    source: str, dest: str, root: str, match: str
) -> None:
    intent = upload_intent("A-job-0002", source, dest, root, "file", [("", 1)])
    with pytest.raises(PolicyViolation, match=match):
        check_intent(intent, "A", "B")


def test_a_commit_waits_for_every_chunk_with_the_manifests_hash() -> None:
    manifest = upload_manifest(INTENT, 1.0, [[(A, 0, 10), (B, 10, 20)], [(Z, 0, 10)]])
    check_manifest(manifest, INTENT, "A", "B")
    staged = {(0, 0): Staged(10, A), (0, 10): Staged(20, A), (1, 0): Staged(10, Z)}
    assert missing(manifest, staged) == [(0, 10)]
    assert refused(missing(manifest, staged)) == CommitAnswer(committed=False, want=[(0, 10)])
    with pytest.raises(ProtocolError, match="does not describe"):
        check_manifest(manifest, INTENT, "C", "B")


def test_the_sender_sends_each_distinct_hash_once_and_defers_one_already_on_its_way() -> None:
    refs = [_ref(0, 0, A), _ref(0, 10, A), _ref(0, 20, B), _ref(1, 0, Z)]
    started = {Z}
    plan = plan_offer(refs, HaveAnswer(want=[0, 1, 3]), started)
    assert [(u.digest, u.first, u.locations) for u in plan.uploads] == [(A, 0, [(0, 0), (0, 10)])]
    assert plan.deferred == [refs[3]]  # Z is being sent already: offered again once it landed
    assert plan.skipped == [refs[2]]
    assert started == {A, Z}
    with pytest.raises(ProtocolError, match="not offered"):
        plan_offer(refs, HaveAnswer(want=[4]), set())


def test_a_refused_commit_resolves_to_the_chunks_to_send_again() -> None:
    chunks = [[(A, 0, 10), (B, 10, 20)], [(Z, 0, 10)]]
    again = resend(CommitAnswer(committed=False, want=[(0, 10), (1, 0)]), chunks)
    assert again == [(0, (B, 10, 20)), (1, (Z, 0, 10))]
    with pytest.raises(ProtocolError, match="unknown chunk"):
        resend(CommitAnswer(committed=False, want=[(0, 5)]), chunks)
    with pytest.raises(ProtocolError, match="without naming"):
        resend(CommitAnswer(committed=False), chunks)


@pytest.mark.parametrize("raw", ["\u00b2", "\u0661\u0662", "abc", "-5", "1e3", "1234567890"])
def test_a_commit_wait_that_is_no_ascii_number_is_refused_naming_it(raw: str) -> None:
    """"²" and other Unicode digits pass str.isdigit() but not int(): a ProtocolError (400)
    naming the parameter, never a ValueError (500)."""
    with pytest.raises(ProtocolError, match="wait_ms"):
        commit_wait_s(raw)


def test_a_commit_wait_is_read_in_milliseconds_and_capped() -> None:
    assert commit_wait_s(None) == 0.0
    assert commit_wait_s("2500") == 2.5
    assert commit_wait_s("999999999") == 60.0


def test_one_pass_fields_go_on_the_wire_only_when_they_say_something() -> None:
    """An open that does not ask, and an answer that lists no file, carry no `one_pass`: a
    peer older than the field (which refuses unknown fields) reads them as before; the
    receiver lists a fresh file only if none of its offered chunks is held."""
    class OfferAnswerBeforeOnePass(OpenAnswer):
        want: list[int]

    intent = upload_intent("A-job-0001", "A", "B", "curated/d", "folder", [("x", 30), ("y", 30)])
    assert b"one_pass" not in to_body(open_request(intent, []))
    asked = parse_body(OpenRequest, to_body(open_request(intent, [], one_pass=True)))
    assert asked.one_pass
    with pytest.raises(ProtocolError, match="one_pass"):
        parse_body(UploadIntent, to_body(open_request(intent, [], one_pass=True)).replace(
            b'"offer":[],', b""))
    silent = to_body(OfferAnswer(upload="A-job-0001", committed=False, want=[0], one_pass=[]))
    assert parse_body(OfferAnswerBeforeOnePass, silent).want == [0]
    listed = OfferAnswer(upload="A-job-0001", committed=False, want=[0], one_pass=[0, 1])
    assert parse_body(OfferAnswer, to_body(listed)).one_pass == [0, 1]
    offer = [ChunkRef(file=0, offset=0, length=10, hash="a" * 64),
             ChunkRef(file=1, offset=0, length=10, hash="b" * 64)]
    assert one_pass_files([0, 1], offer, want=[0]) == [0]  # file 1's chunk is held
    assert one_pass_files([1], offer, want=[0, 1]) == [1]  # file 0 has a destination file
