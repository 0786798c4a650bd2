"""Round 14's A/B table from the results JSONs of ab.sh (transferd, rclone, disk-direct): per
run the three rates and transferd's against the other two, CPU-s per GiB of transferd and
rclone and their ratio, the loops' and the data threads' CPU-s per 2 GiB, steal and iowait;
medians per tree (a median of per-run ratios, and the ratio of the CPU medians).
Usage: python table.py OUT_DIR [OUT_DIR...]"""

from __future__ import annotations

import glob
import json
import statistics
import sys

GIB = 1 << 30


def per_gib(r: dict) -> float:
    return r["cpu_s"] / r["bytes_logical"] * GIB


def rows(path: str) -> list[dict[str, float]]:
    runs = json.load(open(path))["runs"]
    ours = [r for r in runs if r["tool"] == "transferd" and r["ok"]]
    peer = [r for r in runs if r["tool"] == "rclone" and r["ok"]]
    disk = [r for r in runs if r["tool"] == "disk-direct" and r["ok"]]
    if not (len(ours) == len(peer) == len(disk)):
        sys.exit(f"{path}: runs that failed: transferd {len(ours)}, rclone {len(peer)}, "
                 f"disk-direct {len(disk)} ok")
    out = []
    for t, r, d in zip(ours, peer, disk, strict=True):
        th = t.get("cpu_by_thread") or {}
        s, b = th.get("sender_daemon", {}), th.get("receiver_daemon", {})
        host = t.get("host") or {}
        out.append({
            "td_mbit": t["goodput_mbit"], "rc_mbit": r["goodput_mbit"],
            "dd_mbit": d["goodput_mbit"],
            "vs_rc": t["goodput_mbit"] / r["goodput_mbit"],
            "vs_dd": t["goodput_mbit"] / d["goodput_mbit"],
            "td_cpu": per_gib(t), "rc_cpu": per_gib(r), "ratio": per_gib(t) / per_gib(r),
            "snd_loop": s.get("python", 0.0), "rcv_loop": b.get("python", 0.0),
            "snd_data": s.get("channel-send-B", 0.0), "rcv_data": b.get("channel-in", 0.0),
            "steal": host.get("steal_s", 0.0), "iowait": host.get("iowait_s", 0.0),
        })
    return out


COLS = ["td_mbit", "rc_mbit", "dd_mbit", "vs_rc", "vs_dd", "td_cpu", "rc_cpu", "ratio",
        "snd_loop", "rcv_loop", "snd_data", "rcv_data", "steal", "iowait"]
FMT = {"td_mbit": "{:.0f}", "rc_mbit": "{:.0f}", "dd_mbit": "{:.0f}", "vs_rc": "{:.2f}x",
       "vs_dd": "{:.2f}x", "ratio": "{:.2f}x", "steal": "{:.1f}", "iowait": "{:.1f}"}

print("| invocation | run | transferd Mbit/s | rclone Mbit/s | disk-direct Mbit/s"
      " | ours/rclone rate | ours/disk | transferd CPU-s/GiB | rclone CPU-s/GiB | ours/rclone CPU"
      " | sender loop | receiver loop | channel-send | channel-in (CPU-s per 2 GiB)"
      " | steal s | iowait s |")
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
