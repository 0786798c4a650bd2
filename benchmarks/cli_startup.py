"""`python -m benchmarks.cli_startup [--runs N]`: the fixed cost of the transferd client CLI.

Every timed `transferd send --wait --json` in the benchmark harness pays the CLI's start-up
(interpreter, imports, config validation) and its exit on top of the transfer. This measures
that fixed cost on its own, side by side in one run, on 127.0.0.1 (no namespaces, no
impairment): the wall clock of `python -c pass` (the floor), `transferd --help`, and
`transferd send FILE --wait --json` of a new 4 KiB file between two real daemons whose
channels are already warm (new random content each run, so every run commits a real upload),
and of a 32 MiB one (a job long enough to hide what the CLI does while it waits).
With --baseline DIR another checkout's CLI is timed too, interleaved, against the same
daemons. Both checkouts are byte-compiled first, as an installed package is. Prints medians
and the spread of N runs each, with each command's CPU time (user + system, from the
children's rusage) and, for a send, the split of its wall clock: the job as the CLI saw it
(its JSON `seconds`: from its request to the answer that said the job ended) and the rest
(interpreter, imports, config and key, exit). Then the slowest imports of a real `transferd
send --wait --json` of 4 KiB (`python -X importtime`, cumulative, median of 5).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

__all__ = ["main"]

PY = sys.executable
BIG_BYTES = 32 * 1024 * 1024


def _cli(*args: str) -> list[str]:
    return [PY, "-m", "transferd", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited early ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"daemon did not listen on {port} in {timeout_s:.0f} s")


class _Run:
    """One timed command: wall clock and CPU (user + system) seconds, and what it printed."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, env=env, cwd=cwd, check=False)
        self.wall_s = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr[-400:]!r}")
        self.stdout = done.stdout

    @property
    def job_s(self) -> float:
        """A `send --wait --json`'s own `seconds`: its request to the answer of the job's end."""
        return float(json.loads(self.stdout)["seconds"])


