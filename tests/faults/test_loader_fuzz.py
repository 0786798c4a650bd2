"""Both loaders under hostile input (hypothesis): random bytes, a valid site config or plan
with bytes inserted, deleted and replaced, random YAML and JSON structures, and the known
hostile shapes (alias bombs, deep nesting, non-UTF-8, huge values, unsafe tags). Every input
is answered with a config or a ConfigError naming the file, in bounded time; the CLI turns the
worst ones into exit 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import Tally
from tests.integration._procs import env
from tests.transferd import test_plan_load as plan_load
from transferd.config import SiteConfig, load_config, parse_config
from transferd.errors import ConfigError
from transferd.plan import PlanRun, load_plan, parse_plan

FUZZED = "fuzzed config and plan inputs"
FIGURE = FUZZED  # what a failure here counts against (conftest.tally)

# The site config and plan of the plan-loading tests, mutated here.
CONFIG = plan_load.CONFIG
PLAN = json.dumps(plan_load.PLAN, indent=1)

# -- strategies ---------------------------------------------------------------------------

_edit = st.tuples(
    st.sampled_from(["insert", "delete", "replace"]),
    st.floats(0, 1),
    st.binary(min_size=1, max_size=12),
)


def _mutate(base: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(base)
    for op, where, blob in edits:
        at = int(where * len(data))
        if op == "insert":
            data[at:at] = blob
        elif op == "delete":
            del data[at : at + len(blob)]
        else:
            data[at : at + len(blob)] = blob
    return bytes(data)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
_trees = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=30,
)
_config_keys = st.sampled_from(
    ["site", "listen", "data_dir", "keys_dir", "peers", "compression", "streams", "traffic",
     "checkpoints", "watch", "tls", "chunk_size", "state_dir", "storage_options", "auth_window_s"]
)


@st.composite
def config_shaped(draw: st.DrawFn) -> bytes:
    """A mapping with the config's own keys and random values, mixed into the good config."""
    base: dict[str, Any] = yaml.safe_load(CONFIG)
    for key, value in draw(st.dictionaries(_config_keys, _trees, max_size=4)).items():
        base[key] = value
    return yaml.safe_dump(base, sort_keys=False).encode()


@st.composite
def plan_shaped(draw: st.DrawFn) -> bytes:
    base = json.loads(PLAN)
    site = base["sites"][0]
    target = draw(st.sampled_from(["top", "site", "sync", "link"]))
    where = {"top": base, "site": site, "sync": site["sync"][0], "link": site["links"][0]}[target]
    key = draw(st.sampled_from([*where.keys(), "extra"]))
    where[key] = draw(_trees)
    return json.dumps(base).encode()


def alias_bomb(width: int, depth: int) -> bytes:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return ("\n".join(lines) + "\n").encode()


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bomb", "deep_yaml", "deep_json", "tag", "big", "bad_utf8"]))
    if kind == "bomb":
        return alias_bomb(draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    if kind == "deep_yaml":
        n = draw(st.integers(50, 1500))
        return ("peers: " + "[" * n + "]" * n + "\n").encode()
    if kind == "deep_json":
        n = draw(st.integers(50, 20_000))
        return ("[" * n + "]" * n).encode()
    if kind == "tag":
        return b"site: !!python/object/apply:os.system ['true']\n" + CONFIG.encode()
    if kind == "big":
        return CONFIG.encode() + b"extra: '" + b"x" * draw(st.integers(1, 1_200_000)) + b"'\n"
    at = draw(st.integers(0, len(CONFIG)))
    return CONFIG.encode()[:at] + draw(st.binary(min_size=1, max_size=4)).replace(
        b"\n", b"\xff"
    ) + b"\xff\xfe" + CONFIG.encode()[at:]


def config_inputs() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=400),
        st.lists(_edit, min_size=1, max_size=6).map(lambda e: _mutate(CONFIG.encode(), e)),
        config_shaped(),
        hostile(),
    )


def plan_inputs() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=400),
        st.lists(_edit, min_size=1, max_size=6).map(lambda e: _mutate(PLAN.encode(), e)),
        plan_shaped(),
        hostile(),
    )


# -- properties ---------------------------------------------------------------------------


def _answered(load: Any, tally: Tally) -> None:
    """`load()` returns a document or raises ConfigError naming the file; anything else fails
    the test (and is counted as not answered cleanly)."""
    error: ConfigError | None = None
    try:
        result = load()
    except ConfigError as exc:
        error, result = exc, None
    except BaseException:
        tally(FUZZED, False)
        raise
    if error is not None:
        clean = "fuzz." in str(error) or "fuzz." in str(error.fields.get("path", ""))
        tally(FUZZED, clean)
        assert clean, f"error does not name the file: {error}"
    else:
        tally(FUZZED, isinstance(result, SiteConfig | PlanRun))


