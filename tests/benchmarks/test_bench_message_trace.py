"""benchmarks.message_trace: a message's stages from the driver's and both daemons' lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bulk_under_hog, message_trace


def _write_run(run_dir: Path, slow_c_in_ms: float, slow_to_q_ms: float = 0.1) -> None:
    a, b, trace = [], [], []
    for n in range(100):
        mid, sent = f"A-1-{n}", 1000.0 + n * 0.005
        c_in = (slow_c_in_ms if n == 7 else 0.2) / 1e3
        arrived = sent + c_in
        queued = arrived + (slow_to_q_ms if n == 9 else 0.1) / 1e3
        taken = queued + 0.0003
        peer_rx = taken + 0.025
        acked = peer_rx + 0.021
        out = acked + 0.0003
        done = out + 0.0002
        a += [{"event": "message.socket", "id": mid, "t": arrived, "out": out},
              {"event": "message.queued", "id": mid, "t": queued},
              {"event": "message.taken", "id": mid, "t": taken},
              {"event": "message.acked", "id": mid, "t": acked, "peer_rx": peer_rx}]
        b.append({"event": "message.received", "id": mid, "t": peer_rx})
        trace.append([mid, sent, done])
    # A loop stall of A's over the slow message, 15 ms of it waiting for the GIL.
    a.append({"event": "loop.stall", "ts": 1000.035 + slow_c_in_ms / 1e3, "ms": 20.0,
              "ran_ms": 1.0, "cpu_wait_ms": 4.0})
    (run_dir / "transferd-A.log").write_text("\n".join(json.dumps(r) for r in a) + "\n")
    (run_dir / "transferd-B.log").write_text("\n".join(json.dumps(r) for r in b) + "\n")
    (run_dir / "transferd-messages.log").write_text(
        "started\n" + json.dumps({"trace": trace}) + "\n")


def test_the_slow_message_s_excess_lands_in_its_stage_with_the_stall_over_it(
        tmp_path: Path) -> None:
    _write_run(tmp_path, slow_c_in_ms=30.0)
    [messages] = message_trace.split_runs(tmp_path, "transferd")
    stalls = message_trace._read_daemon(tmp_path / "transferd-A.log", "A").stalls
    row = message_trace.summarize(messages, stalls)
    assert row["joined"] == 100
    assert row["slow_n"] == 2
    # The slowest two: the 30 ms one and an ordinary one; c_in's excess is their mean's.
    assert row["c_in_slow_excess"] == pytest.approx((29.8 + 0.0) / 2, abs=0.05)
    assert row["out_b_slow_excess"] == pytest.approx(0.0, abs=0.05)
    assert row["stalls_A"] == {"n": 1, "ms": 20.0, "cpu_wait_ms": 4.0, "gil_ms": 15.0}
    assert row["stalls_B"]["n"] == 0


def test_the_time_from_the_socket_to_the_queue_is_its_own_stage(tmp_path: Path) -> None:
    """`message.queued` splits the sending daemon's part before a worker takes the message:
    a slow socket handler on A's loop (to_q) is told apart from a full queue (queue)."""
    _write_run(tmp_path, slow_c_in_ms=0.2, slow_to_q_ms=40.0)
    [messages] = message_trace.split_runs(tmp_path, "transferd")
    row = message_trace.summarize(messages, [])
    assert row["joined"] == 100
    assert row["to_q_slow_excess"] == pytest.approx((39.9 + 0.0) / 2, abs=0.05)
    assert row["queue_slow_excess"] == pytest.approx(0.0, abs=0.05)
    assert row["to_q_p50"] == pytest.approx(0.1, abs=0.01)


def test_one_percentile_for_the_trace_and_bulk_under_hog() -> None:
    """Nearest rank: the p99 of 100 latencies is the 99th smallest, in both tables."""
    latencies = bulk_under_hog._latencies_ms("\n".join(str(v) for v in range(100, 0, -1)))
    assert message_trace.percentile(latencies, 99) == 99.0
    assert message_trace.percentile(latencies, 50) == 50.0
    assert bulk_under_hog.percentile is message_trace.percentile


def test_a_message_missing_a_daemon_line_is_left_out_not_guessed(tmp_path: Path) -> None:
    _write_run(tmp_path, slow_c_in_ms=1.0)
    lines = (tmp_path / "transferd-B.log").read_text().splitlines()
    (tmp_path / "transferd-B.log").write_text("\n".join(lines[1:]) + "\n")
    # A's acked line still carries the peer's receive time: joined from it.
    [messages] = message_trace.split_runs(tmp_path, "transferd")
    assert message_trace.summarize(messages, [])["joined"] == 100
    lines = (tmp_path / "transferd-A.log").read_text().splitlines()
    (tmp_path / "transferd-A.log").write_text(
        "\n".join(line for line in lines if "A-1-0\"" not in line) + "\n")
    [messages] = message_trace.split_runs(tmp_path, "transferd")
    assert message_trace.summarize(messages, [])["joined"] == 99


def test_a_run_dir_that_is_not_a_directory_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        message_trace.main([str(tmp_path / "nope")])
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["--policies", "fast"], "--policies"),
    (["--message-every-s", "0"], "--message-every-s"),
    (["--baseline", "/nonexistent"], "--baseline"),
])
def test_bulk_under_hog_refuses_bad_options_before_starting_anything(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bulk_under_hog.main(argv)
    assert says in capsys.readouterr().err
