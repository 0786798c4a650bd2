"""One daemon per state_dir. A second `transferd serve` on a data_dir a daemon already serves
(its config with another listen port, or a copy started by hand beside systemd's) is refused
naming the one running, before it touches anything: it used to start, reclaim at once the
staging the first held, take over its message socket and resume its jobs. The lock goes with
its holder, also killed with SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

import transferd.daemon as daemon_module
from tests.integration._data import file_blake3, write_random
from tests.integration._procs import start_daemon, wait_until_serving
from transferd.config import load_config
from transferd.daemon import Daemon
from transferd.errors import ConfigError
from transferd.site.storage import SiteStorage
from transferd.testing import free_port, loopback_pair, running_daemon, wait_for_jobs


def _second_config(tmp_path: Path) -> Path:
    """Site A's config, listening elsewhere: the same data_dir, so the same state_dir."""
    doc = yaml.safe_load((tmp_path / "site-A.yaml").read_text())
    doc["listen"] = f"127.0.0.1:{free_port()}"
    second = tmp_path / "site-A-again.yaml"
    second.write_text(yaml.safe_dump(doc))
    return second


async def test_a_second_daemon_on_a_served_state_dir_is_refused_and_touches_nothing(
    tmp_path: Path,
) -> None:
    digest = write_random(tmp_path / "site-A/curated/f.bin", 300_000, seed=3)
    async with loopback_pair(tmp_path, chunk_size=64 * 1024) as (a, _b):
        held = a.storage.staging_root / "being-received"  # staging the running daemon holds
        held.mkdir()
        with pytest.raises(ConfigError) as refused:
            Daemon(load_config(_second_config(tmp_path)))
        assert str(refused.value) == (
            f"state_dir: another transferd daemon (pid {os.getpid()}) is running on "
            f"{a.config.state_path}; stop it first, or give this one its own data_dir (or "
            "state_dir)")
        assert held.is_dir()  # a second start reclaimed it as an orphan
        held.rmdir()
        [job] = await wait_for_jobs(a, a.sender.submit("curated/f.bin", ["B"]))
        assert job.state == "committed", job.error
    assert file_blake3(tmp_path / "site-B/curated/f.bin") == digest
    # Stopped, it let go: the next daemon on that state_dir starts.
    async with running_daemon(load_config(_second_config(tmp_path))) as again:
        assert again.port is not None


async def test_a_second_daemon_is_refused_before_it_opens_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening an object store reclaims the commits its intent files name (aborts their
    # multipart uploads, deletes their unlisted objects): in a second daemon that would undo
    # the running one's commits. So the storage is opened only under the lock.
    opened: list[Path] = []
    real_open_storage = daemon_module.open_storage

    def recording_open_storage(*args: Any) -> SiteStorage:
        opened.append(args[-1])
        return real_open_storage(*args)

    async with loopback_pair(tmp_path):
        monkeypatch.setattr(daemon_module, "open_storage", recording_open_storage)
        with pytest.raises(ConfigError, match="another transferd daemon"):
            Daemon(load_config(_second_config(tmp_path)))
        assert opened == []
        monkeypatch.undo()


async def test_a_daemon_refused_at_start_lets_go_of_the_lock_at_once(tmp_path: Path) -> None:
    # The refusal is kept (pytest.raises holds its traceback, so the refused Daemon too): the
    # lock must not wait for that object to be collected.
    async with loopback_pair(tmp_path):
        pass  # writes the configs and keys, then stops
    config = load_config(_second_config(tmp_path))
    key = config.keys_path / "A.ed25519"
    key.rename(tmp_path / "A.ed25519.away")
    with pytest.raises(ConfigError, match="keys_dir: cannot load A.ed25519") as refused:
        Daemon(config)
    (tmp_path / "A.ed25519.away").rename(key)
    async with running_daemon(config) as again:
        assert again.port is not None
    assert refused.value.__traceback__ is not None  # still held while the second one ran


async def test_the_lock_goes_with_a_daemon_killed_by_sigkill(tmp_path: Path) -> None:
    async with loopback_pair(tmp_path):
        pass  # writes the configs and keys, then stops
    config = _second_config(tmp_path)
    url = f"http://{yaml.safe_load(config.read_text())['listen']}"
    first = start_daemon(config, tmp_path / "first.log")
    try:
        await wait_until_serving(url)
        refused = start_daemon(tmp_path / "site-A.yaml", tmp_path / "refused.log")
        try:
            assert refused.wait(timeout=120) == 2  # a hang guard: it exits at once, or serves
        finally:
            if refused.poll() is None:
                refused.kill()
                refused.wait(timeout=60)
        err = (tmp_path / "refused.log").read_text()
        assert f"another transferd daemon (pid {first.pid}) is running on" in err
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        second = start_daemon(config, tmp_path / "second.log")
        try:
            await wait_until_serving(url)
        finally:
            second.terminate()
            assert second.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
