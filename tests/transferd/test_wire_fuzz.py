"""Hypothesis: malformed requests and manifests raise only transferd's errors and never write
anything a reader of data_dir can see."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferd.errors import ProtocolError, TransferdError
from transferd.protocol.manifest import HaveRequest, Manifest, SignedManifest, UploadIntent
from transferd.protocol.messages import InboxQuery, MessageEnvelope, MessageQuery
from transferd.protocol.wire import parse_body, parse_query
from transferd.site.journal import Journal
from transferd.site.keys import keygen
from transferd.site.receiver import Receiver
from transferd.testing import receiver_at

FUZZ = settings(
    max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

segments = st.sampled_from(
    ["curated", "raw", "approved", "checkpoints", "..", ".", "", "/", "a", "x.bin", "\x00", "C:"]
)
paths = st.lists(segments, min_size=0, max_size=5).map("/".join) | st.text(max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keygen(["A", "B"], root / "keys")
        journal = Journal(root / "data" / ".transferd" / "journal.sqlite")
        r = receiver_at(root, journal)
        yield r
        r.close()
        journal.close()


def visible(r: Receiver) -> list[str]:
    root = r.storage.staging_root.parent.parent
    return [
        os.path.join(d, f)
        for d, _dirs, files in os.walk(root)
        for f in files
        if ".transferd" not in Path(d).relative_to(root).parts
    ]


@FUZZ
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bodies_raise_only_protocol_errors(body: bytes) -> None:
    for model in (UploadIntent, HaveRequest, SignedManifest, Manifest):
        try:
            parse_body(model, body)
        except ProtocolError:
            pass


@FUZZ
@given(
    root=paths,
    members=st.lists(paths, max_size=3),
    sizes=st.lists(st.integers(-5, 70_000), min_size=1, max_size=3),
    kind=st.sampled_from(["file", "folder", "dir"]),
    source=st.sampled_from(["A", "B", "C"]),
    at=st.lists(st.tuples(st.integers(-3, 5), st.integers(-10, 80_000)), max_size=4),
    manifest=json_values,
)
def test_malformed_uploads_raise_only_transferd_errors_and_write_nothing_visible(
    receiver: Receiver,
    root: str,
    members: list[str],
    sizes: list[int],
    kind: str,
    source: str,
    at: list[tuple[int, int]],
    manifest: object,
) -> None:
    files = [{"path": m, "size": s} for m, s in zip(members or [""], sizes, strict=False)]
    doc = {
        "upload": "A-fuzz-upload",
        "source_site": source,
        "dest_site": "B",
        "root": root,
        "kind": kind,
        "files": files,
    }
    try:
        intent = parse_body(UploadIntent, json.dumps(doc).encode())
        receiver.open(intent, "A", now=1.0)
        receiver.targets(intent.upload, "A", 10, at)
    except TransferdError:
        pass
    try:
        signed = parse_body(
            SignedManifest,
            json.dumps({"manifest": json.dumps(manifest), "signature": "ab" * 64}).encode(),
        )
        receiver.check_manifest("A-fuzz-upload", "A", signed)
    except TransferdError:
        pass
    assert visible(receiver) == []


header_values = st.text(max_size=30) | st.integers().map(str) | st.floats().map(str)


@FUZZ
@given(
    query=st.dictionaries(
        st.sampled_from(
            [
                "class", "deadline_ms", "wait", "wait_ms", "max", "X-Transferd-Message-Id",
                "X-Transferd-Class", "X-Transferd-Sent-At", "X-Transferd-Deadline",
                "other",
            ]
        ),
        header_values,
        max_size=6,
    )
)  # fmt: skip
def test_arbitrary_queries_and_headers_raise_only_protocol_errors(query: dict[str, str]) -> None:
    for model in (MessageEnvelope, MessageQuery, InboxQuery):
        try:
            parse_query(model, query)
        except ProtocolError:
            pass
