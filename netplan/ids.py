"""The plan contract's vocabulary: traffic classes, tiers, and the rule for site ids and names.

Split from `netplan.plan` (which re-exports every name here) so that a reader needing only the
vocabulary, such as transferd's site config and the `transferd send` client, loads no plan
model: building those models is most of `netplan.plan`'s import time (issue 11, round 4).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field

__all__ = [
    "BULK_CLASSES",
    "NAME_PATTERN",
    "SITE_ID_PATTERN",
    "Name",
    "SiteId",
    "Tier",
    "TrafficClass",
    "check_name",
    "check_site_id",
]


class TrafficClass(StrEnum):
    """The four kinds of traffic a daemon carries, each on its own connection pool: `control`
    (have/want, manifests, commits) has strict priority, `interactive` (small objects with
    deadlines) goes earliest-deadline-first, the bulk classes share what is left by weight."""

    CONTROL = "control"
    INTERACTIVE = "interactive"
    CHECKPOINT = "checkpoint"
    SYNC = "sync"


BULK_CLASSES = (TrafficClass.CHECKPOINT, TrafficClass.SYNC)


class Tier(StrEnum):
    """Dataset tiers, and the top folder of every path under a site's data root. Raw data never
    leaves its site: the planner never plans it, and a daemon refuses to send it."""

    RAW = "raw"
    CURATED = "curated"
    APPROVED = "approved"


# Site ids name daemons, key files, HTTP headers and metric labels: one printable token that is
# also a safe file name. Names of datasets, workloads and indexes become path components of the
# plan (`curated/<dataset>/`, `checkpoints/<workload>/`), so the same alphabet, with more room.
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SITE_ID = re.compile(SITE_ID_PATTERN)
_NAME = re.compile(NAME_PATTERN)


def check_site_id(value: str) -> str:
    """`value` if it is a valid site id, else ValueError saying what the rule is. (fullmatch:
    the pattern's `$` also matches before a final newline, which let "A\n" through, a site
    whose key files were named with the newline.)"""
    if not _SITE_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a site id: 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (it names a transferd daemon, its key "
                         "files and its metric labels)")
    return value


def check_name(value: str) -> str:
    """`value` if it is a valid dataset, workload, index or region name, else ValueError."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid id: 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (ids become folder names in the plan)")
    return value


SiteId = Annotated[str, AfterValidator(check_site_id),
                   Field(json_schema_extra={"pattern": SITE_ID_PATTERN})]
Name = Annotated[str, AfterValidator(check_name),
                 Field(json_schema_extra={"pattern": NAME_PATTERN})]
