"""A fresh span buffer is not populated by mmap() (the GIL is held through that call, and the
event loop waits for it); its pages fault in during the pread that fills it, GIL released."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import pytest

from transferd.site import source

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")


def _resident_kib(buf: mmap.mmap) -> int:
    """The mapping's resident set (Rss, KiB) from /proc/self/smaps, found by its address."""
    anchor = ctypes.c_char.from_buffer(buf)
    start = ctypes.addressof(anchor)
    del anchor  # the export would keep the mapping from closing
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        lo, _, rest = line.partition("-")
        if rest and int(lo, 16) == start:
            for field in lines[i + 1:]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError(f"no mapping at {start:#x} in /proc/self/smaps")


def test_a_fresh_span_is_not_faulted_in_by_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "_spare_spans", [])  # no idle span to reuse: a fresh one
    length = 8 << 20
    buf = source._take_span(length)
    try:
        assert len(buf) >= length
        assert _resident_kib(buf) == 0  # with MAP_POPULATE: 8192 KiB, under the GIL
    finally:
        buf.close()


def test_a_span_read_through_the_source_holds_the_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "_spare_spans", [])
    data = bytes(range(256)) * (3 << 12)  # 3 MiB, not a whole number of pieces after 1000
    path = tmp_path / "blob"
    path.write_bytes(data)
    src = source.SourceFile(str(path))
    try:
        with src.mapped(1000, len(data) - 1000) as view:
            assert bytes(view) == data[1000:]
    finally:
        src.close()
