"""The adaptive parallel-stream controller: how many concurrent chunk uploads a bulk class keeps
to one peer. Sans-I/O: `on_sample(now, bytes_acked, errors)` in, `target_streams` out,
`next_deadline()` when the current measurement window closes.

Theory of operation. On a long fat pipe one TCP stream is capped by window/RTT (or by the loss
rate, Mathis et al. 1997: rate <= MSS/RTT * 1.22/sqrt(p)), so N streams carry about N times as
much until the link is full (GridFTP, Skyplane). Like FTS3's optimizer, the controller measures
goodput per window and:
- grows while goodput rises: doubling from the start (2, 4, 8, ...), then +1 once a doubling
  stops paying (the slow-start/congestion-avoidance split of TCP);
- keeps a step only if goodput rose by at least `grow_gain` (5 %); otherwise it returns to the
  previous count and waits `probe_cooldown_windows` before probing again, doubling that wait after
  each failed probe (hysteresis: a saturated link is probed ever more rarely, never oscillated);
- backs off multiplicatively (x `backoff`) when a window has more than `error_tolerance` errors,
  or when goodput stays more than `fall_threshold` (20 %) below its running average for two
  windows in a row;
- widens its margins to the windows' quantization noise q (goodput is counted in whole
  acknowledged chunks: with 8 MiB chunks at ~1 Gbit/s one chunk more or less is q = 7 % of a
  1 s window): a probe must gain more than q, a fall must exceed 2q (the largest error between
  two windows), or single windows would trigger growth and backoff alike;
- discards the first window after every change, while new streams ramp up;
- stays within `min_streams..max_streams` (1..32);
- given what the sockets say about the path (`on_path`: loss rate, RTT, MSS, from TCP_INFO),
  probes only while the streams are loss-limited: each carries within a factor 2 of the Mathis
  bound MSS/RTT * 1.22/sqrt(p) (a loss-based congestion control such as cubic, at its ceiling
  on a lossy link, where another stream adds another share). A stream well above that bound
  on a lossy path (bbr, which paces at the measured bottleneck rate and does not back off per
  loss) is capacity-limited: more streams only add competing flows, losses and a longer tail,
  so the count holds. Without loss, the sockets' own account of their time decides (TCP_INFO's
  busy, receive-window-limited and send-buffer-limited times, kernel 4.10+): streams that had
  data in flight nearly all the window (BUSY_SHARE) and were held by neither window for more than
  HELD_SHARE of it are paced or clocked by the path itself, so the path is full and the count
  holds too. Measured on a clean 1 Gbit/s link with bbr: each probe from 2 to 4 streams cost
  4-6 % of the goodput for its two windows and was undone ("no gain"). Streams held back by
  the receiver's window (a receiver writing to a slow disk) or a small send buffer, or idle
  part of the window, may still gain from another stream: the controller probes. Without such
  path samples it probes as FTS3 does.
Every change is kept as a `StreamChange` with its reason, for a log line and a metric.
`net.pump.BulkGate` is the thin asyncio adapter that admits each chunk upload.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["PathSample", "StreamChange", "StreamController"]

MATHIS_C = 1.22  # sqrt(3/2): Mathis et al. 1997, periodic loss, delayed ACKs off
BUSY_SHARE = 0.9  # of the streams' time with data in flight, at least (the path sets the pace)
HELD_SHARE = 0.05  # of that time held by the receive window or the send buffer, at most


@dataclass(frozen=True)
class StreamChange:
    at: float
    from_streams: int
    to_streams: int
    reason: str
    goodput_bytes_per_s: float


@dataclass(frozen=True)
class PathSample:
    """The streams' sockets over a window: segments sent and retransmitted, smoothed RTT, MSS."""

    segs_out: int
    retrans: int
    rtt_s: float
    mss: int
    # Summed over the streams (None where the kernel does not say): the time they had data in
    # flight, the part of it the receive window or send buffer held them back, and the time
    # the sample covers (each stream's own span since its last sample).
    busy_s: float | None = None
    held_s: float | None = None
    span_s: float | None = None

    def path_bound(self) -> bool | None:
        """Whether the streams spent the sample sending, held back by neither window (so the
        path paced them); None where the kernel gave no such times."""
        if self.busy_s is None or self.held_s is None or not self.span_s:
            return None
        return (self.busy_s >= BUSY_SHARE * self.span_s
                and self.held_s <= HELD_SHARE * self.busy_s)

    @property
    def loss(self) -> float:
        return self.retrans / self.segs_out if self.segs_out > 0 else 0.0

    def mathis_bytes_per_s(self) -> float | None:
        """One loss-based stream's ceiling at this loss and RTT; None without loss."""
        if self.loss <= 0 or self.rtt_s <= 0:
            return None
        return self.mss / self.rtt_s * MATHIS_C / math.sqrt(self.loss)

    def describe(self) -> str:
        return f"loss {self.loss:.2%}, RTT {self.rtt_s * 1000:.0f} ms"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.0f} Mbit/s"


