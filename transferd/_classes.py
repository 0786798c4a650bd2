"""Traffic classes: the four kinds of traffic a daemon carries, each on its own connection pool.

control (have/want queries, manifests, commits) has strict priority; interactive (small objects with
deadlines) goes earliest-deadline-first; checkpoint and sync (bulk) share what is left by weight.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BULK_CLASSES", "TrafficClass"]


class TrafficClass(StrEnum):
    CONTROL = "control"
    INTERACTIVE = "interactive"
    CHECKPOINT = "checkpoint"
    SYNC = "sync"


BULK_CLASSES = (TrafficClass.CHECKPOINT, TrafficClass.SYNC)
