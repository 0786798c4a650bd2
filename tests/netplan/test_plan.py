"""The plan file: built from sync rules, round-trips through JSON, rejects other versions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netplan import Network, PlanError, Report, analyze, build_plan, parse_topology
from netplan._sync import plan_sync
from netplan.plan import SCHEMA_VERSION, Plan, TrafficClass
from tests._three_sites import THREE_SITES

TOPO = THREE_SITES + """\
  - {id: serve-edge, kind: batch_inference, model: m, datasets: [corpus-approved],
     gpu: h100, gpus: 1, hours: 1}
"""


def _plan() -> Plan:
    """The plan with the workloads placed by hand (serve-edge at the GPU-less edge on purpose)."""
    topo = parse_topology(TOPO)
    net = Network(topo)
    sync = plan_sync(topo, net, {"tune": ["cloud"], "serve-edge": ["edge"]})
    report = Report(topology=topo.name, settings=net.settings, links=net.links, decisions=(),
                    sync_plan=sync)
    return build_plan(topo, report)


def test_plan_lists_sync_entries_checkpoints_and_link_policies_per_site() -> None:
    plan = _plan()
    assert plan.schema_version == SCHEMA_VERSION
    onprem = plan.site("onprem")
    assert sorted((e.destination, e.path_prefix, e.via) for e in onprem.sync) == [
        ("cloud", "approved/corpus-approved/", ()),
        ("edge", "approved/corpus-approved/", ("cloud",)),
    ]
    assert all(e.traffic_class is TrafficClass.SYNC for e in onprem.sync)
    assert not any("corpus-raw" in e.path_prefix for s in plan.sites for e in s.sync)
    [ck] = plan.site("cloud").checkpoints
    assert ck.path_prefix == "checkpoints/tune/"
    assert ck.retain == 3
    # no egress price anywhere: the wider link (10 Gbit/s to onprem) wins the second domain
    assert ck.targets == ("onprem",)
    # weights follow each link's daily volume: cloud -> edge relays sync only, cloud -> onprem
    # carries only checkpoints (16 GB x 24 per day)
    policies = {p.peer: p for p in plan.site("cloud").links}
    assert set(policies) == {"onprem", "edge"}
    assert policies["edge"].class_weights == {TrafficClass.CHECKPOINT: 1, TrafficClass.SYNC: 100}
    assert policies["onprem"].class_weights == {TrafficClass.CHECKPOINT: 100,
                                                TrafficClass.SYNC: 1}
    assert policies["edge"].rate_caps_mbps[TrafficClass.SYNC] == 500.0  # 1 Gbit/s x 0.5 share
    assert plan.site("edge").sync == ()


def test_plan_round_trips_through_json_text() -> None:
    plan = _plan()
    text = plan.to_json_text()
    data = json.loads(text)
    assert data["schema_version"] == SCHEMA_VERSION == 3
    assert data["sites"][0]["sync"][0]["traffic_class"] == "sync"
    assert Plan.from_json(text) == plan
    assert Plan.from_json(data) == plan


def test_other_schema_versions_and_bad_fields_are_plan_errors() -> None:
    data = _plan().to_json()
    with pytest.raises(PlanError, match=r"schema_version: 1 is not supported"):
        Plan.from_json({**data, "schema_version": 1})
    bad = json.loads(json.dumps(data))
    bad["sites"][0]["sync"][0]["traffic_class"] = "bulk"
    with pytest.raises(PlanError, match=r"sites\[0\]\.sync\[0\]\.traffic_class: Input should be"):
        Plan.from_json(bad)
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json("{nope")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=3),
                    max_leaves=12))
def test_any_json_value_is_a_plan_or_a_plan_error(value: object) -> None:
    doc = {"schema_version": SCHEMA_VERSION, "topology": "t", "sites": value}
    try:
        Plan.from_json(json.dumps(doc))
    except PlanError:
        pass


# ----------------------------------------------------------------------------------------------
# The CLI: `netplan plan FILE -o plan.json` and the report keys of `netplan analyze --json`.

EXAMPLE = "topologies/onprem-data-cloud-burst-edge.yaml"


def test_netplan_plan_writes_a_plan_that_loads_back(tmp_path: object) -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from netplan.cli import cli

    out = Path(str(tmp_path)) / "plan.json"
    result = CliRunner().invoke(cli, ["plan", EXAMPLE, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "schema_version 3" in result.output
    plan = Plan.from_json(out.read_text())
    onprem = plan.site("onprem-fra")
    assert {(e.dataset, e.destination) for e in onprem.sync} == {
        ("claims-curated", "aws-euc1"), ("claims-curated", "edge-lyon"),
        ("claims-curated", "edge-munich")}
    [ck] = plan.site("aws-euc1").checkpoints
    assert (ck.workload, ck.targets, ck.retain) == ("finetune-claims", ("onprem-fra",), 3)
    assert not any(e.dataset == "claims-raw" for s in plan.sites for e in s.sync)


def test_analyze_json_carries_shard_replication_sync_plan_and_latency_budgets() -> None:
    from click.testing import CliRunner

    from netplan.cli import cli

    result = CliRunner().invoke(cli, ["analyze", EXAMPLE, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    [ix] = report["shard_replication"]
    assert {"index", "solver", "objective_usd_per_day", "greedy_objective_usd_per_day", "shards",
            "p99_ms", "feasible", "reason"} <= set(ix)
    assert ix["index"] == "claims-docs"
    assert ix["feasible"] is True
    # Lyon is 12 ms p99 from Frankfurt + 6 ms search > 15 ms: every shard gets a Lyon copy
    assert all(s["sites"] == ["edge-lyon", "onprem-fra"] for s in ix["shards"])
    assert ix["p99_ms"] == {"edge-lyon": 6.0, "edge-munich": 13.0, "aws-euc1": 8.0}
    assert ix["objective_usd_per_day"] <= ix["greedy_objective_usd_per_day"]
    links = {tuple(link["between"]): link for link in report["sync_plan"]["links"]}
    # 800 GB of curated data a day, plus claims-docs' 20 GB of daily updates to its Lyon copies
    assert links["onprem-fra", "edge-lyon"]["sync_gb_per_day"] == 820.0
    assert links["onprem-fra", "edge-lyon"]["flagged"] is False
    [budget] = report["latency_budgets"]
    assert budget["workload"] == "branch-assistant"
    assert budget["total_ms"] == pytest.approx(sum(budget["components_ms"].values()), abs=0.01)


def test_a_sync_rule_moving_raw_data_fails_the_cli_with_the_line(tmp_path: object) -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from netplan.cli import cli

    text = Path(EXAMPLE).read_text().replace(
        "sync_rules:\n", "sync_rules:\n  - {id: leak, datasets: [claims-raw], to: [aws-euc1]}\n")
    at = text.splitlines().index("sync_rules:") + 2  # 1-based line of the inserted rule
    bad = Path(str(tmp_path)) / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(cli, ["plan", str(bad), "-o", str(Path(str(tmp_path)) / "p")])
    assert result.exit_code == 2
    assert (f"sync_rules[0].datasets[0]: dataset 'claims-raw' is raw-tier: raw data never "
            f"leaves its site (line {at})") in result.output


# ----------------------------------------------------------------------------------------------
# Vector-index shards: the solver's placement becomes mirrored folders in the plan, and their
# daily update volume counts in the links' sync load.

SHARDS = THREE_SITES + """\
vector_indexes:
  - {id: docs, site: onprem, shards: 2, shard_gb: 5, update_gb_per_day: 8,
     queries: {onprem: 10, edge: 50}, latency_budget_ms: 15, search_ms: 5}
