"""`netplan whatif`: outcomes worked out by hand on small topologies (failover to the standby
holding the newest checkpoint, a relay path that becomes the only feasible one, an egress price
shock flipping move_data to move_compute, the single points of failure of a shipped topology),
incremental re-planning against a full re-analysis, and the scenario language's errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from netplan_builders import link, site, topology

from netplan import Topology
from netplan.loader import load_topology
from netplan.scenarios import (
    Scenario,
    ScenarioError,
    apply_scenario,
    parse_change,
    parse_scenarios,
    sweep,
)
from netplan.whatif import (
    Baseline,
    ScenarioResult,
    WhatifOptions,
    build_baseline,
    evaluate,
    summarize_sweep,
)
from netplan.whatif_schema import WhatifDocument

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))


def _scenario(*changes: str) -> Scenario:
    parsed = tuple(parse_change(*c.split(" ", 1)) for c in changes)
    return Scenario(" + ".join(changes), parsed)


def _run(baseline: Baseline, *changes: str) -> ScenarioResult:
    result = evaluate(baseline, _scenario(*changes))
    assert result.error is None
    return result


def _after(result: ScenarioResult, workload: str) -> Any:
    return next(c.after for c in result.changes if c.workload == workload)


# -- data-aware failover ----------------------------------------------------------------------


def _failover_topology(s_to_c_gbps: float, leaving_t_usd: float, every_hours: float = 2,
                       deadline_hours: float = 60) -> Topology:
    """A fine-tune of model m (50 GB, at registry R) on corpus (5,000 GB, at T) runs at T
    (8 H100 at $3/h, 40 h). S ($4/h) holds a synced copy of corpus and receives every
    checkpoint over 10 Gbit/s; C is the cheapest ($1.50/h) and reachable only through S."""
    priced = {"T": leaving_t_usd}
    return topology(
        sites=[site("T", "eu", h100=(8, 3.0)), site("S", "eu", h100=(8, 4.0)),
               site("C", "eu", h100=(8, 1.5)), site("R", "eu", "onprem")],
        links=[link("R", "T", 10, 5, egress_usd_per_gb=priced),
               link("T", "S", 10, 5, egress_usd_per_gb=priced),
               link("R", "S", 10, 5), link("S", "C", s_to_c_gbps, 5)],
        datasets=[{"id": "corpus", "site": "T", "size_gb": 5000, "tier": "curated"}],
        models=[{"id": "m", "site": "R", "size_gb": 50}],
        workloads=[{"id": "ft", "kind": "fine_tuning", "model": "m", "datasets": ["corpus"],
                    "gpu": "h100", "gpus": 8, "hours": 40, "deadline_hours": deadline_hours}],
        sync_rules=[{"id": "copy", "datasets": ["corpus"], "to": ["S"],
                     "change_fraction_per_day": 0.01}],
        checkpoint_replication=[{"workload": "ft", "every_hours": every_hours, "to": ["S"]}],
    )


def test_a_failed_run_resumes_where_the_newest_checkpoint_is_not_where_gpus_are_cheapest(
) -> None:
    # By hand: T fails half way (20 h of 40 done, 20.01 h after the start: the model took
    # 40 s to arrive). S holds a checkpoint at most 2 h + 80 s old (50 GB at half of 10 Gbit/s)
    # and the corpus: it resumes at once, 22.02 h of compute, done 42.0 h after the start.
    # C costs $1.50 instead of $4.00 per GPU-hour but must first receive the checkpoint and the
    # 5,000 GB corpus from S over 0.5 Gbit/s: 8 x 5,050 / 0.5 s = 22.4 h, then 22.02 h of
    # compute: 64.5 h after the start, past the 60 h deadline.
    baseline = build_baseline(_failover_topology(0.5, 0.0))
    assert baseline.summaries["ft"].sites == ("T",)
    result = _run(baseline, "fail site:T")
    (failover,) = result.failovers
    best, cheap = failover.standbys
    assert (best.site, best.checkpoint_from, best.meets_deadline) == ("S", "S", True)
    assert best.lost_hours == pytest.approx(2 + 80.005 / 3600)
    assert best.restore_hours == 0
    assert best.cost_usd == pytest.approx((20 + best.lost_hours) * 8 * 4.0)
    assert failover.elapsed_hours + best.finish_hours == pytest.approx(42.03, abs=0.01)
    assert (cheap.site, cheap.meets_deadline) == ("C", False)
    assert cheap.cost_usd < best.cost_usd  # cheaper, and still second
    assert cheap.restore_hours == pytest.approx(8 * 5050 / 0.5 / 3600, abs=0.01)
    assert failover.elapsed_hours + cheap.finish_hours > 60
    assert failover.recommendation is None  # the replication as planned meets the deadline
    # Planned from scratch (no checkpoint), the run also goes to S: C cannot get the corpus
    # in time.
    assert _after(result, "ft").sites == ("S",)


def test_the_cheaper_standby_wins_when_it_can_restore_in_time() -> None:
    # The same estate with a 10 Gbit/s S-C link (5,050 GB in 1.1 h) and $0.20/GB to leave T,
    # so the baseline still runs at T (C would pay $1,000 of egress): after T fails, C
    # finishes by 43.2 h for $277 against S's $705, and wins.
    baseline = build_baseline(_failover_topology(10, 0.2))
    assert baseline.summaries["ft"].sites == ("T",)
    (failover,) = _run(baseline, "fail site:T").failovers
    best, second = failover.standbys
    assert (best.site, best.checkpoint_from, best.meets_deadline) == ("C", "S", True)
    assert best.restore_hours == pytest.approx(8 * 5050 / 10 / 3600 + 0.01 / 3600, abs=1e-3)
    assert (second.site, second.meets_deadline) == ("S", True)
    assert best.cost_usd < second.cost_usd


def test_a_cadence_is_recommended_when_the_replication_cannot_meet_the_deadline() -> None:
    # Checkpoints every 12 h, deadline 50 h: S loses up to 12.02 h of work and finishes at
    # 52.0 h. The deadline lets the run lose 50 - 20.011 - 20 = 9.989 h at S; one checkpoint
    # takes 80.005 s to get there, so a checkpoint every 9.966 h (597 min) meets it.
    baseline = build_baseline(_failover_topology(0.5, 0.0, every_hours=12, deadline_hours=50))
    (failover,) = _run(baseline, "fail site:T").failovers
    assert not any(s.meets_deadline for s in failover.standbys)
    assert failover.rpo_target_hours == pytest.approx(50 - 20 - 40.005 / 3600 - 20)
    assert failover.recommendation is not None
    assert failover.recommendation.startswith(
        "pre-replicate checkpoints of ft to S every 597 min to meet RPO <= 10.0 h")
    assert "now: every 12 h to S" in failover.recommendation


def test_a_declared_rpo_is_held_to() -> None:
    doc = _failover_topology(0.5, 0.0).model_dump()
    doc["checkpoint_replication"][0]["rpo_hours"] = 1
    (failover,) = _run(build_baseline(Topology.model_validate(doc)), "fail site:T").failovers
    assert failover.standbys[0].meets_deadline  # the deadline holds, the 1 h RPO does not
    assert failover.recommendation is not None
    assert "to S every 58 min to meet RPO <= 1.0 h" in failover.recommendation


# -- links, prices ----------------------------------------------------------------------------


def _relay_topology() -> Topology:
    """20,000 GB at A for 10 h of compute at B within 20 h: the direct A-B link (10 Gbit/s,
    40 ms, $0.01/GB) or through R (10 Gbit/s per hop, $0.05/GB)."""
    return topology(
        sites=[site("A", "eu", "onprem"), site("R", "eu"), site("B", "eu", h100=(8, 2.0))],
        links=[link("A", "B", 10, 40, egress_usd_per_gb=0.01),
               link("A", "R", 10, 5, egress_usd_per_gb=0.025),
               link("R", "B", 10, 5, egress_usd_per_gb=0.025)],
        datasets=[{"id": "d", "site": "A", "size_gb": 20000, "tier": "curated"}],
        models=[{"id": "m", "site": "B", "size_gb": 10}],
        workloads=[{"id": "train", "kind": "pretraining", "model": "m", "datasets": ["d"],
                    "gpu": "h100", "gpus": 8, "hours": 10, "deadline_hours": 20}],
    )


@pytest.mark.parametrize(("change", "without_relay"), [
    ("loss link:A,B=1%", "deadline 20 h missed"),
    ("fail link:A,B", "no path from A to B within 2 relays"),
])
def test_losing_the_direct_link_leaves_the_relay_path_as_the_only_feasible_one(
        change: str, without_relay: str) -> None:
    # At 1 % loss and 40 ms, Mathis gives 16 x 1460 x 8 x 1.2247 / (0.04 x 0.1) bit/s
    # = 57 Mbit/s: 20,000 GB would take 780 h. Through R it is 4.4 h: the only way to finish
    # in 20 h, at $0.05/GB instead of $0.01.
    baseline = build_baseline(_relay_topology())
    assert baseline.summaries["train"].path == ("A", "B")
    result = _run(baseline, change)
    after = _after(result, "train")
    assert after.feasible
    assert after.path == ("A", "R", "B")
    change_row = next(c for c in result.changes if c.workload == "train")
    assert change_row.cost_delta_usd == pytest.approx(20000 * 0.04, rel=0.01)
    # With the relay gone too, the data cannot arrive in time (or at all).
    lost = _run(baseline, change, "fail site:R")
    assert lost.workloads_lost == ("train",)
    assert without_relay in _after(lost, "train").reason


def _gravity_topology() -> Topology:
    """1,000 GB at D (8 H100 at $3/h); G has 8 H100 at $2/h; 10 h of compute; the 10 GB model
    in a registry M. Leaving D costs $0.02/GB."""
    return topology(
        sites=[site("D", "eu", h100=(8, 3.0)), site("G", "eu", h100=(8, 2.0)),
               site("M", "eu", "onprem")],
        links=[link("D", "G", 10, 10, egress_usd_per_gb={"D": 0.02}),
               link("M", "D", 10, 5, egress_usd_per_gb={"D": 0.02}), link("M", "G", 10, 5)],
        datasets=[{"id": "d", "site": "D", "size_gb": 1000, "tier": "curated"}],
        models=[{"id": "m", "site": "M", "size_gb": 10}],
        workloads=[{"id": "job", "kind": "fine_tuning", "model": "m", "datasets": ["d"],
                    "gpu": "h100", "gpus": 8, "hours": 10}],
    )


def test_an_egress_price_shock_flips_move_data_to_move_compute() -> None:
    # G: $160 compute + $20 egress (+ storage) beats D's $240. At 10x the egress leaving D
    # ($200), D wins: the model moves, not the data.
    baseline = build_baseline(_gravity_topology())
    before = baseline.summaries["job"]
    assert (before.action, before.sites) == ("move_data", ("G",))
    result = _run(baseline, "price egress:D=x10")
    after = _after(result, "job")
    assert (after.action, after.sites) == ("move_compute", ("D",))
    assert after.total_usd == pytest.approx(240, abs=1)
    # A GPU price shock at D the other way round keeps move_data, at the same cost.
    assert not _run(baseline, "price gpu:h100@D=x2").changes


# -- sweeps -----------------------------------------------------------------------------------


def test_n1_sweep_names_the_single_points_of_failure_of_the_shipped_hybrid_topology() -> None:
    # By hand, from topologies/onprem-data-cloud-burst-edge.yaml: onprem-fra holds the only
    # copy of claims-raw (raw data never leaves) and of the model claims-llm-70b, which four
    # workloads need; aws-euc1 is the only site with H100s inside claims-curated's residency
    # (eu-central, eu-west), so finetune-claims has nowhere else to go; aws-use1 holds the
    # only copy of web-corpus (and the only 128 H100s). Every link has a detour.
    topo = load_topology(REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml")
    baseline = build_baseline(topo)
    scenarios = sweep(topo, "n-1")
    assert len(scenarios) == len(topo.sites) + len(topo.links)
    result = summarize_sweep(baseline, [evaluate(baseline, s) for s in scenarios], "n-1")
    spofs = {p.element: set(p.breaks) for p in result.single_points_of_failure}
    assert spofs == {
        "site:onprem-fra": {"finetune-claims", "embed-claims-raw", "pretrain-continue",
                            "eval-claims"},
        "site:aws-euc1": {"finetune-claims"},
        "site:aws-use1": {"pretrain-continue"},
    }
    assert result.ranking[0].scenario.name == "site:onprem-fra"
    fra = result.ranking[0]
    assert ("claims-raw", "dataset claims-raw had no copy outside onprem-fra") in fra.lost
    assert ("claims-curated", "onprem-fra", "aws-euc1") in fra.rehomed
    # The branch assistant loses its aws-euc1 replica with that site: Munich is then 19 ms
    # (p99) from Lyon against a 10 ms budget.
    euc1 = next(r for r in result.scenarios if r.scenario.name == "site:aws-euc1")
    (assistant,) = euc1.inference
    munich = next(c for c in assistant.clients if c.client == "edge-munich")
    assert (munich.site, munich.p99_ms, munich.misses) == ("edge-lyon", 19.0, True)
    assert _after(euc1, "branch-assistant").sites == ("edge-lyon", "edge-munich")


def _estate(sites: int, seed: int) -> Topology:
    import importlib.util

    spec = importlib.util.spec_from_file_location("netplan_scale",
                                                  REPO / "benchmarks" / "netplan_scale.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("netplan_scale", module)
    spec.loader.exec_module(module)
    return Topology.model_validate(module.generate(seed, sites, sites * 5, sites // 5))


@pytest.mark.parametrize("source", [*(p.name for p in SHIPPED), "estate-30"])
def test_incremental_re_planning_answers_what_a_full_re_analysis_answers(source: str) -> None:
    topo = _estate(30, 5) if source == "estate-30" else load_topology(REPO / "topologies"
                                                                      / source)
    baseline = build_baseline(topo)
    scenarios = list(sweep(topo, "n-1"))
    first, second = topo.links[0].between, topo.links[-1].between
    scenarios += [_scenario(f"degrade link:{first[0]},{first[1]}=20%"),
                  _scenario(f"loss link:{second[0]},{second[1]}=2%"),
                  _scenario(f"price egress:{topo.sites[0].id}=x3"),
                  _scenario(f"gpus site:{topo.sites[1].id}=-50%"),
                  _scenario("price egress:*=x0.5")]  # cheaper: everything re-planned
    full = WhatifOptions(incremental=False)
    skipped = 0
    for s in scenarios:
        ours, theirs = evaluate(baseline, s), evaluate(baseline, s, full)
        assert ours.same_outcome(theirs), s.name
        skipped += ours.skipped
    assert skipped > 0  # (the incremental path did skip work)
    cheaper = evaluate(baseline, scenarios[-1])
    assert cheaper.skipped == 0


def test_n2_pairs_are_re_planned_incrementally_too() -> None:
    topo = load_topology(REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml")
    baseline = build_baseline(topo)
    pairs = sweep(topo, "n-2")
    # 12 elements make 66 pairs; the 14 that pair a site with one of its own links are left out
    assert len(pairs) == 66 - 14
    full = WhatifOptions(incremental=False)
    results = [evaluate(baseline, s) for s in pairs]
    assert all(r.same_outcome(evaluate(baseline, s, full)) for r, s in zip(results, pairs,
                                                                           strict=True))
    # Both DX and the VPN gone: onprem-fra reaches AWS only through the branches' 1 Gbit/s
    # links. The fine-tune's 10,000 GB subset takes 22.2 h over one (52.2 h with the 30 h of
    # compute, past 48 h), so it is split over both: 17.7 h, done at the deadline.
    both = next(r for r in results
                if r.scenario.name == "link:onprem-fra,aws-euc1 + link:onprem-fra,aws-use1")
    after = _after(both, "finetune-claims")
    assert after.sites == ("aws-euc1",)
    assert after.path == ("onprem-fra", "edge-lyon", "aws-euc1")
    assert "via onprem-fra -> edge-munich -> aws-euc1" in after.reason
    assert after.completion_hours is not None
    assert after.completion_hours <= 48 + 1e-6
    with pytest.raises(ScenarioError, match="more than --max-scenarios 10"):
        sweep(topo, "n-2", max_scenarios=10)


def test_applying_a_scenario_keeps_the_topology_valid() -> None:
    topo = load_topology(REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml")
    baseline = build_baseline(topo)
    scenario = _scenario("fail site:edge-lyon", "degrade link:onprem-fra,aws-euc1=-75%",
                         "price gpu:h100=x1.5", "gpus gpu:h100@aws-use1=-50%")
    applied = apply_scenario(topo, scenario, baseline.copies, baseline.shard_sites)
    again = Topology.model_validate(applied.topology.model_dump())  # every reference resolves
    dx = next(k for k in again.links if set(k.between) == {"onprem-fra", "aws-euc1"})
    assert dx.bandwidth_from("onprem-fra") == pytest.approx(2.5)
    assert again.site("aws-use1").gpus["h100"] == 128
    assert again.site("aws-use1").gpu_hour_usd["h100"] == pytest.approx(4.916 * 1.5)
    assistant = next(w for w in again.workloads if w.id == "branch-assistant")
    assert assistant.clients == ("edge-munich",)
    assert "edge-lyon" not in again.vector_indexes[0].queries


# -- the scenario language --------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "text", "message"), [
    ("fail", "region:eu", "'region' cannot fail"),
    ("fail", "link:a", "must name two sites"),
    ("degrade", "link:a,b", "needs a value after '='"),
    ("degrade", "link:a,b=30", "'30' needs a % sign"),
    ("degrade", "link:a,b=0%", "leaves nothing: fail the link instead"),
    ("degrade", "site:a=30%", "'site:a' is not a link"),
    ("loss", "link:a,b=100%", "must be >= 0% and < 100%"),
    ("price", "egress:a=xx2", "multiplier 'x2' is not a number"),
    ("price", "storage:a=x2", "'storage' has no price here"),
    ("gpus", "site:a=50%", "needs a sign: -50% or +50%"),
    ("gpus", "site:a=16", "needs one type at one site"),
    ("gpus", "gpu:h100@a=1.5", "must be a whole number"),
])
def test_bad_scenario_text_names_the_part_that_is_wrong(kind: str, text: str,
                                                       message: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_change(kind, text)
    assert str(caught.value).startswith(f"--{kind} {text!r}: ")
    assert message in str(caught.value)


def test_scenario_file_errors_name_the_field_and_line(tmp_path: Path) -> None:
    from netplan.scenarios import load_scenario_file

    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: dc-down\n    fail: [site:dc]\n"
                    "  - name: slow\n    degrade:\n      - link:a,b=30\n")
    with pytest.raises(ScenarioError, match=re.escape(
            "s.yaml: scenarios[1].degrade[0] 'link:a,b=30': bandwidth '30' needs a % sign "
            "(e.g. -50%) (line 6)")):
        load_scenario_file(path)
    path.write_text("scenarios:\n  - name: x\n    fial: [site:dc]\n")
    with pytest.raises(ScenarioError, match=r"scenarios\[0\]\.fial: unknown key .* \(line 3\)"):
        load_scenario_file(path)
    path.write_text("scenarios: [{name: a, fail: site:x}, {name: a, fail: [site:y]}]\n")
    with pytest.raises(ScenarioError, match=r"duplicate name 'a' \(also scenarios\[0\]\)"):
        load_scenario_file(path)
    path.write_text("scenarios: [{name: a, fail: [link:a,b]}]\n")
    with pytest.raises(ScenarioError, match="quote the change"):
        load_scenario_file(path)
    path.write_text("a: [b\n")
    with pytest.raises(ScenarioError, match="YAML syntax error"):
        load_scenario_file(path)


def test_scenarios_parse_from_plain_data() -> None:
    (s,) = parse_scenarios({"scenarios": [{"name": "pricey", "price": ["egress:*=x2"],
                                           "gpus": "site:a=-25%"}]})
    assert [c.label() for c in s.changes] == ["price egress:*=x2", "gpus site:a=-25%"]
    assert s.changes[1].value == pytest.approx(0.75)


# -- the command ------------------------------------------------------------------------------


def _cli(*args: str, columns: int = 120) -> Any:
    from click.testing import CliRunner

    from netplan.cli import cli

    return CliRunner().invoke(cli, ["whatif", *args], env={"COLUMNS": str(columns)})


HYBRID = str(REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml")


@pytest.mark.parametrize(("args", "message"), [
    (["--fail", "site:nope"], "--fail 'site:nope': no site 'nope' in "
     "onprem-data-cloud-burst-edge"),
    (["--fail", "link:edge-lyon,aws-use1"], "no link between edge-lyon and aws-use1"),
    (["--degrade", "link:onprem-fra,aws-euc1=30"], "bandwidth '30' needs a % sign"),
    (["--price", "gpu:h200=x2"], "no site has GPU type 'h200'"),
    (["--fail", "site:aws-euc1", "--failure-at", "150%"], "--failure-at '150%': must be a "
     "percentage from 0% to 100%"),
    ([], "nothing to ask: give --fail"),
])
def test_bad_arguments_exit_2_naming_the_part(args: list[str], message: str) -> None:
    done = _cli(HYBRID, *args)
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert "Traceback" not in done.output


def test_one_scenario_as_tables_and_as_json(tmp_path: Path) -> None:
    import json

    import yaml

    path = tmp_path / "failover.yaml"
    path.write_text(yaml.safe_dump(_failover_topology(0.5, 0.0).model_dump(mode="json")))
    for columns in (80, 160):
        done = _cli(str(path), "--fail", "site:T", columns=columns)
        assert done.exit_code == 0, done.output
        text = " ".join(done.output.split())
        assert "Training failover: ft (T fails 20.0 h into its compute" in text
        assert "holds the checkpoint (2.0 h of work lost)" in text
        assert "…" not in done.output
    done = _cli(str(path), "--fail", "site:T", "--json")
    doc = json.loads(done.output)
    WhatifDocument.model_validate(doc)
    assert doc["schema_version"] == 1
    (scenario,) = doc["scenarios"]
    (failover,) = scenario["training_failover"]
    assert failover["resume_at"] == "S"
    assert [s["site"] for s in failover["standbys"]] == ["S", "C"]
    assert doc["run"]["executor"] == "serial"


def test_a_sweep_and_a_scenario_file_rank_by_harm(tmp_path: Path) -> None:
    import json

    scenarios = tmp_path / "s.yaml"
    scenarios.write_text("scenarios:\n"
                         "  - name: dx-brownout\n"
                         "    degrade: ['link:onprem-fra,aws-euc1=10%']\n"
                         "  - name: pricier-h100\n"
                         "    price: [gpu:h100=x1.5]\n")
    done = _cli(HYBRID, "--scenarios", str(scenarios), "--sweep", "n-1", "--json",
                "--workers", "1")
    assert done.exit_code == 0, done.output
    doc = json.loads(done.output)
    WhatifDocument.model_validate(doc)
    names = [s["name"] for s in doc["scenarios"]]
    assert names[:3] == ["dx-brownout", "pricier-h100", "site:onprem-fra"]
    assert doc["ranking"][0] == "site:onprem-fra"
    assert {p["element"] for p in doc["single_points_of_failure"]} == {
        "site:onprem-fra", "site:aws-euc1", "site:aws-use1"}
    pricier = doc["scenarios"][1]
    assert pricier["cost_delta_usd"] > 0
    assert doc["stats"]["scenarios"] == 2 + 12
    done = _cli(HYBRID, "--scenarios", str(scenarios), "--sweep", "n-1", "--workers", "1")
    assert "Single points of failure" in done.output
    assert "Scenarios that hurt most" in done.output


def test_schema_whatif_prints_the_documented_shape() -> None:
    import json

    from click.testing import CliRunner

    from netplan.cli import cli
    from netplan.whatif import WHATIF_SCHEMA_VERSION
    from netplan.whatif_schema import WHATIF_DOCUMENT_VERSION

    assert WHATIF_DOCUMENT_VERSION == WHATIF_SCHEMA_VERSION
    done = CliRunner().invoke(cli, ["schema", "--whatif"])
    schema = json.loads(done.output)
    assert {"schema_version", "scenarios", "single_points_of_failure", "ranking"} <= set(
        schema["properties"])
