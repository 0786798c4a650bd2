"""The backend probe (with a fake kernel, and the real one), the delay line's release schedule,
and the rules that reject a run whose emulator, not the link, set the pace."""

from __future__ import annotations

import errno
import random
import struct
import subprocess
from collections.abc import Callable, Sequence

import pytest

from benchmarks._nfqueue import DelayLine, parse_datagram
from benchmarks.backends import EmulatorSample, probe_backend, rejection
from benchmarks.errors import LabError

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def fake_kernel(*, netem: bool, nft: bool, iptables: bool) -> tuple[Runner, list[list[str]]]:
    calls: list[list[str]] = []

    def run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(cmd))
        ok = True
        if "netem" in cmd:
            ok = netem
        elif "nft" in cmd:
            ok = nft
        elif "iptables" in cmd:
            ok = iptables
        return subprocess.CompletedProcess(list(cmd), 0 if ok else 2, "",
                                           "" if ok else "Error: Specified qdisc kind is unknown.")

    return run, calls


def test_probe_prefers_netem_when_the_kernel_has_it() -> None:
    run, calls = fake_kernel(netem=True, nft=True, iptables=True)
    choice = probe_backend(run, which=lambda name: f"/usr/sbin/{name}")
    assert choice.name == "netem"
    assert calls[-1][:3] == ["ip", "netns", "del"]  # the probe namespace is removed


def test_probe_falls_back_to_nfqueue_and_records_why() -> None:
    run, _ = fake_kernel(netem=False, nft=False, iptables=True)
    choice = probe_backend(run, which=lambda name: f"/usr/sbin/{name}")
    assert choice.name == "userspace-nfqueue"
    assert choice.rule_tool == "iptables"
    assert any("sch_netem: Error: Specified qdisc kind is unknown." in r for r in choice.reasons)


def test_probe_prefers_nft_when_it_can_queue() -> None:
    run, _ = fake_kernel(netem=False, nft=True, iptables=True)
    assert probe_backend(run, which=lambda name: f"/usr/sbin/{name}").rule_tool == "nft"


def test_probe_falls_back_to_a_tun_pair_without_iptables() -> None:
    run, _ = fake_kernel(netem=False, nft=False, iptables=False)
    which = {"ip": "/usr/sbin/ip", "tc": "/usr/sbin/tc"}.get
    choice = probe_backend(run, which=which, tun_available=lambda: True)
    assert choice.name == "userspace-tun"
    assert "iptables: not installed" in choice.reasons


def test_probe_without_any_backend_fails_with_the_reasons() -> None:
    run, calls = fake_kernel(netem=False, nft=False, iptables=False)
    with pytest.raises(LabError, match="no impairment backend.*sch_netem.*tun: missing"):
        probe_backend(run, which=lambda name: f"/usr/sbin/{name}", tun_available=lambda: False)
    assert calls[-1][:3] == ["ip", "netns", "del"]


def test_delay_line_holds_each_packet_for_the_delay_and_batches_releases() -> None:
    line = DelayLine(delay_s=0.020)
    for packet_id in range(5):
        assert line.arrive(0, packet_id, now=1.000 + packet_id * 0.001)
    line.arrive(1, 100, now=1.002)
    assert line.due(1.0195) == []
    assert line.next_deadline() == pytest.approx(1.020)
    # At 1.0225 packets 0..2 of queue 0 and packet 100 of queue 1 are due: one verdict each.
    assert line.due(1.0225) == [(0, 2), (1, 100)]
    assert line.release_all() == [(0, 4)]


def test_jitter_never_reorders_a_direction() -> None:
    line = DelayLine(delay_s=0.030, jitter_s=0.030, rng=random.Random(7))
    for packet_id in range(2000):
        line.arrive(0, packet_id, now=packet_id * 0.0001)
    released = []
    now = 0.0
    while line.next_deadline() is not None:
        now = line.next_deadline() or now
        released += [last for _, last in line.due(now)]
    assert released == sorted(released)
    assert released[-1] == 1999


def test_loss_drops_about_the_asked_fraction_reproducibly() -> None:
    def lost(seed: int) -> int:
        line = DelayLine(delay_s=0.0, loss=0.02, rng=random.Random(seed))
        return sum(not line.arrive(0, i, now=0.0) for i in range(50_000))

    assert lost(1) == lost(1)
    assert 800 < lost(1) < 1200


def sample(cpu: float, wall: float, dropped: int = 0) -> EmulatorSample:
    return EmulatorSample(cpu_s=(cpu, 0.0), wall_s=(wall, wall), received=0, lost=0,
                          self_dropped=dropped)


def test_rejects_runs_where_the_emulator_dropped_or_was_cpu_bound() -> None:
    assert rejection(sample(0, 0), sample(3, 10)) is None
    reason = rejection(sample(0, 0), sample(3, 10, dropped=4)) or ""
    assert "dropped 4 packets on its own" in reason
    reason = rejection(sample(0, 0), sample(9.5, 10)) or ""
    assert "95% of a core" in reason


def _nlmsg(msg_type: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, 0, 1, 0) + payload


def test_netlink_datagrams_parse_into_packet_ids_and_error_kinds() -> None:
    packet_hdr = struct.pack("=HH", 4 + 7, 1) + struct.pack("!IHB", 4242, 0x0800, 3) + b"\0"
    mark = struct.pack("=HH", 8, 3) + b"\0\0\0\1"  # another attribute before the header
    packet = _nlmsg((3 << 8) | 0, struct.pack("!BBH", 0, 0, 1) + mark + packet_hdr)
    flushed = _nlmsg(2, struct.pack("=i", -errno.ENOENT) + b"\0" * 16)
    refused = _nlmsg(2, struct.pack("=i", -errno.EINVAL) + b"\0" * 16)
    ack = _nlmsg(2, struct.pack("=i", 0) + b"\0" * 16)
    data = packet + flushed + refused + ack
    assert parse_datagram(data, len(data)) == ([(1, 4242)], 1, 1)
