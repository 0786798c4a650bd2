"""What a fresh span buffer costs (`transferd.site.source._take_span`), three ways side by side.

For each of `--rounds` rounds, in turn: a fresh anonymous 8 MiB mapping made `plain` (pages
fault in during the pread, 4 KiB each), `hugepage` (plain plus madvise(MADV_HUGEPAGE): THP in
`madvise` mode faults 2 MiB pages) and `populate` (MAP_POPULATE: mmap() faults every page in,
with the GIL held). Timed: the mmap (+ madvise) call, which holds the GIL, and one pread of a
page-cached file filling the span, which does not. Then the span is unmapped and the process's
RSS must fall back (the memory goes with `_give_span`'s close). Medians in ms.

  python -m benchmarks.span_fault [--rounds 40] [--mib 8]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _fresh(kind: str, size: int) -> mmap.mmap:
    if kind == "populate":
        return mmap.mmap(-1, size, flags=ANON | mmap.MAP_POPULATE)
    buf = mmap.mmap(-1, size, flags=ANON)
    if kind == "hugepage":
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.span_fault")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.mib < 1:
        parser.error("--rounds and --mib: must be >= 1")
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        parser.error("needs Linux with MADV_HUGEPAGE")
    size = args.mib << 20
    kinds = ("plain", "hugepage", "populate")
    times: dict[str, dict[str, list[float]]] = {k: {"map": [], "pread": []} for k in kinds}
    leaked_kib = 0
    with tempfile.NamedTemporaryFile(prefix="span-fault-") as f:
        f.write(os.urandom(size))
        f.flush()
        fd = f.fileno()
        os.pread(fd, size, 0)  # into the page cache
        for _ in range(args.rounds):
            for kind in kinds:
                before = _rss_kib()
                t0 = time.perf_counter()
                buf = _fresh(kind, size)
                t1 = time.perf_counter()
                n = os.preadv(fd, [buf], 0)
                t2 = time.perf_counter()
                if n != size:
                    raise RuntimeError(f"short read: {n} of {size}")
                buf.close()
                leaked_kib = max(leaked_kib, _rss_kib() - before)
                times[kind]["map"].append((t1 - t0) * 1e3)
                times[kind]["pread"].append((t2 - t1) * 1e3)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().strip() if thp.exists() else "?"
    print(f"{args.mib} MiB spans, {args.rounds} rounds, THP {mode}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("kind       map+madvise ms (GIL held)   pread ms (GIL released)   sum")
    for kind in kinds:
        m, p = (statistics.median(times[kind][k]) for k in ("map", "pread"))
        print(f"{kind:<10} {m:>12.3f}                {p:>12.3f}             {m + p:.3f}")
    print(f"largest RSS left after unmapping a span: {leaked_kib} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
