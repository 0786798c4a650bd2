"""Prometheus metrics of one daemon: one registry for everything it counts (chunks, jobs,
auth, policy, stream counts, messages), its own so several daemons can share a process."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from netplan.plan import TrafficClass
from netplan.telemetry import SERIES_SCALE, LinkMeasurement
from transferd.protocol.streams import StreamChange

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._compression_totals: dict[str, tuple[int, int]] = {}  # peer: (raw, wire) bytes
        counter, gauge = self._counter, self._gauge
        # Chunks and bytes, by peer
        self.bytes_sent = counter("bytes_sent", "Chunk body bytes sent on the wire", "peer")
        self.bytes_received = counter(
            "bytes_received", "Chunk body bytes received on the wire", "peer"
        )
        self.chunks_sent = counter("chunks_sent", "Chunks a peer acknowledged", "peer")
        self.chunks_received = counter("chunks_received", "Chunks accepted from a peer", "peer")
        self.chunks_skipped = counter(
            "chunks_skipped", "Chunks not sent because the receiver already had them", "peer"
        )
        self.compression_in = counter(
            "compression_input_bytes", "Raw bytes of chunks sent", "peer"
        )
        self.compression_out = counter(
            "compression_output_bytes", "Wire bytes of chunks sent (ratio = output / input)", "peer"
        )
        self.compression_ratio = gauge(
            "compression_ratio",
            "Wire bytes / raw bytes of all chunks sent to the peer so far (1.0: uncompressed)",
            "peer",
        )
        self.retries = counter("retries", "Requests retried", "peer")
        self.chunks_resent = counter(
            "chunks_resent", "Chunks sent again because their data channel broke", "peer"
        )
        # This site as a relay (`net.relay`): chunks and body bytes passed on, by the peer
        # they came from and the next hop they went to.
        self.relayed_chunks = counter(
            "relayed_chunks", "Chunks this site passed on for other sites", "source", "next_hop"
        )
        self.relayed_bytes = counter(
            "relayed_bytes", "Chunk body bytes this site passed on for other sites", "source",
            "next_hop",
        )
        self.channels_opened = counter(
            "data_channels_opened", "Data channels opened to a peer (kept open across jobs)",
            "peer",
        )  # fmt: skip
        # Refusals
        self.channels_refused = counter(
            "channels_refused",
            "Data channels closed for a malformed frame (out of bounds, replayed sequence)",
            "peer",
        )
        self.integrity_failures = counter(
            "integrity_failures", "Chunks or files that failed verification", "peer", "side"
        )
        self.auth_failures = counter(
            "auth_failures", "Requests refused by authentication", "reason"
        )
        self.policy_refusals = counter("policy_refusals", "Transfers refused by policy", "side")
        # Jobs and streams
        self.job_seconds = Histogram(
            "transferd_job_duration_seconds",
            "Wall time of replication jobs",
            ["outcome"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "transferd_event_loop_lag_seconds",
            "How long work queued on the event loop (control, messages, chunk bookings) "
            "waited for it: the lag probe's timer (every 10 ms while work moves, 0.25 s when "
            "idle) and each batch of data-channel calls; what a message waits for before the "
            "daemon even looks at it",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2),
            registry=self.registry,
        )
        self.stream_changes = counter(
            "stream_changes",
            "Changes of the parallel-stream target, by direction",
            "peer", "class", "direction",
        )  # fmt: skip
        self.streams_target = gauge(
            "streams_target", "Parallel chunk uploads the stream controller allows", "peer", "class"
        )
        # Messages
        message = ("peer", "class")
        self.messages_sent = counter("messages_sent", "Messages queued to a peer", *message)
        self.messages_delivered = counter(
            "messages_delivered", "Messages a peer acknowledged", *message
        )
        self.message_paths = counter(
            "message_paths", "Messages a peer acknowledged, by the path they took (hop: the "
            "framed peer hop; http: one request each)", "peer", "path")
        self.messages_received = counter(
            "messages_received", "Messages received from a peer", *message
        )
        self.messages_received_late = counter(
            "messages_received_late", "Messages received after their deadline", *message
        )
        self.message_latency = self._histogram(
            "message_latency_seconds", "Messages from queued to the peer's acknowledgement",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), *message)
        self.message_budget_used = self._histogram(
            "message_budget_used_ratio",
            "Latency / deadline budget of delivered messages that had a deadline (> 1: late)",
            (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.5, 2, 5), *message)
        self.class_bytes_acked = counter(
            "class_bytes_acked", "Chunk bytes the peer acknowledged, by bulk class", *message)
        self.budget_misses = counter(
            "messages_budget_misses", "Messages that missed their deadline, by reason", "peer",
            "kind",
        )  # fmt: skip

        # Link telemetry (site.telemetry): each link's rolling window, as netplan.telemetry.SERIES
        # names it; labels site and peer, so a Prometheus over many daemons keeps them apart.
        link = ("site", "peer")
        self.link_gauges = {
            "best_goodput_bytes_per_s": gauge(
                "link_best_goodput_bytes_per_second",
                "Best goodput sustained for sustain_s in the telemetry window", *link),
            "goodput_bytes_per_s": gauge(
                "link_goodput_bytes_per_second", "Goodput over the last sustain_s", *link),
            "rtt_ms": gauge("link_rtt_seconds",
                            "Median minimum RTT of the data connections (propagation)", *link),
            "srtt_ms": gauge("link_srtt_seconds",
                             "Median smoothed RTT of the data connections (queue included)",
                             *link),
            "rttvar_ms": gauge("link_rttvar_seconds", "Median RTT variance (TCP_INFO)", *link),
            "jitter_ms": gauge("link_jitter_seconds",
                               "Mean difference of consecutive control-plane round trips", *link),
            "loss_pct": gauge("link_loss_ratio",
                              "Retransmitted / sent data segments in the window", *link),
            "samples": gauge("link_samples", "TCP_INFO samples with data moving in the window",
                             *link),
            "control_samples": gauge("link_control_samples",
                                     "Control-plane round trips in the window", *link),
            "cwnd_segments": gauge("link_cwnd_segments",
                                   "Congestion windows of the data connections, summed", *link),
            "first_at": gauge("link_first_sample_timestamp_seconds",
                              "When the window's first sample with data moving was taken", *link),
            "last_at": gauge("link_last_sample_timestamp_seconds",
                             "When the window's last sample with data moving was taken", *link),
            "delivery_rate_bytes_per_s": gauge(
                "link_delivery_rate_bytes_per_second",
                "The kernel's delivery-rate estimates of the data connections, summed", *link),
        }
        self.link_streams = gauge("link_streams", "Live data connections to the peer", *link)
        self.link_segments = counter("link_data_segments_out",
                                     "Data segments sent on the data connections", *link)
        self.link_retransmits = counter("link_retransmitted_segments",
                                        "Segments retransmitted on the data connections", *link)
        self.control_rtt = self._histogram(
            "link_control_rtt_seconds",
            "Control-plane round trips to the peer (a signed request and its reply)",
            (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), *link)

    def export_link(self, m: LinkMeasurement) -> None:
        """Set the link's gauges from its window's summary (None: the series is left out)."""
        for name, gauge in self.link_gauges.items():
            value = getattr(m, name)
            if value is None:
                with contextlib.suppress(KeyError):
                    gauge.remove(m.site, m.peer)
            else:
                gauge.labels(m.site, m.peer).set(float(value) * SERIES_SCALE.get(name, 1.0))
        self.link_streams.labels(m.site, m.peer).set(len(m.streams))

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(f"transferd_{name}", doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(f"transferd_{name}", doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...], *labels: str
                   ) -> Histogram:
        return Histogram(f"transferd_{name}", doc, labels, buckets=buckets,
                         registry=self.registry)

    def count_stream_change(self, peer: str, cls: TrafficClass, change: StreamChange) -> None:
        direction = "up" if change.to_streams > change.from_streams else "down"
        self.stream_changes.labels(peer, cls.value, direction).inc()
        self.streams_target.labels(peer, cls.value).set(change.to_streams)

    def count_delivered(self, peer: str, cls: TrafficClass, latency_s: float,
                        budget_s: float | None) -> None:
        self.messages_delivered.labels(peer, cls.value).inc()
        self.message_latency.labels(peer, cls.value).observe(latency_s)
        if budget_s is not None and budget_s > 0:
            self.message_budget_used.labels(peer, cls.value).observe(latency_s / budget_s)

    def count_compression(self, peer: str, raw_bytes: int, wire_bytes: int) -> None:
        # Called per chunk on the event loop: the ratio comes from totals kept here, not from
        # `value()`, which collects the whole registry (~0.4 ms a call).
        self.compression_in.labels(peer).inc(raw_bytes)
        self.compression_out.labels(peer).inc(wire_bytes)
        raw_total, wire_total = self._compression_totals.get(peer, (0, 0))
        raw_total, wire_total = raw_total + raw_bytes, wire_total + wire_bytes
        self._compression_totals[peer] = (raw_total, wire_total)
        if raw_total:
            self.compression_ratio.labels(peer).set(wire_total / raw_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (for status output and tests); 0 when never touched."""
        got = self.registry.get_sample_value(name, labels)
        return float(got or 0.0)
