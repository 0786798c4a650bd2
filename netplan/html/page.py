"""The page shell every HTML report shares: a Jinja2 template, plotly.js inlined once, each
chart a JSON island drawn by a few lines of glue, and nothing fetched from the network.

A report module builds plotly figures (`figure()` turns one into an island) and the rows of its
tables, then calls `render()` with its template; templates extend `_page.html.j2`, which holds
the styles, the script and the glue. When every chart has drawn, the glue sets
`data-charts="<count>"` on <html> (or "failed"), so a browser test knows when to look.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup
from plotly.offline import get_plotlyjs, get_plotlyjs_version

__all__ = ["Figure", "arrow", "figure", "gbps", "hours", "money", "render"]

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The categorical palette every chart uses, and what each colour means where it is not a series.
GOOD, BAD, WARN, MUTED = "#1a9850", "#d73027", "#fc8d59", "#9e9e9e"


@dataclass(frozen=True)
class Figure:
    """One chart: the id of its <div>, the heading above it, its height in pixels and its
    plotly JSON (data, layout)."""

    id: str
    title: str
    height: int
    json: str

    @property
    def island(self) -> Markup:
        """A <script type="application/json"> the glue reads (`</` escaped: the JSON cannot
        close the element early, whatever a site id contains)."""
        body = self.json.replace("</", "<\\/")
        return Markup(f'<script type="application/json" data-figure="{self.id}">{body}</script>')


def figure(fig: go.Figure, id: str, title: str, height: int,
           legend_below: bool = False, margin_top: int = 10) -> Figure:
    """`fig` as a chart of the page, with the house layout: the heading is HTML above the chart
    (selectable, and clear of plotly's tool bar), the legend a row above the plot (or below
    it, for a long legend that would run under the tool bar); `margin_top` makes room for
    subplot titles."""
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": margin_top, "b": 10},
                      font={"family": "system-ui, sans-serif", "size": 12},
                      paper_bgcolor="white", plot_bgcolor="white",
                      hoverlabel={"align": "left"},
                      legend={"orientation": "h", "x": 0, "xanchor": "left",
                              # Below: at the foot of the figure, under the axis and its
                              # labels (the plot makes room for it).
                              "y": 0 if legend_below else 1.0,
                              "yref": "container" if legend_below else "paper",
                              "yanchor": "bottom"})
    return Figure(id, title, height, pio.to_json(fig, validate=False, pretty=False))


def money(usd: float | None) -> str:
    """$1,234 / $12.35 / - : dollars to the cent below $100, whole dollars above."""
    if usd is None:
        return "-"
    return f"${usd:,.0f}" if abs(usd) >= 100 else f"${usd:,.2f}"


def gbps(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 0.1:
        return f"{x * 1000:.3g} Mbit/s"
    return f"{x:,.3g} Gbit/s" if x < 100 else f"{x:,.0f} Gbit/s"


def hours(h: float | None) -> str:
    if h is None:
        return "-"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h"


def arrow(path: Iterable[str]) -> str:
    return " → ".join(path)


def _json_filter(value: Any) -> Markup:
    return Markup(json.dumps(value).replace("</", "<\\/"))


@cache
def _environment(extra: tuple[str, ...]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*extra, str(TEMPLATES)]),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(money=money, gbps=gbps, hours=hours, arrow=arrow, tojson=_json_filter)
    return env


def render(template: str, *, title: str, figures: Sequence[Figure],
           template_dirs: Sequence[Path] = (), **context: Any) -> str:
    """The page: `template` (from `template_dirs`, then this package's templates) with
    plotly.js, the figures' islands and `context`."""
    env = _environment(tuple(str(d) for d in template_dirs))
    ids = [f.id for f in figures]
    if len(set(ids)) != len(ids):
        raise ValueError(f"figure ids must be unique: {ids}")
    return env.get_template(template).render(
        title=title, figures={f.id: f for f in figures}, plotly_version=get_plotlyjs_version(),
        plotly_js=_plotly_js(), **context)


@cache
def _plotly_js() -> Markup:
    """plotly.js (4.7 MB, read once per process), safe inside a <script> element."""
    return Markup(get_plotlyjs().replace("</script", "<\\/script"))
