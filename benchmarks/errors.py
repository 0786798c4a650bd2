"""The benchmark harness's one error tree: bad scenario files, a lab that cannot be built, a tool
that cannot run. Errors carry structured fields; only the CLI turns them into text and exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from netplan.yamlpos import FieldIssue

__all__ = ["BenchError", "LabError", "ScenarioError", "ToolError"]


class BenchError(Exception):
    """Base of every error the harness raises on purpose."""


class ScenarioError(BenchError):
    """A scenario file or link spec is invalid; `issues` name each field and its YAML line."""

    def __init__(self, source: str, issues: Sequence[FieldIssue | str]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(f"{source}: " + "; ".join(str(i) for i in self.issues))


class LabError(BenchError):
    """Sites, links or the impairment backend could not be set up (or the link is not what the
    spec asked for, e.g. the TCP echo RTT is off)."""

    def __init__(self, message: str, *, command: Sequence[str] | None = None) -> None:
        self.command = list(command) if command else None
        super().__init__(message)


class ToolError(BenchError):
    """A compared tool failed or is missing; `reason` goes into the run's `error` field."""

    def __init__(self, tool: str, reason: str) -> None:
        self.tool = tool
        self.reason = reason
        super().__init__(f"{tool}: {reason}")