class StreamController:
    def __init__(
        self,
        now: float,
        *,
        initial_streams: int = 2,
        min_streams: int = 1,
        max_streams: int = 32,
        window_s: float = 1.0,
        grow_gain: float = 0.05,
        fall_threshold: float = 0.20,
        backoff: float = 0.5,
        error_tolerance: int = 0,
        probe_cooldown_windows: int = 5,
        max_cooldown_windows: int = 60,
        history: int = 1000,
    ) -> None:
        if not 1 <= min_streams <= initial_streams <= max_streams:
            raise ValueError(
                f"need 1 <= min_streams ({min_streams}) <= initial_streams ({initial_streams})"
                f" <= max_streams ({max_streams})"
            )
        if window_s <= 0 or not 0 < backoff < 1:
            raise ValueError("window_s must be > 0 and backoff in (0, 1)")
        self.min_streams = min_streams
        self.max_streams = max_streams
        self.window_s = window_s
        self.grow_gain = grow_gain
        self.fall_threshold = fall_threshold
        self.backoff = backoff
        self.error_tolerance = error_tolerance
        self.probe_cooldown_windows = probe_cooldown_windows
        self.max_cooldown_windows = max_cooldown_windows
        self.target_streams = initial_streams
        self.changes: deque[StreamChange] = deque(maxlen=history)
        self._unreported: list[StreamChange] = []
        self._window_start = now
        self._window_bytes = 0
        self._window_errors = 0
        self._slow_start = True
        self._probe: tuple[int, float] | None = None  # (streams before the probe, their goodput)
        self._reference: float | None = None  # running goodput at the current count
        self._settle = 1
        self._cooldown = 0
        self._next_cooldown = probe_cooldown_windows
        self._low_windows = 0  # consecutive windows below the fall threshold
        self._sample_bytes: float | None = None  # running mean size of one acknowledgement
        self._path: PathSample | None = None  # the latest TCP_INFO summary of the streams

    def next_deadline(self) -> float:
        """When the current window closes (call `on_sample(now, 0, 0)` then if nothing came)."""
        return self._window_start + self.window_s

    def on_sample(self, now: float, bytes_acked: int, errors: int = 0) -> int:
        """Account acknowledged bytes and failed requests; returns the (maybe new) target."""
        self._window_bytes += bytes_acked
        self._window_errors += errors
        if bytes_acked > 0:
            self._sample_bytes = (
                bytes_acked
                if self._sample_bytes is None
                else 0.9 * self._sample_bytes + 0.1 * bytes_acked
            )
        elapsed = now - self._window_start
        if elapsed >= self.window_s:
            self._evaluate(now, self._window_bytes / elapsed, self._window_errors)
            self._window_start = now
            self._window_bytes = 0
            self._window_errors = 0
        return self.target_streams

    def on_path(self, sample: PathSample) -> None:
        """What the streams' sockets measured (loss rate, RTT, MSS) since the last sample."""
        self._path = sample

    def loss_limited(self, goodput: float) -> bool | None:
        """Whether each stream runs at its loss ceiling (None: unknown, with no path samples,
        or no loss and no sign the path paces the streams: then something else may hold a
        stream back, a window, a receiver writing to disk, and a probe finds out)."""
        if self._path is None:
            return None
        bound = self._path.mathis_bytes_per_s()
        if bound is None:
            # No loss: streams the path paces are not held by loss (False); else unknown.
            return False if self._path.path_bound() else None
        # At the ceiling (within a factor 2 of it either way); far above it the streams are
        # not held by loss at all (bbr).
        return 0.5 * bound <= goodput / self.target_streams <= 2 * bound

    def pop_changes(self) -> list[StreamChange]:
        """Changes since the last call (the daemon logs each one and bumps a counter)."""
        changes, self._unreported = self._unreported, []
        return changes

    def _change(self, now: float, to: int, reason: str, goodput: float) -> None:
        to = max(self.min_streams, min(self.max_streams, to))
        if to == self.target_streams:
            return
        change = StreamChange(now, self.target_streams, to, reason, goodput)
        self.changes.append(change)
        self._unreported.append(change)
        self.target_streams = to
        self._settle = 1

    def _noise(self, goodput: float) -> float:
        """q: one acknowledgement's share of a window at this goodput."""
        if not self._sample_bytes or goodput <= 0:
            return 0.0
        return self._sample_bytes / (goodput * self.window_s)

    def _evaluate(self, now: float, goodput: float, errors: int) -> None:
        n = self.target_streams
        if errors > self.error_tolerance:
            self._slow_start = False
            self._probe = None
            self._reference = None
            self._cooldown = self._next_cooldown
            reduced = min(n - 1, math.floor(n * self.backoff))
            self._change(now, reduced, f"{errors} errors in {self.window_s:g} s window", goodput)
            self._settle = 1
            return
        if goodput <= 0:
            return  # an idle window says nothing about the link
        if self._settle > 0:
            self._settle -= 1
            return
        if self._probe is not None:
            base_n, base_goodput = self._probe
            self._probe = None
            if goodput < base_goodput * (1 + max(self.grow_gain, self._noise(base_goodput))):
                self._slow_start = False
                self._reference = base_goodput
                self._cooldown = self._next_cooldown
                self._next_cooldown = min(self._next_cooldown * 2, self.max_cooldown_windows)
                self._change(
                    now,
                    base_n,
                    f"no gain: {_rate(goodput)} at {n} streams vs {_rate(base_goodput)} at "
                    f"{base_n}",
                    goodput,
                )
                return
            self._next_cooldown = self.probe_cooldown_windows
            self._reference = goodput
        elif self._reference is not None and goodput < self._reference * (
            1 - max(self.fall_threshold, 2 * self._noise(self._reference))
        ):
            self._low_windows += 1
            if self._low_windows < 2:
                return  # one low window is as likely a chunk that landed just after it closed
            self._low_windows = 0
            self._slow_start = False
            previous = self._reference
            self._reference = None
            self._cooldown = self._next_cooldown
            reduced = min(n - 1, math.floor(n * (1 - (1 - self.backoff) / 2)))
            self._change(
                now,
                reduced,
                f"goodput fell to {_rate(goodput)} from {_rate(previous)}",
                goodput,
            )
            return
        else:
            self._low_windows = 0
            self._reference = (
                goodput if self._reference is None else 0.7 * self._reference + 0.3 * goodput
            )
        if self._cooldown > 0:
            self._cooldown -= 1
            return
        if n >= self.max_streams:
            return
        limited = self.loss_limited(goodput)
        if limited is False:
            return  # capacity-limited streams: another one would only compete
        grown = n * 2 if self._slow_start or limited else n + 1
        assert self._reference is not None
        self._probe = (n, self._reference)
        why = (
            f"each stream is loss-limited ({self._path.describe()})"
            if limited and self._path is not None
            else "no errors"
        )
        self._change(
            now, grown, f"probing: {_rate(self._reference)} at {n} streams, {why}", goodput
        )
