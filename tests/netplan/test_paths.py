"""Bulk paths as a cost-time choice, multipath splits, directed links, storage in the objective
and elastic GPU counts: small graphs where each rule decides, the expected numbers worked out by
hand next to each assertion."""

from __future__ import annotations

import math
from typing import Any

import pytest
from netplan_builders import link, site, topology

from netplan.decisions import Decision
from netplan.network import Network
from netplan.report import analyze

FREE_STORAGE = {"storage_usd_per_gb_month": 0}
HOUR = 3600.0


def _only(report_decisions: tuple[Decision, ...]) -> Decision:
    assert len(report_decisions) == 1
    return report_decisions[0]


def _relay_triangle(size_gb: float, deadline_h: float | None, **paths: Any) -> Decision:
    """Data at `dc`; GPUs only at `gpu`. Direct dc -> gpu: 1 Gbit/s at $0.01/GB. Through the
    relay r: two 10 Gbit/s hops at $0.02/GB each. RTTs are short (5 ms), so capacity binds
    (the window bound is 16 x 3 MiB x 8 / 5 ms = 80 Gbit/s). Storage is free here."""
    workload: dict[str, Any] = {"id": "job", "kind": "fine_tuning", "datasets": ["corpus"],
                                "gpu": "h100", "gpus": 8, "hours": 10}
    if deadline_h is not None:
        workload["deadline_hours"] = deadline_h
    topo = topology(
        sites=[site("dc", "eu", "onprem"), site("r", "eu"),
               {**site("gpu", "eu", h100=(8, 2.0)), **FREE_STORAGE}],
        links=[link("dc", "gpu", 1, 5, egress_usd_per_gb={"dc": 0.01}),
               link("dc", "r", 10, 5, egress_usd_per_gb={"dc": 0.02}),
               link("r", "gpu", 10, 5, egress_usd_per_gb={"r": 0.02})],
        datasets=[{"id": "corpus", "site": "dc", "size_gb": size_gb, "tier": "curated"}],
        workloads=[workload],
        paths=paths,
    )
    return _only(analyze(topo).decisions)


def test_without_a_deadline_the_cheap_direct_link_wins_over_the_fast_relay() -> None:
    decision = _relay_triangle(10_000, None)
    assert decision.option is not None
    [move] = decision.option.movements
    # Direct: 10,000 GB x 8 / 1 Gbit/s = 80,000 s (+ 5 ms RTT) = 22.2 h, $0.01/GB = $100.
    assert move.path == ("dc", "gpu")
    assert move.seconds == pytest.approx(80_000.005)
    assert move.egress_usd == pytest.approx(100.0)
    assert move.route.why == "the cheapest path (direct)"
    # The fastest path is listed with its time and cost and why it lost: through r,
    # 10,000 x 8 / 10 = 8,000 s (+ 10 ms) = 2.2 h for $0.04/GB = $400.
    [fastest] = move.route.alternatives
    assert fastest.labels == ("fastest",)
    assert fastest.path.sites == ("dc", "r", "gpu")
    assert fastest.seconds == pytest.approx(8_000.01)
    assert fastest.cost_usd == pytest.approx(400.0)
    assert fastest.rejected_because == "costs $300 more ($400 vs $100) to finish 20.0 h sooner"
    # Total: compute 8 x 10 h x $2 = $160 + egress $100; the reason says why the path won.
    assert decision.option.total_usd == pytest.approx(260.0)
    assert "via dc -> gpu, 22.2 h: the cheapest path (direct)" in decision.reason


def test_a_deadline_buys_the_fast_relay_when_one_path_must_carry_it() -> None:
    # 24 h deadline - 10 h compute = 14 h for the transfer: the direct 22.2 h misses it.
    decision = _relay_triangle(10_000, 24, multipath=False)
    assert decision.option is not None
    [move] = decision.option.movements
    assert move.path == ("dc", "r", "gpu")
    assert move.egress_usd == pytest.approx(400.0)
    assert move.route.why == ("the cheapest path that meets the deadline: the cheapest "
                              "(dc -> gpu, $100) takes 22.2 h of the 14.0 h available")
    [direct] = move.route.alternatives
    assert direct.labels == ("direct", "cheapest")
    assert not direct.meets_deadline
    assert direct.rejected_because == "misses the deadline: 22.2 h of transfer, 14.0 h available"
    assert decision.option.completion_hours == pytest.approx(10 + 8_000.01 / HOUR)


