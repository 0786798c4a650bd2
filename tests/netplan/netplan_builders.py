"""Small builders for topologies in tests (imported by the netplan tests, not collected)."""

from __future__ import annotations

from typing import Any

from netplan import Topology


def site(id: str, region: str, kind: str = "cloud", **gpus_and_prices: Any) -> dict[str, Any]:
    """site("aws", "us", h100=(64, 4.9)) -> a site with 64 H100s at $4.90/GPU-hour."""
    doc: dict[str, Any] = {"id": id, "kind": kind, "region": region}
    if gpus_and_prices:
        doc["gpus"] = {g: count for g, (count, _) in gpus_and_prices.items()}
        doc["gpu_hour_usd"] = {g: price for g, (_, price) in gpus_and_prices.items()}
    return doc


def link(a: str, b: str, gbps: float, rtt_ms: float, **extra: Any) -> dict[str, Any]:
    return {"between": [a, b], "bandwidth_gbps": gbps, "rtt_ms": rtt_ms, **extra}


def topology(**sections: Any) -> Topology:
    return Topology.model_validate({"name": "test", **sections})
