"""Rate caps for traffic to one peer: token buckets per traffic class under a total bucket.

Sans-I/O: every call takes `now` (seconds on any monotonic clock) and nothing sleeps; callers ask
`delay_until()` for the time at which a send becomes allowed and re-arm one timer for it.

Theory of operation: a bucket holds up to `burst_bytes` tokens and refills at `rate_bytes_per_s`.
A send of n bytes needs min(n, burst) tokens and then takes all n, so a chunk larger than the
burst goes out as soon as the bucket is full and leaves it in debt (negative); the debt is repaid
before anything else may pass. The long-run rate therefore holds at `rate_bytes_per_s` whatever
the chunk size, and no chunk waits forever (RFC 2697-style metering with deficit carry-over).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from netplan.plan import TrafficClass

__all__ = ["PeerRateLimiter", "RateCap", "TokenBucket", "bytes_per_s"]

_ROUNDING_BYTES = 1e-3


def bytes_per_s(mbps: float) -> float:
    """A rate in Mbit/s (the unit of site configs and plans) in bytes per second (the unit of
    everything inside the daemon)."""
    return mbps * 1e6 / 8


@dataclass(frozen=True)
class RateCap:
    """A configured cap: `rate_bytes_per_s` sustained, `burst_bytes` at once."""

    rate_bytes_per_s: float
    burst_bytes: float

    def __post_init__(self) -> None:
        if not self.rate_bytes_per_s > 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, got {self.rate_bytes_per_s}")
        if not self.burst_bytes > 0:
            raise ValueError(f"burst_bytes must be > 0, got {self.burst_bytes}")

    @classmethod
    def from_rate(
        cls, rate_bytes_per_s: float, burst_s: float = 0.05, min_burst_bytes: float = 16 << 20
    ) -> RateCap:
        # 50 ms of burst keeps a fast pipe busy between timer ticks. The floor of two default
        # chunks (2 x 8 MiB) matters when buckets nest: a class whose own bucket is full while it
        # waits for the total bucket (or its turn) would otherwise lose tokens and fall short of
        # its cap.
        return cls(rate_bytes_per_s, max(rate_bytes_per_s * burst_s, min_burst_bytes))


class TokenBucket:
    """One token bucket. Starts full."""

    def __init__(self, cap: RateCap, now: float) -> None:
        self.cap = cap
        self._tokens = float(cap.burst_bytes)
        self._updated = now

    @property
    def rate_bytes_per_s(self) -> float:
        return self.cap.rate_bytes_per_s

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(
                self.cap.burst_bytes,
                self._tokens + (now - self._updated) * self.cap.rate_bytes_per_s,
            )
            self._updated = now

    def tokens(self, now: float) -> float:
        """Tokens available at `now` (negative while a large send is being repaid)."""
        self._refill(now)
        return self._tokens

    def _needed(self, n: int) -> float:
        return min(float(n), self.cap.burst_bytes)

    def delay_until(self, n: int, now: float) -> float:
        """The earliest time (same clock as `now`) at which `consume(n, t)` succeeds."""
        self._refill(now)
        missing = self._needed(n) - self._tokens
        # A caller that wakes at exactly the returned time must pass despite float rounding.
        if missing <= _ROUNDING_BYTES:
            return now
        return now + missing / self.cap.rate_bytes_per_s

    def can_consume(self, n: int, now: float) -> bool:
        return self.delay_until(n, now) <= now

    def time_to_pass(self, n: int, now: float) -> float:
        """Seconds until a backlog of n bytes (many sends) has passed, from the tokens at `now`."""
        return max(0.0, (n - self.tokens(now)) / self.cap.rate_bytes_per_s)

    def consume(self, n: int, now: float) -> bool:
        """Take n bytes' worth of tokens if allowed at `now`; False (and no change) otherwise."""
        if not self.can_consume(n, now):
            return False
        self._tokens -= n
        return True

    def charge(self, n: int, now: float) -> None:
        """Take n bytes unconditionally (traffic that may not wait, e.g. control messages)."""
        self._refill(now)
        self._tokens -= n


class PeerRateLimiter:
    """Caps for one peer: an optional bucket per traffic class and an optional total bucket.

    A send of class c passes when c's bucket and the total bucket both allow it, and is charged to
    both. Classes without a cap are limited only by the total; with no caps at all it always passes.
    """

    def __init__(
        self,
        now: float,
        class_caps: Mapping[TrafficClass, RateCap] | None = None,
        total_cap: RateCap | None = None,
    ) -> None:
        self.class_buckets: dict[TrafficClass, TokenBucket] = {
            cls: TokenBucket(cap, now) for cls, cap in (class_caps or {}).items()
        }
        self.total_bucket = TokenBucket(total_cap, now) if total_cap is not None else None

    def _buckets(self, cls: TrafficClass) -> list[TokenBucket]:
        buckets = [b for b in (self.class_buckets.get(cls), self.total_bucket) if b is not None]
        return buckets

    def delay_until(self, cls: TrafficClass, n: int, now: float) -> float:
        """When a send of n bytes on `cls` becomes allowed (`now` if it is allowed already)."""
        return max((b.delay_until(n, now) for b in self._buckets(cls)), default=now)

    def can_consume(self, cls: TrafficClass, n: int, now: float) -> bool:
        return self.delay_until(cls, n, now) <= now

    def consume(self, cls: TrafficClass, n: int, now: float) -> bool:
        """Charge n bytes to `cls` and the total if both allow it at `now`; else change nothing."""
        if not self.can_consume(cls, n, now):
            return False
        for bucket in self._buckets(cls):
            bucket.charge(n, now)
        return True

    def charge(self, cls: TrafficClass, n: int, now: float) -> None:
        """Charge n bytes without waiting (strict-priority control traffic still counts)."""
        for bucket in self._buckets(cls):
            bucket.charge(n, now)

    def time_to_pass(self, cls: TrafficClass, n: int, now: float) -> float:
        """Seconds until a backlog of n bytes on `cls` has passed its caps."""
        return max((b.time_to_pass(n, now) for b in self._buckets(cls)), default=0.0)

    def rate_bytes_per_s(self, cls: TrafficClass) -> float:
        """The tightest configured rate for `cls` (infinity when uncapped)."""
        return min((b.rate_bytes_per_s for b in self._buckets(cls)), default=math.inf)
