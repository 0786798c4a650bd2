"""Routes of a transfer and where its bytes may go, without I/O.

A route is the relays between the source and the destination (`via`, in order; empty: direct).
A job carries its routes with the share of chunks each should carry (the plan's `routes`, or a
manual `send --via`); the sender walks them in order and falls back along the list when one
fails, the direct path last (`fallback_order`).

Theory of operation for multipath (`ShareSplitter`): chunks are dealt to routes so that each
route's count of chunks handed out tracks its target fraction of all chunks handed out so far
(the largest deficit goes next: weighted round robin with no drift). The fractions start at the
plan's shares; once every live route has a measured rate (bytes acknowledged per second over the
job so far), they follow the rates, so that all routes finish together. A route that fails is
dropped from the split and its chunks go to the others.

Residency: a dataset may carry the regions it may be held in (`residency`); every site that
would hold any of its bytes (a relay, the destination) checks its own region before a byte is
written (`check_residency`), and says who it is in the refusal, so the sender can report which
hop refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from transferd.errors import PolicyViolation

__all__ = [
    "Route",
    "ShareSplitter",
    "check_residency",
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


@dataclass
class ShareSplitter:
    """Deals chunks to routes by target fraction (see the module's theory of operation)."""

    shares: dict[int, float]  # route index -> planned share
    dealt: dict[int, int] = field(default_factory=dict)
    rates: dict[int, float] = field(default_factory=dict)  # bytes/s measured per route
    down: set[int] = field(default_factory=set)

    def fractions(self) -> dict[int, float]:
        live = [i for i in self.shares if i not in self.down]
        if not live:
            return {}
        if all(self.rates.get(i, 0.0) > 0 for i in live):
            weights = {i: self.rates[i] for i in live}
        else:
            weights = {i: max(self.shares[i], 1e-9) for i in live}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    def next_route(self) -> int | None:
        """The route the next chunk goes on (None: every route is down)."""
        fractions = self.fractions()
        if not fractions:
            return None
        n = sum(self.dealt.get(i, 0) for i in fractions) + 1
        best = max(fractions, key=lambda i: (fractions[i] * n - self.dealt.get(i, 0), -i))
        self.dealt[best] = self.dealt.get(best, 0) + 1
        return best

    def observe(self, route: int, bytes_per_s: float) -> None:
        self.rates[route] = bytes_per_s

    def fail(self, route: int) -> None:
        self.down.add(route)
