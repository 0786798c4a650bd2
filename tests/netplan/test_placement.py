"""Inference placement: fewest replica sites so every client's p99 fits the budget."""

from __future__ import annotations

from typing import Any

import pytest
from netplan_builders import link, site, topology

from netplan.decisions import Decision
from netplan.report import analyze


def _serve(budget_ms: float, clients: list[str], **kw: Any) -> dict[str, Any]:
    return {
        "id": "serve",
        "kind": "inference",
        "model": "llm",
        "gpu": "l4",
        "gpus": 1,
        "hours": 100,
        "clients": clients,
        "latency_budget_ms": budget_ms,
        **kw,
    }


def _two_continents(budget_ms: float) -> Decision:
    # Clients in Frankfurt and Virginia, 90 ms apart; a GPU region near each of them.
    topo = topology(
        sites=[
            site("client-eu", "eu", "edge"),
            site("client-us", "us", "edge"),
            site("gpu-eu", "eu", l4=(4, 0.8)),
            site("gpu-us", "us", l4=(4, 0.7)),
        ],
        links=[
            link("client-eu", "gpu-eu", 1, 8, jitter_ms=2),
            link("client-us", "gpu-us", 1, 10, jitter_ms=3),
            link("gpu-eu", "gpu-us", 25, 90, egress_usd_per_gb=0.02),
        ],
        models=[{"id": "llm", "site": "gpu-eu", "size_gb": 16}],
        workloads=[_serve(budget_ms, ["client-eu", "client-us"])],
    )
    return analyze(topo).decisions[0]


def test_two_distant_clients_need_two_replicas() -> None:
    decision = _two_continents(budget_ms=30)
    assert decision.feasible
    assert decision.option is not None
    assert decision.option.sites == ("gpu-eu", "gpu-us")
    worst = decision.option.worst_client
    assert worst is not None
    assert (worst.client, worst.site, worst.p99_ms) == ("client-us", "gpu-us", 13)
    # The model (16 GB) ships from gpu-eu to gpu-us at $0.02/GB.
    assert decision.option.egress_usd == pytest.approx(0.32)
    assert "2 replicas at gpu-eu, gpu-us" in decision.reason
    assert "worst: client-us 13.0 ms to gpu-us" in decision.reason
    assert "ships model llm (16 GB) to 1 site for $0.32" in decision.reason
    assert "no single site covers all 2 clients" in decision.reason


def test_a_generous_budget_needs_one_replica() -> None:
    decision = _two_continents(budget_ms=200)
    assert decision.option is not None
    # Either site covers both; gpu-eu holds the model so nothing ships: cheapest overall.
    assert len(decision.option.sites) == 1
    assert decision.action in {"in_place", "replicate_model"}
    other = decision.alternatives[0]
    assert other.rejected_because is not None
    assert other.rejected_because.startswith("costs $")


def test_a_client_out_of_reach_says_by_how_much() -> None:
    topo = topology(
        sites=[
            site("client-eu", "eu", "edge"),
            site("client-far", "apac", "edge"),
            site("gpu-eu", "eu", l4=(4, 0.8)),
        ],
        links=[
            link("client-eu", "gpu-eu", 1, 8, jitter_ms=2),
            link("client-far", "gpu-eu", 1, 160, jitter_ms=15),
        ],
        models=[{"id": "llm", "site": "gpu-eu", "size_gb": 16}],
        workloads=[_serve(50, ["client-eu", "client-far"])],
    )
    decision = analyze(topo).decisions[0]
    assert not decision.feasible
    assert "client client-far misses the 50 ms budget by 125.0 ms (175.0 ms p99 to gpu-eu)" in (
        decision.reason
    )
    only = decision.alternatives[0]
    assert only.rejected_because is not None
    assert only.rejected_because.startswith("covers 1 of 2 clients")


def test_gpu_count_per_replica_is_required() -> None:
    topo = topology(
        sites=[
            site("client", "eu", "edge"),
            site("small", "eu", l4=(1, 0.8)),
            site("big", "eu", l4=(8, 0.9)),
        ],
        links=[link("client", "small", 1, 2), link("client", "big", 1, 4)],
        models=[{"id": "llm", "site": "big", "size_gb": 16}],
        workloads=[_serve(20, ["client"], gpus=4)],
    )
    decision = analyze(topo).decisions[0]
    assert decision.option is not None
    assert decision.option.sites == ("big",)
    assert decision.action == "in_place"
    rejected = [a for a in decision.alternatives if a.site == "small"][0]
    assert rejected.rejected_because == "only 1 l4 GPUs at small, needs 4"


def test_an_unusable_site_is_not_called_in_place() -> None:
    topo = topology(
        sites=[
            site("client", "eu", "edge"),
            site("tiny", "eu", l4=(1, 0.5)),
            site("big", "eu", l4=(8, 0.9)),
        ],
        links=[
            link("client", "tiny", 1, 2),
            link("client", "big", 1, 4),
            link("tiny", "big", 1, 2),
        ],
        models=[{"id": "llm", "site": "big", "size_gb": 16}],
        workloads=[_serve(20, ["client"], gpus=4)],
    )
    decision = analyze(topo).decisions[0]
    tiny = [a for a in decision.alternatives if a.site == "tiny"][0]
    assert tiny.action == "replicate_model"
    assert not tiny.feasible
