"""The CLI against real daemon processes: send --wait --json, status, SIGTERM exits 0, raw/
refused with a non-zero exit, and SIGKILL of the sender or the receiver mid-transfer resumes,
re-sending fewer than 2 chunks + 5 % of the file."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.integration._data import file_blake3, write_random
from tests.integration._procs import cli, metric, poll_until, start_daemon, wait_until_serving
from transferd.testing import LinkProxy, free_port, write_site_configs

CHUNK = 256 * 1024
N_CHUNKS = 48


async def test_cli_send_wait_json_status_and_sigterm(tmp_path: Path) -> None:
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports, chunk_size=CHUNK)
    digest = write_random(tmp_path / "site-A" / "curated" / "d" / "x.bin", 5 * CHUNK + 1, seed=11)
    write_random(tmp_path / "site-A" / "raw" / "r.bin", 10, seed=12)
    procs = {s: start_daemon(configs[s], tmp_path / f"{s}.log") for s in ("A", "B")}
    try:
        for s in ("A", "B"):
            await wait_until_serving(f"http://127.0.0.1:{ports[s]}")
        code, out, err = await cli(
            "send", "curated/d", "--config", str(configs["A"]), "--to", "B", "--wait", "--json"
        )
        assert code == 0, err
        result = json.loads(out)
        assert list(result) == [
            "path",
            "destinations",
            "state",
            "bytes_logical",
            "bytes_on_wire",
            "chunks",
            "chunks_skipped",
            "retries",
            "seconds",
        ]
        assert result["state"] == "committed"
        assert result["destinations"] == ["B"]
        assert result["bytes_logical"] == 5 * CHUNK + 1
        assert result["chunks"] == 6
        assert file_blake3(tmp_path / "site-B" / "curated" / "d" / "x.bin") == digest

        code, out, err = await cli("send", "raw/r.bin", "--config", str(configs["A"]), "--to", "B")
        assert code == 3
        assert "raw-tier" in err

        code, _, err = await cli("send", "curated/d", "--config", str(configs["A"]), "--to", "Z")
        assert code == 2
        assert "--to: not a peer" in err

        code, out, _ = await cli("status", "--config", str(configs["A"]), "--json")
        assert code == 0
        status = json.loads(out)
        assert status["site"] == "A"
        assert status["jobs"][0]["state"] == "committed"
        assert status["peers"]["B"]["chunks_sent"] == 6
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=20) for proc in procs.values()]
    assert codes == [0, 0]
    log = (tmp_path / "A.log").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "daemon.stopped"


@pytest.mark.parametrize(
    ("victim", "how"),
    [("A", signal.SIGKILL), ("B", signal.SIGKILL), ("A", signal.SIGTERM)],
    ids=["sigkill-sender", "sigkill-receiver", "sigterm-sender"],
)
async def test_sigkill_mid_transfer_resumes_resending_at_most_in_flight_chunks(
    tmp_path: Path, victim: str, how: signal.Signals
) -> None:
    digest = write_random(tmp_path / "site-A" / "approved" / "m.bin", N_CHUNKS * CHUNK, seed=21)
    # A slow link (8 MB/s) keeps the transfer going long enough to kill it in the middle. The
    # proxy listens first, so the daemons' free ports cannot be the one it takes.
    async with LinkProxy(rate_bytes_per_s=8e6) as proxy:
        ports = {"A": free_port(), "B": free_port()}
        # The bulk bytes (A's data channels to B) cross the slow proxy; control goes direct.
        data_ports = {"B": free_port()}
        proxy.target_port = data_ports["B"]
        configs = write_site_configs(
            tmp_path, ports, data_ports=data_ports, data_addresses={"B": proxy.address},
            chunk_size=CHUNK, streams=2,
        )  # fmt: skip
        url = {s: f"http://127.0.0.1:{ports[s]}" for s in ports}
        logs = {s: tmp_path / f"{s}.log" for s in ports}
        procs = {s: start_daemon(configs[s], logs[s]) for s in ("A", "B")}
        try:
            for s in ("A", "B"):
                await wait_until_serving(url[s])
            code, _, err = await cli(
                "send", "approved/m.bin", "--config", str(configs["A"]), "--to", "B"
            )
            assert code == 0, err
            await poll_until(
                lambda: metric(url["B"], "transferd_chunks_received_total", peer="A"),
                lambda n: (n or 0) >= N_CHUNKS // 3,
                timeout_s=30,
                every_s=0.02,
            )
            before = await metric(url["B"], "transferd_chunks_received_total", peer="A")
            procs[victim].send_signal(how)
            # Wait off the event loop: the LinkProxy in this loop must keep moving bytes meanwhile.
            code = await asyncio.to_thread(procs[victim].wait, 20)
            # SIGTERM: a graceful stop (in-flight chunks finish, the job waits in the journal).
            assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
            if how == signal.SIGTERM:
                events = [
                    json.loads(line)["event"] for line in logs[victim].read_text().splitlines()
                ]
                assert events[-3:] == ["daemon.stopping", "job.interrupted", "daemon.stopped"]
            procs[victim] = start_daemon(configs[victim], logs[victim])
            await wait_until_serving(url[victim])
            dst = tmp_path / "site-B" / "approved" / "m.bin"

            async def jobs() -> list[dict]:
                code, out, _ = await cli("status", "--config", str(configs["A"]), "--json")
                return list(json.loads(out)["jobs"]) if code == 0 else []

            [job] = await poll_until(
                jobs, lambda js: bool(js) and js[0]["state"] in ("committed", "failed"), 40, 0.2
            )
            assert job["state"] == "committed", job["error"]
            assert file_blake3(dst) == digest
            limit = N_CHUNKS + 2 + 0.05 * N_CHUNKS
            if victim == "A":
                # The receiver ran throughout: it counts every chunk that crossed the wire.
                received = await metric(url["B"], "transferd_chunks_received_total", peer="A")
                assert before is not None
                assert received is not None
                assert received < limit
            else:
                # The sender ran throughout: its journal counts every chunk it had to send.
                assert job["chunks_sent"] < limit
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(timeout=20)
