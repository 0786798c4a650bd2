"""Traffic classes: the vocabulary is the plan contract's (`netplan.plan`), defined once there."""

from __future__ import annotations

from netplan.plan import BULK_CLASSES, TrafficClass

__all__ = ["BULK_CLASSES", "TrafficClass"]
