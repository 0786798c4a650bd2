"""Data-gravity decisions: each outcome, with the reason and the options that lost."""

from __future__ import annotations

from typing import Any

import pytest
from netplan_builders import link, site, topology

from netplan.decisions import Decision
from netplan.report import analyze


def _decide(**sections: Any) -> Decision:
    report = analyze(topology(**sections))
    assert len(report.decisions) == 1
    return report.decisions[0]


def _workload(**kw: Any) -> dict[str, Any]:
    return {"id": "job", "kind": "fine_tuning", "gpu": "h100", "gpus": 8, "hours": 10, **kw}


def _alternative(decision: Decision, action: str, site_id: str) -> Any:
    matches = [a for a in decision.alternatives if a.action == action and a.site == site_id]
    assert matches, f"no alternative {action} at {site_id}"
    return matches[0]


def test_move_compute_for_huge_data_and_a_small_model() -> None:
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem", h100=(16, 3.0)),
            site("cloud", "us", h100=(64, 2.5)),
        ],
        links=[link("dc", "cloud", 10, 80, egress_usd_per_gb={"cloud": 0.09, "dc": 0.05})],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 500_000, "tier": "curated"}],
        models=[{"id": "llm", "site": "cloud", "size_gb": 16}],
        workloads=[_workload(model="llm", datasets=["corpus"])],
    )
    assert decision.feasible
    assert decision.action == "move_compute"
    assert decision.option is not None
    assert decision.option.site == "dc"
    assert decision.option.transfer_gb == 16
    assert decision.option.egress_usd == pytest.approx(16 * 0.09)
    assert "moves model llm (16 GB" in decision.reason
    # Shipping 500 TB out costs 500,000 x $0.05 = $25,000 of egress: the cloud GPUs lose on cost.
    moved = _alternative(decision, "move_data", "cloud")
    assert moved.feasible
    assert moved.egress_usd == pytest.approx(25_000)
    assert moved.rejected_because.startswith("costs $")


def test_move_data_when_only_a_remote_site_has_the_gpus() -> None:
    decision = _decide(
        sites=[site("dc", "eu", "onprem"), site("cloud", "eu", h100=(64, 4.9))],
        links=[link("dc", "cloud", 10, 5)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 2_000, "tier": "curated"}],
        models=[{"id": "llm", "site": "dc", "size_gb": 16}],
        workloads=[_workload(model="llm", datasets=["corpus"])],
    )
    assert decision.action == "move_data"
    assert decision.option is not None
    assert decision.option.site == "cloud"
    assert decision.option.path == ("dc", "cloud")
    # 2,016 GB at 10 Gbit/s = 1,612.8 s (+ 5 ms to start).
    assert decision.option.transfer_seconds == pytest.approx(2 * (806.4 + 0.005))
    assert decision.option.compute_usd == pytest.approx(8 * 10 * 4.9)
    assert _alternative(decision, "in_place", "dc").rejected_because == "no h100 GPUs at dc"


def test_stage_subset_moves_only_the_active_fraction() -> None:
    decision = _decide(
        sites=[site("dc", "eu", "onprem"), site("cloud", "eu", h100=(64, 4.9))],
        links=[link("dc", "cloud", 10, 5, egress_usd_per_gb=0.02)],
        datasets=[
            {
                "id": "corpus",
                "site": "dc",
                "size_gb": 40_000,
                "tier": "curated",
                "active_fraction": 0.1,
            },
        ],
        workloads=[_workload(datasets=["corpus"])],
    )
    assert decision.action == "stage_subset"
    assert decision.option is not None
    assert decision.option.transfer_gb == pytest.approx(4_000)
    assert decision.option.egress_usd == pytest.approx(80)
    full = _alternative(decision, "move_data", "cloud")
    assert full.transfer_gb == pytest.approx(40_000)
    assert "more" in full.rejected_because


