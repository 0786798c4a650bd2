"""What `netplan analyze --html` costs on the 1,000-site estate (the seeded estate of
netplan_scale.py), against the same analysis printing --json, measured in the same run; and what
a browser pays to draw the page.

Per run, in turn: `python -m netplan analyze FILE --json` (the analysis and its document, the
floor the page is built on) and `python -m netplan analyze FILE --html OUT` (the same analysis,
then the page), wall seconds and peak RSS of each process (wait4); the page's size against the
10 MB goal, the time goal 15 s, and whether its map is aggregated by region (and says so). With
Chromium installed, the seconds from navigation to every chart drawn in headless Chromium
(tests/browser.py drives it). Medians of --repeat runs. A benchmark, not a test.

    flock /tmp/netplan-bench.lock python benchmarks/netplan_html.py [--sites 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.netplan_scale import generate  # noqa: E402

GOAL_SECONDS, GOAL_MB = 15.0, 10.0


def _timed(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `python -m netplan ...`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "netplan", *args], stdout=out,
                                stderr=errors, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"netplan {' '.join(args)} failed: {errors.read()[-2000:]!r}")
    return wall, usage.ru_maxrss / 1024


def _browser_seconds(page: Path) -> float | None:
    """Navigation to every chart drawn, in headless Chromium; None without Chromium."""
    from tests.browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as profile, Chromium(binary, Path(profile)) as browser:
        start = time.perf_counter()
        tab = browser.open(page, timeout_s=120)
        drawn = tab.wait_for("document.documentElement.dataset.charts", timeout_s=120)
        seconds = time.perf_counter() - start
        if drawn == "failed" or tab.errors:
            raise SystemExit(f"the page did not draw cleanly: {drawn} {tab.errors[:3]}")
        tab.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        topo = Path(tmp) / f"estate-{args.sites}.yaml"
        topo.write_text(yaml.safe_dump(generate(args.seed, n_sites=args.sites,
                                                n_links=5 * args.sites,
                                                n_workloads=args.sites // 5), sort_keys=False))
        page = Path(tmp) / "report.html"
        runs: dict[str, list[tuple[float, float]]] = {"--json": [], "--html": []}
        for _ in range(args.repeat):
            runs["--json"].append(_timed(["analyze", str(topo), "--json"]))
            runs["--html"].append(_timed(["analyze", str(topo), "--html", str(page)]))
        text = page.read_text()
        size_mb = len(text.encode()) / 1e6
        aggregated = "so the map is aggregated by region" in text
        browser = [_browser_seconds(page) for _ in range(args.repeat)]
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    rss = {k: max(r for _, r in v) for k, v in runs.items()}
    print(f"netplan analyze on the {args.sites:,}-site estate (seed {args.seed}, "
          f"{5 * args.sites:,} links, {args.sites // 5:,} workloads); medians of {args.repeat}, "
          "run in turn")
    print(f"  --json          {wall['--json']:6.2f} s   peak RSS {rss['--json']:6.0f} MiB  "
          f"(range {min(w for w, _ in runs['--json']):.2f}-"
          f"{max(w for w, _ in runs['--json']):.2f} s)")
    print(f"  --html          {wall['--html']:6.2f} s   peak RSS {rss['--html']:6.0f} MiB  "
          f"(range {min(w for w, _ in runs['--html']):.2f}-"
          f"{max(w for w, _ in runs['--html']):.2f} s): {wall['--html'] / wall['--json']:.2f}x "
          f"the --json run; goal < {GOAL_SECONDS:g} s: "
          f"{'met' if wall['--html'] < GOAL_SECONDS else 'NOT met'}")
    print(f"  page            {size_mb:6.2f} MB (plotly.js inlined); goal < {GOAL_MB:g} MB: "
          f"{'met' if size_mb < GOAL_MB else 'NOT met'}; map aggregated by region and says "
          f"so: {'yes' if aggregated else 'NO'}")
    if browser[0] is None:
        print("  headless Chromium: not installed (apt-get install chromium)")
    else:
        drawn = [b for b in browser if b is not None]
        print(f"  headless Chromium, navigation to every chart drawn: "
              f"{statistics.median(drawn):.2f} s (range {min(drawn):.2f}-{max(drawn):.2f})")


if __name__ == "__main__":
    main()
