"""Shard replication: hand-solvable MILP instances, the infeasibility message, greedy vs exact."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netplan import Network, Topology
from netplan._shards import (
    DAYS_PER_MONTH,
    ReplicaSite,
    VectorIndexSpec,
    evaluate,
    replicate_shards,
    solve_greedy,
    solve_milp,
)

# fra-ams 8 ms, fra-sgp 160 ms, ams-sgp 165 ms (p99 RTT + jitter)
LAT = {("fra", "ams"): 8.0, ("fra", "sgp"): 160.0, ("ams", "sgp"): 165.0}
EGRESS = {("fra", "ams"): 0.02, ("fra", "sgp"): 0.09, ("ams", "sgp"): 0.09}


def _net(ids: list[str], lat: dict, egress: dict | None = None) -> Network:
    """A full mesh of equal links with these RTTs (ms, symmetric) and egress prices ($/GB leaving
    the first site of each pair; the reverse pair's price, or the same when it is not given)."""
    egress = egress or {}
    links = []
    for (a, b), ms in lat.items():
        out = egress.get((a, b), 0.0)
        links.append({"between": [a, b], "bandwidth_gbps": 10, "rtt_ms": ms,
                      "egress_usd_per_gb": {a: out, b: egress.get((b, a), out)}})
    return Network(Topology.model_validate({
        "name": "mesh", "sites": [{"id": i, "kind": "cloud", "region": "r"} for i in ids],
        "links": links}))


def _index(**kw: object) -> VectorIndexSpec:
    base: dict = dict(id="docs", primary="fra", shard_gb=(10.0, 10.0), update_gb_per_day=4.0,
                      queries=(("fra", 100.0),), latency_budget_ms=50.0, search_ms=10.0)
    base.update(kw)
    return VectorIndexSpec(**base)


def test_single_far_querying_site_forces_a_replica_there() -> None:
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("ams", "ams", 0.02),
             ReplicaSite("sgp", "sgp", 0.03)]
    spec = _index(queries=(("fra", 100.0), ("sgp", 20.0)))
    [result] = replicate_shards([spec], sites, _net(["fra", "ams", "sgp"], LAT, EGRESS))
    assert result.feasible
    assert [p.sites for p in result.shards] == [("fra", "sgp"), ("fra", "sgp")]
    p99 = {q.site: q.p99_ms for q in result.latencies}
    assert p99 == {"fra": 10.0, "sgp": 10.0}
    # storage: 2 shards x 10 GB at fra (0.02) and at sgp (0.03) per GB-month; sync: each sgp
    # replica receives 4 GB / 2 shards = 2 GB per day over fra -> sgp at 0.09 $/GB
    storage = (20 * 0.02 + 20 * 0.03) / DAYS_PER_MONTH
    assert result.cost is not None
    assert result.cost.storage_usd_per_day == pytest.approx(storage)
    assert result.cost.sync_egress_usd_per_day == pytest.approx(2 * 2.0 * 0.09)
    assert result.objective_usd_per_day == pytest.approx(storage + 0.36)
    assert result.gap == pytest.approx(0.0)
    out = result.to_json()
    assert out["shards"] == [{"shard": 0, "sites": ["fra", "sgp"]},
                             {"shard": 1, "sites": ["fra", "sgp"]}]
    assert out["p99_ms"] == {"fra": 10.0, "sgp": 10.0}
    assert out["feasible"] is True


def test_replicas_min_and_failure_domains_force_a_second_copy_in_another_domain() -> None:
    # fra2 is cheaper and close, but shares fra's failure domain: it does not count
    lat = {("fra", "fra2"): 1.0, ("fra", "ams"): 8.0, ("fra2", "ams"): 8.0}
    egress = {("fra", "fra2"): 0.0, ("fra", "ams"): 0.02, ("fra2", "ams"): 0.02}
    sites = [ReplicaSite("fra", "dc-fra", 0.02), ReplicaSite("fra2", "dc-fra", 0.01),
             ReplicaSite("ams", "dc-ams", 0.02)]
    net = _net(["fra", "fra2", "ams"], lat, egress)
    [one] = replicate_shards([_index(replicas_min=1)], sites, net)
    assert [p.sites for p in one.shards] == [("fra",), ("fra",)]
    [two] = replicate_shards([_index(replicas_min=2)], sites, net)
    assert [p.sites for p in two.shards] == [("ams", "fra"), ("ams", "fra")]
    assert two.cost is not None
    assert two.cost.sync_egress_usd_per_day == pytest.approx(2 * 2.0 * 0.02)


