"""Fixtures shared by the unit and loopback tests: a real S3 endpoint (moto's server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from transferd.testing import MotoS3Server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Server]:
    """moto's S3 server on 127.0.0.1, once per test session; tests skip (with the reason) only
    when it cannot start."""
    server = MotoS3Server()
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"no S3 endpoint: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3Server) -> str:
    """A fresh, empty bucket on the session's S3 endpoint."""
    return moto_s3.create_bucket(f"transferd-{uuid.uuid4().hex[:12]}")
