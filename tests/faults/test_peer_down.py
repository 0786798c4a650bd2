"""A peer that is down, or a local daemon that is: the CLI says so, keeps retrying with
backoff and says when it tries next, gives up at --timeout, and finishes on its own once the
peer is back; every log line stays JSON."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.faults.conftest import Tally
from tests.integration._data import file_blake3, write_random
from tests.integration._procs import cli, env, start_daemon, wait_until_serving
from transferd.testing import free_port, write_site_configs

FLAPS = "link flap, stall and drop cases"
FIGURE = FLAPS  # what a failure here counts against (conftest.tally)


@asynccontextmanager
async def two_sites(tmp_path: Path, start_b: bool) -> AsyncIterator[dict]:
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports, chunk_size=64 * 1024)
    logs = {s: tmp_path / f"{s}.log" for s in ports}
    procs: dict[str, subprocess.Popen[bytes]] = {"A": start_daemon(configs["A"], logs["A"])}
    if start_b:
        procs["B"] = start_daemon(configs["B"], logs["B"])
    try:
        for s in procs:
            await wait_until_serving(f"http://127.0.0.1:{ports[s]}")
        yield {"configs": configs, "procs": procs, "logs": logs, "ports": ports}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=20)


def json_lines(log: Path) -> bool:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    try:
        return all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


async def test_send_wait_to_a_stopped_peer_says_so_and_gives_up_at_its_timeout(
    tmp_path: Path, tally: Tally
) -> None:
    write_random(tmp_path / "site-A" / "curated" / "x.bin", 100_000, seed=1)
    async with two_sites(tmp_path, start_b=False) as s:
        code, out, err = await cli(
            "send", "curated/x.bin", "--config", str(s["configs"]["A"]), "--to", "B",
            "--wait", "--timeout", "2", "--json", timeout_s=30,
        )
        result = json.loads(out)
        code_status, status_out, _ = await cli(
            "status", "--config", str(s["configs"]["A"]), "--json"
        )
        [job] = json.loads(status_out)["jobs"]
    said_unreachable = "retrying" in err and "next attempt at" in err
    ok = code == 1 and result["state"] == "failed" and said_unreachable
    tally(FLAPS, ok)
    assert code == 1, err
    assert said_unreachable, err
    assert result["state"] == "failed"
    assert "timeout of 2 s" in result["errors"][0]["error"]
    assert "B" in result["errors"][0]["error"]  # what it was waiting for
    assert job["state"] == "failed"
    assert json_lines(s["logs"]["A"])


async def test_send_wait_finishes_by_itself_when_the_peer_comes_back(
    tmp_path: Path, tally: Tally
) -> None:
    digest = write_random(tmp_path / "site-A" / "curated" / "x.bin", 300_000, seed=2)
    async with two_sites(tmp_path, start_b=False) as s:
        sending = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "transferd", "send", "curated/x.bin",
            "--config", str(s["configs"]["A"]), "--to", "B", "--wait", "--json",
            env=env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert sending.stderr is not None
        try:
            # B starts once the CLI has said that A is retrying (found B down), not after a
            # fixed time: a CLI slower to start than B's daemon would find B up and never retry.
            said: list[str] = []
            async with asyncio.timeout(60):
                while not any("retrying" in line for line in said):
                    line = await sending.stderr.readline()
                    if not line:
                        break  # the CLI ended without saying it: the asserts below tell
                    said.append(line.decode())
            s["procs"]["B"] = start_daemon(s["configs"]["B"], s["logs"]["B"])
            async with asyncio.timeout(60):
                out_b, rest = await sending.communicate()
        finally:
            if sending.returncode is None:
                sending.kill()
                await sending.wait()
        code, out, err = sending.returncode, out_b.decode(), "".join(said) + rest.decode()
        result = json.loads(out)
    exact = file_blake3(tmp_path / "site-B" / "curated" / "x.bin") == digest
    tally(FLAPS, code == 0 and exact)
    assert code == 0, err
    assert "retrying" in err  # it said what it was doing while B was down
    assert result["state"] == "committed"
    assert result["retries"] >= 1
    assert exact


async def test_cli_without_its_daemon_says_how_to_start_it(tmp_path: Path) -> None:
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(tmp_path, ports)
    code, out, err = await cli("status", "--config", str(configs["A"]), "--json")
    assert code == 5
    assert f"Start it with: transferd serve --config {configs['A']}" in err
    error = json.loads(out)
    assert error["kind"] == "transport"
    assert error["exit_code"] == 5
    assert "is not answering" in error["error"]


async def test_small_cli_answers_a_new_user_expects(tmp_path: Path) -> None:
    write_random(tmp_path / "site-A" / "curated" / "x.bin", 1000, seed=3)
    async with two_sites(tmp_path, start_b=True) as s:
        a = str(s["configs"]["A"])
        # message to an unknown peer: a usage error (2), like send; --json gives JSON.
        code, out, err = await cli("message", "Z", "--config", a, "--data", "hi", "--json")
        assert code == 2, err
        assert json.loads(out)["kind"] == "config"
        code, out, _ = await cli("send", "curated/x.bin", "--config", a, "--to", "Z", "--json")
        assert code == 2
        assert json.loads(out)["exit_code"] == 2
        # send --json without --wait: a queued receipt, not a result with zero counters.
        code, out, err = await cli("send", "curated/x.bin", "--config", a, "--to", "B", "--json")
        assert code == 0, err
        queued = json.loads(out)
        assert queued["state"] == "queued"
        assert "bytes_on_wire" not in queued
        assert len(queued["jobs"]) == 1
        # A policy refusal with --json: JSON on stdout, exit 3.
        write_random(tmp_path / "site-A" / "raw" / "r.bin", 10, seed=4)
        code, out, _ = await cli("send", "raw/r.bin", "--config", a, "--to", "B", "--json")
        assert code == 3
        assert json.loads(out)["kind"] == "policy"
