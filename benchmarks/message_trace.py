"""Where each interactive message's time went, stage by stage, from a run's kept logs.

Run interactive-during-bulk with `NB_KEEP_LOGS=DIR TRANSFERD_LOG_LEVEL=debug`; then
`python -m benchmarks.message_trace DIR/<run id> [--tool transferd]` joins, by message id, the
driver's send and receipt times (`<tool>-messages.log`) with the sending daemon's debug lines
(`<tool>-A.log`: the message socket's arrival and reply, queued, taken by a worker, acked) and
the receiving daemon's (`<tool>-B.log`: received). Both daemons and the driver run on one
host, so one clock serves. Stages (ms):

  c_in   the client's send -> the sending daemon has parsed the SEND frame
  to_q   parsed -> queued for the peer (the socket handler on A's loop up to the scheduler)
  queue  queued -> a pool worker takes it (the scheduler's queue)
  out_b  taken -> the receiving daemon takes it (A's request, the link one way, B's HTTP stack;
         since round 13 the message hop's frame for an interactive message when it is up)
  back   B took it -> A has the signed answer (B's reply, the link back, A's HTTP stack or hop)
  reply  A has the answer -> the receipt written to the socket
  c_out  the receipt written -> the client resumed with it

For each run (one driver trace line): p50 / p99 of each stage and of the total, and over the
slowest 2 % of messages the mean excess of each stage over its median: the stages that make
the tail. Loop stalls (`loop.stall`) of either daemon that overlap those slow messages are
summed by kind (the loop running, waiting for a CPU, the rest waiting for the GIL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "MessageTimes", "main", "percentile", "split_runs"]

STAGES = ("c_in", "to_q", "queue", "out_b", "back", "reply", "c_out")
SLOW_FRACTION = 0.02


@dataclass
class MessageTimes:
    """One message's Unix times at each point (None where a line is missing)."""

    id: str
    sent: float
    done: float
    arrived: float | None = None
    queued: float | None = None
    taken: float | None = None
    peer_rx: float | None = None
    acked: float | None = None
    out: float | None = None

    def stages_ms(self) -> dict[str, float] | None:
        points = (self.sent, self.arrived, self.queued, self.taken, self.peer_rx, self.acked,
                  self.out, self.done)
        if any(p is None for p in points):
            return None
        values = [float(p) for p in points if p is not None]
        return {name: (b - a) * 1e3 for name, a, b in zip(STAGES, values[:-1], values[1:],
                                                         strict=True)}


@dataclass
class Stall:
    site: str
    end: float
    ms: float
    ran_ms: float
    cpu_wait_ms: float

    @property
    def start(self) -> float:
        return self.end - self.ms / 1e3


@dataclass
class DaemonLines:
    points: dict[str, dict[str, float]] = field(default_factory=dict)
    stalls: list[Stall] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def _read_daemon(path: Path, site: str) -> DaemonLines:
    out = DaemonLines()
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = rec.get("event", "")
        if event.startswith("message.") and "id" in rec and "t" in rec:
            point = out.points.setdefault(rec["id"], {})
            point[event] = rec["t"]
            if "peer_rx" in rec:
                point["peer_rx"] = rec["peer_rx"]
            if "out" in rec:
                point["out"] = rec["out"]
        elif event == "loop.stall":
            out.stalls.append(Stall(site, rec["ts"], rec["ms"], rec.get("ran_ms", 0.0),
                                    rec.get("cpu_wait_ms", 0.0)))
        elif event.startswith("bulk.priority"):
            out.events.append(rec)
    return out


