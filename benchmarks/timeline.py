"""`python -m benchmarks.timeline DIR [TOOL]`: one transferd run, 0.1 s at a time, from the
files `NB_TIMELINE=1 NB_KEEP_LOGS=DIR TRANSFERD_LOG_LEVEL=debug python -m benchmarks run ...`
keeps for the last run of each tool: the sending interface's counter (`<tool>-tx.log`), `ss
-tinm` of the sending site's connections (`<tool>-ss.log`) and the sending daemon's debug log
(`<tool>-A.log`: the job's control requests, each chunk's submission and receipt, the stream
controller's changes).

Prints, from the job's start: the link's rate per sample, and per data channel (the
connections that carried more than a chunk) the congestion window, the pacing and delivery
rates, the retransmitted segments, the time held by the receive window and by the send buffer,
the unsent bytes queued and whether the kernel marked the socket application-limited; the
job's events in between. That answers where a run loses time against the link: the start
(the window's ramp), the steady state (which limit holds each stream) or the tail.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SocketSample", "events", "parse_ss", "render"]

MIN_CHANNEL_BYTES = 8 << 20  # a data channel carried at least one chunk
_EVENTS = ("job.started", "job.control", "chunk.receipt", "job.committed", "streams.change")


@dataclass(frozen=True)
class SocketSample:
    t: float  # seconds since the sampler started
    conn: str  # "local peer"
    cwnd: int
    pacing_mbit: float
    delivery_mbit: float
    retrans: int
    rwnd_limited_ms: int
    sndbuf_limited_ms: int
    notsent_bytes: int
    bytes_sent: int
    app_limited: bool


def _num(info: str, key: str) -> float:
    m = re.search(r"(?:^|\s)" + re.escape(key) + r"[: ]([\d.]+)", info)
    return float(m.group(1)) if m else 0.0


def parse_ss(text: str) -> tuple[float | None, list[SocketSample]]:
    """The sampler's wall-clock start and every socket of every `ss -tinm` snapshot."""
    t0_wall = None
    out: list[SocketSample] = []
    head = text.split("\n", 1)[0]
    if head.startswith("# t0_wall "):
        t0_wall = float(head.split()[2])
    for block in text.split("\n@ ")[1:] if t0_wall is not None else text.split("@ ")[1:]:
        lines = block.split("\n")
        t = float(lines[0])
        sockets: list[list[str]] = []
        for line in lines[1:]:
            if not line.strip():
                continue
            if line[0].isspace() and sockets:
                sockets[-1].append(line)
            else:
                sockets.append([line])
        for sock in sockets:
            fields = sock[0].split()
            info = " ".join(sock[1:])
            retrans = re.search(r"retrans:\d+/(\d+)", info)
            out.append(SocketSample(
                t=t, conn=" ".join(fields[-2:]), cwnd=int(_num(info, "cwnd")),
                pacing_mbit=_num(info, "pacing_rate") / 1e6,
                delivery_mbit=_num(info, "delivery_rate") / 1e6,
                retrans=int(retrans.group(1)) if retrans else 0,
                rwnd_limited_ms=int(_num(info, "rwnd_limited")),
                sndbuf_limited_ms=int(_num(info, "sndbuf_limited")),
                notsent_bytes=int(_num(info, "notsent")), bytes_sent=int(_num(info, "bytes_sent")),
                app_limited=" app_limited" in info))
    return t0_wall, out


def events(log_text: str) -> list[tuple[float, str]]:
    """(wall time, one line) of the last job in a daemon's JSON log."""
    found: list[tuple[float, str]] = []
    for line in log_text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        name = rec.get("event", "")
        if name == "job.started":
            found = []
        if name not in _EVENTS:
            continue
        extra = {k: v for k, v in rec.items()
                 if k not in ("ts", "level", "logger", "event", "job", "path", "dest")}
        found.append((float(rec["ts"]), f"{name} {json.dumps(extra)}"))
    return found


def _tx_rates(text: str) -> list[tuple[float, float]]:
    rows = [tuple(map(float, line.split())) for line in text.splitlines() if line.strip()]
    return [(tb, (bb - ba) * 8 / 1e6 / (tb - ta))
            for (ta, ba), (tb, bb) in zip(rows, rows[1:], strict=False) if tb > ta]


def render(directory: Path, tool: str = "transferd") -> str:
    t0_wall, sockets = parse_ss((directory / f"{tool}-ss.log").read_text())
    tx = _tx_rates((directory / f"{tool}-tx.log").read_text())
    log_path = directory / f"{tool}-A.log"
    evs = events(log_path.read_text()) if log_path.exists() else []
    sent: dict[str, int] = {}
    for s in sockets:
        sent[s.conn] = max(sent.get(s.conn, 0), s.bytes_sent)
    channels = sorted(c for c, b in sent.items() if b >= MIN_CHANNEL_BYTES)
    # Seconds from the job's start when the daemon's log says when that was.
    start = (evs[0][0] - t0_wall) if evs and t0_wall is not None else 0.0
    by_t: dict[float, dict[str, SocketSample]] = {}
    for s in sockets:
        if s.conn in channels:
            by_t.setdefault(round(s.t, 2), {})[s.conn] = s
    lines = [f"{len(channels)} data channel(s); t = seconds from the job's start; per channel: "
             "cwnd, pacing/delivery Mbit/s, retransmitted, rwnd-/sndbuf-limited ms, unsent KiB"]
    pending = [(w - t0_wall - start, text) for w, text in evs] if t0_wall is not None else []
    rate = {round(t, 2): r for t, r in tx}
    for t in sorted(set(by_t) | set(rate)):
        while pending and pending[0][0] <= t - start:
            lines.append(f"{pending[0][0]:7.3f}   {pending.pop(0)[1]}")
        row = by_t.get(t, {})
        if not row and rate.get(t, 0) < 1:
            continue
        cells = [f"{s.cwnd:5d} {s.pacing_mbit:5.0f}/{s.delivery_mbit:<4.0f} r{s.retrans:<4d} "
                 f"rw{s.rwnd_limited_ms:<3d} sb{s.sndbuf_limited_ms:<3d} "
                 f"q{s.notsent_bytes >> 10:<5d}{' app' if s.app_limited else ''}"
                 for s in (row.get(c) for c in channels) if s is not None]
        lines.append(f"{t - start:7.3f} {rate.get(t, 0):5.0f} Mbit/s | " + " | ".join(cells))
    lines.extend(f"{t:7.3f}   {text}" for t, text in pending)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    print(render(Path(argv[0]), *argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
