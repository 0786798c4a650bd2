"""The analyze report: the JSON contract, the shipped example topologies, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from netplan import Infeasible, load_topology, parse_topology
from netplan.cli import cli
from netplan.report import SCHEMA_VERSION, analyze

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "topologies").glob("*.yaml"))
QUICKSTART = REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml"

DECISION_FIELDS = {
    "workload",
    "kind",
    "action",
    "feasible",
    "path",
    "transfer_gb",
    "transfer_seconds",
    "egress_usd",
    "compute_usd",
    "total_usd",
    "completion_hours",
    "reason",
    "alternatives",
}


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netplan", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_there_are_three_example_topologies() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "onprem-data-cloud-burst-edge.yaml",
        "cloud-first-onprem-retraining.yaml",
        "multicloud-inference-governance.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_topology_analyzes_with_every_workload_placed(path: Path) -> None:
    topo = load_topology(path)
    report = analyze(topo)
    assert report.decisions
    assert not report.infeasible(), [d.reason for d in report.infeasible()]
    report.require_feasible()
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["topology"] == topo.name
    assert len(doc["links"]) == len(topo.links)


def test_json_shape() -> None:
    report = analyze(load_topology(QUICKSTART))
    doc = report.to_json()
    assert doc["schema_version"] == 2
    assert doc["topology"] == "onprem-data-cloud-burst-edge"
    for decision in doc["decisions"]:
        assert DECISION_FIELDS <= set(decision)
        where = "sites" if decision["kind"] == "inference" else "site"
        assert where in decision
        for alt in decision["alternatives"]:
            assert (DECISION_FIELDS - {"workload", "kind", "reason", "alternatives"}) <= set(alt)
            assert alt["rejected_because"]
        cost = decision["cost"]
        assert decision["total_usd"] == cost["total_usd"] == pytest.approx(
            cost["compute_usd"] + cost["egress_usd"] + cost["storage_usd"] + cost["relay_usd"],
            abs=1e-3,
        )
        assert cost["egress_usd"] == decision["egress_usd"]
        for move in decision["movements"]:
            assert sum(r["share"] for r in move["routes"]) == pytest.approx(1)
            assert move["why"]
    inference = next(d for d in doc["decisions"] if d["kind"] == "inference")
    assert isinstance(inference["sites"], list)
    assert inference["worst_client"]["p99_ms"] <= 10
    for link in doc["links"]:
        assert set(link) >= {"between", "rtt_ms", "jitter_ms", "directions"}
        there, back = link["directions"]
        assert [there["from"], there["to"]] == link["between"] == [back["to"], back["from"]]
        for direction in (there, back):
            assert direction["limited_by"] in {"capacity", "window", "loss"}
            assert direction["effective_gbps"] > 0


def test_infeasible_decision_json_and_strict_error() -> None:
    from netplan_builders import link, site, topology

    topo = topology(
        sites=[site("dc", "eu", "onprem"), site("cloud", "eu", h100=(8, 4.0))],
        links=[link("dc", "cloud", 10, 5)],
        datasets=[{"id": "raw", "site": "dc", "size_gb": 10, "tier": "raw"}],
        workloads=[
            {
                "id": "job",
                "kind": "embedding",
                "datasets": ["raw"],
                "gpu": "h100",
                "gpus": 8,
                "hours": 1,
            }
        ],
    )
    report = analyze(topo)
    decision = report.to_json()["decisions"][0]
    assert decision["feasible"] is False
    assert decision["action"] == "none"
    assert decision["site"] is None
    assert "raw-tier dataset raw cannot leave dc" in decision["reason"]
    with pytest.raises(Infeasible) as info:
        report.require_feasible()
    assert info.value.workload == "job"
    assert "no h100 GPUs at dc" in info.value.constraints


def test_quickstart_command_runs() -> None:
    done = _run_cli("analyze", str(QUICKSTART.relative_to(REPO)))
    assert done.returncode == 0, done.stderr
    assert "finetune-claims" in done.stdout
    assert "stage_subset" in done.stdout
    assert "limited by" in done.stdout


def _invoke(*args: str) -> Result:
    """The CLI in-process (fast); the subprocess tests cover the real entry point."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_flags_override_the_tcp_model() -> None:
    base = json.loads(_invoke("analyze", str(QUICKSTART), "--json").stdout)
    one = json.loads(
        _invoke(
            "analyze", str(QUICKSTART), "--json", "--streams", "1", "--window-bytes", "65536"
        ).stdout
    )
    assert base["transfer"]["streams"] == 16
    assert one["transfer"] == {**base["transfer"], "streams": 1, "window_bytes": 65536}
    # One 64 KiB window over the 90 ms backbone: 5.8 Mbit/s, window-limited.
    backbone = [x for x in one["links"] if x["between"] == ["aws-euc1", "aws-use1"]][0]
    for direction in backbone["directions"]:
        assert direction["limited_by"] == "window"
        assert direction["effective_gbps"] == pytest.approx(65536 * 8 / 0.090 / 1e9, rel=1e-4)


def test_schema_command_prints_the_topology_json_schema() -> None:
    done = _invoke("schema")
    assert done.exit_code == 0
    schema = json.loads(done.stdout)
    assert set(schema["properties"]) >= {
        "name",
        "sites",
        "links",
        "datasets",
        "models",
        "workloads",
        "transfer",
    }
    assert schema["additionalProperties"] is False


def test_the_readme_topology_tour_is_a_valid_topology() -> None:
    readme = (REPO / "README.md").read_text()
    tour = readme.split("## Topology format", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    report = analyze(parse_topology(tour, source="README.md"))
    assert [d.action for d in report.decisions] == ["stage_subset", "stage_subset",
                                                    "replicate_model"]
    assert not report.infeasible()
