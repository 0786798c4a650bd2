"""`netplan whatif --html`: the scenarios compared on one page. Its numbers are the --json
document's (what is lost, where, by how much), every scenario and workload is on it, and it
draws in headless Chromium without a console error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from netplan.cli import cli
from netplan.html.page import BAD
from netplan.html.topomap import Hazards, topology_map
from netplan.html.whatif import whatif_page
from netplan.loader import load_topology
from netplan.report import analyze
from netplan.topology import Topology
from tests.browser import Chromium
from tests.netplan.test_html import HYBRID, element_ids, islands
from tests.netplan.test_html_browser import MARKS

SCENARIOS = HYBRID.parent / "scenarios" / HYBRID.name


def whatif_doc(*args: str) -> dict[str, Any]:
    done = CliRunner().invoke(cli, ["whatif", str(HYBRID), *args, "--json"])
    assert done.exit_code == 0, done.output
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    return whatif_doc("--sweep", "n-1")


@pytest.fixture(scope="module")
def planned() -> tuple[Topology, dict[str, Any]]:
    topology = load_topology(str(HYBRID))
    return topology, analyze(topology).to_json(max_alternatives=0)


def test_the_map_marks_each_single_point_of_failure(
        sweep: dict[str, Any], planned: tuple[Topology, dict[str, Any]]) -> None:
    topology, baseline = planned
    page = whatif_page(sweep, topology=topology, baseline=baseline)
    fig = islands(page)["map"]
    ring = next(t for t in fig["data"] if t.get("meta") == "hazard-sites")
    spofs = {p["element"]: p["breaks"] for p in sweep["single_points_of_failure"]}
    assert len(ring["x"]) == len(spofs) == 3  # onprem-fra, aws-euc1, aws-use1 (no link)
    assert any(h.startswith("<b>onprem-fra</b>: its failure alone breaks finetune-claims")
               for h in ring["hovertext"])
    # A link whose loss breaks something gets a cross on that link, named in its hover.
    hazards = Hazards.of([{"element": "link:onprem-fra,aws-euc1", "breaks": ["eval"]}])
    marks = islands(f'<script type="application/json" data-figure="m">'
                    f'{topology_map(topology, baseline, hazards=hazards).figure.json}'
                    "</script>")["m"]
    (cross,) = [t for t in marks["data"] if t.get("meta") == "hazard-links"]
    assert cross["hovertext"] == ["<b>onprem-fra ↔ aws-euc1</b>: its failure alone breaks "
                                  "eval"]


def test_the_matrix_marks_lost_workloads_red_where_the_document_loses_them(
        sweep: dict[str, Any]) -> None:
    figs = islands(whatif_page(sweep))
    heat = figs["scenario-matrix"]["data"][0]
    lost = {(row, w) for row, values in zip(heat["y"], heat["z"], strict=True)
            for w, v in zip(heat["x"], values, strict=True) if v == 4}
    expected = {(s["name"], w) for s in sweep["scenarios"] for w in s["workloads_lost"]}
    assert lost == expected
    # The shipped hybrid topology's single points of failure, as the sweep finds them.
    assert ("site:onprem-fra", "eval-claims") in lost
    assert ("site:aws-use1", "pretrain-continue") in lost
    # The colour scale gives "lost" the red the rest of the report uses for a miss.
    assert heat["colorscale"][-1][1] == BAD


def test_the_comparison_puts_the_worst_first_with_the_documents_numbers(
        sweep: dict[str, Any]) -> None:
    chart = islands(whatif_page(sweep))["scenario-chart"]["data"]
    lost = next(t for t in chart if t["name"] == "lost")
    by_name = {s["name"]: s for s in sweep["scenarios"]}
    assert lost["y"][:len(sweep["ranking"])] == sweep["ranking"]
    assert lost["x"] == [len(by_name[n]["workloads_lost"]) + len(by_name[n]["indexes_lost"])
                         for n in lost["y"]]
    cost = next(t for t in chart if t["name"] == "cost change: decisions")
    assert cost["x"] == [by_name[n]["cost_delta_usd"] or 0.0 for n in cost["y"]]


def test_every_scenario_workload_and_single_point_of_failure_is_on_the_page(
        sweep: dict[str, Any], planned: tuple[Topology, dict[str, Any]]) -> None:
    topology, baseline = planned
    page = whatif_page(sweep, topology=topology, baseline=baseline)
    for s in sweep["scenarios"]:
        assert f'<tr data-scenario="{s["name"]}">' in page
    for d in sweep["baseline"]["decisions"]:
        assert f'<tr data-workload="{d["workload"]}">' in page
    spofs = page.split('id="spofs"')[1].split("</section>")[0]
    for p in sweep["single_points_of_failure"]:
        assert f'<td class="bad">{p["element"]}</td>' in spofs
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link[^>]+href=", page)
    ids = element_ids(page)
    assert len(ids) == len(set(ids))


def test_whatif_html_writes_the_page_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "whatif.html"
    done = CliRunner().invoke(cli, ["whatif", str(HYBRID), "--scenarios", str(SCENARIOS),
                                    "--html", str(out)])
    assert done.exit_code == 0, done.output
    assert done.stdout == ""
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: \d+\.\d MB, 5 scenarios, \d+ hurt\n",
                        done.stderr)
    page = out.read_text()
    assert '<tr data-scenario="aws-euc1-outage">' in page
    # The failed training run's standbys: where finetune-claims could resume, or why not.
    assert "Training failover: finetune-claims" in page
    assert "map" in islands(page)  # the plan, its single points of failure marked


def test_the_whatif_page_draws_in_chromium(
        chromium: Chromium, artifacts: Path, tmp_path: Path, sweep: dict[str, Any],
        planned: tuple[Topology, dict[str, Any]]) -> None:
    topology, baseline = planned
    out = tmp_path / "whatif.html"
    out.write_text(whatif_page(sweep, topology=topology, baseline=baseline))
    page = chromium.open(out)
    try:
        assert page.wait_for_charts() == len(islands(out.read_text()))
        assert page.errors == []
        assert page.evaluate(f"({MARKS})('sites')") == len(topology.sites)
        assert page.evaluate(f"({MARKS})('links')") == len(topology.links)
        assert page.evaluate(f"({MARKS})('hazard-sites')") == len(
            sweep["single_points_of_failure"])
        cells = page.evaluate("document.querySelectorAll('#scenario-matrix .hm, "
                              "#scenario-matrix image').length")
        assert cells >= 1  # the heatmap drew (plotly paints it as one image)
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        text = page.evaluate("document.body.innerText")
        for s in sweep["scenarios"]:
            assert s["name"] in text
        for d in sweep["baseline"]["decisions"]:
            assert d["workload"] in text
        page.screenshot(artifacts / "whatif-onprem-data-cloud-burst-edge.png")
    finally:
        page.close()