def test_no_placement_names_the_querying_site_the_shard_and_the_miss() -> None:
    # sgp may query but cannot hold replicas (no storage there)
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("ams", "ams", 0.02),
             ReplicaSite("sgp", "sgp", 0.03, storage_free_gb=0.0)]
    spec = _index(queries=(("sgp", 20.0),), shard_gb=(10.0,))
    [result] = replicate_shards([spec], sites, _net(["fra", "ams", "sgp"], LAT, EGRESS))
    assert not result.feasible
    assert result.reason == ("querying site sgp misses the budget for shard 0 by 120.0 ms "
                             "(best p99 170.0 ms, from fra)")
    assert result.misses[0].miss_ms == pytest.approx(120.0)
    out = result.to_json()
    assert out["shards"] == []
    assert out["feasible"] is False
    assert out["misses"] == [{"querying_site": "sgp", "shard": 0, "best_p99_ms": 170.0,
                              "miss_ms": 120.0, "best_site": "fra"}]


def test_too_few_failure_domains_is_explained() -> None:
    sites = [ReplicaSite("fra", "dc", 0.02), ReplicaSite("ams", "dc", 0.02)]
    [result] = replicate_shards([_index(replicas_min=2)], sites,
                                _net(["fra", "ams"], {("fra", "ams"): 8.0}))
    assert not result.feasible
    assert "replicas_min is 2 but only 1 failure domain" in result.reason


def test_storage_capacity_moves_replicas_to_the_next_site() -> None:
    # two near sites for a far client; the cheaper one can hold only one 10 GB shard
    lat = {("fra", "sgp"): 160.0, ("fra", "sin"): 162.0, ("sgp", "sin"): 2.0}
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("sgp", "sgp", 0.01, 15.0),
             ReplicaSite("sin", "sin", 0.05)]
    spec = _index(queries=(("sgp", 10.0),))
    [result] = replicate_shards([spec], sites, _net(["fra", "sgp", "sin"], lat))
    assert result.feasible
    placed = [set(p.sites) - {"fra"} for p in result.shards]
    assert sorted(map(sorted, placed)) == [["sgp"], ["sin"]]


def test_fanout_subset_only_constrains_the_shards_queried() -> None:
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("sgp", "sgp", 0.03)]
    spec = _index(queries=(("sgp", 20.0),), fanout=(1,))
    [result] = replicate_shards([spec], sites,
                                _net(["fra", "sgp"], {("fra", "sgp"): 160.0}))
    assert [p.sites for p in result.shards] == [("fra",), ("fra", "sgp")]


def test_query_egress_routes_to_the_cheapest_fitting_replica() -> None:
    # sgp's queries fit at fra (budget 200 ms); answering them from fra costs 0.09 $/GB of
    # responses; with enough traffic a local replica is cheaper than the egress
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("sgp", "sgp", 0.03)]
    net = _net(["fra", "sgp"], {("fra", "sgp"): 160.0}, {("fra", "sgp"): 0.09})
    quiet = _index(queries=(("sgp", 0.01),), latency_budget_ms=200.0, response_kb_per_query=4.0)
    busy = _index(queries=(("sgp", 500.0),), latency_budget_ms=200.0, response_kb_per_query=4.0)
    [r_quiet, r_busy] = replicate_shards([quiet, _replace_id(busy, "busy")], sites, net)
    assert [p.sites for p in r_quiet.shards] == [("fra",), ("fra",)]
    assert [p.sites for p in r_busy.shards] == [("fra", "sgp"), ("fra", "sgp")]
    assert r_busy.cost is not None
    assert r_busy.cost.query_egress_usd_per_day == 0.0
    assert r_quiet.cost is not None
    # 0.01 qps * 86400 s * 4 KB = 3.456 MB per shard per day at 0.09 $/GB, two shards
    assert r_quiet.cost.query_egress_usd_per_day == pytest.approx(2 * 0.003456 * 0.09)