"""


def test_plan_carries_the_shard_placement_as_mirrored_folders() -> None:
    topo = parse_topology(SHARDS)
    report = analyze(topo)
    [ix] = report.shard_replication
    # edge is 25 ms from onprem (5 + 20): over the 15 ms budget, so both shards get an edge copy
    assert [p.sites for p in ix.shards] == [("edge", "onprem"), ("edge", "onprem")]
    plan = build_plan(topo, report)
    shards = plan.site("onprem").shards
    assert [(e.path_prefix, e.destination, e.via, e.shard, e.size_gb, e.gb_per_day)
            for e in shards] == [
        ("approved/docs/shard-0000/", "edge", ("cloud",), 0, 5.0, 4.0),
        ("approved/docs/shard-0001/", "edge", ("cloud",), 1, 5.0, 4.0)]
    assert all(e.traffic_class is TrafficClass.SYNC for e in shards)
    assert list(plan.site("onprem").mirrors())[-2:] == list(shards)
    # 2 shards x 4 GB/day ride onprem -> cloud -> edge beside the approved dataset's 50 GB
    assert report.sync_plan is not None
    loads = {(x.sender, x.receiver): x.sync_gb_per_day for x in report.sync_plan.links}
    assert loads["cloud", "edge"] == pytest.approx(8.0)
    assert Plan.from_json(plan.to_json_text()) == plan
