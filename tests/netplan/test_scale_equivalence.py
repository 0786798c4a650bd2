"""The shortcuts large estates take (branch and bound, enumeration before milp) change nothing:
the same decisions come out as from exhaustive evaluation and the 0/1 program."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from click.testing import CliRunner

from netplan import Decision, Topology, gravity, placement
from netplan.cli import cli
from netplan.report import Report, analyze

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "netplan_scale", REPO / "benchmarks" / "netplan_scale.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def estate() -> Topology:
    doc = _generator().generate(seed=3, n_sites=150, n_links=600, n_workloads=40)
    return Topology.model_validate(doc)


def _outcome(d: Decision) -> tuple[object, ...]:
    return (
        d.workload,
        d.feasible,
        d.action,
        d.option.sites if d.option else None,
        round(d.option.total_usd, 6) if d.option else None,
    )


def _outcomes(report: Report) -> list[tuple[object, ...]]:
    return [_outcome(d) for d in report.decisions]


def test_branch_and_bound_chooses_what_exhaustive_evaluation_chooses(
    estate: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gravity, "EXHAUSTIVE_OPTIONS", 0)
    pruned = analyze(estate)
    assert sum(d.skipped for d in pruned.decisions) > 0  # the shortcut did take effect
    monkeypatch.setattr(gravity, "EXHAUSTIVE_OPTIONS", 10**9)
    exhaustive = analyze(estate)
    assert sum(d.skipped for d in exhaustive.decisions) == 0
    assert _outcomes(pruned) == _outcomes(exhaustive)
    assert any(d.feasible for d in exhaustive.decisions)


def test_prefiltered_placement_chooses_what_evaluating_every_site_chooses(
    estate: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placement, "EXHAUSTIVE_SITES", 0)
    pruned = analyze(estate)
    monkeypatch.setattr(placement, "EXHAUSTIVE_SITES", 10**9)
    exhaustive = analyze(estate)
    inference = [i for i, d in enumerate(exhaustive.decisions) if d.kind == "inference"]
    assert any(exhaustive.decisions[i].feasible for i in inference)
    assert any(r.kind == "bound" for i in inference for r in pruned.decisions[i].rejections)
    for i in inference:
        assert _outcome(pruned.decisions[i]) == _outcome(exhaustive.decisions[i])
        # A client is never said to miss its budget by a negative amount: a site within the
        # budget that cannot host a replica is named with why.
        assert "budget by -" not in pruned.decisions[i].reason


def test_enumerated_cover_matches_the_milp_cover(
    estate: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    enumerated = analyze(estate)
    monkeypatch.setattr(placement, "_BRUTE_FORCE_CLASSES", 0)
    solved = analyze(estate)
    inference = [i for i, d in enumerate(enumerated.decisions) if d.kind == "inference"]
    multi = [
        i
        for i in inference
        if enumerated.decisions[i].option and len(enumerated.decisions[i].option.sites) > 1
    ]
    assert multi, "the seeded estate should need multi-site covers"
    for i in inference:
        a, b = enumerated.decisions[i].option, solved.decisions[i].option
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert len(a.sites) == len(b.sites)
            assert a.total_usd == pytest.approx(b.total_usd)


def test_large_estates_get_grouped_reasons_and_a_runner_up_table(
    estate: Topology, tmp_path: Path
) -> None:
    report = analyze(estate)
    grouped = [d for d in report.decisions
               if not d.feasible and re.search(r" at \d[\d,]* sites", d.reason)]
    assert grouped, [d.reason for d in report.infeasible()]
    # Every site that lost is counted in a rejection group, evaluated or not (a site whose
    # staged and full variants lost for different reasons is in two).
    for d in report.decisions:
        if d.kind == "inference":
            continue
        workload = next(w for w in estate.workloads if w.id == d.workload)
        variants = gravity._variants(estate, workload)
        sites = {site.id for site, _, _ in variants}
        counted = sum(r.count for r in d.rejections)
        assert len(sites) - d.feasible <= counted <= len(variants), d.workload
    path = tmp_path / "estate.yaml"
    path.write_text(yaml.safe_dump(estate.model_dump(mode="json", exclude_none=True)))
    done = CliRunner().invoke(
        cli, ["analyze", str(path)], catch_exceptions=False, env={"COLUMNS": "200"}
    )
    assert done.exit_code == 0
    assert "Runner-up option per workload" in done.stdout
    assert "slowest of" in done.stdout
