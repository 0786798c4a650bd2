"""One classifier for every storage failure (`site.failures.storage_failure`), whatever raised
it (botocore, s3fs, fsspec, aiohttp, urllib3, the OS) and on either side: gone is a changed
source (a destination's: a StorageError that is not transient), a refusal that asking again will
not change is a StorageError that is not transient, the store's 5xx / 429 / 408 and the network
failing are transient, and a kind nobody knows is marked unclassified. The object store's span
GETs (`objectstore.ObjectSource._read_error`) classify the same way."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import aiohttp
import botocore.exceptions
import fsspec.exceptions
import pytest
import urllib3.exceptions
from multidict import CIMultiDict, CIMultiDictProxy
from s3fs.errors import translate_boto_error
from yarl import URL

from transferd.errors import IntegrityError, StorageError
from transferd.site import objectstore
from transferd.site.failures import Side, http_status, storage_failure
from transferd.site.storage import FsspecStorage


def _http(status: int) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL("http://127.0.0.1/x"), "GET",
                               CIMultiDictProxy(CIMultiDict()), URL("http://127.0.0.1/x"))
    return aiohttp.ClientResponseError(info, (), status=status, message="refused")


def _boto(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def _s3fs(status: int, code: str) -> BaseException:
    """What s3fs raises for the store's answer: an OSError kind, raised from botocore's."""
    return translate_boto_error(_boto(status, code))


GONE, REFUSED, TRANSIENT, UNKNOWN = "gone", "refused", "transient", "unclassified"
_TABLE = {
    # botocore's ClientError (our own S3 client's GETs and listings)
    "boto-404": (_boto(404, "NoSuchKey"), GONE),
    "boto-410": (_boto(410, "Gone"), GONE),
    "boto-412": (_boto(412, "PreconditionFailed"), GONE),
    "boto-416": (_boto(416, "InvalidRange"), GONE),
    "boto-401": (_boto(401, "Unauthorized"), REFUSED),
    "boto-403": (_boto(403, "AccessDenied"), REFUSED),
    "boto-400": (_boto(400, "InvalidArgument"), REFUSED),
    "boto-408": (_boto(408, "RequestTimeout"), TRANSIENT),
    "boto-429": (_boto(429, "TooManyRequests"), TRANSIENT),
    "boto-500": (_boto(500, "InternalError"), TRANSIENT),
    "boto-503": (_boto(503, "SlowDown"), TRANSIENT),
    # s3fs's translations of the same answers (the status found on their cause)
    "s3fs-404": (_s3fs(404, "NoSuchKey"), GONE),
    "s3fs-412": (_s3fs(412, "PreconditionFailed"), GONE),  # an OSError(EINVAL) itself
    "s3fs-403": (_s3fs(403, "AccessDenied"), REFUSED),
    "s3fs-503": (_s3fs(503, "SlowDown"), TRANSIENT),  # an OSError(EBUSY) itself
    "s3fs-500": (_s3fs(500, "InternalError"), TRANSIENT),
    # fsspec backends and the OS: the errno decides
    "enoent": (FileNotFoundError(errno.ENOENT, "gone"), GONE),
    "estale": (OSError(errno.ESTALE, "Stale file handle"), GONE),
    "eacces": (PermissionError(errno.EACCES, "denied"), REFUSED),
    "permission-no-errno": (PermissionError("denied"), REFUSED),
    "eisdir": (IsADirectoryError(errno.EISDIR, "a folder"), REFUSED),
    "einval": (OSError(errno.EINVAL, "Invalid argument"), REFUSED),
    "eio": (OSError(errno.EIO, "Input/output error"), TRANSIENT),
    "oserror-no-errno": (OSError("the store sent 10 of 20 bytes"), TRANSIENT),
    "timeout": (TimeoutError("timed out"), TRANSIENT),
    "fsspec-timeout": (fsspec.exceptions.FSTimeoutError(), TRANSIENT),
    # aiohttp (fsspec's http backend), urllib3 and botocore's network kinds
    "aiohttp-404": (_http(404), GONE),
    "aiohttp-403": (_http(403), REFUSED),
    "aiohttp-503": (_http(503), TRANSIENT),
    "aiohttp-429": (_http(429), TRANSIENT),
    "aiohttp-disconnected": (aiohttp.ServerDisconnectedError(), TRANSIENT),
    "aiohttp-payload": (aiohttp.ClientPayloadError("cut short"), TRANSIENT),
    "aiohttp-oserror": (aiohttp.ClientOSError(errno.ECONNRESET, "reset"), TRANSIENT),
    "urllib3-protocol": (urllib3.exceptions.ProtocolError("Connection aborted."), TRANSIENT),
    "boto-endpoint": (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
                      TRANSIENT),
    "boto-read-timeout": (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
                          TRANSIENT),
    "boto-closed": (botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"),
                    TRANSIENT),
    "boto-streaming": (botocore.exceptions.ResponseStreamingError(error="reset"), TRANSIENT),
    "boto-no-credentials": (botocore.exceptions.NoCredentialsError(), REFUSED),
    # nobody's kind: a backend's bug
    "runtime-error": (RuntimeError("a bug"), UNKNOWN),
    "key-error": (KeyError("a bug"), UNKNOWN),
}


def _check(err: Exception, outcome: str, side: str) -> None:
    assert err.fields["side"] == side  # type: ignore[attr-defined]
    assert err.fields["path"] == "curated/x.bin"  # type: ignore[attr-defined]
    if outcome == GONE and side == "source":
        assert type(err) is IntegrityError
        assert "changed while being sent" in str(err)
        assert not err.transient
        return
    assert type(err) is StorageError
    assert err.transient is (outcome == TRANSIENT)
    assert ("unclassified" in err.fields) is (outcome == UNKNOWN)
    if outcome == GONE:
        assert any(why in str(err) for why in ("no longer there", "no longer the", "shorter"))


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize(("exc", "outcome"), list(_TABLE.values()), ids=list(_TABLE))
def test_a_storage_failure_is_classified_by_its_status_errno_or_library(
    exc: Exception, outcome: str, side: Side
) -> None:
    _check(storage_failure("reading", "curated/x.bin", exc, side=side), outcome, side)


@pytest.mark.parametrize(("exc", "outcome"), list(_TABLE.values()), ids=list(_TABLE))
def test_the_object_stores_span_gets_classify_the_same_way(exc: Exception, outcome: str) -> None:
    source = objectstore.ObjectSource(None, "curated/x.bin", listed=(10, '"e"'))
    _check(source._read_error(exc), outcome, "source")


def test_the_status_is_read_from_every_shape_and_never_from_a_text() -> None:
    assert http_status(_boto(403, "AccessDenied")) == 403
    assert http_status(_s3fs(503, "SlowDown")) == 503
    assert http_status(_http(410)) == 410
    assert http_status(OSError("the store sent 4120000 of 67108864 bytes")) is None
    assert http_status(OSError(errno.EIO, "412")) is None


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
