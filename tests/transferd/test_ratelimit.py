"""Token buckets and the per-peer limiter on a fake clock: rates hold, caps nest, nothing sleeps."""

from __future__ import annotations

import random

import pytest

from transferd import TrafficClass
from transferd.config import parse_config
from transferd.errors import ConfigError
from transferd.protocol.ratelimit import PeerRateLimiter, RateCap, TokenBucket

MB = 1_000_000


def _saturate(bucket: TokenBucket, chunk: int, seconds: float) -> int:
    """Send `chunk`-byte writes as fast as the bucket allows for `seconds`; bytes allowed."""
    now, sent = 0.0, 0
    while True:
        at = bucket.delay_until(chunk, now)
        if at >= seconds:
            return sent
        now = at
        assert bucket.consume(chunk, now)
        sent += chunk


@pytest.mark.parametrize("chunk", [1500, 64 * 1024, 8 << 20])
def test_token_bucket_rate_holds_within_one_percent_over_ten_seconds(chunk: int) -> None:
    # 8 MiB chunks are larger than a 1 MB burst: they go out in debt and the rate still holds.
    cap = RateCap(50 * MB, 1 * MB)
    sent = _saturate(TokenBucket(cap, now=0.0), chunk, seconds=10.0)
    expected = 50 * MB * 10 + cap.burst_bytes
    assert abs(sent - expected) <= 0.01 * expected + chunk


def test_refused_consume_changes_nothing_and_delay_until_is_exact() -> None:
    bucket = TokenBucket(RateCap(rate_bytes_per_s=1000, burst_bytes=1000), now=0.0)
    assert bucket.consume(1000, 0.0)
    assert not bucket.consume(500, 0.1)  # only 100 tokens refilled
    assert bucket.tokens(0.1) == pytest.approx(100)
    assert bucket.delay_until(500, 0.1) == pytest.approx(0.5)
    assert bucket.consume(500, 0.5)
    assert bucket.tokens(0.5) == pytest.approx(0)


def test_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(RateCap(rate_bytes_per_s=1000, burst_bytes=300), now=0.0)
    assert bucket.tokens(3600.0) == 300
    # A send larger than the burst waits only for a full bucket, then leaves it in debt.
    assert bucket.consume(1000, 3600.0)
    assert bucket.tokens(3600.0) == pytest.approx(-700)
    assert bucket.delay_until(1, 3600.0) == pytest.approx(3600.701)


def test_peer_limiter_holds_class_caps_under_the_total_cap() -> None:
    # checkpoint and sync each capped at 60 MB/s, both together at 100 MB/s; interactive uncapped
    # by class but still inside the total.
    limiter = PeerRateLimiter(
        0.0,
        class_caps={
            TrafficClass.CHECKPOINT: RateCap.from_rate(60 * MB),
            TrafficClass.SYNC: RateCap.from_rate(60 * MB),
        },
        total_cap=RateCap.from_rate(100 * MB),
    )
    rng = random.Random(7)
    sent = dict.fromkeys(TrafficClass, 0)
    now, horizon = 0.0, 10.0
    classes = [TrafficClass.CHECKPOINT, TrafficClass.SYNC, TrafficClass.INTERACTIVE]
    while now < horizon:
        cls = rng.choice(classes)
        size = rng.choice([4096, 256 * 1024, 1 << 20])
        at = limiter.delay_until(cls, size, now)
        if at > now:
            now = min(at, now + 0.001)
            continue
        assert limiter.consume(cls, size, now)
        sent[cls] += size
    total = sum(sent.values())
    burst = 16 << 20  # RateCap.from_rate's floor: each bucket starts full
    assert abs(total - (100 * MB * horizon + burst)) <= 0.01 * 100 * MB * horizon
    for cls in (TrafficClass.CHECKPOINT, TrafficClass.SYNC):
        assert sent[cls] <= (60 * MB * horizon + burst) * 1.01
    assert sent[TrafficClass.INTERACTIVE] > 0


def test_class_cap_refusal_charges_neither_bucket() -> None:
    limiter = PeerRateLimiter(
        0.0,
        class_caps={TrafficClass.SYNC: RateCap(rate_bytes_per_s=100, burst_bytes=100)},
        total_cap=RateCap(rate_bytes_per_s=1000, burst_bytes=1000),
    )
    assert limiter.consume(TrafficClass.SYNC, 100, 0.0)
    assert not limiter.consume(TrafficClass.SYNC, 100, 0.0)
    assert limiter.total_bucket is not None
    assert limiter.total_bucket.tokens(0.0) == pytest.approx(900)
    assert limiter.delay_until(TrafficClass.SYNC, 100, 0.0) == pytest.approx(1.0)
    # checkpoint has no class cap: only the total applies.
    assert limiter.consume(TrafficClass.CHECKPOINT, 900, 0.0)
    assert limiter.rate_bytes_per_s(TrafficClass.SYNC) == 100
    assert limiter.rate_bytes_per_s(TrafficClass.CHECKPOINT) == 1000


def test_uncapped_limiter_always_passes() -> None:
    limiter = PeerRateLimiter(0.0)
    assert limiter.consume(TrafficClass.CHECKPOINT, 1 << 40, 0.0)
    assert limiter.rate_bytes_per_s(TrafficClass.CHECKPOINT) == float("inf")


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0)])
def test_rate_cap_rejects_non_positive_values(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        RateCap(rate, burst)


SITE_YAML = """\
site: A
listen: 127.0.0.1:7701
data_dir: ./site-a
keys_dir: ./keys
peers:
  B:
    url: http://127.0.0.1:7702
    rate_caps_mbps:
      total: 1000
      sync: {sync}
traffic:
  weights: {{checkpoint: 5, sync: 1}}
  streams_min: {streams_min}
  streams_max: 16
"""


def test_site_config_carries_rate_caps_and_weights() -> None:
    config = parse_config(SITE_YAML.format(sync=100, streams_min=2))
    caps = config.peers["B"].rate_caps_mbps
    assert caps.total == 1000
    assert caps.per_class() == {TrafficClass.SYNC: 100}
    assert config.traffic.weights.checkpoint == 5
    assert config.traffic.streams_max == 16


def test_bad_rate_cap_names_the_field_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SITE_YAML.format(sync=-5, streams_min=2))
    [issue] = info.value.issues
    assert issue.startswith("peers.B.rate_caps_mbps.sync:")
    assert "(line 10)" in issue


def test_stream_bounds_must_nest() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SITE_YAML.format(sync=100, streams_min=20))
    assert any("streams_min must be <= streams_max" in issue for issue in info.value.issues)


def test_the_old_rate_caps_spelling_is_an_error_naming_the_new_field() -> None:
    old = SITE_YAML.format(sync=100, streams_min=2).replace("rate_caps_mbps:", "rate_caps:")
    old = old.replace("total:", "total_mbit_s:").replace("sync: 100", "sync_mbit_s: 100")
    with pytest.raises(ConfigError) as info:
        parse_config(old)
    [issue] = info.value.issues
    assert issue.startswith("peers.B:")
    assert "rate_caps was renamed to rate_caps_mbps" in issue
    assert "(line 6)" in issue  # peers.B
