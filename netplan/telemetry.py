"""The telemetry contract: what a transferd daemon measured on the links to its peers, as netplan
reads it back (`netplan calibrate`). netplan owns the shape, as it owns the plan's: transferd
answers `GET /v1/telemetry` with a `TelemetryReport` and exports the same values as Prometheus
series (`SERIES`), and netplan never imports transferd.

A `LinkMeasurement` is one direction, site -> peer, over the daemon's rolling window:
bandwidth as the best goodput sustained for `sustain_s`, RTT as the kernel's minimum RTT of the
data connections (the path's propagation delay, without the queue the transfer itself built),
jitter as the mean difference of consecutive control-plane round trips (RFC 3550's
interarrival jitter without its smoothing), loss as retransmitted / sent data segments.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SERIES",
    "SERIES_SCALE",
    "TELEMETRY_SCHEMA_VERSION",
    "LinkMeasurement",
    "StreamMeasurement",
    "TelemetryReport",
]

TELEMETRY_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StreamMeasurement(_Model):
    """One data connection at the last sample (TCP_INFO)."""

    srtt_ms: float
    rttvar_ms: float
    min_rtt_ms: float
    cwnd_segments: int
    delivery_rate_bytes_per_s: float | None
    goodput_bytes_per_s: float  # bytes the peer acknowledged over the last sample interval
    retransmitted_segments: int  # over the connection's life


class LinkMeasurement(_Model):
    site: str  # the measuring (sending) site
    peer: str
    samples: int = Field(ge=0)  # TCP_INFO samples with data moving, in the window
    first_at: float | None = None  # unix seconds of the first and last such sample
    last_at: float | None = None
    sustain_s: float = 5.0
    goodput_bytes_per_s: float | None = None  # over the last sustain_s
    best_goodput_bytes_per_s: float | None = None  # the best sustain_s in the window
    rtt_ms: float | None = None  # median of the connections' minimum RTT
    srtt_ms: float | None = None  # median smoothed RTT (queueing included)
    rttvar_ms: float | None = None
    cwnd_segments: float | None = None  # summed over the streams, last sample
    delivery_rate_bytes_per_s: float | None = None  # summed over the streams, last sample
    data_segments_out: int = 0  # in the window
    retransmitted_segments: int = 0  # in the window
    loss_pct: float | None = None  # retransmitted / sent, in %
    control_samples: int = 0
    control_rtt_ms: float | None = None  # median control-plane round trip
    jitter_ms: float | None = None
    chunk_failures: dict[str, float] = Field(default_factory=dict)  # by kind, daemon lifetime
    streams: list[StreamMeasurement] = Field(default_factory=list)


class TelemetryReport(_Model):
    schema_version: int = TELEMETRY_SCHEMA_VERSION
    site: str
    at: float  # unix seconds
    window_s: float
    links: list[LinkMeasurement]


# The Prometheus series a daemon exports for each link (labels site, peer) and the
# LinkMeasurement field each one carries: what `calibrate --from URL` and `--prometheus` read.
SERIES: dict[str, str] = {
    "transferd_link_best_goodput_bytes_per_second": "best_goodput_bytes_per_s",
    "transferd_link_goodput_bytes_per_second": "goodput_bytes_per_s",
    "transferd_link_rtt_seconds": "rtt_ms",
    "transferd_link_srtt_seconds": "srtt_ms",
    "transferd_link_rttvar_seconds": "rttvar_ms",
    "transferd_link_jitter_seconds": "jitter_ms",
    "transferd_link_loss_ratio": "loss_pct",
    "transferd_link_samples": "samples",
    "transferd_link_control_samples": "control_samples",
    "transferd_link_first_sample_timestamp_seconds": "first_at",
    "transferd_link_last_sample_timestamp_seconds": "last_at",
}
# Series carrying a time in seconds where the field is in milliseconds, or a ratio where it is %.
SERIES_SCALE: dict[str, float] = {"rtt_ms": 1e-3, "srtt_ms": 1e-3, "rttvar_ms": 1e-3,
                                  "jitter_ms": 1e-3, "loss_pct": 1e-2}
