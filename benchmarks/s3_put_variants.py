"""moto's CPU per PUT of one object, by how the PUT is made: our headers, then one header changed
at a time, and rclone's PUT of the same file; interleaved rounds against one moto server.
Then the kernel cost of writing fresh page cache on this machine, first touch vs reused pages
(why moto's kernel time differs between the two tools in `s3_replication.py`).

    flock /tmp/netplan-bench.lock .venv/bin/python benchmarks/s3_put_variants.py [--size-mib 32]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import itertools
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.s3_replication import _cpu_s, rclone_env  # noqa: E402
from transferd.testing import MotoS3Server  # noqa: E402

BUCKET = "transferd-put-variants"
MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("rclone") is None:
        sys.exit("rclone is not installed (apt-get install rclone)")
    import botocore.auth
    import botocore.awsrequest
    import botocore.config
    import botocore.credentials
    import botocore.session

    with tempfile.TemporaryDirectory(prefix="s3-put-") as tmp, MotoS3Server() as s3:
        s3.create_bucket(BUCKET)
        data = random.Random(1).randbytes(args.size_mib * MIB)
        path = Path(tmp) / "object.bin"
        path.write_bytes(data)
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        keys = (f"k{i}" for i in itertools.count())

        def client(**config: Any) -> Any:
            return botocore.session.Session().create_client(
                "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
                aws_access_key_id="transferd-test", aws_secret_access_key="transferd-test",
                config=botocore.config.Config(**config),
            )  # fmt: skip

        unsigned = client(s3={"payload_signing_enabled": False})
        plain = client(s3={"payload_signing_enabled": False},
                       request_checksum_calculation="when_required")  # fmt: skip
        signed = client(s3={"payload_signing_enabled": True})
        no_expect = client(s3={"payload_signing_enabled": False})

        def drop_expect(request: Any, **_: Any) -> None:
            del request.headers["Expect"]

        no_expect.meta.events.register("before-send.s3.PutObject", drop_expect)

        def ours(c: Any) -> None:
            with path.open("rb") as body:
                c.put_object(Bucket=BUCKET, Key=next(keys), Body=body, ChecksumAlgorithm="CRC32",
                             ChecksumCRC32=crc)  # fmt: skip

        def boto(c: Any, **extra: Any) -> None:
            with path.open("rb") as body:
                c.put_object(Bucket=BUCKET, Key=next(keys), Body=body, **extra)

        def chunked() -> None:
            """Our headers, signed by hand, the body as `Transfer-Encoding: chunked`."""
            key = next(keys)
            request = botocore.awsrequest.AWSRequest(
                "PUT", f"{s3.endpoint_url}/{BUCKET}/{key}",
                headers={"x-amz-checksum-crc32": crc, "x-amz-sdk-checksum-algorithm": "CRC32",
                         "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
            )  # fmt: skip
            credentials = botocore.credentials.Credentials("transferd-test", "transferd-test")
            botocore.auth.S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(request)

            def blocks() -> Any:
                with path.open("rb") as fh:
                    while block := fh.read(16384):
                        yield block

            conn = http.client.HTTPConnection("127.0.0.1", s3.port)
            conn.request("PUT", f"/{BUCKET}/{key}", body=blocks(),
                         headers=dict(request.headers.items()), encode_chunked=True)  # fmt: skip
            answer = conn.getresponse()
            answer.read()
            conn.close()
            if answer.status != 200:
                raise RuntimeError(f"chunked PUT: HTTP {answer.status}")

        env = rclone_env(s3)
        variants: dict[str, Callable[[], None]] = {
            "ours: x-amz-checksum-crc32, UNSIGNED-PAYLOAD": lambda: ours(unsigned),
            "no checksum header": lambda: boto(plain),
            "Content-MD5 instead (rclone's)": lambda: boto(plain, ContentMD5=md5),
            "signed payload (SHA-256)": lambda: ours(signed),
            "no Expect: 100-continue": lambda: ours(no_expect),
            "Transfer-Encoding: chunked": chunked,
            "rclone copyto (its defaults)": lambda: subprocess.run(
                ["rclone", "copyto", "-q", str(path), f"moto:{BUCKET}/{next(keys)}"],
                env=env, check=True, timeout=600,
            ),  # fmt: skip
        }
        for put in variants.values():  # warm: every code path once
            put()
        moto: dict[str, list[float]] = {name: [] for name in variants}
        moto_kernel: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, put in variants.items():
                before = _cpu_s(s3.proc.pid), _cpu_s(s3.proc.pid, system_only=True)
                put()
                time.sleep(0.03)  # the server's thread finishes its answer
                moto[name].append(_cpu_s(s3.proc.pid) - before[0])
                moto_kernel[name].append(_cpu_s(s3.proc.pid, system_only=True) - before[1])
        print(f"moto's CPU seconds per {args.size_mib} MiB PUT, medians of {args.rounds} "
              f"interleaved rounds (range); load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        for name in variants:
            print(f"  {name:46s} {statistics.median(moto[name]):.3f} "
                  f"({min(moto[name]):.3f}-{max(moto[name]):.3f}), in kernel "
                  f"{statistics.median(moto_kernel[name]):.3f}")  # fmt: skip

        print("\nwriting 256 MiB of fresh page cache (a new file, then deleted), kernel CPU-s:")
        block = os.urandom(32 * MIB)
        for i in range(3):
            before_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            target = Path(tmp) / f"fill-{i}"
            with target.open("wb") as fh:
                for _ in range(8):
                    fh.write(block)
            used = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before_s
            target.unlink()
            print(f"  write {i + 1}: {used:.3f}")


if __name__ == "__main__":
    main()
