"""Latency budget breakdown: the parts sum to the total, headroom and largest component."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netplan._budgets import LatencyComponents, break_down_budget


def test_breakdown_with_defaults_sums_and_names_the_largest() -> None:
    b = break_down_budget("chat", 100.0, rtt_ms=30.0, jitter_p99_ms=4.0, client="edge-ber",
                          serving_site="cloud-fra")
    parts = {c.name: c.ms for c in b.components}
    assert parts == {"dns": 1.0, "tls_handshake": 30.0, "request_routing": 1.0,
                     "feature_lookup": 5.0, "model_execution": 20.0, "serialization": 1.0,
                     "network_rtt_p99": 34.0}
    assert b.total_ms == pytest.approx(92.0)
    assert b.headroom_ms == pytest.approx(8.0)
    assert b.largest.name == "network_rtt_p99"
    assert b.fits
    out = b.to_json()
    assert out["largest"] == "network_rtt_p99"
    assert out["headroom_ms"] == 8.0
    assert out["client"] == "edge-ber"


def test_pooled_connections_and_a_slow_model_move_the_largest_component() -> None:
    comps = LatencyComponents(tls_handshake_rtts=0.0, model_execution_ms=120.0)
    b = break_down_budget("rerank", 100.0, rtt_ms=10.0, jitter_p99_ms=1.0, components=comps)
    assert b.largest.name == "model_execution"
    assert b.headroom_ms == pytest.approx(100.0 - (1 + 0 + 1 + 5 + 120 + 1 + 11))
    assert not b.fits


@given(st.floats(0, 500), st.floats(0, 50), st.floats(0, 3), st.floats(0, 200),
       st.floats(1, 1000))
def test_components_always_sum_to_the_total(rtt: float, jitter: float, tls_rtts: float,
                                             model_ms: float, budget: float) -> None:
    comps = LatencyComponents(tls_handshake_rtts=tls_rtts, model_execution_ms=model_ms)
    b = break_down_budget("w", budget, rtt, jitter, comps)
    assert sum(b.to_json()["components_ms"].values()) == pytest.approx(b.total_ms, abs=0.01)
    assert b.total_ms + b.headroom_ms == pytest.approx(budget)
    assert all(c.ms <= b.largest.ms for c in b.components)


def test_topology_budgets_use_the_worst_clients_path_and_per_workload_components() -> None:
    from netplan import Network, parse_topology
    from netplan._budgets import latency_budgets

    topo = parse_topology("""\
name: budgets
latency_components: {feature_lookup_ms: 8}
sites:
  - {id: cloud, kind: cloud, region: eu, gpus: {l4: 4}, gpu_hour_usd: {l4: 0.8}}
  - {id: edge-a, kind: edge, region: eu}
  - {id: edge-b, kind: edge, region: eu}
links:
  - {between: [cloud, edge-a], bandwidth_gbps: 10, rtt_ms: 12, jitter_ms: 2}
  - {between: [edge-a, edge-b], bandwidth_gbps: 10, rtt_ms: 10, jitter_ms: 3}
models:
  - {id: m, site: cloud, size_gb: 4}
workloads:
  - {id: chat, kind: inference, model: m, gpu: l4, gpus: 1, hours: 24,
     clients: [edge-a, edge-b], latency_budget_ms: 100}
  - {id: rank, kind: inference, model: m, gpu: l4, gpus: 1, hours: 24, clients: [edge-b],
     latency_budget_ms: 100, latency_components: {tls_handshake_rtts: 0, model_execution_ms: 5}}
""")
    [chat, rank] = latency_budgets(topo, Network(topo), {"chat": ["cloud"], "rank": ["edge-a"]})
    # chat: edge-b is worst, 22 ms RTT + 5 ms jitter over edge-b -> edge-a -> cloud
    assert (chat.client, chat.serving_site) == ("edge-b", "cloud")
    parts = {c.name: c.ms for c in chat.components}
    assert parts["network_rtt_p99"] == pytest.approx(27.0)
    assert parts["tls_handshake"] == pytest.approx(22.0)
    assert parts["feature_lookup"] == 8.0  # the topology-level override
    assert chat.total_ms == pytest.approx(1 + 22 + 1 + 8 + 20 + 1 + 27)
    # rank is served at edge-a: its own components, no handshake
    assert rank.serving_site == "edge-a"
    assert {c.name: c.ms for c in rank.components}["tls_handshake"] == 0.0
    assert rank.largest.name == "network_rtt_p99"
    assert rank.total_ms == pytest.approx(1 + 0 + 1 + 5 + 5 + 1 + 13)


_ONE_CLIENT_TWO_SITES = """\
name: budget-scope
{components}
sites:
  - {{id: far, kind: cloud, region: eu, gpus: {{l4: 4}}, gpu_hour_usd: {{l4: 0.5}}}}
  - {{id: near, kind: cloud, region: eu, gpus: {{l4: 4}}, gpu_hour_usd: {{l4: 0.9}}}}
  - {{id: edge, kind: edge, region: eu}}
links:
  - {{between: [edge, far], bandwidth_gbps: 10, rtt_ms: 20, jitter_ms: 2}}
  - {{between: [edge, near], bandwidth_gbps: 10, rtt_ms: 4, jitter_ms: 1}}
  - {{between: [far, near], bandwidth_gbps: 10, rtt_ms: 18, jitter_ms: 1}}
models:
  - {{id: m, site: far, size_gb: 4}}
workloads:
  - {{id: chat, kind: inference, model: m, gpu: l4, gpus: 1, hours: 24, clients: [edge],
     latency_budget_ms: 40}}
"""


def test_undeclared_components_keep_the_budget_network_only_in_placement_and_breakdown() -> None:
    from netplan import parse_topology
    from netplan.report import analyze

    report = analyze(parse_topology(_ONE_CLIENT_TWO_SITES.format(components="")))
    [decision] = report.decisions
    # 22 ms p99 to the cheaper far site fits 40 ms of network budget.
    assert decision.option.sites == ("far",)
    assert "40 ms network p99 budget" in decision.reason
    [budget] = report.latency_budgets
    assert budget.total_ms == pytest.approx(22.0)
    assert budget.headroom_ms == pytest.approx(40.0 - 22.0)
    assert budget.fits


def test_declared_components_count_against_the_budget_in_placement_and_breakdown() -> None:
    from netplan import parse_topology
    from netplan.report import analyze

    topo = parse_topology(_ONE_CLIENT_TWO_SITES.format(
        components="latency_components: {model_execution_ms: 8, feature_lookup_ms: 2}"))
    report = analyze(topo)
    [decision] = report.decisions
    # far: 22 + dns 1 + tls 20 + routing 1 + features 2 + model 8 + ser 1 = 55 ms > 40;
    # near: 5 + 1 + 4 + 1 + 2 + 8 + 1 = 22 ms: the dearer near site is the only one that fits.
    assert decision.option.sites == ("near",)
    assert "40 ms request p99 budget" in decision.reason
    assert decision.option.worst_client is not None
    assert decision.option.worst_client.p99_ms == pytest.approx(22.0)
    [budget] = report.latency_budgets
    assert budget.serving_site == "near"
    assert budget.total_ms == pytest.approx(decision.option.worst_client.p99_ms)
    assert budget.headroom_ms == pytest.approx(18.0)
    far = next(a for a in decision.alternatives if a.sites == ("far",))
    assert "misses the 40 ms budget by 15.0 ms" in (far.rejected_because or "")