def test_splitting_meets_the_same_deadline_for_less() -> None:
    decision = _relay_triangle(10_000, 24)
    assert decision.option is not None
    [move] = decision.option.movements
    route = move.route
    assert route.multipath
    assert route.solver == "lp"
    # The flow must move 80,000 Gbit in the 14 h = 50,400 s budget less the 10 ms start:
    # r = 80,000 / 50,399.99 = 1.587 Gbit/s. The cheap direct link is filled (1 Gbit/s, its
    # capacity) and the relay carries the rest (0.587 Gbit/s).
    rate = 80_000 / (14 * HOUR - 0.01)
    direct, relayed = route.legs
    assert direct.path.sites == ("dc", "gpu")
    assert direct.rate_gbps == pytest.approx(1.0)
    assert direct.share == pytest.approx(1 / rate)
    assert relayed.path.sites == ("dc", "r", "gpu")
    assert relayed.share == pytest.approx(1 - 1 / rate)
    # $/GB: 63 % at $0.01 + 37 % at $0.04 = $0.0211: $211 instead of $400 for the relay alone.
    expected = 10_000 * (0.01 / rate + 0.04 * (1 - 1 / rate))
    assert route.egress_usd == pytest.approx(expected)
    assert expected == pytest.approx(211.0, abs=0.5)
    assert route.seconds == pytest.approx(14 * HOUR)
    assert route.why == ("split over 2 paths (lp): $400 on the cheapest single path that meets "
                         "the deadline, $211 split")
    assert "63% via dc -> gpu + 37% via dc -> r -> gpu" in decision.reason


def test_a_deadline_only_a_split_meets() -> None:
    # 100,000 GB in 32 h - 10 h compute = 22 h: the relay alone needs 80,000 s = 22.2 h.
    decision = _relay_triangle(100_000, 32)
    assert decision.feasible, decision.reason
    assert decision.option is not None
    route = decision.option.movements[0].route
    assert route.multipath
    rate = 800_000 / (22 * HOUR - 0.01)  # 10.10 Gbit/s: more than either path alone
    assert route.rate_gbps == pytest.approx(rate)
    assert [leg.rate_gbps for leg in route.legs] == pytest.approx([rate - 1.0, 1.0])
    assert route.why.startswith("split over 2 paths (lp): no single path meets the deadline "
                                "(the fastest, dc -> r -> gpu, takes 22.2 h)")
    assert decision.option.completion_hours == pytest.approx(32.0)
    # Without splitting there is no way: the closest misses by 0.2 h.
    alone = _relay_triangle(100_000, 32, multipath=False)
    assert not alone.feasible
    assert "deadline 32 h missed: 32.2 h (transfer 22.2 h + compute 10.0 h)" in alone.reason


def test_a_split_beyond_the_links_capacity_is_refused_with_the_bound() -> None:
    # 11 Gbit/s at most leave dc: 100,000 GB needs 72,727 s = 20.2 h; a 25 h deadline leaves 15.
    decision = _relay_triangle(100_000, 25)
    assert not decision.feasible
    assert "deadline 25 h missed" in decision.reason


def test_priced_relay_gateways_make_the_split_a_milp() -> None:
    # A gateway at r costs $50/h while it relays: still worth it against the deadline.
    topo_paths = {"relay_usd_per_hour": 50.0}
    decision = _relay_triangle(100_000, 32, **topo_paths)
    assert decision.option is not None
    route = decision.option.movements[0].route
    assert route.solver == "milp"
    # Relay cost: the gateway runs for the whole 22 h split: 22 x $50 = $1,100.
    assert route.relay_usd == pytest.approx(22 * 50.0)


def test_directed_links_use_the_direction_the_bytes_travel() -> None:
    # gpu -> dc is 10 Gbit/s, dc -> gpu only 1 Gbit/s (a measured grid differs by direction).
    sections: dict[str, Any] = dict(
        sites=[site("dc", "eu", "onprem", h100=(8, 2.0)), site("gpu", "eu", h100=(8, 2.0))],
        links=[link("dc", "gpu", {"dc": 1, "gpu": 10}, 5)],
    )
    to_gpu = topology(**sections)
    net = Network(to_gpu)
    assert net.link("dc", "gpu").effective_gbps == 1  # type: ignore[union-attr]
    assert net.link("gpu", "dc").effective_gbps == 10  # type: ignore[union-attr]
    # 1,000 GB from gpu to dc: 800 s at 10 Gbit/s; the other way 8,000 s.
    assert net.fastest_path("gpu", "dc").transfer_seconds(1_000) == pytest.approx(  # type: ignore[union-attr]
        800.005)
    assert net.fastest_path("dc", "gpu").transfer_seconds(1_000) == pytest.approx(  # type: ignore[union-attr]
        8_000.005)
    # The sync load check uses the sending direction: 3,000 GB a day from gpu to dc fits the
    # 8 h window at 50 % of 10 Gbit/s (18,000 GB), where 1 Gbit/s (1,800 GB) would not.
    synced = topology(
        **sections,
        datasets=[{"id": "d", "site": "gpu", "size_gb": 3_000, "tier": "approved"}],
        sync_rules=[{"id": "back", "datasets": ["d"], "to": ["dc"]}],
    )
    [load] = analyze(synced).sync_plan.links  # type: ignore[union-attr]
    assert (load.sender, load.receiver) == ("gpu", "dc")
    assert load.effective_gbps == 10
    assert load.capacity_gb == pytest.approx(10 * 0.5 * 8 * 3600 / 8)
    assert not load.flagged


