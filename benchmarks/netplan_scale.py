"""How `netplan analyze` grows with the estate: 1,000 to 10,000 sites, 5 links and 0.2 workloads
per site, multipath on.

Generates a seeded random topology per size (connected; onprem, cloud and edge sites in 20
regions; half the links with different capacities per direction; some cloud sites pricing their
relay gateways, so splits become MILPs; raw, curated and approved datasets with residency;
training-style workloads, some with deadlines, and inference workloads), writes it as YAML,
then runs the real command, `python -m netplan analyze FILE --json --max-alternatives 0`, and
prints per size: wall and CPU seconds, peak memory, JSON size, how many workloads are feasible,
the LP/MILP solves and the largest one's size; then the growth exponent fitted over the sizes
(least squares on log time vs log sites). With `--baseline-ref REF` the same command of that
git revision runs on the same files in the same run (up to `--baseline-max-sites`, since the
old planner grows as n^2.2). A benchmark, not a test.

    python benchmarks/netplan_scale.py [--sizes 1000,2000,4000,10000] [--seed 7]
        [--baseline-ref main --baseline-max-sites 2000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parents[1]

GOAL_SITES, GOAL_SECONDS, GOAL_MB = 10_000, 60.0, 100.0
GPU_TYPES = {"h100": 4.9, "a100": 2.9, "l4": 0.8}


def generate(
    seed: int,
    n_sites: int = 1000,
    n_links: int = 5000,
    n_workloads: int = 200,
    legacy: bool = False,
) -> dict[str, Any]:
    """A seeded estate; `legacy` leaves out what the planner before issue 12 cannot read
    (per-direction bandwidth, priced relays, elastic GPU counts), for a same-run baseline."""
    rng = random.Random(seed)
    regions = [f"region-{i:02d}" for i in range(20)]
    sites: list[dict[str, Any]] = []
    for i in range(n_sites):
        kind = rng.choices(["onprem", "cloud", "edge"], weights=[3, 1, 6])[0]
        site: dict[str, Any] = {
            "id": f"{kind}-{i:04d}",
            "kind": kind,
            "region": rng.choice(regions),
        }
        if kind == "cloud" or (kind == "onprem" and rng.random() < 0.5):
            types = rng.sample(sorted(GPU_TYPES), k=rng.randint(1, 3))
            site["gpus"] = {t: rng.choice([8, 16, 32, 64, 128, 256]) for t in types}
            site["gpu_hour_usd"] = {
                t: round(GPU_TYPES[t] * rng.uniform(0.4, 1.4), 3) for t in types
            }
        elif kind == "edge" and rng.random() < 0.3:
            site["gpus"] = {"l4": rng.choice([1, 2, 4])}
            site["gpu_hour_usd"] = {"l4": round(rng.uniform(0.7, 1.2), 3)}
        if kind == "edge" and rng.random() < 0.5:
            site["relay"] = False
        if kind == "cloud" and rng.random() < 0.3 and not legacy:
            # A relay VM (e.g. c5n.9xlarge, about $1.94/h) when the site forwards a transfer.
            site["relay_usd_per_hour"] = round(rng.uniform(0.5, 2.0), 2)
        sites.append(site)
    ids = [s["id"] for s in sites]

    pairs: set[frozenset[str]] = set()
    links: list[dict[str, Any]] = []

    def add_link(a: str, b: str) -> None:
        pair = frozenset((a, b))
        if a == b or pair in pairs:
            return
        pairs.add(pair)
        capacity = rng.choice([1, 10, 10, 25, 100])
        link: dict[str, Any] = {
            "between": [a, b],
            "bandwidth_gbps": capacity,
            "rtt_ms": round(rng.uniform(1, 180), 1),
            "jitter_ms": round(rng.uniform(0, 8), 1),
            "loss_pct": rng.choice([0, 0, 0, 0.01, 0.1, 1]),
        }
        if rng.random() < 0.5 and not legacy:
            # Measured grids differ by direction (median 19 %, issue 12).
            link["bandwidth_gbps"] = {a: capacity, b: round(capacity * rng.uniform(0.5, 1), 2)}
        if rng.random() < 0.6:
            link["egress_usd_per_gb"] = {
                a: rng.choice([0, 0.02, 0.09]),
                b: rng.choice([0, 0.02, 0.09]),
            }
        links.append(link)

    # A random spanning tree over relaying sites keeps the estate connected; then random links.
    relays = [s["id"] for s in sites if s.get("relay", True)]
    order = relays[:]
    rng.shuffle(order)
    for i in range(1, len(order)):
        add_link(order[i], order[rng.randrange(i)])
    for s in sites:
        if not s.get("relay", True):
            add_link(s["id"], rng.choice(relays))
    while len(links) < n_links:
        add_link(rng.choice(ids), rng.choice(ids))

    by_id = {s["id"]: s for s in sites}
    datasets = []
    for i in range(300):
        home = rng.choice(ids)
        tier = rng.choices(["raw", "curated", "approved"], weights=[1, 4, 5])[0]
        ds: dict[str, Any] = {
            "id": f"ds-{i:03d}",
            "site": home,
            "size_gb": round(rng.uniform(10, 500_000), 1),
            "tier": tier,
            "active_fraction": rng.choice([1.0, 1.0, 0.5, 0.1]),
        }
        if rng.random() < 0.3:
            ds["residency"] = sorted({by_id[home]["region"], rng.choice(regions)})
        datasets.append(ds)
    models = [
        {"id": f"model-{i:02d}", "site": rng.choice(ids), "size_gb": rng.choice([2, 16, 70, 140])}
        for i in range(50)
    ]
    workloads: list[dict[str, Any]] = []
    for i in range(n_workloads):
        gpu = rng.choice(sorted(GPU_TYPES))
        if i % 5 == 0:
            workloads.append(
                {
                    "id": f"wl-{i:04d}",
                    "kind": "inference",
                    "model": rng.choice(models)["id"],
                    "gpu": "l4",
                    "gpus": 1,
                    "hours": 720,
                    "clients": rng.sample(ids, k=rng.randint(2, 4)),
                    "latency_budget_ms": rng.choice([20, 50, 100]),
                }
            )
        else:
            wl: dict[str, Any] = {
                "id": f"wl-{i:04d}",
                "kind": rng.choice(
                    ["pretraining", "fine_tuning", "embedding", "evaluation", "batch_inference"]
                ),
                "model": rng.choice(models)["id"],
                "datasets": [d["id"] for d in rng.sample(datasets, k=rng.randint(1, 2))],
                "gpu": gpu,
            }
            if rng.random() < 0.2 and not legacy:  # elastic: the planner chooses the count
                wl["gpu_hours"] = rng.choice([8, 16, 32]) * rng.choice([2, 10, 48])
                wl["gpus_max"] = rng.choice([64, 256])
            else:
                wl["gpus"] = rng.choice([8, 16, 32])
                wl["hours"] = rng.choice([2, 10, 48])
            if rng.random() < 0.3:
                wl["deadline_hours"] = rng.choice([24, 72, 200])
            workloads.append(wl)
    return {
        "name": f"scale-{seed}",
        "sites": sites,
        "links": links,
        "datasets": datasets,
        "models": models,
        "workloads": workloads,
    }


class Run(NamedTuple):
    wall_s: float
    cpu_s: float
    peak_mb: float
    json_mb: float
    report: dict[str, Any] | None


def _run(path: Path, code: Path, parse: bool = True) -> Run:
    """One `python -m netplan analyze PATH --json --max-alternatives 0` with `code` on the path;
    wall, CPU and peak memory of that process alone (wait4), and its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "netplan", "analyze", str(path), "--json",
             "--max-alternatives", "0"],
            stdout=out, stderr=errors, env={**os.environ, "PYTHONPATH": str(code)},
            cwd=code,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"netplan analyze failed ({proc.returncode}): "
                             f"{errors.read()[-2000:]!r}")
        size = out.tell()
        out.seek(0)
        report = None
        if parse:
            try:
                report = json.load(out)
            except ValueError:
                report = None
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, size / 1e6,
               report)


