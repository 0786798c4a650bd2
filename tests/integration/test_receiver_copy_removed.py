"""A receiver's committed copy removed, or made unreadable, by someone at the receiver: the next
send of the same bytes commits them again. The chunk index still says where the copy's chunks
were, so the receiver answered "held in place" and then, at the commit, failed to read them:
every later send of that file (or of a folder holding it) failed with "no longer there", for
good, until the journal was deleted."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.integration._data import file_blake3, write_random
from transferd.testing import loopback_pair, wait_for_jobs

CHUNK = 64 * 1024


async def test_a_file_removed_at_the_receiver_is_sent_again(tmp_path: Path) -> None:
    digest = write_random(tmp_path / "site-A/curated/model.bin", 5 * CHUNK + 7, seed=1)
    copy = tmp_path / "site-B/curated/model.bin"
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        [first] = await wait_for_jobs(a, a.sender.submit("curated/model.bin", ["B"]))
        assert first.state == "committed", first.error
        copy.unlink()
        [again] = await wait_for_jobs(a, a.sender.submit("curated/model.bin", ["B"]))
        assert again.state == "committed", again.error
        assert file_blake3(copy) == digest
        # Each chunk, first said to be held there, counted once: as sent (progress went to
        # twice the file's size, the bar full while every byte was still to go).
        assert (again.bytes_done, again.chunks_sent, again.chunks_skipped) == (
            5 * CHUNK + 7, 6, 0)
        copy.write_bytes(b"short")  # cut short here: its chunks are no longer where indexed
        [third] = await wait_for_jobs(a, a.sender.submit("curated/model.bin", ["B"]))
        assert third.state == "committed", third.error
        assert file_blake3(copy) == digest


async def test_a_folder_removed_at_the_receiver_is_sent_again_whole(tmp_path: Path) -> None:
    ds = tmp_path / "site-A/approved/ds"
    digests = {name: write_random(ds / name, 3 * CHUNK + i, seed=i)
               for i, name in enumerate(["a.bin", "sub/b.bin", "sub/c.bin"])}
    copy = tmp_path / "site-B/approved/ds"
    async with loopback_pair(tmp_path, chunk_size=CHUNK) as (a, _b):
        [first] = await wait_for_jobs(a, a.sender.submit("approved/ds", ["B"]))
        assert first.state == "committed", first.error
        shutil.rmtree(copy / "sub")  # one member's folder: the rest is kept, linked
        [again] = await wait_for_jobs(a, a.sender.submit("approved/ds", ["B"]))
        assert again.state == "committed", again.error
        assert {name: file_blake3(copy / name) for name in digests} == digests
        shutil.rmtree(copy)
        [third] = await wait_for_jobs(a, a.sender.submit("approved/ds", ["B"]))
        assert third.state == "committed", third.error
        assert {name: file_blake3(copy / name) for name in digests} == digests
        assert (third.bytes_done, third.chunks_skipped) == (third.bytes_logical, 0)
