"""Replication with an S3 site next to local-disk replication and next to `rclone copy` to and
from the same S3 endpoint, measured in one run on the same data.

The endpoint is moto's S3 server (`moto[server]`, a pure-Python process on 127.0.0.1): it is the
bottleneck here, so these numbers say how well each tool keeps one endpoint busy, not what real
S3 does. Cases, each timed `--repeat` times in turn (fresh destination every time: a second run
into the same site would be a delta of nothing):
- transferd local -> local   (two daemons, `transferd send --wait --json`: the physical floor)
- transferd local -> S3      (the receiving site's data_dir is s3://bucket/...)
- transferd S3 -> local      (the sending site's data_dir is s3://bucket/...)
- rclone copy local -> S3, rclone copy S3 -> local (same endpoint, rclone's defaults:
  4 transfers, 4 upload streams per file, multi-thread downloads)
A benchmark, not a test. Hold the lock while it runs (the machine is shared):

    flock /tmp/netplan-bench.lock python benchmarks/s3_replication.py [--size-mib 512]
        [--files 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transferd.testing import MotoS3Server, free_port, write_site_configs  # noqa: E402

BUCKET = "transferd-bench"
DATASET = "approved/ds"
MIB = 1024 * 1024


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


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


def _transferd(work: Path, a: dict[str, Any], b: dict[str, Any]) -> float:
    """Two daemons (A and B, with their site overrides) and one `send --wait --json` of the
    dataset from A to B: its wall seconds as the CLI reports them."""
    ports = {"A": free_port(), "B": free_port()}
    configs = write_site_configs(work, ports, A=a, B=b)
    procs = []
    try:
        for site in ("A", "B"):
            log = (work / f"{site}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "transferd", "serve", "--config", str(configs[site])],
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )  # fmt: skip
            )
            _wait_serving(ports[site])
        done = subprocess.run(
            [sys.executable, "-m", "transferd", "send", DATASET, "--config", str(configs["A"]),
             "--to", "B", "--wait", "--json"],
            env=_env(), capture_output=True, text=True, check=False, timeout=3600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"transferd send failed: {done.stderr.strip()}")
        return float(json.loads(done.stdout)["seconds"])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


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


def _rclone(s3: MotoS3Server, src: str, dst: str) -> float:
    env = rclone_env(s3)
    t0 = time.perf_counter()
    subprocess.run(["rclone", "copy", "-q", src, dst], env=env, check=True, timeout=3600)
    return time.perf_counter() - t0


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
    args = parser.parse_args()
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

        def case_local(i: int, work: Path) -> float:
            return _transferd(work, {"data_dir": str(src_local)}, {"data_dir": str(work / "B")})

        def case_to_s3(i: int, work: Path) -> float:
            try:
                return _transferd(
                    work, {"data_dir": str(src_local)}, s3_site(f"to-s3-{i}", work / "B-state")
                )
            finally:
                _rm_prefix(s3, f"to-s3-{i}/")

        def case_from_s3(i: int, work: Path) -> float:
            return _transferd(work, s3_site("src", work / "A-state"), {"data_dir": str(work / "B")})

        def case_rclone_up(i: int, work: Path) -> float:
            try:
                return _rclone(s3, str(src_local / DATASET), f"moto:{BUCKET}/rclone-{i}/{DATASET}")
            finally:
                _rm_prefix(s3, f"rclone-{i}/")

        def case_rclone_down(i: int, work: Path) -> float:
            return _rclone(s3, f"moto:{BUCKET}/src/{DATASET}", str(work / "B" / DATASET))

        cases: dict[str, Callable[[int, Path], float]] = {
            "transferd local -> local": case_local,
            "transferd local -> S3": case_to_s3,
            "rclone copy local -> S3": case_rclone_up,
            "transferd S3 -> local": case_from_s3,
            "rclone copy S3 -> local": case_rclone_down,
        }
        cases = {name: case for name, case in cases.items() if args.only in name}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.repeat):
            for name, case in cases.items():
                work = root / f"run-{i}-{name.replace(' ', '_').replace('>', '')}"
                work.mkdir()
                times[name].append(case(i, work))
                shutil.rmtree(work, ignore_errors=True)
                print(f"  run {i + 1}/{args.repeat} {name}: {times[name][-1]:.2f} s", flush=True)

    print(
        f"\n{size / MIB:.0f} MiB in {args.files} files, moto S3 server on 127.0.0.1, "
        f"medians of {args.repeat} (range)"
    )
    print(f"{'case':<28} {'seconds':>18} {'MiB/s':>8}  vs rclone")
    peers = {"S3": "rclone copy local -> S3", "local": "rclone copy S3 -> local"}
    for name, runs in times.items():
        med = statistics.median(runs)
        rate = size / MIB / med
        ratio = ""
        peer = peers["S3"] if name.endswith("S3") else peers["local"]
        if name.startswith("transferd") and "S3" in name and peer in times:
            ratio = f"{statistics.median(times[peer]) / med:.2f}x"
        spread = f"{med:.2f} ({min(runs):.2f}-{max(runs):.2f})"
        print(f"{name:<28} {spread:>18} {rate:>8.1f}  {ratio}")


if __name__ == "__main__":
    main()
