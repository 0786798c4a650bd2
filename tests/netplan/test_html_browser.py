"""`netplan analyze --html` in headless Chromium: each shipped topology's page loads from a file
with the network off, every chart draws, the console stays clean, every workload and site is on
the page, and the map holds one mark per site and one per link. Each page's screenshot is left
in the artifacts folder (test-artifacts/, or $TEST_ARTIFACTS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from netplan.cli import cli
from netplan.html import analysis_page
from netplan.loader import load_topology
from netplan.report import analyze
from tests.browser import Chromium, Page
from tests.netplan.test_html import EVERYTHING, HYBRID, SHIPPED, islands

# Count the marks plotly actually drew into the map's SVG, by the role each trace carries
# (`meta`): each drawn trace is a <g class="trace"> bound (d3) to its calcdata, and each of its
# points a `path.point`.
MARKS = """(role) => {
  let n = 0;
  document.querySelectorAll('#map g.scatterlayer > g.trace').forEach(group => {
    if (group.__data__[0].trace.meta === role) n += group.querySelectorAll('path.point').length;
  });
  return n;
}"""


def render_and_open(chromium: Chromium, topology: Path, out: Path) -> Page:
    done = CliRunner().invoke(cli, ["analyze", str(topology), "--html", str(out)])
    assert done.exit_code == 0, done.output
    page = chromium.open(out)
    assert page.wait_for_charts() == len(islands(out.read_text()))
    return page


def visible_text(page: Page) -> str:
    # Every <details> opened, so the text of collapsed sections counts too.
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    text: str = page.evaluate("document.body.innerText")
    return text


@pytest.mark.parametrize("path", [*SHIPPED, EVERYTHING], ids=lambda p: p.stem)
def test_each_report_draws_in_chromium_with_every_site_link_and_workload(
        chromium: Chromium, artifacts: Path, tmp_path: Path, path: Path) -> None:
    topology = load_topology(str(path))
    page = render_and_open(chromium, path, tmp_path / f"{path.stem}.html")
    try:
        assert page.errors == []
        # Nothing fetched from anywhere: the page itself, and images plotly makes in place
        # (data: URLs of the hatch patterns); plotly.js is inside.
        assert [u for u in page.requests if not u.startswith(("file://", "data:"))] == []
        assert page.evaluate(f"({MARKS})('sites')") == len(topology.sites)
        assert page.evaluate(f"({MARKS})('links')") == len(topology.links)
        # Each site's name is drawn next to its mark, in the SVG.
        drawn = page.evaluate("Array.from(document.querySelectorAll('#map g.textpoint'), "
                              "t => t.textContent)")
        assert {s.id for s in topology.sites} <= set(drawn)
        text = visible_text(page)
        for w in topology.workloads:
            assert w.id in text
        for s in topology.sites:
            assert s.id in text
        page.screenshot(artifacts / f"analyze-{path.stem}.png")
    finally:
        page.close()


def test_hovering_a_link_mark_shows_its_numbers(chromium: Chromium, tmp_path: Path) -> None:
    page = render_and_open(chromium, EVERYTHING, tmp_path / "everything.html")
    try:
        # Plotly's own hover on the first link mark: the label names both directions.
        label = page.evaluate("""(() => {
          const gd = document.getElementById('map');
          const i = gd._fullData.findIndex(t => t.meta === 'links');
          Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 0}]);
          return Array.from(gd.querySelectorAll('.hoverlayer .hovertext'),
                            t => t.textContent).join(' ');
        })()""")
        assert "dc-fra ↔ cloud-fra" in label
        assert "dc-fra → cloud-fra" in label
        assert "cloud-fra → dc-fra" in label
        assert "limited by" in label
        assert page.errors == []
    finally:
        page.close()


def test_an_aggregated_map_draws_one_mark_per_region_and_pair(chromium: Chromium,
                                                               tmp_path: Path) -> None:
    # The hybrid topology drawn as a large estate would be: by region.
    topology = load_topology(str(HYBRID))
    region = {s.id: s.region for s in topology.sites}
    pairs = {frozenset((region[a], region[b])) for a, b in (lk.between for lk in topology.links)}
    out = tmp_path / "regions.html"
    out.write_text(analysis_page(topology, analyze(topology).to_json(), map_site_limit=3))
    page = chromium.open(out)
    try:
        page.wait_for_charts()
        assert page.errors == []
        assert page.evaluate(f"({MARKS})('sites')") == len(set(region.values()))
        assert page.evaluate(f"({MARKS})('links')") == len([p for p in pairs if len(p) == 2])
        assert "so the map is aggregated by region" in page.evaluate(
            "document.getElementById('topology').innerText")
    finally:
        page.close()
