"""`transferd send` reads its jobs answers without the pydantic models (`jobs_of`): what it
reads must be what the daemon's JobsAnswer model says, and a bad answer is refused by name."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from netplan.ids import TrafficClass
from transferd.errors import ProtocolError
from transferd.net.local_http import ACTIVE_JOB_STATES, JOB_STATES, JobOutcome, jobs_of
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


@pytest.mark.parametrize("reply", [b"", b"[]", b'{"jobs": 3}', b'{"jobs": [1]}',
                                   b'{"jobs": [{"id": "x"}]}'])
def test_an_answer_that_is_not_jobs_is_a_protocol_error(reply: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid JobsAnswer"):
        jobs_of(reply)


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
