"""Relayed transfers between three real daemons on 127.0.0.1 (A -> R -> B): bytes equal at B,
nothing kept at R, resume and delta end to end, relays only where configured, and residency
refused at the first hop outside it before any byte is written there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration._data import file_blake3, write_random
from transferd.daemon import Daemon
from transferd.testing import loopback_sites, wait_for_jobs

CHUNK = 256 * 1024
RELAY = {"relay": {"for_peers": ["A"], "destinations": ["B"]}}


def _held_at(site: Path) -> list[Path]:
    """Files a site holds outside its journal: data, staging, relay spill."""
    return [
        p for p in site.rglob("*")
        if p.is_file() and not p.name.startswith("journal.sqlite")
    ]


def _relayed_bytes(d: Daemon, peer: str) -> float:
    return d.metrics.value("transferd_bytes_received_total", peer=peer)


async def test_relayed_file_lands_identical_and_relay_keeps_nothing(tmp_path: Path) -> None:
    src = tmp_path / "site-A" / "curated" / "corpus" / "part-0.bin"
    digest = write_random(src, 9 * CHUNK + 777, seed=3)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, r, b = s["A"], s["R"], s["B"]
        [job_id] = a.sender.submit("curated/corpus/part-0.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        assert [rt.via for rt in job.routes] == [["R"]]
        # Every chunk went A -> R -> B: R received all, B received all from R, none from A.
        assert _relayed_bytes(r, "A") >= src.stat().st_size
        assert _relayed_bytes(b, "R") >= src.stat().st_size
        assert _relayed_bytes(b, "A") == 0
        # B recorded the upload under its source, A, and verified A's signature.
        upload = b.journal.upload(f"A-{job_id}")
        assert upload is not None and upload.source == "A"
        status = a.status()
        [routes] = [j.route_status for j in status.jobs if j.id == job_id]
        assert [(rt.route, rt.state, rt.chunks) for rt in routes] == [("R>B", "done", 10)]
        # Resume/delta end to end: the same file again moves no chunk, through R or to R.
        before = _relayed_bytes(r, "A")
        [again] = a.sender.submit("curated/corpus/part-0.bin", ["B"], via=["R"])
        [job2] = await wait_for_jobs(a, [again])
        assert job2.state == "committed", job2.error
        assert job2.chunks_sent == 0 and job2.chunks_skipped == 10
        assert _relayed_bytes(r, "A") == before
    assert file_blake3(tmp_path / "site-B" / "curated" / "corpus" / "part-0.bin") == digest
    assert _held_at(tmp_path / "site-R") == []


async def test_relay_refuses_peers_and_destinations_it_is_not_configured_for(
    tmp_path: Path,
) -> None:
    write_random(tmp_path / "site-A" / "curated" / "x.bin", 2 * CHUNK, seed=5)
    relay_for_c_only = {"relay": {"for_peers": ["C"], "destinations": ["B"]}}
    async with loopback_sites(
        tmp_path, ("A", "R", "B", "C"), chunk_size=CHUNK, R=relay_for_c_only
    ) as s:
        [job_id] = s["A"].sender.submit("curated/x.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(s["A"], [job_id])
        assert job.state == "failed" and job.error_kind == "policy"
        assert "relay R does not relay for A" in (job.error or "")
        assert s["R"].metrics.value("transferd_policy_refusals_total", side="relay") == 1
    assert not (tmp_path / "site-B" / "curated" / "x.bin").exists()
    assert _held_at(tmp_path / "site-R") == []


def _regions(**by_site: str) -> dict[str, Any]:
    return {site: {"region": region} for site, region in by_site.items()}


async def test_residency_refused_at_the_relay_outside_it_before_any_byte(
    tmp_path: Path,
) -> None:
    """An eu-only dataset sent through a relay in us: R refuses at open (nothing held there,
    nothing at B), counts it, and A's job names the hop that refused."""
    write_random(tmp_path / "site-A" / "curated" / "eu-corpus" / "p.bin", 4 * CHUNK, seed=6)
    overrides: dict[str, Any] = {
        "A": {"region": "eu", "residency": {"curated/eu-corpus": ["eu"]}},
        "R": {"region": "us", **RELAY},
        "B": {"region": "eu"},
    }
    async with loopback_sites(tmp_path, chunk_size=CHUNK, **overrides) as s:
        a, r, b = s["A"], s["R"], s["B"]
        [job_id] = a.sender.submit("curated/eu-corpus", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "failed" and job.error_kind == "policy"
        assert "relay R is in region us, outside the data's residency [eu]" in (job.error or "")
        assert r.metrics.value("transferd_policy_refusals_total", side="relay") == 1
        assert _relayed_bytes(r, "A") == 0
        assert b.journal.upload(f"A-{job_id}") is None
    assert _held_at(tmp_path / "site-R") == []
    assert not (tmp_path / "site-B" / "curated").exists()


async def test_residency_refused_at_a_destination_outside_it(tmp_path: Path) -> None:
    write_random(tmp_path / "site-A" / "curated" / "eu-corpus" / "p.bin", 4 * CHUNK, seed=7)
    overrides: dict[str, Any] = {
        "A": {"region": "eu", "residency": {"curated/eu-corpus": ["eu"]}},
        "R": {"region": "eu", **RELAY},
        "B": {"region": "us"},
    }
    async with loopback_sites(tmp_path, chunk_size=CHUNK, **overrides) as s:
        a, b = s["A"], s["B"]
        ids = a.sender.submit("curated/eu-corpus", ["B"], via=["R"])
        ids += a.sender.submit("curated/eu-corpus", ["B"])
        jobs = await wait_for_jobs(a, ids)
        for job in jobs:
            assert job.state == "failed" and job.error_kind == "policy"
            assert "destination B is in region us, outside the data's residency [eu]" in (
                job.error or ""
            )
        assert b.metrics.value("transferd_policy_refusals_total", side="receiver") == 2
    staging = tmp_path / "site-B" / ".transferd" / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert not (tmp_path / "site-B" / "curated").exists()
    assert _held_at(tmp_path / "site-R") == []


@pytest.mark.parametrize("residency", [["eu"], []])
async def test_data_inside_its_residency_goes_through(tmp_path: Path, residency: list[str]) -> None:
    digest = write_random(tmp_path / "site-A" / "curated" / "eu" / "p.bin", 3 * CHUNK, seed=8)
    overrides: dict[str, Any] = {
        "A": {"region": "eu", "residency": {"curated/eu": residency}},
        "R": {"region": "eu", **RELAY},
        "B": {"region": "eu"},
    }
    async with loopback_sites(tmp_path, chunk_size=CHUNK, **overrides) as s:
        [job_id] = s["A"].sender.submit("curated/eu", ["B"], via=["R"])
        [job] = await wait_for_jobs(s["A"], [job_id])
        assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B" / "curated" / "eu" / "p.bin") == digest
