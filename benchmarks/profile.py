"""`python -m benchmarks.profile FILE...`: where a profiled daemon spent its CPU, from py-spy's
collapsed stacks (`NB_PROFILE=DIR python -m benchmarks run ...` writes them, one file per daemon
and run; py-spy counts only samples where a thread was busy, so a count is CPU time at 100 Hz).

Prints, per file: samples per thread role (the event loop thread, the worker threads, others)
and the heaviest frames by self time (the innermost frame of a sample: for a C call such as
`recv_into` or `blake3.update`, the Python line that made it) and by inclusive time within the
package's own code.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Profile", "load_profile", "summarize"]

RATE_HZ = 100  # as recorded by benchmarks.tools._profile


@dataclass
class Profile:
    samples: int = 0
    by_role: Counter[str] = field(default_factory=Counter)
    self_frames: Counter[tuple[str, str]] = field(default_factory=Counter)  # (role, frame)
    own_inclusive: Counter[str] = field(default_factory=Counter)


def _role(frames: list[str]) -> str:
    text = ";".join(frames)
    if "concurrent/futures/thread.py" in text or "threading.py" in text:
        return "worker threads"
    if "asyncio/runners.py" in text or "run_until_complete" in text:
        return "event loop"
    if "importlib._bootstrap" in text:
        return "start-up imports"
    return "other"


def load_profile(path: Path, package: str = "transferd/") -> Profile:
    prof = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            frames = frames[1:]
        if not frames:
            continue
        role = _role(frames)
        prof.samples += count
        prof.by_role[role] += count
        prof.self_frames[(role, frames[-1])] += count
        for frame in dict.fromkeys(f for f in frames if package in f):
            prof.own_inclusive[frame] += count
    return prof


def summarize(path: Path, top: int = 12) -> str:
    prof = load_profile(path)
    if not prof.samples:
        return f"{path.name}: no samples\n"
    total = prof.samples
    lines = [f"{path.name}: {total} samples = {total / RATE_HZ:.1f} CPU-s (py-spy, {RATE_HZ} Hz)"]
    lines.append("  by thread: " + ", ".join(
        f"{role} {n / total:.0%}" for role, n in prof.by_role.most_common()))
    lines.append("  self time:")
    for (role, frame), n in prof.self_frames.most_common(top):
        lines.append(f"    {n / total:5.1%}  [{role}] {frame}")
    lines.append("  inclusive, package code:")
    for frame, n in prof.own_inclusive.most_common(top):
        lines.append(f"    {n / total:5.1%}  {frame}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m benchmarks.profile PYSPY_RAW_FILE...", file=sys.stderr)
        return 2
    for name in argv:
        try:
            print(summarize(Path(name)))
        except OSError as exc:
            print(f"error: cannot read the profile {name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
