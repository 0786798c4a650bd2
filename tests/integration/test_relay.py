"""Relayed transfers between three real daemons on 127.0.0.1 (A -> R -> B): bytes equal at B,
nothing kept at R, resume and delta end to end, relays only where configured, and residency
refused at the first hop outside it before any byte is written there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netplan.plan import TrafficClass
from tests.integration._data import file_blake3, write_random
from tests.integration._procs import env, metric, poll_until, start_daemon, wait_until_serving
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.net import channels
from transferd.net import routes as routes_module
from transferd.net import sender as sender_module
from transferd.site.state_lock import LOCK_NAME
from transferd.testing import (
    bound_socket,
    free_port,
    loopback_sites,
    running_daemon,
    wait_for_jobs,
    write_site_configs,
)

CHUNK = 256 * 1024
RELAY = {"relay": {"for_peers": ["A"], "destinations": ["B"]}}


def _held_at(site: Path) -> list[Path]:
    """Files a site holds outside its journal (and its daemon's lock): data, staging, relay
    spill."""
    return [
        p for p in site.rglob("*")
        if p.is_file() and not p.name.startswith("journal.sqlite") and p.name != LOCK_NAME
    ]


def _relayed_bytes(d: Daemon, peer: str) -> float:
    return d.metrics.value("transferd_bytes_received_total", peer=peer)


async def _refused(a: Daemon, path: str, via: str, reason: str) -> str:
    """`path` sent from `a` to B through `via` fails as a policy error naming `reason`; the
    job's id."""
    [job_id] = a.sender.submit(path, ["B"], via=[via])
    [job] = await wait_for_jobs(a, [job_id])
    assert job.state == "failed"
    assert job.error_kind == "policy"
    assert reason in (job.error or "")
    return job_id


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
        assert upload is not None
        assert upload.source == "A"
        status = a.status()
        [routes] = [j.route_status for j in status.jobs if j.id == job_id]
        assert [(rt.route, rt.state, rt.chunks) for rt in routes] == [("R>B", "done", 10)]
        # Resume/delta end to end: the same file again moves no chunk, through R or to R.
        before = _relayed_bytes(r, "A")
        [again] = a.sender.submit("curated/corpus/part-0.bin", ["B"], via=["R"])
        [job2] = await wait_for_jobs(a, [again])
        assert job2.state == "committed", job2.error
        assert job2.chunks_sent == 0
        assert job2.chunks_skipped == 10
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
        await _refused(s["A"], "curated/x.bin", "R", "relay R does not relay for A")
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
        job_id = await _refused(a, "curated/eu-corpus", "R",
                                "relay R is in region us, outside the data's residency [eu]")
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
            assert job.state == "failed"
            assert job.error_kind == "policy"
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


SO_MAX_PACING_RATE = 47  # linux/socket.h; Python's socket module does not name it
PACING_BYTES_PER_S = 12_500_000  # 100 Mbit/s per data channel (TCP's own pacing)


def _paced_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process daemons' data channels send at 100 Mbit/s each: on loopback a chunk is
    otherwise on the wire for a millisecond, and a kill would never find one half-way."""
    tune = channels._tune

    def paced(sock: socket.socket, cc: Any) -> str:
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, PACING_BYTES_PER_S)
        return tune(sock, cc)

    monkeypatch.setattr(channels, "_tune", paced)


@dataclass
class _RelayRun:
    """A and B in this process, R's daemon a process of its own (to kill, stop or restart),
    and A's job of `n_chunks` on its way to B through R."""

    a: Daemon
    b: Daemon
    r_proc: subprocess.Popen[bytes]
    job_id: str
    digest: str
    size: int
    r_config: Path
    r_url: str

    def relayed(self) -> float:
        return self.b.metrics.value("transferd_chunks_received_total", peer="R")

    async def until_relayed(self, n: float) -> None:
        async def via_r() -> float:
            return self.relayed()

        await poll_until(via_r, lambda got: got >= n, timeout_s=30, every_s=0.02)


@contextlib.asynccontextmanager
async def _relaying(tmp_path: Path, n_chunks: int, chunk: int, seed: int,
                    **config: Any) -> AsyncIterator[_RelayRun]:
    src = tmp_path / "site-A" / "approved" / "m.bin"
    digest = write_random(src, n_chunks * chunk, seed=seed)
    socks = {"A": bound_socket(), "B": bound_socket()}
    ports = {**{s: k.getsockname()[1] for s, k in socks.items()}, "R": free_port()}
    configs = write_site_configs(
        tmp_path, ports, chunk_size=chunk, compression="off", streams=2,
        traffic={"adaptive_streams": False}, R=RELAY, **config,
    )  # fmt: skip
    r_url = f"http://127.0.0.1:{ports['R']}"
    run = None
    r_proc = start_daemon(configs["R"], tmp_path / "R.log")
    try:
        await wait_until_serving(r_url)
        async with contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(
                running_daemon(load_config(configs["B"]), socks["B"])
            )
            a = await stack.enter_async_context(
                running_daemon(load_config(configs["A"]), socks["A"])
            )
            [job_id] = a.sender.submit("approved/m.bin", ["B"], via=["R"])
            run = _RelayRun(a, b, r_proc, job_id, digest, n_chunks * chunk, configs["R"], r_url)
            yield run
    finally:
        r_proc = run.r_proc if run is not None else r_proc
        if r_proc.poll() is None:
            r_proc.send_signal(signal.SIGCONT)
            r_proc.kill()
        r_proc.wait(timeout=20)
    assert file_blake3(tmp_path / "site-B" / "approved" / "m.bin") == digest


@pytest.mark.parametrize("how", ["killed", "hung"])
async def test_relay_lost_mid_transfer_falls_back_to_direct_resending_one_chunk_per_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    """R's daemon (a process of its own) is SIGKILLed, or SIGSTOPped (hung: its sockets stay
    open and nothing fails), while A's channels to it are half-way through chunks. A notices
    (a kill: its channels and requests to R fail; a hang: no receipt from the route for longer
    than its measured rate allows, not the 30 s stall detection), moves the job to the direct
    path, and B's have/want answer keeps what R had already passed on from being sent again:
    at most the chunk each channel was carrying goes twice."""
    _paced_channels(monkeypatch)
    n_chunks, chunk = 48, 1 << 20
    async with _relaying(tmp_path, n_chunks, chunk, seed=21) as run:
        a, b = run.a, run.b
        await run.until_relayed(n_chunks / 3)
        # Half a chunk's time later: both of A's channels are mid-chunk.
        await asyncio.sleep(chunk / PACING_BYTES_PER_S / 2)
        lost_at = time.monotonic()
        if how == "killed":
            run.r_proc.kill()
            await asyncio.to_thread(run.r_proc.wait, 20)
        else:
            run.r_proc.send_signal(signal.SIGSTOP)
        [job] = await wait_for_jobs(a, [run.job_id], timeout_s=60)
        assert job.state == "committed", job.error
        relayed = run.relayed()
        direct = b.metrics.value("transferd_chunks_received_total", peer="A")
        routes = {rt.route: rt for rt in a.sender.routes.status(run.job_id)}
        resent_bytes = job.bytes_on_wire - run.size
        resent = sum(rt.chunks_resent for rt in routes.values())
        print(f"R {how}: committed {time.monotonic() - lost_at:.1f} s later; via R "
              f"{relayed:.0f}, direct {direct:.0f}, re-sent {resent} chunks, on wire beyond "
              f"the file {resent_bytes / chunk:.2f} chunks, routes {routes}")
        assert routes["R>B"].state == "down"
        assert routes["B"].state == "done"
        assert relayed + direct >= n_chunks
        if how == "hung":
            # Noticed by the route's receipt timeout, not by the channels' stall detection.
            assert "no receipt for" in (routes["R>B"].error or "")
        # Sent twice (A's own count): at most the one chunk each of A's 2 channels to R was
        # carrying (a relayed chunk goes alone on its channel, and R passes its bytes on as
        # they arrive); B's have/want keeps everything else from going again. The bytes on
        # the wire agree (plus control bodies).
        assert resent <= 2
        assert resent_bytes <= resent * chunk + 256 * 1024


async def test_multipath_splits_chunks_over_both_routes(tmp_path: Path) -> None:
    """The relayed path and the direct one at once: each route carries chunks (on loopback
    both are fast), every chunk is acknowledged once by one of them, and B has every byte."""
    n_chunks = 40
    src = tmp_path / "site-A" / "approved" / "mp.bin"
    digest = write_random(src, n_chunks * CHUNK, seed=31)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, b = s["A"], s["B"]
        [job_id] = a.sender.submit("approved/mp.bin", ["B"], via=["R"], multipath=True)
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        assert [(r.via, r.share) for r in job.routes] == [(["R"], 0.5), ([], 0.5)]
        routes = {rt.route: rt for rt in a.sender.routes.status(job_id)}
        assert set(routes) == {"R>B", "B"}
        assert routes["R>B"].chunks + routes["B"].chunks == n_chunks
        assert routes["R>B"].chunks > 0
        assert routes["B"].chunks > 0
        assert b.metrics.value("transferd_chunks_received_total", peer="R") == routes["R>B"].chunks
    assert file_blake3(tmp_path / "site-B" / "approved" / "mp.bin") == digest


async def test_a_chunk_damaged_at_the_relay_is_refused_by_b_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R passes bytes on as they arrive, unchecked: a byte R alters on the way is caught by B's
    blake3 check before anything is written (a DAMAGED receipt, back through R to A), and A
    sends that chunk again; the file at B is the source's."""
    src = tmp_path / "site-A" / "approved" / "d.bin"
    digest = write_random(src, 6 * CHUNK, seed=41)
    grow = channels.ArrivingBody.grow
    damaged: list[int] = []

    def damaging(body: channels.ArrivingBody, n: int) -> None:
        if not damaged:  # the first part of the first chunk R passes on
            body.view[body.filled] ^= 0xFF
            damaged.append(n)
        grow(body, n)

    monkeypatch.setattr(channels.ArrivingBody, "grow", damaging)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, b = s["A"], s["B"]
        [job_id] = a.sender.submit("approved/d.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        assert damaged
        assert job.integrity_failures == 1
        assert b.metrics.value("transferd_integrity_failures_total", peer="R",
                               side="receiver") == 1
        [route] = a.sender.routes.status(job_id)
        assert (route.route, route.chunks, route.chunks_resent) == ("R>B", 6, 1)
    assert file_blake3(tmp_path / "site-B" / "approved" / "d.bin") == digest


RELAY_TOPOLOGY = """\
name: relay-plan
sites:
  - {id: A, kind: onprem, region: eu}
  - {id: R, kind: cloud, region: eu}
  - {id: B, kind: cloud, region: eu}
links:
  - {between: [A, B], bandwidth_gbps: 0.02, rtt_ms: 80, loss_pct: 1}
  - {between: [A, R], bandwidth_gbps: 10, rtt_ms: 2}
  - {between: [R, B], bandwidth_gbps: 10, rtt_ms: 2}
datasets:
  - {id: corpus, site: A, size_gb: 500, tier: approved}
sync_rules:
  - {id: nightly, datasets: [corpus], to: [B]}
"""


async def test_a_plan_that_routes_a_sync_via_r_is_carried_out_through_r(tmp_path: Path) -> None:
    """`netplan plan` on a topology whose direct link is slow and lossy routes the nightly sync
    through R; three daemons serving that plan (`serve --plan`, no `send`) move the dataset to
    B through R: R's relay counters hold every chunk, B took none from A directly."""
    topo = tmp_path / "topology.yaml"
    topo.write_text(RELAY_TOPOLOGY)
    plan_path = tmp_path / "plan.json"
    planner = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "netplan", "plan", str(topo), "-o",
                         str(plan_path)], env=env(), capture_output=True, text=True, timeout=60)
    assert planner.returncode == 0, planner.stderr
    plan = json.loads(plan_path.read_text())
    [entry] = next(s for s in plan["sites"] if s["site"] == "A")["sync"]
    assert (entry["path_prefix"], entry["destination"], entry["via"]) == (
        "approved/corpus/", "B", ["R"])  # the planner's choice, read from the plan

    n_chunks = 6
    src = tmp_path / "site-A" / "approved" / "corpus" / "part-0.bin"
    digest = write_random(src, n_chunks * CHUNK, seed=51)
    ports = {site: free_port() for site in ("A", "R", "B")}
    configs = write_site_configs(
        tmp_path, ports, chunk_size=CHUNK, compression="off",
        watch={"poll_interval_s": 0.1, "quiet_period_s": 0.5}, R=RELAY,
    )  # fmt: skip
    procs = [start_daemon(configs[site], tmp_path / f"{site}.log", "--plan", str(plan_path))
             for site in ("B", "R", "A")]
    try:
        for site in ("B", "R", "A"):
            await wait_until_serving(f"http://127.0.0.1:{ports[site]}")
        got = tmp_path / "site-B" / "approved" / "corpus" / "part-0.bin"

        async def arrived() -> bool:
            return got.exists() and file_blake3(got) == digest

        await poll_until(arrived, bool, timeout_s=60, every_s=0.1)
        url = {site: f"http://127.0.0.1:{port}" for site, port in ports.items()}
        assert await metric(url["R"], "transferd_relayed_chunks_total", source="A",
                            next_hop="B") == n_chunks
        assert await metric(url["R"], "transferd_relayed_bytes_total", source="A",
                            next_hop="B") == n_chunks * CHUNK
        assert await metric(url["B"], "transferd_chunks_received_total", peer="R") == n_chunks
        assert not await metric(url["B"], "transferd_chunks_received_total", peer="A")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
    assert _held_at(tmp_path / "site-R") == []