def test_storage_cost_tips_move_data_to_move_compute() -> None:
    # 500 TB at dc with h100s at $3.00; the cloud's h100s cost $2.50 and it holds the 16 GB
    # model. 64 GPUs x 100 h: compute $19,200 at dc, $16,000 in the cloud: moving the data
    # saves $3,200 of compute. (Links are free; dc's storage too, to keep the sums short.)
    def decide(cloud_storage: float) -> Decision:
        return _only(analyze(topology(
            sites=[{**site("dc", "eu", "onprem", h100=(64, 3.0)), **FREE_STORAGE},
                   {**site("cloud", "eu", h100=(64, 2.5)),
                    "storage_usd_per_gb_month": cloud_storage}],
            links=[link("dc", "cloud", 100, 2)],
            datasets=[{"id": "corpus", "site": "dc", "size_gb": 500_000, "tier": "curated"}],
            models=[{"id": "llm", "site": "cloud", "size_gb": 16}],
            workloads=[{"id": "job", "kind": "pretraining", "model": "llm",
                        "datasets": ["corpus"], "gpu": "h100", "gpus": 64, "hours": 100}],
        )).decisions)

    free = decide(0.0)
    assert free.action == "move_data"
    assert free.option is not None
    assert free.option.total_usd == pytest.approx(16_000)
    # At $0.10/GB-month the cloud holds 500,000 GB from the start of the 40,000 s (11.1 h) move
    # until the job ends 100 h later: 500,000 x 0.10 x 111.1 / 730.5 = $7,605 > $3,200 saved.
    priced = decide(0.10)
    assert priced.action == "move_compute"
    assert priced.option is not None
    assert priced.option.site == "dc"
    assert priced.option.total_usd == pytest.approx(19_200)
    moved = next(a for a in priced.alternatives if a.site == "cloud")
    held_h = (40_000 + 0.002) / HOUR + 100
    assert moved.storage_usd == pytest.approx(500_000 * 0.10 * held_h / 730.5)
    assert moved.storage_usd == pytest.approx(7_605, abs=1)
    assert moved.total_usd == pytest.approx(16_000 + moved.storage_usd)
    assert moved.rejected_because == (
        f"costs ${moved.total_usd - 19_200:,.0f} more (${moved.total_usd:,.0f} vs $19,200)")


def _elastic(**workload: Any) -> Decision:
    return _only(analyze(topology(
        sites=[site("dc", "eu", "onprem", h100=(8, 2.0)),
               {**site("cloud", "eu", h100=(1000, 2.0)), **FREE_STORAGE}],
        links=[link("dc", "cloud", 100, 2)],
        datasets=[{"id": "corpus", "site": "cloud", "size_gb": 100, "tier": "curated"}],
        workloads=[{"id": "job", "kind": "pretraining", "datasets": ["corpus"], "gpu": "h100",
                    "deadline_hours": 720, **workload}],
    )).decisions)


def test_a_fixed_gpu_count_can_make_a_job_infeasible_everywhere() -> None:
    fixed = _elastic(gpus=8, hours=12_500)
    assert not fixed.feasible
    assert "deadline 720 h missed" in fixed.reason


def test_elastic_gpus_make_the_job_feasible_on_the_most_gpus() -> None:
    # 100,000 GPU-hours on 8 to 1,000 GPUs. Linear scaling: the GPU-hours cost $200,000 at any
    # count, so the most GPUs finish first (100 h) for the same money; dc's 8 GPUs would need
    # 12,500 h.
    decision = _elastic(gpu_hours=100_000, gpus_min=8, gpus_max=1000)
    assert decision.feasible, decision.reason
    assert decision.option is not None
    assert decision.option.site == "cloud"
    assert decision.option.gpus == 1000
    assert decision.option.hours == pytest.approx(100.0)
    assert decision.option.compute_usd == pytest.approx(200_000)
    assert "on 1000 of 8-1000 GPUs, the most the site allows" in decision.reason
    dc = next(a for a in decision.alternatives if a.site == "dc")
    assert not dc.feasible
    assert "deadline 720 h missed" in dc.rejected_because  # 8 GPUs: 12,500 h


def test_sub_linear_scaling_takes_the_fewest_gpus_that_meet_the_deadline() -> None:
    # At 90 % efficiency per doubling, hours(n) = 12,500 x (8 / n)^a with a = log2(1.8) = 0.848,
    # and GPU-hours grow with n: the fewest GPUs that finish within 720 h cost least.
    decision = _elastic(gpu_hours=100_000, gpus_min=8, gpus_max=1000, scaling_efficiency=0.9)
    assert decision.option is not None
    a = math.log2(1.8)
    need = math.ceil(8 * (12_500 / 720) ** (1 / a))  # 8 x 17.36^1.179 = 231.6 -> 232
    assert need == 232
    assert decision.option.gpus == need
    hours = 12_500 * (8 / need) ** a
    assert hours <= 720 < 12_500 * (8 / (need - 1)) ** a
    assert decision.option.hours == pytest.approx(hours)
    assert decision.option.compute_usd == pytest.approx(2.0 * need * hours)
    assert "232 of 8-1000 GPUs, the fewest that meet the deadline" in decision.reason
