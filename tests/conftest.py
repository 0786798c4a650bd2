"""Fixtures shared by the report tests: one headless Chromium for the session (skipped, with the
reason, where Debian's `chromium` is not installed) and the folder screenshots are kept in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import Chromium, find_chromium

REPO = Path(__file__).resolve().parents[1]


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