async def test_relay_restarted_mid_transfer_the_job_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R's daemon is killed and started again at once (a supervisor's restart) while it relays:
    R's table of relayed uploads is in its journal, so the job goes on through R (no fallback)
    and ends committed with B's bytes equal to the source's, re-sending at most the chunk each
    channel was carrying. (Before the table was kept, R refused the chunks as an unknown upload
    and the job failed.)

    The restart is a new Python process: on a loaded machine it takes longer than the
    3 s a relay route keeps retrying before the job moves on (RELAY_RETRY_BUDGET_S), and the
    job then finished on the direct path (seen at load 13). The test is about R's table, not
    about how long a supervisor takes, so A waits for R as for a direct peer here."""
    _paced_channels(monkeypatch)
    monkeypatch.setattr(sender_module, "RELAY_RETRY_BUDGET_S", 120.0)
    monkeypatch.setattr(routes_module, "RECEIPT_FLOOR_S", 120.0)
    n_chunks, chunk = 32, 1 << 20
    # R's data port fixed: its peers find it where it was after the restart.
    async with _relaying(tmp_path, n_chunks, chunk, seed=61,
                         data_ports={"R": free_port()}) as run:
        await run.until_relayed(n_chunks / 4)
        run.r_proc.kill()
        await asyncio.to_thread(run.r_proc.wait, 20)
        run.r_proc = start_daemon(run.r_config, tmp_path / "R.log")
        await wait_until_serving(run.r_url)
        [job] = await wait_for_jobs(run.a, [run.job_id], timeout_s=120)
        routes = {rt.route: rt for rt in run.a.sender.routes.status(run.job_id)}
        print(job.state, job.error, routes)
        assert job.state == "committed", job.error
        assert list(routes) == ["R>B"]
        assert (routes["R>B"].state, routes["R>B"].chunks) == ("done", n_chunks)
        assert routes["R>B"].chunks_resent <= 2
        assert run.relayed() >= n_chunks


async def test_destination_takes_a_sources_uploads_only_through_the_relays_it_names(
    tmp_path: Path,
) -> None:
    """B's `relay.accept_via: {A: [R]}`: A's upload through R lands; the same through S (a relay
    willing to pass it on) is refused at B's opening, before anything is staged, counted, and
    A's job names B and S."""
    write_random(tmp_path / "site-A" / "approved" / "x.bin", 3 * CHUNK, seed=71)
    relay = {"relay": {"for_peers": ["A"], "destinations": ["B"]}}
    async with loopback_sites(
        tmp_path, ("A", "R", "S", "B"), chunk_size=CHUNK, R=relay, S=relay,
        B={"relay": {"accept_via": {"A": ["R"]}}},
    ) as s:
        a, b = s["A"], s["B"]
        via_s = await _refused(a, "approved/x.bin", "S",
                               "B does not accept A's uploads through S (relay.accept_via)")
        assert b.metrics.value("transferd_policy_refusals_total", side="receiver") == 1
        assert b.journal.upload(f"A-{via_s}") is None
        [via_r] = a.sender.submit("approved/x.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [via_r])
        assert job.state == "committed", job.error
        assert s["R"].metrics.value("transferd_relayed_chunks_total", source="A",
                                    next_hop="B") == 3
    assert _held_at(tmp_path / "site-S") == []


@pytest.mark.parametrize(
    ("path", "claimed", "at_r"),
    [
        ("checkpoints/run/ck.bin", TrafficClass.CHECKPOINT, "checkpoint"),
        ("approved/ck.bin", TrafficClass.SYNC, "sync"),
        # A dataset's job asking for the checkpoint class (3x sync's weight at R) is not
        # given a larger share of R's links than its data is due.
        ("approved/ck.bin", TrafficClass.CHECKPOINT, "sync"),
    ],
)
async def test_relay_passes_chunks_on_through_its_own_scheduler_in_the_jobs_class(
    tmp_path: Path, path: str, claimed: TrafficClass, at_r: str,
) -> None:
    """What R passes on goes through R's own gate toward B in the job's traffic class (its
    weights, its rate caps, its stream controller): R counts every relayed byte B acknowledged
    under that class. The class is the sender's only as far as the path's own rule allows."""
    n_chunks = 5
    write_random(tmp_path / "site-A" / path, n_chunks * CHUNK, seed=81)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, r = s["A"], s["R"]
        [job_id] = a.sender.submit(path, ["B"], claimed, via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        other = "sync" if at_r == "checkpoint" else "checkpoint"
        assert r.metrics.value("transferd_class_bytes_acked_total", peer="B",
                               **{"class": at_r}) == n_chunks * CHUNK
        assert not r.metrics.value("transferd_class_bytes_acked_total", peer="B",
                                   **{"class": other})


async def test_chunks_beyond_the_relays_memory_pass_through_its_spill_files(
    tmp_path: Path,
) -> None:
    """R's memory window holds one 1 MiB chunk: the chunk arriving beside it on A's other
    channel is received into a spill file and passed on from there. The bytes at B are the
    source's and R holds nothing afterwards, on disk or in memory."""
    n_chunks, chunk = 12, 1 << 20
    digest = write_random(tmp_path / "site-A" / "approved" / "sp.bin", n_chunks * chunk, seed=91)
    small = {"relay": {**RELAY["relay"], "memory_mib": 1, "spill_mib": 64}}
    async with loopback_sites(tmp_path, chunk_size=chunk, compression="off", streams=2,
                              traffic={"adaptive_streams": False}, R=small) as s:
        a, r = s["A"], s["R"]
        [job_id] = a.sender.submit("approved/sp.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        window = r.relay.window
        assert window.spills > 0
        assert window.peak_memory <= chunk
        assert (window.in_memory, window.spilled) == (0, 0)
    assert file_blake3(tmp_path / "site-B" / "approved" / "sp.bin") == digest
    assert _held_at(tmp_path / "site-R") == []


async def test_an_older_destination_behind_a_relay_is_opened_bare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B runs a release before `OpenRequest` (it refuses an open's `offer` as an unknown
    field, 400): the relay passes the refusal back, A opens again bare through R with the
    offer asked on its own, and the file lands."""
    from transferd.errors import ProtocolError
    from transferd.protocol.manifest import OpenRequest

    src = tmp_path / "site-A" / "curated" / "old.bin"
    digest = write_random(src, 3 * CHUNK, seed=11)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, b = s["A"], s["B"]
        real_open = b.inbound.open
        refusals: list[str] = []

        async def old_open(request, peer):  # type: ignore[no-untyped-def]
            if isinstance(request, OpenRequest) and request.offered:
                refusals.append(peer)
                raise ProtocolError("invalid UploadIntent: offer: Extra inputs are not permitted")
            return await real_open(request, peer)

        monkeypatch.setattr(b.inbound, "open", old_open)
        [job_id] = a.sender.submit("curated/old.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        assert refusals == ["R"]  # R passed the offer on; B refused it once
        assert [peer for peer, _path in a.sender.bare_opens] == ["R"]  # later jobs: bare
    assert file_blake3(tmp_path / "site-B" / "curated" / "old.bin") == digest


async def test_a_source_side_error_retries_the_job_without_marking_its_relay_route_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient error of the job's source (as an object store's unchecked read raises from
    `changed()`) says nothing about the route: the job is tried again on the same relayed
    route, which is never marked down (it was, for 60 s, and the retry went direct)."""
    from transferd.errors import IntegrityError
    from transferd.site.source import SourceFile

    src = tmp_path / "site-A" / "curated" / "s.bin"
    digest = write_random(src, 3 * CHUNK, seed=41)
    real = SourceFile.changed
    raised: list[bool] = []

    def changed_once(self: SourceFile) -> bool:
        if not raised:
            raised.append(True)
            raise IntegrityError("a GET failed after part of its bytes were read",
                                 transient=True, path=self.path, side="source")
        return real(self)

    monkeypatch.setattr(SourceFile, "changed", changed_once)
    async with loopback_sites(tmp_path, chunk_size=CHUNK, compression="off", R=RELAY) as s:
        a, b = s["A"], s["B"]
        [job_id] = a.sender.submit("curated/s.bin", ["B"], via=["R"])
        [job] = await wait_for_jobs(a, [job_id])
        assert job.state == "committed", job.error
        assert raised
        assert job.attempts == 1
        assert not a.sender.routes.is_down("B", ["R"])
        assert [(rt.route, rt.state) for rt in a.sender.routes.status(job_id)] == [("R>B", "done")]
        assert _relayed_bytes(b, "A") == 0  # nothing went direct
    assert file_blake3(tmp_path / "site-B" / "curated" / "s.bin") == digest
