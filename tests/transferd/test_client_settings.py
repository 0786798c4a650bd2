"""The client settings cache (`transferd.client_settings`): a client command reads a config
that validated before without the config models, and never trusts a cache of other bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from transferd import client_settings as cs
from transferd.cli import main
from transferd.client_settings import ClientSettings, client_settings
from transferd.config import load_config
from transferd.errors import ConfigError, ProtocolError
from transferd.net.local_client import job_ids

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
