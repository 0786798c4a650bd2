"""A misbehaving link between two daemons, crossed by both planes (control requests and the
data channels): bits flipped in chunk bodies, control bodies and replies, connections dropped
again and again, stalls, data channels black-holed, a peer that is gone for a while, extra
delay. Every corrupted body is refused (none accepted) and asked for again; every transfer
ends byte-exact without an operator, and nothing partial is ever visible at the receiver."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.faults.conftest import Tally
from tests.integration._data import file_blake3, write_random
from transferd.daemon import Daemon
from transferd.protocol.local_api import Job
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

CHUNK = 64 * 1024
FLAPS = "link flap, stall and drop cases"
FIGURE = FLAPS  # what a failure here counts against (conftest.tally)


def lay_out(root: Path, seed: int) -> dict[str, str]:
    """A file and a dataset folder at A; their blake3 by path."""
    rng = random.Random(seed)
    digests = {
        "approved/model.bin": write_random(root / "approved" / "model.bin", 24 * CHUNK + 7, seed)
    }
    for i in range(6):
        rel = f"curated/ds/part-{i}.bin"
        digests[rel] = write_random(root / rel, rng.randrange(1, 6 * CHUNK), seed + i + 1)
    return digests


def partial_files(root: Path) -> list[str]:
    """Anything at the receiver outside its state folder that is not a whole file we sent."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == (".transferd",):
            continue
        out += [str(rel_dir / f) for f in files if "transferd" in f]
    return out


async def send_all(a: Daemon, timeout_s: float = 120.0) -> list[Job]:
    """Both sends, until they end: a hang guard, generous for the retries' wall-clock backoff
    on a loaded machine (the corrupted-bodies case took over 60 s at load 15-18)."""
    ids = a.sender.submit("approved/model.bin", ["B"]) + a.sender.submit("curated/ds", ["B"])
    return await wait_for_jobs(a, ids, timeout_s=timeout_s)


def exact(b: Daemon, digests: dict[str, str]) -> bool:
    root = b.config.data_path
    return all((root / p).is_file() and file_blake3(root / p) == d for p, d in digests.items())


@asynccontextmanager
async def pair(tmp_path: Path, proxy: LinkProxy, seed: int) -> AsyncIterator[
    tuple[Daemon, Daemon, dict[str, str]]
]:
    digests = lay_out(tmp_path / "site-A", seed)
    async with loopback_pair(tmp_path, link=proxy, chunk_size=CHUNK, streams=2) as (a, b):
        yield a, b, digests


def _corruption_seeds(long: bool) -> list[int]:
    return list(range(20 if long else 1))


async def _corrupted_bodies(tmp_path: Path, seed: int, tally: Tally) -> None:
    proxy = LinkProxy(
        seed=seed,
        corrupt_requests={"chunk": 0.3, "control": 0.3},
        corrupt_first={"/commit": 1, "/have": 1, "/v1/uploads": 1},  # each kind at least once
    )
    async with pair(tmp_path, proxy, seed) as (a, b, digests):
        jobs = await send_all(a)
        ok = all(j.state == "committed" for j in jobs) and exact(b, digests)
    by_kind: dict[str, list[int | None]] = {"chunk": [], "control": []}
    for message in proxy.corrupted:
        by_kind[message.kind].append(message.status)
    accepted = {k: [s for s in v if s is not None and s < 300] for k, v in by_kind.items()}
    tally("corrupted chunk bodies", len(by_kind["chunk"]) - len(accepted["chunk"]),
          len(by_kind["chunk"]))
    tally("corrupted control bodies", len(by_kind["control"]) - len(accepted["control"]),
          len(by_kind["control"]))
    assert ok, [(j.path, j.state, j.error) for j in jobs]
    assert by_kind["chunk"]
    assert by_kind["control"]
    assert accepted == {"chunk": [], "control": []}
    # On the data channels each damaged body was answered by a DAMAGED receipt (422 here).
    assert set(by_kind["chunk"]) == {422}


@pytest.mark.parametrize("seed", _corruption_seeds(long=False))
async def test_corrupted_chunk_and_control_bodies_are_refused_and_sent_again(
    tmp_path: Path, seed: int, tally: Tally
) -> None:
    await _corrupted_bodies(tmp_path, seed, tally)


@pytest.mark.long
@pytest.mark.parametrize("seed", _corruption_seeds(long=True))
async def test_corrupted_bodies_long(tmp_path: Path, seed: int, tally: Tally) -> None:
    await _corrupted_bodies(tmp_path, 1000 + seed, tally)


async def test_corrupted_replies_are_asked_for_again(tmp_path: Path, tally: Tally) -> None:
    proxy = LinkProxy(seed=5, corrupt_replies=0.3)
    async with pair(tmp_path, proxy, 5) as (a, b, digests):
        jobs = await send_all(a)
        ok = all(j.state == "committed" for j in jobs) and exact(b, digests)
    tally(FLAPS, ok and proxy.corrupted_replies > 0)
    assert proxy.corrupted_replies > 0
    assert ok, [(j.path, j.state, j.error) for j in jobs]
    assert sum(j.retries for j in jobs) >= 1


