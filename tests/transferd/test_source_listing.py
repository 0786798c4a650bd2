"""What a local data_dir offers to send, for what a user may have in a folder: a FIFO, a device,
a socket, a link to nothing, a loop of links, a link to a subfolder, a subfolder it may not
read. A folder is listed whole or refused naming the member; nothing is sent as something it is
not (a device as an empty file), no subtree is left out without a word (its copy at the
receiver would be removed by the commit), and nothing opened for sending waits for ever."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from transferd.errors import IntegrityError, PolicyViolation, StorageError
from transferd.site.storage import FsspecStorage, LocalStorage, SiteStorage

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capabilities() -> tuple[_CapHeader, ctypes.Array[_CapData]]:
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return header, data


@contextlib.contextmanager
def _permissions_apply() -> Iterator[None]:
    """File permissions hold for this thread inside the block: as root, the capabilities that
    pass them by are dropped from its effective set (kept permitted, so they come back)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _capabilities()
    saved = data[0].effective
    data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
    try:
        yield
    finally:
        header, data = _capabilities()
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0


@pytest.fixture
def site(tmp_path: Path) -> LocalStorage:
    (tmp_path / "data" / "curated" / "ds").mkdir(parents=True)
    (tmp_path / "data" / "curated" / "ds" / "ok.bin").write_bytes(b"ok")
    return LocalStorage(tmp_path / "data")


def _refused(storage: LocalStorage, rel: str) -> str:
    with pytest.raises(StorageError) as refused:
        storage.list_source(rel)
    assert not isinstance(refused.value, IntegrityError)  # not "changed while being sent"
    return str(refused.value)


def test_a_fifo_in_a_folder_is_refused_by_name_and_a_fifo_alone_is_not_missing(
    site: LocalStorage,
) -> None:
    os.mkfifo(site.root / "curated/ds/pipe")
    os.mkfifo(site.root / "curated/pipe")
    assert _refused(site, "curated/ds") == (
        "curated/ds/pipe is a FIFO (named pipe): only regular files and folders are sent")
    assert "curated/pipe is a FIFO" in _refused(site, "curated/pipe")


def test_a_device_in_a_folder_is_refused_not_sent_as_an_empty_file(site: LocalStorage) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    os.mknod(site.root / "curated/ds/zero", stat.S_IFCHR | 0o644, os.makedev(1, 5))
    assert "curated/ds/zero is a character device" in _refused(site, "curated/ds")


