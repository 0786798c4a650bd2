"""The same sweep answered in this process, on local worker processes and on a Dask cluster
(a `LocalCluster` with worker processes): identical results, and no process left behind."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_whatif import _estate, _scenario

from netplan.executors import (
    DaskExecutor,
    ExecutorError,
    LocalExecutor,
    SerialExecutor,
    run_whatif,
)
from netplan.loader import load_topology
from netplan.scenarios import sweep

REPO = Path(__file__).resolve().parents[2]


def _children() -> set[int]:
    """This process's descendants, except multiprocessing's resource tracker: the standard
    library starts one per process that spawns workers, and it exits with that process."""
    psutil = pytest.importorskip("psutil")
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}


@contextlib.contextmanager
def _local_cluster() -> Iterator[Any]:
    """Two worker processes, one thread each, no dashboard. The scheduler still serves its
    HTTP routes (health, metrics) without one, on the dashboard's default port 8787 unless
    told otherwise: an ephemeral port on 127.0.0.1, so two suites on one host (or anything
    else on 8787) do not collide ("Port 8787 is already in use" is a warning, an error here)."""
    distributed = pytest.importorskip("distributed", reason="dask.distributed is the [whatif] "
                                      "extra")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                  silence_logs=logging.ERROR) as running:
        yield running


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """`_local_cluster`, closed (workers and nannies stopped) when the module's tests are
    done."""
    before = _children()
    with _local_cluster() as running:
        yield running
    assert _children() == before  # every worker process has exited


def test_a_cluster_starts_while_another_process_holds_port_8787() -> None:
    """Another suite's cluster (or any server) on 8787 made the fixture fail at setup."""
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
        except OSError:
            pass  # something else holds it already: the same case
        before = _children()
        with _local_cluster() as running:
            assert running.scheduler_address.startswith("tcp://")
        assert _children() == before


def test_local_processes_and_a_dask_cluster_answer_exactly_like_this_process(
        cluster: Any) -> None:
    topo = _estate(40, 3)
    scenarios = [*sweep(topo, "n-1"), _scenario("price egress:*=x2"),
                 _scenario(f"gpus site:{topo.sites[0].id}=-50%")]
    before = _children()
    serial = run_whatif(topo, scenarios, SerialExecutor())
    assert serial.stats()["scenarios_evaluated"] > 10  # (enough to spread over workers)
    local = run_whatif(topo, scenarios, LocalExecutor(2))
    assert local.scenarios == serial.scenarios
    assert _children() == before  # the local workers are gone
    executor = DaskExecutor(cluster.scheduler_address)
    on_dask = run_whatif(topo, scenarios, executor)
    assert executor.workers == 2
    assert on_dask.scenarios == serial.scenarios
    assert on_dask.to_json() == serial.to_json()


def test_the_shipped_topologies_sweep_the_same_on_dask(cluster: Any) -> None:
    for path in sorted((REPO / "topologies").glob("*.yaml")):
        topo = load_topology(path)
        here = run_whatif(topo, sweep(topo, "n-1"), SerialExecutor())
        there = run_whatif(topo, sweep(topo, "n-1"), DaskExecutor(cluster.scheduler_address))
        assert there.to_json() == here.to_json(), topo.name


def test_an_unreachable_scheduler_is_a_clear_error() -> None:
    pytest.importorskip("distributed")
    topo = load_topology(REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml")
    with pytest.raises(ExecutorError, match=r"cannot reach the Dask scheduler at "
                       r"tcp://127\.0\.0\.1:9: "):
        run_whatif(topo, sweep(topo, "n-1"), DaskExecutor("tcp://127.0.0.1:9", timeout_s=1))


def test_the_command_runs_a_sweep_on_the_cluster_it_is_given(cluster: Any) -> None:
    import json

    from test_whatif import HYBRID, _cli

    here = json.loads(_cli(HYBRID, "--sweep", "n-1", "--json", "--workers", "1").output)
    done = _cli(HYBRID, "--sweep", "n-1", "--json", "--dask", cluster.scheduler_address)
    assert done.exit_code == 0, done.output
    there = json.loads(done.output)
    assert (there["run"]["executor"], there["run"]["workers"]) == ("dask", 2)
    assert {**there, "run": None} == {**here, "run": None}