def _replace_id(spec: VectorIndexSpec, new_id: str) -> VectorIndexSpec:
    from dataclasses import replace

    return replace(spec, id=new_id)


# ----------------------------------------------------------------------------------------------
# Random small instances: the MILP matches brute force; greedy never beats it.


@st.composite
def _instances(draw: st.DrawFn) -> tuple[VectorIndexSpec, list[ReplicaSite], Network]:
    n = draw(st.integers(2, 4))
    ids = [f"s{i}" for i in range(n)]
    lat = {(a, b): float(draw(st.integers(1, 80))) for a, b in itertools.combinations(ids, 2)}
    egress = {(a, b): draw(st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.09]))
              for a, b in itertools.permutations(ids, 2)}
    sites = [ReplicaSite(i, f"d{draw(st.integers(0, 2))}",
                         draw(st.sampled_from([0.01, 0.02, 0.03])),
                         draw(st.sampled_from([math.inf, math.inf, 25.0, 12.0])))
             for i in ids]
    shards = draw(st.integers(1, 2))
    queriers = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=n, unique=True))
    spec = VectorIndexSpec(
        id="ix", primary=ids[0], shard_gb=tuple([10.0] * shards),
        update_gb_per_day=float(draw(st.integers(0, 20))),
        queries=tuple((q, float(draw(st.integers(1, 100)))) for q in queriers),
        latency_budget_ms=float(draw(st.integers(20, 90))), search_ms=5.0,
        replicas_min=draw(st.integers(1, 3)),
        response_kb_per_query=draw(st.sampled_from([0.0, 0.0, 2.0])))
    return spec, sites, _net(ids, lat, egress)


def _brute_force(spec: VectorIndexSpec, sites: list[ReplicaSite], net: Network
                 ) -> float | None:
    ids = [s.id for s in sites]
    free = {s.id: s.storage_free_gb for s in sites}
    domain = {s.id: s.failure_domain for s in sites}
    others = [i for i in ids if i != spec.primary]
    subsets = [(spec.primary, *c) for r in range(len(others) + 1)
               for c in itertools.combinations(others, r)]
    best = None
    for placement in itertools.product(subsets, repeat=spec.shards):
        used = dict.fromkeys(ids, 0.0)
        for k, p in enumerate(placement):
            for s in p:
                used[s] += spec.shard_gb[k]
        if any(used[s] > free[s] + 1e-9 for s in ids):
            continue
        if any(len({domain[s] for s in p}) < spec.replicas_min for p in placement):
            continue
        cost, lat = evaluate(spec, placement, net, sites)
        if any(q.headroom_ms < -1e-9 for q in lat):
            continue
        if best is None or cost.total_usd_per_day < best:
            best = cost.total_usd_per_day
    return best


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_instances())
def test_milp_matches_brute_force_and_greedy_never_beats_it(instance: tuple) -> None:
    spec, sites, net = instance
    truth = _brute_force(spec, sites, net)
    [result] = replicate_shards([spec], sites, net)
    assert result.feasible == (truth is not None), result.reason
    if truth is None:
        assert solve_greedy([spec], sites, net)[spec.id] is None
        return
    assert result.objective_usd_per_day == pytest.approx(truth, rel=1e-6, abs=1e-9)
    if result.greedy_objective_usd_per_day is not None:
        assert result.greedy_objective_usd_per_day >= truth - 1e-6 * max(1.0, truth)
        assert result.gap is not None
        assert result.gap >= -1e-6
    for full in (solve_milp([spec], sites, net, prune=False)[spec.id],
                 solve_milp([spec], sites, net, reduce_identical_shards=False)[spec.id]):
        assert full is not None
        cost, _ = evaluate(spec, full, net, sites)
        assert cost.total_usd_per_day == pytest.approx(truth, rel=1e-6, abs=1e-9)


