"""The sender's have/want batches: a small first one (the first chunk leaves early), then a
fixed size at a time, covering every chunk once and in order."""

from __future__ import annotations

import pytest

from transferd.protocol.upload import offer_batches


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 64, 129])
def test_batches_cover_every_chunk_once_in_order(n: int) -> None:
    got = offer_batches(n, 2, 8)
    assert [i for start, stop in got for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in got]
    if n:
        assert sizes[0] == min(n, 2)
        assert all(0 < s <= 8 for s in sizes)
        assert all(s == 8 for s in sizes[1:-1])
