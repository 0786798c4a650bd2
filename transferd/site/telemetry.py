"""Link telemetry of one daemon: what the kernel says about the data connections to each peer
(struct tcp_info), the control plane's round trips, and the chunk failures, kept as a rolling
window per peer and summarised into netplan's `LinkMeasurement` (the `/v1/telemetry` answer and
the `transferd_link_*` Prometheus series).

Theory of operation: `LinkTelemetry.sample(now, wall, infos)` is fed every SAMPLE_S the
tcp_info of each live data channel (`PeerChannels.tcp_infos`); the difference of each
connection's counters since its previous sample (bytes acked, data segments out,
retransmitted) makes one `LinkPoint` per sample. The window keeps WINDOW_S of points. Goodput
is acked bytes over time, the best `SUSTAIN_S` of consecutive points is the link's sustained
bandwidth (what a planner may count on, not a burst); RTT is the median of the connections'
tcpi_min_rtt (the propagation delay: srtt under load carries the queue the transfer built);
loss is retransmitted / sent segments (an over-estimate by spurious and tail-loss-probe
retransmits, which are rare next to real loss). Control-plane round trips come from
`control_rtt(now, seconds)`; jitter is the mean absolute difference of consecutive ones.
Pure: time comes in as arguments.
"""

from __future__ import annotations

import statistics
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netplan.telemetry import LinkMeasurement, StreamMeasurement
from transferd.protocol.tcpinfo import TcpInfo, parse_tcp_info

__all__ = ["LinkPoint", "LinkTelemetry", "TcpInfo", "parse_tcp_info"]

SAMPLE_S = 1.0  # the daemon samples every data channel's tcp_info this often
WINDOW_S = 900.0  # 15 min of points per peer (a Prometheus scrape sees them as they come)
SUSTAIN_S = 5.0  # bandwidth is the best goodput held this long
CONTROL_SAMPLES = 300  # control-plane round trips kept per peer

@dataclass(frozen=True)
class LinkPoint:
    """One sample of a link: the streams' counters since the previous sample, their state now."""

    at: float  # monotonic seconds
    wall: float  # unix seconds
    seconds: float  # since the previous sample
    acked_bytes: int
    segs_out: int
    retrans: int
    min_rtt_us: float  # median over the streams
    srtt_us: float
    rttvar_us: float

    @property
    def moving(self) -> bool:
        return self.segs_out > 0


@dataclass
class _Seen:
    bytes_acked: int
    segs_out: int
    retrans: int


class _Link:
    def __init__(self) -> None:
        self.points: deque[LinkPoint] = deque()
        self.control: deque[tuple[float, float]] = deque(maxlen=CONTROL_SAMPLES)  # (wall, s)
        self.seen: weakref.WeakKeyDictionary[object, _Seen] = weakref.WeakKeyDictionary()
        self.last_at: float | None = None
        self.streams: list[StreamMeasurement] = []
        self.cwnd: float | None = None
        self.delivery: float | None = None


def _median(values: Iterable[float]) -> float | None:
    got = list(values)
    return statistics.median(got) if got else None


def best_sustained(points: list[LinkPoint], sustain_s: float) -> float | None:
    """The highest goodput (bytes/s) over any run of consecutive points spanning at least
    `sustain_s` (two pointers; None when the window holds less than that)."""
    best = None
    start, acked, span = 0, 0, 0.0
    for p in points:
        acked += p.acked_bytes
        span += p.seconds
        while start < len(points) and span - points[start].seconds >= sustain_s:
            acked -= points[start].acked_bytes
            span -= points[start].seconds
            start += 1
        if span >= sustain_s * 0.999:
            rate = acked / span
            best = rate if best is None or rate > best else best
    return best


