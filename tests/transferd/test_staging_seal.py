"""A committing upload's staging is sealed (`Staging.close`, called by every backend's commit
after the fsync): a write in flight finishes before the descriptors close, never into a file
that reused a closed descriptor's number, and a later write is refused."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from transferd.errors import StorageError
from transferd.site import staging as staging_mod
from transferd.site.staging import Staging


def test_close_waits_for_a_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Staging(tmp_path / "u", "file", [""], [8192])
    st.direct = False
    st.create()
    st.reserve(0)
    entered, release = threading.Event(), threading.Event()
    real = staging_mod._pwrite_all

    def slow_pwrite(fd: int, view: memoryview, offset: int) -> None:
        entered.set()  # the write holds its descriptor, its bytes not yet out
        release.wait(5)
        real(fd, view, offset)

    monkeypatch.setattr(staging_mod, "_pwrite_all", slow_pwrite)
    errors: list[Exception] = []

    def write() -> None:
        try:
            st.write(0, 0, b"X" * 4096)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    assert entered.wait(5)
    closer = threading.Thread(target=st.close)  # what storage.commit does after the sync
    closer.start()
    other = tmp_path / "other.bin"
    fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o644)  # the number a close would free
    os.write(fd, b"o" * 16)
    release.set()
    writer.join(5)
    closer.join(5)
    os.close(fd)
    assert b"X" not in other.read_bytes(), "chunk bytes written into an unrelated file"
    assert not errors, f"write in flight failed: {errors}"
    assert (tmp_path / "u" / "file").read_bytes()[:4096] == b"X" * 4096


def test_a_write_after_the_seal_is_refused(tmp_path: Path) -> None:
    st = Staging(tmp_path / "u", "file", [""], [8192])
    st.direct = False
    st.create()
    st.write(0, 0, b"A" * 4096)
    st.sync()
    st.close()
    with pytest.raises(StorageError, match="committed"):
        st.write(0, 0, b"B" * 4096)
    assert (tmp_path / "u" / "file").read_bytes()[:4096] == b"A" * 4096