def _exponent(ns: list[int], ys: list[float]) -> float:
    """Least-squares slope of log y against log n: y grows as n to this power."""
    xs = [math.log(n) for n in ns]
    ls = [math.log(y) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ls) / len(ls)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ls, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)


def _checkout(ref: str, into: Path) -> Path:
    """The files of git revision `ref` under `into` (a plain export, no worktree state)."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "netplan"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,4000,10000",
                        help="site counts, comma-separated")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--baseline-ref", help="also run this git revision's planner")
    parser.add_argument("--baseline-max-sites", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="keep the generated topologies here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"netplan analyze FILE --json --max-alternatives 0; seed {args.seed}; paths: up to 2 "
          "relays, multipath on (the defaults); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    head = (f"{'sites':>6} {'links':>6} {'wl':>5} {'wall s':>7} {'CPU s':>6} {'peak MB':>8} "
            f"{'JSON MB':>8} {'feasible':>9} {'LP':>4} {'MILP':>4} {'largest (vars x rows)':>22}")
    print(head)
    ours: list[tuple[int, Run]] = []
    compared: list[tuple[int, Run, Run]] = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = (_checkout(args.baseline_ref, Path(tmp) / "baseline")
                    if args.baseline_ref else None)
        for n in sizes:
            doc = generate(args.seed, n, 5 * n, n // 5)
            path = (args.keep or Path(tmp)) / f"scale-{n}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            run = _run(path, REPO)
            ours.append((n, run))
            rep = run.report or {}
            decisions = rep.get("decisions", [])
            solver = rep.get("solver") or {}
            line = (f"{n:>6,} {5 * n:>6,} {n // 5:>5,} {run.wall_s:>7.1f} {run.cpu_s:>6.1f} "
                    f"{run.peak_mb:>8,.0f} {run.json_mb:>8.1f} "
                    f"{sum(d['feasible'] for d in decisions):>4}/{len(decisions):<4} "
                    f"{solver.get('lp_solves', 0):>4} {solver.get('milp_solves', 0):>4} "
                    f"{solver.get('max_variables', 0):>10} x {solver.get('max_constraints', 0):<9}")
            print(line, flush=True)
            if baseline is not None and n <= args.baseline_max_sites:
                # The same estate without the features the old planner cannot read, both
                # planners on the same file, one after the other.
                legacy = path.with_name(f"scale-{n}-legacy.yaml")
                legacy.write_text(yaml.safe_dump(generate(args.seed, n, 5 * n, n // 5,
                                                          legacy=True), sort_keys=False))
                new, old = _run(legacy, REPO, parse=False), _run(legacy, baseline, parse=False)
                compared.append((n, new, old))
    for n, new, old in compared:
        print(f"  {n:,} sites without per-direction links, priced relays and elastic GPUs: "
              f"this tree {new.wall_s:.1f} s, {new.json_mb:.1f} MB, {new.peak_mb:,.0f} MB peak; "
              f"{args.baseline_ref} {old.wall_s:.1f} s, {old.json_mb:.1f} MB, {old.peak_mb:,.0f} "
              f"MB peak ({old.wall_s / new.wall_s:.1f}x the time)")
    ns = [n for n, _ in ours]
    if len(ns) > 1:
        print(f"growth over {ns[0]:,}-{ns[-1]:,} sites: time ~ n^"
              f"{_exponent(ns, [r.wall_s for _, r in ours]):.2f}, JSON ~ n^"
              f"{_exponent(ns, [r.json_mb for _, r in ours]):.2f}, peak memory ~ n^"
              f"{_exponent(ns, [r.peak_mb for _, r in ours]):.2f}")
    for n, run in ours:
        if n == GOAL_SITES:
            ok = run.wall_s < GOAL_SECONDS and run.json_mb < GOAL_MB
            print(f"goal at {GOAL_SITES:,} sites: under {GOAL_SECONDS:.0f} s and {GOAL_MB:.0f} MB "
                  f"of JSON: {run.wall_s:.1f} s, {run.json_mb:.1f} MB: "
                  f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