def test_shared_storage_couples_indexes_in_the_monolithic_milp() -> None:
    # sgp can hold 10 GB: only one of two indexes (1 shard each) gets the local replica; the one
    # with more sync volume to avoid paying for elsewhere should get it (sgp -> sin costs 0.08,
    # so fra -> sin goes direct at 0.09 rather than through sgp at 0.10)
    lat = {("fra", "sgp"): 160.0, ("fra", "sin"): 162.0, ("sgp", "sin"): 2.0}
    egress = {("fra", "sgp"): 0.02, ("fra", "sin"): 0.09, ("sgp", "sin"): 0.08}
    sites = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("sgp", "sgp", 0.02, 10.0),
             ReplicaSite("sin", "sin", 0.02)]
    net = _net(["fra", "sgp", "sin"], lat, egress)
    small = _index(id="small", shard_gb=(10.0,), update_gb_per_day=1.0,
                   queries=(("sgp", 1.0),))
    big = _index(id="big", shard_gb=(10.0,), update_gb_per_day=100.0, queries=(("sgp", 1.0),))
    placed = solve_milp([small, big], sites, net)
    assert placed == {"small": (("fra", "sin"),), "big": (("fra", "sgp"),)}
    # per index in order, `small` takes sgp first and `big` pays more
    decomposed = solve_milp([small, big], sites, net, decompose=True)
    assert decomposed == {"small": (("fra", "sgp"),), "big": (("fra", "sin"),)}


# ----------------------------------------------------------------------------------------------
# From a topology file: path latency, default storage price, storage_tb, validation with lines.

TOPO = """\
name: shards
sites:
  - {id: fra, kind: cloud, region: eu, storage_usd_per_gb_month: 0.1}
  - {id: ams, kind: cloud, region: eu}
  - {id: nyc, kind: cloud, region: us, storage_tb: 0.025}
  - {id: bos, kind: edge, region: us, storage_usd_per_gb_month: 0.05}
links:
  - {between: [fra, ams], bandwidth_gbps: 100, rtt_ms: 8, jitter_ms: 1, egress_usd_per_gb: 0.02}
  - {between: [ams, nyc], bandwidth_gbps: 100, rtt_ms: 75, jitter_ms: 3, egress_usd_per_gb: 0.05}
  - {between: [nyc, bos], bandwidth_gbps: 10, rtt_ms: 6, jitter_ms: 2}
vector_indexes:
  - id: docs
    site: fra
    shards: 2
    shard_gb: 20
    update_gb_per_day: 10
    queries: {fra: 200, bos: 50}
    latency_budget_ms: 40
    search_ms: 15
"""


def test_topology_indexes_use_path_latency_storage_limits_and_default_prices() -> None:
    from netplan import Network, parse_topology
    from netplan._sections import DEFAULT_STORAGE_USD_PER_GB_MONTH
    from netplan._shards import shard_replication

    topo = parse_topology(TOPO)
    [result] = shard_replication(topo, Network(topo))
    assert result.feasible, result.reason
    # bos is 83+4 ms from fra: a replica must sit at nyc (8 ms + 15 ms search) or bos itself;
    # nyc has room for only one shard (25 GB) and costs the default 0.08, bos 0.05: bos holds both
    assert [p.sites for p in result.shards] == [("bos", "fra"), ("bos", "fra")]
    p99 = {q.site: q.p99_ms for q in result.latencies}
    assert p99 == {"fra": 15.0, "bos": 15.0}
    assert result.cost is not None
    # sync fra -> ams -> nyc -> bos: 0.02 + 0.05 + 0 per GB, 5 GB per shard per day
    assert result.cost.sync_egress_usd_per_day == pytest.approx(2 * 5 * 0.07)
    assert result.cost.storage_usd_per_day == pytest.approx(40 * (0.1 + 0.05) / DAYS_PER_MONTH)
    assert DEFAULT_STORAGE_USD_PER_GB_MONTH == 0.08


