"""Fixtures shared across the tests: one headless Chromium for the report tests (skipped, with
the reason, where Debian's `chromium` is not installed) and the folder screenshots are kept in;
a real S3 endpoint (moto's server) for the object-store tests; the client settings cache of
every CLI and daemon the tests start in a temporary folder, not the user's; and the `netns`
marker: a test that builds the harness's network-namespace lab is skipped, with the reason,
where this machine cannot build one (not root, iproute2's ip or tc missing, no namespaces, no
impairment backend)."""

from __future__ import annotations

import functools
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tests.browser import Chromium, find_chromium
from transferd.testing import MotoS3Server

if TYPE_CHECKING:
    from benchmarks.backends import BackendChoice

REPO = Path(__file__).resolve().parents[1]

# Hypothesis's per-example deadline (200 ms) and its too_slow health check are timed
# assertions: an example that a slow or loaded machine stalls past them fails the test
# (`test_all_three_agree_on_any_string`: "took 299.25ms, which exceeds the deadline" with the
# suite on one loaded core). Speed is the benchmarks' business, so every @given runs without
# them; a test's own @settings still sets its examples (and a suppress list of its own).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(scope="session", autouse=True)
def client_settings_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`transferd.client_settings` caches under $XDG_CACHE_HOME: the tests' own folder (the
    environment is inherited by the daemons and CLIs they start)."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@functools.cache
def _lab_backend() -> BackendChoice | str:
    """The impairment backend this machine's labs use, else why it cannot build one. Probed once
    per run (a throwaway namespace), and only when a `netns` test is about to run."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    # Imported here: only a run with a `netns` test loads the benchmark harness.
    from benchmarks.backends import probe_backend
    from benchmarks.errors import LabError

    try:
        return probe_backend()
    except LabError as exc:
        return str(exc)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        backend = _lab_backend()
        if isinstance(backend, str):
            pytest.skip(backend)


@pytest.fixture(scope="session")
def lab_backend() -> BackendChoice:
    """The backend of this machine's labs (for `netns` tests: the others never probe)."""
    backend = _lab_backend()
    if isinstance(backend, str):
        pytest.skip(backend)
    return backend


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium not found (apt-get install chromium; .ci/run does)")
    with Chromium(binary, tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where the browser tests leave their screenshots: $TEST_ARTIFACTS, else test-artifacts/
    in the checkout (ignored by git)."""
    path = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


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
