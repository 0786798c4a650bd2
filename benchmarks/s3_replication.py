"""Replication with an S3 site next to local-disk replication and next to `rclone copy` to and
from the same S3 endpoint, measured in one run on the same data.

The endpoint is moto's S3 server (`moto[server]`, a pure-Python process on 127.0.0.1): it is the
bottleneck here, so these numbers say how well each tool keeps one endpoint busy, not what real
S3 does. Cases, each timed `--repeat` times in turn (fresh destination every time: a second run
into the same site would be a delta of nothing):
- transferd local -> local   (two daemons, `transferd send --wait --json`: the physical floor)
- transferd local -> S3      (the receiving site's data_dir is s3://bucket/...)
- transferd S3 -> local      (the sending site's data_dir is s3://bucket/...)
- rclone copy local -> S3, rclone copy S3 -> local (same endpoint, same data, rclone's
  defaults, printed with the results: how many transfers, what it checks)
The cases run round-robin (`--repeat` rounds of every case), and the table gives medians. Beside
each time: the CPU seconds every process spent in it (the two daemons, the `send` CLI, moto,
rclone: /proc/<pid>/stat before and after, wait4 for the ones that exit), and for transferd the
wall-clock phases from the daemons' debug log lines (TRANSFERD_LOG_LEVEL=debug: each S3 PUT and
GET with its start and duration, the commit), and the requests moto answered in the first round
(by kind, the case's own clean-up included). Results go to `--output` as JSON.
`--baseline TREE` adds the S3 cases run with the transferd of another checkout (say /work/main)
to the same rounds: an A/B of a change measured side by side, the only kind this shared
machine allows. `--profile DIR` records moto's and both daemons' stacks with py-spy during each
run (collapsed stacks, per thread; the sampling slows the runs: profile, or time, not both).
`--threads` adds each daemon's CPU seconds by thread (the scheduler's run time of each thread
over the send, named by `py-spy dump` after it: no sampling during the timed work). Each case's
timed work starts `--settle` seconds (3) after the previous case ended, the same for every
case: on this VM memory freed a moment ago is cheap to touch again and memory freed ~2 s ago
is not (free page reporting), and without the pause the order of the cases decided which tool
got the cheap pages.
A benchmark, not a test. Hold the lock while it runs (the machine is shared):

    flock /tmp/netplan-bench.lock python benchmarks/s3_replication.py [--size-mib 512]
        [--files 8] [--repeat 3] [--output benchmarks/results/s3-replication.json]
        [--only 'S3 ->'] [--baseline /work/main] [--profile DIR] [--settle 3] [--threads]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transferd.testing import MotoS3Server, free_port, write_site_configs  # noqa: E402

BUCKET = "transferd-bench"
DATASET = "approved/ds"
MIB = 1024 * 1024
# --profile DIR: py-spy records moto and both daemons during every run (collapsed stacks).
PROFILE_DIR: Path | None = None
# --keep-logs DIR: both daemons' debug logs of every run are copied there (DIR/<run>-A.log, ...).
LOGS_DIR: Path | None = None
# --threads: each daemon's CPU seconds by thread (py-spy names them), printed per case.
THREADS = False
# Each case's timed work starts at least this long after the previous case ended (`--settle`).
START_AT = 0.0


def _wait_start() -> None:
    """Sleep until START_AT: every case, ours and rclone's, starts its timed work with memory the
    previous case freed equally long ago. On this VM (free page reporting) memory freed ~2 s
    earlier has gone back to the host and costs a fault per page when touched again, memory freed
    just now does not: without a settle, a case started at once (rclone's CLI) gets the pages the
    one before freed warm, where our daemons' start-up lets them go cold first."""
    time.sleep(max(0.0, START_AT - time.monotonic()))


def _env(repo: Path = REPO) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, system_only: bool = False) -> float:
    """CPU seconds (user + system, or system alone; every thread) a live process has used so
    far."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # stat(5) fields 14, 15
    return (stime if system_only else utime + stime) * _TICK_S


def _moto_system_s(s3: MotoS3Server) -> float:
    """moto's CPU seconds in the kernel so far: on loopback these include TCP work done in its
    context (its reads, the ACKs they send and what those ACKs let the peer transmit)."""
    return _cpu_s(s3.proc.pid, system_only=True)


def _children_cpu_s() -> float:
    """CPU seconds of the children waited for so far (the CLI, rclone: wait4's rusage)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _task_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of process `pid`, by thread id: the scheduler's run time
    (schedstat, in ns). The per-thread utime + stime of /proc/<pid>/task/<tid>/stat are tick
    samples scaled to it and held monotonic, and summed 0.1 CPU-s under the process's total
    over a 0.5 s run (no thread ended in it: strace saw every exit at the daemon's stop)."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                out[int(tid)] = int(fh.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended
    return out


def _thread_names(pid: int) -> dict[int, str]:
    """Python's name of each thread of `pid` (`py-spy dump`: Python 3.11 leaves the kernel's
    thread names at "python"), pool numbers dropped ("transferd-s3-get_3" -> "transferd-s3-get");
    empty without py-spy."""
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy_bin).exists():
        return {}
    dump = subprocess.run([spy_bin, "dump", "--pid", str(pid), "--json", "--nonblocking"],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    try:
        threads = json.loads(dump.stdout)
    except ValueError:
        return {}
    return {
        int(t["os_thread_id"]): str(t.get("thread_name") or "?").rsplit("_", 1)[0]
        for t in threads
        if t.get("os_thread_id") is not None
    }


def _by_thread(pid: int, before: dict[int, float]) -> dict[str, float]:
    """CPU seconds of each thread of `pid` since `before` (threads started since count from 0),
    summed by Python thread name ("other" for threads py-spy did not name)."""
    names = _thread_names(pid)
    out: dict[str, float] = {}
    for tid, cpu in _task_cpu_s(pid).items():
        used = cpu - before.get(tid, 0.0)
        if used > 0:
            name = names.get(tid, "other")
            out[name] = round(out.get(name, 0.0) + used, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class Run:
    """One timed case: its seconds, the CPU seconds of each process over it, and (transferd)
    the wall-clock phases read from the daemons' logs."""

    seconds: float
    cpu_s: dict[str, float]
    phases_s: dict[str, float] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # moto's, by kind, over the run
    # Each daemon's CPU seconds by thread name (`--threads`): "sender: transferd-s3-get", ...
    threads_cpu_s: dict[str, float] = field(default_factory=dict)


def _request_counts(lines: list[str]) -> dict[str, int]:
    """Requests by kind (`PUT object`, `GET ?list-type`, ...) from moto's request log lines."""
    counts: dict[str, int] = {}
    for line in lines:
        method, _, rest = line.partition(" ")
        target = rest.split(" ", 1)[0]
        query = target.partition("?")[2]
        kind = f"{method} ?{query.split('=', 1)[0].split('&', 1)[0]}" if query else f"{method}"
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def _phases(sender_log: Path, receiver_log: Path) -> dict[str, float]:
    """Wall-clock phases of the run, from the job's start (the sending daemon's `job.started`):
    when the first S3 request began, how long the S3 requests ran (first start to last end),
    when the receiver's commit began (every byte staged), and the commit's end."""
    events = _log_lines(sender_log) + _log_lines(receiver_log)
    started = [e["ts"] for e in events if e.get("event") == "job.started"]
    done = [e["ts"] for e in events if e.get("event") == "job.committed"]
    if not started or not done:
        return {}
    t0 = started[-1]
    s3 = [(e["at"], e["at"] + e["seconds"]) for e in events
          if e.get("event") in ("storage.put", "storage.get") and e.get("at", 0) >= t0 - 1]
    commit = [e for e in events if e.get("event") == "storage.commit" and e.get("at", 0) >= t0]
    phases = {"job": done[-1] - t0}
    if s3:
        first, last = min(a for a, _ in s3), max(b for _, b in s3)
        phases |= {"first S3 request at": max(0.0, first - t0), "S3 requests": last - first}
    if commit:
        phases |= {"commit began at": commit[-1]["at"] - t0,
                   "commit waited for uploads": commit[-1]["uploads_wait_s"]}
    if s3:
        phases["after the last S3 request"] = done[-1] - last
    return phases


def _write_dataset(root: Path, size_mib: int, files: int, seed: int) -> None:
    rng = random.Random(seed)
    per = size_mib * MIB // files
    for i in range(files):
        path = root / DATASET / f"part-{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            left = per
            while left:
                n = min(left, 8 * MIB)
                fh.write(rng.randbytes(n))
                left -= n


def _wait_serving(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"daemon on port {port} did not start")


def _transferd(
    work: Path, s3: MotoS3Server, a: dict[str, Any], b: dict[str, Any], repo: Path = REPO
) -> Run:
    """Two daemons (A and B, with their site overrides) and one `send --wait --json` of the
    dataset from A to B: its wall seconds as the CLI reports them (job queued to committed at
    B), the CPU seconds of A, B, the CLI and moto over the send, and the phases."""
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(work, ports, A=a, B=b)
    procs = []
    env = {**_env(repo), "TRANSFERD_LOG_LEVEL": "debug"}
    try:
        for site in ("A", "B"):
            log = (work / f"{site}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "transferd", "serve", "--config", str(configs[site])],
                    env=env,
                    cwd=repo,  # `-m` puts the cwd first on sys.path: another tree's would win
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )  # fmt: skip
            )
            _wait_serving(ports[site])
        pids = {"sender daemon": procs[0].pid, "receiver daemon": procs[1].pid,
                "moto": s3.proc.pid}  # fmt: skip
        _wait_start()
        before = {name: _cpu_s(pid) for name, pid in pids.items()}
        tasks_before = {site: _task_cpu_s(proc.pid) for site, proc in zip("AB", procs, strict=True)}
        moto_system_before = _moto_system_s(s3)
        cli_before = _children_cpu_s()
        with (
            _profiled(procs[0].pid, PROFILE_DIR, f"{work.name}-sender"),
            _profiled(procs[1].pid, PROFILE_DIR, f"{work.name}-receiver"),
        ):
            done = _send(configs["A"], env, repo)
        cpu = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
        cpu["moto in kernel"] = _moto_system_s(s3) - moto_system_before
        cpu["send CLI"] = _children_cpu_s() - cli_before
        threads: dict[str, float] = {}
        if THREADS:
            for role, site, proc in (("sender", "A", procs[0]), ("receiver", "B", procs[1])):
                for name, used in _by_thread(proc.pid, tasks_before[site]).items():
                    threads[f"{role}: {name}"] = used
        if done.returncode != 0:
            raise RuntimeError(f"transferd send failed: {done.stderr.strip()}")
        seconds = float(json.loads(done.stdout)["seconds"])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        if LOGS_DIR is not None:
            LOGS_DIR.mkdir(parents=True, exist_ok=True)
            for site in ("A", "B"):
                shutil.copy(work / f"{site}.log", LOGS_DIR / f"{work.name}-{site}.log")
    return Run(seconds, cpu, _phases(work / "A.log", work / "B.log"), threads_cpu_s=threads)


def _send(config: Path, env: dict[str, str], repo: Path) -> subprocess.CompletedProcess[str]:
    """`transferd send --wait --json` of the dataset from A to B (run in `repo`, whose
    transferd `-m` then imports: the baseline's in a baseline run)."""
    return subprocess.run(
        [sys.executable, "-m", "transferd", "send", DATASET, "--config", str(config),
         "--to", "B", "--wait", "--json"],
        env=env, cwd=repo, capture_output=True, text=True, check=False, timeout=3600,
    )  # fmt: skip


def rclone_env(s3: MotoS3Server) -> dict[str, str]:
    """The environment that gives rclone the remote `moto:` at the server."""
    # The endpoint is plain http; rclone 1.60 refuses to start when AWS_CA_BUNDLE is set.
    return {
        **{k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"},
        "RCLONE_CONFIG_MOTO_TYPE": "s3",
        "RCLONE_CONFIG_MOTO_PROVIDER": "Other",
        "RCLONE_CONFIG_MOTO_ENDPOINT": s3.endpoint_url,
        "RCLONE_CONFIG_MOTO_ACCESS_KEY_ID": "transferd-test",
        "RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY": "transferd-test",
        "RCLONE_CONFIG_MOTO_REGION": "us-east-1",
    }


def _rclone(s3: MotoS3Server, src: str, dst: str) -> Run:
    """`rclone copy` with its defaults: its wall seconds, its CPU seconds and moto's."""
    env = rclone_env(s3)
    _wait_start()
    moto_before, rclone_before = _cpu_s(s3.proc.pid), _children_cpu_s()
    moto_system_before = _moto_system_s(s3)
    t0 = time.perf_counter()
    subprocess.run(["rclone", "copy", "-q", src, dst], env=env, check=True, timeout=3600)
    seconds = time.perf_counter() - t0
    cpu = {"rclone": _children_cpu_s() - rclone_before, "moto": _cpu_s(s3.proc.pid) - moto_before,
           "moto in kernel": _moto_system_s(s3) - moto_system_before}  # fmt: skip
    return Run(seconds, cpu)


def rclone_settings() -> dict[str, str]:
    """rclone's version and the defaults that decide how it drives the endpoint here."""
    version = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False)
    flags = subprocess.run(["rclone", "help", "flags"], capture_output=True, text=True,
                           check=False).stdout  # fmt: skip
    out = {"version": version.stdout.splitlines()[0] if version.stdout else "?"}
    for name in ("transfers", "checkers", "s3-upload-cutoff", "s3-upload-concurrency",
                 "multi-thread-cutoff", "multi-thread-streams"):  # fmt: skip
        for line in flags.splitlines():
            if line.strip().startswith(f"--{name} ") and "(default " in line:
                out[name] = line.rsplit("(default ", 1)[1].rstrip(")")
    return out


# What each tool checks on the way, as observed against this endpoint (`rclone -vv --dump
# headers`; botocore's request hooks in tests/transferd/test_objectstore.py).
CHECKS = {
    "rclone": "PUT: Content-MD5 of the file (one MD5 pass before sending) and UNSIGNED-PAYLOAD, "
    "then the returned ETag compared with that MD5; GET: MD5 of what arrived compared with the "
    "ETag",
    "transferd": "PUT: x-amz-checksum-crc32 combined from the chunks' CRCs as they were staged "
    "(no pass before sending) and UNSIGNED-PAYLOAD; GET: botocore checks the stored CRC where "
    "the object has one (objects rclone wrote have none); between the daemons every chunk's "
    "blake3 against the signed manifest",
}


def _rm_prefix(s3: MotoS3Server, prefix: str) -> None:
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", default="", help="run only the cases whose name contains this (e.g. 'S3 ->')"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="TREE",
        help="also time the S3 cases with the transferd of another checkout (e.g. main's), "
        "in the same rounds: an A/B of a change on this noisy machine",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="record the stacks of moto and both daemons during each run with py-spy "
        "(collapsed, DIR/<case>-<i>.txt, DIR/run-<i>-<case>-sender.txt, ...)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-logs", type=Path, default=None, metavar="DIR",
        help="copy both daemons' debug logs of every run to DIR (DIR/<run>-A.log, -B.log)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", action="store_true",
        help="also give each daemon's CPU seconds by thread (/proc/<pid>/task; py-spy names "
        "the threads after the run, outside the timing)",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=3.0, metavar="SECONDS",
        help="start each case's timed work at least this long after the previous case ended, "
        "the same for every case (0: at once, as before)",
    )  # fmt: skip
    args = parser.parse_args()
    global PROFILE_DIR, LOGS_DIR, START_AT, THREADS
    PROFILE_DIR, LOGS_DIR, THREADS = args.profile, args.keep_logs, args.threads
    if shutil.which("rclone") is None:
        sys.exit("rclone is not installed (apt-get install rclone)")
    size = args.size_mib * MIB // args.files * args.files

    with tempfile.TemporaryDirectory(prefix="s3-bench-") as tmp, MotoS3Server() as s3:
        root = Path(tmp)
        s3.create_bucket(BUCKET)
        src_local = root / "src"
        _write_dataset(src_local, args.size_mib, args.files, seed=1)
        # The S3 source: the same files, put there once by rclone (not timed).
        _rclone(s3, str(src_local / DATASET), f"moto:{BUCKET}/src/{DATASET}")
        opts = s3.storage_options

        def s3_site(prefix: str, state: Path) -> dict[str, Any]:
            return {"data_dir": f"s3://{BUCKET}/{prefix}", "state_dir": str(state),
                    "storage_options": opts}  # fmt: skip

        def case_local(i: int, work: Path) -> Run:
            return _transferd(work, s3, {"data_dir": str(src_local)}, {"data_dir": str(work / "B")})

        def case_to_s3(i: int, work: Path) -> Run:
            try:
                return _transferd(
                    work, s3, {"data_dir": str(src_local)}, s3_site(f"to-s3-{i}", work / "B-state")
                )
            finally:
                _rm_prefix(s3, f"to-s3-{i}/")

        def case_from_s3(i: int, work: Path) -> Run:
            return _transferd(
                work, s3, s3_site("src", work / "A-state"), {"data_dir": str(work / "B")}
            )

        def case_rclone_up(i: int, work: Path) -> Run:
            try:
                return _rclone(s3, str(src_local / DATASET), f"moto:{BUCKET}/rclone-{i}/{DATASET}")
            finally:
                _rm_prefix(s3, f"rclone-{i}/")

        def case_rclone_down(i: int, work: Path) -> Run:
            return _rclone(s3, f"moto:{BUCKET}/src/{DATASET}", str(work / "B" / DATASET))

        def baseline_to_s3(i: int, work: Path) -> Run:
            assert args.baseline is not None
            try:
                return _transferd(
                    work, s3, {"data_dir": str(src_local)},
                    s3_site(f"base-to-s3-{i}", work / "B-state"), args.baseline,
                )  # fmt: skip
            finally:
                _rm_prefix(s3, f"base-to-s3-{i}/")

        def baseline_from_s3(i: int, work: Path) -> Run:
            assert args.baseline is not None
            return _transferd(
                work, s3, s3_site("src", work / "A-state"), {"data_dir": str(work / "B")},
                args.baseline,
            )  # fmt: skip

        cases: dict[str, Callable[[int, Path], Run]] = {
            "transferd local -> local": case_local,
            "transferd local -> S3": case_to_s3,
            "rclone copy local -> S3": case_rclone_up,
            "transferd S3 -> local": case_from_s3,
            "rclone copy S3 -> local": case_rclone_down,
        }
        if args.baseline is not None:
            cases["baseline local -> S3"] = baseline_to_s3
            cases["baseline S3 -> local"] = baseline_from_s3
        cases = {name: case for name, case in cases.items() if args.only in name}
        runs: dict[str, list[Run]] = {name: [] for name in cases}
        for i in range(args.repeat):
            for name, case in cases.items():
                work = root / f"run-{i}-{name.replace(' ', '_').replace('>', '')}"
                work.mkdir()
                seen = len(s3.requests(BUCKET))
                START_AT = time.monotonic() + args.settle
                with _profiled(s3.proc.pid, args.profile, f"{name}-{i}"):
                    runs[name].append(case(i, work))
                runs[name][-1].requests = _request_counts(s3.requests(BUCKET)[seen:])
                shutil.rmtree(work, ignore_errors=True)
                print(f"  run {i + 1}/{args.repeat} {name}: {runs[name][-1].seconds:.2f} s",
                      flush=True)  # fmt: skip
    report(runs, size, args, rclone_settings())


@contextmanager
def _profiled(pid: int, out_dir: Path | None, name: str) -> Iterator[None]:
    """py-spy's record of process `pid` while the block runs (collapsed stacks), if asked."""
    if out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (name.replace(" ", "_").replace(">", "").replace("/", "") + ".txt")
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy_bin).exists():
        sys.exit("--profile needs py-spy (pip install py-spy)")
    spy = subprocess.Popen(
        [spy_bin, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--threads",
         "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(
    runs: dict[str, list[Run]], size: int, args: argparse.Namespace, rclone: dict[str, str]
) -> None:
    load = os.getloadavg()
    print(
        f"\n{size / MIB:.0f} MiB in {args.files} files, moto S3 server on 127.0.0.1 (the same "
        f"endpoint and data for every case), {args.repeat} round-robin rounds, medians (range), "
        f"each case started {args.settle:g} s after the previous one ended; "
        f"load average {load[0]:.1f} on {os.cpu_count()} cores"
    )
    print("rclone " + ", ".join(f"{k} {v}" for k, v in rclone.items()))
    for tool, checks in CHECKS.items():
        print(f"{tool} checks: {checks}")
    peers = {"S3": "rclone copy local -> S3", "local": "rclone copy S3 -> local"}
    print(f"\n{'case':<26} {'seconds':>18} {'MiB/s':>7} {'vs rclone':>9}  CPU seconds (medians)")
    summary: dict[str, Any] = {}
    for name, case_runs in runs.items():
        med = statistics.median(r.seconds for r in case_runs)
        peer = peers["S3"] if name.endswith("S3") else peers["local"]
        ratio = None
        if name.startswith(("transferd", "baseline")) and "S3" in name and peer in runs:
            ratio = statistics.median(r.seconds for r in runs[peer]) / med
        procs = list(dict.fromkeys(p for r in case_runs for p in r.cpu_s))
        cpu = {p: _median_of([r.cpu_s.get(p) for r in case_runs]) for p in procs}
        spread = f"{med:.2f} ({min(r.seconds for r in case_runs):.2f}-" \
                 f"{max(r.seconds for r in case_runs):.2f})"  # fmt: skip
        cpu_text = ", ".join(f"{p} {v:.2f}" for p, v in cpu.items() if v is not None)
        ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{name:<26} {spread:>18} {size / MIB / med:>7.1f} {ratio_text:>9}  {cpu_text}")
        phases = list(dict.fromkeys(p for r in case_runs for p in r.phases_s))
        summary[name] = {
            "median_s": med,
            "mib_per_s": size / MIB / med,
            "vs_rclone": ratio,
            "cpu_s_median": cpu,
            "phases_s_median": {
                p: _median_of([r.phases_s.get(p) for r in case_runs]) for p in phases
            },  # fmt: skip
            "runs": [asdict(r) for r in case_runs],
        }
    print("\ntransferd phases, seconds from the job's start (medians):")
    for name, entry in summary.items():
        if entry["phases_s_median"]:
            text = ", ".join(f"{p} {v:.2f}" for p, v in entry["phases_s_median"].items()
                             if v is not None)  # fmt: skip
            print(f"  {name}: {text}")
    threaded = {n: e for n, e in summary.items() if any(r["threads_cpu_s"] for r in e["runs"])}
    if threaded:
        print("\ntransferd CPU seconds by thread (medians; threads of one name summed):")
    for name, entry in threaded.items():
        keys = list(dict.fromkeys(k for r in entry["runs"] for k in r["threads_cpu_s"]))
        medians = {k: _median_of([r["threads_cpu_s"].get(k, 0.0) for r in entry["runs"]])
                   for k in keys}  # fmt: skip
        entry["threads_cpu_s_median"] = medians
        text = ", ".join(f"{k} {v:.2f}" for k, v in medians.items() if v)
        print(f"  {name}: {text}")
    print("\nmoto's requests in the first run of each case (the case's own clean-up included):")
    for name, case_runs in runs.items():
        text = ", ".join(f"{k} {n}" for k, n in case_runs[0].requests.items())
        print(f"  {name}: {text}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "command": "flock /tmp/netplan-bench.lock python benchmarks/s3_replication.py "
            f"--size-mib {args.size_mib} --files {args.files} --repeat {args.repeat} "
            f"--settle {args.settle:g}",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bytes": size,
            "files": args.files,
            "load_average": load,
            "cores": os.cpu_count(),
            "rclone": rclone,
            "checks": CHECKS,
            "cases": summary,
        }
        args.output.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
