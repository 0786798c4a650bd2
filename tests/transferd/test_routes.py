"""Routes without sockets: the fallback order, residency at a hop, and how the multipath
dealer picks a route for each chunk (shares first, then measured rates; failed routes out)."""

from __future__ import annotations

from typing import Any

import pytest

from netplan.plan import TrafficClass
from transferd.errors import PolicyViolation
from transferd.net.routes import RouteBook, RouteDealer
from transferd.protocol.local_api import Job, JobRoute, JobState
from transferd.protocol.routes import Route, check_residency, fallback_order, route_label


def test_fallback_order_ends_with_the_direct_path_once() -> None:
    assert [r.via for r in fallback_order([Route(("R",), 1.0)])] == [("R",), ()]
    assert [r.via for r in fallback_order([Route(("R",), 0.6), Route((), 0.4)])] == [("R",), ()]
    assert [r.via for r in fallback_order([])] == [()]
    assert route_label("B", ("R1", "R2")) == "R1>R2>B"


@pytest.mark.parametrize(("region", "residency", "refused"), [
    ("eu", ["eu"], None),
    ("us", ["eu", "eu-west"],
     "relay R is in region us, outside the data's residency [eu, eu-west]"),
    (None, ["eu"], "relay R has no region configured; the data's residency is [eu]"),
    (None, [], None),
])
def test_residency_at_a_hop(region: str | None, residency: list[str], refused: str | None) -> None:
    if refused is None:
        check_residency("R", region, residency, "relay")
        return
    with pytest.raises(PolicyViolation) as exc:
        check_residency("R", region, residency, "relay")
    assert exc.value.message == refused
    assert exc.value.fields["hop"] == "R"


class _Gate:
    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0


class _Pump:
    def __init__(self, via: tuple[str, ...], limit: int = 4) -> None:
        self.via, self.gate = via, _Gate(limit)
        self.link = self.upload = None
        self.budget_s = 3.0


def _job(routes: list[JobRoute]) -> Job:
    return Job(id="j1", path="approved/x", dest="B", traffic_class=TrafficClass.SYNC,
               state=JobState.RUNNING, error=None, error_kind=None, created_at=0.0,
               started_at=0.0, finished_at=None, bytes_logical=0, bytes_done=0, bytes_on_wire=0,
               chunks=0, chunks_skipped=0, chunks_sent=0, retries=0, integrity_failures=0,
               routes=routes)


def _dealer(shares: tuple[float, float], now: list[float]) -> RouteDealer:
    routes = [Route(("R",), shares[0]), Route((), shares[1])]
    job = _job([JobRoute(via=list(r.via), share=r.share) for r in routes])
    book = RouteBook(clock=lambda: now[0])
    pumps: list[Any] = [_Pump(r.via) for r in routes]
    for r in routes:
        book.started(job.id, job.dest, r.via)
    return RouteDealer(book, job, routes, pumps, control=pumps[0])


def test_dealer_follows_shares_then_measured_rates() -> None:
    now = [0.0]
    d = _dealer((0.75, 0.25), now)
    n = 8
    picks = []
    for _ in range(8):  # nothing measured: the main route by its share, the other one probe
        i = d.pick(n)
        d.inflight[i] += n
        picks.append(i)
    assert picks == [0, 0, 0, 1, 0, 0, 0, 0]
    # Measured: the relay acknowledged 90 bytes in 1 s, the direct path 10: 9 : 1 from now on
    # (in proportion to the rates, several chunks on each at once).
    now[0] = 1.0
    d.book.acked("j1", "B", ("R",), 90)
    d.book.acked("j1", "B", (), 10)
    d.inflight = [0, 0]
    picks = []
    for _ in range(20):
        i = d.pick(n)
        d.inflight[i] += n
        picks.append(i)
    assert picks.count(0) == 18


def test_dealer_waits_for_a_full_fast_route_and_skips_failed_routes() -> None:
    now = [0.0]
    d = _dealer((0.5, 0.5), now)
    now[0] = 1.0
    d.book.acked("j1", "B", ("R",), 1000)
    d.book.acked("j1", "B", (), 10)
    d.pumps[0].gate.in_flight = d.pumps[0].gate.limit  # the fast route's gate is full
    d.inflight = [32, 0]
    assert d.pick(8) == 0  # 40 bytes at 1000/s beat 8 at 10/s: wait for the fast one
    d.fail(1, "direct link down")
    assert {d.pick(8) for _ in range(3)} == {0}
    assert [s.state for s in d.book.status("j1")] == ["active", "down"]


def test_a_chunk_sent_again_without_a_receipt_counts_as_resent_on_the_route_that_sends_it(
) -> None:
    now = [0.0]
    book = RouteBook(clock=lambda: now[0])
    book.started("j", "B", ("R",))
    book.on_wire("j", "B", ("R",), "c1")
    book.on_wire("j", "B", ("R",), "c2")
    book.acked("j", "B", ("R",), 100, "c1")
    book.failed("j", "B", ("R",), "relay R: connection refused")  # c2 was half-way
    book.started("j", "B", ())
    book.on_wire("j", "B", (), "c2")  # what R had: sent again, directly
    book.on_wire("j", "B", (), "c3")
    book.on_wire("j", "B", (), "c3")  # its channel broke under it: sent again
    by_route = {s.route: s for s in book.status("j")}
    assert (by_route["R>B"].chunks_resent, by_route["R>B"].state) == (0, "down")
    assert by_route["R>B"].error == "relay R: connection refused"
    assert by_route["B"].chunks_resent == 2


def test_a_relayed_receipt_may_take_what_the_routes_measured_rate_allows() -> None:
    now = [0.0]
    book = RouteBook(clock=lambda: now[0])
    mib = 1 << 20
    assert book.receipt_timeout("B", ("R",), 8 * mib, 2) == 10.0  # no rate yet
    book.started("j", "B", ("R",))
    now[0] = 1.0
    book.acked("j", "B", ("R",), 2 * mib, "c")  # 2 MiB/s
    assert book.last_receipt("j", "B", ("R",)) == 1.0
    # 4x what 2 chunks of 8 MiB need at 2 MiB/s; a small chunk is held to the 10 s floor
    # (a pause at B or RTO backoff on R -> B is not a hung relay).
    assert book.receipt_timeout("B", ("R",), 8 * mib, 2) == pytest.approx(32.0)
    assert book.receipt_timeout("B", ("R",), mib // 4, 1) == 10.0
    # The rate is the route's, kept for the next job on it.
    assert book.receipt_timeout("B", ("R",), 8 * mib, 1) == pytest.approx(16.0)
    assert book.receipt_timeout("B", ("S",), 8 * mib, 1) == 10.0
