"""`transferd send` reads its jobs answers without the pydantic models (`jobs_of`): what it
reads must be what the daemon's JobsAnswer model says, and a bad answer is refused by name."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from enum import StrEnum

import pytest

from netplan.ids import TrafficClass
from transferd.errors import ProtocolError
from transferd.net import local_http
from transferd.net.local_http import ACTIVE_JOB_STATES, JOB_STATES, JobOutcome, job_ids, jobs_of
from transferd.protocol.local_api import Job, JobsAnswer, JobState
from transferd.protocol.wire import to_body


def _job(**changes: object) -> Job:
    fields: dict[str, object] = {
        "id": "j1", "path": "curated/d", "dest": "B", "traffic_class": TrafficClass.SYNC,
        "state": JobState.WAITING, "error": None, "error_kind": None, "created_at": 1.0,
        "started_at": 2.0, "finished_at": None, "bytes_logical": 5000, "bytes_done": 1200,
        "bytes_on_wire": 1300, "chunks": 3, "chunks_skipped": 1, "chunks_sent": 2,
        "retries": 4, "integrity_failures": 0, "note": "B unreachable",
        "next_attempt_at": 17.5, "attempts": 2,
    }
    return Job.model_validate({**fields, **changes})


def test_the_outcome_reads_what_the_daemons_model_wrote() -> None:
    jobs = [_job(), _job(id="j2", state=JobState.FAILED, error="disk full",
                         error_kind="storage", note=None, next_attempt_at=None, attempts=0)]
    read = jobs_of(to_body(JobsAnswer(jobs=jobs)))
    names = [f.name for f in dataclasses.fields(JobOutcome)]
    assert set(names) <= set(Job.model_fields)
    for model, outcome in zip(jobs, read, strict=True):
        assert {n: getattr(outcome, n) for n in names} == {n: getattr(model, n) for n in names}
        assert outcome.active == model.state.active
    assert set(JOB_STATES) == {s.value for s in JobState}
    assert ACTIVE_JOB_STATES == {s.value for s in JobState if s.active}


def _kinds(annotation: object) -> set[object]:
    """The Python types a JSON value of `annotation` reads as (None: null): a str enum is
    text, a float may be written as an integer."""
    args = (typing.get_args(annotation)
            if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,))
    kinds: set[object] = set()
    for arg in args:
        if arg is type(None):
            kinds.add(None)
        elif isinstance(arg, type) and issubclass(arg, StrEnum):
            kinds.add(str)
        elif arg is float:
            kinds |= {float, int}
        else:
            kinds.add(arg)
    return kinds


def test_the_fields_read_and_their_types_and_defaults_are_the_models() -> None:
    """Derived from the model, so a change there (a field made nullable, retyped, given or
    losing a default) fails here until the narrow reader follows it."""
    hints = typing.get_type_hints(JobOutcome)
    names = [f.name for f in dataclasses.fields(JobOutcome)]
    assert list(local_http._JOB_FIELDS) == names
    for name in names:
        model = Job.model_fields[name]
        assert _kinds(hints[name]) == _kinds(model.annotation), name
        assert set(local_http._JOB_FIELDS[name]) == _kinds(model.annotation), name
    defaults = {n: Job.model_fields[n].default for n in names
                if not Job.model_fields[n].is_required()}
    assert local_http._JOB_DEFAULTS == defaults
    assert {f.name: f.default for f in dataclasses.fields(JobOutcome)
            if f.default is not dataclasses.MISSING} == defaults


def test_fields_with_a_default_in_the_model_may_be_missing() -> None:
    raw = json.loads(to_body(JobsAnswer(jobs=[_job(state=JobState.COMMITTED)])))
    for name in ("note", "next_attempt_at", "attempts"):
        del raw["jobs"][0][name]
    [job] = jobs_of(json.dumps(raw).encode())
    assert (job.note, job.next_attempt_at, job.attempts, job.active) == (None, None, 0, False)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bytes_done": None}, "jobs.0.bytes_done"),
        ({"retries": "4"}, "jobs.0.retries"),
        ({"chunks": True}, "jobs.0.chunks"),
        ({"state": "lost"}, "jobs.0.state"),
        ({"dest": None}, "jobs.0.dest"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_protocol_error_naming_it(
    change: dict[str, object], named: str
) -> None:
    raw = json.loads(to_body(JobsAnswer(jobs=[_job()])))
    raw["jobs"][0].update(change)
    with pytest.raises(ProtocolError, match=named.replace(".", r"\.")):
        jobs_of(json.dumps(raw).encode())


_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("reply", [b"", b"[]", b'{"jobs": 3}', b'{"jobs": [1]}',
                                   b'{"jobs": [{"id": "x"}]}', b'{"jobs": ' + _DEEP + b"}",
                                   _DEEP, b"NaN", b'{"jobs": [NaN]}'])
def test_an_answer_that_is_not_jobs_is_a_protocol_error(reply: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid JobsAnswer"):
        jobs_of(reply)


@pytest.mark.parametrize("reply", [b'{"jobs": ' + _DEEP + b"}", _DEEP, b'{"jobs": [Infinity]}'])
def test_a_send_answer_nested_too_deep_or_not_json_is_a_protocol_error(reply: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid SendAnswer"):
        job_ids(reply)


def test_a_non_finite_time_is_refused() -> None:
    raw = to_body(JobsAnswer(jobs=[_job()])).replace(b"17.5", b"NaN")
    with pytest.raises(ProtocolError, match="not JSON"):
        jobs_of(raw)


def test_the_send_path_builds_no_model_and_starts_no_event_loop() -> None:
    # What `send --wait` imports: no pydantic (~90 ms of imports per command), no asyncio
    # (~15 ms; the message socket's client needs it, the HTTP client does not).
    code = ("import json, sys; from transferd.net.local_http import jobs_of; "
            "import transferd.cli, transferd.client_settings, transferd.site.keys, "
            "transferd.site.tls, transferd.protocol.auth, transferd.protocol.backoff; "
            "jobs_of(b'{\"jobs\": []}'); "
            "print(json.dumps(sorted({'pydantic', 'asyncio'} & set(sys.modules))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
