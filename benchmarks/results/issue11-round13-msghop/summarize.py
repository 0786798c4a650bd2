"""Per-run rows and per-tree medians of ab.sh's output: python summarize.py OUTDIR CC."""

import json
import statistics
import sys
from pathlib import Path

out, cc = Path(sys.argv[1]), sys.argv[2]
rows: dict[str, list[dict[str, float]]] = {}
for path in sorted(out.glob(f"*-*/interactive-during-bulk.{cc}.json")):
    tree, rnd = path.parent.name.rsplit("-", 1)
    for run in json.loads(path.read_text())["runs"]:
        if not run.get("ok") or "messages" not in run:  # e.g. the lab's RTT check failed
            print(tree, rnd, "no result:", run.get("error"))
            continue
        m, cpu = run["messages"], run["cpu_by_thread"]
        row = {
            "round": int(rnd),
            "gap_ms": run["p99_ms"] - m["echo_p99_ms"],
            "p99_ms": run["p99_ms"],
            "echo_p99_ms": m["echo_p99_ms"],
            "daemon_gap_ms": m["daemon_p99_ms"] - m["echo_p99_ms"],
            "link_pct": run["link_pct"],
            "loop_cpu_ms_per_msg": 1000 * (cpu["sender_daemon"]["python"]
                                           + cpu["receiver_daemon"]["python"]) / m["delivered"],
            "client_cpu_wait_ms": m["client_sched"]["cpu_wait_ms"],
        }
        rows.setdefault(tree, []).append(row)
        print(tree, " ".join(f"{k}={v:.1f}" for k, v in row.items()))
for tree, rs in rows.items():
    med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "round"}
    print(f"{tree} median of {len(rs)}:", " ".join(f"{k}={v:.1f}" for k, v in med.items()),
          "gaps:", ", ".join(f"{r['gap_ms']:.1f}" for r in rs))
