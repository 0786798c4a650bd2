"""How long an N-1 what-if sweep of a large estate takes, where, and what incrementality saves.

The estate is `benchmarks/netplan_scale.py`'s seeded generator at 1,000 sites, 5,000 links and
200 workloads (seed 7). The sweep fails every site, then every link, alone: 6,000 scenarios.
Measured in one run, on the same baseline:
- 1 process (`SerialExecutor`), 2 local worker processes (`LocalExecutor`, spawned: each builds
  its own baseline, which is in its time), and a Dask `LocalCluster` with 2 worker processes
  (`DaskExecutor`; the cluster's start-up is printed apart). The three results must be equal.
- Incrementality: scenarios answered without building a network (they reach nothing the plan
  uses), workload decisions re-planned vs kept, and what a full re-analysis of every scenario
  would cost: a seeded sample of scenarios re-planned in full (`--full`'s path), its mean time x
  6,000, against the incremental sweep on 1 process. The sample's answers must equal the
  incremental ones.
A benchmark, not a test. Hold the lock while it runs (the machine is shared):

    flock /tmp/netplan-bench.lock python benchmarks/netplan_whatif.py [--sites 1000]
        [--seed 7] [--repeat 3] [--sample 12] [--workers 2] [--no-dask]

Each executor runs `--repeat` times, in turn (1 process, local, Dask, then again), and the
table shows the median and the range.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.netplan_scale import generate  # noqa: E402
from netplan.executors import (  # noqa: E402
    DaskExecutor,
    LocalExecutor,
    ScenarioExecutor,
    SerialExecutor,
    run_whatif,
)
from netplan.scenarios import sweep  # noqa: E402
from netplan.topology import Topology  # noqa: E402
from netplan.whatif import (  # noqa: E402
    Baseline,
    WhatifOptions,
    WhatifResult,
    build_baseline,
    evaluate,
)

FLOOR_SECONDS = 600.0  # issue 14: the full N-1 sweep of the 1,000-site estate in under 10 min


def _timed(topo: Topology, scenarios: Any, executor: ScenarioExecutor,
           baseline: Baseline) -> tuple[float, WhatifResult]:
    """Wall seconds of one sweep (in this process, or scattering to the workers and their
    own baselines included)."""
    start = time.perf_counter()
    result = run_whatif(topo, scenarios, executor, baseline=baseline, sweep="n-1")
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sample", type=int, default=12,
                        help="scenarios re-planned in full to estimate a full sweep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per executor (median)")
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()

    topo = Topology.model_validate(generate(args.seed, args.sites, args.sites * 5,
                                            args.sites // 5))
    start = time.perf_counter()
    baseline = build_baseline(topo)
    baseline_s = time.perf_counter() - start
    scenarios = sweep(topo, "n-1")
    print(f"estate: {len(topo.sites):,} sites, {len(topo.links):,} links, "
          f"{len(topo.workloads):,} workloads (seed {args.seed}); baseline (analyze + "
          f"footprints) {baseline_s:.1f} s; N-1 sweep: {len(scenarios):,} scenarios")

    runs: dict[str, list[float]] = {}
    same: dict[str, bool] = {}
    serial: WhatifResult | None = None

    def record(name: str, seconds: float, result: WhatifResult) -> None:
        nonlocal serial
        runs.setdefault(name, []).append(seconds)
        if serial is None:
            serial = result
        same[name] = same.get(name, True) and result.scenarios == serial.scenarios

    cluster: Any = None
    up_s = 0.0
    if not args.no_dask:
        from distributed import LocalCluster

        start = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        up_s = time.perf_counter() - start
    try:
        for _ in range(args.repeat):
            record("1 process", *_timed(topo, scenarios, SerialExecutor(), baseline))
            record(f"{args.workers} local processes (spawned; each builds its baseline)",
                   *_timed(topo, scenarios, LocalExecutor(args.workers), baseline))
            if cluster is not None:
                record(f"Dask LocalCluster, {args.workers} worker processes (+{up_s:.1f} s "
                       "to start the cluster)",
                       *_timed(topo, scenarios, DaskExecutor(cluster.scheduler_address),
                               baseline))
    finally:
        if cluster is not None:
            cluster.close()
    assert serial is not None
    serial_s = statistics.median(runs["1 process"])

    st = serial.stats()
    rng = random.Random(args.seed)
    sample = rng.sample(list(scenarios), min(args.sample, len(scenarios)))
    full = WhatifOptions(incremental=False)
    start = time.perf_counter()
    full_results = [evaluate(baseline, s, full) for s in sample]
    per_full = (time.perf_counter() - start) / len(sample)
    by_name = {r.scenario.name: r for r in serial.scenarios}
    agree = all(by_name[r.scenario.name].same_outcome(r) for r in full_results)
    full_estimate = per_full * len(scenarios)

    print()
    print(f"| executor | N-1 sweep wall s (median of {args.repeat}) | range | vs 1 process | "
          "same results as 1 process |")
    print("|---|---:|---|---:|---|")
    for name, times in runs.items():
        mid = statistics.median(times)
        print(f"| {name} | {mid:.1f} | {min(times):.1f}-{max(times):.1f} | "
              f"{serial_s / mid:.2f}x | {'yes' if same[name] else 'NO'} |")
    print()
    print(f"incrementality: {st['scenarios_evaluated']:,} scenarios evaluated, "
          f"{st['scenarios_skipped']:,} answered without building a network; "
          f"{st['workloads_replanned']:,} workload decisions re-planned, "
          f"{st['workloads_skipped']:,} kept")
    print(f"full re-analysis: {per_full:.2f} s per scenario (mean of {len(sample)} sampled; "
          f"answers {'equal' if agree else 'DIFFER FROM'} the incremental ones) -> "
          f"{full_estimate / 60:,.0f} min for the sweep on 1 process; incremental "
          f"{serial_s:.0f} s: {full_estimate / serial_s:,.0f}x faster")
    print(f"outcome: {st['scenarios_with_effect']:,} scenarios change something, "
          f"{len(serial.single_points_of_failure):,} single points of failure; worst: "
          f"{', '.join(r.scenario.name for r in serial.ranking[:3])}")
    best = min(statistics.median(t) for t in runs.values())
    print(f"floor: the sweep in under {FLOOR_SECONDS / 60:.0f} min: "
          f"{'met' if best < FLOOR_SECONDS else 'NOT met'} ({best:.0f} s at best)")


if __name__ == "__main__":
    main()
