"""The same sweep answered in this process, on local worker processes and on a Dask cluster
(a `LocalCluster` with worker processes): identical results, and no process left behind."""

from __future__ import annotations

import logging
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


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes, one thread each, no dashboard; closed (workers and nannies
    stopped) when the module's tests are done."""
    distributed = pytest.importorskip("distributed", reason="dask.distributed is the [whatif] "
                                      "extra")
    before = _children()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  silence_logs=logging.ERROR) as running:
        yield running
    assert _children() == before  # every worker process has exited


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
