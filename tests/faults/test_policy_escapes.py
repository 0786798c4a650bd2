"""Links into raw/ (symlinks to files and folders, hard links, links out of data_dir or into the
daemon's own state) are refused on both sides: a sender never reads raw data for another site,
a receiver never writes into its own raw/ through its own links, and both keep serving."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import Tally
from tests.integration._data import file_blake3, tree_digests, write_random
from transferd.daemon import Daemon
from transferd.errors import PolicyViolation
from transferd.testing import loopback_pair, wait_for_jobs

ESCAPES = "policy escapes (links into raw/ or out)"
FIGURE = ESCAPES  # what a failure here counts against (conftest.tally)


def arrived(b: Daemon) -> list[str]:
    """Files that arrived at B outside its raw/ (and its state folder)."""
    root = b.config.data_path
    return sorted(
        str(Path(d, f).relative_to(root))
        for d, _dirs, files in os.walk(root)
        for f in files
        if Path(d).relative_to(root).parts[:1] not in (("raw",), (".transferd",))
        and not Path(d, f).is_symlink()
    )


def _sender_layouts(a_data: Path) -> dict[str, Callable[[], str]]:
    """Each: lay out A's data_dir so that sending the returned path would leak raw data."""
    raw = a_data / "raw"

    def link(at: str, to: str) -> None:
        path = a_data / at
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(to)

    def folder_symlink() -> str:
        link("curated/rawlink", "../raw")
        return "curated/rawlink/secret.bin"

    def file_symlink() -> str:
        link("curated/s.bin", "../raw/secret.bin")
        return "curated/s.bin"

    def dataset_member() -> str:
        write_random(a_data / "curated" / "ds" / "ok.bin", 1000, seed=5)
        link("curated/ds/m.bin", "../../raw/secret.bin")
        return "curated/ds"

    def checkpoint_member() -> str:
        write_random(a_data / "checkpoints" / "run1" / "step-1" / "ok.bin", 1000, seed=6)
        link("checkpoints/run1/step-1/w.bin", "../../../raw/secret.bin")
        return "checkpoints/run1/step-1"

    def checkpoint_run() -> str:
        write_random(raw / "step-1" / "w.bin", 1000, seed=7)
        link("checkpoints/run6", "../raw")
        return "checkpoints/run6/step-1"

    def folder_send() -> str:
        link("approved/rawdir", "../raw")
        return "approved/rawdir"

    def nested_folder_link() -> str:
        write_random(a_data / "curated" / "nest" / "ok.bin", 1000, seed=8)
        link("curated/nest/sub", "../../raw")
        return "curated/nest/sub/secret.bin"

    def hard_link() -> str:
        (a_data / "curated").mkdir(parents=True, exist_ok=True)
        os.link(raw / "secret.bin", a_data / "curated" / "h.bin")
        return "curated/h.bin"

    def hard_link_member() -> str:
        write_random(a_data / "approved" / "hd" / "ok.bin", 1000, seed=9)
        os.link(raw / "secret.bin", a_data / "approved" / "hd" / "h.bin")
        return "approved/hd"

    def state_dir() -> str:
        link("curated/journal", "../.transferd/journal.sqlite")
        return "curated/journal"

    def outside() -> str:
        outside = a_data.parent / "outside"
        write_random(outside / "x.bin", 100, seed=10)
        link("curated/out", str(outside))
        return "curated/out/x.bin"

    return {
        f.__name__: f
        for f in (
            folder_symlink,
            file_symlink,
            dataset_member,
            checkpoint_member,
            checkpoint_run,
            folder_send,
            nested_folder_link,
            hard_link,
            hard_link_member,
            state_dir,
            outside,
        )
    }


SENDER_CASES = sorted(_sender_layouts(Path("/")))


@pytest.mark.parametrize("case", SENDER_CASES)
async def test_sender_refuses_links_into_raw_and_keeps_serving(
    tmp_path: Path, case: str, tally: Tally
) -> None:
    a_data = tmp_path / "site-A"
    secret = write_random(a_data / "raw" / "secret.bin", 3000, seed=1)
    good = write_random(a_data / "curated" / "fine.bin", 3000, seed=2)
    path = _sender_layouts(a_data)[case]()
    async with loopback_pair(tmp_path, chunk_size=64 * 1024) as (a, b):
        refused = False
        try:
            a.sender.submit(path, ["B"])
        except PolicyViolation:
            refused = True
        else:
            # Not refused at submit (it would be a defect): the job must still fail on policy.
            [job] = await wait_for_jobs(a, [j.id for j in a.journal.jobs()])
            refused = job.error_kind == "policy"
        leaked = [
            f for f in arrived(b) if file_blake3(b.config.data_path / f) == secret
        ]
        tally(ESCAPES, refused and not leaked)
        assert refused, path
        assert leaked == []
        assert a.metrics.value("transferd_policy_refusals_total", side="sender") >= 1
        # Still serving: an ordinary file goes through.
        ids = a.sender.submit("curated/fine.bin", ["B"])
        [job] = await wait_for_jobs(a, ids)
        assert job.state == "committed", job.error
        assert file_blake3(b.config.data_path / "curated" / "fine.bin") == good


