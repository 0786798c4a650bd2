"""`LocalClient`: a site's CLI to its own daemon over the local API's HTTP, signed as every
request between daemons is (HMAC with the site's own pair secret, `protocol.auth.local_signer`);
answers are parsed into their wire models (or by a function of the caller's) and errors rebuilt
into the package's own.

What `transferd send` runs, so kept light: `call` runs over the standard library's http.client
(no event loop, no asyncio, no aiohttp), and no pydantic: `send` asks for its jobs and reads
their answers with json (`job_ids`, `jobs_of`), without the models, whose import takes longer
than a small job. `acall` is the same request from a running event loop (aiohttp, imported on
first use). `net.local_client` re-exports these names beside the message calls.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

from transferd.errors import ProtocolError, TransportError

if TYPE_CHECKING:
    import aiohttp
    from pydantic import BaseModel

    from transferd.protocol.auth import LocalSigner

__all__ = [
    "ACTIVE_JOB_STATES",
    "JOB_STATES",
    "JobOutcome",
    "LocalClient",
    "LocalRequest",
    "job_ids",
    "jobs_of",
]

TIMEOUT_S = 120.0
A = TypeVar("A")


@dataclass(frozen=True)
class LocalRequest(Generic[A]):
    """One request of the local API and what its answer parses into: a wire model, or a
    function of the body (which raises ProtocolError for one it cannot read). A body is a
    wire model, JSON bytes (`json=True`) or raw bytes."""

    method: str
    path_qs: str
    answer: type[A] | Callable[[bytes], A]
    body: BaseModel | bytes | None = None
    accept: tuple[int, ...] = (200,)
    json: bool = False

    def answer_of(self, status: int, reply: bytes, daemon: str) -> A:
        if status not in self.accept:
            from transferd.protocol.wire import check_reply

            check_reply(status, reply, self.accept, daemon)
        if hasattr(self.answer, "model_validate_json"):
            from transferd.protocol.wire import parse_body

            return cast(A, parse_body(cast(Any, self.answer), reply))
        return cast(Callable[[bytes], A], self.answer)(reply)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json(reply: bytes) -> Any:
    """`reply` parsed as strict JSON: NaN and Infinity refused (ValueError), and a nesting
    too deep to parse (RecursionError) as any bad JSON."""
    try:
        return json.loads(reply, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def job_ids(reply: bytes) -> list[str]:
    """A SendAnswer's job ids, read with json (`transferd send` asks before it has built the
    models); a ProtocolError for anything else."""
    try:
        ids = _json(reply)["jobs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError("invalid SendAnswer: jobs: missing or not JSON") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError("invalid SendAnswer: jobs: must be a list of job ids")
    return ids


# protocol.local_api.JobState's values (a test keeps them equal), the first three active.
JOB_STATES = ("queued", "running", "waiting", "committed", "failed")
ACTIVE_JOB_STATES = frozenset(JOB_STATES[:3])


@dataclass(frozen=True)
class JobOutcome:
    """A job as `transferd send` reads it from a jobs answer: the fields of
    `protocol.local_api.Job` that the CLI prints, by the same names, read with json. The
    daemon answers with the JobsAnswer model's dump; `send --wait` reads it without building
    the models (pydantic and the wire models: ~90 ms of imports and CPU per command, longer
    than a small job takes). The fields it does not read are ignored; of those it reads, one
    missing (without a default in the model) or not of its JSON type is a ProtocolError
    naming it. The types are strict, stricter than the model's parse: a count must be a JSON
    integer (not a float, a string or a boolean), a text a string; only a time may be an
    integer or a float."""

    id: str
    path: str
    dest: str
    state: str  # one of JOB_STATES
    error: str | None
    error_kind: str | None
    bytes_logical: int
    bytes_done: int
    bytes_on_wire: int
    chunks: int
    chunks_skipped: int
    retries: int
    note: str | None = None
    next_attempt_at: float | None = None
    attempts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_JOB_STATES


# Per field of JobOutcome: the JSON types it takes (None: null allowed); a missing field with
# a default (JobOutcome's, the same as Job's: note, next_attempt_at, attempts) takes it.
_TEXT, _COUNT = (str,), (int,)
_JOB_FIELDS: dict[str, tuple[type | None, ...]] = {
    "id": _TEXT, "path": _TEXT, "dest": _TEXT, "state": _TEXT,
    "error": (str, None), "error_kind": (str, None),
    "bytes_logical": _COUNT, "bytes_done": _COUNT, "bytes_on_wire": _COUNT, "chunks": _COUNT,
    "chunks_skipped": _COUNT, "retries": _COUNT,
    "note": (str, None), "next_attempt_at": (float, int, None), "attempts": _COUNT,
}
_JOB_DEFAULTS = {f.name: f.default for f in fields(JobOutcome) if f.default is not MISSING}


def _job_outcome(i: int, raw: object) -> JobOutcome:
    if not isinstance(raw, dict):
        raise ProtocolError(f"invalid JobsAnswer: jobs.{i}: must be an object")
    values: dict[str, Any] = {}
    for name, kinds in _JOB_FIELDS.items():
        if name not in raw and name not in _JOB_DEFAULTS:
            raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.{name}: field required")
        value = raw.get(name, _JOB_DEFAULTS.get(name))
        ok = (value is None and None in kinds) or (
            value is not None and not isinstance(value, bool)
            and isinstance(value, tuple(k for k in kinds if k is not None)))
        if not ok:
            raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.{name}: {value!r}")
        values[name] = value
    if values["state"] not in JOB_STATES:
        raise ProtocolError(f"invalid JobsAnswer: jobs.{i}.state: {values['state']!r}")
    return JobOutcome(**values)


def jobs_of(reply: bytes) -> list[JobOutcome]:
    """A JobsAnswer's jobs, read with json (see JobOutcome); a ProtocolError for anything
    else."""
    try:
        jobs = _json(reply)["jobs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError("invalid JobsAnswer: jobs: missing or not JSON") from exc
    if not isinstance(jobs, list):
        raise ProtocolError("invalid JobsAnswer: jobs: must be a list")
    return [_job_outcome(i, raw) for i, raw in enumerate(jobs)]


class LocalClient:
    def __init__(
        self, url: str, sign: LocalSigner | None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ProtocolError(f"no host in {url!r}")
        self.url = url.rstrip("/")
        self._sign = sign
        self._ssl = ssl_context
        self._parts = parts
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _prepared(self, request: LocalRequest[Any]) -> tuple[bytes | None, dict[str, str]]:
        body = request.body
        if body is not None and not isinstance(body, bytes):
            from transferd.protocol.wire import to_body

            raw: bytes | None = to_body(body)
            headers = {"Content-Type": "application/json"}
        elif request.json:
            raw, headers = body, {"Content-Type": "application/json"}
        else:
            raw, headers = body, {"Content-Type": "application/octet-stream"} if body else {}
        if self._sign is not None:
            headers.update(self._sign(request.method, request.path_qs, raw))
        return raw, headers

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._parts.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    host, port, timeout=TIMEOUT_S, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        return self._conn

    def call(self, request: LocalRequest[A]) -> A:
        """Send one signed request and parse its answer; the daemon's error (ProtocolError,
        AuthError, ...) otherwise; TransportError when it cannot be reached."""
        raw, headers = self._prepared(request)
        conn = self._connection()
        try:
            conn.request(request.method, request.path_qs, body=raw, headers=headers)
            resp = conn.getresponse()
            reply, status = resp.read(), resp.status
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # the next call reconnects
            reason = f"{self.url}: {type(exc).__name__}: {exc}"
            raise TransportError(reason, peer=self.url, local_daemon=self.url) from exc
        return request.answer_of(status, reply, self.url)

    async def acall(
        self, request: LocalRequest[A], session: aiohttp.ClientSession | None = None
    ) -> A:
        """`call` from a running event loop, on `session` (or one opened for this call)."""
        import aiohttp
        from yarl import URL

        raw, headers = self._prepared(request)
        client = session or aiohttp.ClientSession()
        try:
            async with client.request(
                request.method,
                URL(self.url + request.path_qs, encoded=True),
                data=raw,
                headers=headers,
                ssl=self._ssl if self._ssl is not None else True,
            ) as resp:
                reply, status = await resp.read(), resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            where = f"{request.method} {self.url}{request.path_qs}"
            raise TransportError(f"{where}: {exc!r}", local_daemon=self.url) from exc
        finally:
            if session is None:
                await client.close()
        return request.answer_of(status, reply, self.url)
