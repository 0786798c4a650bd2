"""Numbers at the edges of what a topology accepts: `netplan analyze` and `netplan plan` answer
(a report, or an error naming the field, exit 2), never a traceback. A dataset of 1.7e308 GB
(finite, so it was accepted) made a move's byte count inf and its cost NaN, and analyze
raised `ValueError: min() arg is an empty sequence` from the planner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from netplan.cli import cli
from netplan.topology import MAX_QUANTITY, MIN_BANDWIDTH_GBPS

HUGE = 1.7e308  # the largest doubles: finite, but a few of them multiplied are not


def _topology(**changes: Any) -> dict[str, Any]:
    site_a: dict[str, Any] = {"id": "a", "kind": "onprem", "region": "r1", "gpus": {"a100": 8},
                              "gpu_hour_usd": {"a100": 1.0}, "storage_usd_per_gb_month": 0.0}
    site_b: dict[str, Any] = {"id": "b", "kind": "cloud", "region": "r2", "gpus": {"h100": 8},
                              "gpu_hour_usd": {"h100": 4.0}, "relay_usd_per_gb": 0.0}
    link: dict[str, Any] = {"between": ["a", "b"], "bandwidth_gbps": 10, "rtt_ms": 5,
                            "jitter_ms": 0, "egress_usd_per_gb": 0}
    dataset: dict[str, Any] = {"id": "d1", "site": "a", "size_gb": 100, "tier": "curated"}
    model: dict[str, Any] = {"id": "m1", "site": "a", "size_gb": 10}
    workload: dict[str, Any] = {"id": "w1", "kind": "fine_tuning", "model": "m1",
                                "datasets": ["d1"], "gpu": "h100", "gpus": 8, "hours": 10}
    parts = {"site_a": site_a, "site_b": site_b, "link": link, "dataset": dataset,
             "model": model, "workload": workload}
    for key, value in changes.items():
        part, _, name = key.partition("__")
        parts[part][name] = value
    return {"name": "extreme", "sites": [site_a, site_b], "links": [link],
            "datasets": [dataset], "models": [model], "workloads": [workload]}


FIELDS = [
    "dataset__size_gb", "model__size_gb", "link__rtt_ms", "link__jitter_ms",
    "link__egress_usd_per_gb", "link__bandwidth_gbps", "site_a__storage_usd_per_gb_month",
    "site_b__relay_usd_per_gb", "workload__hours", "workload__deadline_hours",
]


def _run(tmp_path: Path, doc: dict[str, Any], *args: str) -> tuple[int, str]:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = CliRunner().invoke(cli, [*args[:1], str(path), *args[1:]],
                                env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test's failure, with its cause
    return result.exit_code, result.output


@pytest.mark.parametrize("field", FIELDS)
def test_the_largest_accepted_value_of_each_quantity_is_planned(
    tmp_path: Path, field: str
) -> None:
    doc = _topology(**{field: MAX_QUANTITY})
    code, output = _run(tmp_path, doc, "analyze")
    assert code == 0, output
    code, output = _run(tmp_path, doc, "plan", "-o", str(tmp_path / "plan.json"),
                        "--allow-infeasible")
    assert code == 0, output


@pytest.mark.parametrize("field", FIELDS)
def test_a_value_past_it_is_refused_naming_the_field(tmp_path: Path, field: str) -> None:
    code, output = _run(tmp_path, _topology(**{field: HUGE}), "analyze")
    assert code == 2, output
    part, _, name = field.partition("__")
    where = {"site_a": "sites[0]", "site_b": "sites[1]", "link": "links[0]",
             "dataset": "datasets[0]", "model": "models[0]", "workload": "workloads[0]"}[part]
    assert f"{where}.{name}: " in output
    assert "1e+15" in output or "1000000000000000" in output


def test_the_smallest_bandwidth_with_the_largest_size_is_planned(tmp_path: Path) -> None:
    doc = _topology(dataset__size_gb=MAX_QUANTITY, link__bandwidth_gbps=MIN_BANDWIDTH_GBPS)
    code, output = _run(tmp_path, doc, "analyze")
    assert code == 0, output
    code, output = _run(tmp_path, _topology(link__bandwidth_gbps=1e-300), "analyze")
    assert code == 2, output
    assert "links[0].bandwidth_gbps: must be >= 1e-06" in output


@pytest.mark.parametrize("change", [
    "--degrade=link:a,b=0.0000000000000000001%", "--degrade=link:a,b=-99.99999999999999%",
    "--price=egress:*=x1e300", "--price=gpu:h100=x1e300", "--gpus=gpu:h100=+1e300%",
    "--gpus=gpu:h100@b=1000000000000000",
])
def test_whatif_changes_that_would_pass_the_limits_stop_at_them(
    tmp_path: Path, change: str
) -> None:
    """A factor applied to the largest accepted size: the changed value stops at what a
    topology may state (`1e-300gbps` made the planner's costs NaN; a count of 1e20 GPUs at a
    site, an OverflowError)."""
    code, output = _run(tmp_path, _topology(dataset__size_gb=MAX_QUANTITY), "whatif", change)
    assert code == 0, output


@pytest.mark.parametrize(("change", "says"), [
    ("--degrade=link:a,b=1e-300gbps", "must be between 1e-06 and 1e+15 Gbit/s"),
    ("--price=egress:*=1e300", "must be >= 0 and <= 1e+15"),
    ("--gpus=gpu:h100@b=100000000000000000000", "must be a whole number >= 0 and <= 1e+15"),
])
def test_whatif_values_past_the_limits_are_usage_errors(
    tmp_path: Path, change: str, says: str
) -> None:
    code, output = _run(tmp_path, _topology(dataset__size_gb=MAX_QUANTITY), "whatif", change)
    assert code == 2, output
    assert says in output


def test_a_measured_overlay_is_held_to_the_same_limits(tmp_path: Path) -> None:
    """`analyze --measured` with a measured value the topology could not state: exit 2
    naming it and its line (inf was a pydantic traceback from laying it over the link)."""
    (tmp_path / "m.yaml").write_text(
        "measured_links:\n  - {between: [a, b], from: a, rtt_ms: .inf, samples: 10}\n"
        "  - {between: [a, b], from: b, bandwidth_gbps: 1.0e-300, samples: 10}\n")
    code, output = _run(tmp_path, _topology(), "analyze", "--measured",
                        str(tmp_path / "m.yaml"))
    assert code == 2, output
    assert "measured_links[0].rtt_ms: Input should be a finite number (line 2)" in output
    assert "measured_links[1].bandwidth_gbps: must be >= 0.000001 (line 3)" in output
