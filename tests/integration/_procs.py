"""Daemons and CLI runs as real subprocesses (`python -m transferd ...`), for kill tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_daemon(config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "transferd", "serve", "--config", str(config), *extra],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def cli(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "transferd",
        *args,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample from a daemon's /metrics; None while it is not answering."""
    want = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


async def wait_until_serving(url: str, timeout_s: float = 60.0) -> None:
    """Until the daemon at `url` answers. A daemon's start costs about 2 CPU-s of imports (on
    this 2-core VM; 12-29 s of wall time with the suite on one loaded core): the bound is a
    hang guard, not a measure."""
    await poll_until(
        lambda: metric(url, "transferd_retries_total"), lambda v: v is not None, timeout_s
    )


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout_s: float,
    every_s: float = 0.05,
) -> T:
    """Probe another process until `done(value)`; TimeoutError after timeout_s."""
    async with asyncio.timeout(timeout_s):
        for _ in range(int(timeout_s / every_s) + 1):
            value = await probe()
            if done(value):
                return value
            await asyncio.sleep(every_s)
    raise TimeoutError
