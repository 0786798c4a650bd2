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

from transferd.protocol.manifest import FileEntry, Manifest, UploadIntent, file_digest
from transferd.site.journal import Journal
from transferd.site.keys import keygen
from transferd.testing import receiver_at

CHUNK = 4096


def test_chunks_staged_before_a_restart_are_rehashed_and_damage_is_refetched(
    tmp_path: Path,
) -> None:
    keygen(["A", "B"], tmp_path / "keys")
    data = os.urandom(3 * CHUNK)
    chunks = [
        (blake3.blake3(data[off : off + CHUNK]).hexdigest(), off, CHUNK)
        for off in range(0, len(data), CHUNK)
    ]
    intent = UploadIntent(
        upload="A-restart-0001",
        source_site="A",
        dest_site="B",
        root="approved/x.bin",
        kind="file",
        files=[{"path": "", "size": len(data)}],  # type: ignore[list-item]
    )
    manifest = Manifest(
        upload=intent.upload,
        source_site="A",
        dest_site="B",
        root=intent.root,
        kind="file",
        tier="approved",
        created_at=1.0,
        files=[
            FileEntry(
                path="", size=len(data), digest=file_digest(len(data), chunks), chunks=chunks
            )
        ],
    )
    journal = Journal(tmp_path / "data" / ".transferd" / "journal.sqlite")
    first = receiver_at(tmp_path, journal)
    first.open(intent, "A", now=1.0)
    for digest, off, n in chunks[:2]:
        first.verify_and_write(
            intent.upload, digest, data[off : off + n], digest, "identity", n, [(0, off, n)]
        )
        journal.record_received(intent.upload, [(0, off, n)], digest)
    first.close()  # the daemon stops (or dies) with two chunks staged

    # On disk, the second chunk's bytes did not survive.
    staging = tmp_path / "data" / ".transferd" / "staging"
    [staged] = [p for p in staging.rglob("*") if p.is_file()]
    with open(staged, "r+b") as fh:
        fh.seek(CHUNK + 7)
        fh.write(bytes([data[CHUNK + 7] ^ 0xFF]))

    second = receiver_at(tmp_path, journal)
    second.open(intent, "A", now=2.0)
    digest, off, n = chunks[2]
    second.verify_and_write(
        intent.upload, digest, data[off : off + n], digest, "identity", n, [(0, off, n)]
    )
    journal.record_received(intent.upload, [(0, off, n)], digest)
    assert second.missing(intent.upload, manifest) == []
    # The damaged chunk from before the restart is found; the one written now is trusted.
    assert second.verify_files(intent.upload, manifest) == [(0, CHUNK)]
    # Once it is sent again, nothing is left to re-hash and the upload can commit.
    digest, off, n = chunks[1]
    second.verify_and_write(
        intent.upload, digest, data[off : off + n], digest, "identity", n, [(0, off, n)]
    )
    assert second.verify_files(intent.upload, manifest) == []
    second.commit_files(intent.upload, manifest)
    assert (tmp_path / "data" / "approved" / "x.bin").read_bytes() == data
    second.close()
    journal.close()