def test_residency_removes_the_cheaper_region() -> None:
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem"),
            site("cheap-us", "us", h100=(64, 2.0)),
            site("eu-cloud", "eu", h100=(64, 4.9)),
        ],
        links=[link("dc", "cheap-us", 10, 80), link("dc", "eu-cloud", 10, 5)],
        datasets=[
            {
                "id": "patients",
                "site": "dc",
                "size_gb": 1_000,
                "tier": "approved",
                "residency": ["eu"],
            },
        ],
        workloads=[_workload(datasets=["patients"])],
    )
    assert decision.option is not None
    assert decision.option.site == "eu-cloud"
    rejected = _alternative(decision, "move_data", "cheap-us")
    assert not rejected.feasible
    assert rejected.rejected_because == (
        "dataset patients may not be processed in us (residency: eu)"
    )
    assert "cheaper move_data at cheap-us" in decision.reason
    assert "may not be processed in us" in decision.reason


def test_residency_covers_relay_hops() -> None:
    # The wide route relays through a US site; residency forces the narrow EU-only link.
    sections = dict(
        sites=[
            site("dc", "eu", "onprem"),
            site("relay-us", "us"),
            site("eu-gpu", "eu", h100=(64, 4.9)),
        ],
        links=[
            link("dc", "eu-gpu", 1, 20, loss_pct=1),  # lossy: ~23 Mbit/s
            link("dc", "relay-us", 10, 10),
            link("relay-us", "eu-gpu", 10, 10),
        ],
        workloads=[_workload(datasets=["d"])],
    )
    free = _decide(
        datasets=[{"id": "d", "site": "dc", "size_gb": 100, "tier": "curated"}], **sections
    )
    assert free.option is not None
    assert free.option.path == ("dc", "relay-us", "eu-gpu")
    confined = _decide(
        datasets=[
            {"id": "d", "site": "dc", "size_gb": 100, "tier": "curated", "residency": ["eu"]}
        ],
        **sections,
    )
    assert confined.option is not None
    assert confined.option.path == ("dc", "eu-gpu")
    assert confined.option.transfer_seconds > 10 * free.option.transfer_seconds


def test_no_path_inside_the_residency_is_named() -> None:
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem"),
            site("relay-us", "us"),
            site("eu-gpu", "eu", h100=(64, 4.9)),
        ],
        links=[link("dc", "relay-us", 10, 10), link("relay-us", "eu-gpu", 10, 10)],
        datasets=[
            {"id": "d", "site": "dc", "size_gb": 100, "tier": "curated", "residency": ["eu"]}
        ],
        workloads=[_workload(datasets=["d"])],
    )
    assert not decision.feasible
    assert ("no path from dc to eu-gpu within 2 relays stays within dataset d's residency (eu)"
            in decision.reason)


def test_raw_tier_never_leaves_and_the_binding_constraints_are_named() -> None:
    decision = _decide(
        sites=[
            site("onprem-fra", "eu", "onprem", a100=(8, 1.0)),
            site("cloud", "eu", b200=(64, 6.0)),
        ],
        links=[link("onprem-fra", "cloud", 100, 2)],
        datasets=[{"id": "claims-raw", "site": "onprem-fra", "size_gb": 10, "tier": "raw"}],
        workloads=[_workload(gpu="b200", datasets=["claims-raw"])],
    )
    assert not decision.feasible
    assert decision.action == "none"
    assert "raw-tier dataset claims-raw cannot leave onprem-fra" in decision.reason
    assert "no b200 GPUs at onprem-fra" in decision.reason
    assert set(decision.constraints) == {
        "no b200 GPUs at onprem-fra",
        "raw-tier dataset claims-raw cannot leave onprem-fra",
    }


def test_a_deadline_that_transfer_time_breaks() -> None:
    sections: dict[str, Any] = dict(
        sites=[site("dc", "eu", "onprem"), site("cloud", "eu", h100=(64, 4.9))],
        # 50 TB at 1 Gbit/s = 111 h of transfer.
        links=[link("dc", "cloud", 1, 5)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 50_000, "tier": "curated"}],
    )
    relaxed = _decide(workloads=[_workload(datasets=["corpus"], deadline_hours=200)], **sections)
    assert relaxed.feasible
    tight = _decide(workloads=[_workload(datasets=["corpus"], deadline_hours=24)], **sections)
    assert not tight.feasible
    assert "deadline 24 h missed: 121.1 h (transfer 111.1 h + compute 10.0 h)" in tight.reason


