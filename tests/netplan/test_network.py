"""The TCP model against hand-computed values, directed links, and the candidate bulk paths."""

from __future__ import annotations

import math

import pytest

from netplan import Network, PlanError, Topology, TopologyError, TransferSettings, link_throughput
from netplan.topology import Link


def _link(**kw: object) -> Link:
    return Link.model_validate({"between": ["a", "b"], **kw})


def test_capacity_limited_link() -> None:
    # 16 streams x 3 MiB / 10 ms = 40.3 Gbit/s of window, no loss: the 1 Gbit/s port binds.
    tp = link_throughput(_link(bandwidth_gbps=1, rtt_ms=10), TransferSettings())
    assert tp.limited_by == "capacity"
    assert tp.effective_gbps == 1.0
    assert tp.window_gbps == pytest.approx(16 * 3 * 1024 * 1024 * 8 / 0.010 / 1e9)
    assert tp.loss_gbps == math.inf


def test_window_limited_link() -> None:
    # One stream with a 64 KiB window over 50 ms: 65536 * 8 / 0.05 = 10.49 Mbit/s.
    settings = TransferSettings(streams=1, window_bytes=65536)
    tp = link_throughput(_link(bandwidth_gbps=10, rtt_ms=50), settings)
    assert tp.limited_by == "window"
    assert tp.effective_gbps == pytest.approx(0.01048576)


def test_loss_limited_link() -> None:
    # Mathis: 4 x 1460 B x 8 x sqrt(1.5) / (0.1 s x sqrt(0.01)) = 5.72 Mbit/s, below the
    # 4 x 3 MiB / 100 ms = 1.0 Gbit/s window bound.
    settings = TransferSettings(streams=4)
    tp = link_throughput(_link(bandwidth_gbps=10, rtt_ms=100, loss_pct=1), settings)
    assert tp.limited_by == "loss"
    assert tp.effective_gbps == pytest.approx(0.0057220, rel=1e-4)
    assert tp.window_gbps == pytest.approx(1.00663296)


def test_more_streams_raise_a_window_limited_link() -> None:
    link = _link(bandwidth_gbps=100, rtt_ms=100)
    one = link_throughput(link, TransferSettings(streams=1)).effective_gbps
    eight = link_throughput(link, TransferSettings(streams=8)).effective_gbps
    assert eight == pytest.approx(8 * one)


def _triangle(direct_loss_pct: float, relay_region: str = "eu") -> Topology:
    return Topology.model_validate(
        {
            "name": "triangle",
            "sites": [
                {"id": "a", "kind": "onprem", "region": "eu"},
                {"id": "b", "kind": "cloud", "region": "us"},
                {"id": "r", "kind": "cloud", "region": relay_region},
            ],
            "links": [
                {
                    "between": ["a", "b"],
                    "bandwidth_gbps": 10,
                    "rtt_ms": 70,
                    "loss_pct": direct_loss_pct,
                    "egress_usd_per_gb": 0.02,
                },
                {
                    "between": ["a", "r"],
                    "bandwidth_gbps": 10,
                    "rtt_ms": 10,
                    "egress_usd_per_gb": {"a": 0.01},
                },
                {
                    "between": ["r", "b"],
                    "bandwidth_gbps": 10,
                    "rtt_ms": 75,
                    "egress_usd_per_gb": {"r": 0.05, "b": 0.09},
                },
            ],
        }
    )


def test_relay_beats_a_degraded_direct_link() -> None:
    net = Network(_triangle(direct_loss_pct=2))
    path = net.fastest_path("a", "b")
    assert path is not None
    assert path.sites == ("a", "r", "b")
    # The r-b hop binds: 16 x 3 MiB / 75 ms (window), far above the lossy direct link.
    assert path.bottleneck_gbps == pytest.approx(16 * 3 * 1024 * 1024 * 8 / 0.075 / 1e9)
    assert path.limited_by == "window"
    assert path.bottleneck_link == ("r", "b")
    direct = net.link("a", "b")
    assert direct is not None
    assert direct.limited_by == "loss"
    assert path.bottleneck_gbps > 100 * direct.effective_gbps
    # Egress: leave a towards r (0.01) + leave r towards b (0.05), per GB.
    assert path.egress_usd(1000) == pytest.approx(60.0)
    assert path.transfer_seconds(1000) == pytest.approx(8000 / path.bottleneck_gbps + 0.085)
    # Both are candidates: the direct link is cheaper ($0.02/GB < $0.06/GB), the relay faster.
    candidates = net.paths("a", "b")
    assert [p.sites for p in candidates] == [("a", "b"), ("a", "r", "b")]
    assert net.cheapest_path("a", "b") == net.direct_path("a", "b")


def test_healthy_direct_link_is_not_relayed() -> None:
    net = Network(_triangle(direct_loss_pct=0))
    path = net.fastest_path("a", "b")
    assert path is not None
    assert path.sites == ("a", "b")
    # The relay is slower and dearer: it is not even a candidate.
    assert [p.sites for p in net.paths("a", "b")] == [("a", "b")]
    # The reverse direction pays b's price for leaving over the direct link.
    back = net.cheapest_path("b", "a")
    assert back is not None
    assert back.egress_usd_per_gb == pytest.approx(0.02)


def test_region_confined_paths_avoid_relays_outside_the_regions() -> None:
    net = Network(_triangle(direct_loss_pct=2, relay_region="apac"))
    relayed = net.fastest_path("a", "b")
    assert relayed is not None
    assert relayed.sites == ("a", "r", "b")
    confined = net.fastest_path("a", "b", regions=frozenset({"eu", "us"}))
    assert confined is not None
    assert confined.sites == ("a", "b")
    assert net.fastest_path("a", "b", regions=frozenset({"eu"})) is None