# `tally` only counts, so one instance across examples is what is wanted.
_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
_FAST = settings(max_examples=100, deadline=None, suppress_health_check=_CHECKS)
_LONG = settings(max_examples=2500, deadline=None, suppress_health_check=_CHECKS)


def _config_case(tmp: Path, data: bytes, tally: Tally) -> None:
    path = tmp / "fuzz.yaml"
    path.write_bytes(data)
    _answered(lambda: load_config(path), tally)


def _plan_case(tmp: Path, data: bytes, tally: Tally) -> None:
    path = tmp / "fuzz.json"
    path.write_bytes(data)
    config = parse_config(CONFIG)
    _answered(lambda: load_plan(path, config), tally)


@_FAST
@given(data=config_inputs())
def test_config_loader_answers_every_input(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, tally: Tally
) -> None:
    _config_case(tmp_path_factory.mktemp("c"), data, tally)


@_FAST
@given(data=plan_inputs())
def test_plan_loader_answers_every_input(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, tally: Tally
) -> None:
    _plan_case(tmp_path_factory.mktemp("p"), data, tally)


@pytest.mark.long
@_LONG
@given(data=config_inputs())
def test_config_loader_long(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, tally: Tally
) -> None:
    _config_case(tmp_path_factory.mktemp("c"), data, tally)


@pytest.mark.long
@_LONG
@given(data=plan_inputs())
def test_plan_loader_long(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, tally: Tally
) -> None:
    _plan_case(tmp_path_factory.mktemp("p"), data, tally)


def test_the_known_hostile_shapes_are_refused_with_their_reason(tmp_path: Path) -> None:
    cases = {
        "bomb.yaml": (alias_bomb(9, 9), "alias bomb"),
        "deep.yaml": (("a: " + "[" * 3000 + "]" * 3000).encode(), "deeper than 64"),
        "bad.yaml": (b"site: A\n\xff\xfe: 1\n", r"not UTF-8 text: byte 0xff at offset 8 \(line 2"),
        "tag.yaml": (b"site: !!python/object/apply:os.system ['true']\n", "YAML syntax error"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=reason) as err:
            load_config(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ConfigError, match="deeper than 64"):
        load_plan(tmp_path / "deep.json", parse_config(CONFIG))
    with pytest.raises(ConfigError, match="JSON syntax error"):
        parse_plan("{nope", parse_config(CONFIG))


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("bomb.yaml", alias_bomb(9, 9), "alias bomb"),
        ("deep.yaml", b"a: " + b"[" * 500 + b"]" * 500, "deeper than 64"),
        ("latin1.yaml", "site: Zürich\n".encode("latin-1"), "not UTF-8"),
        ("file-data-dir.yaml", None, "data_dir: .* is a file, not a folder"),
        ("unknown-protocol.yaml", None, "data_dir: .*Protocol not known"),
    ],
)
def test_serve_answers_hostile_configs_with_exit_2_and_no_traceback(
    tmp_path: Path, name: str, data: bytes | None, reason: str
) -> None:
    import re

    from transferd.site.keys import keygen

    keygen(["A", "B"], tmp_path / "keys")
    if data is None:
        (tmp_path / "a-file").write_text("not a folder")
        data_dir = (
            "data_dir: ./a-file" if name.startswith("file")
            else "data_dir: nosuchproto://bucket/x\nstate_dir: ./state"
        )
        data = (
            f"site: A\nlisten: 127.0.0.1:0\n{data_dir}\nkeys_dir: ./keys\n"
            "peers: {B: {url: 'http://127.0.0.1:9'}}\n"
        ).encode()
    (tmp_path / name).write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "transferd", "serve", "--config", str(tmp_path / name)],
        capture_output=True, text=True, env=env(), timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert re.search(reason, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_a_relay_whose_spill_dir_cannot_be_written(tmp_path: Path) -> None:
    """A relay that would spill into a directory it cannot write learns it at start-up (exit
    2, the field named), not at its first spilled chunk."""
    from transferd.site.keys import keygen

    keygen(["A", "B", "C"], tmp_path / "keys")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "r.yaml").write_text(
        "site: A\nlisten: 127.0.0.1:0\ndata_dir: ./data\nkeys_dir: ./keys\n"
        "peers: {B: {url: 'http://127.0.0.1:9'}, C: {url: 'http://127.0.0.1:9'}}\n"
        "relay: {for_peers: [B], destinations: [C], spill_dir: ./a-file/spill}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "transferd", "serve", "--config", str(tmp_path / "r.yaml")],
        capture_output=True, text=True, env=env(), timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "relay.spill_dir" in done.stderr, done.stderr
    assert "Not a directory" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
