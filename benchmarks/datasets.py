"""The bytes every tool moves in a run: seeded, generated once and cached, identical for all tools.

- incompressible: uniformly random bytes (no compressor can win).
- checkpoint-bf16: bf16 weights, N(0, 0.02) truncated from fp32, with 70 % exact zeros (pruned or
  untrained rows); zstd level 1 shrinks it about 2-3x, like the checkpoints issue 3 plans for.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import numpy as np

from benchmarks.scenario import DataKind

__all__ = ["dataset", "file_blake3", "DATA_CACHE"]

DATA_CACHE = Path(os.environ.get("NB_BENCH_DATA", "/var/tmp/netplan-bench-data"))
_BLOCK = 16 * 1024 * 1024
ZERO_FRACTION = 0.7


def _block(kind: DataKind, rng: np.random.Generator, size: int) -> bytes:
    if kind is DataKind.INCOMPRESSIBLE:
        return rng.bytes(size)
    count = size // 2
    weights = (rng.standard_normal(count, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
    bf16 = (weights >> 16).astype(np.uint16)
    bf16[rng.random(count, dtype=np.float32) < ZERO_FRACTION] = 0
    return bf16.tobytes()


def dataset(kind: DataKind, size_mib: int, seed: int = 0, cache: Path = DATA_CACHE) -> Path:
    """Path of the cached data file (made on first use; atomic rename so a crash leaves none)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{kind.value}-{size_mib}MiB-seed{seed}.bin"
    if path.exists() and path.stat().st_size == size_mib * 1024 * 1024:
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    remaining = size_mib * 1024 * 1024
    with tmp.open("wb") as out:
        while remaining:
            n = min(_BLOCK, remaining)
            out.write(_block(kind, rng, n))
            remaining -= n
    tmp.replace(path)
    return path


def file_blake3(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()
