"""Staged spans keep their CRC-32 (for an object store's upload checksum): the combination of
the chunks' CRCs is the file's CRC, whatever order the chunks were written in, and a member not
written whole by this process has none (the upload then computes it from the file)."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from transferd.site.staging import Staging, crc32_combine


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_is_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_a_members_crc_comes_from_its_chunks_in_any_order(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(10 * 4096 + 17)
    staging = Staging(tmp_path / "u", "folder", ["a.bin", "b.bin"], [len(data), 8192], crc32=True)
    staging.create()
    spans = [(off, min(4096, len(data) - off)) for off in range(0, len(data), 4096)]
    random.Random(4).shuffle(spans)
    for off, n in spans:
        staging.write(0, off, data[off : off + n])
    staging.write(0, 0, data[:4096])  # a chunk sent again: still one span
    assert staging.member_crc32(0) == zlib.crc32(data)
    staging.write(1, 0, b"x" * 4096)  # half of b.bin: not known whole
    assert staging.member_crc32(1) is None
    plain = Staging(tmp_path / "v", "file", [""], [4], crc32=False)
    plain.create()
    plain.write(0, 0, b"abcd")
    assert plain.member_crc32(0) is None
