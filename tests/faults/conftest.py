"""The fault-injection suite: each test counts its trials into one tally, printed at the end of
the run as the README's "Reliability" figures (and written as JSON to $TRANSFERD_FIGURES when
set). `pytest tests/faults` runs the short variants (CI); `pytest -m long tests/faults` the long
ones, with more seeds and trials."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import pytest


@dataclass
class Figure:
    good: int = 0
    total: int = 0


FIGURES: dict[str, Figure] = {}
# The README's order and wording: (figure, what counts as good).
ORDER = [
    ("kill -9 trials", "completed byte-exact"),
    ("corrupted chunk bodies", "detected"),
    ("corrupted control bodies", "detected"),
    ("attacks (forged, tampered, stale, unsigned, replayed)", "refused"),
    ("policy escapes (links into raw/ or out)", "refused"),
    ("reads while a folder or step is re-committed", "found it whole"),
    ("disk-full cases", "passed"),
    ("link flap, stall and drop cases", "passed"),
    ("fuzzed config and plan inputs", "answered cleanly"),
]

Tally = Callable[..., None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """`tally(figure, good)`: one trial of `figure`, good or not; `tally(figure, good=n,
    total=m)`: m trials of which n were good. A test still asserts its outcome; the tally is
    what the run prints. A test that fails never leaves a perfect figure behind: if it failed
    before counting, one bad trial of its module's FIGURE is counted; if after, one of its
    good trials is taken back."""
    counted: list[str] = []

    def record(figure: str, good: bool | int, total: int = 1) -> None:
        assert figure in dict(ORDER), figure
        fig = FIGURES.setdefault(figure, Figure())
        fig.total += total
        fig.good += int(good)
        counted.append(figure)

    yield record
    if request.node.stash.get(_FAILED, False):
        if counted:
            fig = FIGURES[counted[-1]]
            if fig.good == fig.total:
                fig.good -= 1
        else:
            figure = getattr(request.module, "FIGURE", None)
            if figure is not None:
                FIGURES.setdefault(figure, Figure()).total += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("Reliability figures (this run)")
    for figure, good in ORDER:
        fig = FIGURES.get(figure)
        if fig is not None:
            terminalreporter.write_line(f"{figure}: {good} {fig.good}/{fig.total}")
    out = os.environ.get("TRANSFERD_FIGURES")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({k: [v.good, v.total] for k, v in FIGURES.items()}, fh, indent=1)
