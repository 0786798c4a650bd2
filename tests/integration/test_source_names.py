"""A folder holding a file whose name is not UTF-8 text (a name made of other bytes, as an old
Latin-1 tool or a broken unzip leaves): sending it is refused naming the file, escaped, and the
daemon serves on. Its open request's JSON encoder used to raise inside the job, which ended
the daemon; the job was journaled, so each restart ended it again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.integration._data import file_blake3, write_random
from transferd.cli import main
from transferd.errors import StorageError
from transferd.testing import loopback_pair, wait_for_jobs


def _latin1_named(folder: Path) -> None:
    """A file in `folder` named "café.csv" in Latin-1 bytes."""
    Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.csv")).write_bytes(b"a,b\n")


async def test_a_name_that_is_not_utf8_is_refused_and_the_daemon_serves_on(
    tmp_path: Path,
) -> None:
    ds = tmp_path / "site-A/curated/ds"
    write_random(ds / "ok.bin", 1000, seed=1)
    _latin1_named(ds)
    (tmp_path / "site-B").mkdir()
    async with loopback_pair(tmp_path, chunk_size=64 * 1024) as (a, _b):
        with pytest.raises(StorageError, match=r"curated/ds/caf\\xe9\.csv: the name is not UTF-8"):
            a.sender.submit("curated/ds", ["B"])
        digest = write_random(tmp_path / "site-A/curated/next.bin", 5000, seed=2)
        [job] = await wait_for_jobs(a, a.sender.submit("curated/next.bin", ["B"]))
        assert job.state == "committed", job.error
        assert file_blake3(tmp_path / "site-B/curated/next.bin") == digest
    assert not (tmp_path / "site-B/curated/ds").exists()


def test_send_of_a_path_that_is_not_utf8_is_refused_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path itself (a shell's bytes, read with surrogate escapes): refused by name before
    the daemon is asked (which answered "invalid SendRequest: not JSON")."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = tmp_path / "a.yaml"
    config.write_text("site: A\nlisten: 127.0.0.1:9\ndata_dir: ./site-a\nkeys_dir: ./keys\n"
                      "peers:\n  B: {url: http://127.0.0.1:9}\n")
    path = os.fsdecode(b"curated/caf\xe9.csv")
    result = CliRunner().invoke(main, ["send", path, "--config", str(config), "--to", "B",
                                       "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": "curated/caf\\xe9.csv: the name is not UTF-8, which transferd cannot carry: "
                 "rename it",
        "kind": "storage", "exit_code": 1}
