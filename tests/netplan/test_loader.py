"""Loader errors name the field path and the YAML line; nothing but TopologyError escapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netplan import Topology, TopologyError, load_topology, parse_topology
from netplan.cli import cli
from netplan.report import analyze

REPO = Path(__file__).resolve().parents[2]

VALID = """\
name: tiny
sites:
  - id: dc
    kind: onprem
    region: eu
    gpus: {a100: 8}
    gpu_hour_usd: {a100: 1.5}
  - id: cloud
    kind: cloud
    region: us
links:
  - between: [dc, cloud]
    bandwidth_gbps: 10
    rtt_ms: 80
datasets:
  - id: corpus
    site: dc
    size_gb: 1000
    tier: curated
models:
  - id: m
    site: dc
    size_gb: 10
workloads:
  - id: train
    kind: fine_tuning
    model: m
    datasets: [corpus]
    gpu: a100
    gpus: 8
    hours: 2
  - id: serve
    kind: inference
    model: m
    gpu: a100
    gpus: 1
    hours: 24
    clients: [cloud]
    latency_budget_ms: 100
"""


def _line(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle` (so tests don't hard-code numbers)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in document")


def _error(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(text)
    return str(info.value)


def test_valid_document_loads_with_defaults() -> None:
    topo = parse_topology(VALID)
    assert topo.site("cloud").failure_domain == "cloud"
    assert topo.links[0].jitter_ms == 0
    assert topo.links[0].loss_pct == 0
    assert topo.links[0].egress_from("dc") == 0
    assert topo.dataset("corpus").active_fraction == 1.0
    assert topo.transfer.streams == 16


def test_unknown_key() -> None:
    text = VALID.replace("    region: us\n", "    region: us\n    colour: blue\n")
    assert f"sites[1].colour: unknown key (line {_line(text, 'colour')})" in _error(text)


def test_wrong_type() -> None:
    text = VALID.replace("bandwidth_gbps: 10", "bandwidth_gbps: fast")
    message = _error(text)
    assert "links[0].bandwidth_gbps: " in message
    assert ("must be a number >= 1e-06 and <= 1e+15 or a map of site id -> number >= 1e-06 "
            "and <= 1e+15") in message
    assert f"(line {_line(text, 'bandwidth_gbps')})" in message


def test_reference_to_an_undefined_site() -> None:
    text = VALID.replace("    site: dc\n    size_gb: 1000", "    site: nowhere\n    size_gb: 1000")
    assert f"datasets[0].site: unknown site 'nowhere' (line {_line(text, 'nowhere')})" in _error(
        text
    )


def test_reference_to_an_undefined_dataset() -> None:
    text = VALID.replace("datasets: [corpus]", "datasets: [corpus, missing]")
    line = _line(text, "missing")
    assert f"workloads[0].datasets[1]: unknown dataset 'missing' (line {line})" in _error(text)


def test_duplicate_ids() -> None:
    text = VALID.replace("  - id: cloud\n", "  - id: dc\n")
    lines = [n for n, row in enumerate(text.splitlines(), 1) if row.strip() == "- id: dc"]
    assert f"sites[1].id: duplicate id 'dc' (line {lines[1]})" in _error(text)


def test_negative_size() -> None:
    text = VALID.replace("size_gb: 1000", "size_gb: -5")
    assert f"datasets[0].size_gb: must be >= 0 (line {_line(text, 'size_gb: -5')})" in _error(text)


def test_negative_price() -> None:
    text = VALID.replace("gpu_hour_usd: {a100: 1.5}", "gpu_hour_usd: {a100: -1.5}")
    line = _line(text, "-1.5")
    assert f"sites[0].gpu_hour_usd.a100: must be >= 0 (line {line})" in _error(text)


def test_negative_egress_price_in_a_map() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: 80\n    egress_usd_per_gb: {dc: -0.1}")
    line = _line(text, "egress_usd_per_gb")
    assert "links[0].egress_usd_per_gb: must be a number >= 0" in _error(text)
    assert f"(line {line})" in _error(text)


def test_negative_rtt() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: -1")
    assert f"links[0].rtt_ms: must be >= 0 (line {_line(text, 'rtt_ms')})" in _error(text)


def test_loss_of_100_percent() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: 80\n    loss_pct: 100")
    line = _line(text, "loss_pct")
    assert f"links[0].loss_pct: must be >= 0 and < 100 (line {line})" in _error(text)


def test_link_from_a_site_to_itself() -> None:
    text = VALID.replace("between: [dc, cloud]", "between: [dc, dc]")
    line = _line(text, "between")
    assert f"links[0].between: a link from site 'dc' to itself (line {line})" in _error(text)


def test_egress_map_must_name_the_links_ends() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: 80\n    egress_usd_per_gb:\n      edge: 0.1")
    line = _line(text, "edge: 0.1")
    message = _error(text)
    assert "links[0].egress_usd_per_gb.edge: site 'edge' is not an end of this link" in message
    assert f"(line {line})" in message


def test_inference_without_clients() -> None:
    text = VALID.replace("    clients: [cloud]\n", "")
    line = _line(text, "- id: serve")
    message = _error(text)
    assert (
        f"workloads[1].clients: an inference workload needs at least one client (line {line})"
        in (message)
    )


def test_inference_without_budget() -> None:
    text = VALID.replace("    latency_budget_ms: 100\n", "")
    line = _line(text, "- id: serve")
    message = _error(text)
    assert "workloads[1].latency_budget_ms: an inference workload needs a latency budget" in message
    assert f"(line {line})" in message


def test_gpu_without_a_price() -> None:
    text = VALID.replace("gpus: {a100: 8}", "gpus: {a100: 8, h100: 8}")
    assert "sites[0].gpu_hour_usd: no price for GPU type 'h100' listed in gpus" in _error(text)


def test_dataset_stored_outside_its_own_residency() -> None:
    text = VALID.replace("    tier: curated\n", "    tier: curated\n    residency: [us]\n")
    line = _line(text, "residency")
    assert "datasets[0].residency: stored at dc in region eu" in _error(text)
    assert f"(line {line})" in _error(text)


def test_yaml_syntax_error_gives_the_line() -> None:
    text = VALID.replace("    rtt_ms: 80", "    rtt_ms: [80")
    message = _error(text)
    assert message.startswith("YAML syntax error")
    assert "(line " in message


def test_yaml_syntax_error_line_is_exact_for_a_bad_indent() -> None:
    text = "name: x\nsites:\n  - id: a\n   kind: edge\n"
    assert _error(text).endswith("(line 4)")


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping at the top, got list" in _error("- a\n- b\n")
    assert "expected a mapping at the top, got empty" in _error("")


def test_infinite_numbers_are_rejected() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: .inf")
    assert "links[0].rtt_ms:" in _error(text)


def test_several_errors_are_all_reported() -> None:
    text = VALID.replace("rtt_ms: 80", "rtt_ms: -1").replace("size_gb: 1000", "size_gb: -1")
    message = _error(text)
    assert "links[0].rtt_ms" in message
    assert "datasets[0].size_gb" in message


def test_load_topology_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(VALID.replace("rtt_ms: 80", "rtt_ms: -1"))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(info.value).startswith(f"{path}: links[0].rtt_ms: must be >= 0")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "netplan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_cli_reports_topology_errors_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    text = VALID.replace("rtt_ms: 80", "rtt_ms: -1")
    path.write_text(text)
    done = _run_cli("analyze", str(path))
    assert done.returncode == 2
    assert f"links[0].rtt_ms: must be >= 0 (line {_line(text, 'rtt_ms')})" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_reports_yaml_syntax_errors_with_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nsites: [\n  {id: a\n")
    done = CliRunner().invoke(cli, ["analyze", str(broken)])
    assert done.exit_code == 2
    assert f"{broken}: YAML syntax error" in done.stderr
    assert "(line 3)" in done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)


# -- fuzzing -------------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "name",
        "sites",
        "links",
        "datasets",
        "models",
        "workloads",
        "transfer",
        "id",
        "kind",
        "region",
        "between",
        "rtt_ms",
        "size_gb",
        "tier",
        "gpus",
        "clients",
        "zz",
    ]
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(_paths(value, (*prefix, index)))
    return out


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replace(node[head], rest, value)}
    copy = list(node)
    copy[head] = _replace(node[head], rest, value)
    return copy


_BASE = yaml.safe_load(VALID)
_BASE_PATHS = _paths(_BASE)


def _outcome(text: str) -> Topology | TopologyError:
    try:
        return parse_topology(text)
    except TopologyError as exc:  # anything else propagates and fails the test
        return exc


def _must_only_raise_topology_error(text: str) -> None:
    outcome = _outcome(text)
    if isinstance(outcome, TopologyError):
        assert outcome.issues
        assert all(issue.message for issue in outcome.issues)
    else:
        # Whatever loads must also analyze: the planner never trips over a valid document.
        report = analyze(outcome)
        assert len(report.decisions) == len(outcome.workloads)
        json.dumps(report.to_json())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0, max_value=len(_BASE_PATHS) - 1), value=_values)
def test_fuzz_mutated_valid_documents(index: int, value: Any) -> None:
    doc = _replace(_BASE, _BASE_PATHS[index], value)
    _must_only_raise_topology_error(yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None)
@given(doc=st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_random_documents(doc: dict[str, Any]) -> None:
    _must_only_raise_topology_error(yaml.safe_dump(doc))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(VALID)), junk=st.text(max_size=6))
def test_fuzz_damaged_text(cut: int, junk: str) -> None:
    _must_only_raise_topology_error(VALID[:cut] + junk + VALID[cut:])


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str) -> None:
    _must_only_raise_topology_error(text)


def test_a_json_topology_loads_and_its_errors_name_the_line(tmp_path: Path) -> None:
    doc = yaml.safe_load(VALID)
    good = tmp_path / "t.json"
    good.write_text(json.dumps(doc, indent=2))
    assert load_topology(good) == parse_topology(VALID)
    doc["links"][0]["rtt_ms"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc, indent=2))
    with pytest.raises(TopologyError) as err:
        load_topology(bad)
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if '"rtt_ms"' in text)
    assert str(err.value) == f"{bad}: links[0].rtt_ms: must be >= 0 (line {line})"
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n "sites": [}')
    with pytest.raises(TopologyError, match=r"JSON syntax error: .* \(line 2\)"):
        load_topology(broken)
