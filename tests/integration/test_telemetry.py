"""Link telemetry between two real daemons on 127.0.0.1: a paced link (LinkProxy) carries a
replication, and the sender's `/v1/telemetry` (signed, through the CLI's client) and its
`/metrics` report the goodput the link allowed, the data connections' RTT and the control
plane's round trips; `netplan calibrate`'s readers get the same from the URL and the config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from netplan import collect
from netplan.telemetry import SERIES, TelemetryReport
from tests.integration._data import write_random
from transferd.config import load_config
from transferd.net.local_client import LocalClient, LocalRequest
from transferd.protocol.auth import local_signer
from transferd.protocol.wire import TELEMETRY_ROUTE
from transferd.site.keys import LocalSecret
from transferd.testing import LinkProxy, loopback_pair, wait_for_jobs

RATE = 12e6  # bytes/s the proxy lets through each of A's data channels to B
CHUNK = 1 << 20


async def test_telemetry_reports_the_paced_links_goodput_rtt_and_control_rtt(
    tmp_path: Path,
) -> None:
    write_random(tmp_path / "site-A" / "curated" / "big.bin", 36 * CHUNK, seed=3)
    proxy = LinkProxy(rate_bytes_per_s=RATE)
    async with loopback_pair(tmp_path, proxy=proxy, chunk_size=CHUNK) as (a, _b):
        a.sample_s, a.control_probe_s = 0.2, 0.1
        a.link_telemetry.sustain_s = 1.0
        await asyncio.sleep(1.2)  # the sampler's first (1 s) tick is its baseline
        [job_id] = a.sender.submit("curated/big.bin", ["B"])
        # A hang guard: 36 MiB through the in-process proxy took over 60 s at load 17-20.
        [job] = await wait_for_jobs(a, [job_id], timeout_s=180)
        assert job.state == "committed", job.error
        await asyncio.sleep(0.5)  # one more sample after the last receipt
        config = load_config(tmp_path / "site-A.yaml")
        client = LocalClient(a.url, local_signer(LocalSecret.load(config.keys_path, "A")))
        try:
            report = await client.acall(LocalRequest("GET", TELEMETRY_ROUTE, TelemetryReport))
        finally:
            client.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(a.url + "/metrics") as r:
                exposition = await r.text()
            async with session.get(a.url + TELEMETRY_ROUTE) as unsigned:
                assert unsigned.status == 401  # the local API's signature, as for status
        # What `netplan calibrate --from` reads: the daemon's URL (/metrics) and its site
        # config (through `transferd telemetry --json`, the signed local API).
        [by_url] = await asyncio.to_thread(collect.from_source, a.url)
        [by_config] = await asyncio.to_thread(collect.from_source, str(tmp_path / "site-A.yaml"))
    [link] = report.links
    assert (report.site, link.site, link.peer) == ("A", "A", "B")
    assert link.samples >= 5, link
    assert link.first_at is not None
    assert link.last_at is not None
    assert link.last_at - link.first_at >= 1.0
    # The proxy paces each of A's data channels: the best second is at least the job's average
    # rate and near the pace, far from loopback speed (the netns test checks it against iperf3).
    assert link.best_goodput_bytes_per_s is not None
    assert job.finished_at is not None
    assert job.started_at is not None
    job_rate = job.bytes_logical / (job.finished_at - job.started_at)
    assert 0.9 * job_rate <= link.best_goodput_bytes_per_s <= 4 * RATE, (job_rate, link)
    assert link.rtt_ms is not None
    assert 0 < link.rtt_ms < 50
    assert link.srtt_ms is not None
    assert link.srtt_ms >= link.rtt_ms
    assert link.data_segments_out > 0
    assert link.control_samples >= 3
    assert link.control_rtt_ms is not None
    assert link.control_rtt_ms > 0
    assert link.jitter_ms is not None
    assert link.streams
    assert all(s.cwnd_segments > 0 for s in link.streams)
    # The same values as Prometheus series, labelled by site and peer.
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.labels.get("site") == "A" and s.labels.get("peer") == "B"
    }
    for name in SERIES:
        assert name in found, name
    assert found["transferd_link_best_goodput_bytes_per_second"] == pytest.approx(
        link.best_goodput_bytes_per_s, rel=0.3)
    assert found["transferd_link_data_segments_out_total"] > 0
    assert found["transferd_link_control_rtt_seconds_count"] >= 3
    for got in (by_url, by_config):
        assert (got.site, got.peer) == ("A", "B")
        assert got.samples >= link.samples
        assert got.best_goodput_bytes_per_s == pytest.approx(link.best_goodput_bytes_per_s,
                                                             rel=0.01)
        assert got.rtt_ms == pytest.approx(link.rtt_ms, rel=0.5)
