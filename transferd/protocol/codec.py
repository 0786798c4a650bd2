"""zstd framing of chunk bodies, and the rule that decides when compression pays.

Theory of operation (`auto`): sending n bytes raw costs n / L (L: link goodput, bytes/s);
compressing costs n / (C * workers) of CPU time (C: zstd input bytes/s per worker), overlapped
with sending n * ratio bytes. So compression pays when the pipeline's bottleneck gets faster:
min(C * workers, L / ratio) > L. The ratio is probed on a small sample of each chunk (cheap); a
chunk whose sample does not shrink by >= 5 % is sent raw. Compressor speed, ratio and link
goodput are running averages fed by measurements; time is a parameter, so the rule is tested
without sockets or sleeps.

The level (`auto`): a higher zstd level packs tighter and runs slower. On a link far slower than
the compressor the spare CPU buys bytes off the wire: `auto` compresses each chunk at the
highest level of LEVELS whose estimated speed keeps the link fed HEADROOM times over, i.e.
speed(level) * workers >= HEADROOM * link / ratio (the raw bytes/s the link drains). The speeds
are one measured number (the compressor's level-1-equivalent rate, each measurement at level L
divided by RELATIVE_SPEED[L]) times that table, so a level that runs slower than the table says
lowers the estimate and the choice steps back down. Measured on checkpoint-like bf16 shards
(8 MiB chunks, this repository's benchmark data): level 1 packs to 0.374 at ~250 MB/s per core,
3 to 0.368 at ~0.65x that, 6 to 0.360 at ~0.2x. On the 50 Mbit/s edge link (6 MB/s of wire
against ~500 MB/s of two level-1 workers) that is level 6: 4 % fewer bytes on the wire; on a
1 Gbit/s link the same data stays at level 1. Levels past 6 cost another 2x per 1 % saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from transferd.errors import IntegrityError, ProtocolError
from transferd.protocol.chunks import Encoding

__all__ = ["CompressionPolicy", "Encoded", "decode_body", "zstd_compress"]

MIN_SAVING = 0.05  # the rule: skip chunks that do not shrink by >= 5 %
# After this many probes in a row that did not shrink (incompressible data: random, already
# compressed, encrypted), only every RAW_PROBE_EVERY-th chunk is probed again: a folder may
# still hold compressible files further on, but probing every chunk of a random 2 GiB file
# costs a zstd pass over 1.5 % of it for nothing.
RAW_STREAK = 4
RAW_PROBE_EVERY = 16
SAMPLE_BYTES = 128 * 1024
_EWMA = 0.3
# `auto`'s levels, and each one's speed relative to level 1 (zstd 1.5, bf16 checkpoint shards and
# text alike within ~20 %; only the first guess: measurements correct it).
LEVELS = (1, 3, 6)
RELATIVE_SPEED = {1: 1.0, 3: 0.65, 6: 0.2}
LINK_SAMPLES = 3
HEADROOM = 3.0  # the compressor must outrun the link this many times over at a level


def zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decode_body(body: bytes | memoryview, encoding: str, raw_length: int) -> bytes | memoryview:
    """The raw chunk bytes of a PUT body (`identity` or `zstd`), bounded by its declared length."""
    if encoding == "identity":
        if len(body) != raw_length:
            raise IntegrityError(f"body is {len(body)} bytes, declared {raw_length}")
        return body
    if encoding != "zstd":
        raise ProtocolError(f"unknown chunk encoding {encoding[:32]!r}")
    try:
        out = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"zstd frame does not decode: {exc}") from exc
    if len(out) != raw_length:
        raise IntegrityError(f"zstd frame decodes to {len(out)} bytes, declared {raw_length}")
    return out


@dataclass(frozen=True)
class Encoded:
    encoding: Encoding
    body: bytes | memoryview
    raw_length: int


@dataclass
class CompressionPolicy:
    """Per-peer compression decisions. `level` None means never compress; `auto` adapts."""

    level: int | None  # the configured level (`auto`: the lowest, probes run at it)
    auto: bool
    workers: int = 2
    # measured zstd input throughput per worker (`auto`: at level 1, or its equivalent)
    compress_bytes_per_s: float | None = None
    link_bytes_per_s: float | None = None  # measured goodput of chunk bodies on the wire
    link_samples: int = 0  # receipts that measured it
    ratio: float | None = None  # running compressed/raw ratio of the samples that shrank
    raw_streak: int = 0  # probes in a row whose sample did not shrink
    unprobed: int = 0  # chunks sent without a probe since the last one

    @classmethod
    def from_setting(cls, setting: str | int, workers: int) -> CompressionPolicy:
        if setting == "off":
            return cls(level=None, auto=False, workers=workers)
        if setting == "auto":
            return cls(level=1, auto=True, workers=workers)
        return cls(level=int(setting), auto=False, workers=workers)

    def observe_compression(self, input_bytes: int, seconds: float,
                            level: int | None = None) -> None:
        """One chunk compressed at `level` (default: the configured one) took `seconds`."""
        if seconds > 0 and input_bytes > 0:
            speed = input_bytes / seconds
            if self.auto and level is not None:
                speed /= RELATIVE_SPEED.get(level, 1.0)
            self.compress_bytes_per_s = _ewma(self.compress_bytes_per_s, speed)

    def compress_level(self) -> int | None:
        """The level to compress the next chunk at: the configured one, or under `auto` the
        highest of LEVELS the compressor sustains HEADROOM times over the link's raw rate
        (level 1 until the compressor and LINK_SAMPLES receipts have measured the link: the
        first chunks' receipts, still in TCP's ramp, under-rate a fast link)."""
        if not self.auto or self.level is None:
            return self.level
        link, speed = self.link_bytes_per_s, self.compress_bytes_per_s
        if link is None or speed is None or self.link_samples < LINK_SAMPLES:
            return self.level
        raw_rate = link / max(self.ratio or 1.0, 0.01)
        chosen = self.level
        for level in LEVELS:
            if level > chosen and speed * RELATIVE_SPEED[level] * self.workers >= (
                    HEADROOM * raw_rate):
                chosen = level
        return chosen

    def observe_link(self, wire_bytes: int, seconds: float) -> None:
        """Aggregate goodput over a window (all streams), as measured by the sender."""
        if seconds > 0 and wire_bytes > 0:
            self.link_bytes_per_s = _ewma(self.link_bytes_per_s, wire_bytes / seconds)
            self.link_samples += 1

    def should_try(self) -> bool:
        """Before probing a chunk: is compression worth considering at all on this link (and
        for this data: after RAW_STREAK incompressible samples, one chunk in RAW_PROBE_EVERY)?"""
        if self.level is None:
            return False
        if self.raw_streak >= RAW_STREAK:
            self.unprobed += 1
            if self.unprobed < RAW_PROBE_EVERY:
                return False
            self.unprobed = 0
        if not self.auto:
            return True
        if self.link_bytes_per_s is None or self.compress_bytes_per_s is None:
            # Unknown link or compressor: probe. Compressing the first chunks on a fast link
            # costs a few chunks' CPU until their receipts measure it; sending them raw on a
            # slow one costs those chunks' whole saving (a quarter of a 256 MiB checkpoint
            # at 50 Mbit/s went raw that way).
            return True
        # Compression can only pay (for any ratio < 1) when the compressor outruns the link.
        return self.compress_bytes_per_s * self.workers > self.link_bytes_per_s

    def pays(self, ratio: float) -> bool:
        """Given a sample's compressed/raw ratio, does compressing this chunk pay?"""
        if self.level is None or ratio > 1.0 - MIN_SAVING:
            return False
        if not self.auto:
            return True
        if self.link_bytes_per_s is None or self.compress_bytes_per_s is None:
            return True  # the sample shrinks; the first receipts will say whether it pays
        link = self.link_bytes_per_s
        return min(self.compress_bytes_per_s * self.workers, link / ratio) > link

    def probe_ratio(self, data: bytes | memoryview) -> float:
        """compressed/raw size of a sample from the middle of the chunk (zstd level as set)."""
        n = len(data)
        if n == 0 or self.level is None:
            return 1.0
        start = max(0, n // 2 - SAMPLE_BYTES // 2)
        sample = data[start : start + SAMPLE_BYTES]
        ratio = len(zstd_compress(sample, self.level)) / len(sample)
        self.raw_streak = self.raw_streak + 1 if ratio > 1.0 - MIN_SAVING else 0
        if self.raw_streak == 0:
            self.ratio = _ewma(self.ratio, ratio)
        return ratio


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new
