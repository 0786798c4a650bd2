"""Shard replication at scale: exact MILP (HiGHS) vs greedy, time and optimality gap.

Generates a seeded topology of 2,000 sites and 10,000 links on a 2-D map (RTT = distance), with
100 vector indexes x 64 shards, each queried from 50 sites clustered around a few user regions,
then times: building the query-latency / egress matrices, the monolithic MILP (one problem, storage
shared by all indexes, --time-limit seconds), the per-index decomposition when the monolithic one
cannot finish (with a certificate when the per-index optima jointly fit the storage), and the
greedy heuristic; prints the gap between them.

    PYTHONPATH=. /work/venv/bin/python benchmarks/netplan_shards_scale.py

Measured on the 2-core shared dev box (seed 7), defaults:
    matrices 10.6 s; monolithic MILP 143.8 s wall (5,114,048 binaries, 946,002 rows; HiGHS hit
    its 60 s limit without a proof, so it does NOT finish); per-index MILPs 9.3 s (100 problems,
    79,907 binaries after the exact identical-shard reduction), and the union of per-index optima
    fits every site's storage, so it is the joint optimum: $681.91/day; greedy 3.8 s,
    $685.39/day; gap 0.51 %.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from netplan import Network, Topology
from netplan._shards import (
    MilpStats,
    evaluate,
    index_specs,
    replica_sites,
    solve_greedy,
    solve_milp,
)


def generate(sites: int, links: int, indexes: int, shards: int, queriers: int,
             seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    # A 300 x 150 ms "world": clusters of sites around metros, RTT ~ distance.
    metros = rng.uniform([0, 0], [300, 150], size=(sites // 10, 2))
    home = rng.integers(0, len(metros), size=sites)
    pos = metros[home] + rng.normal(0, 4, size=(sites, 2))
    kinds = rng.choice(["onprem", "cloud", "edge"], size=sites, p=[0.5, 0.2, 0.3])
    site_docs = []
    for i in range(sites):
        doc: dict[str, Any] = {"id": f"s{i}", "kind": str(kinds[i]),
                               "region": f"r{int(pos[i, 0] // 30)}-{int(pos[i, 1] // 30)}",
                               "failure_domain": f"metro{home[i]}"}
        if kinds[i] == "edge":
            doc["storage_tb"] = 2.0  # small edge boxes: storage can bind
            doc["storage_usd_per_gb_month"] = 0.12
        elif kinds[i] == "cloud":
            doc["storage_usd_per_gb_month"] = 0.08
        else:
            doc["storage_usd_per_gb_month"] = 0.03
        site_docs.append(doc)
    # k nearest neighbours first (a connected-ish mesh), then random nearby pairs up to `links`.
    d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    pairs: set[tuple[int, int]] = set()
    order = np.argsort(d, axis=1)
    for i in range(sites):
        for j in order[i, :4]:
            pairs.add((min(i, int(j)), max(i, int(j))))
    # a chain through a random order keeps the graph connected
    perm = rng.permutation(sites)
    for a, b in zip(perm, perm[1:], strict=False):
        if len(pairs) >= links:
            break
        pairs.add((min(int(a), int(b)), max(int(a), int(b))))
    while len(pairs) < links:
        i = int(rng.integers(sites))
        j = int(order[i, int(rng.integers(4, 40))])
        pairs.add((min(i, j), max(i, j)))
    link_docs = []
    for i, j in sorted(pairs)[:links]:
        price = {f"s{i}": 0.02 if kinds[i] == "cloud" else 0.0,
                 f"s{j}": 0.02 if kinds[j] == "cloud" else 0.0}
        link_docs.append({"between": [f"s{i}", f"s{j}"], "bandwidth_gbps": 10.0,
                          "rtt_ms": round(float(d[i, j]) + 0.5, 2),
                          "jitter_ms": round(float(rng.uniform(0, 2)), 2),
                          "egress_usd_per_gb": price})
    index_docs = []
    for x in range(indexes):
        primary = int(rng.integers(sites))
        user_metros = rng.choice(len(metros), size=3, replace=False)
        near = np.flatnonzero(np.isin(home, user_metros))
        near = near[near != primary]
        qs = rng.choice(near, size=min(queriers, len(near)), replace=False)
        if len(qs) < queriers:
            others = np.setdiff1d(np.arange(sites), np.concatenate([qs, [primary]]))
            qs = np.concatenate([qs, rng.choice(others, queriers - len(qs), replace=False)])
        index_docs.append({
            "id": f"ix{x}", "site": f"s{primary}", "shards": shards, "shard_gb": 4.0,
            "update_gb_per_day": 32.0,
            "queries": {f"s{int(q)}": float(rng.integers(1, 200)) for q in qs},
            "latency_budget_ms": 25.0, "search_ms": 5.0, "replicas_min": 2,
        })
    return {"name": "shards-scale", "sites": site_docs, "links": link_docs,
            "vector_indexes": index_docs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=2000)
    ap.add_argument("--links", type=int, default=10000)
    ap.add_argument("--indexes", type=int, default=100)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--queriers", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="seconds for the monolithic MILP before decomposing per index")
    ap.add_argument("--skip-monolithic", action="store_true",
                    help="go straight to the per-index decomposition")
    args = ap.parse_args()

    t = time.perf_counter()
    topo = Topology.model_validate(generate(args.sites, args.links, args.indexes, args.shards,
                                            args.queriers, args.seed))
    network = Network(topo)
    specs = index_specs(topo)
    sites = replica_sites(topo)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    # the rows the solvers read, computed once here and cached by the Network for the solvers
    network.p99_ms_matrix(sorted({q for spec in specs for q, _ in spec.queries}
                                 | {spec.primary for spec in specs}))
    network.egress_usd_per_gb_matrix(sorted({spec.primary for spec in specs}))
    net = network
    t_matrix = time.perf_counter() - t
    print(f"topology: {len(topo.sites)} sites, {len(topo.links)} links, {len(specs)} indexes x "
          f"{args.shards} shards, {args.queriers} querying sites each "
          f"(validate + network {t_build:.1f} s, latency/egress matrices {t_matrix:.1f} s)")

    t = time.perf_counter()
    greedy = solve_greedy(specs, sites, net)
    t_greedy = time.perf_counter() - t

    solver, exact, t_exact = "", {}, 0.0
    finished = False
    if not args.skip_monolithic:
        mono_stats = MilpStats()
        t = time.perf_counter()
        exact = solve_milp(specs, sites, net, time_limit_s=args.time_limit, stats=mono_stats,
                           split_when_uncoupled=False)
        t_exact = time.perf_counter() - t
        finished = mono_stats.timed_out == 0 and all(v is not None for v in exact.values())
        solver = "monolithic MILP"
        print(f"monolithic MILP: {t_exact:.1f} s wall (model build + HiGHS), "
              f"{mono_stats.binaries:,} binaries, {mono_stats.constraints:,} rows, "
              f"identical-shard reduction on {mono_stats.reduced_indexes} of {len(specs)} "
              + ("indexes (storage could bind jointly), "
                 if mono_stats.reduced_indexes < len(specs) else "indexes, ")
              + ("proven optimal" if finished else
                 f"did NOT finish: HiGHS hit its {args.time_limit:g} s limit"))
    if not finished:
        split_stats = MilpStats()
        t = time.perf_counter()
        exact = solve_milp(specs, sites, net, stats=split_stats)
        t_exact = time.perf_counter() - t
        if split_stats.split_certified:
            solver = "per-index MILPs + joint-storage certificate"
            print(f"decomposed per index: {t_exact:.1f} s for {split_stats.problems} MILPs "
                  f"({split_stats.binaries:,} binaries in all, identical-shard reduction on "
                  f"{split_stats.reduced_indexes} indexes); the union of the per-index optima "
                  "fits every site's storage, so it IS the joint optimum")
        else:
            dec_stats = MilpStats()
            t = time.perf_counter()
            exact = solve_milp(specs, sites, net, decompose=True, split_when_uncoupled=False,
                               stats=dec_stats)
            t_exact += time.perf_counter() - t
            solver = "sequential per-index MILPs"
            print(f"decomposed per index: storage couples the indexes, so they were solved in "
                  f"order on the storage left ({t_exact:.1f} s, {dec_stats.problems} MILPs): "
                  "optimal per index, not proven jointly optimal")

    total_exact = total_greedy = 0.0
    infeasible = 0
    for spec in specs:
        e, g = exact.get(spec.id), greedy.get(spec.id)
        if e is None or g is None:
            infeasible += 1
            continue
        total_exact += evaluate(spec, e, net, sites)[0].total_usd_per_day
        total_greedy += evaluate(spec, g, net, sites)[0].total_usd_per_day
    gap = (total_greedy - total_exact) / total_exact if total_exact > 0 else math.nan
    replicas = sum(len(p) for v in exact.values() if v for p in v)
    print(f"exact ({solver}): {t_exact:.1f} s, ${total_exact:,.2f}/day, {replicas:,} replicas")
    print(f"greedy: {t_greedy:.1f} s, ${total_greedy:,.2f}/day")
    print(f"gap (greedy - exact) / exact: {gap:.2%}"
          + (f"; {infeasible} index(es) without a placement in either solver" if infeasible
             else ""))


if __name__ == "__main__":
    main()