def test_a_socket_in_a_folder_is_refused(
    site: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(site.root / "curated/ds")  # a socket's path is limited to 108 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        assert "curated/ds/sock is a socket" in _refused(site, "curated/ds")


def test_links_to_nothing_and_loops_are_named_as_such(site: LocalStorage) -> None:
    (site.root / "curated/ds/gone").symlink_to("nowhere")
    assert _refused(site, "curated/ds") == (
        "curated/ds/gone is a link to nothing (it points to 'nowhere')")
    assert "curated/ds/gone is a link to nothing" in _refused(site, "curated/ds/gone")
    (site.root / "curated/ds/gone").unlink()
    (site.root / "curated/ds/l1").symlink_to("l2")
    (site.root / "curated/ds/l2").symlink_to("l1")
    assert _refused(site, "curated/ds") == "curated/ds/l1 is a loop of links"
    assert _refused(site, "curated/ds/l2") == "curated/ds/l2 is a loop of links"


def test_a_link_to_a_subfolder_is_listed_through_and_a_link_up_is_a_loop(
    site: LocalStorage,
) -> None:
    (site.root / "curated/shared").mkdir()
    (site.root / "curated/shared/s.bin").write_bytes(b"shared")
    (site.root / "curated/ds/lib").symlink_to("../shared")
    assert site.list_source("curated/ds") == ("folder", [("lib/s.bin", 6), ("ok.bin", 2)])
    (site.root / "curated/shared/up").symlink_to("..")
    assert _refused(site, "curated/ds") == (
        "curated/ds/lib/up/ds is a link to a folder it is in (a loop of links)")


def test_a_folder_reached_twice_through_links_is_refused_naming_both(
    site: LocalStorage,
) -> None:
    # Each level doubled the listing: 12 levels of two links each to the next level listed
    # one 3-byte file as 4096 members (16 levels: 65,536, a minute of the event loop).
    base = site.root / "curated/ds"
    for level in range(12):
        (base / f"n{level}").mkdir()
        (base / f"n{level}" / "a").symlink_to(f"../n{level + 1}")
        (base / f"n{level}" / "b").symlink_to(f"../n{level + 1}")
    (base / "n12").mkdir()
    (base / "n12/f.bin").write_bytes(b"abc")
    assert _refused(site, "curated/ds/n0") == (
        "curated/ds/n0/a and curated/ds/n0/b are one folder (reached twice through links): "
        "send one of them, or replace a link by a copy")
    # The common `current -> v3` beside v3: listed twice, the receiver got two copies.
    (site.root / "curated/rel/v3").mkdir(parents=True)
    (site.root / "curated/rel/v3/model.bin").write_bytes(b"weights")
    (site.root / "curated/rel/current").symlink_to("v3")
    assert _refused(site, "curated/rel") == (
        "curated/rel/current and curated/rel/v3 are one folder (reached twice through links): "
        "send one of them, or replace a link by a copy")
    assert site.list_source("curated/rel/current") == ("folder", [("model.bin", 7)])


def test_a_link_to_a_subfolder_in_raw_is_refused(site: LocalStorage) -> None:
    (site.root / "raw/secrets").mkdir(parents=True)
    (site.root / "raw/secrets/key.bin").write_bytes(b"secret")
    (site.root / "curated/ds/hidden").symlink_to("../../raw/secrets")
    with pytest.raises(PolicyViolation, match="into raw/"):
        site.list_source("curated/ds")


def test_a_subfolder_it_may_not_read_fails_the_listing_instead_of_being_left_out(
    site: LocalStorage,
) -> None:
    sub = site.root / "curated/ds/sub"
    sub.mkdir()
    (sub / "inner.bin").write_bytes(b"inner")
    sub.chmod(0)
    try:
        with _permissions_apply():
            message = _refused(site, "curated/ds")
            top = site.root / "curated/shut"
            top.mkdir(mode=0)
            top_message = _refused(site, "curated/shut")
    finally:
        sub.chmod(0o755)
    assert message == "listing curated/ds/sub failed: Permission denied"
    assert top_message == "listing curated/shut failed: Permission denied"  # not "empty"


def test_opening_a_fifo_to_send_it_refuses_at_once_instead_of_waiting_for_a_writer(
    site: LocalStorage,
) -> None:
    """The listing refuses a FIFO; one put in a file's place after it was listed is refused
    when it is opened, not read: opening it waited for a writer, for ever, in a bulk thread
    (a job that never ended, and a daemon that never stopped)."""
    os.mkfifo(site.root / "curated/later")
    outcome: list[BaseException | object] = []

    def open_it() -> None:
        try:
            outcome.append(site.open_source("curated/later"))
        except BaseException as exc:  # noqa: BLE001 - the outcome is the assertion's
            outcome.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(60)  # a hang guard: the open returns at once or never
    if opener.is_alive():
        fd = os.open(site.root / "curated/later", os.O_WRONLY)  # lets the open return
        os.close(fd)
        opener.join()
        pytest.fail("opening a FIFO to send it waited for a writer")
    [result] = outcome
    assert isinstance(result, StorageError), result
    assert str(result) == (
        "curated/later is a FIFO (named pipe): only regular files and folders are sent")


@pytest.mark.parametrize("backend", ["local", "fsspec-file"])
def test_a_member_whose_name_is_not_utf8_is_refused_naming_it_escaped(
    tmp_path: Path, backend: str
) -> None:
    """Names travel as JSON (manifests, requests, logs): one that is not UTF-8 text used to
    reach the open request's encoder, whose error ended the daemon (and, the job being
    journaled, ended it again at each start)."""
    ds = tmp_path / "data" / "curated" / "ds"
    (ds / "sub").mkdir(parents=True)
    (ds / "ok.bin").write_bytes(b"ok")
    with open(os.fsencode(ds / "sub") + b"/bad\xffname", "wb") as bad:
        bad.write(b"bytes")
    storage: SiteStorage = (
        LocalStorage(tmp_path / "data") if backend == "local"
        else FsspecStorage(f"file://{tmp_path / 'data'}", {}, tmp_path / "state"))
    with pytest.raises(StorageError) as refused:
        storage.list_source("curated/ds")
    assert str(refused.value) == (
        "curated/ds/sub/bad\\xffname: the name is not UTF-8, which transferd cannot carry: "
        "rename it")
    json.dumps(refused.value.to_json())  # the error itself can be carried