class LinkTelemetry:
    """The rolling windows of one site's links, one per peer."""

    def __init__(self, site: str, peers: Iterable[str], *, window_s: float = WINDOW_S,
                 sustain_s: float = SUSTAIN_S) -> None:
        self.site = site
        self.window_s = window_s
        self.sustain_s = sustain_s
        self.links = {peer: _Link() for peer in peers}

    def sample(self, peer: str, now: float, wall: float,
               infos: Iterable[tuple[object, bytes]]) -> LinkPoint | None:
        """Feed each live data channel's (identity, raw tcp_info); returns the point added
        (None on the first call, which only sets the baseline of the interval)."""
        link = self.links[peer]
        acked = segs = retrans = 0
        streams: list[StreamMeasurement] = []
        parsed: list[TcpInfo] = []
        dt = None if link.last_at is None else max(1e-6, now - link.last_at)
        for chan, raw in infos:
            info = parse_tcp_info(raw)
            if info is None:
                continue
            parsed.append(info)
            before = link.seen.get(chan) or _Seen(0, 0, 0)
            d_acked = max(0, info.bytes_acked - before.bytes_acked)
            acked += d_acked
            segs += max(0, info.data_segs_out - before.segs_out)
            retrans += max(0, info.total_retrans - before.retrans)
            link.seen[chan] = _Seen(info.bytes_acked, info.data_segs_out, info.total_retrans)
            streams.append(StreamMeasurement(
                srtt_ms=info.srtt_us / 1e3, rttvar_ms=info.rttvar_us / 1e3,
                min_rtt_ms=info.min_rtt_us / 1e3, cwnd_segments=info.cwnd_segments,
                delivery_rate_bytes_per_s=info.delivery_rate_bytes_per_s,
                goodput_bytes_per_s=d_acked / dt if dt else 0.0,
                retransmitted_segments=info.total_retrans))
        link.last_at = now
        link.streams = streams
        link.cwnd = float(sum(i.cwnd_segments for i in parsed)) if parsed else None
        rates = [i.delivery_rate_bytes_per_s for i in parsed
                 if i.delivery_rate_bytes_per_s is not None]
        link.delivery = float(sum(rates)) if rates else None
        while link.points and link.points[0].at < now - self.window_s:
            link.points.popleft()
        if dt is None:
            return None
        point = LinkPoint(
            at=now, wall=wall, seconds=dt, acked_bytes=acked, segs_out=segs, retrans=retrans,
            min_rtt_us=_median(i.min_rtt_us for i in parsed if i.min_rtt_us) or 0.0,
            srtt_us=_median(i.srtt_us for i in parsed) or 0.0,
            rttvar_us=_median(i.rttvar_us for i in parsed) or 0.0)
        link.points.append(point)
        return point

    def control_rtt(self, peer: str, wall: float, seconds: float) -> None:
        """One control-plane round trip to `peer` (a signed request and its reply)."""
        self.links[peer].control.append((wall, seconds))

    def measurement(self, peer: str, failures: Mapping[str, float] | None = None
                    ) -> LinkMeasurement:
        link = self.links[peer]
        points = list(link.points)
        moving = [p for p in points if p.moving]
        segs = sum(p.segs_out for p in points)
        retrans = sum(p.retrans for p in points)
        recent: list[LinkPoint] = []
        span = 0.0
        for p in reversed(points):
            if span >= self.sustain_s:
                break
            recent.append(p)
            span += p.seconds
        control = [s for _wall, s in link.control]
        jitter = (statistics.fmean(abs(b - a) for a, b in zip(control, control[1:], strict=False))
                  if len(control) >= 2 else None)
        return LinkMeasurement(
            site=self.site, peer=peer, samples=len(moving),
            first_at=moving[0].wall if moving else None,
            last_at=moving[-1].wall if moving else None,
            sustain_s=self.sustain_s,
            goodput_bytes_per_s=(sum(p.acked_bytes for p in recent) / span
                                 if span >= self.sustain_s * 0.999 else None),
            best_goodput_bytes_per_s=best_sustained(points, self.sustain_s),
            rtt_ms=_ms(_median(p.min_rtt_us for p in moving if p.min_rtt_us), 1e3),
            srtt_ms=_ms(_median(p.srtt_us for p in moving), 1e3),
            rttvar_ms=_ms(_median(p.rttvar_us for p in moving), 1e3),
            cwnd_segments=link.cwnd,
            delivery_rate_bytes_per_s=link.delivery,
            data_segments_out=segs, retransmitted_segments=retrans,
            loss_pct=100.0 * retrans / segs if segs else None,
            control_samples=len(control),
            control_rtt_ms=_ms(_median(control), 1e-3),
            jitter_ms=_ms(jitter, 1e-3),
            chunk_failures=dict(failures or {}),
            streams=link.streams,
        )


def _ms(value: float | None, per_ms: float) -> float | None:
    return None if value is None else value / per_ms
