"""The planner's one error tree: everything netplan raises on purpose derives from NetplanError.

Errors carry structured fields (issues with field paths and lines, the workload and its binding
constraints); only the CLI turns them into text and exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from netplan.yamlpos import FieldIssue

__all__ = ["Infeasible", "NetplanError", "PlanError", "TopologyError"]


class NetplanError(Exception):
    """Base of every error netplan raises on purpose."""


class TopologyError(NetplanError):
    """The topology document is not valid: one `FieldIssue` (path, message, line) per problem."""

    def __init__(self, issues: Sequence[FieldIssue], source: str | None = None) -> None:
        self.issues: tuple[FieldIssue, ...] = tuple(issues)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + _issue_text(issue) for issue in self.issues)


def _issue_text(issue: FieldIssue) -> str:
    if issue.path:
        return str(issue)
    # A problem with the document as a whole has no field path to name.
    return issue.message + (f" (line {issue.line})" if issue.line is not None else "")


class PlanError(NetplanError):
    """A planning question cannot be answered as asked (e.g. an unknown site id)."""


class Infeasible(PlanError):
    """No option satisfies the constraints of `workload`; `constraints` names the binding ones."""

    def __init__(self, workload: str, constraints: Sequence[str]) -> None:
        self.workload = workload
        self.constraints: tuple[str, ...] = tuple(constraints)
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = list(self.constraints[:6])
        if len(self.constraints) > len(shown):
            shown.append(f"and {len(self.constraints) - len(shown)} more")
        return f"workload {self.workload} is infeasible: " + "; ".join(shown)