def test_a_tight_budget_names_the_far_querying_site_and_shard() -> None:
    from netplan import Network, parse_topology
    from netplan._shards import shard_replication

    topo = parse_topology(TOPO.replace("storage_usd_per_gb_month: 0.05", "storage_tb: 0")
                          .replace("latency_budget_ms: 40", "latency_budget_ms: 20"))
    [result] = shard_replication(topo, Network(topo))
    assert not result.feasible
    # bos can hold nothing now; the nearest holder, nyc, gives 8 ms + 15 ms search = 23 ms
    assert "querying site bos misses the budget for shard 0 by 3.0 ms (best p99 23.0 ms, " \
           "from nyc)" in result.reason


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("    shards: 2\n", ""), "vector_indexes[0]: shards is required when shard_gb is one size"
                                  " (line 12)"),
        (("queries: {fra: 200, bos: 50}", "queries: {fra: 200, lax: 50}"),
         "vector_indexes[0].queries.lax: unknown site 'lax' (line 17)"),
        (("    search_ms: 15\n", "    search_ms: 15\n    fanout: [0, 5]\n"),
         "vector_indexes[0].fanout[1]: shard 5 does not exist (the index has 2 shards) (line 20)"),
        (("latency_budget_ms: 40", "latency_budget_ms: -1"),
         "vector_indexes[0].latency_budget_ms: must be > 0 (line 18)"),
    ],
)
def test_vector_index_errors_name_the_field_and_line(edit: tuple[str, str], message: str) -> None:
    from netplan import TopologyError, parse_topology

    with pytest.raises(TopologyError) as info:
        parse_topology(TOPO.replace(*edit))
    assert message in str(info.value)


def test_query_latency_matrix_matches_the_network_models_paths_and_relay_rule() -> None:
    from netplan import Network, parse_topology

    topo = parse_topology("""\
name: relay
sites:
  - {id: fra, kind: cloud, region: eu}
  - {id: pop, kind: edge, region: eu, relay: false}
  - {id: sgp, kind: cloud, region: ap}
  - {id: bom, kind: cloud, region: ap}
links:
  - {between: [fra, pop], bandwidth_gbps: 10, rtt_ms: 1, jitter_ms: 0.5}
  - {between: [pop, sgp], bandwidth_gbps: 10, rtt_ms: 1}
  - {between: [fra, sgp], bandwidth_gbps: 10, rtt_ms: 160, jitter_ms: 4}
  - {between: [sgp, bom], bandwidth_gbps: 10, rtt_ms: 30, jitter_ms: 2}
vector_indexes:
  - {id: ix, site: fra, shards: 1, shard_gb: 1, queries: {sgp: 1, pop: 1, bom: 1},
     latency_budget_ms: 50, search_ms: 5}
""")
    network = Network(topo)
    sources = ["sgp", "pop", "bom", "fra"]
    matrix = network.p99_ms_matrix(sources)
    col = network.site_index
    for i, q in enumerate(sources):
        for s in ("fra", "pop", "sgp", "bom"):
            path = network.latency_path(q, s)
            expected = 0.0 if q == s else (math.inf if path is None else path.p99_ms)
            assert matrix[i, col(s)] == pytest.approx(expected), (q, s)
    # pop does not forward: sgp -> fra is the 164 ms direct link, not 2.5 ms via pop
    assert matrix[0, col("fra")] == pytest.approx(164.0)
    assert matrix[1, col("bom")] == pytest.approx(33.0)


def test_split_certificate_skips_the_joint_milp_only_when_storage_does_not_couple() -> None:
    from netplan._shards import MilpStats

    lat = {("fra", "sgp"): 160.0, ("fra", "sin"): 162.0, ("sgp", "sin"): 2.0}
    egress = {("fra", "sgp"): 0.02, ("fra", "sin"): 0.09, ("sgp", "sin"): 0.08}
    net = _net(["fra", "sgp", "sin"], lat, egress)
    specs = [_index(id="a", shard_gb=(10.0,), queries=(("sgp", 1.0),)),
             _index(id="b", shard_gb=(10.0,), queries=(("sgp", 1.0),))]
    roomy = [ReplicaSite("fra", "fra", 0.02), ReplicaSite("sgp", "sgp", 0.02, 20.0),
             ReplicaSite("sin", "sin", 0.02)]
    tight = [roomy[0], ReplicaSite("sgp", "sgp", 0.02, 10.0), roomy[2]]
    for sites, certified in ((roomy, True), (tight, False)):
        stats = MilpStats()
        split = solve_milp(specs, sites, net, stats=stats)
        joint = solve_milp(specs, sites, net, split_when_uncoupled=False)
        assert stats.split_certified is certified
        total = [sum(evaluate(spec, placed[spec.id] or (), net, sites)[0].total_usd_per_day
                     for spec in specs) for placed in (split, joint)]
        assert total[0] == pytest.approx(total[1])
