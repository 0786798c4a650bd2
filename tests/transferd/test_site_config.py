"""Site config validation: defaults, and errors that name the field and its YAML line."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferd.config import load_config, parse_config
from transferd.errors import ConfigError

GOOD = """\
site: A
listen: 127.0.0.1:7701
data_dir: ./site-a
peers:
  B: {url: http://127.0.0.1:7702}
keys_dir: ./keys
"""


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    config = load_config(tmp_path / "a.yaml")
    assert config.chunk_size == 8 * 1024 * 1024
    assert config.compression == "auto"
    assert config.tls is None
    assert config.data_path == tmp_path / "site-a"  # relative to the config file
    assert config.state_path == tmp_path / "site-a" / ".transferd"
    assert config.peers["B"].url == "http://127.0.0.1:7702"
    assert config.traffic.loop_priority == "realtime"
    assert config.traffic.bulk_priority == "nice"
    assert config.local_url == "http://127.0.0.1:7701"
    assert config.peers["B"].congestion_control == "bbr"  # per data socket
    assert config.data_listen_host_port == ("127.0.0.1", 0)  # listen's host, any free port
    assert config.streams == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\nchunk_size: 1000"),
            "chunk_size: must be >= 65536 (line 7)",
        ),
        (
            ("http://127.0.0.1:7702", "ftp://x"),
            "peers.B.url: must be an http:// or https:// URL with a host (line 5)",
        ),
        (
            ("listen: 127.0.0.1:7701", "listen: nowhere"),
            "listen: must be host:port, e.g. 127.0.0.1:7701 (line 2)",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ncompresion: auto"),
            "compresion: unknown key (line 7)",
        ),
        (("keys_dir: ./keys", "keys_dir: ./keys\ncompression: 99"), "compression"),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ncheckpoints: {retention: 0}"),
            "checkpoints.retention: must be >= 1 (line 7)",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ncheckpoints: {targets: [C]}"),
            "'C' is not one of peers",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\nrelay: {accept_via: {B: [C]}}"),
            "relay.accept_via.B: 'C' is not one of peers",
        ),
        (("site: A\n", ""), "site: required field is missing"),
        (
            ("http://127.0.0.1:7702}", "http://127.0.0.1:7702, congestion_control: vegas}"),
            "peers.B.congestion_control",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ndata_listen: 0.0.0.0"),
            "data_listen: must be host:port, e.g. 127.0.0.1:7701 (line 7)",
        ),
        (
            ("http://127.0.0.1:7702}", "http://127.0.0.1:7702, data_address: b}"),
            "peers.B.data_address: must be host:port",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\nrelay: {forward_timeout_s: .inf}"),
            "relay.forward_timeout_s: ",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\nrelay: {forward_timeout_s: 1.0e9}"),
            "relay.forward_timeout_s: must be <= 3600 (line 7)",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\nrelay: {spill_dir: ''}"),
            "relay.spill_dir: ",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ntraffic: {loop_priority: high}"),
            "traffic.loop_priority",
        ),
        (
            ("keys_dir: ./keys", "keys_dir: ./keys\ntraffic: {bulk_priority: low}"),
            "traffic.bulk_priority",
        ),
    ],
)
def test_config_errors_name_the_field_and_line(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace(*edit))
    assert any(message in issue for issue in err.value.issues), err.value.issues


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD + "peers: [unclosed\n")
    assert "line 8" in str(err.value)


def test_url_data_dir_needs_a_state_dir() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace("data_dir: ./site-a", "data_dir: s3://bucket/site-a"))
    assert any("state_dir: required" in issue for issue in err.value.issues)


@pytest.mark.parametrize("value", ["zstd 30", "30", "0", "true", "fast"])
def test_a_wrong_compression_is_one_plain_message(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD + f"compression: {value}\n")
    [issue] = err.value.issues
    assert "compression: must be auto, off or a zstd level 1-22" in issue
    assert "constrained" not in issue
