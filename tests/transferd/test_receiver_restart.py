"""Chunks staged before a receiver restart are hashed again at commit.

A chunk verified in memory and written by the running process is trusted at commit (its file
digest is the Merkle root over the chunk addresses). After a crash, the journal may say a chunk
was received while its bytes never reached the disk; those chunks are read back and re-hashed,
and a mismatch sends them back over the wire instead of committing a damaged file.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from transferd.protocol.upload import ChunkTarget, upload_intent, upload_manifest
from transferd.site.journal import Journal
from transferd.site.keys import keygen
from transferd.site.receiver import Receiver
from transferd.testing import receiver_at

CHUNK = 4096


def _put(receiver: Receiver, upload: str, data: bytes, chunk: tuple[str, int, int]) -> None:
    digest, off, n = chunk
    targets = [ChunkTarget(0, off, n)]
    receiver.verify_and_write(upload, digest, data[off : off + n], digest, "identity", n, targets)
    receiver.record(upload, targets, digest)


def test_chunks_staged_before_a_restart_are_rehashed_and_damage_is_refetched(
    tmp_path: Path,
) -> None:
    keygen(["A", "B"], tmp_path / "keys")
    data = os.urandom(3 * CHUNK)
    chunks = [
        (blake3.blake3(data[off : off + CHUNK]).hexdigest(), off, CHUNK)
        for off in range(0, len(data), CHUNK)
    ]
    intent = upload_intent("A-restart-0001", "A", "B", "approved/x.bin", "file", [("", len(data))])
    manifest = upload_manifest(intent, 1.0, [chunks])
    journal = Journal(tmp_path / "data" / ".transferd" / "journal.sqlite")
    first = receiver_at(tmp_path, journal)
    first.open(intent, "A", now=1.0)
    for chunk in chunks[:2]:
        _put(first, intent.upload, data, chunk)
    first.close()  # the daemon stops (or dies) with two chunks staged

    # On disk, the second chunk's bytes did not survive.
    staging = tmp_path / "data" / ".transferd" / "staging"
    [staged] = [p for p in staging.rglob("*") if p.is_file()]
    with open(staged, "r+b") as fh:
        fh.seek(CHUNK + 7)
        fh.write(bytes([data[CHUNK + 7] ^ 0xFF]))

    second = receiver_at(tmp_path, journal)
    second.open(intent, "A", now=2.0)
    _put(second, intent.upload, data, chunks[2])
    assert second.missing(intent.upload, manifest) == []
    # The damaged chunk from before the restart is found; the one written now is trusted.
    assert second.verify_files(intent.upload, manifest) == [(0, CHUNK)]
    # Once it is sent again, nothing is left to re-hash and the upload can commit.
    second.forget(intent.upload, [(0, CHUNK)])
    assert second.missing(intent.upload, manifest) == [(0, CHUNK)]
    _put(second, intent.upload, data, chunks[1])
    assert second.verify_files(intent.upload, manifest) == []
    second.commit_files(intent.upload, manifest)
    assert (tmp_path / "data" / "approved" / "x.bin").read_bytes() == data
    second.close()
    journal.close()
