"""Where a what-if sweep's scenarios run: in this process, on local worker processes (the
default for a sweep), or on a Dask cluster (`dask.distributed`, given a scheduler address).

Every executor is handed the same `SweepJob` (the topology, TCP settings, path policy and
options) and runs the same pure `netplan.whatif.evaluate` per scenario, each worker building
the baseline once (`baseline_for`, cached by the job's key), so the results are identical
whichever executor ran them (tested against a `LocalCluster`). Scenarios the baseline answers
without work (`Baseline.needs_work`) never leave this process; the rest go out in chunks of
about equal work (the most expensive first, dealt round-robin), and come back in scenario order.

This module does process and network I/O; `netplan.whatif` stays pure.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from netplan._sections import PathPolicy
from netplan.errors import NetplanError
from netplan.scenarios import Scenario
from netplan.topology import Topology, TransferSettings
from netplan.whatif import (
    Baseline,
    ScenarioResult,
    WhatifOptions,
    WhatifResult,
    build_baseline,
    evaluate,
    summarize_sweep,
)

__all__ = [
    "EXECUTORS",
    "DaskExecutor",
    "ExecutorError",
    "LocalExecutor",
    "ScenarioExecutor",
    "SerialExecutor",
    "SweepJob",
    "baseline_for",
    "run_whatif",
]

Indexed = list[tuple[int, Scenario]]
Results = list[tuple[int, ScenarioResult]]


class ExecutorError(NetplanError):
    """An executor cannot run the sweep (no Dask, an unreachable scheduler, a worker that
    cannot import netplan)."""


@dataclass(frozen=True)
class SweepJob:
    """What every worker needs to answer scenarios: it builds the baseline from this itself."""

    topology: Topology
    settings: TransferSettings
    paths: PathPolicy
    options: WhatifOptions
    key: str  # identifies the inputs, for the workers' baseline cache

    @classmethod
    def of(cls, topology: Topology, settings: TransferSettings, paths: PathPolicy,
           options: WhatifOptions) -> SweepJob:
        digest = hashlib.sha256()
        for part in (topology.model_dump_json(), settings.model_dump_json(),
                     paths.model_dump_json(), repr(options)):
            digest.update(part.encode())
            digest.update(b"\0")
        return cls(topology, settings, paths, options, digest.hexdigest())


_CACHE: dict[str, Baseline] = {}
_CACHE_LOCK = threading.Lock()  # (a Dask worker may run tasks on several threads)
_CACHE_SIZE = 2


def baseline_for(job: SweepJob) -> Baseline:
    """The job's baseline, built once per process."""
    with _CACHE_LOCK:
        found = _CACHE.get(job.key)
        if found is None:
            found = build_baseline(job.topology, job.settings, job.paths)
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[job.key] = found
        return found


def run_chunk(job: SweepJob, chunk: Indexed) -> Results:
    """Evaluate a chunk of (index, scenario) on this process's baseline."""
    baseline = baseline_for(job)
    with _CACHE_LOCK:  # (the baseline's network caches are not for concurrent writers)
        return [(i, evaluate(baseline, s, job.options)) for i, s in chunk]


def _chunks(baseline: Baseline, work: Indexed, count: int) -> list[Indexed]:
    """`work` in `count` chunks of about equal cost: each scenario costs a network and the
    workloads it re-plans; the most expensive go first, dealt round-robin."""
    def cost(item: tuple[int, Scenario]) -> int:
        return 1 + len(baseline.reached(item[1])[0])

    ordered = sorted(work, key=lambda item: (-cost(item), item[0]))
    out: list[Indexed] = [[] for _ in range(max(1, min(count, len(ordered))))]
    for n, item in enumerate(ordered):
        out[n % len(out)].append(item)
    return out


class ScenarioExecutor(Protocol):
    """Runs `job` over scenarios that need work; returns (index, result) in any order."""

    name: str
    workers: int

    def run(self, job: SweepJob, baseline: Baseline, work: Indexed) -> Results: ...


class SerialExecutor:
    name = "serial"
    workers = 1

    def run(self, job: SweepJob, baseline: Baseline, work: Indexed) -> Results:
        return [(i, evaluate(baseline, s, job.options)) for i, s in work]


_JOB: SweepJob | None = None


def _init_worker(job: SweepJob) -> None:
    global _JOB
    _JOB = job


def _run_local_chunk(chunk: Indexed) -> Results:
    assert _JOB is not None
    return run_chunk(_JOB, chunk)


class LocalExecutor:
    """Worker processes on this machine. They are started fresh (`spawn`: no state inherited
    from this process, as on a Dask worker) and each builds the baseline once."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)

    def run(self, job: SweepJob, baseline: Baseline, work: Indexed) -> Results:
        if not work:
            return []
        chunks = _chunks(baseline, work, self.workers * 4)
        context = multiprocessing.get_context("spawn")
        out: Results = []
        with ProcessPoolExecutor(max_workers=min(self.workers, len(chunks)),
                                 mp_context=context, initializer=_init_worker,
                                 initargs=(job,)) as pool:
            for part in pool.map(_run_local_chunk, chunks):
                out += part
        return out


class DaskExecutor:
    """Chunks as tasks on a `dask.distributed` cluster (`address`: its scheduler, e.g.
    tcp://10.0.0.5:8786). The job is scattered to every worker once; each worker caches its
    baseline. The cluster is the caller's: this only connects and disconnects."""

    name = "dask"

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.workers = 0

    def run(self, job: SweepJob, baseline: Baseline, work: Indexed) -> Results:
        try:
            from distributed import Client
        except ImportError as exc:
            raise ExecutorError("--dask needs dask.distributed: pip install "
                                "'netplan-transferd[whatif]'") from exc
        try:
            client = Client(self.address, timeout=self.timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ExecutorError(f"cannot reach the Dask scheduler at {self.address}: "
                                f"{exc}") from exc
        try:
            self.workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            if not work:
                return []
            shared = client.scatter(job, broadcast=True, hash=False)
            chunks = _chunks(baseline, work, max(1, self.workers) * 4)
            futures = [client.submit(run_chunk, shared, chunk, pure=False)
                       for chunk in chunks]
            out: Results = []
            try:
                for part in client.gather(futures):
                    out += part
            except (ImportError, AttributeError) as exc:
                raise ExecutorError(f"a Dask worker at {self.address} could not run netplan "
                                    f"({exc}): install netplan-transferd on the workers") \
                    from exc
            return out
        finally:
            client.close()


EXECUTORS: dict[str, Callable[..., Any]] = {
    "serial": SerialExecutor,
    "local": LocalExecutor,
    "dask": DaskExecutor,
}


def run_whatif(topology: Topology, scenarios: Sequence[Scenario], executor: ScenarioExecutor,
               *, settings: TransferSettings | None = None, paths: PathPolicy | None = None,
               options: WhatifOptions | None = None, sweep: str | None = None,
               baseline: Baseline | None = None) -> WhatifResult:
    """Answer every scenario (in order) against the topology's baseline."""
    options = options or WhatifOptions()
    if baseline is None:
        baseline = build_baseline(topology, settings, paths)
    job = SweepJob.of(topology, baseline.settings, baseline.paths, options)
    results: dict[int, ScenarioResult] = {}
    work: Indexed = []
    for i, scenario in enumerate(scenarios):
        if baseline.needs_work(scenario, options):
            work.append((i, scenario))
        else:
            results[i] = baseline.unchanged(scenario)
    for i, result in executor.run(job, baseline, work):
        results[i] = result
    return summarize_sweep(baseline, (results[i] for i in range(len(scenarios))), sweep)