def _receiver_layouts(b_data: Path) -> dict[str, tuple[str, str]]:
    """Each: lay out B's data_dir with a link into its raw/; returns (what A sends, where at A
    it comes from)."""

    def link(at: str, to: str) -> None:
        path = b_data / at
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(to)

    link("curated/dst-raw", "../raw")
    link("checkpoints/run7", "../raw")
    link("curated/x.bin", "../raw/x.bin")
    link("approved/deep", "../raw/deep")
    (b_data / "raw" / "deep").mkdir(parents=True)
    return {
        "folder_link": ("curated/dst-raw/x.bin", "curated/dst-raw/x.bin"),
        "checkpoint_run_link": ("checkpoints/run7/step-1", "checkpoints/run7/step-1"),
        "file_link": ("curated/x.bin", "curated/x.bin"),
        "link_below_root": ("approved/deep/sub/y.bin", "approved/deep/sub/y.bin"),
    }


RECEIVER_CASES = ["checkpoint_run_link", "file_link", "folder_link", "link_below_root"]


@pytest.mark.parametrize("case", RECEIVER_CASES)
async def test_receiver_refuses_to_write_into_its_raw_through_its_links(
    tmp_path: Path, case: str, tally: Tally
) -> None:
    a_data, b_data = tmp_path / "site-A", tmp_path / "site-B"
    write_random(b_data / "raw" / "x.bin", 500, seed=3)  # B's own raw data: must not change
    send, source = _receiver_layouts(b_data)[case]
    if case == "checkpoint_run_link":
        write_random(a_data / source / "w.bin", 5000, seed=4)
        write_random(a_data / source / "COMMITTED", 0, seed=4)
    else:
        write_random(a_data / source, 5000, seed=4)
    before = tree_digests(b_data / "raw", skip=())
    async with loopback_pair(tmp_path, chunk_size=64 * 1024) as (a, b):
        ids = a.sender.submit(send, ["B"])
        [job] = await wait_for_jobs(a, ids)
        unchanged = tree_digests(b_data / "raw", skip=()) == before
        tally(ESCAPES, job.error_kind == "policy" and unchanged)
        assert job.state == "failed"
        assert job.error_kind == "policy", job.error
        assert unchanged
        assert b.metrics.value("transferd_policy_refusals_total", side="receiver") >= 1
        # Still serving.
        write_random(a_data / "approved" / "ok.bin", 5000, seed=5)
        ids = a.sender.submit("approved/ok.bin", ["B"])
        [ok] = await wait_for_jobs(a, ids)
        assert ok.state == "committed", ok.error


async def test_receiver_writes_latest_and_drops_old_steps_without_following_links(
    tmp_path: Path, tally: Tally
) -> None:
    """A link planted at LATEST's temporary name, and an old "step" that is a link to raw/:
    replicating steps and retention never write through either or delete what they point to."""
    a_data, b_data = tmp_path / "site-A", tmp_path / "site-B"
    victim = write_random(b_data / "raw" / "victim.bin", 500, seed=1)
    write_random(b_data / "raw" / "keep" / "k.bin", 500, seed=2)
    run = b_data / "checkpoints" / "run8"
    run.mkdir(parents=True)
    (run / ".LATEST.transferd-tmp").symlink_to("../../raw/victim.bin")
    (run / "step-0").symlink_to("../../raw/keep")
    before = tree_digests(b_data / "raw", skip=())
    for step in (1, 2, 3):
        write_random(a_data / "checkpoints" / "run8" / f"step-{step}" / "w.bin", 3000, seed=step)
    async with loopback_pair(tmp_path, chunk_size=64 * 1024, checkpoints={"retention": 1}) as (
        a,
        _b,
    ):
        for step in (1, 2, 3):
            ids = a.sender.submit(f"checkpoints/run8/step-{step}", ["B"])
            [job] = await wait_for_jobs(a, ids)
            assert job.state == "committed", job.error
    raw_now = tree_digests(b_data / "raw", skip=())
    intact = raw_now == before and file_blake3(b_data / "raw" / "victim.bin") == victim
    tally(ESCAPES, intact)
    assert intact
    assert (run / "LATEST").read_text() == "step-3\n"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "LATEST",
        "step-0",  # a link is no step: neither counted nor removed through
        "step-3",
    ]


async def test_watch_mode_skips_a_checkpoint_run_linked_to_raw(
    tmp_path: Path, tally: Tally
) -> None:
    a_data = tmp_path / "site-A"
    write_random(a_data / "raw" / "step-1" / "w.bin", 1000, seed=1)
    write_random(a_data / "raw" / "step-1" / "COMMITTED", 0, seed=1)
    (a_data / "checkpoints").mkdir(parents=True)
    (a_data / "checkpoints" / "run6").symlink_to("../raw")
    write_random(a_data / "checkpoints" / "run1" / "step-1" / "w.bin", 1000, seed=2)
    write_random(a_data / "checkpoints" / "run1" / "step-1" / "COMMITTED", 0, seed=2)
    watch = {"enabled": True, "poll_interval_s": 0.05, "quiet_period_s": 60}
    async with loopback_pair(
        tmp_path, chunk_size=64 * 1024, A={"watch": watch, "checkpoints": {"targets": ["B"]}}
    ) as (a, b):
        for _ in range(200):
            jobs = a.journal.jobs()
            if jobs and not any(j.state.active for j in jobs):
                break
            await asyncio.sleep(0.05)
        paths = sorted(j.path for j in a.journal.jobs())
        refusals = a.metrics.value("transferd_policy_refusals_total", side="sender")
        tally(ESCAPES, paths == ["checkpoints/run1/step-1"] and refusals >= 1)
        assert paths == ["checkpoints/run1/step-1"]
        assert refusals >= 1
        assert not (b.config.data_path / "checkpoints" / "run6").exists()
