"""Sync rules: destinations per tier, failure-domain copies, raw never leaves, link capacity."""

from __future__ import annotations

import textwrap

import pytest

from netplan import Network, TopologyError, parse_topology
from netplan._sync import plan_sync
from netplan.plan import TrafficClass

BASE = """\
name: sync-test
sites:
  - {id: onprem-fra, kind: onprem, region: eu, failure_domain: fra-campus}
  - {id: onprem-fra2, kind: onprem, region: eu, failure_domain: fra-campus}
  - {id: cloud-fra, kind: cloud, region: eu, gpus: {h100: 8}, gpu_hour_usd: {h100: 4.0}}
  - {id: cloud-ams, kind: cloud, region: eu}
  - {id: cloud-use, kind: cloud, region: us, gpus: {h100: 8}, gpu_hour_usd: {h100: 3.0}}
links:
  - {between: [onprem-fra, cloud-fra], bandwidth_gbps: LINK_GBPS, rtt_ms: 2}
  - {between: [onprem-fra, onprem-fra2], bandwidth_gbps: 100, rtt_ms: 1}
  - {between: [cloud-fra, cloud-ams], bandwidth_gbps: 100, rtt_ms: 8, egress_usd_per_gb: 0.02}
  - {between: [cloud-fra, cloud-use], bandwidth_gbps: 100, rtt_ms: 90, egress_usd_per_gb: 0.02}
datasets:
  - {id: claims-raw, site: onprem-fra, size_gb: 50000, tier: raw, residency: [eu]}
  - {id: claims-curated, site: onprem-fra, size_gb: 2000, tier: curated, residency: [eu]}
  - {id: claims-approved, site: onprem-fra, size_gb: 5000, tier: approved}
models:
  - {id: llm-8b, site: cloud-fra, size_gb: 16}
workloads:
  - {id: tune, kind: fine_tuning, model: llm-8b, datasets: [claims-approved], gpu: h100,
     gpus: 8, hours: 10}
"""


def _topo(extra: str, link_gbps: float = 100.0) -> str:
    return BASE.replace("LINK_GBPS", str(link_gbps)) + textwrap.dedent(extra)


def test_approved_goes_to_consumers_and_curated_to_gpu_sites_in_its_residency() -> None:
    topo = parse_topology(_topo("""
        sync_rules:
          - {id: approved-to-users, tier: approved, to: consumers, change_fraction_per_day: 0.1}
          - {id: curated-to-gpus, tier: curated, to: residency_gpu_sites}
    """))
    plan = plan_sync(topo, Network(topo), {"tune": ["cloud-fra"]})
    moves = {(t.rule, t.dataset, t.destination): t for t in plan.transfers}
    assert set(moves) == {("approved-to-users", "claims-approved", "cloud-fra"),
                          ("curated-to-gpus", "claims-curated", "cloud-fra")}
    # cloud-use has GPUs but is outside claims-curated's residency [eu]
    assert moves["approved-to-users", "claims-approved", "cloud-fra"].gb_per_day == 500.0
    assert all(t.traffic_class is TrafficClass.SYNC for t in plan.transfers)
    [link] = plan.links
    assert (link.sender, link.receiver) == ("onprem-fra", "cloud-fra")
    assert link.sync_gb_per_day == pytest.approx(500.0 + 2000.0)
    assert not link.flagged
    assert not any(t.dataset == "claims-raw" for t in plan.transfers)


def test_copies_min_adds_sites_in_new_failure_domains_inside_residency() -> None:
    topo = parse_topology(_topo("""
        sync_rules:
          - {id: curated-3, datasets: [claims-curated], to: residency_gpu_sites, copies_min: 3}
    """))
    plan = plan_sync(topo, Network(topo), {})
    dests = sorted(t.destination for t in plan.transfers)
    # onprem-fra2 shares the source's failure domain: it does not count, cloud-ams does;
    # cloud-use is outside the eu residency
    assert dests == ["cloud-ams", "cloud-fra"]
    ams = next(t for t in plan.transfers if t.destination == "cloud-ams")
    assert ams.path == ("onprem-fra", "cloud-fra", "cloud-ams")
    assert not plan.notes


def test_copies_min_that_residency_cannot_reach_is_noted() -> None:
    topo = parse_topology(_topo("""
        sync_rules:
          - {id: curated-5, datasets: [claims-curated], to: residency_gpu_sites, copies_min: 5}
    """))
    plan = plan_sync(topo, Network(topo), {})
    assert plan.notes == ("sync rule curated-5: dataset claims-curated reaches only 3 failure "
                          "domain(s) of copies_min 5",)


def test_a_link_too_small_for_the_nightly_sync_is_flagged_with_the_shortfall() -> None:
    topo = parse_topology(_topo("""
        sync_rules:
          - {id: approved-to-users, tier: approved, to: consumers}
    """, link_gbps=1.0))
    plan = plan_sync(topo, Network(topo), {"tune": ["cloud-fra"]})
    [link] = plan.links
    # 1 Gbit/s x 0.5 bulk share x 8 h window = 1800 GB; 5000 GB must move
    assert link.capacity_gb == pytest.approx(1800.0)
    assert link.flagged
    assert link.shortfall_gb == pytest.approx(3200.0)
    assert plan.to_json()["links"][0]["shortfall_gb"] == pytest.approx(3200.0)


def test_checkpoints_replicate_to_copies_min_domains_and_load_the_window() -> None:
    topo = parse_topology(_topo("""
        sync_window: {hours: 6, bulk_share: 0.25}
        checkpoint_replication:
          - {workload: tune, every_hours: 2, copies_min: 2, retain: 4}
    """, link_gbps=1.0))
    plan = plan_sync(topo, Network(topo), {"tune": ["cloud-fra"]})
    [ck] = plan.checkpoints
    # cheapest new domain from cloud-fra: onprem-fra (no egress price on that link)
    assert ck.targets == ("onprem-fra",)
    assert ck.retain == 4
    [link] = plan.links
    assert link.checkpoint_gb_per_day == pytest.approx(16.0 * 12)
    assert link.load_gb == pytest.approx(16.0 * 12 * 6 / 24)
    assert link.capacity_gb == pytest.approx(1.0 * 0.25 * 6 * 3600 / 8)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{id: leak, tier: raw, to: consumers}",
         "sync_rules[0].tier: raw-tier data never leaves its site; a sync rule cannot move it"
         " (line 24)"),
        ("{id: leak, datasets: [claims-raw], to: [cloud-fra]}",
         "sync_rules[0].datasets[0]: dataset 'claims-raw' is raw-tier: raw data never leaves its"
         " site (line 24)"),
        ("{id: us, datasets: [claims-curated], to: [cloud-use]}",
         "sync_rules[0].to[0]: site cloud-use is in region us, outside dataset claims-curated's"
         " residency [eu] (line 24)"),
        ("{id: x, to: consumers}",
         "sync_rules[0]: a sync rule needs a tier or a list of datasets (line 24)"),
    ],
)
def test_rules_that_move_raw_data_or_break_residency_are_errors_with_lines(
        rule: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_topo(f"""
            sync_rules:
              - {rule}
        """))
    assert message in str(info.value)
