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
