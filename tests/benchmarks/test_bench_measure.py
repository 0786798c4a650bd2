"""The machine counters a run records (`HostSample`) and the quiet-machine rule each repeat
waits for (`quiet`), on made-up samples: no sleeping, no /proc of a particular host."""

from __future__ import annotations

import os

import pytest

from benchmarks.measure import CLK_TCK, SECTOR_BYTES, HostSample, quiet, thread_cpu_s


def _sample(*, steal: int = 0, written: int = 0, busy: int = 0) -> HostSample:
    return HostSample(busy=busy, iowait=0, steal=steal, written_sectors=written,
                      discarded_sectors=0)


def test_a_window_with_disk_writes_is_not_quiet() -> None:
    # The previous run's bytes still being written back: the next run would compete with it.
    assert not quiet(_sample(written=100), _sample(written=100 + 2048), 0.5)


def test_a_window_where_the_hypervisor_took_a_fifth_of_a_cpu_is_not_quiet() -> None:
    stolen = round(0.2 * CLK_TCK * 0.5) or 1
    assert not quiet(_sample(steal=10), _sample(steal=10 + stolen), 0.5)


def test_an_idle_window_is_quiet() -> None:
    assert quiet(_sample(steal=5, written=7), _sample(steal=5, written=7), 0.5)


def test_since_reports_seconds_and_mib() -> None:
    before = _sample(busy=0, steal=0, written=0)
    after = _sample(busy=3 * CLK_TCK, steal=CLK_TCK, written=2 * 2**20 // SECTOR_BYTES * 1024)
    got = after.since(before)
    assert got["busy_cpu_s"] == 3.0
    assert got["steal_s"] == 1.0
    assert got["disk_written_mib"] == 2048.0


def test_this_machine_gives_a_sample_and_this_process_its_threads() -> None:
    assert HostSample.now() is not None
    threads = thread_cpu_s(os.getpid())
    assert threads
    assert all(v >= 0 for v in threads.values())


def test_loopback_floor_refuses_a_size_it_cannot_cut_into_chunks(
        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.loopback_floor import main

    with pytest.raises(SystemExit) as exc:
        main(["--mib", "7"])
    assert exc.value.code == 2
    assert "--mib: a multiple of 8" in capsys.readouterr().err