async def _flapping(
    tmp_path: Path, tally: Tally, every_bytes: int, seed: int, timeout_s: float = 60.0
) -> None:
    """Every connection dropped each time another `every_bytes` crossed the link (so drops
    land mid-transfer, whatever the machine's speed): the jobs finish by themselves, and they
    count every body byte they put on the wire, the re-sent ones too (never fewer than the link
    carried), and report the retries."""
    proxy = LinkProxy(seed=seed, rate_bytes_per_s=4e6, follow=True)
    async with pair(tmp_path, proxy, seed) as (a, b, digests):

        async def flap() -> None:
            last = 0
            while True:
                await asyncio.sleep(0.005)
                if proxy.bytes_up - last >= every_bytes:
                    last = proxy.bytes_up
                    proxy.drop()

        flapper = asyncio.create_task(flap())
        try:
            jobs = await send_all(a, timeout_s)
        finally:
            flapper.cancel()
        ok = all(j.state == "committed" for j in jobs) and exact(b, digests)
        clean = partial_files(b.config.data_path) == []
    carried = proxy.body_bytes.get("chunk", 0) + proxy.body_bytes.get("control", 0)
    counted = sum(j.bytes_on_wire for j in jobs)
    logical = sum(j.bytes_logical for j in jobs)
    retries = sum(j.retries for j in jobs)
    tally(FLAPS, ok and clean and proxy.drops > 0 and counted >= carried and retries > 0)
    assert proxy.drops > 0
    assert ok, [(j.path, j.state, j.error) for j in jobs]
    assert clean
    assert counted >= carried > logical  # re-sent bodies crossed, and are counted
    assert retries >= 1


async def test_connections_dropped_every_500_kb(tmp_path: Path, tally: Tally) -> None:
    await _flapping(tmp_path, tally, 500_000, seed=1)


@pytest.mark.long
# Not below 300 kB. At 50 kB no 64 KiB chunk body crosses between two drops, whatever the
# sender does. On the data channels each drop breaks every channel (their chunks go again on new
# ones) and the control connection; at 200 kB the jobs took 18-110 s over five runs (a control
# request dropped again and again backs off, and the chunks wait for its have/want answer) and,
# after the data plane's second round, did not finish in 120 s in two runs out of two (README:
# a known limit); at 300 kB about 20 s.
@pytest.mark.parametrize("every_kb", [300, 500, 1000, 1500])  # the jobs carry ~2.5 MB
async def test_connections_dropped_long(tmp_path: Path, tally: Tally, every_kb: int) -> None:
    await _flapping(tmp_path, tally, every_kb * 1000, seed=every_kb, timeout_s=120)


async def test_a_stall_and_a_peer_gone_for_a_while_are_ridden_through(
    tmp_path: Path, tally: Tally
) -> None:
    proxy = LinkProxy(seed=3, rate_bytes_per_s=10e6, delay_s=0.01)
    async with pair(tmp_path, proxy, 3) as (a, b, digests):

        async def misbehave() -> None:
            await asyncio.sleep(0.1)
            proxy.stall()
            await asyncio.sleep(1.0)
            proxy.resume()
            await asyncio.sleep(0.1)
            proxy.down()
            await asyncio.sleep(1.0)
            proxy.up()

        faults = asyncio.create_task(misbehave())
        jobs = await send_all(a)
        await faults
        ok = all(j.state == "committed" for j in jobs) and exact(b, digests)
    tally(FLAPS, ok)
    assert ok, [(j.path, j.state, j.error) for j in jobs]
    assert sum(j.retries for j in jobs) >= 1


async def test_black_holed_data_channels_are_broken_and_their_chunks_sent_again(
    tmp_path: Path, tally: Tally
) -> None:
    """The data channels in use stop moving for good without a reset (a middlebox lost their
    state): the sender notices nothing moved for its stall limit, breaks them and sends their
    chunks again on new channels, and counts those sends."""
    proxy = LinkProxy(seed=4, rate_bytes_per_s=4e6, follow=True)
    async with pair(tmp_path, proxy, 4) as (a, b, digests):
        a.channels["B"].stall_s = 1.0

        async def hole() -> None:
            while True:
                await asyncio.sleep(0.005)
                if proxy.body_bytes.get("chunk", 0) >= 200_000:
                    proxy.black_hole()
                    return

        holed = asyncio.create_task(hole())
        jobs = await send_all(a)
        await holed
        ok = all(j.state == "committed" for j in jobs) and exact(b, digests)
        resent = a.metrics.registry.get_sample_value(
            "transferd_chunks_resent_total", {"peer": "B"}
        ) or 0
        opened = a.channels["B"].opened
    carried = proxy.body_bytes.get("chunk", 0) + proxy.body_bytes.get("control", 0)
    counted = sum(j.bytes_on_wire for j in jobs)
    tally(FLAPS, ok and resent > 0 and counted >= carried)
    assert ok, [(j.path, j.state, j.error) for j in jobs]
    assert resent > 0
    assert opened > 2  # the black-holed ones were replaced
    assert counted >= carried
    assert sum(j.retries for j in jobs) >= 1
