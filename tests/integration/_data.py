"""Shared fixtures for loopback daemon tests: seeded data files."""

from __future__ import annotations

import random
from pathlib import Path

import blake3


def write_random(path: Path, size: int, seed: int) -> str:
    """Write `size` seeded pseudo-random bytes; return their blake3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return blake3.blake3(data).hexdigest()


def file_blake3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()
