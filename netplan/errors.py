"""The planner's one error tree: everything netplan raises on purpose derives from NetplanError.

Errors carry structured fields (issues with field paths and lines, the workload and its binding
constraints); only the CLI turns them into text and exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from netplan.yamlpos import FieldIssue

__all__ = [
    "Infeasible",
    "InfeasiblePlan",
    "NetplanError",
    "PlanError",
    "TelemetryError",
    "TopologyError",
]


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


class TelemetryError(NetplanError):
    """Measurements could not be read (a daemon or Prometheus not answering, a bad document):
    `source` says from where."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


class PlanError(NetplanError):
    """A planning question cannot be answered as asked (e.g. an unknown site id)."""


class Infeasible(PlanError):
    """No option satisfies the constraints of one thing the plan must do: a workload (`kind`
    "workload", `workload` its id), a vector index ("vector index") or a sync rule or link
    ("sync"); `constraints` names the binding ones."""

    def __init__(self, workload: str, constraints: Sequence[str], kind: str = "workload") -> None:
        self.workload = workload
        self.kind = kind
        self.constraints: tuple[str, ...] = tuple(constraints)
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = list(self.constraints[:6])
        if len(self.constraints) > len(shown):
            shown.append(f"and {len(self.constraints) - len(shown)} more")
        return f"{self.kind} {self.workload} is infeasible: " + "; ".join(shown)


class InfeasiblePlan(Infeasible):
    """Several things are infeasible at once (what `--strict` and `netplan plan` report):
    `problems` lists each; the first is also this error's own `workload` and `constraints`."""

    def __init__(self, problems: Sequence[Infeasible]) -> None:
        self.problems: tuple[Infeasible, ...] = tuple(problems)
        first = self.problems[0]
        super().__init__(first.workload, first.constraints, first.kind)

    # A large estate can have a thousand: the first ones, then a count (--json has them all).
    SHOWN = 20

    def __str__(self) -> str:
        n = len(self.problems)
        lines = [f"{n} infeasible entr{'y' if n == 1 else 'ies'}:"]
        lines += [f"  - {p}" for p in self.problems[:self.SHOWN]]
        if n > self.SHOWN:
            lines.append(f"  and {n - self.SHOWN} more (netplan analyze --json lists them all "
                         "under `problems`)")
        return "\n".join(lines)
