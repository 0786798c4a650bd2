"""Linux's struct tcp_info (linux/tcp.h, 4.19 and later) as bytes: the offsets of the fields
transferd reads, and their decoding. The one place that knows the layout: the data channels'
stream controller and stall detection (net/channels.py) and the link telemetry
(site/telemetry.py) both read through it. Sans-I/O: the bytes come from getsockopt elsewhere."""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = [
    "BUSY_TIME",
    "BYTES_ACKED",
    "DATA_SEGS_OUT",
    "INFO_BYTES",
    "MSS",
    "RETRANSMITS",
    "RTT",
    "RWND_LIMITED",
    "SNDBUF_LIMITED",
    "TCP_INFO_NEED",
    "TOTAL_RETRANS",
    "TcpInfo",
    "parse_tcp_info",
    "u32",
    "u64",
]

INFO_BYTES = 192  # up to and including tcpi_sndbuf_limited: what getsockopt is asked for

# Offsets in bytes.
RETRANSMITS = 2  # u8: retransmission timeouts in a row without progress
MSS, RTT, RTTVAR, CWND, TOTAL_RETRANS = 16, 68, 72, 80, 100  # u32
BYTES_ACKED = 120  # u64
MIN_RTT, DATA_SEGS_OUT = 148, 156  # u32
DELIVERY_RATE = 160  # u64, kernel 4.9+
# u64 microseconds, kernel 4.10+: the time the connection had data to send or in flight, and of
# that the time the peer's receive window, or the local send buffer, held it back.
BUSY_TIME, RWND_LIMITED, SNDBUF_LIMITED = 168, 176, 184
TCP_INFO_NEED = DATA_SEGS_OUT + 4  # what `parse_tcp_info` needs


def u32(info: bytes, at: int) -> int:
    return int.from_bytes(info[at : at + 4], sys.byteorder)


def u64(info: bytes, at: int) -> int:
    return int.from_bytes(info[at : at + 8], sys.byteorder)


@dataclass(frozen=True)
class TcpInfo:
    """The fields of one connection's tcp_info that telemetry reads (times in microseconds)."""

    mss: int
    srtt_us: int
    rttvar_us: int
    min_rtt_us: int
    cwnd_segments: int
    total_retrans: int
    data_segs_out: int
    bytes_acked: int
    delivery_rate_bytes_per_s: int | None  # tcpi_delivery_rate (kernel 4.9+)


def parse_tcp_info(info: bytes) -> TcpInfo | None:
    """The struct as the kernel gave it; None when it is too short to hold the fields."""
    if len(info) < TCP_INFO_NEED:
        return None
    delivery = u64(info, DELIVERY_RATE) if len(info) >= DELIVERY_RATE + 8 else None
    return TcpInfo(mss=u32(info, MSS), srtt_us=u32(info, RTT), rttvar_us=u32(info, RTTVAR),
                   min_rtt_us=u32(info, MIN_RTT), cwnd_segments=u32(info, CWND),
                   total_retrans=u32(info, TOTAL_RETRANS),
                   data_segs_out=u32(info, DATA_SEGS_OUT), bytes_acked=u64(info, BYTES_ACKED),
                   delivery_rate_bytes_per_s=delivery)
