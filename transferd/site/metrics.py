"""Prometheus metrics of one daemon: one registry for everything it counts (chunks, jobs,
auth, policy, stream counts, messages), its own so several daemons can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from netplan.plan import TrafficClass
from transferd.protocol.streams import StreamChange

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_sent = Counter(
            "transferd_bytes_sent", "Chunk body bytes sent on the wire", ["peer"], registry=r
        )
        self.bytes_received = Counter(
            "transferd_bytes_received",
            "Chunk body bytes received on the wire",
            ["peer"],
            registry=r,
        )
        self.chunks_sent = Counter(
            "transferd_chunks_sent", "Chunks PUT to a peer", ["peer"], registry=r
        )
        self.chunks_received = Counter(
            "transferd_chunks_received", "Chunks accepted from a peer", ["peer"], registry=r
        )
        self.chunks_skipped = Counter(
            "transferd_chunks_skipped",
            "Chunks not sent because the receiver already had them",
            ["peer"],
            registry=r,
        )
        self.compression_in = Counter(
            "transferd_compression_input_bytes", "Raw bytes of chunks sent", ["peer"], registry=r
        )
        self.compression_out = Counter(
            "transferd_compression_output_bytes",
            "Wire bytes of chunks sent (ratio = output / input)",
            ["peer"],
            registry=r,
        )
        self.compression_ratio = Gauge(
            "transferd_compression_ratio",
            "Wire bytes / raw bytes of all chunks sent to the peer so far (1.0: uncompressed)",
            ["peer"],
            registry=r,
        )
        self.retries = Counter("transferd_retries", "Requests retried", ["peer"], registry=r)
        self.integrity_failures = Counter(
            "transferd_integrity_failures",
            "Chunks or files that failed verification",
            ["peer", "side"],
            registry=r,
        )
        self.auth_failures = Counter(
            "transferd_auth_failures", "Requests refused by authentication", ["reason"], registry=r
        )
        self.policy_refusals = Counter(
            "transferd_policy_refusals", "Transfers refused by policy", ["side"], registry=r
        )
        self.job_seconds = Histogram(
            "transferd_job_duration_seconds",
            "Wall time of replication jobs",
            ["outcome"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200),
            registry=r,
        )
        self.stream_changes = Counter(
            "transferd_stream_changes",
            "Changes of the parallel-stream target, by direction",
            ["peer", "class", "direction"],
            registry=r,
        )
        self.streams_target = Gauge(
            "transferd_streams_target",
            "Parallel chunk uploads the stream controller allows",
            ["peer", "class"],
            registry=r,
        )

        self.messages_sent = Counter(
            "transferd_messages_sent", "Messages queued to a peer", ["peer", "class"], registry=r
        )
        self.messages_delivered = Counter(
            "transferd_messages_delivered",
            "Messages a peer acknowledged",
            ["peer", "class"],
            registry=r,
        )
        self.messages_received = Counter(
            "transferd_messages_received",
            "Messages received from a peer",
            ["peer", "class"],
            registry=r,
        )
        self.messages_received_late = Counter(
            "transferd_messages_received_late",
            "Messages received after their deadline",
            ["peer", "class"],
            registry=r,
        )
        self.budget_misses = Counter(
            "transferd_messages_budget_misses",
            "Messages that missed their deadline, by reason",
            ["peer", "kind"],
            registry=r,
        )

    def count_stream_change(self, peer: str, cls: TrafficClass, change: StreamChange) -> None:
        direction = "up" if change.to_streams > change.from_streams else "down"
        self.stream_changes.labels(peer, cls.value, direction).inc()
        self.streams_target.labels(peer, cls.value).set(change.to_streams)

    def count_compression(self, peer: str, raw_bytes: int, wire_bytes: int) -> None:
        self.compression_in.labels(peer).inc(raw_bytes)
        self.compression_out.labels(peer).inc(wire_bytes)
        raw_total = self.value("transferd_compression_input_bytes_total", peer=peer)
        wire_total = self.value("transferd_compression_output_bytes_total", peer=peer)
        if raw_total:
            self.compression_ratio.labels(peer).set(wire_total / raw_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (for status output and tests); 0 when never touched."""
        got = self.registry.get_sample_value(name, labels)
        return float(got or 0.0)