def test_deadline_prefers_the_staged_subset() -> None:
    decision = _decide(
        sites=[site("dc", "eu", "onprem"), site("cloud", "eu", h100=(64, 4.9))],
        links=[link("dc", "cloud", 1, 5)],
        datasets=[
            {
                "id": "corpus",
                "site": "dc",
                "size_gb": 50_000,
                "tier": "curated",
                "active_fraction": 0.05,
            }
        ],
        workloads=[_workload(datasets=["corpus"], deadline_hours=24)],
    )
    assert decision.action == "stage_subset"
    full = _alternative(decision, "move_data", "cloud")
    assert full.rejected_because.startswith("deadline 24 h missed")


def test_costs_within_five_percent_go_to_the_earlier_completion() -> None:
    # "slow" is 3 % cheaper but sits behind a 1 Gbit/s link; "fast" is on 10 Gbit/s.
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem"),
            site("slow", "eu", h100=(64, 4.85)),
            site("fast", "eu", h100=(64, 5.0)),
        ],
        links=[link("dc", "slow", 1, 5), link("dc", "fast", 10, 5)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 5_000, "tier": "curated"}],
        workloads=[_workload(datasets=["corpus"])],
    )
    assert decision.option is not None
    assert decision.option.site == "fast"
    assert "within 5% of the cheapest (move_data at slow" in decision.reason
    slow = _alternative(decision, "move_data", "slow")
    assert slow.rejected_because.startswith("within 5% of the cheapest cost")


def test_costs_beyond_five_percent_go_to_the_cheaper() -> None:
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem"),
            site("slow", "eu", h100=(64, 4.0)),
            site("fast", "eu", h100=(64, 5.0)),
        ],
        links=[link("dc", "slow", 1, 5), link("dc", "fast", 10, 5)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 5_000, "tier": "curated"}],
        workloads=[_workload(datasets=["corpus"])],
    )
    assert decision.option is not None
    assert decision.option.site == "slow"
    assert "least total cost" in decision.reason


def test_in_place_when_everything_is_already_there() -> None:
    decision = _decide(
        sites=[site("dc", "eu", "onprem", h100=(16, 3.0)), site("cloud", "eu", h100=(64, 2.0))],
        links=[link("dc", "cloud", 10, 5, egress_usd_per_gb=0.05)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 100_000, "tier": "curated"}],
        models=[{"id": "llm", "site": "dc", "size_gb": 16}],
        workloads=[_workload(model="llm", datasets=["corpus"])],
    )
    assert decision.action == "in_place"
    assert decision.option is not None
    assert decision.option.transfer_gb == 0
    assert decision.option.path == ("dc",)


def test_the_tie_band_is_measured_from_the_cheapest_option() -> None:
    # a: $100 but slow; b: $104 (within 5% of a) and fast; c: $108 (outside the band), fastest.
    # (Storage is free here, so only compute decides.)
    free = {"storage_usd_per_gb_month": 0}
    decision = _decide(
        sites=[
            site("dc", "eu", "onprem"),
            {**site("a", "eu", h100=(64, 1.25)), **free},
            {**site("b", "eu", h100=(64, 1.30)), **free},
            {**site("c", "eu", h100=(64, 1.35)), **free},
        ],
        links=[link("dc", "a", 1, 5), link("dc", "b", 10, 5), link("dc", "c", 100, 5)],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": 5_000, "tier": "curated"}],
        workloads=[_workload(datasets=["corpus"])],
    )
    assert decision.option is not None
    assert decision.option.site == "b"
    assert _alternative(decision, "move_data", "a").rejected_because.startswith(
        "within 5% of the cheapest cost ($100 vs $100) but finishes later"
    )
    assert _alternative(decision, "move_data", "c").rejected_because == (
        "costs $4.00 more ($108 vs $104)"
    )
