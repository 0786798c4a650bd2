"""Shared fixtures for loopback daemon tests: seeded data files."""

from __future__ import annotations

import os
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


def tree_digests(root: Path, skip: tuple[str, ...] = (".transferd",)) -> dict[str, str]:
    """Every file under `root` (top folders in `skip` left out) with its blake3; a symlink is
    listed as "link", not followed: what a test compares before and after."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] and rel.parts[0] in skip:
            continue
        for name in files:
            full = Path(dirpath, name)
            out[str(rel / name)] = "link" if full.is_symlink() else file_blake3(full)
    return out