def test_max_relays_bounds_the_candidates() -> None:
    # A chain a - x - y - z - b with a slow direct a - b: three relays are needed to avoid it.
    sites = [{"id": s, "kind": "cloud", "region": "eu"} for s in ("a", "x", "y", "z", "b")]
    links = [{"between": [u, v], "bandwidth_gbps": 10, "rtt_ms": 1}
             for u, v in (("a", "x"), ("x", "y"), ("y", "z"), ("z", "b"))]
    links.append({"between": ["a", "b"], "bandwidth_gbps": 1, "rtt_ms": 1})
    topo = Topology.model_validate({"name": "chain", "sites": sites, "links": links})
    assert [p.sites for p in Network(topo).paths("a", "b")] == [("a", "b")]
    wide = Topology.model_validate({**topo.model_dump(), "paths": {"max_relays": 3}})
    net = Network(wide)
    # (both free: the wider sorts first)
    assert [p.sites for p in net.paths("a", "b")] == [("a", "x", "y", "z", "b"), ("a", "b")]
    assert net.fastest_path("a", "b").sites == ("a", "x", "y", "z", "b")  # type: ignore[union-attr]
    # Every simple path, and the least $/GB to every site (free links: 0 where reachable).
    assert len(net.all_paths("a", "b")) == 2
    assert Network(topo).min_usd_per_gb_from("a").tolist() == [0, 0, 0, 0, 0]
    no_relays = Topology.model_validate({**topo.model_dump(), "paths": {"max_relays": 0}})
    assert math.isinf(Network(no_relays).min_usd_per_gb_from("a")[2])  # y is two hops away


def test_links_are_directed() -> None:
    # 10 Gbit/s a -> b, 2 Gbit/s b -> a, loss only on b -> a, egress only leaving b.
    topo = Topology.model_validate({
        "name": "asym",
        "sites": [{"id": "a", "kind": "cloud", "region": "eu"},
                  {"id": "b", "kind": "cloud", "region": "us"}],
        "links": [{"between": ["a", "b"], "bandwidth_gbps": {"a": 10, "b": 2}, "rtt_ms": 80,
                   "loss_pct": {"b": 0.1}, "egress_usd_per_gb": {"b": 0.09}}],
    })
    net = Network(topo)
    there, back = net.link("a", "b"), net.link("b", "a")
    assert there is not None
    assert back is not None
    # a -> b: 16 x 3 MiB / 80 ms = 5.03 Gbit/s of window, below the 10 Gbit/s port.
    assert there.capacity_gbps == 10
    assert there.effective_gbps == pytest.approx(16 * 3 * 1024 * 1024 * 8 / 0.080 / 1e9)
    assert there.limited_by == "window"
    assert there.egress_usd_per_gb == 0
    # b -> a: Mathis at 0.1 %: 16 x 1460 x 8 x 1.2247 / (0.08 x sqrt(0.001)) = 0.0905 Gbit/s.
    assert back.limited_by == "loss"
    assert back.effective_gbps == pytest.approx(16 * 1460 * 8 * math.sqrt(1.5)
                                                / (0.08 * math.sqrt(0.001)) / 1e9)
    assert back.egress_usd_per_gb == 0.09
    # The same 100 GB takes 159 s one way and 2.5 h the other.
    assert net.fastest_path("a", "b").transfer_seconds(100) == pytest.approx(  # type: ignore[union-attr]
        800 / there.effective_gbps + 0.08)
    assert net.fastest_path("b", "a").transfer_seconds(100) == pytest.approx(  # type: ignore[union-attr]
        800 / back.effective_gbps + 0.08)


def test_a_bandwidth_map_needs_both_ends() -> None:
    with pytest.raises(TopologyError, match="no bandwidth for the direction leaving 'b'"):
        Topology.model_validate({
            "name": "x",
            "sites": [{"id": "a", "kind": "cloud", "region": "eu"},
                      {"id": "b", "kind": "cloud", "region": "us"}],
            "links": [{"between": ["a", "b"], "bandwidth_gbps": {"a": 10}, "rtt_ms": 8}],
        })


def test_latency_path_minimises_rtt_plus_jitter() -> None:
    net = Network(_triangle(direct_loss_pct=2))
    lat = net.latency_path("a", "b")
    assert lat is not None
    assert lat.sites == ("a", "b")
    assert lat.p99_ms == 70


def test_unknown_site_is_a_plan_error() -> None:
    net = Network(_triangle(direct_loss_pct=0))
    with pytest.raises(PlanError, match="unknown site 'zz'"):
        net.paths("a", "zz")


def test_a_site_that_does_not_relay_ends_paths_but_never_forwards() -> None:
    doc = _triangle(direct_loss_pct=2).model_dump()
    doc["sites"][2]["relay"] = False
    net = Network(Topology.model_validate(doc))
    assert [p.sites for p in net.paths("a", "b")] == [("a", "b")]
    # It is still a destination in its own right.
    to_r = net.fastest_path("a", "r")
    assert to_r is not None
    assert to_r.sites == ("a", "r")


def test_transfer_settings_from_the_topology_apply() -> None:
    doc = _triangle(direct_loss_pct=0).model_dump()
    doc["transfer"] = {"streams": 1, "window_bytes": 65536}
    net = Network(Topology.model_validate(doc))
    tp = net.link("a", "r")
    assert tp is not None
    assert tp.limited_by == "window"
    assert tp.effective_gbps == pytest.approx(65536 * 8 / 0.010 / 1e9)
