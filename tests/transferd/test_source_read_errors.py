"""How a source's read failure becomes the job's error (`storage.source_read_error`), as the
object store's reads are mapped (`objectstore.ObjectSource._read_error`): gone is a changed
source, a refusal that asking again will not change fails the job, the rest is transient."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from transferd.errors import IntegrityError, StorageError
from transferd.site.storage import FsspecStorage, source_read_error


def _http(status: int) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL("http://127.0.0.1/x"), "GET",
                               CIMultiDictProxy(CIMultiDict()), URL("http://127.0.0.1/x"))
    return aiohttp.ClientResponseError(info, (), status=status, message="refused")


@pytest.mark.parametrize(
    ("exc", "kind", "transient"),
    [
        (FileNotFoundError(errno.ENOENT, "gone"), IntegrityError, False),
        (_http(404), IntegrityError, False),
        (_http(412), IntegrityError, False),
        (_http(503), StorageError, True),
        (_http(429), StorageError, True),
        (_http(403), StorageError, False),
        (OSError(errno.EIO, "Input/output error"), StorageError, True),
        (TimeoutError("timed out"), StorageError, True),
        (PermissionError(errno.EACCES, "denied"), StorageError, False),
        (IsADirectoryError(errno.EISDIR, "a folder"), StorageError, False),
        (aiohttp.ServerDisconnectedError(), StorageError, True),
        (RuntimeError("a bug"), StorageError, False),
    ],
    ids=["enoent", "404", "412", "503", "429", "403", "eio", "timeout", "eacces", "eisdir",
         "disconnected", "foreign"],
)
def test_a_read_failure_maps_to_the_jobs_error(
    exc: Exception, kind: type[Exception], transient: bool
) -> None:
    err = source_read_error("reading", "curated/x.bin", exc)
    assert type(err) is kind
    assert err.transient is transient
    assert err.fields["side"] == "source"
    assert err.fields["path"] == "curated/x.bin"
    if kind is IntegrityError:
        assert "changed while being sent" in err.message


def test_fsspec_source_rewritten_cut_short_or_removed_is_changed(tmp_path: Path) -> None:
    storage = FsspecStorage(f"memory://reads-{uuid.uuid4().hex}/data", {}, tmp_path / "state")
    storage.fs.pipe_file(storage.path("curated/x.bin"), b"a" * 100)
    source = storage.open_source("curated/x.bin")
    assert not source.changed()
    storage.fs.pipe_file(storage.path("curated/x.bin"), b"b" * 60)
    assert source.changed()
    with pytest.raises(IntegrityError, match="changed while being sent"):
        source.read(50, 50)  # the span now ends at 60
    storage.fs.rm(storage.path("curated/x.bin"))
    with pytest.raises(IntegrityError, match="no longer there"):
        source.read(0, 10)
    with pytest.raises(IntegrityError, match="no longer there"):
        source.changed()