def split_runs(run_dir: Path, tool: str) -> list[list[MessageTimes]]:
    """The run directory's messages, one list per driver run, joined with the daemons' lines."""
    a = _read_daemon(run_dir / f"{tool}-A.log", "A")
    b = _read_daemon(run_dir / f"{tool}-B.log", "B")
    runs: list[list[MessageTimes]] = []
    driver = run_dir / f"{tool}-messages.log"
    for line in driver.read_text(errors="replace").splitlines():
        if not line.startswith('{"trace"'):
            continue
        messages = []
        for mid, sent, done in json.loads(line)["trace"]:
            pa, pb = a.points.get(mid, {}), b.points.get(mid, {})
            messages.append(MessageTimes(
                mid, sent, done, arrived=pa.get("message.socket"),
                queued=pa.get("message.queued"), taken=pa.get("message.taken"),
                peer_rx=pb.get("message.received", pa.get("peer_rx")),
                acked=pa.get("message.acked"), out=pa.get("out")))
        runs.append(messages)
    return runs


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (p99 of 100 values: the 99th smallest); `values` not empty.
    The one definition for the benchmarks' latency tables (`tools`, `bulk_under_hog` too)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def summarize(messages: list[MessageTimes], stalls: list[Stall]) -> dict[str, Any]:
    rows = [(m, s) for m in messages if (s := m.stages_ms()) is not None]
    if not rows:
        return {"messages": len(messages), "joined": 0}
    totals = [(m.done - m.sent) * 1e3 for m, _ in rows]
    out: dict[str, Any] = {"messages": len(messages), "joined": len(rows),
                           "total_p50": percentile(totals, 50), "total_p99": percentile(totals, 99)}
    medians = {st: statistics.median(s[st] for _, s in rows) for st in STAGES}
    for st in STAGES:
        out[f"{st}_p50"] = medians[st]
        out[f"{st}_p99"] = percentile([s[st] for _, s in rows], 99)
    n_slow = max(1, round(SLOW_FRACTION * len(rows)))
    slow = sorted(rows, key=lambda r: r[0].done - r[0].sent)[-n_slow:]
    out["slow_n"] = n_slow
    out["slow_total_excess"] = statistics.mean(
        (m.done - m.sent) * 1e3 for m, _ in slow) - out["total_p50"]
    for st in STAGES:
        out[f"{st}_slow_excess"] = statistics.mean(s[st] for _, s in slow) - medians[st]
    # The daemons' loop stalls that overlap a slow message, by kind (each stall once).
    hit: dict[int, Stall] = {}
    for m, _ in slow:
        for stall in stalls:
            if stall.start < m.done and stall.end > m.sent:
                hit[id(stall)] = stall
    for site in ("A", "B"):
        mine = [s for s in hit.values() if s.site == site]
        out[f"stalls_{site}"] = {
            "n": len(mine), "ms": round(sum(s.ms for s in mine), 1),
            "cpu_wait_ms": round(sum(s.cpu_wait_ms for s in mine), 1),
            "gil_ms": round(sum(max(0.0, s.ms - s.ran_ms - s.cpu_wait_ms) for s in mine), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.message_trace")
    parser.add_argument("run_dirs", type=Path, nargs="+",
                        help="NB_KEEP_LOGS/<run id> directories of interactive-during-bulk")
    parser.add_argument("--tool", action="append",
                        help="tool rows to read (default: every <tool>-messages.log found)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            parser.error(f"{run_dir}: not a directory")
        tools = args.tool or sorted(p.name.removesuffix("-messages.log")
                                    for p in run_dir.glob("*-messages.log"))
        for tool in tools:
            stalls = (_read_daemon(run_dir / f"{tool}-A.log", "A").stalls
                      + _read_daemon(run_dir / f"{tool}-B.log", "B").stalls)
            for n, messages in enumerate(split_runs(run_dir, tool), 1):
                row = summarize(messages, stalls)
                if args.json:
                    print(json.dumps({"run_dir": str(run_dir), "tool": tool, "run": n, **row}))
                    continue
                if not row.get("joined"):
                    print(f"{run_dir.name} {tool} #{n}: no message joined (run with "
                          "TRANSFERD_LOG_LEVEL=debug)")
                    continue
                print(f"{run_dir.name} {tool} #{n}: {row['joined']}/{row['messages']} joined, "
                      f"total p50 {row['total_p50']:.1f} p99 {row['total_p99']:.1f} ms")
                print("  stage   " + "".join(f"{st:>8}" for st in STAGES))
                for kind in ("p50", "p99", "slow_excess"):
                    print(f"  {kind:<8}" + "".join(f"{row[f'{st}_{kind}']:8.1f}"
                                                     for st in STAGES))
                print(f"  slowest {row['slow_n']}: excess {row['slow_total_excess']:.1f} ms; "
                      f"stalls A {row['stalls_A']}, B {row['stalls_B']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
