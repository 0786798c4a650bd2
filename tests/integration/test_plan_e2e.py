"""The plan end to end: a three-site topology is planned by `netplan plan`, three loopback
daemons run `transferd serve --config ... --plan plan.json`, and approved data and a committed
checkpoint arrive (same bytes) exactly where the plan says, with no `send`, the target keeps the
plan's number of checkpoint steps, and raw data stays home."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from tests._three_sites import THREE_SITES
from tests.integration._data import file_blake3, write_random
from tests.integration._procs import env, metric, wait_until_serving
from transferd.testing import free_port, write_site_configs

CHUNK = 64 * 1024
DEADLINE_S = 60.0

SITES = ("onprem", "cloud", "edge")


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> blake3), state folders left out."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): file_blake3(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


async def _until(check: object, what: str) -> None:
    """Poll `check()` (a callable returning bool) until true; fail naming `what` at the deadline."""
    assert callable(check)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_three_daemons_carry_out_the_plan(tmp_path: Path) -> None:
    topo = tmp_path / "three-sites.yaml"
    topo.write_text(THREE_SITES)
    plan_path = tmp_path / "plan.json"
    planner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netplan", "plan", str(topo), "-o", str(plan_path),
        env=env(), stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE_S):
        _, planner_err = await planner.communicate()
    assert planner.returncode == 0, planner_err.decode()
    plan = json.loads(plan_path.read_text())
    by_site = {s["site"]: s for s in plan["sites"]}

    # What the plan says must happen (read from the plan, so the test follows the planner).
    sync = [(site, e["path_prefix"], e["destination"]) for site in SITES
            for e in by_site[site]["sync"]]
    ckpts = [(site, c["path_prefix"], tuple(c["targets"])) for site in SITES
             for c in by_site[site]["checkpoints"]]
    assert sync == [("onprem", "approved/corpus-approved/", "cloud")]
    assert ckpts == [("cloud", "checkpoints/tune/", ("onprem",))]

    data = {site: tmp_path / f"site-{site}" for site in SITES}
    # Data at the source sites before the daemons start ("existing files")...
    approved = data["onprem"] / "approved" / "corpus-approved"
    want_approved = {"part-0.bin": write_random(approved / "part-0.bin", 5 * CHUNK + 7, seed=1)}
    raw_digest = write_random(data["onprem"] / "raw" / "corpus-raw" / "secret.bin", 3 * CHUNK, 2)
    step = data["cloud"] / "checkpoints" / "tune" / "step-100"
    want_step = {"model.bin": write_random(step / "model.bin", 4 * CHUNK, seed=3)}
    (step / "COMMITTED").write_text("")
    want_step["COMMITTED"] = file_blake3(step / "COMMITTED")

    ports = {site: free_port() for site in SITES}
    configs = write_site_configs(
        tmp_path,
        ports,
        chunk_size=CHUNK,
        watch={"poll_interval_s": 0.1, "quiet_period_s": 0.5},
    )
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for site in SITES:
            with (tmp_path / f"{site}.log").open("ab") as log:
                procs[site] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "transferd", "serve", "--config", str(configs[site]),
                    "--plan", str(plan_path),
                    env=env(), stdout=asyncio.subprocess.DEVNULL, stderr=log,
                )
        for site in SITES:
            await wait_until_serving(f"http://127.0.0.1:{ports[site]}", timeout_s=DEADLINE_S)

        got_approved = data["cloud"] / "approved" / "corpus-approved"
        await _until(lambda: _tree(got_approved) == want_approved, "approved data at cloud")
        # ...and a file added while the daemons run follows without being asked for.
        want_approved["part-1.bin"] = write_random(approved / "part-1.bin", 2 * CHUNK, seed=4)
        await _until(lambda: _tree(got_approved) == want_approved, "the new file at cloud")

        got_step = data["onprem"] / "checkpoints" / "tune" / "step-100"
        await _until(lambda: _tree(got_step) == want_step, "the checkpoint at onprem")
        assert (data["onprem"] / "checkpoints" / "tune" / "LATEST").read_text() == "step-100\n"
        # Newer steps follow, and onprem keeps the plan's `retain` newest (the config says 5).
        retain = by_site["cloud"]["checkpoints"][0]["retain"]
        assert retain == 3
        for n in (101, 102, 103):
            newer = data["cloud"] / "checkpoints" / "tune" / f"step-{n}"
            write_random(newer / "model.bin", CHUNK, seed=n)
            (newer / "COMMITTED").write_text("")
        run_at_onprem = data["onprem"] / "checkpoints" / "tune"
        await _until(
            lambda: sorted(p.name for p in run_at_onprem.iterdir() if p.is_dir())
            == ["step-101", "step-102", "step-103"],
            "onprem to keep the newest 3 steps",
        )
        assert (run_at_onprem / "LATEST").read_text() == "step-103\n"

        # Exactly where the plan says: nothing reached edge, and raw stayed at onprem.
        assert _tree(data["edge"]) == {}
        assert _tree(data["cloud"] / "raw") == {}
        assert _tree(data["onprem"] / "approved") == {
            f"corpus-approved/{k}": v for k, v in want_approved.items()
        }
        for site in ("cloud", "edge"):
            assert raw_digest not in _tree(data[site]).values()
        assert _tree(data["onprem"] / "raw") == {"corpus-raw/secret.bin": raw_digest}
        sent = await metric(f"http://127.0.0.1:{ports['onprem']}", "transferd_bytes_sent_total",
                            peer="edge")
        assert sent == 0.0
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
    for site, proc in procs.items():
        assert proc.returncode == 0, (tmp_path / f"{site}.log").read_text()[-2000:]
