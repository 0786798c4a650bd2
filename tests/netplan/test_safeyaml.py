"""The hardened YAML/JSON reader: hostile documents (alias bombs, deep nesting, huge files,
non-UTF-8 bytes) fail fast with a clear error naming the file; ordinary anchors still work."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netplan.cli import cli
from netplan.errors import TopologyError
from netplan.loader import load_topology, parse_topology
from netplan.safeyaml import (
    DocumentError,
    Limits,
    load_json_bounded,
    load_yaml_bounded,
    read_document,
)
from netplan.yamlpos import parse


def _alias_bomb(levels: int = 9) -> str:
    """The billion-laughs shape: each level is a list of nine aliases of the level below."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_expands() -> None:
    # 9 levels of 9 aliases: 9^10 leaves (before this reader: a MemoryError after 40 s), refused
    # while counting, without expanding anything.
    with pytest.raises(DocumentError) as err:
        load_yaml_bounded(_alias_bomb())
    assert err.value.kind == "aliases"
    assert "alias bomb" in str(err.value)


def test_alias_bomb_in_a_topology_file_is_a_topology_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\n" + _alias_bomb())
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert str(err.value).startswith(f"{path}: aliases expand")
    done = CliRunner().invoke(cli, ["analyze", str(path)])
    assert done.exit_code == 2
    assert "alias bomb" in done.stderr
    assert "Traceback" not in done.output + done.stderr


def test_the_position_parser_used_by_site_configs_is_bounded_too() -> None:
    with pytest.raises(DocumentError, match="alias bomb"):
        parse(_alias_bomb())


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(DocumentError, match="recursive") as err:
        load_yaml_bounded("a: &x [1, *x]\n")
    assert err.value.line == 1


def test_ordinary_anchors_and_merge_keys_still_load() -> None:
    text = (
        "defaults: &link {bandwidth_gbps: 10, rtt_ms: 5}\n"
        "links:\n"
        "  - {<<: *link, between: [a, b]}\n"
        "  - {<<: *link, between: [b, c], rtt_ms: 7}\n"
    )
    data = load_yaml_bounded(text)
    assert data["links"][1] == {"bandwidth_gbps": 10, "rtt_ms": 7, "between": ["b", "c"]}


def test_deep_nesting_is_a_depth_error_with_the_line() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(80)) + "  " * 80 + "leaf\n"
    with pytest.raises(DocumentError) as err:
        load_yaml_bounded(text)
    assert err.value.kind == "depth"
    assert "deeper than 64 levels" in str(err.value)
    assert err.value.line is not None
    flow = "[" * 5000 + "]" * 5000
    with pytest.raises(DocumentError):  # libyaml refuses this itself, as a syntax error
        load_yaml_bounded(flow)
    with pytest.raises(DocumentError, match="deeper"):
        parse("".join("  " * i + f"k{i}:\n" for i in range(80)) + "  " * 80 + "leaf\n")


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200_000)  # 2 MB
    with pytest.raises(DocumentError) as err:
        read_document(path, limits=Limits(max_bytes=1024 * 1024))
    assert err.value.kind == "size"
    assert str(err.value) == f"{path}: the file is 1.9 MiB, more than the 1.0 MiB limit"
    with pytest.raises(TopologyError, match="more than the 1.0 MiB limit"):
        load_topology(path, limits=Limits(max_bytes=1024 * 1024))


def test_non_utf8_bytes_name_the_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\nsites: []\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert str(err.value) == f"{path}: not UTF-8 text: byte 0xe9 at offset 34 (line 3)"


def test_a_value_python_cannot_hold_is_an_error_not_a_crash() -> None:
    with pytest.raises(DocumentError, match="cannot read a value"):
        load_yaml_bounded("n: " + "9" * 10_000 + "\n")
    with pytest.raises(DocumentError, match="cannot read a value"):
        load_json_bounded('{"n": ' + "9" * 10_000 + "}")


def test_json_reader_limits() -> None:
    assert load_json_bounded(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(DocumentError) as err:
        load_json_bounded('{\n"a": [1, 2,]\n}', source="plan.json")
    assert str(err.value).startswith("plan.json: JSON syntax error: ")
    assert err.value.line == 2
    for deep in ("[" * 100 + "]" * 100, "[" * 200_000 + "]" * 200_000):
        with pytest.raises(DocumentError, match="deeper than 64 levels"):
            load_json_bounded(deep)
    with pytest.raises(DocumentError, match="not UTF-8"):
        load_json_bounded(b'{"a": "\xff"}')
    with pytest.raises(DocumentError, match="larger than"):
        load_json_bounded("[" + "1," * 600 + "1]", limits=Limits(max_bytes=1000))


def test_read_document_picks_the_parser_by_extension(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"x": 1}))
    (tmp_path / "a.yaml").write_text("x: 1\n")
    assert read_document(tmp_path / "a.json") == read_document(tmp_path / "a.yaml") == {"x": 1}


def _error(read: Callable[[], object]) -> DocumentError | None:
    """The DocumentError `read` raises, or None; anything else propagates and fails the test."""
    try:
        read()
    except DocumentError as exc:
        return exc
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_bytes_only_ever_raise_document_error(data: bytes) -> None:
    limits = Limits(max_depth=8, alias_allowance=50)
    for reader in (load_yaml_bounded, load_json_bounded):
        err = _error(lambda r=reader: r(data, limits=limits))  # type: ignore[misc]
        assert err is None or err.message


_YAMLISH = st.text(alphabet="ab01:-[]{}&*<>!|,'\"#% \n\t?", max_size=200)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_YAMLISH)
def test_fuzz_yaml_shaped_text_only_ever_raises_document_error(text: str) -> None:
    limits = Limits(max_depth=8, alias_allowance=50)
    err = _error(lambda: load_yaml_bounded(text, limits=limits))
    assert err is None or err.kind in {"syntax", "depth", "aliases", "value"}
    # (libyaml and the pure-Python parser disagree on a few texts, e.g. a tab after a scalar:
    # the loader copes; here only the kind of failure matters)
    err = _error(lambda: parse(text, limits=limits))
    assert err is None or err.kind in {"syntax", "depth", "aliases", "value"}
    with pytest.raises(TopologyError):
        parse_topology(text)  # never a valid topology, never anything but TopologyError


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=2, max_value=9))
def test_fuzz_alias_fanouts_are_bounded(levels: int, fanout: int) -> None:
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]")
    text = "\n".join(lines)
    # Counted by hand: a0 is a list node and a scalar; each level a list of `fanout` copies of
    # the level below; the document is its mapping node plus one key node per level.
    size = [2]
    for _ in range(levels):
        size.append(1 + fanout * size[-1])
    expanded = 1 + sum(1 + s for s in size)
    written = 1 + 2 * (levels + 1) + 1  # root, a key and a list per level, the scalar x
    refused = expanded > 2 * written + 1000
    err = _error(lambda: load_yaml_bounded(text, limits=Limits(alias_allowance=1000)))
    assert (err is not None) == refused
    if err is not None:
        assert err.kind == "aliases"
        assert "alias bomb" in str(err)
        if expanded <= 20_000_000:  # (beyond, the walk stops at the node limit, uncounted)
            assert f"into {expanded:,}" in str(err)
