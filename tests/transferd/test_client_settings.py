"""The client settings cache (`transferd.client_settings`): a client command reads a config
that validated before without the config models, and never trusts a cache of other bytes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from transferd import client_settings as cs
from transferd.cli import main
from transferd.client_settings import ClientSettings, client_settings
from transferd.config import load_config
from transferd.errors import ConfigError, ProtocolError
from transferd.net.local_http import job_ids

GOOD = """\
site: A
listen: 0.0.0.0:7701
data_dir: ./site-a
peers:
  B: {url: http://127.0.0.1:7702}
  C: {url: http://127.0.0.1:7703}
keys_dir: ./keys
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "transferd" / "client-settings"


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.exists() else []


def test_settings_match_the_full_validation_and_are_cached(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    first = client_settings(path)
    config = load_config(path)
    assert first == ClientSettings.of(config)
    assert first.local_url == config.local_url == "http://127.0.0.1:7701"
    assert first.keys_path == config.keys_path == tmp_path / "keys"
    assert first.data_path == config.data_path
    assert first.data_dir_is_local
    assert first.peers == ("B", "C")
    assert len(_entries(cache)) == 1
    assert client_settings(path) == first  # now from the cache


def test_a_cached_config_is_read_without_pydantic_or_yaml(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    client_settings(path)
    code = (
        "import json, sys; from transferd.client_settings import client_settings; "
        f"s = client_settings({str(path)!r}); "
        "import transferd.cli, transferd.net.local_client, transferd.site.keys, "
        "transferd.site.tls, transferd.protocol.auth, transferd.protocol.http_paths; "
        "print(json.dumps([s.local_url, sorted(m for m in ('pydantic', 'yaml', "
        "'transferd.config') if m in sys.modules)]))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert json.loads(out.stdout) == ["http://127.0.0.1:7701", []]


def test_an_edited_config_is_validated_again(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    assert client_settings(path).local_url == "http://127.0.0.1:7701"
    path.write_text(GOOD.replace("0.0.0.0:7701", "127.0.0.2:7801"))
    assert client_settings(path).local_url == "http://127.0.0.2:7801"
    path.write_text(GOOD.replace("0.0.0.0:7701", "nowhere"))
    with pytest.raises(ConfigError) as err:
        client_settings(path)
    assert "listen: must be host:port" in "; ".join(err.value.issues)
    assert len(_entries(cache)) == 2  # the bad file is never cached


def _same_file_in(tmp_path: Path, *folders: str) -> list[Path]:
    paths = []
    for folder in folders:
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "a.yaml")
        paths[-1].write_text(GOOD)
    return paths


def test_the_same_bytes_elsewhere_resolve_against_their_own_folder(
    tmp_path: Path, cache: Path
) -> None:
    x, y = _same_file_in(tmp_path, "x", "y")
    assert client_settings(x).keys_path == tmp_path / "x" / "keys"
    assert client_settings(y).keys_path == tmp_path / "y" / "keys"


def test_a_link_moved_to_the_same_bytes_elsewhere_is_validated_again(
    tmp_path: Path, cache: Path
) -> None:
    x, y = _same_file_in(tmp_path, "x", "y")
    link = tmp_path / "site.yaml"
    link.symlink_to(x)
    assert client_settings(link).keys_path == tmp_path / "x" / "keys"
    link.unlink()
    link.symlink_to(y)
    assert client_settings(link).keys_path == tmp_path / "y" / "keys"


def test_a_damaged_cache_entry_is_validated_again(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    expected = client_settings(path)
    [entry] = _entries(cache)
    for damaged in ("{not json", json.dumps({"format": 999}), json.dumps({"format": 1})):
        entry.write_text(damaged)
        assert client_settings(path) == expected
        assert ClientSettings.from_json(json.loads(entry.read_text())) == expected  # rewritten


def test_changed_validating_code_is_a_new_cache_name(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    client_settings(path)
    monkeypatch.setattr(cs, "code_stamp", lambda: b"another transferd")
    client_settings(path)
    assert len(_entries(cache)) == 2


def test_the_code_stamp_follows_content_and_library_versions_not_mtimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reinstall that only touches files keeps the cache; a new pydantic or PyYAML (or an
    edited validating module) does not."""
    lib = tmp_path / "lib" / "fakelib"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "version.py").write_text("VERSION = '2.0.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.setattr(cs, "_LIBRARY_VERSIONS", (("fakelib", "version.py"),))
    first = cs.code_stamp()
    assert first
    os.utime(lib / "version.py", (1, 1))
    assert cs.code_stamp() == first
    (lib / "version.py").write_text("VERSION = '2.0.1'\n")
    assert cs.code_stamp() != first
    monkeypatch.setattr(cs, "_LIBRARY_VERSIONS", (("no_such_library_here", "version.py"),))
    assert cs.code_stamp() == b""  # an unknown layout: never cached


def test_cli_names_the_bad_field_of_a_config_edited_after_it_was_cached(
    tmp_path: Path, cache: Path
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    client_settings(path)
    path.write_text(GOOD.replace("http://127.0.0.1:7702", "ftp://x"))
    result = CliRunner().invoke(main, ["send", "f", "--config", str(path), "--to", "B", "--json"])
    assert result.exit_code == 2
    assert "peers.B.url: must be an http:// or https:// URL with a host (line 5)" in result.output
    path.write_text(GOOD)
    result = CliRunner().invoke(main, ["send", "f", "--config", str(path), "--to", "D", "--json"])
    assert result.exit_code == 2
    assert "--to: not a peer" in result.output


def test_a_send_answer_that_is_not_job_ids_is_a_protocol_error() -> None:
    assert job_ids(b'{"jobs": ["a", "b"]}') == ["a", "b"]
    for bad in (b"nope", b"[]", b'{"jobs": [1]}', b'{"jobs": "a"}'):
        with pytest.raises(ProtocolError, match="invalid SendAnswer"):
            job_ids(bad)


# -- a config that is not a regular file, and the path errors name ---------------------------
def test_a_config_from_a_pipe_is_read_once_and_never_cached(tmp_path: Path, cache: Path) -> None:
    """`--config <(cat site.yaml)`: the pipe's bytes are validated as they were read."""
    read_end, write_end = os.pipe()
    os.write(write_end, GOOD.encode())
    os.close(write_end)
    try:
        settings = client_settings(f"/proc/self/fd/{read_end}")
    finally:
        os.close(read_end)
    assert settings.local_url == "http://127.0.0.1:7701"
    assert _entries(cache) == []


def _fifo_with(tmp_path: Path, name: str) -> tuple[Path, subprocess.Popen[bytes]]:
    """A FIFO and a writer (`cat site.yaml > fifo.yaml &`) that blocks until it is opened."""
    source = tmp_path / f"{name}.source.yaml"
    source.write_text(GOOD)
    fifo = tmp_path / f"{name}.yaml"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat {source} > {fifo}"])
    return fifo, writer


def test_a_fifo_config_is_read_once_by_a_client_and_by_serve(tmp_path: Path, cache: Path) -> None:
    code = (
        "import sys, json; from transferd.client_settings import client_settings, "
        "save_client_settings; from transferd.config import load_config_and_text; "
        "s = client_settings(sys.argv[1]); c, t = load_config_and_text(sys.argv[2]); "
        "save_client_settings(sys.argv[2], c, t); print(json.dumps([s.local_url, c.site]))"
    )
    first, w1 = _fifo_with(tmp_path, "client")
    second, w2 = _fifo_with(tmp_path, "serve")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(first), str(second)],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent)})
    finally:
        for writer in (w1, w2):
            writer.kill()
            writer.wait()
    assert json.loads(out.stdout) == ["http://127.0.0.1:7701", "A"], out.stderr
    assert _entries(cache) == []


def test_errors_name_the_path_the_user_gave(tmp_path: Path, cache: Path) -> None:
    target = tmp_path / "real.yaml"
    target.write_text(GOOD.replace("0.0.0.0:7701", "nowhere"))
    link = tmp_path / "site.yaml"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as err:
        client_settings(link)
    assert str(err.value).startswith(f"{link}: invalid site config")
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match=f"cannot read site config {missing}: No such file"):
        client_settings(missing)
    target.write_bytes(b"site: \xff\n")
    with pytest.raises(ConfigError, match=f"{link}.*not UTF-8 text: byte 0xff at offset 6"):
        client_settings(link)
    target.write_bytes(b"#" * (cs.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"{link}.*more than the 1.0 MiB limit"):
        client_settings(link)


# -- whose cache is trusted ------------------------------------------------------------------
def _poisoned(entry: Path) -> None:
    """What another user able to write the cache would put there: the CLI's signed requests
    sent to a port of theirs."""
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps({**data, "listen": "127.0.0.1:9"}))


def _cached(tmp_path: Path, cache: Path) -> tuple[Path, Path]:
    """A config that validated, and its one cache entry."""
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    client_settings(path)
    [entry] = _entries(cache)
    return path, entry


def test_an_entry_others_can_write_is_not_read(tmp_path: Path, cache: Path) -> None:
    path, entry = _cached(tmp_path, cache)
    _poisoned(entry)
    entry.chmod(0o666)
    assert client_settings(path).listen == "0.0.0.0:7701"
    entry.chmod(0o600)
    _poisoned(entry)
    cache.chmod(0o777)
    try:
        assert client_settings(path).listen == "0.0.0.0:7701"
    finally:
        cache.chmod(0o700)


def test_an_entry_that_is_a_link_is_not_read(tmp_path: Path, cache: Path) -> None:
    path, entry = _cached(tmp_path, cache)
    elsewhere = tmp_path / "elsewhere.json"
    entry.rename(elsewhere)
    _poisoned(elsewhere)
    entry.symlink_to(elsewhere)
    assert client_settings(path).listen == "0.0.0.0:7701"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_an_entry_owned_by_another_user_is_not_read(tmp_path: Path, cache: Path) -> None:
    path, entry = _cached(tmp_path, cache)
    _poisoned(entry)
    os.chown(entry, 65534, 65534)
    assert client_settings(path).listen == "0.0.0.0:7701"
    os.chown(entry, 0, 0)
    os.chown(cache, 65534, 65534)
    assert client_settings(path).listen == "0.0.0.0:7701"


def test_cache_folders_are_private_and_a_relative_xdg_cache_home_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    client_settings(path)
    for folder in ("xdg", "xdg/transferd", "xdg/transferd/client-settings"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o700, folder
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cs.cache_dir() == tmp_path / "home" / ".cache" / "transferd" / "client-settings"


def test_the_cache_can_be_turned_off(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRANSFERD_NO_CLIENT_CACHE", "1")
    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    assert client_settings(path).local_url == "http://127.0.0.1:7701"
    assert _entries(cache) == []


# -- what `send --wait --json` times ---------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_send_seconds_time_the_job_not_the_clients_model_imports(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`seconds` (read by scripts and benchmarks/s3_replication.py) ends when the answer that
    says the job ended arrives: the 1 s the (simulated) daemon took, not the 5 s the client
    then spends reading it."""
    from types import SimpleNamespace

    from transferd import cli

    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "f").write_bytes(b"x" * 5000)
    clock = _Clock()
    job = {"id": "j1", "path": "f", "dest": "B", "traffic_class": "sync", "state": "committed",
           "error": None, "error_kind": None, "created_at": 1.0, "started_at": 1.0,
           "finished_at": 2.0, "bytes_logical": 5000, "bytes_on_wire": 5100, "bytes_done": 5000,
           "chunks": 1, "chunks_skipped": 0, "chunks_sent": 1, "retries": 0,
           "integrity_failures": 0}

    class Daemon:
        def call(self, request: Any) -> Any:
            if request.method == "POST":
                return request.answer_of(200, b'{"jobs": ["j1"]}', "fake")
            clock.now += 1.0  # the job, in the daemon
            return request.answer_of(200, json.dumps({"jobs": [job]}).encode(), "fake")

    real_jobs = cli._jobs

    def slow_jobs(reply: bytes) -> Any:
        clock.now += 5.0  # a slow parse
        return real_jobs(reply)

    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=clock.monotonic,
                                                    sleep=clock.sleep))
    monkeypatch.setattr(cli, "_jobs", slow_jobs)
    monkeypatch.setattr(cli, "_with_daemon", lambda config, path, use, as_json=False:
                        use(Daemon()))
    result = CliRunner().invoke(
        main, ["send", "f", "--config", str(path), "--to", "B", "--wait", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["state"], out["seconds"]) == ("committed", 1.0)


@pytest.mark.parametrize("as_json", [True, False])
@pytest.mark.parametrize("answer", [{"jobs": []}, {"jobs": [{"id": "j2"}]}])
def test_send_wait_refuses_a_jobs_answer_without_the_queued_job(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool,
    answer: dict[str, Any],
) -> None:
    """The daemon queued j1 but its jobs answer does not report it (none, or another job):
    not a success with no destinations but a protocol error naming the job, exit 1."""
    from transferd import cli

    path = tmp_path / "a.yaml"
    path.write_text(GOOD)
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "f").write_bytes(b"x" * 5000)
    job = {"id": "j2", "path": "f", "dest": "B", "state": "committed", "error": None,
           "error_kind": None, "bytes_logical": 5000, "bytes_on_wire": 5100,
           "bytes_done": 5000, "chunks": 1, "chunks_skipped": 0, "retries": 0}
    jobs = [job for _ in answer["jobs"]]

    class Daemon:
        def call(self, request: Any) -> Any:
            if request.method == "POST":
                return request.answer_of(200, b'{"jobs": ["j1"]}', "fake")
            return request.answer_of(200, json.dumps({"jobs": jobs}).encode(), "fake")

        def close(self) -> None:
            pass

    monkeypatch.setattr(cli, "_local_client", lambda config, as_json=False: Daemon())
    args = ["send", "f", "--config", str(path), "--to", "B", "--wait"]
    result = CliRunner().invoke(main, args + (["--json"] if as_json else []))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "committed" not in result.output
    said = "transferd: protocol error: the daemon's jobs answer lacks job(s) it queued: j1"
    assert said in result.stderr
    if as_json:
        assert json.loads(result.stdout) == {
            "error": said.removeprefix("transferd: protocol error: "), "kind": "protocol",
            "exit_code": 1,
        }


def test_a_fifo_config_waits_for_a_writer_that_comes_later(tmp_path: Path, cache: Path) -> None:
    """`transferd status --config fifo.yaml` started before `cat site.yaml > fifo.yaml`: read
    once the writer comes, as a blocking open would, not taken for an empty file."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    code = ("import sys; from transferd.client_settings import client_settings; "
            "print(client_settings(sys.argv[1]).local_url)")
    reader = subprocess.Popen([sys.executable, "-c", code, str(fifo)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent)})
    try:
        # The reader has opened the FIFO (it is listed among its files) before anyone writes.
        fd_dir = Path(f"/proc/{reader.pid}/fd")
        for _ in range(600):
            with contextlib.suppress(OSError):
                if any(os.readlink(fd_dir / fd) == str(fifo) for fd in os.listdir(fd_dir)):
                    break
            if reader.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # a reader that takes the FIFO for an empty file has given up by now
        assert reader.poll() is None, reader.communicate()
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO, not a hang, if it left
        os.write(writer, GOOD.encode())
        os.close(writer)
        out, err = reader.communicate(timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert out.strip() == "http://127.0.0.1:7701", err
