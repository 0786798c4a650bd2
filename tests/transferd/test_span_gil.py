"""A fresh span buffer is not populated by mmap() (the GIL is held through that call, and the
event loop waits for it); its pages fault in during the pread that fills it, GIL released."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import pytest

from transferd.site import source

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses mincore(2)")


def _resident_pages(buf: mmap.mmap) -> int:
    """How many of the mapping's own pages are resident: mincore(2) over exactly its range.
    (/proc/self/smaps does not do: the kernel merges adjacent anonymous rw mappings into one
    entry, which may start below the mapping or count a neighbour's resident pages.)"""
    anchor = ctypes.c_char.from_buffer(buf)
    start = ctypes.addressof(anchor)
    del anchor  # the export would keep the mapping from closing
    page = mmap.PAGESIZE
    assert start % page == 0
    pages = -(-len(buf) // page)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(len(buf)), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec)


def test_resident_pages_counts_the_mapping_s_own_pages() -> None:
    buf = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        assert _resident_pages(buf) == 0
        buf[: 3 * mmap.PAGESIZE] = b"x" * (3 * mmap.PAGESIZE)
        assert _resident_pages(buf) == 3
    finally:
        buf.close()


def _touched_anonymous_mapping() -> mmap.mmap:
    """An ordinary anonymous private rw mapping, all resident (as obmalloc arenas and glibc's
    large allocations are): the kernel merges an adjacent fresh span's mapping with it."""
    other = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    other.write(b"x" * len(other))
    return other


@pytest.mark.parametrize("neighbours", [0, 8], ids=["alone", "after-touched-neighbours"])
def test_a_fresh_span_is_not_faulted_in_by_the_mapping(monkeypatch: pytest.MonkeyPatch,
                                                       neighbours: int) -> None:
    monkeypatch.setattr(source, "_spare_spans", [])  # no idle span to reuse: a fresh one
    length = 8 << 20
    kept: list[mmap.mmap] = []
    try:
        for _ in range(max(1, neighbours)):
            if neighbours:
                kept.append(_touched_anonymous_mapping())
            buf = source._take_span(length)
            kept.append(buf)
            assert len(buf) >= length
            assert _resident_pages(buf) == 0  # with MAP_POPULATE: all 2048, under the GIL
    finally:
        for m in kept:
            m.close()


def _vm_flags(start: int) -> list[str]:
    """VmFlags of the /proc/self/smaps entry that holds `start` (a merged entry's flags are
    its every part's: the kernel merges only mappings whose flags agree)."""
    entry_holds = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        lo, dash, rest = line.partition("-")
        if dash and " " in rest and all(c in "0123456789abcdef" for c in lo):
            hi = rest.split(" ", 1)[0]
            entry_holds = int(lo, 16) <= start < int(hi, 16)
        elif entry_holds and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {start:#x} in /proc/self/smaps")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE")
                    or not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages")
def test_a_fresh_span_asks_for_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 MiB faults in the pread that fills it instead of 4 KiB ones (benchmarks/span_fault.py
    also checks that unmapping it gives the memory back)."""
    monkeypatch.setattr(source, "_spare_spans", [])
    buf = source._take_span(8 << 20)
    anchor = ctypes.c_char.from_buffer(buf)
    start = ctypes.addressof(anchor)
    del anchor
    try:
        assert "hg" in _vm_flags(start)  # MADV_HUGEPAGE
        buf.write(b"x" * len(buf))
        assert _resident_pages(buf) == len(buf) // mmap.PAGESIZE
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
