"""The S3 request paths alone, against one moto S3 server, in one run: 8 objects PUT and GET,
4 at a time, through s3fs (`put_file`, `cat_file`: every request on its one `fsspecIO` loop
thread), through a blocking botocore client called from 4 threads (what `ObjectStorage` does
for bulk PUTs and whole-object GETs), and by `rclone copy` (its defaults).

    flock /tmp/netplan-bench.lock .venv/bin/python benchmarks/s3_requests.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.s3_replication import rclone_env  # noqa: E402
from transferd.testing import MotoS3Server  # noqa: E402

MIB = 1024 * 1024
BUCKET = "transferd-requests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("rclone") is None:
        sys.exit("rclone is not installed (apt-get install rclone)")
    import botocore.config
    import botocore.session
    import s3fs

    with tempfile.TemporaryDirectory(prefix="s3-requests-") as tmp, MotoS3Server() as s3:
        s3.create_bucket(BUCKET)
        root = Path(tmp) / "src"
        root.mkdir()
        rng = random.Random(1)
        files = []
        for i in range(args.files):
            path = root / f"part-{i:03d}.bin"
            path.write_bytes(rng.randbytes(args.size_mib * MIB // args.files))
            files.append(path)
        fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
        client = botocore.session.Session().create_client(
            "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
            aws_access_key_id="transferd-test", aws_secret_access_key="transferd-test",
            config=botocore.config.Config(max_pool_connections=16),
        )  # fmt: skip
        env = rclone_env(s3)
        for path in files:  # the GET source, with botocore's default CRC (checked on GET)
            with path.open("rb") as body:
                client.put_object(Bucket=BUCKET, Key=f"src/{path.name}", Body=body)

        def each(fn: Callable[[Path], object]) -> None:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(fn, files))

        def put_boto(prefix: str, path: Path) -> None:
            with path.open("rb") as body:
                client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=body)

        def get_boto(path: Path) -> bytes:
            out = client.get_object(Bucket=BUCKET, Key=f"src/{path.name}")
            return bytes(out["Body"].read())

        def rclone(src: str, dst: str) -> None:
            subprocess.run(["rclone", "copy", "-q", src, dst], env=env, check=True, timeout=600)

        cases: dict[str, Callable[[str], None]] = {
            "PUT s3fs put_file": lambda p: each(
                lambda f: fs.put_file(str(f), f"{BUCKET}/{p}/{f.name}")
            ),
            "PUT botocore threads": lambda p: each(lambda f: put_boto(p, f)),
            "PUT rclone copy": lambda p: rclone(str(root), f"moto:{BUCKET}/{p}"),
            "GET s3fs cat_file": lambda p: each(
                lambda f: bytes(fs.cat_file(f"{BUCKET}/src/{f.name}"))
            ),
            "GET botocore threads": lambda p: each(get_boto),
            "GET rclone copy": lambda p: rclone(f"moto:{BUCKET}/src", str(Path(tmp) / p)),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.repeat):
            for n, (name, case) in enumerate(cases.items()):
                prefix = f"run-{i}-{n}"
                t0 = time.perf_counter()
                case(prefix)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(Path(tmp) / prefix, ignore_errors=True)
                if name.startswith("PUT"):
                    keys = [{"Key": f"{prefix}/{f.name}"} for f in files]
                    client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
    print(f"\n{args.size_mib} MiB in {args.files} objects, medians of {args.repeat} (range)")
    for name, runs in times.items():
        med = statistics.median(runs)
        print(f"{name:<24} {med:6.2f} s ({min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
