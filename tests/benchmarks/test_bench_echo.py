"""The TCP echo's round trips with their start times (`--times`): the interactive-during-bulk
floor keeps those that started while the bulk ran. Real processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks._echo import started_by
from benchmarks.lab import python_env
from transferd.testing import free_port


def test_the_echo_client_times_each_round_trip_from_when_it_started() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks._echo", "serve", "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE,
                              env=python_env())
    try:
        assert server.stdout is not None
        assert server.stdout.readline().decode().strip() == "ready"
        before = time.time()
        out = subprocess.run([sys.executable, "-m", "benchmarks._echo", "client", "--host",
                              "127.0.0.1", "--port", str(port), "--count", "4", "--size", "4096",
                              "--interval-ms", "20", "--times"],
                             capture_output=True, text=True, env=python_env(), timeout=60,
                             check=True)
        after = time.time()
        # Without --times: the milliseconds alone, as the lab's RTT check reads them.
        plain = subprocess.run([sys.executable, "-m", "benchmarks._echo", "client", "--host",
                                "127.0.0.1", "--port", str(port), "--count", "2"],
                               capture_output=True, text=True, env=python_env(), timeout=60,
                               check=True)
    finally:
        server.kill()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    pairs = json.loads(out.stdout)
    assert len(pairs) == 4
    starts = [started for started, _ in pairs]
    assert before <= starts[0]
    assert starts == sorted(starts)
    assert starts[-1] <= after
    # 20 ms apart at least: each starts after the one before came back and the pause.
    assert all(b - a >= 0.02 for a, b in zip(starts, starts[1:], strict=False))
    assert all(ms > 0 for _, ms in pairs)
    assert [type(ms) for ms in json.loads(plain.stdout)] == [float, float]


def test_the_floor_keeps_the_round_trips_that_started_while_the_load_ran() -> None:
    rtts = [(100.0, 52.0), (100.05, 61.0), (109.9, 55.0), (110.0, 47.0), (110.2, 40.1),
            (130.0, 40.0)]
    assert started_by(rtts, until=110.0) == [52.0, 61.0, 55.0, 47.0]
    assert started_by(rtts, until=99.0) == []
