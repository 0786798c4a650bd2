"""The command line a user meets: exit codes for infeasible plans, tables that fit 80 and 120
columns without cutting cells, --version, and a multipath plan that transferd still reads."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from netplan_builders import link, site

from netplan.cli import cli
from netplan.plan import Plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "topologies").glob("*.yaml"))


def _run(*args: str, columns: int = 200) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": str(columns)})


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "t.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "t", **doc}, sort_keys=False))
    return str(path)


def _split_sync(size_gb: float) -> dict[str, Any]:
    """A nightly sync of `size_gb` from dc to gpu: direct 1 Gbit/s at $0.01/GB, or through r
    at 10 Gbit/s for $0.04/GB; the 8 h window at 50 % holds 1,800 GB direct, 18,000 via r."""
    return {
        "sites": [site("dc", "eu", "onprem"), site("r", "eu"), site("gpu", "eu")],
        "links": [link("dc", "gpu", 1, 5, egress_usd_per_gb={"dc": 0.01}),
                  link("dc", "r", 10, 5, egress_usd_per_gb={"dc": 0.02}),
                  link("r", "gpu", 10, 5, egress_usd_per_gb={"r": 0.02})],
        "datasets": [{"id": "d", "site": "dc", "size_gb": size_gb, "tier": "approved"}],
        "sync_rules": [{"id": "nightly", "datasets": ["d"], "to": ["gpu"]}],
    }


def test_version_on_both_clis() -> None:
    from transferd.cli import main as transferd_main

    assert re.fullmatch(r"netplan, version \d+\.\d+\.\d+\n", _run("--version").output)
    done = CliRunner().invoke(transferd_main, ["--version"])
    assert re.fullmatch(r"transferd, version \d+\.\d+\.\d+\n", done.output)


def _estate(tmp_path: Path) -> str:
    spec = importlib.util.spec_from_file_location(
        "netplan_scale", REPO / "benchmarks" / "netplan_scale.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _write(tmp_path, module.generate(seed=5, n_sites=60, n_links=240, n_workloads=12),
                  "estate.yaml")


@pytest.mark.parametrize("columns", [80, 120])
def test_tables_wrap_at_the_terminal_width_instead_of_cutting_cells(
    columns: int, tmp_path: Path
) -> None:
    for path in [*map(str, EXAMPLES), _estate(tmp_path)]:
        done = _run("analyze", path, columns=columns)
        assert done.exit_code == 0, done.output
        lines = done.stdout.splitlines()
        assert "…" not in done.stdout, path
        assert max(len(line) for line in lines) <= columns, path
    # Every site id of the shipped example is printed whole somewhere (wrapped at spaces).
    done = _run("analyze", str(EXAMPLES[-1]), columns=80)
    example = yaml.safe_load(EXAMPLES[-1].read_text())
    for s in example["sites"]:
        assert re.search(rf"(^|\s){re.escape(s['id'])}(\s|,|$)", done.stdout, re.M), s["id"]


def test_strict_exits_1_for_an_infeasible_vector_index_and_sync_rule(tmp_path: Path) -> None:
    doc = {
        "sites": [site("a", "eu"), site("b", "us")],
        "links": [link("a", "b", 10, 80)],
        "datasets": [{"id": "d", "site": "a", "size_gb": 10, "tier": "approved"}],
        # 3 copies in distinct failure domains, but only two sites exist.
        "sync_rules": [{"id": "three", "datasets": ["d"], "to": ["b"], "copies_min": 3}],
        # b queries with a 5 ms budget, but one shard search alone takes 10 ms.
        "vector_indexes": [{"id": "ix", "site": "a", "shards": 1, "shard_gb": 10,
                            "queries": {"b": 10}, "latency_budget_ms": 5, "search_ms": 10}],
    }
    path = _write(tmp_path, doc)
    assert _run("analyze", path).exit_code == 0  # reported, not fatal, without --strict
    done = _run("analyze", path, "--strict")
    assert done.exit_code == 1
    assert "vector index ix is infeasible" in done.stderr
    assert "sync rule three is infeasible: dataset d reaches only 2 failure domain(s)" in (
        done.stderr)


def test_plan_refuses_infeasible_entries_unless_allowed(tmp_path: Path) -> None:
    doc = {
        "sites": [site("dc", "eu", "onprem"), site("cloud", "eu", h100=(8, 2.0))],
        "links": [link("dc", "cloud", 10, 5)],
        "datasets": [{"id": "d", "site": "dc", "size_gb": 10, "tier": "curated"}],
        "workloads": [{"id": "big", "kind": "fine_tuning", "datasets": ["d"], "gpu": "h100",
                       "gpus": 64, "hours": 1},
                      {"id": "ok", "kind": "fine_tuning", "datasets": ["d"], "gpu": "h100",
                       "gpus": 8, "hours": 1}],
    }
    path = _write(tmp_path, doc)
    out = tmp_path / "plan.json"
    done = _run("plan", path, "-o", str(out))
    assert done.exit_code == 1
    assert not out.exists()
    assert "1 infeasible entry:" in done.stderr
    assert ("workload big is infeasible: no h100 GPUs at dc; only 8 h100 GPUs at cloud, "
            "needs 64") in done.stderr
    assert "--allow-infeasible" in done.stderr
    assert _run("analyze", path, "--strict").exit_code == 1
    done = _run("plan", path, "-o", str(out), "--allow-infeasible")
    assert done.exit_code == 0, done.output
    assert "writing the plan anyway" in done.stderr
    assert Plan.from_json(out.read_text()).schema_version == 3


def test_a_sync_that_needs_two_paths_is_planned_as_routes_with_shares(tmp_path: Path) -> None:
    # 19,000 GB a night: neither path alone carries it in the window (1,800 + 18,000 GB would).
    path = _write(tmp_path, _split_sync(19_000))
    report = json.loads(_run("analyze", path, "--json").stdout)
    assert report["schema_version"] == 2
    [transfer] = report["sync_plan"]["transfers"]
    assert transfer["fits"]
    # At the 50 % bulk share: 0.5 Gbit/s direct (cheap, filled) + the rest, 4.78 Gbit/s, via r.
    need = 19_000 * 8 / (8 * 3600 - 0.01)
    shares = {tuple(r["path"]): r["share"] for r in transfer["routes"]}
    assert shares[("dc", "gpu")] == pytest.approx(0.5 / need, abs=1e-6)
    assert shares[("dc", "r", "gpu")] == pytest.approx(1 - 0.5 / need, abs=1e-6)
    assert report["problems"] == []
    assert report["solver"]["lp_solves"] >= 1

    out = tmp_path / "plan.json"
    assert _run("plan", path, "-o", str(out)).exit_code == 0
    plan = Plan.from_json(out.read_text())
    [entry] = plan.site("dc").sync
    assert entry.via == ("r",)  # the largest share first, and `via` repeats it
    assert [r.via for r in entry.routes] == [("r",), ()]
    assert sum(r.share for r in entry.routes) == pytest.approx(1, abs=1e-9)
    assert entry.routes[1].share == pytest.approx(0.5 / need, abs=1e-6)

    # transferd carries the routes out: each relay must be a configured peer of the site.
    from transferd.config import parse_config
    from transferd.errors import ConfigError
    from transferd.plan import parse_plan

    head = "site: dc\nlisten: 127.0.0.1:7701\ndata_dir: ./d\nkeys_dir: ./k\npeers:\n"
    gpu = "  gpu: {url: 'http://127.0.0.1:7702'}\n"
    with pytest.raises(ConfigError, match=r"sites\[0\]\.sync\[0\]\.via\[0\]: 'r' is not a peer"):
        parse_plan(out.read_text(), parse_config(head + gpu, base_dir=tmp_path))
    config = parse_config(head + gpu + "  r: {url: 'http://127.0.0.1:7703'}\n", base_dir=tmp_path)
    [route] = parse_plan(out.read_text(), config).sync
    assert (route.prefix, route.destination) == ("approved/d", "gpu")
    assert [(r.via, r.share) for r in route.routes] == [
        (["r"], entry.routes[0].share), ([], entry.routes[1].share)]


def test_a_sync_no_split_can_carry_is_a_problem(tmp_path: Path) -> None:
    # 20,000 GB: even both paths (19,800 GB in the window) fall short.
    path = _write(tmp_path, _split_sync(20_000))
    report = json.loads(_run("analyze", path, "--json").stdout)
    [transfer] = report["sync_plan"]["transfers"]
    assert not transfer["fits"]
    assert any("sync rule nightly is infeasible: d from dc to gpu cannot move 20,000.0 GB in "
               "8 h" in p for p in report["problems"])
    assert _run("analyze", path, "--strict").exit_code == 1


def test_max_alternatives_zero_keeps_none_but_rejections_count_every_site(
    tmp_path: Path,
) -> None:
    path = _estate(tmp_path)
    none = json.loads(_run("analyze", path, "--json", "--max-alternatives", "0").stdout)
    every = json.loads(_run("analyze", path, "--json", "--all-alternatives").stdout)
    for slim, full in zip(none["decisions"], every["decisions"], strict=True):
        assert slim["alternatives"] == []
        assert slim["alternatives_omitted"] == len(full["alternatives"])
        assert slim["rejections"] == full["rejections"]
        if full["kind"] != "inference":
            counted = sum(r["sites"] for r in full["rejections"] if r["kind"] != "bound")
            assert counted >= len({a["site"] for a in full["alternatives"]})


def test_every_report_matches_the_documented_schema(tmp_path: Path) -> None:
    from netplan.report import SCHEMA_VERSION
    from netplan.report_schema import REPORT_SCHEMA_VERSION, ReportDocument

    assert SCHEMA_VERSION == REPORT_SCHEMA_VERSION
    paths = [*map(str, EXAMPLES), _estate(tmp_path), _write(tmp_path, _split_sync(19_000))]
    for path in paths:
        doc = json.loads(_run("analyze", path, "--json", "--all-alternatives").stdout)
        ReportDocument.model_validate(doc)  # unknown or missing keys are errors
    schema = json.loads(_run("schema", "--report").stdout)
    assert schema["properties"]["schema_version"]["const"] == 2
    defs = schema["$defs"]
    assert "rejected_because" in defs["PathAlternative"]["properties"]
    assert {"compute_usd", "egress_usd", "storage_usd", "relay_usd"} <= set(
        defs["Cost"]["properties"])
    assert "directions" in defs["LinkDoc"]["properties"]


def test_a_thousand_problems_are_listed_twenty_then_counted() -> None:
    from netplan.errors import Infeasible, InfeasiblePlan

    text = str(InfeasiblePlan([Infeasible(f"w{i}", ["no GPUs"]) for i in range(25)]))
    lines = text.splitlines()
    assert lines[0] == "25 infeasible entries:"
    assert lines[1] == "  - workload w0 is infeasible: no GPUs"
    assert len(lines) == 22
    assert lines[-1].startswith("  and 5 more")


def _targets(tmp_path: Path) -> tuple[Path, Path]:
    """A plan file reached through a link, as a deployment keeps it."""
    real = tmp_path / "deploy" / "plan.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "plan.json"
    link.symlink_to(real)
    return link, real


@pytest.mark.parametrize("command", ["plan", "html", "calibrate"])
def test_output_through_a_link_replaces_the_file_it_names_and_keeps_the_link(
    tmp_path: Path, command: str
) -> None:
    topology = str(EXAMPLES[0])
    link, real = _targets(tmp_path)
    args = {"plan": ["plan", topology, "-o", str(link)],
            "html": ["analyze", topology, "--html", str(link)],
            "calibrate": ["calibrate", topology, "--from", str(_telemetry(tmp_path)),
                          "-o", str(link)]}[command]
    done = _run(*args)
    assert done.exit_code == 0, done.output
    assert link.is_symlink()  # the rename used to put a regular file in the link's place
    assert real.read_text() != "{}"
    assert sorted(p.name for p in real.parent.iterdir()) == ["plan.json"]


def _telemetry(tmp_path: Path) -> Path:
    """A `transferd telemetry --json` file with nothing measured (calibrate writes no values)."""
    path = tmp_path / "telemetry.json"
    path.write_text(json.dumps({"site": "x", "at": 0.0, "window_s": 60.0, "links": []}))
    return path


def test_output_to_a_device_writes_to_it_and_leaves_it_a_device(tmp_path: Path) -> None:
    """`-o /dev/null` (to check a plan's feasibility) as root replaced /dev/null with a regular
    file. A private node of the same device stands in for it here."""
    if os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    done = _run("plan", str(EXAMPLES[0]), "-o", str(null))
    assert done.exit_code == 0, done.output
    assert stat.S_ISCHR(null.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    full = tmp_path / "full"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    done = _run("plan", str(EXAMPLES[0]), "-o", str(full))
    assert done.exit_code == 2
    assert f"cannot write {full}: No space left on device" in done.output
    assert stat.S_ISCHR(full.lstat().st_mode)


def test_output_through_another_users_link_replaces_the_link_not_the_file_it_names(
    tmp_path: Path,
) -> None:
    """A link planted by another user (plan.json -> /etc/shadow in a sticky /tmp) was
    followed, so a root run overwrote the file it named. The kernel refuses to follow such a
    link there (fs.protected_symlinks); the CLI must not follow it by hand either."""
    if os.geteuid() != 0:
        pytest.skip("a link owned by another user needs root to make (lchown)")
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    link = shared / "plan.json"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)  # nobody's
    done = _run("plan", str(EXAMPLES[0]), "-o", str(link))
    assert done.exit_code == 0, done.output
    assert victim.read_text() == "not yours"
    assert not link.is_symlink()
    assert json.loads(link.read_text())["schema_version"]
    assert sorted(p.name for p in shared.iterdir()) == ["plan.json"]  # no temporary file left


def test_output_to_a_descriptor_name_appends_where_the_descriptor_points(
    tmp_path: Path,
) -> None:
    """`netplan plan ... -o /dev/stdout >> out.json` replaced out.json (through /proc/self/fd/1)
    instead of appending to it."""
    out = tmp_path / "out.json"
    out.write_text("before\n")
    with out.open("a") as fh:
        done = _run("plan", str(EXAMPLES[0]), "-o", f"/proc/self/fd/{fh.fileno()}")
    assert done.exit_code == 0, done.output
    text = out.read_text()
    assert text.startswith("before\n{")
    assert json.loads(text.removeprefix("before\n"))["schema_version"]
