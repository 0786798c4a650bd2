"""The telemetry window without sockets: tcp_info decoding (any bytes: a TcpInfo or None),
per-connection counter differences across samples and connections that come and go, the best
sustained goodput, loss and control-plane jitter."""

from __future__ import annotations

import struct
import sys

from hypothesis import given
from hypothesis import strategies as st

from transferd.site.telemetry import LinkTelemetry, best_sustained, parse_tcp_info

ORDER = "<" if sys.byteorder == "little" else ">"


class _Conn:
    """A connection's identity (the window keeps it weakly, as it keeps data channels)."""


def _info(*, acked: int, segs: int, retrans: int, min_rtt_us: int = 30_000,
          srtt_us: int = 45_000, cwnd: int = 40, rate: int = 25_000_000) -> bytes:
    buf = bytearray(168)
    for at, value in ((16, 1448), (68, srtt_us), (72, 2_000), (80, cwnd), (100, retrans),
                      (148, min_rtt_us), (156, segs)):
        struct.pack_into(ORDER + "I", buf, at, value)
    struct.pack_into(ORDER + "Q", buf, 120, acked)
    struct.pack_into(ORDER + "Q", buf, 160, rate)
    return bytes(buf)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_refused(raw: bytes) -> None:
    info = parse_tcp_info(raw)
    assert (info is None) == (len(raw) < 160)


def test_counters_are_differenced_per_connection_and_summarised() -> None:
    t = LinkTelemetry("A", ["B"], sustain_s=2.0)
    one, two = _Conn(), _Conn()
    assert t.sample("B", 0.0, 1000.0, [(one, _info(acked=0, segs=0, retrans=0))]) is None
    # 10 MB/s on one stream for 2 s, then a second stream joins: 20 MB/s for 3 s, 1 % resent.
    for i in range(1, 3):
        t.sample("B", float(i), 1000.0 + i,
                 [(one, _info(acked=10_000_000 * i, segs=7000 * i, retrans=70 * i))])
    for i in range(3, 6):
        t.sample("B", float(i), 1000.0 + i, [
            (one, _info(acked=10_000_000 * i, segs=7000 * i, retrans=70 * i)),
            (two, _info(acked=10_000_000 * (i - 2), segs=7000 * (i - 2),
                        retrans=70 * (i - 2), min_rtt_us=32_000))])
    for k, s in enumerate((0.030, 0.032, 0.029, 0.031)):
        t.control_rtt("B", 1000.0 + k, s)
    m = t.measurement("B", {"resent": 2.0})
    assert m.samples == 5
    assert (m.first_at, m.last_at) == (1001.0, 1005.0)
    assert m.best_goodput_bytes_per_s == 20_000_000
    assert m.goodput_bytes_per_s == 20_000_000
    assert m.loss_pct == 1.0
    assert m.rtt_ms == 31.0  # the median of the streams' minimum RTTs
    assert m.srtt_ms == 45.0
    assert m.jitter_ms is not None
    assert abs(m.jitter_ms - (2 + 3 + 2) / 3) < 1e-9
    assert m.control_samples == 4
    assert m.cwnd_segments == 80
    assert m.delivery_rate_bytes_per_s == 50_000_000
    assert len(m.streams) == 2
    assert m.chunk_failures == {"resent": 2.0}
    # An idle link: no new samples with data moving, the window keeps what it saw.
    t.sample("B", 6.0, 1006.0, [])
    assert t.measurement("B").samples == 5


def test_best_sustained_needs_the_whole_span() -> None:
    t = LinkTelemetry("A", ["B"], sustain_s=5.0)
    c = _Conn()
    t.sample("B", 0.0, 0.0, [(c, _info(acked=0, segs=0, retrans=0))])
    t.sample("B", 1.0, 1.0, [(c, _info(acked=10**9, segs=10, retrans=0))])
    assert t.measurement("B").best_goodput_bytes_per_s is None  # 1 s is not 5 s sustained
    assert best_sustained([], 5.0) is None
