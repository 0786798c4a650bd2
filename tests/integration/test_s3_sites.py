"""Real daemons with one site's data_dir on S3 (moto's server on 127.0.0.1), the other on local
disk, in both directions: a file, a folder, checkpoints with LATEST and retention, and delta
replication (a second step sharing 9 of 10 shards sends a tenth of the bytes)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import fsspec
import pytest

from transferd.site.objectstore import MANIFEST
from transferd.testing import MotoS3Server, loopback_pair, wait_for_jobs

CHUNK = 256 * 1024
CONTROL_BYTES = 64 * 1024  # have/want, manifest and commit bodies of a small job, at most


class Site:
    """Where one site's data lives (a local folder or s3://bucket/site-X), for writing sources
    and reading results the way a user would."""

    def __init__(self, root: str, options: dict[str, Any]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root, **options)
        self.root = self.root.rstrip("/")

    def write(self, rel: str, size: int, seed: int) -> str:
        data = random.Random(seed).randbytes(size)
        self.fs.makedirs(f"{self.root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{rel}", data)
        return blake3.blake3(data).hexdigest()

    def copy(self, rel: str, to: str) -> None:
        self.fs.makedirs(f"{self.root}/{to}".rsplit("/", 1)[0], exist_ok=True)
        self.fs.copy(f"{self.root}/{rel}", f"{self.root}/{to}")

    def blake3(self, rel: str) -> str:
        return blake3.blake3(self.fs.cat_file(f"{self.root}/{rel}")).hexdigest()

    def read_text(self, rel: str) -> str:
        return bytes(self.fs.cat_file(f"{self.root}/{rel}")).decode()

    def names(self, rel: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/{rel}"))


@contextmanager
def sites(
    tmp_path: Path, s3: MotoS3Server, bucket: str, on_s3: str
) -> Iterator[tuple[dict[str, Any], Site, Site]]:
    """Config overrides for A and B with `on_s3` ("A" or "B") keeping its data on S3."""
    overrides: dict[str, Any] = {}
    roots = {}
    for name in ("A", "B"):
        if name == on_s3:
            url = f"s3://{bucket}/site-{name}"
            overrides[name] = {
                "data_dir": url,
                "state_dir": str(tmp_path / f"state-{name}"),
                "storage_options": s3.storage_options,
            }
            roots[name] = Site(url, s3.storage_options)
        else:
            (tmp_path / f"site-{name}").mkdir()
            roots[name] = Site(str(tmp_path / f"site-{name}"), {})
    yield overrides, roots["A"], roots["B"]


DIRECTIONS = pytest.mark.parametrize("on_s3", ["B", "A"], ids=["local-to-s3", "s3-to-local"])


@DIRECTIONS
async def test_a_file_and_a_folder_replicate_whole(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str, on_s3: str
) -> None:
    with sites(tmp_path, moto_s3, s3_bucket, on_s3) as (overrides, src, dst):
        big = src.write("curated/big.bin", 9 * CHUNK + 17, seed=1)
        members = {
            "a.bin": src.write("approved/ds/a.bin", 3 * CHUNK, seed=2),
            "sub/b.bin": src.write("approved/ds/sub/b.bin", 100, seed=3),
        }
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
            ids = a.sender.submit("curated/big.bin", ["B"]) + a.sender.submit("approved/ds", ["B"])
            jobs = await wait_for_jobs(a, ids, timeout_s=60)
        assert [j.state for j in jobs] == ["committed", "committed"], [j.error for j in jobs]
        assert dst.blake3("curated/big.bin") == big
        for member, digest in members.items():
            assert dst.blake3(f"approved/ds/{member}") == digest
        if on_s3 == "B":
            assert MANIFEST in dst.names("approved/ds")


@DIRECTIONS
async def test_checkpoints_move_latest_after_whole_steps_keep_the_newest_and_send_deltas(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str, on_s3: str
) -> None:
    with sites(tmp_path, moto_s3, s3_bucket, on_s3) as (overrides, src, dst):
        names = [f"shard-{i:02d}.bin" for i in range(10)]
        shards = {n: src.write(f"checkpoints/r/step-100/{n}", 2 * CHUNK, seed=i)
                  for i, n in enumerate(names)}  # fmt: skip
        async with loopback_pair(
            tmp_path, chunk_size=CHUNK, checkpoints={"retention": 2}, **overrides
        ) as (a, _b):
            [first] = await wait_for_jobs(
                a, a.sender.submit("checkpoints/r/step-100", ["B"]), timeout_s=60
            )
            assert dst.read_text("checkpoints/r/LATEST") == "step-100\n"
            # The next steps share nine shards of ten with the one before.
            for step in (200, 300):
                for name in shards:
                    src.copy(f"checkpoints/r/step-100/{name}", f"checkpoints/r/step-{step}/{name}")
                shards["shard-03.bin"] = src.write(
                    f"checkpoints/r/step-{step}/shard-03.bin", 2 * CHUNK, seed=step
                )
                [job] = await wait_for_jobs(
                    a, a.sender.submit(f"checkpoints/r/step-{step}", ["B"]), timeout_s=60
                )
                assert job.state == "committed", job.error
                # One shard of ten crossed the wire (and the job's control bodies).
                assert 2 * CHUNK <= job.bytes_on_wire < 2 * CHUNK + CONTROL_BYTES
                assert dst.read_text("checkpoints/r/LATEST") == f"step-{step}\n"
        assert first.state == "committed", first.error
        assert 20 * CHUNK <= first.bytes_on_wire < 20 * CHUNK + CONTROL_BYTES
        assert [n for n in dst.names("checkpoints/r") if not n.startswith(".")] == [
            "LATEST",
            "step-200",
            "step-300",
        ]
        for name, digest in shards.items():
            assert dst.blake3(f"checkpoints/r/step-300/{name}") == digest


class _Damaged:
    """A GET body's socket file that sends nothing more after `cut` bytes (a store dropping the
    connection), or flips one bit of the byte at `flip` (damage the store's checksum catches)."""

    def __init__(self, fp: Any, *, cut: int | None = None, flip: int | None = None) -> None:
        self.fp, self.cut, self.flip, self.at = fp, cut, flip, 0

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        if self.cut is not None:
            view = view[: max(0, self.cut - self.at)]
            if not len(view):
                return 0
        n = int(self.fp.readinto(view))
        if self.flip is not None and self.at <= self.flip < self.at + n:
            view[self.flip - self.at] ^= 0x10
        self.at += n
        return n

    def read(self, amt: int | None = None) -> bytes:
        buf = bytearray(amt if amt is not None else 1 << 20)
        return bytes(buf[: self.readinto(buf)])

    def __getattr__(self, name: str) -> Any:  # close, flush, fileno, ...: the socket file's
        return getattr(self.fp, name)


def _damage_gets(daemon: Any, damage: Any) -> list[str | None]:
    """Every GET of `daemon`'s store client goes through `damage(count, range, raw)`; the
    GETs' Range headers (None: a whole object) in the order they were made."""
    client = daemon.storage._client()
    assert client is not None
    ranges: list[str | None] = []

    def sent(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["test_range"] = params["headers"].get("Range")
        ranges.append(context["test_range"])

    def answered(http_response: Any, context: dict[str, Any], **_: Any) -> None:
        damage(len(ranges), context["test_range"], http_response.raw)

    client.meta.events.register("before-call.s3.GetObject", sent)
    client.meta.events.register("after-call.s3.GetObject", answered)
    return ranges


async def test_an_s3_source_whose_span_get_fails_fails_the_job_cleanly_and_it_retries(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """The window's GET drops its connection before any byte, then the span's own (ranged) GET
    the reader falls back to drops too: a transient StorageError fails the job's attempt (no
    traceback: before the fix the bare OSError ended the sender's loop and the job never
    ended), and the next attempt sends the object whole."""
    with sites(tmp_path, moto_s3, s3_bucket, "A") as (overrides, src, dst):
        digest = src.write("curated/x.bin", 300_000, seed=21)
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):

            def cut_first_two(count: int, _range: str | None, raw: Any) -> None:
                if count <= 2:
                    raw._fp.fp = _Damaged(raw._fp.fp, cut=0)

            ranges = _damage_gets(a, cut_first_two)
            ids = a.sender.submit("curated/x.bin", ["B"])
            [job] = await wait_for_jobs(a, ids, timeout_s=60)
        assert job.state == "committed", job.error
        assert job.attempts >= 1  # one attempt failed and was tried again
        assert ranges[0] is None
        assert ranges[1] is not None
        assert dst.blake3("curated/x.bin") == digest


async def test_an_s3_object_damaged_on_every_get_is_never_committed(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """A 200,000-byte object (one window, one piece) with one bit flipped in every GET body:
    its CRC-32 never matches, no span of it is read through an unchecked ranged GET, each
    attempt fails before the commit, and the third mismatch of that ETag fails the job for
    good, naming the checksums; nothing reaches the destination."""
    with sites(tmp_path, moto_s3, s3_bucket, "A") as (overrides, src, dst):
        src.write("curated/x.bin", 200_000, seed=22)
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):

            def flip(_count: int, _range: str | None, raw: Any) -> None:
                raw._fp.fp = _Damaged(raw._fp.fp, flip=123_456)

            ranges = _damage_gets(a, flip)
            ids = a.sender.submit("curated/x.bin", ["B"])
            [job] = await wait_for_jobs(a, ids, timeout_s=60)
        assert job.state == "failed"
        assert job.error_kind == "integrity", job.error
        assert "checksum" in (job.error or ""), job.error
        assert job.attempts == 2  # tried three times
        assert ranges == [None, None, None]  # whole-object GETs only, never a span's own
        assert not (tmp_path / "site-B/curated/x.bin").exists()
