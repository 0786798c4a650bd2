"""Routes of a transfer and where its bytes may go, without I/O.

A route is the relays between the source and the destination (`via`, in order; empty: direct).
A job carries its routes with the share of chunks each should carry (the plan's `routes`, or a
manual `send --via`); the sender walks them in order and falls back along the list when one
fails, the direct path last (`fallback_order`).

Several routes at once (multipath) are dealt chunks by `net.routes.RouteDealer`.

Residency: a dataset may carry the regions it may be held in (`residency`); every site that
would hold any of its bytes (a relay, the destination) checks its own region before a byte is
written (`check_residency`), and says who it is in the refusal, so the sender can report which
hop refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transferd.errors import PolicyViolation

__all__ = [
    "Route",
    "check_residency",
    "open_query",
    "fallback_order",
    "route_label",
]


@dataclass(frozen=True)
class Route:
    """One path to the destination: relays in order (empty: direct) and its planned share."""

    via: tuple[str, ...] = ()
    share: float = 1.0

    @property
    def first_hop(self) -> str | None:
        return self.via[0] if self.via else None


def route_label(dest: str, via: Sequence[str]) -> str:
    """How a route reads in status and logs: `R1>R2>B`, or `B` for the direct path."""
    return ">".join([*via, dest])


def open_query(via: Sequence[str], traffic_class: str | None = None) -> str:
    """The query of an upload's opening at a relay: the relays after it (`via=R2,...`) and the
    job's traffic class (`class=sync`: the relay passes its chunks on in that class, under its
    own caps and weights). Signed with the request's path."""
    parts = ([f"via={','.join(via)}"] if via else []) + (
        [f"class={traffic_class}"] if traffic_class else [])
    return "?" + "&".join(parts) if parts else ""


def fallback_order(routes: Iterable[Route]) -> list[Route]:
    """The routes to try, in order: the given ones (largest share first, as the plan lists
    them), then the direct path if it is not among them (a relay that fails must not strand the
    transfer)."""
    out: list[Route] = []
    for r in routes:
        if r.via not in [o.via for o in out]:
            out.append(r)
    if () not in [o.via for o in out]:
        out.append(Route((), 0.0))
    return out


def check_residency(site: str, region: str | None, residency: Sequence[str], role: str) -> None:
    """This site (as `role`: relay or destination) may hold bytes of data whose residency is
    `residency` (empty: anywhere). A site with no region configured cannot show it is inside
    a restricted residency, so it refuses too. PolicyViolation names the site and its region."""
    if not residency:
        return
    allowed = ", ".join(sorted(residency))
    if region is None:
        raise PolicyViolation(
            f"{role} {site} has no region configured; the data's residency is [{allowed}]",
            hop=site,
        )
    if region not in residency:
        raise PolicyViolation(
            f"{role} {site} is in region {region}, outside the data's residency [{allowed}]",
            hop=site,
        )
