"""The sender's have/want batches: a small first one (the first chunk leaves early), then
HAVE_BATCH at a time, covering every chunk once and in order."""

from __future__ import annotations

import pytest

from transferd.net.sender import FIRST_BATCH, HAVE_BATCH, _batches


@pytest.mark.parametrize("n", [0, 1, FIRST_BATCH, FIRST_BATCH + 1, 10, 64, 129])
def test_batches_cover_every_chunk_once_in_order(n: int) -> None:
    got = _batches(n)
    assert [i for start, stop in got for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in got]
    if n:
        assert sizes[0] == min(n, FIRST_BATCH)
        assert all(0 < s <= HAVE_BATCH for s in sizes)
        assert all(s == HAVE_BATCH for s in sizes[1:-1])
