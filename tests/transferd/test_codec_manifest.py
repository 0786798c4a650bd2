"""The `auto` compression rule, zstd framing, and manifest signatures."""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import pytest

from transferd.errors import AuthError, IntegrityError, ProtocolError
from transferd.protocol.codec import CompressionPolicy, decode_body, zstd_compress
from transferd.protocol.manifest import FileEntry, Manifest, SignedManifest, file_digest, parse_body
from transferd.site.keys import Keyring, keygen

RANDOM = random.Random(1).randbytes(1 << 20)
ZEROS = bytes(1 << 20)


def test_auto_compresses_until_the_link_is_measured_then_only_on_slow_links() -> None:
    policy = CompressionPolicy.from_setting("auto", workers=2)
    assert policy.should_try()  # no link measurement yet: what shrinks goes compressed
    assert policy.pays(policy.probe_ratio(ZEROS))
    assert not policy.pays(policy.probe_ratio(RANDOM))
    policy.observe_link(100_000_000, 1.0)  # 100 MB/s WAN
    assert policy.should_try()
    assert policy.pays(policy.probe_ratio(ZEROS))
    policy.observe_compression(400_000_000, 1.0)  # compressor 400 MB/s per worker
    assert policy.should_try()
    fast = CompressionPolicy.from_setting("auto", workers=2)
    fast.observe_link(3_000_000_000, 1.0)  # loopback: faster than two compressor workers
    fast.observe_compression(400_000_000, 1.0)
    assert not fast.should_try()
    assert not fast.pays(0.3)


def test_chunks_that_shrink_less_than_five_percent_go_raw() -> None:
    policy = CompressionPolicy.from_setting(3, workers=2)
    assert policy.should_try()
    assert not policy.pays(policy.probe_ratio(RANDOM))
    assert policy.pays(policy.probe_ratio(ZEROS))
    assert not CompressionPolicy.from_setting("off", workers=2).should_try()


def test_zstd_bodies_decode_and_bad_ones_are_integrity_errors() -> None:
    frame = zstd_compress(ZEROS, 1)
    assert bytes(decode_body(frame, "zstd", len(ZEROS))) == ZEROS
    with pytest.raises(IntegrityError, match="declared"):
        decode_body(frame, "zstd", len(ZEROS) - 1)
    with pytest.raises(IntegrityError):
        decode_body(b"not zstd", "zstd", 10)
    with pytest.raises(ProtocolError, match="unknown chunk encoding"):
        decode_body(b"x", "brotli", 1)


CHUNKS = [("b" * 64, 0, 4), ("c" * 64, 4, 6)]


def _manifest() -> Manifest:
    return Manifest(
        upload="A-upload-0001",
        source_site="A",
        dest_site="B",
        root="approved/m.bin",
        kind="file",
        tier="approved",
        created_at=1.0,
        files=[
FileEntry(path="", size=10, digest=file_digest(10, CHUNKS), chunks=CHUNKS)
        ],
    )


def test_manifest_signature_verifies_and_any_change_breaks_it(tmp_path: Path) -> None:
    keygen(["A", "B"], tmp_path)
    a, b = Keyring.load(tmp_path, "A", ["B"]), Keyring.load(tmp_path, "B", ["A"])
    signed = _manifest().sign(a)
    assert signed.verify(b) == _manifest()
    tampered = SignedManifest(
        manifest=signed.manifest.replace('"size":10', '"size":11'), signature=signed.signature
    )
    with pytest.raises((AuthError, ProtocolError)):
        tampered.verify(b)
    moved = SignedManifest(
        manifest=signed.manifest.replace("approved/m.bin", "approved/n.bin"),
        signature=signed.signature,
    )
    with pytest.raises(AuthError) as err:
        moved.verify(b)
    assert err.value.http_status == 403


def test_chunks_must_tile_the_file() -> None:
    body = _manifest().model_dump_json().replace('"size":10', '"size":12').encode()
    with pytest.raises(ProtocolError, match="chunks cover 10 bytes, file size is 12"):
        parse_body(Manifest, body)


def test_file_digest_is_the_root_of_the_chunk_list() -> None:
    # The root is fixed by the bytes' chunk addresses and their places, nothing else.
    whole = b"0123456789"
    chunks = [
        (blake3.blake3(whole[:4]).hexdigest(), 0, 4),
        (blake3.blake3(whole[4:]).hexdigest(), 4, 6),
    ]
    root = file_digest(10, chunks)
    assert root == file_digest(10, list(chunks))
    assert root != file_digest(10, [chunks[1], chunks[0]])  # same chunks, other order
    swapped = [(chunks[0][0], 0, 4), (blake3.blake3(b"012345").hexdigest(), 4, 6)]
    assert root != file_digest(10, swapped)  # one chunk's bytes differ
    assert root != file_digest(11, chunks)  # the size is committed too


def test_a_digest_that_is_not_the_chunk_roots_is_refused() -> None:
    body = _manifest().model_dump_json().replace(file_digest(10, CHUNKS), "d" * 64).encode()
    with pytest.raises(ProtocolError, match="digest is not the root"):
        parse_body(Manifest, body)


def test_incompressible_data_is_probed_only_now_and_then() -> None:
    policy = CompressionPolicy.from_setting("auto", workers=2)
    probed = 0
    for _ in range(100):
        if policy.should_try():
            probed += 1
            policy.pays(policy.probe_ratio(RANDOM))
    assert probed <= 4 + 100 // 16 + 1  # four in a row, then one chunk in sixteen
    policy.pays(policy.probe_ratio(ZEROS))  # the data changed: back to probing every chunk
    assert all(policy.should_try() for _ in range(10))


def test_auto_picks_a_higher_level_only_where_the_link_is_far_slower_than_the_compressor() -> None:
    policy = CompressionPolicy.from_setting("auto", workers=2)
    assert policy.compress_level() == 1  # nothing measured yet
    policy.probe_ratio(ZEROS[: 1 << 17] + RANDOM[: 1 << 17])  # a sample that packs to ~0.5
    policy.observe_compression(250_000_000, 1.0, 1)  # level 1: 250 MB/s per worker
    policy.observe_link(6_000_000, 1.0)  # a 50 Mbit/s edge link, by one receipt
    assert policy.compress_level() == 1  # one receipt, in TCP's ramp, may under-rate a link
    policy.observe_link(6_000_000, 1.0)
    policy.observe_link(6_000_000, 1.0)
    assert policy.compress_level() == 6  # 2 x 50 MB/s at level 6 >= 3 x 12 MB/s of raw bytes
    # Level 6 ran at a third of what the table says: the estimate falls and the level with it.
    for _ in range(20):
        policy.observe_compression(17_000_000, 1.0, 6)
    assert policy.compress_level() == 3
    wan = CompressionPolicy.from_setting("auto", workers=2)
    wan.probe_ratio(ZEROS[: 1 << 17] + RANDOM[: 1 << 17])
    wan.observe_compression(250_000_000, 1.0, 1)
    for _ in range(3):
        wan.observe_link(117_000_000, 1.0)  # 1 Gbit/s: level 1 is all the compressor affords
    assert wan.compress_level() == 1
    assert CompressionPolicy.from_setting(9, workers=2).compress_level() == 9  # as configured
