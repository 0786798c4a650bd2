"""`netplan analyze --html` without a browser: the page holds every site, link and workload, its
numbers agree with the report, misses and shortfalls are red, nothing is fetched, free text is
escaped, large estates get a region map that says so, and the command writes the file or fails
cleanly. (tests/netplan/test_html_browser.py opens the same pages in headless Chromium.)"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from netplan.cli import cli
from netplan.html.analysis import Prices, analysis_page
from netplan.html.page import BAD, GOOD
from netplan.loader import load_topology
from netplan.report import analyze
from netplan.topology import Topology

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))
HYBRID = REPO / "topologies" / "onprem-data-cloud-burst-edge.yaml"
EVERYTHING = Path(__file__).parent / "topologies" / "everything.yaml"
ISLAND = re.compile(r'<script type="application/json" data-figure="([^"]+)">(.*?)</script>', re.S)


def islands(page: str) -> dict[str, dict[str, Any]]:
    """Each chart's plotly JSON, by figure id, as the page's glue will read it."""
    return {name: json.loads(body) for name, body in ISLAND.findall(page)}


def marks(fig: Mapping[str, Any], role: str) -> list[Any]:
    """The points of every trace of `fig` with meta == role (one per mark drawn)."""
    return [x for trace in fig["data"] if trace.get("meta") == role for x in trace["x"]]


def _page(path: Path, **kw: Any) -> tuple[Topology, dict[str, Any], str]:
    topology = load_topology(str(path))
    doc = analyze(topology).to_json()
    return topology, doc, analysis_page(topology, doc, **kw)


@pytest.mark.parametrize("path", [*SHIPPED, EVERYTHING], ids=lambda p: p.stem)
def test_the_page_has_every_site_link_and_workload(path: Path) -> None:
    topology, doc, page = _page(path)
    figs = islands(page)
    site_traces = [t for t in figs["map"]["data"] if t.get("meta") == "sites"]
    assert sorted(s for t in site_traces for s in t["text"]) == sorted(
        s.id for s in topology.sites)
    assert len(marks(figs["map"], "links")) == len(topology.links) == len(doc["links"])
    for w in topology.workloads:
        assert f'<tr data-workload="{w.id}">' in page
        assert f'data-workload="{w.id}"' in page.split('<h3>Each decision')[1]
    # One file that needs nothing else: no external script, style or image.
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link[^>]+href=", page)
    assert page.count("<script>") == 3  # PlotlyConfig, plotly.js, the glue


def test_a_deadline_miss_and_a_sync_shortfall_are_red() -> None:
    _, doc, page = _page(EVERYTHING)
    figs = islands(page)
    compute = next(t for t in figs["timeline"]["data"] if t["name"] == "compute")
    colour = dict(zip(compute["y"], compute["marker"]["color"], strict=True))
    assert colour == {"tune (move_data)": GOOD, "rush (infeasible)": BAD,
                      "embed-raw (move_compute)": GOOD}
    deadline = next(t for t in figs["timeline"]["data"] if t["name"] == "deadline")
    assert dict(zip(deadline["y"], deadline["x"], strict=True)) == {
        "tune (move_data)": 30, "rush (infeasible)": 12}
    load = next(t for t in figs["sync"]["data"] if t["name"].startswith("load"))
    red = {y for y, c in zip(load["y"], load["marker"]["color"], strict=True) if c == BAD}
    flagged = {" → ".join(link["between"]) for link in doc["sync_plan"]["links"]
               if link["flagged"]}
    assert red == flagged == {"cloud-ams → edge-lyon"}


@pytest.mark.parametrize("path", [HYBRID, EVERYTHING], ids=lambda p: p.stem)
def test_egress_per_hop_adds_up_to_each_decisions_egress(path: Path) -> None:
    _, doc, _ = _page(path)
    prices = Prices.of(doc)
    checked = 0
    for d in doc["decisions"]:
        if d["cost"]:
            hops = prices.per_hop(d)
            assert sum(h["usd"] for h in hops) == pytest.approx(d["cost"]["egress_usd"],
                                                               abs=0.01)
            checked += bool(hops)
    assert checked >= 2


def test_relays_on_chosen_paths_are_ringed_and_named() -> None:
    _, doc, page = _page(EVERYTHING)
    relays = {site for d in doc["decisions"] for m in d["movements"] for r in m["routes"]
              for site in r["path"][1:-1]}
    assert relays == {"cloud-ams", "dc-fra"}
    ring = next(t for t in islands(page)["map"]["data"] if t.get("meta") == "relays")
    assert len(ring["x"]) == len(relays)
    assert any(h.startswith("<b>cloud-ams</b> relays for tune") for h in ring["hovertext"])


def test_the_budget_waterfall_adds_the_components_to_the_total() -> None:
    _, doc, page = _page(EVERYTHING)
    budget = doc["latency_budgets"][0]
    fall = islands(page)["budget-0"]["data"][0]
    assert fall["type"] == "waterfall"
    assert fall["y"][:-1] == list(budget["components_ms"].values())
    assert fall["y"][-1] == pytest.approx(sum(fall["y"][:-1]))


def test_a_large_estate_gets_a_region_map_that_says_so() -> None:
    topology, _, page = _page(HYBRID, map_site_limit=3)
    region = {s.id: s.region for s in topology.sites}
    pairs = {frozenset((region[a], region[b])) for a, b in (lk.between for lk in topology.links)}
    fig = islands(page)["map"]
    names = [x for t in fig["data"] if t.get("meta") == "sites" for x in t["text"]]
    assert sorted(names) == sorted(set(region.values()))
    assert len(marks(fig, "links")) == len({p for p in pairs if len(p) == 2})
    assert "so the map is aggregated by region" in page


def test_free_text_in_a_topology_cannot_inject_markup(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^description: .*$",
                  "description: '</script><script>alert(1)</script>'", EVERYTHING.read_text())
    path = tmp_path / "t.yaml"
    path.write_text(text)
    _, _, page = _page(path)
    assert "<script>alert(1)" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page


def test_the_templates_ship_in_the_wheel() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["netplan"]
    root = REPO / "netplan"
    shipped = {p for g in globs for p in root.glob(g)}
    templates = set((root / "html" / "templates").iterdir())
    assert templates
    assert templates <= shipped


def test_analyze_html_writes_the_page_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = CliRunner().invoke(cli, ["analyze", str(HYBRID), "--html", str(out)])
    assert done.exit_code == 0, done.output
    assert done.stdout == ""  # the page replaces the tables
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: \d+\.\d MB, \d+ sites, \d+/\d+ "
                        r"workloads feasible\n", done.stderr)
    assert islands(out.read_text())["map"]
    both = CliRunner().invoke(cli, ["analyze", str(HYBRID), "--html", str(out), "--json"])
    assert json.loads(both.stdout)["schema_version"] == 2


def test_analyze_html_to_a_missing_folder_exits_2_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "no-such-folder" / "report.html"
    done = CliRunner().invoke(cli, ["analyze", str(HYBRID), "--html", str(out)])
    assert done.exit_code == 2
    assert done.stderr == f"cannot write {out}: No such file or directory\n"
    assert not out.parent.exists()


def test_analyze_html_without_plotly_says_how_to_get_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import netplan

    # As if plotly were not installed, and the page modules never imported.
    for name in [m for m in sys.modules if m == "netplan.html" or m.startswith(
            ("netplan.html.", "plotly"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(netplan, "html", raising=False)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    out = tmp_path / "report.html"
    done = CliRunner().invoke(cli, ["analyze", str(HYBRID), "--html", str(out)])
    assert done.exit_code == 2
    assert "pip install 'netplan-transferd[html]'" in done.stderr
    assert "Traceback" not in done.output
    assert not out.exists()


def element_ids(page: str) -> list[str]:
    """Every id="..." of the page's own markup (plotly.js, inlined after it, is left out)."""
    return re.findall(r'\sid="([^"]+)"', page.split("<script>window.PlotlyConfig")[0])


@pytest.mark.parametrize("path", [HYBRID, EVERYTHING], ids=lambda p: p.stem)
def test_element_ids_are_unique(path: Path) -> None:
    # A chart whose <div> shares its id with a section is drawn into the section instead.
    ids = element_ids(_page(path)[2])
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
