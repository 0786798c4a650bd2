"""What a storage failure means for a job: one classifier for every backend (local files,
fsspec URLs, object stores) and both sides (a job's source, a receiver's destination).

A failure is keyed on the HTTP status it carries (botocore's ClientError, aiohttp's, urllib's,
gcsfs's, azure's, requests'; also when it is the cause of the OSError s3fs raises), else on
its errno, else on the library that raised it:

- gone (404, 410, 412, 416; ENOENT, ESTALE): on the source side the "changed" IntegrityError
  (the job fails, nothing is committed, a later job sends what is there); on the destination
  side a StorageError that is not transient;
- refused (401, 403 and any other 4xx; EACCES, EPERM, EINVAL, ...; a library's own
  non-network kind such as botocore's NoCredentialsError): a StorageError that is not
  transient (asking again will not change the answer);
- transient (408, 409, 425, 429, 5xx; EIO and any other errno, an OSError with none; a
  network library's kind: no answer, a reset, a body cut short): a transient StorageError
  (the job is tried again later);
- anything else (a KeyError, a backend's bug): a StorageError that is not transient, marked
  `unclassified` with its type (the sender gives such a job one more attempt:
  `net.sender._from_source`).

Every error carries `path` and `side` ("source": no route is marked down for it).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from transferd.errors import IntegrityError, StorageError, TransferdError

__all__ = [
    "Side",
    "http_status",
    "source_changed_error",
    "storage_failure",
    "storage_failures",
]

Side = Literal["source", "destination"]

# 416: a range past the end of an object that was longer when it was opened.
_GONE_STATUSES = frozenset({404, 410, 412, 416})
# 409: S3's OperationAborted ("a conflicting operation is in progress; try again"); 425 Too Early.
_TRANSIENT_4XX = frozenset({408, 409, 425, 429})
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESTALE})
_REFUSED_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG,
     errno.ELOOP, errno.EROFS, errno.ENOSYS, errno.ENOSPC, errno.EDQUOT,
     getattr(errno, "EREMCHG", errno.EINVAL)}  # s3fs: a redirect (the bucket is elsewhere)
)  # fmt: skip
# Libraries whose own kinds (those with no status and no errno) all mean the remote end, or the
# way to it, failed: no answer, a reset, a timeout, a body cut short.
_NETWORK_MODULES = frozenset(
    {"aiohttp", "urllib3", "requests", "http", "ssl", "socket", "paramiko", "h11", "httpcore",
     "httpx", "aiobotocore"}
)  # fmt: skip
# botocore's kinds of the same (its others: credentials, parameters, ... are refusals).
_BOTOCORE_NETWORK = frozenset({"HTTPClientError", "ConnectionError", "IncompleteReadError"})
_CAUSES_FOLLOWED = 4


def _own_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        meta = response.get("ResponseMetadata")
        status = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
        return status if _is_status(status) else None
    # aiohttp (status), azure-core (status_code), urllib and gcsfs (code), requests (its
    # response's); asked in this order, and no further than the first that is one (aiohttp
    # warns on `code`).
    for owner, name in ((exc, "status"), (exc, "status_code"), (exc, "code"),
                        (response, "status_code")):
        status = getattr(owner, name, None)
        if _is_status(status):
            return int(status)  # type: ignore[arg-type]
    return None


def _is_status(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600


def http_status(exc: BaseException) -> int | None:
    """The HTTP status `exc` answers with, or that of the error it was raised from (s3fs
    raises its OSError `from` botocore's ClientError); None for a failure with no answer."""
    seen: BaseException | None = exc
    for _ in range(_CAUSES_FOLLOWED):
        if seen is None:
            return None
        status = _own_status(seen)
        if status is not None:
            return status
        seen = seen.__cause__
    return None


def source_changed_error(path: str, why: object) -> IntegrityError:
    """A source removed, replaced or cut short while it was being sent: the job fails (the
    sender's usual "changed" outcome), nothing is committed; a later job sends what is there."""
    return IntegrityError(
        f"source file changed while being sent: {path} {why}", path=path, side="source"
    )


def _network_kind(exc: BaseException) -> bool | None:
    """True for a network library's kind of "no answer", False for another kind of a library
    we know (a refusal), None for a kind nobody here knows."""
    for cls in type(exc).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "botocore" and cls.__name__ in _BOTOCORE_NETWORK:
            return True
        if root in _NETWORK_MODULES:
            return True
    if type(exc).__module__.split(".")[0] in ("botocore", "s3fs", "fsspec", "gcsfs", "adlfs"):
        return False
    return None


def storage_failure(
    action: str, path: str, exc: BaseException, *, side: Side
) -> TransferdError:
    """`exc`, raised while `action` (reading, listing, ...) `path`, as the error a job or an
    upload reports (the module docstring has the table). A TransferdError passes unchanged."""
    if isinstance(exc, TransferdError):
        return exc
    status = http_status(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    unclassified: str | None = None
    if status is not None:
        gone = status in _GONE_STATUSES
        transient = status in _TRANSIENT_4XX or status >= 500
    elif isinstance(exc, OSError):
        gone = isinstance(exc, FileNotFoundError) or code in _GONE_ERRNOS
        transient = code not in _REFUSED_ERRNOS and not isinstance(exc, PermissionError)
    else:
        gone = False
        network = _network_kind(exc)
        transient = bool(network)
        if network is None:
            unclassified = f"{type(exc).__module__}.{type(exc).__qualname__}"
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    if status is not None and str(status) not in reason:
        reason = f"{reason} (HTTP {status})"
    if gone:
        why = {412: "is no longer the version opened", 416: "is shorter than when opened"}.get(
            status or 0, "is no longer there")
        if side == "source":
            return source_changed_error(path, f"{why} ({reason})")
        transient, reason = False, f"{why[3:]} ({reason})"
    elif code in (errno.ENOSPC, errno.EDQUOT) and side == "destination":
        reason = "no space left on the receiver's storage"
    elif unclassified is not None:
        reason = f"{type(exc).__name__}: {reason}"
    fields: dict[str, object] = {"path": path, "side": side}
    if code is not None:
        fields["errno"] = code
    if status is not None:
        fields["status"] = status
    if unclassified is not None:
        fields["unclassified"] = unclassified
    return StorageError(f"{action} {path} failed: {reason}", transient=transient, **fields)


@contextmanager
def storage_failures(action: str, path: str, *, side: Side) -> Iterator[None]:
    """Whatever a storage call inside the block raises leaves it as `storage_failure` says
    (a backend's network library raises its own kinds, not only OSError)."""
    try:
        yield
    except TransferdError:
        raise
    except Exception as exc:
        raise storage_failure(action, path, exc, side=side) from exc