def _summary(name: str, runs: list[_Run]) -> dict[str, float | str | int]:
    walls = sorted(r.wall_s for r in runs)
    out: dict[str, float | str | int] = {
        "what": name,
        "runs": len(runs),
        "median_ms": round(statistics.median(walls) * 1000, 1),
        "p10_ms": round(walls[len(walls) // 10] * 1000, 1),
        "p90_ms": round(walls[max(0, (len(walls) * 9) // 10 - 1)] * 1000, 1),
        "cpu_median_ms": round(statistics.median(r.cpu_s for r in runs) * 1000, 1),
    }
    if "send" in name:
        out["job_median_ms"] = round(statistics.median(r.job_s for r in runs) * 1000, 1)
        out["outside_job_median_ms"] = round(
            statistics.median(r.wall_s - r.job_s for r in runs) * 1000, 1)
    return out


def _importtime(cmd: Callable[[], list[str]], env: dict[str, str], cwd: Path,
                top: int) -> list[tuple[str, float]]:
    """Cumulative import time (ms) per module of the command `cmd()` gives (a new one each
    run), median of 5."""
    per: dict[str, list[float]] = {}
    for _ in range(5):
        err = subprocess.run([PY, "-X", "importtime", *cmd()[1:]],
                             capture_output=True, text=True, env=env, cwd=cwd,
                             check=True).stderr
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                per.setdefault(parts[2].strip(), []).append(int(parts[1]) / 1000)
    medians = {m: statistics.median(v) for m, v in per.items()}
    return sorted(medians.items(), key=lambda kv: -kv[1])[:top]


def _line(r: dict[str, float | str | int]) -> str:
    line = (f"{r['what']:<42} median {r['median_ms']:7.1f} ms "
            f"(p10 {r['p10_ms']:.1f}, p90 {r['p90_ms']:.1f}; {r['runs']} runs), "
            f"CPU {r['cpu_median_ms']:.1f} ms")
    if "job_median_ms" in r:
        line += f"; job {r['job_median_ms']:.1f} ms, the rest {r['outside_job_median_ms']:.1f}"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", dest="json_out", help="also write the results to this file")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another checkout (e.g. `git worktree add --detach DIR main`): its CLI "
                         "is timed too, interleaved with this one, against the same daemons")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Each CLI runs with its own checkout as the working directory and first on sys.path.
    here = Path(__file__).resolve().parents[1]
    variants = {"this": (here, env)}
    if args.baseline is not None:
        base = args.baseline.resolve()
        variants["baseline"] = (base, {**env, "PYTHONPATH": str(base)})
    for cwd, _ in variants.values():  # as installed: with .pyc files (benchmarks.tools)
        for package in ("transferd", "netplan"):
            compileall.compile_dir(cwd / package, quiet=1)
    results = []
    imports: dict[str, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        root = Path(tmp)
        # The client settings cache (transferd.client_settings) of this run, not the user's.
        for _cwd, venv in variants.values():
            venv["XDG_CACHE_HOME"] = str(root / "cache")
        subprocess.run(_cli("keygen", "--sites", "A,B", "--out", str(root / "keys")),
                       capture_output=True, env=env, check=True)
        ports = {"A": _free_port(), "B": _free_port()}
        configs = {}
        for site, peer in (("A", "B"), ("B", "A")):
            (root / site).mkdir()
            configs[site] = root / f"{site}.yaml"
            configs[site].write_text(yaml.safe_dump({
                "site": site, "listen": f"127.0.0.1:{ports[site]}", "data_dir": str(root / site),
                "keys_dir": str(root / "keys"),
                "peers": {peer: {"url": f"http://127.0.0.1:{ports[peer]}"}},
            }))
        daemons = [subprocess.Popen(_cli("serve", "--config", str(configs[s])), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for s in ("A", "B")]
        try:
            for site, proc in zip(("A", "B"), daemons, strict=True):
                _wait_listening(ports[site], proc)
            sent = iter(range(1_000_000))

            def send(size: int = 4096) -> list[str]:
                name = f"curated/cli/f{next(sent)}.bin"
                (root / "A" / name).parent.mkdir(parents=True, exist_ok=True)
                (root / "A" / name).write_bytes(os.urandom(size))  # new content: a real upload
                return _cli("send", name, "--config", str(configs["A"]), "--to", "B",
                            "--wait", "--json")

            for _ in range(3):  # warm: the first send opens the data channels
                _Run(send(), env, here)
            series: dict[str, list[_Run]] = {"python -c pass": []}
            for _ in range(args.runs):  # interleaved, so drift hits every series alike
                series["python -c pass"].append(_Run([PY, "-c", "pass"], env))
                for name, (cwd, venv) in variants.items():
                    series.setdefault(f"{name}: transferd --help", []).append(
                        _Run(_cli("--help"), venv, cwd))
                    series.setdefault(f"{name}: send --wait --json (4 KiB)", []).append(
                        _Run(send(), venv, cwd))
                    # A job long enough that what the CLI does while it waits is hidden.
                    series.setdefault(f"{name}: send --wait --json (32 MiB)", []).append(
                        _Run(send(BIG_BYTES), venv, cwd))
            results = [_summary(name, runs) for name, runs in series.items()]
            imports = {name: _importtime(send, venv, cwd, 10)
                       for name, (cwd, venv) in variants.items()}
        finally:
            for proc in daemons:
                proc.terminate()
            for proc in daemons:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for r in results:
        print(_line(r))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, slowest in imports.items():
        print(f"{name}: slowest imports of `transferd send` (cumulative ms, median of 5):")
        for module, ms in slowest:
            print(f"  {ms:7.1f}  {module}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"results": results, "imports_ms": {k: dict(v) for k, v in imports.items()},
             "loadavg": [round(x, 2) for x in os.getloadavg()]},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
