"""Round 13's A/B table from the results JSONs of ab.sh: per run, transferd and rclone CPU-s
per GiB, their ratio, the loops' and the data threads' CPU-s per 2 GiB; medians per tree.
Usage: python table.py OUT_DIR [OUT_DIR...]"""

from __future__ import annotations

import glob
import json
import statistics
import sys

GIB = 1 << 30


def rows(path: str) -> list[dict[str, float]]:
    d = json.load(open(path))
    runs = d["runs"]
    ours = [r for r in runs if r["tool"] == "transferd" and r["ok"]]
    peer = [r for r in runs if r["tool"] == "rclone" and r["ok"]]
    out = []
    for t, r in zip(ours, peer, strict=False):
        gib = t["bytes_logical"] / GIB
        th = t.get("cpu_by_thread") or {}
        s, b = th.get("sender_daemon", {}), th.get("receiver_daemon", {})
        proc = t.get("cpu_by_process") or {}
        out.append({
            "td_mbit": t["goodput_mbit"], "td_cpu": t["cpu_s"] / gib,
            "rc_mbit": r["goodput_mbit"], "rc_cpu": r["cpu_s"] / r["bytes_logical"] * GIB,
            "ratio": (t["cpu_s"] / gib) / (r["cpu_s"] / r["bytes_logical"] * GIB),
            "snd": proc.get("sender_daemon", 0) / gib, "rcv": proc.get("receiver_daemon", 0) / gib,
            "cli": proc.get("send_cli", 0) / gib,
            "snd_loop": s.get("python", 0.0), "rcv_loop": b.get("python", 0.0),
            "snd_data": s.get("channel-send-B", 0.0), "rcv_data": b.get("channel-in", 0.0),
            "steal": (t.get("host") or {}).get("steal_s", 0.0),
        })
    return out


COLS = ["td_mbit", "td_cpu", "rc_mbit", "rc_cpu", "ratio", "snd", "rcv", "cli",
        "snd_loop", "rcv_loop", "snd_data", "rcv_data", "steal"]
FMT = {"td_mbit": "{:.0f}", "rc_mbit": "{:.0f}", "ratio": "{:.2f}x"}

print("| invocation | run | transferd Mbit/s | transferd CPU-s/GiB | rclone Mbit/s"
      " | rclone CPU-s/GiB | ours/rclone CPU | sender | receiver | CLI (CPU-s/GiB)"
      " | sender loop | receiver loop"
      " | channel-send | channel-in (CPU-s per 2 GiB) | steal s |")
print("|" + "---|" * 2 + "---:|" * len(COLS))
trees: dict[str, list[dict[str, float]]] = {}
for out in sys.argv[1:]:
    for path in sorted(glob.glob(f"{out}/*.json")):
        label = path.rsplit("/", 1)[1].split(".")[0]
        rs = rows(path)
        trees.setdefault(label.rsplit("-", 1)[0], []).extend(rs)
        for i, r in enumerate(rs, 1):
            cells = [FMT.get(c, "{:.2f}").format(r[c]) for c in COLS]
            print(f"| {label if i == 1 else ''} | {i} | " + " | ".join(cells) + " |")
for tree, rs in trees.items():
    cells = [FMT.get(c, "{:.2f}").format(statistics.median(r[c] for r in rs)) for c in COLS]
    print(f"| **medians, {tree} ({len(rs)} runs)** | | " + " | ".join(cells) + " |")
for tree, rs in trees.items():
    ours = statistics.median(r["td_cpu"] for r in rs)
    peer = statistics.median(r["rc_cpu"] for r in rs)
    print(f"{tree}: transferd/rclone CPU by medians {ours:.2f}/{peer:.2f} = {ours / peer:.2f}x")
